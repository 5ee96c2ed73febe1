"""STL-10 and CIFAR-10/100 from the extracted binary folders users already have.

The files are written here by independent code that follows the format descriptions (the
STL-10 site / torchvision's STL10 reader, the CIFAR page), not by the library's own writers;
the writers are then checked against them byte for byte.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import data


def _stl10_bytes(images):
    """NHWC uint8 -> STL-10 file bytes, inverting torchvision's reader: it reads the bytes as
    (N, 3, 96, 96) and transposes (0, 1, 3, 2) to NCHW, so the file holds NCHW.transpose(0, 1, 3, 2)."""
    nchw = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(nchw.transpose(0, 1, 3, 2)).tobytes()


def _torchvision_stl10_read(path):
    """torchvision.datasets.STL10's reading, then NCHW -> NHWC."""
    raw = np.fromfile(path, np.uint8)
    return np.transpose(np.reshape(raw, (-1, 3, 96, 96)), (0, 1, 3, 2)).transpose(0, 2, 3, 1)


def _write_stl10(folder, rng, n_train=40, n_test=20, n_unlabelled=88):
    os.makedirs(folder, exist_ok=True)
    arrays = {"train": (rng.integers(0, 256, (n_train, 96, 96, 3), dtype=np.uint8), np.arange(n_train) % 10),
              "test": (rng.integers(0, 256, (n_test, 96, 96, 3), dtype=np.uint8), rng.integers(0, 10, n_test)),
              "unlabeled": (rng.integers(0, 256, (n_unlabelled, 96, 96, 3), dtype=np.uint8), None)}
    for split, (x, y) in arrays.items():
        with open(os.path.join(folder, f"{split}_X.bin"), "wb") as handle:
            handle.write(_stl10_bytes(x))
        if y is not None:
            with open(os.path.join(folder, f"{split}_y.bin"), "wb") as handle:
                handle.write((y + 1).astype(np.uint8).tobytes())  # STL-10 labels are 1..10 on disk
    return arrays


def _cifar_bytes(images, *label_columns):
    """Records: label byte(s), then the R, G and B planes, each 32x32 row-major (the CIFAR page)."""
    out = bytearray()
    for i, image in enumerate(images):
        out += bytes(int(column[i]) for column in label_columns)
        for channel in range(3):
            out += image[:, :, channel].tobytes()
    return bytes(out)


def _write_cifar10(folder, rng, per_batch=8, n_test=12):
    os.makedirs(folder, exist_ok=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, per_batch)
        (folder / f"data_batch_{i}.bin").write_bytes(_cifar_bytes(x, y))
        train_x.append(x)
        train_y.append(y)
    x_test, y_test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n_test)
    (folder / "test_batch.bin").write_bytes(_cifar_bytes(x_test, y_test))
    (folder / "batches.meta.txt").write_text("\n".join(f"name{i}" for i in range(10)) + "\n\n")
    return np.concatenate(train_x), np.concatenate(train_y), x_test, y_test


def _fingerprints(images, labels):
    return sorted(zip(np.asarray(labels).tolist(), (row.tobytes() for row in np.asarray(images))))


# -- STL-10 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["parent", "folder"])
def test_stl10_binary_folder_reads_as_torchvision_does(tmp_path, rng, given):
    folder = tmp_path / "stl10_binary"
    arrays = _write_stl10(folder, rng, n_train=50)
    data_dir = tmp_path if given == "parent" else folder
    splits = data.load_dataset("stl10", data_dir=str(data_dir), validation_fraction=0.2, seed=3)
    assert splits.num_examples == {"pretrain": 50 + 88, "train": 40, "validation": 10, "test": 20}
    assert splits.image_shape == (96, 96, 3) and splits.num_classes == 10
    assert splits.class_names == data.STL10_CLASSES and "stl10_binary" in splits.source
    np.testing.assert_array_equal(_torchvision_stl10_read(folder / "train_X.bin"), arrays["train"][0])
    # the test split: same images and labels (1..10 -> 0..9), in file order, arrays and tf.data alike
    x_test, y_test = splits.numpy("test")
    np.testing.assert_array_equal(x_test, arrays["test"][0])
    np.testing.assert_array_equal(y_test, arrays["test"][1])
    ds_x, ds_y = data.as_numpy(splits.test)
    np.testing.assert_array_equal(ds_x, x_test)
    np.testing.assert_array_equal(ds_y, y_test)
    # train + validation partition the training files; validation is stratified (1 per class)
    parts = [splits.numpy(s) for s in ("train", "validation")]
    assert _fingerprints(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])) == \
        _fingerprints(*arrays["train"])
    np.testing.assert_array_equal(np.bincount(parts[1][1], minlength=10), np.ones(10))
    for split, (x, y) in zip(("train", "validation"), parts):
        ds_x, ds_y = data.as_numpy(getattr(splits, split))
        np.testing.assert_array_equal(ds_x, x)
        np.testing.assert_array_equal(ds_y, y)
    # pretraining: every train and unlabelled image exactly once, never a test image
    (pretrain,) = data.as_numpy(splits.pretrain)
    assert int(splits.pretrain.cardinality()) == 138 and pretrain.dtype == np.uint8
    expected = np.concatenate([arrays["train"][0], arrays["unlabeled"][0]])
    assert _fingerprints(pretrain, np.zeros(len(pretrain))) == _fingerprints(expected, np.zeros(len(expected)))


def test_stl10_pixels_keep_their_orientation(tmp_path):
    # A picture with a bright top row and a bright left column, written in the site's
    # column-major order: the reader must give it back upright, not transposed.
    image = np.zeros((1, 96, 96, 3), np.uint8)
    image[0, 0, :, 0] = 255  # top row, red
    image[0, :, 0, 1] = 200  # left column, green
    column_major = np.asfortranarray(image[0]).tobytes(order="F")  # MATLAB's (row, column, channel)
    assert column_major == _stl10_bytes(image)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split in ("train", "test", "unlabeled"):
        (folder / f"{split}_X.bin").write_bytes(column_major)
    for split in ("train", "test"):
        (folder / f"{split}_y.bin").write_bytes(bytes([1]))
    x, _ = data.load_dataset("stl10", data_dir=str(folder), validation_fraction=0.0).numpy("test")
    assert x[0, 0, :, 0].min() == 255 and x[0, 1:, 0, 0].max() == 0
    assert x[0, :, 0, 1].min() == 200 and x[0, 0, 1:, 1].max() == 0


def test_stl10_pretraining_stream_mixes_train_into_unlabelled_evenly(tmp_path, rng):
    arrays = _write_stl10(tmp_path / "stl10_binary", rng, n_train=30, n_unlabelled=90)
    splits = data.load_dataset("stl10", data_dir=str(tmp_path))
    (pretrain,) = data.as_numpy(splits.pretrain)
    train = {row.tobytes() for row in arrays["train"][0]}
    from_train = np.array([row.tobytes() in train for row in pretrain])
    # one train image in every 4 (30 of 120), in every quarter of the stream
    np.testing.assert_array_equal(from_train.reshape(4, 30).sum(1), [7, 8, 7, 8])
    assert from_train.sum() == 30


def test_library_writers_match_the_formats_byte_for_byte(tmp_path, rng):
    arrays = _write_stl10(tmp_path / "reference", rng)
    ours = data.write_stl10_binary(str(tmp_path / "ours"), arrays["train"], arrays["test"], arrays["unlabeled"][0])
    for name in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    x_train, y_train, x_test, y_test = _write_cifar10(tmp_path / "cifar_ref", rng)
    data.write_cifar_binary("cifar10", str(tmp_path / "cifar_ours"), (x_train, y_train), (x_test, y_test))
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        assert (tmp_path / "cifar_ours" / name).read_bytes() == (tmp_path / "cifar_ref" / name).read_bytes()
    assert data.load_dataset("stl10", data_dir=ours).num_examples["pretrain"] == 40 + 88


STREAMED = textwrap.dedent("""
    import json, resource, sys
    from keras_ncssl import data
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    splits = data.load_dataset("stl10", data_dir=sys.argv[1])
    first = [x.numpy().sum() for x in splits.pretrain.take(200)]
    x, y = splits.numpy("train")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"pretrain": splits.num_examples["pretrain"], "grew_mb": (peak - before) / 1024}))
""")


@pytest.mark.slow
def test_stl10_unlabelled_split_of_real_size_is_streamed_not_loaded(tmp_path, rng):
    # The real unlabelled file (100,000 images, 2.8 GB) as a sparse file: loading it and
    # reading the first pretraining batch must not bring it into memory.
    folder = tmp_path / "stl10_binary"
    _write_stl10(folder, rng, n_unlabelled=1)
    with open(folder / "unlabeled_X.bin", "r+b") as handle:
        handle.truncate(100_000 * 3 * 96 * 96)
    result = subprocess.run([sys.executable, "-c", STREAMED, str(tmp_path)], capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300, check=True)
    report = __import__("json").loads(result.stdout.strip().splitlines()[-1])
    assert report["pretrain"] == 100_040
    assert report["grew_mb"] < 700, report  # the file alone is 2,765 MB; TensorFlow's runtime start-up is counted


@pytest.mark.parametrize("damage,error,message", [
    ("missing", data.DatasetNotAvailableError, r"test_y\.bin is missing: expected STL-10 test_y\.bin: one uint8 label"),
    ("truncated", ValueError, r"train_X\.bin has 1105919 bytes, not a whole non-zero number of 27648-byte records"),
    ("label_11", ValueError, r"train_y\.bin: label 11 at record 3 is outside 1\.\.10"),
    ("label_0", ValueError, r"test_y\.bin: label 0 at record 0 is outside 1\.\.10"),
    ("fewer_labels", ValueError, r"train_y\.bin holds 39 labels but .*train_X\.bin holds 40 images"),
])
def test_stl10_bad_layout_is_one_line_naming_the_file(tmp_path, rng, damage, error, message):
    folder = tmp_path / "stl10_binary"
    _write_stl10(folder, rng)
    if damage == "missing":
        os.remove(folder / "test_y.bin")
    elif damage == "truncated":
        os.truncate(folder / "train_X.bin", 40 * 27648 - 1)
    elif damage == "label_11":
        raw = bytearray((folder / "train_y.bin").read_bytes())
        raw[3] = 11
        (folder / "train_y.bin").write_bytes(bytes(raw))
    elif damage == "label_0":
        (folder / "test_y.bin").write_bytes(bytes(20))
    else:
        os.truncate(folder / "train_y.bin", 39)
    with pytest.raises(error, match=message) as info:
        data.load_dataset("stl10", data_dir=str(tmp_path))
    assert "\n" not in str(info.value)


# -- CIFAR ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["parent", "folder"])
def test_cifar10_binary_folder(tmp_path, rng, given):
    folder = tmp_path / "cifar-10-batches-bin"
    x_train, y_train, x_test, y_test = _write_cifar10(folder, rng)
    splits = data.load_dataset("cifar10", data_dir=str(tmp_path if given == "parent" else folder),
                               validation_fraction=0.25)
    assert splits.num_examples["pretrain"] == 40 and splits.num_examples["test"] == 12
    assert splits.class_names == tuple(f"name{i}" for i in range(10)) and splits.num_classes == 10
    np.testing.assert_allclose(splits.mean, data.TFDS_DATASETS["cifar10"].mean)  # the dataset's, not the sample's
    got_x, got_y = splits.numpy("test")
    np.testing.assert_array_equal(got_x, x_test)
    np.testing.assert_array_equal(got_y, y_test)
    parts = [splits.numpy(s) for s in ("train", "validation")]
    assert _fingerprints(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])) == \
        _fingerprints(x_train, y_train)
    (pretrain,) = data.as_numpy(splits.pretrain)
    np.testing.assert_array_equal(pretrain, x_train)  # batch files in order, test never included


def test_cifar100_binary_folder_uses_the_fine_label(tmp_path, rng):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    x, fine, coarse = (rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, 30),
                       rng.integers(0, 20, 30))
    (folder / "train.bin").write_bytes(_cifar_bytes(x[:20], coarse[:20], fine[:20]))
    (folder / "test.bin").write_bytes(_cifar_bytes(x[20:], coarse[20:], fine[20:]))
    splits = data.load_dataset("cifar100", data_dir=str(tmp_path))
    assert splits.num_classes == 100 and splits.class_names is None  # no fine_label_names.txt
    got_x, got_y = splits.numpy("test")
    np.testing.assert_array_equal(got_x, x[20:])
    np.testing.assert_array_equal(got_y, fine[20:])
    assert splits.num_examples["pretrain"] == 20


@pytest.mark.parametrize("name,damage,message", [
    ("cifar10", "label", r"data_batch_3\.bin: label 10 at record 2 is outside 0\.\.9"),
    ("cifar10", "truncated", r"test_batch\.bin has 36875 bytes, not a whole non-zero number of 3073-byte records"),
    ("cifar10", "missing", r"data_batch_5\.bin is missing: expected cifar10 binary records of 1 label byte"),
    ("cifar100", "coarse", r"train\.bin: coarse label 20 at record 0 is outside 0\.\.19"),
    ("cifar100", "fine", r"test\.bin: fine label 100 at record 1 is outside 0\.\.99"),
])
def test_cifar_bad_layout_is_one_line_naming_the_file(tmp_path, rng, name, damage, message):
    if name == "cifar10":
        folder = tmp_path / "cifar-10-batches-bin"
        _write_cifar10(folder, rng)
        if damage == "label":
            raw = bytearray((folder / "data_batch_3.bin").read_bytes())
            raw[2 * 3073] = 10
            (folder / "data_batch_3.bin").write_bytes(bytes(raw))
        elif damage == "truncated":
            os.truncate(folder / "test_batch.bin", 12 * 3073 - 1)
        else:
            os.remove(folder / "data_batch_5.bin")
    else:
        folder = tmp_path / "cifar-100-binary"
        folder.mkdir()
        x = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        coarse, fine = np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8])
        bad_coarse, bad_fine = np.array([20, 2, 3, 4]), np.array([5, 100, 7, 8])
        (folder / "train.bin").write_bytes(_cifar_bytes(x, bad_coarse if damage == "coarse" else coarse, fine))
        (folder / "test.bin").write_bytes(_cifar_bytes(x, coarse, bad_fine if damage == "fine" else fine))
    with pytest.raises((ValueError, data.DatasetNotAvailableError), match=message) as info:
        data.load_dataset(name, data_dir=str(folder))
    assert "\n" not in str(info.value)


def test_cifar_python_pickle_version_is_refused_by_name(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x04not read")
    with pytest.raises(ValueError, match=r"python-pickle version of cifar10.*never unpickles.*"
                                         r"cifar-10-binary\.tar\.gz.*cifar-10-batches-bin/") as info:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert "\n" not in str(info.value)


def test_missing_dataset_message_names_the_extracted_folder_and_finds_archives_in_data_dir(tmp_path):
    with pytest.raises(data.DatasetNotAvailableError, match=r"extracted stl10_binary/ folder \(or its parent\)"):
        data.load_dataset("stl10", data_dir=str(tmp_path))
    # The original archive straight in data_dir is found there (and checked: this one is not real).
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not the real archive")
    with pytest.raises(ValueError, match="sha256"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


def test_stl10_labelled_tf_data_splits_stream_from_the_files(tmp_path, rng):
    # The tf.data splits read the files (no in-memory copy): a record rewritten on disk after
    # loading shows up in the stream.
    folder = tmp_path / "stl10_binary"
    arrays = _write_stl10(folder, rng)
    splits = data.load_dataset("stl10", data_dir=str(folder))
    replacement = np.full((1, 96, 96, 3), 7, np.uint8)
    with open(folder / "test_X.bin", "r+b") as handle:
        handle.write(_stl10_bytes(replacement))
    first_x, first_y = next(iter(splits.test))
    np.testing.assert_array_equal(first_x.numpy(), replacement[0])
    assert int(first_y) == arrays["test"][1][0]
    assert isinstance(splits.pretrain.element_spec, tf.TensorSpec)
