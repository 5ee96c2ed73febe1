"""Tests of keras_ncssl.export: a fresh process loads the encoder with TensorFlow alone,
inference-mode BatchNorm, atomic replacement, and refusal of unsafe paths."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import distribute, export

SHAPE = (8, 8, 2)


def _bn_encoder(rng, dim=6, name="encoder"):
    """Conv-BN-pool with non-trivial moving statistics, so training=True/False differ."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(dim, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    encoder = keras.Model(inputs, x, name=name)
    bn = encoder.layers[2]
    bn.moving_mean.assign(rng.normal(size=dim).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=dim).astype(np.float32))
    return encoder


class _ToyBYOL(keras.Model):
    """Stands in for BYOL/SimSiam: the online encoder is `.encoder`, plus other parts."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.projector = keras.layers.Dense(3)

    def call(self, images, training=False):
        return self.projector(self.encoder(images, training=training))


def _images(rng, n=5):
    return rng.normal(size=(n,) + SHAPE).astype(np.float32)


def _exported(path, images):
    return export.load_encoder(path)(images).numpy()


@pytest.mark.slow  # a second Python process importing TensorFlow: ~20 s on a busy 2-core box
def test_fresh_process_loads_with_tensorflow_only(rng, tmp_path):
    """One subprocess checks several exports: plain BN encoder, a model's `.encoder`, and an
    encoder built under MirroredStrategy (loaded without any strategy scope)."""
    images = _images(rng)
    np.save(tmp_path / "images.npy", images)
    encoders = {"bn": _bn_encoder(rng)}
    model = _ToyBYOL(_bn_encoder(rng, name="online"))
    model(images)
    encoders["model"] = model
    if len(tf.config.list_logical_devices("CPU")) >= 2:
        with distribute.get_strategy("cpu:2").scope():
            encoders["mirrored"] = _bn_encoder(rng, name="mirrored")
    expected = {}
    for name, obj in encoders.items():
        export.export_encoder(obj, tmp_path / name)
        encoder = obj.encoder if name == "model" else obj
        expected[name] = encoder(images, training=False).numpy()

    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        root = {str(tmp_path)!r}
        images = np.load(root + "/images.npy")
        for name in {sorted(encoders)!r}:
            serve = tf.saved_model.load(root + "/" + name).signatures["serve"]
            out = serve(images=tf.constant(images))
            assert set(out) == {{"embeddings"}}, set(out)
            np.save(root + "/" + name + ".out.npy", out["embeddings"].numpy())
        assert "keras_ncssl" not in sys.modules
        print("modules-ok")
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "modules-ok" in done.stdout
    for name in encoders:
        got = np.load(tmp_path / f"{name}.out.npy")
        np.testing.assert_allclose(got, expected[name], atol=1e-5, rtol=0)


def test_export_uses_inference_mode_batchnorm(rng, tmp_path):
    encoder = _bn_encoder(rng)
    images = _images(rng)
    path = export.export_encoder(encoder, tmp_path / "enc")
    got = _exported(path, images)
    np.testing.assert_allclose(got, encoder(images, training=False), atol=1e-5, rtol=0)
    assert not np.allclose(got, encoder(images, training=True), atol=1e-3)
    loaded = export.load_encoder(path)
    assert loaded.input_shape == (None,) + SHAPE and loaded.embedding_dim == 6
    with open(os.path.join(path, export.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["embedding_dim"] == 6 and meta["input_shape"] == [None, *SHAPE]
    signature = tf.saved_model.load(path).signatures
    assert {"serve", "serving_default"} <= set(signature)


def test_model_exports_its_online_encoder(rng, tmp_path):
    images = _images(rng)
    model = _ToyBYOL(_bn_encoder(rng, name="online"))
    model(images)
    path = export.export_encoder(model, tmp_path / "enc")
    got = _exported(path, images)
    assert got.shape == (5, 6)  # the encoder's features, not the projector's 3
    np.testing.assert_allclose(got, model.encoder(images, training=False), atol=1e-5, rtol=0)


def test_failed_export_leaves_previous_export_intact(rng, tmp_path, monkeypatch):
    images = _images(rng)
    old_encoder, new_encoder = _bn_encoder(rng), _bn_encoder(rng)
    path = export.export_encoder(old_encoder, tmp_path / "enc")
    old = _exported(path, images)

    def half_written(archive, directory):
        with open(os.path.join(directory, "saved_model.pb"), "wb") as f:
            f.write(b"truncated")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export, "_save_archive", half_written)
    with pytest.raises(OSError, match="simulated"):
        export.export_encoder(new_encoder, path)
    np.testing.assert_array_equal(_exported(path, images), old)
    assert sorted(os.listdir(tmp_path)) == ["enc"]  # no staging directory left behind

    monkeypatch.undo()
    export.export_encoder(new_encoder, path)
    np.testing.assert_allclose(_exported(path, images), new_encoder(images, training=False),
                               atol=1e-5, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["enc"]


def test_failed_verification_leaves_previous_export_intact(rng, tmp_path, monkeypatch):
    images = _images(rng)
    path = export.export_encoder(_bn_encoder(rng), tmp_path / "enc")
    old = _exported(path, images)

    def disagree(directory, encoder, shape):
        raise RuntimeError("export check failed (simulated)")

    monkeypatch.setattr(export, "_verify", disagree)
    with pytest.raises(RuntimeError, match="simulated"):
        export.export_encoder(_bn_encoder(rng), path)
    np.testing.assert_array_equal(_exported(path, images), old)
    assert sorted(os.listdir(tmp_path)) == ["enc"]


def test_refuses_to_replace_something_that_is_not_an_export(rng, tmp_path):
    precious = tmp_path / "workdir"
    precious.mkdir()
    (precious / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="not a SavedModel directory"):
        export.export_encoder(_bn_encoder(rng), precious)
    assert (precious / "report.json").read_text() == "{}"


def test_input_shape_handling(rng, tmp_path):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.dense = keras.layers.Dense(4)

        def call(self, images, training=False):
            return self.dense(self.pool(images))

    encoder = Subclassed()
    with pytest.raises(ValueError, match="input_shape"):
        export.export_encoder(encoder, tmp_path / "a")
    # Unbuilt but with a full shape: built by the export itself.
    path = export.export_encoder(encoder, tmp_path / "a", input_shape=SHAPE)
    images = _images(rng)
    np.testing.assert_allclose(_exported(path, images), encoder(images), atol=1e-5, rtol=0)
    # Open spatial dimensions: any image size is served.
    path = export.export_encoder(encoder, tmp_path / "b", input_shape=(None, None, None, 2))
    big = rng.normal(size=(2, 12, 10, 2)).astype(np.float32)
    np.testing.assert_allclose(_exported(path, big), encoder(big), atol=1e-5, rtol=0)
    for bad in ((8, 8), (8, 0, 2), (None, 8, 8, 2, 1)):
        with pytest.raises(ValueError, match="input_shape"):
            export.export_encoder(encoder, tmp_path / "c", input_shape=bad)
