"""FusedBatchNormalization: the same layer as keras' BatchNormalization, on the fused kernel."""
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl.normalization import FusedBatchNormalization


def pair(channels, **kwargs):
    plain, fused = keras.layers.BatchNormalization(**kwargs), FusedBatchNormalization(**kwargs)
    for layer in (plain, fused):
        layer.build((None, 5, 6, channels))
    rng = np.random.default_rng(7)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        value = rng.uniform(0.5, 1.5, size=channels).astype(np.float32)
        for layer in (plain, fused):
            if getattr(layer, name, None) is not None:
                getattr(layer, name).assign(value)
    return plain, fused


@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
def test_training_step_matches_keras_and_a_float64_reference(rng, center, scale):
    x = (rng.normal(size=(8, 5, 6, 3)) * 3 + 2).astype(np.float32)
    plain, fused = pair(3, momentum=0.9, epsilon=1e-5, center=center, scale=scale)
    gamma0 = fused.gamma.numpy() if scale else np.ones(3)
    beta0 = fused.beta.numpy() if center else np.zeros(3)
    mm0, mv0 = fused.moving_mean.numpy().copy(), fused.moving_variance.numpy().copy()
    upstream = rng.normal(size=x.shape).astype(np.float32)
    outputs, grads = [], []
    for layer in (plain, fused):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * upstream)
        grads.append(tape.gradient(loss, [xt] + layer.trainable_variables))
        outputs.append(y.numpy())
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))  # biased, as Keras
    reference = gamma0 * (x64 - mean) / np.sqrt(var + 1e-5) + beta0
    np.testing.assert_allclose(outputs[1], reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    for g_plain, g_fused in zip(*grads):
        np.testing.assert_allclose(g_fused.numpy(), g_plain.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean.numpy(), 0.9 * mm0 + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), 0.9 * mv0 + 0.1 * var, rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-5)


def test_inference_and_unfusable_inputs_take_the_parent_path(rng):
    plain, fused = pair(3)
    x = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), rtol=1e-6)
    flat_plain, flat_fused = keras.layers.BatchNormalization(), FusedBatchNormalization()
    v = rng.normal(size=(16, 3)).astype(np.float32)
    np.testing.assert_allclose(flat_fused(v, training=True), flat_plain(v, training=True), rtol=1e-5)
    assert fused._can_fuse(tf.constant(x), True, None)
    assert not fused._can_fuse(tf.constant(x), False, None)
    assert not FusedBatchNormalization(synchronized=True)._can_fuse(tf.constant(x), True, None)


def test_bfloat16_activations_keep_float32_statistics(rng):
    layer = FusedBatchNormalization(momentum=0.9, dtype="mixed_bfloat16")
    x = (rng.normal(size=(8, 4, 4, 5)) * 2 + 1).astype(np.float32)
    y = layer(tf.cast(x, tf.bfloat16), training=True)
    assert y.dtype == tf.bfloat16
    assert layer.moving_mean.dtype == "float32"
    expected = 0.1 * x.astype(np.float64).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected, rtol=2e-2, atol=2e-3)


@pytest.mark.slow
def test_config_round_trip_and_reload_in_a_fresh_process(tmp_path, rng):
    inputs = keras.Input((5, 6, 3))
    outputs = FusedBatchNormalization(momentum=0.8, epsilon=1e-5, name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
    model(x, training=True)  # move the statistics away from their initial values
    clone = FusedBatchNormalization.from_config(model.get_layer("bn").get_config())
    assert clone.get_config() == model.get_layer("bn").get_config()
    path = tmp_path / "bn.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x, training=False).numpy())
    code = textwrap.dedent(f"""
        import numpy as np, keras, keras_ncssl
        model = keras.saving.load_model({str(path)!r})
        layer = model.get_layer("bn")
        assert type(layer).__name__ == "FusedBatchNormalization", type(layer)
        x = np.load({str(tmp_path / "x.npy")!r})
        np.testing.assert_allclose(model(x, training=False), np.load({str(tmp_path / "y.npy")!r}),
                                   rtol=1e-6)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
