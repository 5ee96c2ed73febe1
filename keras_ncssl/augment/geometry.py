"""Stateless per-sample random parameters and the separable crop / flip / blur operators."""
import math

import numpy as np
import tensorflow as tf

from keras_ncssl.augment.config import check_range


def sample_uniform(seed, n, low, high):
    """``n`` stateless uniform draws in [low, high) from ``seed`` (a shape-[2] seed)."""
    return tf.random.stateless_uniform([n], seed=seed, minval=low, maxval=high)


def sample_bernoulli(seed, n, p):
    """``n`` stateless Bernoulli(p) booleans from ``seed`` (a shape-[2] seed)."""
    return tf.random.stateless_uniform([n], seed=seed) < p


def sample_crop_boxes(seed, batch_size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                      height=1, width=1, attempts=10) -> tf.Tensor:
    """Per-sample random-resized-crop boxes, [B, 4] as fractions (y1, x1, y2, x2) of the image.

    torchvision's RandomResizedCrop, vectorised: `attempts` candidates per sample with area
    fraction ~ U(scale) and log(aspect) ~ U(log ratio); the first that fits is used; if none
    fits, a centre crop of the whole image with its aspect clamped into `ratio`. `height` and
    `width` (pixels) matter only for non-square images, where the aspect is in pixels.
    """
    check_range("scale", tuple(scale), 1e-6, 1.0, pair=True)
    check_range("ratio", tuple(ratio), 1e-3, 1e3, pair=True)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    n = batch_size
    area = tf.random.stateless_uniform([n, attempts], seeds[0], scale[0], scale[1])
    log_r = tf.random.stateless_uniform([n, attempts], seeds[1], math.log(ratio[0]),
                                        math.log(ratio[1]))
    r = tf.exp(log_r)
    hw = tf.cast(height, tf.float32) / tf.cast(width, tf.float32)
    # Pixels: w = sqrt(a H W r), h = sqrt(a H W / r); as fractions of W and H:
    w = tf.sqrt(area * r * hw)
    h = tf.sqrt(area / (r * hw))
    fits = (w <= 1.0) & (h <= 1.0)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    any_fit = tf.reduce_any(fits, axis=1)
    w = tf.gather(w, first, batch_dims=1)
    h = tf.gather(h, first, batch_dims=1)
    # Fallback: the largest centred crop whose aspect lies in `ratio`.
    in_ratio = 1.0 / hw
    fb_w = tf.where(in_ratio < ratio[0], 1.0,
                    tf.where(in_ratio > ratio[1], ratio[1] * hw, 1.0))
    fb_h = tf.where(in_ratio < ratio[0], in_ratio / ratio[0], 1.0)
    w = tf.where(any_fit, w, fb_w * tf.ones_like(w))
    h = tf.where(any_fit, h, fb_h * tf.ones_like(h))
    top = tf.random.stateless_uniform([n], seeds[2]) * (1.0 - h)
    left = tf.random.stateless_uniform([n], seeds[3]) * (1.0 - w)
    top = tf.where(any_fit, top, (1.0 - h) / 2)
    left = tf.where(any_fit, left, (1.0 - w) / 2)
    return tf.stack([top, left, top + h, left + w], axis=1)


def resample_matrix(start, length, in_size, out_size: int, flip=None) -> tf.Tensor:
    """Per-sample 1-D resampling operators [B, out_size, in_size] for a crop along one axis.

    `start`, `length`: [B] crop position and extent as fractions of the axis. Output pixel k
    reads the source at its cell centre, u_k = (start + (k + 1/2) length / out) in - 1/2
    (half-pixel centres: the full crop at out = in is an exact identity), with a triangle
    (bilinear) kernel widened to the source spacing when shrinking, i.e. antialiased like
    `tf.image.resize(..., antialias=True)`. Weights are renormalised at the border (edge
    clamp). A flipped sample gets its output order reversed, which mirrors the crop.
    `in_size` may be a scalar tensor (the exported encoder resizes images of any size).
    """
    in_px = tf.cast(in_size, tf.float32)
    step = length * in_px / out_size  # source pixels per output pixel, [B]
    k = tf.range(out_size, dtype=tf.float32)
    u = (start * in_px)[:, None] + (k[None, :] + 0.5) * step[:, None] - 0.5  # [B, out]
    support = tf.maximum(step, 1.0)[:, None, None]
    i = tf.range(in_size, dtype=tf.float32)
    w = tf.nn.relu(1.0 - tf.abs(i[None, None, :] - u[:, :, None]) / support)  # [B, out, in]
    w = w / tf.maximum(tf.reduce_sum(w, axis=2, keepdims=True), 1e-12)
    if flip is not None:
        w = tf.where(flip[:, None, None], tf.reverse(w, axis=[1]), w)
    return w


def blur_matrix(sigma, apply, size: int, kernel_size: int) -> tf.Tensor:
    """Per-sample 1-D Gaussian blur operators [B, size, size] with reflect padding.

    Row k holds the normalised Gaussian taps (sigma[b]) around k, reflected at the edges as
    `torch.nn.ReflectionPad2d` / `tf.pad(mode="REFLECT")` do; samples with `apply` False get
    the identity. Applied along both axes this is the separable blur of the reference helpers.
    """
    r = min(kernel_size // 2, size - 1)
    taps = np.arange(-r, r + 1)
    idx = np.arange(size)[:, None] + taps[None, :]  # [size, K]
    idx = np.where(idx < 0, -idx, idx)
    idx = np.where(idx > size - 1, 2 * (size - 1) - idx, idx)
    scatter = tf.constant(np.eye(size, dtype=np.float32)[idx])  # [size, K, size]
    g = tf.exp(-tf.constant(taps ** 2, tf.float32)[None, :] / (2.0 * tf.square(sigma)[:, None]))
    g = g / tf.reduce_sum(g, axis=1, keepdims=True)
    g = tf.where(apply[:, None], g, tf.one_hot(r, 2 * r + 1)[None, :])  # [B, K]
    return tf.einsum("bt,ktj->bkj", g, scatter)


def apply_separable(x, rows, cols) -> tf.Tensor:
    """out[b] = rows[b] @ x[b] @ cols[b]^T for every channel.

    `x` is in the planar-row layout used inside `augment_batch`, [B, H, C, W]: both
    contractions are then plain batched matmuls with no transposes (H: [S, H] @ [H, C*W];
    W: [H*C, W] @ [W, T]). rows [B, S, H], cols [B, T, W] -> [B, S, C, T].
    """
    n, h, c, w = tf.shape(x)[0], x.shape[1], x.shape[2], x.shape[3]
    s, t = rows.shape[1], cols.shape[1]
    y = tf.matmul(tf.reshape(x, [n, h * c, w]), cols, transpose_b=True)  # [B, H*C, T]
    y = tf.matmul(rows, tf.reshape(y, [n, h, c * t]))  # [B, S, C*T]
    return tf.reshape(y, [n, s, c, t])
