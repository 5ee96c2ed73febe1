"""Tests of keras_ncssl.export in this process: the raw-image signatures against the evaluation
preprocessing, input checks, the plain-Keras file, metadata, atomic replacement, bad arguments.
(Fresh processes, saved_model_cli and TFLite: test_export_clients.py; the runner:
test_export_runner.py.)"""
import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from export_helpers import bn_encoder, relative_error
from keras_ncssl import augment, export
from keras_ncssl.convolution import PatchGradientConv2D
from keras_ncssl.normalization import FusedBatchNormalization

SIZE = 12
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


class _ToyBYOL(keras.Model):
    """Stands in for BYOL/SimSiam: the online encoder is `.encoder`, plus other parts."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.projector = keras.layers.Dense(3)

    def call(self, images, training=False):
        return self.projector(self.encoder(images, training=training))


def _raw(rng, shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _evaluation_features(encoder, raw, channels, geometry, mean=MEAN, std=STD):
    """Independent reference: augment.eval_dataset (the evaluation's own pipeline) on the raw
    images, then the encoder in inference mode."""
    if geometry == "center_crop":  # variable-size data takes eval_dataset's ImageNet path
        spec = tf.TensorSpec([None, None, raw.shape[-1]], tf.uint8)
        ds = tf.data.Dataset.from_generator(lambda: iter(raw), output_signature=spec)
    else:
        ds = tf.data.Dataset.from_tensor_slices(raw)
    x = np.concatenate([b.numpy() for b in augment.eval_dataset(
        ds, batch_size=4, image_size=SIZE, channels=channels, mean=mean, std=std,
        resize_method="resize" if geometry == "center_crop" else geometry)])
    return encoder(x, training=False).numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """exports[channels, geometry] -> (encoder, LoadedEncoder), made on first use and shared."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("exports")

    class Cache(dict):
        def __missing__(self, key):
            channels, geometry = key
            encoder = bn_encoder(rng, (SIZE, SIZE, channels))
            path = export.export_encoder(encoder, root / f"{channels}{geometry}",
                                         mean=MEAN[:channels], std=STD[:channels],
                                         preprocessing=geometry)
            self[key] = (encoder, export.load_encoder(path))
            return self[key]

    return Cache()


@pytest.mark.parametrize("channels,geometry", [
    (3, "resize"), (1, "resize"), pytest.param(3, "pad", marks=pytest.mark.slow),
    pytest.param(1, "center_crop", marks=pytest.mark.slow)])
def test_raw_images_of_any_size_give_the_evaluation_features(exports, rng, channels, geometry):
    encoder, loaded = exports[channels, geometry]
    mean, std = MEAN[:channels], STD[:channels]
    for shape in ((3, 20, 20, 1), (3, 9, 13, 3), (3, SIZE, SIZE, 1), (2, 2, 2, 3),
                  (2, 31, 17, 1)):
        raw = _raw(rng, shape)
        expected = _evaluation_features(encoder, raw, channels, geometry, mean, std)
        got = loaded.embed_raw(raw).numpy()  # serve: uint8
        assert relative_error(got, expected) <= 1e-5, (shape, relative_error(got, expected))
        as_float = loaded.embed_raw(raw.astype(np.float32)).numpy()  # serve_float: 0..255
        assert relative_error(as_float, expected) <= 1e-5, shape
    # Not vacuous: another geometry, or no normalisation, gives other features.
    raw = _raw(rng, (3, 20, 16, 3))
    other = "pad" if geometry != "pad" else "resize"
    assert relative_error(loaded.embed_raw(raw), _evaluation_features(
        encoder, raw, channels, other, mean, std)) > 1e-3
    assert relative_error(loaded.embed_raw(raw), _evaluation_features(
        encoder, raw, channels, geometry, (0.0,), (1.0,))) > 1e-3
    if geometry == "center_crop":
        steps = loaded.metadata["preprocessing"]["steps"]
        assert steps[0].startswith("on the 0..255 pixels") and "mean" in steps[-1]


def test_normalized_signature_is_the_encoder_in_inference_mode(exports, rng):
    encoder, loaded = exports[3, "resize"]
    x = rng.normal(size=(5, SIZE, SIZE, 3)).astype(np.float32)
    got = loaded(x).numpy()
    np.testing.assert_allclose(got, encoder(x, training=False), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, encoder(x, training=True), atol=1e-3)
    assert loaded.input_shape == (None, SIZE, SIZE, 3) and loaded.embedding_dim == 16
    with pytest.raises(ValueError, match="embed_raw"):
        loaded(_raw(rng, (1, SIZE, SIZE, 3)))


def test_input_checks_and_empty_batches(exports, rng):
    """Issue 24: wrong inputs fail with an InvalidArgumentError that says what is expected;
    an empty batch gives an empty result. (Rank-3 input: test_export_clients.py, in a
    subprocess, because it aborted the process before.)"""
    _, loaded = exports[1, "resize"]
    serve, floats, normalized = (loaded.signatures[n] for n in (
        "serve", "serve_float", "serve_normalized"))
    for fn, images in ((serve, np.zeros((0, 7, 5, 3), np.uint8)),
                       (floats, np.zeros((0, 7, 5, 1), np.float32)),
                       (normalized, np.zeros((0, SIZE, SIZE, 1), np.float32))):
        assert fn(images=tf.constant(images))["embeddings"].shape == (0, 16)
    cases = [
        (serve, np.zeros((1, 8, 8, 2), np.uint8), r"1 or 3 channels; got shape.*1 8 8 2"),
        (serve, np.zeros((1, 0, 8, 1), np.uint8), r"height, width >= 1"),
        (floats, rng.normal(size=(1, 8, 8, 1)).astype(np.float32),
         r"raw pixel values in \[0, 255\].*serve_normalized"),
        (floats, np.full((1, 8, 8, 1), np.nan, np.float32), r"raw pixel values"),
        (serve, np.zeros((1, 8, 8, 1), np.float32), r"expected to be a uint8 tensor"),
    ]
    for size in (32, 10, 2):
        cases.append((normalized, np.zeros((2, size, size, 1), np.float32),
                      rf"\[2,{size},{size},1\] is not compatible with expected shape "
                      rf"\[\?,{SIZE},{SIZE},1\]"))
    for fn, images, message in cases:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            fn(images=tf.constant(images))


def test_metadata_records_the_contract(exports):
    _, loaded = exports[1, "resize"]
    meta = loaded.metadata
    pre = meta["preprocessing"]
    assert (pre["image_size"], pre["channels"], pre["geometry"]) == (SIZE, 1, "resize")
    assert pre["mean"] == [0.4] and pre["std"] == [0.2]
    assert pre["steps"][0].startswith("pixels / 255") and "luma" in pre["steps"][1]
    assert "antialiased" in pre["steps"][2] and "mean" in pre["steps"][-1]
    assert meta["signatures"]["serve"]["input"] == {"name": "images", "dtype": "uint8",
                                                    "shape": [None] * 4}
    assert meta["signatures"]["serve_normalized"]["input"]["shape"] == [None, SIZE, SIZE, 1]
    assert meta["embedding_dim"] == 16 and meta["keras_model"] == "encoder.keras"
    assert meta["keras_model_missing_because"] is None and meta["metadata"] == {}
    # RGB statistics for a 1-channel encoder: mapped by luma, as augment.normalization_stats.
    m, s = augment.normalization_stats(MEAN, STD, 1)
    contract = export.make_contract((SIZE, SIZE, 1), mean=MEAN, std=STD)
    np.testing.assert_allclose(contract.mean, m)
    np.testing.assert_allclose(contract.std, s)
    np.testing.assert_allclose(contract.mean, [0.299 * 0.4 + 0.587 * 0.5 + 0.114 * 0.6],
                               rtol=1e-6)


def test_plain_keras_copy_has_builtin_layers_and_identical_weights(rng, tmp_path):
    encoder = bn_encoder(rng, (SIZE, SIZE, 3))
    assert any(isinstance(layer, FusedBatchNormalization) for layer in encoder.layers)
    plain = export.to_plain_keras(encoder)
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in plain.layers)
    assert sum(type(layer) is keras.layers.BatchNormalization for layer in plain.layers) == 2
    assert [type(layer) for layer in encoder.layers if isinstance(layer, keras.layers.Conv2D)] == [
        keras.layers.Conv2D, PatchGradientConv2D]
    assert [type(layer) for layer in plain.layers if isinstance(layer, keras.layers.Conv2D)] == [
        keras.layers.Conv2D, keras.layers.Conv2D]
    for a, b in zip(encoder.weights, plain.weights):
        assert a.path.split("/")[-2:] == b.path.split("/")[-2:]
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(plain(x, training=False), encoder(x, training=False), atol=1e-6)
    # Training mode: Keras' unfused BN against the fused kernel, same batch statistics.
    np.testing.assert_allclose(plain(x, training=True), encoder(x, training=True), atol=1e-4)
    # The file check is not vacuous: the library's own encoder file is refused.
    encoder.save(tmp_path / "fused.keras")
    with pytest.raises(export.NotPlainKerasError, match="FusedBatchNormalization"):
        export.plain_keras.check_plain_keras_file(tmp_path / "fused.keras")
    plain.save(tmp_path / "plain.keras")
    export.plain_keras.check_plain_keras_file(tmp_path / "plain.keras")


class SubclassedEncoder(keras.Model):
    def __init__(self):
        super().__init__()
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.dense = keras.layers.Dense(4)

    def call(self, images, training=False):
        return self.dense(self.pool(images))


def test_encoders_without_a_plain_keras_form(rng, tmp_path):
    encoder = SubclassedEncoder()
    with pytest.raises(export.NotPlainKerasError, match="not a functional or sequential"):
        export.export_encoder(encoder, tmp_path / "a", input_shape=(SIZE, SIZE, 3),
                              keras_model=True)
    assert not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="no encoder.keras written"):
        path = export.export_encoder(encoder, tmp_path / "a", input_shape=(SIZE, SIZE, 3))
    loaded = export.load_encoder(path)
    assert loaded.metadata["keras_model"] is None
    assert "functional" in loaded.metadata["keras_model_missing_because"]
    assert not os.path.exists(os.path.join(path, export.KERAS_FILE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = export.export_encoder(encoder, tmp_path / "b", input_shape=(SIZE, SIZE, 3),
                                     keras_model=False)
    raw = _raw(rng, (2, 5, 5, 3))
    np.testing.assert_allclose(export.load_encoder(path).embed_raw(raw),
                               encoder(augment.convert_images(raw, SIZE, 3)), atol=1e-5)


def test_model_exports_its_online_encoder(rng, tmp_path):
    encoder = bn_encoder(rng, (SIZE, SIZE, 3), name="online")
    model = _ToyBYOL(encoder)
    x = rng.normal(size=(5, SIZE, SIZE, 3)).astype(np.float32)
    model(x)
    loaded = export.load_encoder(export.export_encoder(model, tmp_path / "enc"))
    got = loaded(x).numpy()
    assert got.shape == (5, 16)  # the encoder's features, not the projector's 3
    np.testing.assert_allclose(got, encoder(x, training=False), atol=1e-5, rtol=1e-5)
    assert loaded.metadata["encoder_name"] == "online"


def test_failed_export_leaves_previous_export_intact(rng, tmp_path, monkeypatch):
    x = rng.normal(size=(3, SIZE, SIZE, 1)).astype(np.float32)
    old_encoder, new_encoder = bn_encoder(rng, (SIZE, SIZE, 1)), bn_encoder(rng, (SIZE, SIZE, 1))
    path = export.export_encoder(old_encoder, tmp_path / "enc")
    old = export.load_encoder(path)(x).numpy()

    def half_written(archive, directory):
        with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
            f.write(b"truncated")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export.writer, "_save_archive", half_written)
    with pytest.raises(OSError, match="simulated"):
        export.export_encoder(new_encoder, path)
    np.testing.assert_array_equal(export.load_encoder(path)(x).numpy(), old)
    assert sorted(os.listdir(tmp_path)) == ["enc"]  # no staging directory left behind

    monkeypatch.undo()
    export.export_encoder(new_encoder, path)
    np.testing.assert_allclose(export.load_encoder(path)(x), new_encoder(x, training=False),
                               atol=1e-5, rtol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["enc"]


@pytest.mark.parametrize("stage", ["_verify", "_write_plain_keras"])
def test_failed_check_leaves_previous_export_intact(rng, tmp_path, monkeypatch, stage):
    x = rng.normal(size=(3, SIZE, SIZE, 1)).astype(np.float32)
    path = export.export_encoder(bn_encoder(rng, (SIZE, SIZE, 1)), tmp_path / "enc")
    old = export.load_encoder(path)(x).numpy()

    def disagree(*args):
        raise RuntimeError("export check failed (simulated)")

    monkeypatch.setattr(export.writer, stage, disagree)
    with pytest.raises(RuntimeError, match="simulated"):
        export.export_encoder(bn_encoder(rng, (SIZE, SIZE, 1)), path)
    np.testing.assert_array_equal(export.load_encoder(path)(x).numpy(), old)
    assert sorted(os.listdir(tmp_path)) == ["enc"]


def test_verification_catches_a_wrong_preprocessing(rng, tmp_path, monkeypatch):
    """The export-time check compares serve with eval_dataset: a drifted serving
    preprocessing is refused before anything is written."""
    original = export.serving.normalize
    monkeypatch.setattr(export.serving, "normalize", lambda x, m, s: original(x, m, s) * 1.01)
    with pytest.raises(RuntimeError, match="evaluation preprocessing"):
        export.export_encoder(bn_encoder(rng, (SIZE, SIZE, 3)), tmp_path / "enc", mean=MEAN,
                              std=STD)
    assert os.listdir(tmp_path) == []


def test_refuses_to_replace_something_that_is_not_an_export(rng, tmp_path):
    precious = tmp_path / "workdir"
    precious.mkdir()
    (precious / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="not a SavedModel directory"):
        export.export_encoder(bn_encoder(rng, (SIZE, SIZE, 1)), precious)
    assert (precious / "report.json").read_text() == "{}"


def test_bad_arguments_name_the_value_and_the_fix(rng, tmp_path):
    encoder = bn_encoder(rng, (SIZE, SIZE, 1))
    open_encoder = bn_encoder(rng, (None, None, 3))
    bad = [
        (encoder, dict(preprocessing="crop"), r"preprocessing='crop'; choose one of"),
        (encoder, dict(image_size=16), r"image_size=16 contradicts input_shape"),
        (encoder, dict(mean=(0.5,)), r"give both statistics or neither"),
        (encoder, dict(mean=(0.5, 0.5), std=(1.0, 1.0)), r"mean/std: .*1 or 3 values"),
        (encoder, dict(mean=(0.5,), std=(0.0,)), r"std=\[0.0\] must be positive"),
        (encoder, dict(metadata={"f": object()}), r"metadata is not JSON-serialisable"),
        (encoder, dict(metadata=[1]), r"metadata=\[1\] must be a dict"),
        (encoder, dict(keras_model="yes"), r"keras_model='yes'; choose True, False or None"),
        (encoder, dict(input_shape=(8, 8)), r"input_shape=\(8, 8\): expected"),
        (encoder, dict(input_shape=(8, 0, 1)), r"dimensions must be positive"),
        (encoder, dict(input_shape=(8, 9, 1)), r"square"),
        (encoder, dict(input_shape=(8, 8, 2)), r"1 or 3 input channels, not 2"),
        (open_encoder, {}, r"leaves the image size open; pass image_size=S"),
    ]
    for enc, kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            export.export_encoder(enc, tmp_path / "x", **kwargs)
    assert os.listdir(tmp_path) == []
    # An encoder that takes any size exports at the size it was trained at.
    path = export.export_encoder(open_encoder, tmp_path / "open", image_size=SIZE)
    assert export.load_encoder(path).input_shape == (None, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="cannot infer the input shape"):
        export.export_encoder(SubclassedEncoder(), tmp_path / "y")
