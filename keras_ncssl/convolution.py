"""Conv2D whose kernel gradient is one matrix product over the input's patches.

For y = conv(x, W) with stride s and "valid" padding, the kernel gradient is

    dL/dW[i, j, c, f] = sum_{b, p, q} x[b, p*s + i, q*s + j, c] * dL/dy[b, p, q, f],

i.e. dL/dW = P^T G with P the (B*H_out*W_out) x (k_h*k_w*C) matrix of input patches (ordered
row, column, channel like the kernel's reshape) and G the (B*H_out*W_out) x F output gradient.
On small feature maps the CPU's convolution kernel for this gradient (oneDNN's backward-weights)
is slow: on the quick run's last two stages (4x4 and 2x2 outputs, batch 64, bfloat16) it took
half of the train step's kernel time, and the product above made the step 16-22 % faster
(BUILD_NOTES, "The kernel gradient as one product").

P is one gather of whole channel vectors at precomputed positions of the [B, H*W, C] input
(`patch_matrix`): 3-5x cheaper than `tf.image.extract_patches` on these maps, which made the patch
gradient pay on the 7x7 stage too (BUILD_NOTES, "Patches by one gather"). On large maps the
patch matrix still costs more than it saves, so the encoders use this layer only where the output
has few positions (`small_cnn(patch_gradient_positions=...)`).

The forward pass and the input gradient are TensorFlow's own convolution ops; the layer has
Conv2D's config and weights, so a model holding it is written with plain Conv2D layers for export
(`export.plain_keras`) and the values agree with Conv2D's up to the order of summation.
"""
import keras
import numpy as np
import tensorflow as tf

__all__ = ["PatchGradientConv2D", "conv2d_with_patch_gradient", "patch_matrix"]


def _window_positions(height, width, kernel_size, strides):
    """Flat positions (row * width + column) of every output position's window, in the order
    (output row, output column, kernel row, kernel column)."""
    (kh, kw), (sh, sw) = kernel_size, strides
    rows = np.arange((height - kh) // sh + 1)[:, None, None, None] * sh + np.arange(kh)[None, None, :, None]
    cols = np.arange((width - kw) // sw + 1)[None, :, None, None] * sw + np.arange(kw)[None, None, None, :]
    return (rows * width + cols).reshape(-1).astype(np.int32)


def patch_matrix(x, kernel_size, strides):
    """P: the [B*H_out*W_out, k_h*k_w*C] patches of ``x`` [B, H, W, C] ("valid" windows).

    Row (b, p, q) is x[b, p*s_h : p*s_h + k_h, q*s_w : q*s_w + k_w, :] flattened row, column,
    channel, as `tf.image.extract_patches` orders it. With a known H and W it is one gather of
    channel vectors along the flattened spatial axis (contiguous copies); otherwise
    `extract_patches` itself.
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    if height is None or width is None or channels is None:
        patches = tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                           rates=[1, 1, 1, 1], padding="VALID")
        return tf.reshape(patches, [-1, kh * kw * tf.shape(x)[3]])
    positions = _window_positions(height, width, (kh, kw), (sh, sw))
    windows = tf.gather(tf.reshape(x, [-1, height * width, channels]), positions, axis=1)
    return tf.reshape(windows, [-1, kh * kw * channels])


def conv2d_with_patch_gradient(x, kernel, strides):
    """``tf.nn.conv2d(x, kernel, strides, "VALID")`` (NHWC) with dL/dkernel = P^T G (module doc)."""
    strides = [1, int(strides[0]), int(strides[1]), 1]

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            kh, kw, _, filters = kernel.shape
            patches = patch_matrix(x, (kh, kw), strides[1:3])
            dkernel = tf.matmul(patches, tf.reshape(dy, [-1, filters]), transpose_a=True)
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                                strides=strides, padding="VALID")
            return dx, tf.reshape(dkernel, tf.shape(kernel))

        return tf.nn.conv2d(x, kernel, strides=strides, padding="VALID"), grad

    # A tensor, not the variable: the gradient then reaches the variable through its read.
    return conv(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))


@keras.saving.register_keras_serializable(package="keras_ncssl")
class PatchGradientConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that trains with the patch-product kernel gradient (module doc).

    Applies to "valid" padding, channels-last 4-D inputs, no dilation, one group, with the
    TensorFlow backend; any other setting takes the parent's path unchanged."""

    def _patch_gradient_applies(self, inputs):
        return (keras.backend.backend() == "tensorflow" and self.padding == "valid" and self.groups == 1
                and self.data_format == "channels_last" and tuple(self.dilation_rate) == (1, 1)
                and len(inputs.shape) == 4)

    def convolution_op(self, inputs, kernel):
        if not self._patch_gradient_applies(inputs):
            return super().convolution_op(inputs, kernel)
        return conv2d_with_patch_gradient(inputs, kernel, self.strides)
