"""PatchGradientConv2D: Conv2D whose kernel gradient is one product over patches."""
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import encoders
from keras_ncssl.convolution import PatchGradientConv2D, patch_matrix


def reference(x, kernel, strides, upstream):
    """float64 numpy: y = conv(x, kernel) ("valid"), and the gradients of sum(y * upstream)."""
    (sh, sw), (kh, kw, _, _) = strides, kernel.shape
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    dx, dkernel = np.zeros_like(x), np.zeros_like(kernel)
    for i in range(kh):
        for j in range(kw):
            window = (slice(None), slice(i, i + sh * (out_h - 1) + 1, sh), slice(j, j + sw * (out_w - 1) + 1, sw))
            y += np.einsum("bpqc,cf->bpqf", x[window], kernel[i, j])
            dkernel[i, j] = np.einsum("bpqc,bpqf->cf", x[window], upstream)
            dx[window] += np.einsum("bpqf,cf->bpqc", upstream, kernel[i, j])
    return y, dx, dkernel


def forward_and_gradients(layer, x, upstream):
    x = tf.constant(x, layer.compute_dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float64 if layer.compute_dtype == "float64" else tf.float32) * upstream)
    dx, dkernel = tape.gradient(loss, [x, layer.kernel])
    return [np.asarray(tf.cast(t, tf.float64)) for t in (y, dx, dkernel)]


@pytest.mark.parametrize("size,kernel,strides", [((9, 9), 3, (2, 2)), ((7, 10), (3, 2), (1, 1)),
                                                 ((6, 6), 1, (2, 2)), ((5, 8), 3, (2, 1)), ((4, 4), 3, (2, 2))])
def test_forward_and_gradients_match_float64_numpy(size, kernel, strides):
    rng = np.random.default_rng(sum(size) + sum(strides))
    layer = PatchGradientConv2D(5, kernel, strides=strides, padding="valid", use_bias=False, dtype="float64")
    x = rng.normal(size=(3, *size, 4))
    layer.build(x.shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape))
    upstream = rng.normal(size=layer(x).shape)
    y_ref, dx_ref, dkernel_ref = reference(x, layer.kernel.numpy(), strides, upstream)
    for got, want in zip(forward_and_gradients(layer, x, upstream), (y_ref, dx_ref, dkernel_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_bfloat16_kernel_gradient_close_to_float64():
    rng = np.random.default_rng(3)
    layer = PatchGradientConv2D(32, 3, strides=2, padding="valid", use_bias=False, dtype="mixed_bfloat16")
    x = rng.normal(size=(16, 6, 6, 16))
    layer.build(x.shape)
    upstream = rng.normal(size=(16, 2, 2, 32))
    _, _, dkernel_ref = reference(x, layer.kernel.numpy().astype(np.float64), (2, 2), upstream)
    _, _, dkernel = forward_and_gradients(layer, x, upstream)
    assert layer.kernel.dtype == "float32"
    assert np.abs(dkernel - dkernel_ref).max() <= 0.02 * np.abs(dkernel_ref).max()


@pytest.mark.parametrize("size,kernel,strides", [((9, 9), (3, 3), (2, 2)), ((7, 10), (3, 2), (1, 1)),
                                                 ((6, 6), (1, 1), (2, 2)), ((5, 8), (3, 3), (2, 1)),
                                                 ((11, 7), (5, 2), (3, 2))])
def test_patch_matrix_matches_numpy_windows(size, kernel, strides):
    """Row (b, p, q) = x[b, p*sh : p*sh + kh, q*sw : q*sw + kw, :] flattened, both paths
    (one gather where H and W are known, extract_patches where they are not)."""
    rng = np.random.default_rng(sum(size) * 7 + sum(kernel))
    (kh, kw), (sh, sw) = kernel, strides
    x = rng.normal(size=(3, *size, 4))
    out_h, out_w = (size[0] - kh) // sh + 1, (size[1] - kw) // sw + 1
    want = np.stack([x[b, p * sh:p * sh + kh, q * sw:q * sw + kw, :].ravel()
                     for b in range(3) for p in range(out_h) for q in range(out_w)])
    np.testing.assert_array_equal(patch_matrix(tf.constant(x), kernel, strides).numpy(), want)
    unknown = tf.function(lambda t: patch_matrix(t, kernel, strides),
                          input_signature=[tf.TensorSpec([None, None, None, None], tf.float64)])
    np.testing.assert_array_equal(unknown(tf.constant(x)).numpy(), want)


def gradient_op_types(layer, shape):
    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, layer.kernel)
    x = tf.zeros(shape)
    layer.build(shape)
    return {op.type for op in gradient.get_concrete_function(x).graph.get_operations()}


def test_valid_padding_uses_the_patch_product_and_same_padding_the_parent():
    ops = gradient_op_types(PatchGradientConv2D(8, 3, strides=2, padding="valid"), (2, 6, 6, 4))
    assert "GatherV2" in ops and "Conv2DBackpropFilter" not in ops
    assert "ExtractImagePatches" not in ops  # 3-5x slower on these maps than the gather
    ops = gradient_op_types(PatchGradientConv2D(8, 3, strides=1, padding="same"), (2, 6, 6, 4))
    assert "GatherV2" not in ops and "Conv2DBackpropFilter" in ops


def test_same_padding_and_bias_match_conv2d():
    rng = np.random.default_rng(4)
    options = dict(filters=6, kernel_size=3, padding="same", use_bias=True)
    patch, plain = PatchGradientConv2D(**options), keras.layers.Conv2D(**options)
    x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    patch.build(x.shape)
    plain.build(x.shape)
    plain.set_weights([w + rng.normal(size=w.shape).astype(np.float32) for w in patch.get_weights()])
    patch.set_weights(plain.get_weights())
    np.testing.assert_allclose(patch(x), plain(x), rtol=1e-6, atol=1e-6)


def test_small_cnn_uses_it_where_the_map_is_small():
    def conv_classes(input_shape=(28, 28, 1), **options):
        model = encoders.small_cnn(input_shape, **options)
        return [type(layer).__name__ for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    # Output maps 14x14, 7x7, 4x4, 2x2 (196, 49, 16, 4 positions).
    assert conv_classes(patch_gradient_positions=16) == ["Conv2D", "Conv2D", "PatchGradientConv2D",
                                                         "PatchGradientConv2D"]
    assert conv_classes(patch_gradient_positions=49) == ["Conv2D"] + ["PatchGradientConv2D"] * 3
    # The runner's CPU setting (experiments/builders.py): every stage after the stem, at 28 px
    # as above and at 32 px (16x16, 8x8, 4x4, 2x2 maps).
    assert conv_classes(patch_gradient_positions=64) == ["Conv2D"] + ["PatchGradientConv2D"] * 3
    assert conv_classes((32, 32, 3), patch_gradient_positions=64) == ["Conv2D"] + ["PatchGradientConv2D"] * 3
    assert conv_classes() == ["Conv2D"] * 4
    # Unknown map sizes (multi-crop) and stride-1 "same" convolutions keep Conv2D.
    assert set(conv_classes(patch_gradient_positions=10**6, convs_per_stage=2)) == {"Conv2D", "PatchGradientConv2D"}
    model = encoders.small_cnn((None, None, 1), patch_gradient_positions=10**6)
    assert not any(isinstance(layer, PatchGradientConv2D) for layer in model.layers)
    with pytest.raises(ValueError, match="patch_gradient_positions=-1"):
        encoders.small_cnn((28, 28, 1), patch_gradient_positions=-1)


@pytest.mark.slow
def test_config_is_conv2d_and_reloads_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(5)
    inputs = keras.Input((8, 8, 3))
    outputs = PatchGradientConv2D(4, 3, strides=2, padding="valid", name="conv")(inputs)
    model = keras.Model(inputs, outputs)
    layer = model.get_layer("conv")
    assert layer.get_config() == keras.layers.Conv2D.from_config(layer.get_config()).get_config()
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model(x).numpy())
    model.save(tmp_path / "conv.keras")
    code = textwrap.dedent(f"""
        import numpy as np, keras, keras_ncssl
        model = keras.saving.load_model({str(tmp_path / "conv.keras")!r})
        assert type(model.get_layer("conv")).__name__ == "PatchGradientConv2D"
        np.testing.assert_allclose(model(np.load({str(tmp_path / "x.npy")!r})),
                                   np.load({str(tmp_path / "y.npy")!r}), rtol=1e-6)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
