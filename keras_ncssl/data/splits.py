"""`DatasetSplits` (what every loader returns), `as_numpy`, and the helpers that build splits from arrays:
a stratified, seeded validation split carved from train, per-channel mean/std."""
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf


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
            dataset is small enough to hold (Fashion-MNIST, digits; memory-mapped for STL-10's
            binary files); else None.
        source: where the data was read from (e.g. "tfds stl10 in DIR"), for logs.
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
    source: Optional[str] = None

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


def validation_indices(labels: Optional[np.ndarray], n: int, fraction: float,
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
    val = validation_indices(y_train, len(y_train), validation_fraction, seed)
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
