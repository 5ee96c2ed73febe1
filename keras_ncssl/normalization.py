"""BatchNormalization with TensorFlow's fused kernel for 4-D training-mode batches.

Keras 3's `BatchNormalization` computes batch statistics with `tf.nn.moments` and normalises
with `tf.nn.batch_normalization`: about ten element-wise ops forward and as many backward,
each a pass over the activation. TensorFlow's `FusedBatchNormV3` (oneDNN on CPU, cuDNN on GPU)
does the statistics and the normalisation in one kernel and has a fused gradient; on the
ResNet-18 train step of `experiments/bench.py` it cuts the step by ~13% (+15% images/s) on 2 CPU cores
(BUILD_NOTES.md, "Train-step benchmark").

The math is the layer's own, unchanged (Ioffe & Szegedy 2015):

    y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta,
    moving_mean <- momentum * moving_mean + (1 - momentum) * mean_B,
    moving_var  <- momentum * moving_var  + (1 - momentum) * var_B,

with var_B the *biased* batch variance, as Keras uses for both (the fused kernel returns the
Bessel-corrected variance for the moving average, PyTorch's convention; it is converted back so
that a checkpoint means the same with either layer). Everything else (inference mode,
`synchronized=True`, masks, renorm, non-4-D inputs, axis other than -1, the JAX/Torch
backends) takes the parent's path, so this is a drop-in replacement with the same weights
and config.
"""
import keras
import tensorflow as tf

from keras_ncssl._compat import batchnorm_renorm

__all__ = ["FusedBatchNormalization"]


@keras.saving.register_keras_serializable(package="keras_ncssl")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` that trains with the fused TensorFlow kernel."""

    def _can_fuse(self, inputs, training, mask):
        return (bool(training) and self.trainable and mask is None and not self.synchronized
                and not batchnorm_renorm(self) and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and keras.backend.backend() == "tensorflow"
                and inputs.dtype in (tf.float32, tf.bfloat16, tf.float16))

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        # The kernel takes scale/offset/statistics in float32 whatever the input dtype, so the
        # statistics of a bfloat16/float16 activation are accumulated in float32.
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        empty = tf.constant([], tf.float32)
        y, mean, unbiased_variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=scale, offset=offset, mean=empty, variance=empty,
            epsilon=float(self.epsilon), exponential_avg_factor=1.0, data_format="NHWC",
            is_training=True)
        count = tf.cast(tf.size(inputs, out_type=tf.int64) // channels, tf.float32)
        variance = unbiased_variance * tf.maximum(count - 1.0, 0.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(y, self.compute_dtype)
