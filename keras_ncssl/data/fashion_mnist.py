"""Fashion-MNIST offline: the IDX files of Debian's `dataset-fashion-mnist`, a Keras cache, `data_dir`
or a prepared tensorflow-datasets copy."""
import gzip
import logging
import os
import struct
from typing import Optional, Sequence

import numpy as np

from keras_ncssl.data.registry import register_dataset
from keras_ncssl.data.splits import DatasetNotAvailableError, DatasetSplits, as_numpy, splits_from_arrays

log = logging.getLogger(__name__)


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

    With `data_dir`, looks only there: the IDX files in `data_dir` (or `data_dir/fashion-mnist`),
    then a tfds copy prepared under `data_dir`. Without it, in the Debian package's
    /usr/share/datasets/fashion-mnist, the Keras cache ~/.keras/datasets/fashion-mnist, then
    tfds' default data dir.
    """
    # An explicit data_dir is the only place looked at: silently reading other files than the
    # ones a user pointed to would be worse than failing.
    candidates = [data_dir, os.path.join(data_dir, "fashion-mnist")] if data_dir else list(FASHION_MNIST_DIRS)
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
