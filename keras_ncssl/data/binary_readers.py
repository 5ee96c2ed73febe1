"""STL-10 and CIFAR-10/100 read from the extracted binary folders users already have (binary_layouts).

`load_binary_folder(name, data_dir, ...)` is what `load_dataset("stl10" | "cifar10" | "cifar100",
data_dir=DIR)` tries before tensorflow-datasets: DIR may be the extracted folder or its parent.

Memory: STL-10's unlabelled split (100,000 images, 2.8 GB) is streamed from its file by
`tf.data.FixedLengthRecordDataset` and never loaded; the labelled splits (train 5,000 and test
8,000 images, 138 MB and 221 MB) are memory-mapped for the probe's arrays and streamed for the
`tf.data` splits, so no split is held twice. CIFAR (180 MB) is read into memory like Fashion-MNIST.
"""
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from keras_ncssl.data.binary_layouts import (CIFAR_IMAGE_BYTES, CIFAR_LAYOUTS, STL10_CLASSES, STL10_FILES,
                                             STL10_FOLDER, STL10_IMAGE_BYTES, STL10_SHAPE, check_labels,
                                             find_folder, read_bytes, read_names, record_count,
                                             refuse_python_version)
from keras_ncssl.data.splits import DatasetSplits, validation_indices, splits_from_arrays

AUTOTUNE = tf.data.AUTOTUNE

BINARY_FOLDERS = {"stl10": STL10_FOLDER, **{name: layout.folder for name, layout in CIFAR_LAYOUTS.items()}}
"""Registry name -> the folder its binary archive extracts to."""


def load_binary_folder(name: str, data_dir: Optional[str], validation_fraction: float, seed: int,
                       mean: Sequence[float], std: Sequence[float]) -> Optional[DatasetSplits]:
    """`name` from its extracted binary folder under `data_dir`, or None if there is none."""
    if name == "stl10":
        folder = find_folder(data_dir, STL10_FOLDER, STL10_FILES["train"][0])
        return None if folder is None else load_stl10_binary(folder, validation_fraction, seed, mean, std)
    if name in CIFAR_LAYOUTS:
        refuse_python_version(name, data_dir)
        layout = CIFAR_LAYOUTS[name]
        folder = find_folder(data_dir, layout.folder, layout.test_files[0])
        return None if folder is None else load_cifar_binary(name, folder, validation_fraction, seed, mean, std)
    return None


# -- STL-10 -------------------------------------------------------------------------------------

def _decode_stl10(record):
    """One record (3 x W x H bytes, column-major per image) -> uint8 [H, W, 3]."""
    raw = tf.reshape(tf.io.decode_raw(record, tf.uint8), (3, STL10_SHAPE[1], STL10_SHAPE[0]))
    return tf.ensure_shape(tf.transpose(raw, (2, 1, 0)), STL10_SHAPE)


def _stl10_images(path):
    return tf.data.FixedLengthRecordDataset(path, STL10_IMAGE_BYTES).map(_decode_stl10, num_parallel_calls=AUTOTUNE)


def _stl10_labels(path):
    return tf.data.FixedLengthRecordDataset(path, 1).map(
        lambda record: tf.cast(tf.io.decode_raw(record, tf.uint8)[0], tf.int64) - 1)


def interleave_evenly(first: tf.data.Dataset, second: tf.data.Dataset, n_first: int, n_second: int):
    """The two streams merged so that `first`'s elements are spread evenly through `second`'s
    (element i comes from `first` when floor((i+1) a / T) > floor(i a / T), a = n_first,
    T = n_first + n_second): a stream with the same mix everywhere, so a bounded shuffle buffer
    downstream sees train and unlabelled images in proportion from the first batch on."""
    total = int(n_first) + int(n_second)
    a = tf.constant(int(n_first), tf.int64)

    def source(i):
        return tf.where((i + 1) * a // total > i * a // total, tf.constant(0, tf.int64), tf.constant(1, tf.int64))

    choice = tf.data.Dataset.range(total).map(source)
    merged = tf.data.Dataset.choose_from_datasets([first, second], choice)
    return merged.apply(tf.data.experimental.assert_cardinality(total))


def _split_by_index(ds, is_validation, want):
    """The elements of `ds` whose index i has is_validation[i] == want, in order."""
    flags = tf.constant(is_validation)

    def keep(i, example):
        return tf.equal(tf.gather(flags, i), want)

    def drop_index(i, example):
        return example

    return ds.enumerate().filter(keep).map(drop_index)


def load_stl10_binary(folder: str, validation_fraction: float = 0.1, seed: int = 0,
                      mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25)):
    """STL-10 from `stl10_binary/`: pretrain = train + unlabelled (as [DP]/[LM]), probe on train/test.

    The validation split is carved from train (stratified, `seed`); the test split is the 8,000
    test images. Labels 1..10 on disk become 0..9.
    """
    paths, counts, labels = {}, {}, {}
    for split, (x_name, y_name) in STL10_FILES.items():
        paths[split] = os.path.join(folder, x_name)
        counts[split] = record_count(paths[split], STL10_IMAGE_BYTES,
                                     f"STL-10 {x_name}: uint8 images of 3x96x96 stored column-major")
        if y_name is None:
            continue
        y_path = os.path.join(folder, y_name)
        n_labels = record_count(y_path, 1, f"STL-10 {y_name}: one uint8 label 1..10 per image of {x_name}")
        if n_labels != counts[split]:
            raise ValueError(f"{y_path} holds {n_labels} labels but {paths[split]} holds {counts[split]} "
                             f"images; expected one label per image (a truncated or mismatched file).")
        y = np.asarray(read_bytes(y_path), np.int64)
        check_labels(y, 1, 10, y_path, "label")
        labels[split] = (y - 1, y_path)

    def images(split):  # a memory-mapped, zero-copy view in HWC order
        raw = read_bytes(paths[split]).reshape(counts[split], 3, STL10_SHAPE[1], STL10_SHAPE[0])
        return raw.transpose(0, 3, 2, 1)

    y_train, y_test = labels["train"][0], labels["test"][0]
    val = validation_indices(y_train, len(y_train), validation_fraction, seed)
    is_val = np.zeros(len(y_train), bool)
    is_val[val] = True
    x_train = images("train")
    arrays = {"train": (x_train[~is_val], y_train[~is_val]), "validation": (x_train[val], y_train[val]),
              "test": (images("test"), y_test)}

    def labelled(split):
        return tf.data.Dataset.zip((_stl10_images(paths[split]), _stl10_labels(labels[split][1])))

    pretrain = interleave_evenly(_stl10_images(paths["train"]), _stl10_images(paths["unlabelled"]),
                                 counts["train"], counts["unlabelled"])
    return DatasetSplits(
        name="stl10", pretrain=pretrain, train=_split_by_index(labelled("train"), is_val, False),
        validation=_split_by_index(labelled("train"), is_val, True), test=labelled("test"), num_classes=10,
        image_shape=STL10_SHAPE, mean=tuple(mean), std=tuple(std),
        num_examples={"pretrain": counts["train"] + counts["unlabelled"], "train": int((~is_val).sum()),
                      "validation": len(val), "test": counts["test"]},
        class_names=read_names(os.path.join(folder, "class_names.txt"), 10, STL10_CLASSES), arrays=arrays,
        source=f"STL-10 binary folder {folder} (train + unlabelled for pretraining)")


# -- CIFAR --------------------------------------------------------------------------------------

def _read_cifar_files(name, folder, files):
    """(images uint8 [N, 32, 32, 3], class labels int64 [N]) of the named batch files, in order."""
    layout = CIFAR_LAYOUTS[name]
    images, labels = [], []
    for file_name in files:
        path = os.path.join(folder, file_name)
        n = record_count(path, layout.record_bytes,
                         f"{name} binary records of {layout.label_bytes} label byte(s) + {CIFAR_IMAGE_BYTES} "
                         f"image bytes, from {layout.archive}")
        records = np.asarray(read_bytes(path)).reshape(n, layout.record_bytes)
        for index, limit in enumerate(layout.label_limits):
            what = "label" if len(layout.label_limits) == 1 else ("coarse label", "fine label")[index]
            check_labels(records[:, index], 0, limit - 1, path, what)
        labels.append(records[:, layout.label_index].astype(np.int64))
        images.append(records[:, layout.label_bytes:].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar_binary(name: str, folder: str, validation_fraction: float = 0.1, seed: int = 0,
                      mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
    """CIFAR-10 or CIFAR-100 (fine labels) from `cifar-10-batches-bin/` or `cifar-100-binary/`."""
    layout = CIFAR_LAYOUTS[name]
    x_train, y_train = _read_cifar_files(name, folder, layout.train_files)
    x_test, y_test = _read_cifar_files(name, folder, layout.test_files)
    splits = splits_from_arrays(
        name, x_train, y_train, x_test, y_test, validation_fraction, seed, num_classes=layout.num_classes,
        class_names=read_names(os.path.join(folder, layout.names_file), layout.num_classes), mean=mean, std=std)
    splits.source = f"{name} binary folder {folder}"
    return splits
