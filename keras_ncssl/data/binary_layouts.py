"""The binary layouts STL-10 and CIFAR-10/100 ship in: what the files are, how to find and check them,
and writers for the same layouts (small test data, converting your own arrays).

- STL-10 (Coates, Ng, Lee 2011; `stl10_binary.tar.gz` extracted, as torchvision reads it):
  `stl10_binary/{train,test}_X.bin` and `unlabeled_X.bin`: uint8 images of 3 x 96 x 96 stored
  column-major (MATLAB order): read C-order as (N, 3, W, H), so HWC = transpose(0, 3, 2, 1)
  (torchvision: reshape (-1, 3, 96, 96), transpose (0, 1, 3, 2) -> NCHW). `{train,test}_y.bin`:
  one uint8 label per image, 1..10. `class_names.txt`: one name per line.
- CIFAR-10 (Krizhevsky 2009, `cifar-10-binary.tar.gz`): `cifar-10-batches-bin/data_batch_1..5.bin`
  and `test_batch.bin`, records of 1 label byte (0..9) + 3072 bytes (R, G, B planes, each 32 x 32
  row-major); `batches.meta.txt`: class names.
- CIFAR-100 (`cifar-100-binary.tar.gz`): `cifar-100-binary/train.bin`, `test.bin`, records of 2
  label bytes (coarse 0..19, fine 0..99) + 3072; `fine_label_names.txt`.

The python-pickle versions (`cifar-10-batches-py/`) are never read: unpickling a file runs
whatever code it holds.
"""
import dataclasses
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from keras_ncssl.data.splits import DatasetNotAvailableError

STL10_FOLDER = "stl10_binary"
STL10_SHAPE = (96, 96, 3)
STL10_IMAGE_BYTES = 3 * 96 * 96
STL10_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
               "unlabelled": ("unlabeled_X.bin", None)}
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
CIFAR_SHAPE = (32, 32, 3)
CIFAR_IMAGE_BYTES = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class CifarLayout:
    """One CIFAR binary layout: files, label bytes per record, which label byte is the class."""
    folder: str
    train_files: Tuple[str, ...]
    test_files: Tuple[str, ...]
    label_bytes: int
    label_index: int  # CIFAR-100 records hold (coarse, fine): the class is the fine label
    label_limits: Tuple[int, ...]  # exclusive upper bound of each label byte
    names_file: str
    python_folder: str  # the pickle version, refused by name
    archive: str

    @property
    def record_bytes(self):
        return self.label_bytes + CIFAR_IMAGE_BYTES

    @property
    def num_classes(self):
        return self.label_limits[self.label_index]


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                           ("test_batch.bin",), 1, 0, (10,), "batches.meta.txt", "cifar-10-batches-py",
                           "cifar-10-binary.tar.gz"),
    "cifar100": CifarLayout("cifar-100-binary", ("train.bin",), ("test.bin",), 2, 1, (20, 100),
                            "fine_label_names.txt", "cifar-100-python", "cifar-100-binary.tar.gz"),
}


def find_folder(data_dir: Optional[str], folder: str, marker: str) -> Optional[str]:
    """`data_dir` itself if it holds `marker` (or is named `folder`), else `data_dir/folder` if
    that is a directory, else None: DIR may be the extracted folder or its parent."""
    if not data_dir:
        return None
    data_dir = os.path.expanduser(os.fspath(data_dir))
    if tf.io.gfile.exists(os.path.join(data_dir, marker)) or (
            os.path.basename(os.path.normpath(data_dir)) == folder and tf.io.gfile.isdir(data_dir)):
        return data_dir
    inner = os.path.join(data_dir, folder)
    return inner if tf.io.gfile.isdir(inner) else None


def refuse_python_version(name: str, data_dir: Optional[str]) -> None:
    """A pickle-only CIFAR directory gets a one-line error naming the binary archive."""
    if name not in CIFAR_LAYOUTS or not data_dir:
        return
    layout = CIFAR_LAYOUTS[name]
    data_dir = os.path.expanduser(os.fspath(data_dir))
    for candidate in (data_dir, os.path.join(data_dir, layout.python_folder)):
        if os.path.basename(os.path.normpath(candidate)) == layout.python_folder and tf.io.gfile.isdir(candidate):
            raise ValueError(
                f"--data_dir={data_dir!r} holds {layout.python_folder}/, the python-pickle version of {name}, "
                f"which keras_ncssl never unpickles; get the binary version ({layout.archive}, extracted to "
                f"{layout.folder}/) and pass its folder or parent as data_dir.")


def record_count(path: str, record_bytes: int, what: str) -> int:
    """Records in `path`, checking it exists and holds a whole, non-zero number of them."""
    if not tf.io.gfile.exists(path):
        raise DatasetNotAvailableError(f"{path} is missing: expected {what}.")
    size = tf.io.gfile.stat(path).length
    if size == 0 or size % record_bytes:
        raise ValueError(f"{path} has {size} bytes, not a whole non-zero number of {record_bytes}-byte "
                         f"records ({what}); the file is truncated or from another layout.")
    return size // record_bytes


def read_bytes(path: str) -> np.ndarray:
    """A file's bytes as uint8: memory-mapped for local files (read once, never copied), read
    through tf.io.gfile for remote ones (gs://...)."""
    if os.path.exists(path):
        return np.memmap(path, dtype=np.uint8, mode="r")
    with tf.io.gfile.GFile(path, "rb") as handle:
        return np.frombuffer(handle.read(), np.uint8)


def check_labels(labels: np.ndarray, low: int, high: int, path: str, what: str) -> None:
    """Every label in [low, high], else a one-line error naming the file and the value."""
    bad = np.flatnonzero((labels < low) | (labels > high))
    if len(bad):
        raise ValueError(f"{path}: {what} {int(labels[bad[0]])} at record {int(bad[0])} is outside "
                         f"{low}..{high} ({len(bad)} such records); the file is corrupt or from another layout.")


def read_names(path: str, count: int, default: Optional[Sequence[str]] = None) -> Optional[Tuple[str, ...]]:
    """Class names, one per line (blank lines dropped), if the file exists and has `count`."""
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as handle:
            names = tuple(line.strip() for line in handle.read().splitlines() if line.strip())
        if len(names) == count:
            return names
    return tuple(default) if default is not None else None


# -- writers ------------------------------------------------------------------------------------

def stl10_raw(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 96, 96, 3] -> the file's byte order: (N, 3, W, H), column-major per image."""
    return np.ascontiguousarray(np.asarray(images, np.uint8).transpose(0, 3, 2, 1))


def write_stl10_binary(folder: str, train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray],
                       unlabelled: np.ndarray, class_names: Sequence[str] = STL10_CLASSES) -> str:
    """Writes the STL-10 binary layout: images uint8 [N, 96, 96, 3], labels 0..9 (stored 1..10)."""
    os.makedirs(folder, exist_ok=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        x_name, y_name = STL10_FILES[split]
        stl10_raw(images).tofile(os.path.join(folder, x_name))
        (np.asarray(labels, np.int64) + 1).astype(np.uint8).tofile(os.path.join(folder, y_name))
    stl10_raw(unlabelled).tofile(os.path.join(folder, STL10_FILES["unlabelled"][0]))
    with open(os.path.join(folder, "class_names.txt"), "w") as handle:
        handle.write("\n".join(class_names) + "\n")
    return folder


def cifar_records(images: np.ndarray, labels: np.ndarray, layout: CifarLayout,
                  coarse_labels: Optional[np.ndarray] = None) -> bytes:
    """uint8 [N, 32, 32, 3] and labels -> the binary records (label byte(s), R, G, B planes)."""
    images = np.asarray(images, np.uint8)
    columns = [np.asarray(labels, np.uint8)[:, None]]
    if layout.label_bytes == 2:
        coarse = np.zeros(len(images), np.uint8) if coarse_labels is None else np.asarray(coarse_labels, np.uint8)
        columns.insert(0, coarse[:, None])
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate(columns + [planes], axis=1).tobytes()


def write_cifar_binary(name: str, folder: str, train: Tuple[np.ndarray, np.ndarray],
                       test: Tuple[np.ndarray, np.ndarray], class_names: Optional[Sequence[str]] = None) -> str:
    """Writes the CIFAR-10 or CIFAR-100 binary layout; train is split evenly over the batch files."""
    layout = CIFAR_LAYOUTS[name]
    os.makedirs(folder, exist_ok=True)
    for files, (images, labels) in ((layout.train_files, train), (layout.test_files, test)):
        parts = np.array_split(np.arange(len(images)), len(files))
        for file_name, index in zip(files, parts):
            with open(os.path.join(folder, file_name), "wb") as handle:
                handle.write(cifar_records(images[index], np.asarray(labels)[index], layout))
    names = class_names or [f"class_{i}" for i in range(layout.num_classes)]
    with open(os.path.join(folder, layout.names_file), "w") as handle:
        handle.write("\n".join(names) + "\n")
    return folder
