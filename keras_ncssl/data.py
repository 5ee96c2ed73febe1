"""Datasets for self-supervised pretraining and linear/kNN evaluation.

One registry, `DATASETS` (name -> loader), and one call, `load_dataset(name, ...)`, which
returns a `DatasetSplits`:

- `pretrain`: unlabelled images (uint8 HxWxC), what the two-view pipeline augments;
- `train` / `validation` / `test`: `(image uint8, label int64)` for the probe. The validation
  split is carved from the training split with a fixed seed (hyper-parameters are chosen on it,
  PITFALLS "Evaluation protocol"); the test split is only for the final number.

Built-in datasets:

- `fashion_mnist` (default): real Fashion-MNIST read offline from the IDX files shipped by the
  Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), a Keras cache
  (~/.keras/datasets/fashion-mnist), a directory given as `data_dir`, or a prepared tfds copy.
- `digits`: scikit-learn's bundled 8x8 digits (1797 images), for fast tests.
- `synthetic`: random smooth images of any shape, for benchmarks and shape tests.
- `stl10`, `cifar10`, `cifar100`, `imagenet2012`: tensorflow-datasets, `download=False` by
  default: a dataset that is not prepared fails within seconds with the offline route (the
  original archives in `<data_dir>/downloads/manual/`, which tfds checks against its sha256).
- `image_folder`: a user's own images (class sub-folders, or a flat folder = unlabelled).

Pretraining uses every training image (train + validation, and STL-10's unlabelled split):
labels are never seen there, so carving the probe's validation split does not shrink it.
"""
import dataclasses
import gzip
import inspect
import logging
import os
import struct
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


class DatasetNotAvailableError(FileNotFoundError):
    """A dataset's files are not on this machine (and downloading was not allowed)."""


@dataclasses.dataclass
class DatasetSplits:
    """A dataset ready for pretraining and evaluation.

    Attributes:
        name: registry name.
        pretrain: `tf.data.Dataset` of single uint8 images [H, W, C], unbatched, no labels.
        train, validation, test: `tf.data.Dataset` of `(image uint8 [H, W, C], label int64)`.
        num_classes: number of classes (0 for unlabelled data).
        image_shape: native `(H, W, C)`; H and W are None for variable-size images.
        mean, std: per-channel statistics in [0, 1] units, for normalisation.
        num_examples: examples per split (`pretrain`, `train`, `validation`, `test`).
        class_names: class names in label order, where known.
        arrays: in-memory `{split: (x, y)}` numpy arrays of the labelled splits, when the
            dataset is small enough to hold (Fashion-MNIST, digits); else None.
    """
    name: str
    pretrain: tf.data.Dataset
    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    num_classes: int
    image_shape: Tuple[Optional[int], Optional[int], int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    num_examples: Dict[str, int]
    class_names: Optional[Tuple[str, ...]] = None
    arrays: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = dataclasses.field(
        default=None, repr=False)

    def numpy(self, split: str, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """`(images uint8 [N, H, W, C], labels int64 [N])` of a labelled split.

        Free for in-memory datasets; otherwise reads the split once (needs fixed-size images).
        """
        if split not in ("train", "validation", "test"):
            raise ValueError(
                f"split={split!r} is not a labelled split; choose 'train', 'validation' or 'test'")
        if self.arrays is not None and split in self.arrays:
            x, y = self.arrays[split]
            return (x, y) if limit is None else (x[:limit], y[:limit])
        return as_numpy(getattr(self, split), limit=limit)


def as_numpy(ds: tf.data.Dataset, limit: Optional[int] = None,
             batch_size: int = 1024) -> Tuple[np.ndarray, ...]:
    """Materialises an unbatched `(image, label)` (or image-only) dataset as numpy arrays.

    Returns a tuple of arrays, one per tuple component (a 1-tuple for image-only datasets).
    """
    if limit is not None:
        ds = ds.take(limit)
    parts = None
    for batch in ds.batch(batch_size).as_numpy_iterator():
        batch = batch if isinstance(batch, tuple) else (batch,)
        if parts is None:
            parts = [[] for _ in batch]
        for store, value in zip(parts, batch):
            store.append(value)
    if parts is None:  # empty dataset: shapes from the element spec
        specs = ds.element_spec if isinstance(ds.element_spec, tuple) else (ds.element_spec,)
        return tuple(np.zeros([0] + [d or 0 for d in s.shape], s.dtype.as_numpy_dtype)
                     for s in specs)
    return tuple(np.concatenate(store) for store in parts)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

DATASETS: Dict[str, Callable[..., DatasetSplits]] = {}


def register_dataset(name: str, loader: Optional[Callable[..., DatasetSplits]] = None):
    """Registers `loader(data_dir, validation_fraction, seed, **options) -> DatasetSplits`.

    Usable as a decorator (`@register_dataset("mine")`) or a call. Replaces an existing entry.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")

    def _register(fn):
        DATASETS[name] = fn
        return fn

    return _register(loader) if loader is not None else _register


def load_dataset(name: str = "fashion_mnist", data_dir: Optional[str] = None,
                 validation_fraction: float = 0.1, seed: int = 0, **options) -> DatasetSplits:
    """Loads a registered dataset.

    Args:
        name: a key of `DATASETS`.
        data_dir: where the data lives (meaning depends on the dataset: the IDX directory for
            fashion_mnist, the tfds data_dir for tfds datasets, the image folder for image_folder).
        validation_fraction: fraction of the training split held out (with `seed`) for
            choosing probe hyper-parameters, in [0, 1).
        seed: seed of the validation split.
        **options: dataset-specific options (e.g. `download=True` for tfds datasets,
            `on_corrupt="skip"` for image_folder); unknown options raise ValueError.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)} "
                         "(or add one with keras_ncssl.data.register_dataset)")
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be in [0, 1)")
    loader = DATASETS[name]
    params = inspect.signature(loader).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        allowed = sorted(k for k in params if k not in ("data_dir", "validation_fraction", "seed"))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; "
                             f"allowed: {allowed}")
    return loader(data_dir=data_dir, validation_fraction=float(validation_fraction),
                  seed=int(seed), **options)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the loaders
# ---------------------------------------------------------------------------------------------

def _validation_indices(labels: Optional[np.ndarray], n: int, fraction: float,
                        seed: int) -> np.ndarray:
    """Sorted indices of the validation split; stratified by class when labels are given."""
    rng = np.random.default_rng(seed)
    if fraction <= 0 or n == 0:
        return np.zeros([0], np.int64)
    if labels is None:
        return np.sort(rng.permutation(n)[:int(round(fraction * n))])
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(idx)[:int(round(fraction * len(idx)))])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _channel_stats(images: np.ndarray, limit: int = 20000) -> Tuple[Tuple[float, ...], ...]:
    """Per-channel mean/std in [0, 1] units over (at most `limit`) uint8 images [N, H, W, C]."""
    x = images[:limit].astype(np.float64) / 255.0
    axes = tuple(range(x.ndim - 1))
    return (tuple(float(v) for v in x.mean(axis=axes)),
            tuple(float(max(v, 1e-3)) for v in x.std(axis=axes)))


def _ensure_4d(images: np.ndarray) -> np.ndarray:
    return images[..., None] if images.ndim == 3 else images


def splits_from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                       y_test: np.ndarray, validation_fraction: float, seed: int,
                       num_classes: Optional[int] = None,
                       class_names: Optional[Sequence[str]] = None,
                       x_unlabelled: Optional[np.ndarray] = None,
                       mean: Optional[Sequence[float]] = None,
                       std: Optional[Sequence[float]] = None) -> DatasetSplits:
    """Builds `DatasetSplits` from in-memory uint8 arrays ([N, H, W] or [N, H, W, C]).

    The validation split is stratified by class and drawn with `seed`. Pretraining sees the
    whole training split (plus `x_unlabelled`), never the test split.
    """
    x_train, x_test = _ensure_4d(np.asarray(x_train)), _ensure_4d(np.asarray(x_test))
    if x_train.dtype != np.uint8 or x_test.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {x_train.dtype} / {x_test.dtype}")
    y_train = np.asarray(y_train, np.int64).reshape(-1)
    y_test = np.asarray(y_test, np.int64).reshape(-1)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"image/label counts differ: train {len(x_train)}/{len(y_train)}, "
                         f"test {len(x_test)}/{len(y_test)}")
    val = _validation_indices(y_train, len(y_train), validation_fraction, seed)
    keep = np.ones(len(y_train), bool)
    keep[val] = False
    arrays = {"train": (x_train[keep], y_train[keep]),
              "validation": (x_train[val], y_train[val]),
              "test": (x_test, y_test)}
    pretrain_x = x_train
    if x_unlabelled is not None and len(x_unlabelled):
        pretrain_x = np.concatenate([x_train, _ensure_4d(np.asarray(x_unlabelled))])
    if mean is None or std is None:
        mean, std = _channel_stats(pretrain_x)

    def labelled(split):
        x, y = arrays[split]
        return tf.data.Dataset.from_tensor_slices((x, y))

    if num_classes is None:
        num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)
    return DatasetSplits(
        name=name,
        pretrain=tf.data.Dataset.from_tensor_slices(pretrain_x),
        train=labelled("train"), validation=labelled("validation"), test=labelled("test"),
        num_classes=int(num_classes), image_shape=tuple(int(d) for d in x_train.shape[1:]),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        num_examples={"pretrain": len(pretrain_x), "train": int(keep.sum()),
                      "validation": len(val), "test": len(y_test)},
        class_names=tuple(class_names) if class_names is not None else None,
        arrays=arrays)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (offline, IDX files)
# ---------------------------------------------------------------------------------------------

FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",
                      os.path.join("~", ".keras", "datasets", "fashion-mnist"))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST/Fashion-MNIST format), gzipped or not, as uint8 numpy.

    Format (LeCun's MNIST page): magic = two zero bytes, a type byte (0x08 = uint8) and the
    number of dimensions; then one big-endian uint32 per dimension; then the data.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (header {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but it holds "
                         f"{body.size} bytes (truncated download?)")
    return body.reshape(dims)


def _find_idx_dir(candidates: Sequence[str]) -> Optional[str]:
    for d in candidates:
        d = os.path.expanduser(d)
        if all(os.path.exists(os.path.join(d, f)) or os.path.exists(os.path.join(d, f[:-3]))
               for f in FASHION_MNIST_FILES):
            return d
    return None


def _idx_path(directory: str, filename: str) -> str:
    path = os.path.join(directory, filename)
    return path if os.path.exists(path) else path[:-3]  # accept gunzipped copies too


@register_dataset("fashion_mnist")
def load_fashion_mnist(data_dir=None, validation_fraction=0.1, seed=0) -> DatasetSplits:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60k/10k 28x28x1, 10 classes, offline.

    Looks, in order, in `data_dir` (and `data_dir/fashion-mnist`), the Debian package's
    /usr/share/datasets/fashion-mnist, the Keras cache ~/.keras/datasets/fashion-mnist, and
    finally a tfds copy prepared under `data_dir` (or tfds' default data dir).
    """
    candidates = []
    if data_dir:
        candidates += [data_dir, os.path.join(data_dir, "fashion-mnist")]
    candidates += list(FASHION_MNIST_DIRS)
    directory = _find_idx_dir(candidates)
    if directory is not None:
        log.info("fashion_mnist: reading IDX files from %s", directory)
        x_train, y_train, x_test, y_test = (
            read_idx(_idx_path(directory, f)) for f in FASHION_MNIST_FILES)
    else:
        arrays = _fashion_mnist_from_tfds(data_dir)
        if arrays is None:
            raise DatasetNotAvailableError(
                "Fashion-MNIST not found. Looked for the four IDX files "
                f"{list(FASHION_MNIST_FILES)} in {[os.path.expanduser(c) for c in candidates]} "
                "and for a prepared tfds 'fashion_mnist'. To get it offline-ready: "
                "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four "
                "files from https://github.com/zalandoresearch/fashion-mnist (data/fashion) into "
                "a directory and pass it as data_dir.")
        x_train, y_train, x_test, y_test = arrays
    return splits_from_arrays("fashion_mnist", x_train, y_train, x_test, y_test,
                              validation_fraction, seed, num_classes=10,
                              class_names=FASHION_MNIST_CLASSES)


def _fashion_mnist_from_tfds(data_dir):
    try:
        import tensorflow_datasets as tfds
        builder = tfds.builder("fashion_mnist", data_dir=data_dir)
        if not builder.is_prepared():
            return None
        out = []
        for split in ("train", "test"):
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
            out += list(as_numpy(ds))
        return out
    except Exception as e:  # a broken tfds install must not hide the real "not found" error
        log.debug("fashion_mnist via tfds unavailable: %s", e)
        return None


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn) and synthetic
# ---------------------------------------------------------------------------------------------

@register_dataset("digits")
def load_digits(data_dir=None, validation_fraction=0.1, seed=0,
                test_fraction=0.2) -> DatasetSplits:
    """scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1797 images).

    Pixel values 0..16 are scaled to uint8 0..255. The test split (`test_fraction`, stratified)
    is fixed (seed 0) so that the test number does not move with `seed`.
    """
    from sklearn.datasets import load_digits as _sk_digits
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1)")
    digits = _sk_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    test = _validation_indices(y, len(y), float(test_fraction), seed=0)
    is_test = np.zeros(len(y), bool)
    is_test[test] = True
    return splits_from_arrays("digits", x[~is_test], y[~is_test], x[is_test], y[is_test],
                              validation_fraction, seed, num_classes=10,
                              class_names=tuple(str(i) for i in range(10)))


@register_dataset("synthetic")
def load_synthetic(data_dir=None, validation_fraction=0.1, seed=0, image_shape=(32, 32, 3),
                   num_examples=2048, num_test=512, num_classes=10) -> DatasetSplits:
    """Random smooth images (class-dependent colour blobs), for benchmarks and shape tests."""
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape={image_shape!r} must be (H, W, C) with positive sizes")
    if int(num_examples) < 1 or int(num_test) < 1 or int(num_classes) < 1:
        raise ValueError(f"num_examples={num_examples!r}, num_test={num_test!r} and "
                         f"num_classes={num_classes!r} must be positive")
    h, w, c = image_shape
    rng = np.random.default_rng(12345)  # fixed: the data set itself does not move with `seed`
    n = int(num_examples) + int(num_test)
    labels = rng.integers(0, num_classes, n)
    small = rng.uniform(0, 1, (n, 4, 4, c)).astype(np.float32)
    small += (labels[:, None, None, None] / max(num_classes - 1, 1)).astype(np.float32)
    images = tf.image.resize(small / 2.0, (h, w), method="bicubic").numpy()
    images = np.clip(images * 255.0, 0, 255).astype(np.uint8)
    k = int(num_examples)
    return splits_from_arrays("synthetic", images[:k], labels[:k], images[k:], labels[k:],
                              validation_fraction, seed, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets (offline by default)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How a tfds dataset maps onto DatasetSplits."""
    tfds_name: str
    image_shape: Tuple[Optional[int], Optional[int], int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    pretrain_splits: Tuple[str, ...] = ("train",)
    test_split: str = "test"
    archive_note: str = ""
    manual_only: bool = False  # tfds cannot download it (ImageNet): archives must be placed


# Per-channel statistics: CIFAR computed on the training images (the 0.2023/0.1994/0.2010 "std"
# often copied, e.g. by [LM], is not the pixel std); STL-10 on train; ImageNet the usual ones.
TFDS_DATASETS = {
    "cifar10": TfdsSpec("cifar10", (32, 32, 3), (0.4914, 0.4822, 0.4465),
                        (0.2470, 0.2435, 0.2616),
                        archive_note="CIFAR needs the *binary* archive "
                                     "(cifar-10-binary.tar.gz), not the python one"),
    "cifar100": TfdsSpec("cifar100", (32, 32, 3), (0.5071, 0.4865, 0.4409),
                         (0.2673, 0.2564, 0.2762),
                         archive_note="CIFAR needs the *binary* archive "
                                      "(cifar-100-binary.tar.gz), not the python one"),
    # [DP]/[LM]: STL-10 pretrains on train + unlabelled at 96 px; the probe uses train/test.
    "stl10": TfdsSpec("stl10", (96, 96, 3), (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
                      pretrain_splits=("train", "unlabelled")),
    # ImageNet's labelled test set is tfds' "validation"; our validation is carved from train.
    "imagenet2012": TfdsSpec("imagenet2012", (None, None, 3), (0.485, 0.456, 0.406),
                             (0.229, 0.224, 0.225), test_split="validation", manual_only=True,
                             archive_note="from image-net.org, registration needed; tfds "
                                          "cannot download ImageNet"),
}


def _manual_archive_names(builder) -> Tuple[str, ...]:
    """File names tfds looks for in the manual dir: the registered names, else URL basenames."""
    infos = builder.url_infos or {}
    return tuple(sorted(info.filename or url.rstrip("/").split("/")[-1]
                        for url, info in infos.items()))


def _prepare_tfds(builder, name: str, spec: TfdsSpec, download: bool) -> None:
    """Prepares `builder` offline from `<data_dir>/downloads/manual/`, or online if allowed.

    tfds 4.9 resolves a URL in the manual dir *before* any network access
    (`DownloadManager._download_or_get_cache`): it looks for `manual_dir/<filename>`, with the
    filename registered next to the URL's size and sha256 (cifar10.txt / checksums.tsv), then
    hashes the file and raises NonMatchingChecksumError if it differs. So preparing with the
    archives in place never touches the network, and a wrong archive is refused. (ImageNet's
    builder instead reads `dl_manager.manual_dir` directly, without a checksum.)
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    root = os.fspath(builder.data_dir_root)
    manual_dir = os.path.join(root, "downloads", "manual")
    archives = _manual_archive_names(builder)
    present = [a for a in archives if os.path.exists(os.path.join(manual_dir, a))]
    if (spec.manual_only or not download) and len(present) < len(archives):
        missing = [a for a in archives if a not in present]
        notes = ([] if spec.manual_only else ["tfds checks their sha256"]) + (
            [spec.archive_note] if spec.archive_note else [])
        raise DatasetNotAvailableError(
            f"Dataset {name!r} (tfds {spec.tfds_name!r}) is not prepared in data_dir={root!r}"
            + ("" if spec.manual_only else " and download=False") + ". Offline route: put the "
            f"original archive(s) {missing} in {manual_dir}/ and call load_dataset again "
            f"({'; '.join(notes)})."
            + ("" if spec.manual_only else " With internet: load_dataset(..., download=True)."))
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as e:
        raise ValueError(
            f"An archive for {name!r} in {manual_dir} does not match the sha256 registered by "
            f"tensorflow-datasets (wrong file or truncated download"
            + (f"; {spec.archive_note}" if spec.archive_note else "") + f"): {e}") from e


def _load_tfds(name: str, data_dir, validation_fraction: float, seed: int,
               download: bool) -> DatasetSplits:
    import tensorflow_datasets as tfds
    spec = TFDS_DATASETS[name]
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        _prepare_tfds(builder, name, spec, bool(download))
    info = builder.info
    n_train = info.splits["train"].num_examples

    def read(split, supervised=True):
        # shuffle_files=False: a deterministic order, which the index-based split relies on.
        return builder.as_dataset(split=split, as_supervised=supervised, shuffle_files=False)

    val = _validation_indices(None, n_train, validation_fraction, seed)
    is_val = np.zeros(n_train, bool)
    is_val[val] = True
    is_val_t = tf.constant(is_val)

    def pick(want_val):
        ds = read("train").enumerate()
        ds = ds.filter(lambda i, ex: tf.equal(tf.gather(is_val_t, i), want_val))
        return ds.map(lambda i, ex: (ex[0], tf.cast(ex[1], tf.int64)))

    def cast_labels(ds):
        return ds.map(lambda x, y: (x, tf.cast(y, tf.int64)))

    pretrain = None
    for split in spec.pretrain_splits:
        part = read(split, supervised=False).map(lambda ex: ex["image"])
        pretrain = part if pretrain is None else pretrain.concatenate(part)
    label_feature = info.features["label"]
    return DatasetSplits(
        name=name, pretrain=pretrain, train=pick(False), validation=pick(True),
        test=cast_labels(read(spec.test_split)), num_classes=int(label_feature.num_classes),
        image_shape=spec.image_shape, mean=spec.mean, std=spec.std,
        num_examples={"pretrain": sum(info.splits[s].num_examples for s in spec.pretrain_splits),
                      "train": n_train - len(val), "validation": len(val),
                      "test": info.splits[spec.test_split].num_examples},
        class_names=tuple(label_feature.names) if label_feature.names else None)


def _tfds_loader(name):
    def loader(data_dir=None, validation_fraction=0.1, seed=0, download=False):
        return _load_tfds(name, data_dir, validation_fraction, seed, download)
    loader.__name__ = f"load_{name}"
    loader.__doc__ = (f"{name} through tensorflow-datasets; download=False fails fast unless "
                      "prepared or the original archives are in <data_dir>/downloads/manual/.")
    return loader


for _name in TFDS_DATASETS:
    register_dataset(_name, _tfds_loader(_name))


# ---------------------------------------------------------------------------------------------
# image_folder: a user's own images
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _list_images(directory: str, extensions) -> list:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.lower().endswith(extensions)
                  and os.path.isfile(os.path.join(directory, f)))


def _scan_labelled(root: str, extensions, class_names=None):
    """(paths, labels, class_names) from class sub-folders, sorted like Keras does."""
    if class_names is None:
        class_names = sorted(d for d in os.listdir(root)
                             if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for label, cls in enumerate(class_names):
        sub = os.path.join(root, cls)
        if not os.path.isdir(sub):
            continue  # a class missing from the test folder is allowed
        for p in _list_images(sub, extensions):
            paths.append(p)
            labels.append(label)
    return paths, labels, list(class_names)


def check_images(paths: Sequence[str], channels: int = 3):
    """Decodes every file once; returns (good_indices, bad [(path, reason)], stats).

    Done up front so a corrupt file is reported before training, not as a crash mid-epoch.
    `stats` holds the per-channel mean/std in [0, 1] units over the decoded (native-size)
    images and the set of native sizes seen.
    """
    good, bad, sizes = [], [], set()
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for i, path in enumerate(paths):
        try:
            raw = tf.io.read_file(path)
            img = tf.io.decode_image(raw, channels=channels, expand_animations=False)
            if img.shape[0] == 0 or img.shape[1] == 0:
                raise ValueError("empty image")
        except (tf.errors.OpError, ValueError) as e:
            reason = getattr(e, "message", None) or str(e)
            bad.append((path, reason.strip().splitlines()[0] if reason else type(e).__name__))
            continue
        sizes.add(tuple(int(d) for d in img.shape[:2]))
        x = tf.cast(img, tf.float64).numpy() / 255.0
        total += x.sum(axis=(0, 1))
        total_sq += (x * x).sum(axis=(0, 1))
        count += x.shape[0] * x.shape[1]
        good.append(i)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean * mean, 1e-6))
    return good, bad, {"mean": tuple(mean), "std": tuple(std), "sizes": sizes}


@register_dataset("image_folder")
def load_image_folder(data_dir=None, validation_fraction=0.1, seed=0, image_size=(96, 96),
                      channels=3, on_corrupt="raise", test_fraction=0.2,
                      extensions=IMAGE_EXTENSIONS) -> DatasetSplits:
    """A user's own images, like `keras.utils.image_dataset_from_directory` (labels inferred
    from sorted sub-folder names), with an up-front decode check.

    Layouts of `data_dir`:
      - `class_a/*.jpg, class_b/*.jpg, ...`: labelled; a stratified `test_fraction` is held
        out (seed 0, fixed) as the test split.
      - `train/<class>/*, test/<class>/*` (optionally `unlabelled/*`): given splits; unlabelled
        images join pretraining only.
      - `*.jpg` (flat): unlabelled, pretraining only; the labelled splits are empty.

    Args:
        image_size: (H, W) every image is resized to (bilinear, antialiased), or None to keep
            the native size (then all images must share one size).
        channels: 1 (grayscale) or 3 (RGB); decoded to this many channels.
        on_corrupt: "raise" (ValueError listing the unreadable files) or "skip" (drop them and
            log how many).
        extensions: file name endings that count as images.
    """
    if data_dir is None or not os.path.isdir(data_dir):
        raise ValueError(f"image_folder needs data_dir = an existing directory, got {data_dir!r}")
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt={on_corrupt!r}; choose 'raise' or 'skip'")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r}; choose 1 or 3")
    if image_size is not None:
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size={image_size!r} must be (height, width) or None")
    extensions = tuple(e.lower() for e in extensions)

    subdirs = {d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))}
    unlabelled_paths = []
    if {"train", "test"} <= subdirs:
        train_paths, train_labels, class_names = _scan_labelled(
            os.path.join(data_dir, "train"), extensions)
        test_paths, test_labels, _ = _scan_labelled(
            os.path.join(data_dir, "test"), extensions, class_names)
        for name in ("unlabelled", "unlabeled"):
            if name in subdirs:
                unlabelled_paths += _list_images(os.path.join(data_dir, name), extensions)
    elif subdirs:
        paths, labels, class_names = _scan_labelled(data_dir, extensions)
        test = set(_validation_indices(np.asarray(labels), len(labels), float(test_fraction),
                                       seed=0).tolist()) if labels else set()
        train_paths = [p for i, p in enumerate(paths) if i not in test]
        train_labels = [y for i, y in enumerate(labels) if i not in test]
        test_paths = [p for i, p in enumerate(paths) if i in test]
        test_labels = [y for i, y in enumerate(labels) if i in test]
    else:
        train_paths, train_labels, test_paths, test_labels, class_names = [], [], [], [], []
        unlabelled_paths = _list_images(data_dir, extensions)

    all_paths = train_paths + test_paths + unlabelled_paths
    if not all_paths:
        raise ValueError(f"no images with extensions {list(extensions)} found under "
                         f"{data_dir!r}")
    _, bad, stats = check_images(all_paths, channels=channels)
    if bad:
        listing = "\n".join(f"  {p}: {r}" for p, r in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        if on_corrupt == "raise":
            raise ValueError(f"{len(bad)} unreadable image file(s) under {data_dir!r} "
                             f"(on_corrupt='raise'; pass on_corrupt='skip' to drop them):\n"
                             f"{listing}{more}")
        log.warning("image_folder: skipping %d unreadable image file(s) under %s:\n%s%s",
                    len(bad), data_dir, listing, more)
    if image_size is None:
        if len(stats["sizes"]) > 1:
            raise ValueError(f"images under {data_dir!r} have {len(stats['sizes'])} different "
                             f"sizes (e.g. {sorted(stats['sizes'])[:3]}); pass image_size=(H, W)")
        image_size = next(iter(stats["sizes"])) if stats["sizes"] else (1, 1)
    bad_paths = {path for path, _ in bad}

    def keep(paths, labels=None):
        idx = [i for i, p in enumerate(paths) if p not in bad_paths]
        return [paths[i] for i in idx], ([labels[i] for i in idx] if labels is not None else None)

    train_paths, train_labels = keep(train_paths, train_labels)
    test_paths, test_labels = keep(test_paths, test_labels)
    unlabelled_paths, _ = keep(unlabelled_paths)

    target = tf.constant(image_size, tf.int32)

    def decode(path):
        img = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                 expand_animations=False)
        img = tf.image.resize(img, target, method="bilinear", antialias=True)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
        return tf.ensure_shape(img, (*image_size, channels))

    def labelled(paths, labels):
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
        return ds.map(lambda p, y: (decode(p), y), num_parallel_calls=AUTOTUNE)

    y_train = np.asarray(train_labels, np.int64)
    val = _validation_indices(y_train, len(y_train), validation_fraction, seed)
    is_val = np.zeros(len(y_train), bool)
    is_val[val] = True
    probe = [p for p, v in zip(train_paths, is_val) if not v]
    probe_y = [y for y, v in zip(train_labels, is_val) if not v]
    val_paths = [p for p, v in zip(train_paths, is_val) if v]
    val_y = [y for y, v in zip(train_labels, is_val) if v]
    pretrain_paths = train_paths + unlabelled_paths
    pretrain = tf.data.Dataset.from_tensor_slices(tf.constant(pretrain_paths, tf.string)).map(
        decode, num_parallel_calls=AUTOTUNE)
    return DatasetSplits(
        name="image_folder", pretrain=pretrain, train=labelled(probe, probe_y),
        validation=labelled(val_paths, val_y), test=labelled(test_paths, test_labels),
        num_classes=len(class_names), image_shape=(*image_size, channels),
        mean=tuple(float(m) for m in stats["mean"]),
        std=tuple(float(max(s, 1e-3)) for s in stats["std"]),
        num_examples={"pretrain": len(pretrain_paths), "train": len(probe),
                      "validation": len(val_paths), "test": len(test_paths)},
        class_names=tuple(class_names))
