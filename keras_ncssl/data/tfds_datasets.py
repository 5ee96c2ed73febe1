"""STL-10, CIFAR-10/100 and ImageNet: from the extracted binary folders users already have
(binary_readers), else through tensorflow-datasets, offline by default (`download=False`): a
missing dataset fails fast, naming the manual-download directory, the archives and the folders."""
import dataclasses
import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from keras_ncssl.data.binary_readers import BINARY_FOLDERS, load_binary_folder
from keras_ncssl.data.registry import register_dataset
from keras_ncssl.data.splits import DatasetNotAvailableError, DatasetSplits, validation_indices


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
    archives = _manual_archive_names(builder)
    # The archives may sit in tfds' manual dir or straight in data_dir (where a user downloaded them).
    manual_dir = os.path.join(root, "downloads", "manual")
    for candidate in (manual_dir, root):
        if archives and all(os.path.exists(os.path.join(candidate, a)) for a in archives):
            manual_dir = candidate
            break
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
            + ("" if spec.manual_only else " With internet: load_dataset(..., download=True).")
            + (f" Or pass the extracted {BINARY_FOLDERS[name]}/ folder (or its parent) as data_dir."
               if name in BINARY_FOLDERS else ""))
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as e:
        raise ValueError(
            f"An archive for {name!r} in {manual_dir} does not match the sha256 registered by "
            f"tensorflow-datasets (wrong file or truncated download"
            + (f"; {spec.archive_note}" if spec.archive_note else "") + f"): {e}") from e


def _import_tfds():
    """`tensorflow_datasets`, or an ImportError that names the usual cause and its fix.

    tfds logs, and survives, a failed import of its protobuf modules, leaving a module without
    `builder`. Seen with tensorflow-metadata 1.21.0, whose generated code needs protobuf >= 6.31
    while it asks pip for >= 4.25 only, beside TensorFlow 2.16-2.19 (protobuf < 6).
    """
    import tensorflow_datasets as tfds
    if hasattr(tfds, "builder"):
        return tfds
    import importlib.metadata
    found = {}
    for package in ("protobuf", "tensorflow-metadata", "tensorflow-datasets"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    raise ImportError(
        "tensorflow_datasets failed to import its protobuf modules (see the error logged above); "
        f"installed: {', '.join(f'{k} {v}' for k, v in found.items())}. With protobuf < 6 "
        "(TensorFlow 2.16-2.19) fix: pip install 'tensorflow-metadata<1.21'")


def _load_tfds(name: str, data_dir, validation_fraction: float, seed: int,
               download: bool) -> DatasetSplits:
    tfds = _import_tfds()
    spec = TFDS_DATASETS[name]
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        _prepare_tfds(builder, name, spec, bool(download))
    info = builder.info
    n_train = info.splits["train"].num_examples

    def read(split, supervised=True):
        # shuffle_files=False: a deterministic order, which the index-based split relies on.
        return builder.as_dataset(split=split, as_supervised=supervised, shuffle_files=False)

    val = validation_indices(None, n_train, validation_fraction, seed)
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
        class_names=tuple(label_feature.names) if label_feature.names else None,
        source=f"tfds {spec.tfds_name} in {os.fspath(builder.data_dir_root)}")


def _tfds_loader(name):
    def loader(data_dir=None, validation_fraction=0.1, seed=0, download=False):
        spec = TFDS_DATASETS[name]
        splits = load_binary_folder(name, data_dir, validation_fraction, seed, spec.mean, spec.std)
        return splits if splits is not None else _load_tfds(name, data_dir, validation_fraction, seed, download)
    loader.__name__ = f"load_{name}"
    folder = (f"the extracted {BINARY_FOLDERS[name]}/ folder given as data_dir (or inside it), else "
              if name in BINARY_FOLDERS else "")
    loader.__doc__ = (f"{name} from {folder}tensorflow-datasets; download=False fails fast unless "
                      "prepared or the original archives are in <data_dir>/downloads/manual/ (or data_dir).")
    return loader


for _name in TFDS_DATASETS:
    register_dataset(_name, _tfds_loader(_name))
