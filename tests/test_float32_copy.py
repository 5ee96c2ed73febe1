"""Mixed-precision training, float32 evaluation and export: encoders.float32_copy."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import encoders, export


@pytest.fixture
def bf16_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    yield
    keras.config.set_dtype_policy("float32")


def _images(n=6, size=16, channels=1, seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, size=(n, size, size, channels)).astype(np.float32)


def test_float32_copy_of_a_bfloat16_encoder_is_the_float32_function_of_its_weights(bf16_policy):
    mixed = encoders.get_encoder("small", (16, 16, 1), width_multiplier=0.25)
    assert not encoders.computes_in_float32(mixed)
    keras.config.set_dtype_policy("float32")
    reference = encoders.get_encoder("small", (16, 16, 1), width_multiplier=0.25)
    reference.set_weights(mixed.get_weights())  # the same weights, built in float32 from the start

    copy = encoders.float32_copy(mixed)
    x = _images()
    assert encoders.computes_in_float32(copy) and copy is not mixed
    np.testing.assert_array_equal(copy(x, training=False).numpy(), reference(x, training=False).numpy())
    # The bf16 forward pass really is different (else this test could not fail).
    gap = np.abs(mixed(x, training=False).numpy().astype(np.float32) - reference(x, training=False).numpy()).max()
    assert gap > 1e-4
    assert encoders.float32_copy(reference) is reference  # nothing to do


def test_export_of_a_bfloat16_encoder_serves_float32_features(tmp_path, bf16_policy):
    mixed = encoders.get_encoder("small", (16, 16, 1), width_multiplier=0.25)
    keras.config.set_dtype_policy("float32")
    expected = encoders.float32_copy(mixed)(_images(), training=False).numpy()
    path = export.export_encoder(mixed, str(tmp_path / "encoder"), input_shape=(16, 16, 1), mean=0.0, std=1.0,
                                 keras_model=True)
    served = tf.saved_model.load(path).signatures["serve_normalized"](tf.constant(_images()))
    np.testing.assert_allclose(next(iter(served.values())).numpy(), expected, rtol=1e-5, atol=1e-6)
    plain = keras.models.load_model(f"{path}/{export.KERAS_FILE}")
    assert encoders.computes_in_float32(plain)
    np.testing.assert_allclose(plain(_images(), training=False).numpy(), expected, rtol=1e-5, atol=1e-6)
