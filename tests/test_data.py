"""Tests for keras_ncssl.data: offline Fashion-MNIST, digits, tfds archives, image folders."""
import gzip
import io
import logging
import os
import struct
import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import data
from keras_ncssl.data.splits import validation_indices


def _fingerprints(images):
    """Sorted per-image hashes: equal for equal multisets of images."""
    return sorted(_hashes(images))


def _hashes(images):
    return [hash(row.tobytes()) for row in np.ascontiguousarray(images).reshape(len(images), -1)]


@pytest.fixture(scope="module")
def fashion():
    try:
        return data.load_dataset("fashion_mnist")
    except data.DatasetNotAvailableError as e:  # CI installs dataset-fashion-mnist (Makefile)
        pytest.skip(f"Fashion-MNIST not installed: {e}")


# -- registry and options -----------------------------------------------------------------------

def test_unknown_dataset_names_it_and_lists_choices():
    with pytest.raises(ValueError, match=r"'mnist_3d'.*cifar10.*digits.*fashion_mnist"):
        data.load_dataset("mnist_3d")


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match=r"\['colour'\].*'digits'.*allowed: \['test_fraction'\]"):
        data.load_dataset("digits", colour=True)
    with pytest.raises(ValueError, match="validation_fraction=1.5"):
        data.load_dataset("digits", validation_fraction=1.5)
    with pytest.raises(ValueError, match="'numbers'"):
        data.load_dataset("digits").numpy("numbers")


def test_register_a_custom_dataset(monkeypatch, rng):
    def tiny(data_dir=None, validation_fraction=0.1, seed=0):
        x = rng.integers(0, 256, (40, 5, 5, 3), dtype=np.uint8)
        y = np.arange(40) % 4
        return data.splits_from_arrays("tiny", x[:30], y[:30], x[30:], y[30:],
                                       validation_fraction, seed)

    monkeypatch.setitem(data.DATASETS, "tiny", tiny)
    splits = data.load_dataset("tiny", validation_fraction=0.2)
    assert splits.num_examples == {"pretrain": 30, "train": 24, "validation": 6, "test": 10}
    assert splits.num_classes == 4 and splits.image_shape == (5, 5, 3)
    assert len(splits.mean) == 3


# -- Fashion-MNIST ------------------------------------------------------------------------------

def test_fashion_mnist_offline_counts(fashion):
    assert fashion.name == "fashion_mnist" and fashion.num_classes == 10
    assert fashion.image_shape == (28, 28, 1)
    assert fashion.num_examples == {"pretrain": 60000, "train": 54000, "validation": 6000,
                                    "test": 10000}
    x_tr, y_tr = fashion.numpy("train")
    x_va, y_va = fashion.numpy("validation")
    x_te, y_te = fashion.numpy("test")
    assert x_tr.dtype == np.uint8 and x_tr.shape == (54000, 28, 28, 1) and y_tr.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(np.concatenate([y_tr, y_va])), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_va), [600] * 10)  # stratified
    np.testing.assert_array_equal(np.bincount(y_te), [1000] * 10)
    assert abs(fashion.mean[0] - 0.286) < 0.01 and abs(fashion.std[0] - 0.353) < 0.01
    assert int(fashion.pretrain.cardinality()) == 60000
    assert fashion.pretrain.element_spec == tf.TensorSpec((28, 28, 1), tf.uint8)
    first_x, first_y = next(iter(fashion.train))
    np.testing.assert_array_equal(first_x.numpy(), x_tr[0])
    assert int(first_y) == y_tr[0]


def test_fashion_mnist_validation_is_a_disjoint_part_of_train(fashion):
    x_tr, _ = fashion.numpy("train")
    x_va, _ = fashion.numpy("validation")
    debian = os.path.join(data.FASHION_MNIST_DIRS[0], data.FASHION_MNIST_FILES[0])
    if os.path.exists(debian):  # train + validation is exactly the original training set
        original = data.read_idx(debian)
        assert _fingerprints(np.concatenate([x_tr, x_va])) == _fingerprints(original[..., None])
    # index level: the split is a partition, fixed by the seed, and moves with it
    labels = np.repeat(np.arange(10), 6000)
    val = validation_indices(labels, len(labels), 0.1, seed=0)
    assert len(np.unique(val)) == 6000
    np.testing.assert_array_equal(val, validation_indices(labels, len(labels), 0.1, 0))
    assert len(np.intersect1d(val, validation_indices(labels, len(labels), 0.1, 1))) < 1000


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_data_dir_and_idx_checks(tmp_path, rng):
    arrays = [rng.integers(0, 256, (20, 28, 28)), np.arange(20) % 10,
              rng.integers(0, 256, (10, 28, 28)), np.arange(10)]
    for name, array in zip(data.FASHION_MNIST_FILES, arrays):
        _write_idx(tmp_path / name, array)
    splits = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), validation_fraction=0.5)
    assert splits.num_examples == {"pretrain": 20, "train": 10, "validation": 10, "test": 10}
    np.testing.assert_array_equal(splits.numpy("test")[0][..., 0], arrays[2])
    truncated = tmp_path / "bad.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 100) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(truncated))
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        data.read_idx(_garbage(tmp_path))


def _garbage(tmp_path):
    path = tmp_path / "garbage.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"GIF89a....")
    return str(path)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data.fashion_mnist, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(data.DatasetNotAvailableError) as info:
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "empty"))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "zalandoresearch/fashion-mnist" in message and "data_dir" in message


# -- digits ---------------------------------------------------------------------------------------

def test_digits_small_and_fixed_test_split():
    a = data.load_dataset("digits", seed=0)
    b = data.load_dataset("digits", seed=1)
    assert sum(a.num_examples[k] for k in ("train", "validation", "test")) == 1797
    assert a.image_shape == (8, 8, 1) and a.num_classes == 10
    x, y = a.numpy("train")
    assert x.dtype == np.uint8 and x.max() == 255
    np.testing.assert_array_equal(a.numpy("test")[1], b.numpy("test")[1])  # test fixed
    assert not np.array_equal(a.numpy("validation")[0], b.numpy("validation")[0])


# -- tensorflow-datasets, offline -----------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _write_cifar10_binary(path, rng, per_batch=40, test=50):
    """A CIFAR-10 *binary* archive in the real layout: cifar-10-batches-bin/ with
    data_batch_1..5.bin and test_batch.bin (records: 1 label byte + 3072 bytes, R then G then
    B planes of 32x32) and batches.meta.txt. Returns the records written."""
    records = {}

    def batch(n):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        images = planes.transpose(0, 2, 3, 1)
        return np.concatenate([labels[:, None], planes.reshape(n, -1)], 1).tobytes(), \
            (images, labels)

    files = {}
    for i in range(1, 6):
        files[f"data_batch_{i}.bin"], records[f"train{i}"] = batch(per_batch)
    files["test_batch.bin"], records["test"] = batch(test)
    files["batches.meta.txt"] = ("\n".join(CIFAR10_CLASSES) + "\n").encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return records


def test_tfds_dataset_missing_fails_fast_with_offline_route(tmp_path):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotAvailableError) as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert str(tmp_path) in message
    assert os.path.join("downloads", "manual") in message
    assert "cifar-10-binary.tar.gz" in message and "binary" in message
    assert "download=True" in message
    assert elapsed < 10.0, f"took {elapsed:.1f}s"  # ~1-2 s: no network, no generation
    assert not (tmp_path / "cifar10").exists()


def test_tfds_cifar10_from_an_offline_archive(tmp_path, monkeypatch, rng):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums

    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    archive = manual / "cifar-10-binary.tar.gz"
    records = _write_cifar10_binary(str(archive), rng)

    # tfds hashes what it finds in the manual dir and compares with the size/sha256 it has
    # registered for the URL (url_checksums/cifar10.txt): our small archive is refused.
    with pytest.raises(ValueError, match="sha256"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))

    # Test-only: register *this archive's* true size and sha256 for the URL, through the
    # builder's own checksum table (DatasetBuilder.url_infos, which the DownloadManager
    # layers over the global registry). tfds still hashes the file and checks it against
    # this entry, and still finds it by the registered file name in downloads/manual/.
    # monkeypatch removes the class attribute afterwards, restoring the real checksums.
    builder_cls = tfds.builder_cls("cifar10")
    monkeypatch.setattr(builder_cls, "url_infos",
                        {CIFAR10_URL: checksums.compute_url_info(archive)}, raising=False)
    splits = data.load_dataset("cifar10", data_dir=str(tmp_path), validation_fraction=0.1)

    assert splits.num_examples == {"pretrain": 200, "train": 180, "validation": 20, "test": 50}
    assert splits.num_classes == 10 and list(splits.class_names) == CIFAR10_CLASSES
    assert splits.image_shape == (32, 32, 3)
    x_te, y_te = splits.numpy("test")
    want_x, want_y = records["test"]
    # tfds shuffles at generation; compare as sets of (label, image)
    got = sorted(zip(y_te.tolist(), _hashes(x_te)))
    want = sorted(zip(want_y.astype(np.int64).tolist(), _hashes(want_x)))
    assert got == want
    x_tr, _ = splits.numpy("train")
    x_va, _ = splits.numpy("validation")
    train_images = np.concatenate([records[f"train{i}"][0] for i in range(1, 6)])
    assert _fingerprints(np.concatenate([x_tr, x_va])) == _fingerprints(train_images)

    from keras_ncssl import augment
    v1, v2 = next(iter(augment.pretrain_dataset(splits, "cifar10", batch_size=16,
                                                jit_compile=False)))
    assert v1.shape == (16, 32, 32, 3) and v2.dtype == tf.float32
    # A second call reuses the prepared copy, even without the archive.
    os.remove(archive)
    again = data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert again.num_examples["test"] == 50


# -- image_folder -------------------------------------------------------------------------------

def _png(path, array):
    tf.io.write_file(str(path), tf.io.encode_png(array))


@pytest.fixture
def folder(tmp_path, rng):
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            _png(root / cls / f"{i}.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    (root / "dog" / "notes.txt").write_text("not an image, not listed")
    return root


def test_image_folder_labelled(folder):
    splits = data.load_dataset("image_folder", data_dir=str(folder), image_size=(8, 8),
                               validation_fraction=0.25, test_fraction=0.25)
    assert splits.class_names == ("cat", "dog") and splits.num_classes == 2
    assert splits.image_shape == (8, 8, 3)
    n = splits.num_examples
    assert n["test"] == 4 and n["train"] + n["validation"] == 8 and n["pretrain"] == 8
    x, y = splits.numpy("train")
    assert x.shape[1:] == (8, 8, 3) and x.dtype == np.uint8 and set(y) <= {0, 1}
    native = data.load_dataset("image_folder", data_dir=str(folder), image_size=None,
                               channels=1)
    assert native.image_shape == (10, 12, 1)


def test_image_folder_corrupt_file_raise_or_skip(folder, caplog):
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (folder / "dog" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError) as info:
        data.load_dataset("image_folder", data_dir=str(folder))
    message = str(info.value)
    assert "2 unreadable" in message and "broken.png" in message and "empty.jpg" in message
    assert "on_corrupt='skip'" in message
    with caplog.at_level(logging.WARNING, logger="keras_ncssl.data"):
        splits = data.load_dataset("image_folder", data_dir=str(folder), on_corrupt="skip",
                                   image_size=(8, 8), test_fraction=0.25)
    assert "skipping 2 unreadable" in caplog.text
    assert sum(splits.num_examples[k] for k in ("train", "validation", "test")) == 12
    assert len(list(splits.pretrain)) == splits.num_examples["pretrain"]  # decodes cleanly
    with pytest.raises(ValueError, match="on_corrupt='ignore'"):
        data.load_dataset("image_folder", data_dir=str(folder), on_corrupt="ignore")


def test_image_folder_flat_is_unlabelled_and_split_layout(tmp_path, rng):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        _png(flat / f"{i}.png", rng.integers(0, 256, (6, 6, 1), dtype=np.uint8))
    splits = data.load_dataset("image_folder", data_dir=str(flat), image_size=None, channels=1)
    assert splits.num_examples == {"pretrain": 5, "train": 0, "validation": 0, "test": 0}
    assert splits.num_classes == 0 and splits.numpy("train")[0].shape == (0, 6, 6, 1)

    split_root = tmp_path / "split"
    for part, count in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            (split_root / part / cls).mkdir(parents=True)
            for i in range(count):
                _png(split_root / part / cls / f"{i}.png",
                     rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    (split_root / "unlabelled").mkdir()
    _png(split_root / "unlabelled" / "u.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    splits = data.load_dataset("image_folder", data_dir=str(split_root), image_size=None,
                               validation_fraction=0.25)
    assert splits.num_examples == {"pretrain": 9, "train": 6, "validation": 2, "test": 4}
    with pytest.raises(ValueError, match="existing directory"):
        data.load_dataset("image_folder", data_dir=str(tmp_path / "missing"))


def test_as_numpy_handles_image_only_and_empty():
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((5, 2, 2, 1), np.uint8))
    (x,) = data.as_numpy(ds, limit=3)
    assert x.shape == (3, 2, 2, 1)
    (empty,) = data.as_numpy(ds.take(0))
    assert empty.shape == (0, 2, 2, 1)
