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
- `stl10`, `cifar10`, `cifar100`: first the extracted binary folder users already have
  (`stl10_binary/`, `cifar-10-batches-bin/`, `cifar-100-binary/`; `data_dir` may be the folder
  or its parent; never the python-pickle versions), else tensorflow-datasets as below.
- `stl10`, `cifar10`, `cifar100`, `imagenet2012`: tensorflow-datasets, `download=False` by
  default: a dataset that is not prepared fails within seconds with the offline route (the
  original archives in `<data_dir>/downloads/manual/` or `data_dir`, which tfds checks against
  its sha256).
- `image_folder`: a user's own images (class sub-folders, or a flat folder = unlabelled).

Pretraining uses every training image (train + validation, and STL-10's unlabelled split):
labels are never seen there, so carving the probe's validation split does not shrink it.

Modules: `splits` (DatasetSplits and split helpers), `registry`, and one per source:
`fashion_mnist`, `small` (digits, synthetic), `tfds_datasets`, `binary_layouts` (the STL-10 /
CIFAR binary file layouts, checks and writers) with `binary_readers`, `image_folder`. Importing the
package registers every built-in loader; everything public is importable from `keras_ncssl.data`.
"""
from keras_ncssl.data.binary_layouts import (CIFAR_LAYOUTS, STL10_CLASSES, write_cifar_binary,
                                             write_stl10_binary)
from keras_ncssl.data.binary_readers import BINARY_FOLDERS, load_cifar_binary, load_stl10_binary
from keras_ncssl.data.registry import DATASETS, load_dataset, register_dataset
from keras_ncssl.data.splits import DatasetNotAvailableError, DatasetSplits, as_numpy, splits_from_arrays
# The loader modules register themselves on import.
from keras_ncssl.data.fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS, FASHION_MNIST_FILES,
                                            load_fashion_mnist, read_idx)
from keras_ncssl.data.image_folder import IMAGE_EXTENSIONS, check_images, load_image_folder
from keras_ncssl.data.small import load_digits, load_synthetic
from keras_ncssl.data.tfds_datasets import TFDS_DATASETS, TfdsSpec

__all__ = [
    "BINARY_FOLDERS", "CIFAR_LAYOUTS", "STL10_CLASSES", "load_cifar_binary", "load_stl10_binary",
    "write_cifar_binary", "write_stl10_binary", "DATASETS", "DatasetNotAvailableError", "DatasetSplits", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS", "FASHION_MNIST_FILES", "IMAGE_EXTENSIONS", "TFDS_DATASETS", "TfdsSpec",
    "as_numpy", "check_images", "load_dataset", "load_digits", "load_fashion_mnist",
    "load_image_folder", "load_synthetic", "read_idx", "register_dataset", "splits_from_arrays",
]
