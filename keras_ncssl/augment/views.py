"""Photometric ops and the view functions: one batch in, two (or 2 + M) augmented views out."""
import dataclasses
import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from keras_ncssl.augment.config import PresetLike, ViewConfig, get_preset
from keras_ncssl.augment.convert import LUMA, convert_images, normalization_stats, normalize
from keras_ncssl.augment.geometry import (apply_separable, blur_matrix, resample_matrix, sample_bernoulli,
                                          sample_crop_boxes, sample_uniform)


def _gray(x):
    """BT.601 luma [B, H, 1, W] of a [B, H, C, W] batch."""
    if x.shape[2] == 1:
        return x
    return tf.reduce_sum(x * tf.reshape(tf.constant(LUMA, tf.float32), [1, 1, 3, 1]),
                         axis=2, keepdims=True)


def _bcast(v):
    return tf.reshape(v, [-1, 1, 1, 1])


def shift_hue(x, delta):
    """Rotates the HSV hue of a [B, H, 3, W] batch by `delta` (fraction of a turn, [B,1,1,1]).

    The same maps as tf.image.rgb_to_hsv / hsv_to_rgb (torchvision's adjust_hue), written on
    channel planes so that it stays in this layout and fuses under XLA. Back-conversion uses
    the branch-free form channel = v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6,
    with n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    v = tf.maximum(tf.maximum(r, g), b)
    chroma = v - tf.minimum(tf.minimum(r, g), b)
    safe = tf.where(chroma > 0, chroma, 1.0)
    h = tf.where(v == r, (g - b) / safe,
                 tf.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = tf.where(chroma > 0, h / 6.0, 0.0)
    sat = tf.where(v > 0, chroma / tf.where(v > 0, v, 1.0), 0.0)
    h6 = tf.math.floormod(h + delta, 1.0) * 6.0

    def channel(n):
        k = tf.math.floormod(n + h6, 6.0)
        return v - v * sat * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0)

    return tf.concat([channel(5.0), channel(3.0), channel(1.0)], axis=2)


def _color_jitter(x, params, cfg: ViewConfig):
    """Brightness, contrast, saturation, hue (torchvision's ColorJitter maps, in this fixed
    order, clipped to [0, 1] after each). x: [B, H, C, W]; `params` from
    `sample_view_params` (identity factors for samples that skip the jitter)."""
    color = x.shape[2] == 3
    if cfg.brightness > 0:
        x = tf.clip_by_value(x * _bcast(params["brightness"]), 0.0, 1.0)
    if cfg.contrast > 0:
        m = tf.reduce_mean(_gray(x), axis=[1, 2, 3], keepdims=True)
        x = tf.clip_by_value((x - m) * _bcast(params["contrast"]) + m, 0.0, 1.0)
    # Saturation and hue are the identity on gray images, so 1-channel data skips them.
    if color and cfg.saturation > 0:
        g = _gray(x)
        x = tf.clip_by_value((x - g) * _bcast(params["saturation"]) + g, 0.0, 1.0)
    if color and cfg.hue > 0:
        x = tf.clip_by_value(shift_hue(x, _bcast(params["hue"])), 0.0, 1.0)
    return x


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """Odd kernel size ~ `fraction` of the image side (SimCLR: 10%), at least 3.

    Like the PyTorch-BYOL helper [LM] uses: radius = int(fraction * size) // 2, size 2r+1.
    """
    return max(3, 2 * (int(fraction * image_size) // 2) + 1)


def sample_view_params(config: ViewConfig, seed, batch_size, height: int,
                       width: int) -> Dict[str, tf.Tensor]:
    """All random parameters of one view for a batch, as [B]-vectors (boxes [B, 4]).

    Every draw is a stateless op seeded by a fixed sub-seed of `seed` (one per operation), so
    the parameters depend only on (seed, config, batch size). Samples that skip an op get
    its identity value (factor 1, hue shift 0, flag False). Drawn outside the XLA-compiled
    function so that `jit_compile` on/off sees the same numbers (XLA's stateless kernels
    produce a different stream from the CPU kernels).
    """
    n = batch_size
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 12)
    jitter = sample_bernoulli(seeds[2], n, config.jitter_prob)
    erase_seeds = tf.random.experimental.stateless_split(seeds[11], 2)
    erase_boxes = sample_crop_boxes(erase_seeds[1], n, config.erase_scale, config.erase_ratio,
                                    height, width)
    # sample_crop_boxes falls back to the whole image when no attempt fits; torchvision's
    # RandomErasing then erases nothing, and so does this.
    erase_area = (erase_boxes[:, 2] - erase_boxes[:, 0]) * (erase_boxes[:, 3] - erase_boxes[:, 1])

    def factor(s, strength):
        return tf.where(jitter, sample_uniform(s, n, max(0.0, 1.0 - strength), 1.0 + strength), 1.0)

    return {
        "boxes": sample_crop_boxes(seeds[0], n, config.crop_scale, config.crop_ratio,
                                   height, width),
        "flip": sample_bernoulli(seeds[1], n, config.flip_prob),
        "brightness": factor(seeds[3], config.brightness),
        "contrast": factor(seeds[4], config.contrast),
        "saturation": factor(seeds[5], config.saturation),
        "hue": tf.where(jitter, sample_uniform(seeds[6], n, -config.hue, config.hue), 0.0),
        "grayscale": sample_bernoulli(seeds[7], n, config.grayscale_prob),
        "blur": sample_bernoulli(seeds[8], n, config.blur_prob),
        "blur_sigma": sample_uniform(seeds[9], n, config.blur_sigma[0], config.blur_sigma[1]),
        "solarize": sample_bernoulli(seeds[10], n, config.solarize_prob),
        # seeds[11] was unused before erasing existed: the draws above are unchanged by it.
        "erase": sample_bernoulli(erase_seeds[0], n, config.erase_prob)
                 & (erase_area <= config.erase_scale[1] * (1.0 + 1e-5)),
        "erase_boxes": erase_boxes,
    }


def apply_view(images, params: Dict[str, tf.Tensor], config: ViewConfig,
               out_size: Optional[int] = None) -> tf.Tensor:
    """Applies one view's sampled parameters to a batch (deterministic).

    images: float32 [B, H, W, C] in [0, 1]; returns [B, S, S, C] in [0, 1] (S = `out_size`,
    default H; the crop resamples straight to S), not normalised.
    Order as BYOL/SimCLR: crop + flip, colour jitter, grayscale, blur, solarize, then random
    erasing (last, as torchvision's RandomErasing after ToTensor). Only
    XLA-compilable ops; works internally in the [B, H, C, W] layout, where the separable
    crop/blur matmuls need no transposes.
    """
    x = tf.convert_to_tensor(images, tf.float32)
    if x.shape.rank != 4 or x.shape[1] is None or x.shape[2] is None or x.shape[3] is None:
        raise ValueError(f"augment needs a [B, H, W, C] batch of static H, W, C; "
                         f"got shape {x.shape}")
    h, w = int(x.shape[1]), int(x.shape[2])
    size = h if out_size is None else int(out_size)
    boxes = params["boxes"]
    rows = resample_matrix(boxes[:, 0], boxes[:, 2] - boxes[:, 0], h, size)
    cols = resample_matrix(boxes[:, 1], boxes[:, 3] - boxes[:, 1], w, size, params["flip"])
    x = tf.transpose(x, [0, 1, 3, 2])  # [B, H, C, W]
    x = tf.clip_by_value(apply_separable(x, rows, cols), 0.0, 1.0)
    if config.jitter_prob > 0:
        x = _color_jitter(x, params, config)
    if config.grayscale_prob > 0 and x.shape[2] == 3:
        x = tf.where(_bcast(params["grayscale"]), tf.tile(_gray(x), [1, 1, 3, 1]), x)
    if config.blur_prob > 0:
        k = blur_kernel_size(size, config.blur_kernel_fraction)
        blur = blur_matrix(params["blur_sigma"], params["blur"], size, k)
        x = apply_separable(x, blur, blur)
    if config.solarize_prob > 0:
        x = tf.where(_bcast(params["solarize"]) & (x >= config.solarize_threshold), 1.0 - x, x)
    if config.erase_prob > 0:
        x = tf.where(erase_mask(params["erase_boxes"], params["erase"], size),
                     tf.cast(config.erase_value, x.dtype), x)
    return tf.transpose(x, [0, 1, 3, 2])


def erase_mask(boxes, apply, size: int) -> tf.Tensor:
    """[B, S, 1, S] boolean mask (the [B, H, C, W] layout of `apply_view`) of the pixels whose
    centres lie in each sample's box (fractions y1, x1, y2, x2), all False where not `apply`."""
    centres = (tf.range(size, dtype=tf.float32) + 0.5) / size

    def inside(low, high):  # [B, S]
        return (centres[None, :] >= low[:, None]) & (centres[None, :] < high[:, None])

    rows = inside(boxes[:, 0], boxes[:, 2]) & apply[:, None]
    cols = inside(boxes[:, 1], boxes[:, 3])
    return rows[:, :, None, None] & cols[:, None, None, :]


def augment_batch(images, config: ViewConfig, seed) -> tf.Tensor:
    """One augmented view (float32 [B, S, S, C] in [0, 1], not normalised) of a converted
    batch, with parameters drawn from the stateless `seed` (shape [2] integer)."""
    x = tf.convert_to_tensor(images, tf.float32)
    if x.shape.rank != 4 or x.shape[1] is None or x.shape[2] is None:
        raise ValueError(f"augment needs a [B, H, W, C] batch of static H, W; got shape {x.shape}")
    params = sample_view_params(config, seed, tf.shape(x)[0], int(x.shape[1]), int(x.shape[2]))
    return apply_view(x, params, config)


def make_view_fn(preset: PresetLike, mean: Sequence[float], std: Sequence[float],
                 channels: int, image_size: Optional[int] = None, jit_compile: bool = True,
                 local_views: int = 0, local_size: Optional[int] = None,
                 local_config: Optional[ViewConfig] = None):
    """A function `(batch, seed) -> (view1, view2)`, normalised float32 [B, S, S, channels].

    `batch`: float32 [B, H, W, 1 or 3] in [0, 1] (`convert_images` output; S = `image_size`,
    default H). A 1-channel batch asked for 3 channels is augmented in 1 channel and repeated
    at the end: every op here maps gray images to gray images (saturation, hue and grayscale
    are the identity on them), so this is exact and 3x cheaper. View v draws its parameters
    from `stateless_fold_in(seed, v + 1)`. With `jit_compile` the (deterministic) application
    is compiled with XLA, which fuses the chain of per-pixel ops (several times faster on
    CPU); the random parameters are drawn outside it, so both settings give the same views up
    to float rounding.

    Multi-crop ([SwAV] Caron et al. 2020): with `local_views` = M > 0 the function returns
    `(view1, view2, (local_1, ..., local_M))`, the locals [B, s, s, channels] with
    s = `local_size` and augmented by `local_config` (see `local_view_config`). Local m
    draws from `fold_in(seed, m + 3)`, so the two global views are the same with or without
    locals.
    """
    view_cfgs = get_preset(preset)
    local_views = check_local_views(local_views, local_size)
    if local_views:
        local_config = local_config or local_view_config(view_cfgs)
        view_cfgs = tuple(view_cfgs) + (local_config,) * local_views
    mean, std = normalization_stats(mean, std, channels)
    apply_fn = _view_applier(tuple(view_cfgs), tuple(float(m) for m in mean),
                             tuple(float(s) for s in std), int(channels),
                             None if image_size is None else int(image_size),
                             None if not local_views else int(local_size), bool(jit_compile))

    def views(x, seed):
        x = tf.convert_to_tensor(x, tf.float32)
        if x.shape.rank != 4 or x.shape[1] is None or x.shape[2] is None:
            raise ValueError(f"augment needs a [B, H, W, C] batch of static H, W; "
                             f"got shape {x.shape}")
        seed = tf.cast(seed, tf.int64)
        n, h, w = tf.shape(x)[0], int(x.shape[1]), int(x.shape[2])
        params = [sample_view_params(cfg, tf.random.experimental.stateless_fold_in(seed, v + 1),
                                     n, h, w)
                  for v, cfg in enumerate(view_cfgs)]
        out = apply_fn(x, params)
        return (out[0], out[1]) if not local_views else (out[0], out[1], tuple(out[2:]))

    return views


# Multi-crop's default local crop: DINO's (0.05, 0.4) area range with a floor of 0.1, since
# 5% of a 28-32 px image is a 6-7 px patch.
LOCAL_CROP_SCALE = (0.1, 0.4)


def local_view_config(view_cfgs, crop_scale=LOCAL_CROP_SCALE) -> ViewConfig:
    """The default local-view augmentation: view 1's settings with a small crop (`crop_scale`)."""
    return dataclasses.replace(get_preset(view_cfgs)[0], crop_scale=tuple(crop_scale))


def check_local_views(local_views, local_size):
    """The multi-crop arguments checked (an int >= 0; a size >= 2 px when there are local
    views); returns local_views as an int. Shared by the view function and the pipeline."""
    if not isinstance(local_views, (int, np.integer)) or local_views < 0:
        raise ValueError(f"local_views={local_views!r} must be an integer >= 0 (0: no multi-crop)")
    if local_views and (not isinstance(local_size, (int, np.integer)) or local_size < 2):
        raise ValueError(f"local_size={local_size!r} must be an integer >= 2 (pixels) when "
                         f"local_views={local_views}")
    return int(local_views)


@functools.lru_cache(maxsize=32)
def _view_applier(view_cfgs, mean, std, channels, image_size, local_size, jit_compile):
    """The deterministic application of every view (two globals, then any locals), memoised
    so that pipelines rebuilt with new seeds (e.g. one per epoch) reuse one tf.function and
    hence one XLA compilation."""

    def apply_all(x, params):
        out = []
        for v, (cfg, p) in enumerate(zip(view_cfgs, params)):
            y = apply_view(x, p, cfg, image_size if v < 2 else local_size)
            if y.shape[-1] != channels:
                y = tf.tile(y, [1, 1, 1, channels])
            out.append(normalize(y, mean, std))
        return out

    return tf.function(apply_all, jit_compile=True) if jit_compile else apply_all


def two_views(images, preset: PresetLike, seed, image_size: int, channels: int,
              mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
              resize_method: str = "resize",
              jit_compile: bool = False) -> Tuple[tf.Tensor, tf.Tensor]:
    """Both augmented, normalised views (float32 [B, S, S, channels]) of one native batch
    (uint8 or float [B, H, W, C]); what `pretrain_dataset` maps over its batches.

    Each view draws its own parameters from `fold_in(seed, view)`, so the views differ while
    coming from the same images.
    """
    images = tf.convert_to_tensor(images)
    work_channels = 1 if (images.shape[-1] == 1 and channels == 3) else channels
    # "resize": the crop resamples native -> S itself; "pad" pads first, then crops S -> S.
    x = convert_images(images, image_size if resize_method == "pad" else None, work_channels,
                       resize_method)
    return make_view_fn(preset, mean, std, channels, image_size, jit_compile)(x, seed)
