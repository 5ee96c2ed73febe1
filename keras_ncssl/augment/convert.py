"""Input conversion shared by pretraining and evaluation: dtype, channels, size, normalisation."""
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# ITU-R BT.601 luma, as torchvision uses; the weights sum to exactly 1, so gray images
# are fixed points of every colour op (the 1-channel fast path relies on it).
LUMA = (0.299, 0.587, 0.114)


RESIZE_METHODS = ("resize", "pad")


def convert_images(images, image_size: Optional[int], channels: int,
                   method: str = "resize") -> tf.Tensor:
    """Native images -> the encoder's input geometry, float32 in [0, 1], [B, S, S, channels].

    Accepts a uint8 (0..255) or float (0..1) batch [B, H, W, C] or a single image [H, W, C].
    Channels: 1 -> 3 repeats the gray plane; 3 -> 1 takes the BT.601 luma. Geometry:
    "resize" (bilinear with half-pixel centres, antialiased when shrinking) or "pad"
    (zero-pad/centre-crop, e.g. 28 -> 32 for MNIST-like data); `image_size=None` converts
    dtype and channels only. `eval_dataset` uses it as is; `pretrain_dataset` uses it for
    "pad", while for "resize" the random crop resamples straight from the native image to S
    with the same kernel (`resample_matrix`; the full crop equals this resize), so probe
    inputs match pretraining inputs.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r}; choose one of {list(RESIZE_METHODS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r}; choose 1 or 3")
    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    if single:
        images = images[None]
    if images.dtype == tf.uint8:
        x = tf.cast(images, tf.float32) * (1.0 / 255.0)
    else:
        x = tf.cast(images, tf.float32)
    in_channels = x.shape[-1]
    if in_channels not in (1, 3):
        raise ValueError(f"images have {in_channels} channels; only 1 or 3 are supported")
    if in_channels == 1 and channels == 3:
        x = tf.tile(x, [1, 1, 1, 3])
    elif in_channels == 3 and channels == 1:
        x = tf.reduce_sum(x * tf.constant(LUMA, tf.float32), axis=-1, keepdims=True)
    size = None if image_size is None else int(image_size)
    h, w = x.shape[1], x.shape[2]
    if size is not None and (h != size or w != size):
        if method == "pad":
            x = tf.image.resize_with_crop_or_pad(x, size, size)
        else:
            x = tf.image.resize(x, (size, size), method="bilinear", antialias=True)
            x = tf.clip_by_value(x, 0.0, 1.0)
    return x[0] if single else x


def stage_variable_size(image, image_size: int, ratio: float = 256.0 / 224.0) -> tf.Tensor:
    """One variable-size image (ImageNet) -> a fixed square uint8 image for batching.

    Resizes the shorter side to round(image_size * ratio) and centre-crops the square (the
    usual 256/224 ImageNet recipe), so pretraining can crop/resize it and evaluation can
    centre-crop it. Needed because per-batch vectorisation wants one shape per batch. Also
    takes a batch [B, H, W, C] of one size (the exported encoder's `serve` does), and pixel
    values 0..255 as uint8 or float.
    """
    side = int(round(image_size * ratio))
    shape = tf.shape(image)
    h, w = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    scale = side / tf.minimum(h, w)
    new = tf.cast(tf.math.ceil(tf.stack([h * scale, w * scale])), tf.int32)
    x = tf.image.resize(image, tf.maximum(new, side), method="bilinear", antialias=True)
    x = tf.image.resize_with_crop_or_pad(x, side, side)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def normalization_stats(mean: Sequence[float], std: Sequence[float],
                        channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """Dataset mean/std (native channels) mapped to `channels` the way `convert_images` maps
    pixels (1 -> 3 repeats; 3 -> 1 uses the luma weights, std approximated the same way)."""
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    if mean.shape != std.shape or mean.size not in (1, 3):
        raise ValueError(f"mean={mean.tolist()} / std={std.tolist()} must both have 1 or 3 "
                         "values")
    if np.any(std <= 0):
        raise ValueError(f"std={std.tolist()} must be positive")
    if mean.size == channels:
        return mean, std
    if mean.size == 1:
        return np.repeat(mean, channels), np.repeat(std, channels)
    luma = np.asarray(LUMA, np.float32)
    return np.asarray([luma @ mean]), np.asarray([luma @ std])


def normalize(x, mean, std) -> tf.Tensor:
    """(x - mean) / std per channel."""
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
