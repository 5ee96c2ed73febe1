"""Conv2D whose kernel gradient is one matrix product over the input's patches.

For y = conv(x, W) with stride s and "valid" padding, the kernel gradient is

    dL/dW[i, j, c, f] = sum_{b, p, q} x[b, p*s + i, q*s + j, c] * dL/dy[b, p, q, f],

i.e. dL/dW = P^T G with P the (B*H_out*W_out) x (k_h*k_w*C) matrix of input patches
(`tf.image.extract_patches`, ordered row, column, channel like the kernel's reshape) and G the
(B*H_out*W_out) x F output gradient. On small feature maps the CPU's convolution kernel for this
gradient (oneDNN's backward-weights) is slow: on the quick run's last two stages (4x4 and 2x2
outputs, batch 64, bfloat16) it took half of the train step's kernel time, and the product above
made the step 16-22 % faster (BUILD_NOTES, "The kernel gradient as one product"). On large maps the
patch matrix costs more than it saves, so the encoders use this layer only where the output has few
positions (`small_cnn(patch_gradient_positions=...)`).

The forward pass and the input gradient are TensorFlow's own convolution ops; the layer has
Conv2D's config and weights, so a model holding it is written with plain Conv2D layers for export
(`export.plain_keras`) and the values agree with Conv2D's up to the order of summation.
"""
import keras
import tensorflow as tf

__all__ = ["PatchGradientConv2D", "conv2d_with_patch_gradient"]


def conv2d_with_patch_gradient(x, kernel, strides):
    """``tf.nn.conv2d(x, kernel, strides, "VALID")`` (NHWC) with dL/dkernel = P^T G (module doc)."""
    strides = [1, int(strides[0]), int(strides[1]), 1]

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            kh, kw, channels, filters = kernel.shape
            patches = tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=strides, rates=[1, 1, 1, 1],
                                               padding="VALID")
            dkernel = tf.matmul(tf.reshape(patches, [-1, kh * kw * channels]), tf.reshape(dy, [-1, filters]),
                                transpose_a=True)
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
