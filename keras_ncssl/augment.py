"""Two-view augmentation for BYOL/SimSiam, vectorised per batch and seeded statelessly.

The augmentation set is BYOL's/SimCLR's: random resized crop, horizontal flip, colour jitter
(brightness, contrast, saturation, hue, applied with a probability, in that fixed order),
random grayscale, Gaussian blur and solarisation, then normalisation by the dataset mean/std.
Per-view settings live in `PRESETS` as `(view1, view2)` pairs of `ViewConfig`.

Pipeline (`pretrain_dataset`): shard -> shuffle -> (repeat) -> batch -> attach one random key
per batch -> one `map` that converts the batch to the model's input and draws *both* views
of every element from it -> prefetch. Both views therefore always come from the same element
(never two zipped datasets, PITFALLS "Data pipelines"), and every random number comes from a
stateless op whose seed is derived from (seed, input pipeline, batch key, view, operation):
same seed -> same views; different views, batches and epochs -> different randomness, and
`map` parallelism cannot repeat or reorder it (the tensorflow#35090 trap of seeded stateful
ops inside `map`).

Vectorisation: random parameters are drawn per sample as [B]-vectors. The crop, the flip and
the blur are per-sample *separable linear operators*: each sample gets a [S, H] row and a
[S, W] column matrix (antialiased bilinear resampling of its crop box, the column order
reversed when flipped; a reflect-padded Gaussian for the blur), applied to the whole batch as
two batched matmuls. Colour jitter factors broadcast as [B, 1, 1, 1], and "with probability
p" is a per-sample choice between the op's factor and the identity (factor 1, hue shift 0,
identity blur matrix). All of it is built from XLA-compilable ops, so the two-view function
is compiled with XLA (`jit_compile=True`), which fuses the chain of per-pixel ops.
"""
import dataclasses
import functools
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE

# ITU-R BT.601 luma, as torchvision uses; the weights sum to exactly 1, so gray images
# are fixed points of every colour op (the 1-channel fast path relies on it).
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def _check_range(name, value, low, high, pair=False):
    if pair:
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not low <= value[0] <= value[1] <= high):
            raise ValueError(f"{name}={value!r} must be a pair (min, max) with "
                             f"{low} <= min <= max <= {high}")
    elif not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be in [{low}, {high}]")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Augmentation settings for one view (BYOL Tab. 6 / SimCLR App. A naming).

    Attributes:
        crop_scale: area fraction range of the random resized crop.
        crop_ratio: aspect ratio (width / height) range of the crop; sampled log-uniformly.
        flip_prob: probability of a horizontal flip.
        jitter_prob: probability of applying colour jitter at all.
        brightness, contrast, saturation: strength s; the factor is uniform in
            [max(0, 1 - s), 1 + s] (torchvision ColorJitter semantics).
        hue: hue shift uniform in [-hue, hue] (fraction of the colour wheel, <= 0.5).
        grayscale_prob: probability of converting to grayscale (kept as 3 channels).
        blur_prob: probability of Gaussian blur; sigma uniform in `blur_sigma`, kernel size
            `blur_kernel_fraction` of the image side (made odd), reflect padding.
        solarize_prob: probability of solarisation (x -> 1 - x where x >= solarize_threshold).
        erase_prob: probability of random erasing (Zhong et al. 2020, torchvision
            RandomErasing), applied last: a box of area fraction ~ U(`erase_scale`) and aspect
            ~ log-U(`erase_ratio`) is set to `erase_value` (in [0, 1] pixel units, before
            normalisation; 0 is Fashion-MNIST's background).
    """
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    solarize_prob: float = 0.0
    solarize_threshold: float = 0.5
    erase_prob: float = 0.0
    erase_scale: Tuple[float, float] = (0.02, 0.33)
    erase_ratio: Tuple[float, float] = (0.3, 3.3)
    erase_value: float = 0.0

    def __post_init__(self):
        _check_range("crop_scale", self.crop_scale, 1e-6, 1.0, pair=True)
        _check_range("crop_ratio", self.crop_ratio, 1e-3, 1e3, pair=True)
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob",
                     "solarize_prob", "solarize_threshold", "blur_kernel_fraction",
                     "erase_prob", "erase_value"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation"):
            _check_range(name, getattr(self, name), 0.0, 10.0)
        _check_range("hue", self.hue, 0.0, 0.5)
        _check_range("blur_sigma", self.blur_sigma, 1e-3, 100.0, pair=True)
        _check_range("erase_scale", self.erase_scale, 1e-6, 1.0, pair=True)
        _check_range("erase_ratio", self.erase_ratio, 1e-3, 1e3, pair=True)


# BYOL (Grill et al. 2020, Tab. 6): jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2; asymmetric
# blur (1.0 / 0.1) and solarisation (0 / 0.2).
_BYOL1 = ViewConfig(blur_prob=1.0, solarize_prob=0.0)
_BYOL2 = ViewConfig(blur_prob=0.1, solarize_prob=0.2)
# DirectPred's STL-10 setting ([LM] data/transforms.py, ALGORITHMS.md 2.5): SimCLR jitter
# (0.8, 0.8, 0.8, 0.2) p 0.8, gray 0.2, and the PyTorch-BYOL blur helper it imports, which
# blurs *every* image (sigma in [0.1, 2], kernel 10% of 96 px, reflect padding).
_STL10 = ViewConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_prob=1.0)
# DirectPred's CIFAR-10 setting: jitter (0.4, 0.4, 0.4, 0.1) p 0.8, gray 0.2, no blur.
_CIFAR10 = ViewConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, blur_prob=0.0)
# 1-channel data (Fashion-MNIST, digits): no colour ops. A crop floor of 0.2 (SimSiam's CIFAR
# choice) rather than 0.08, since 8% of a 28 px image is about 8x8 pixels of garment.
_GRAY = ViewConfig(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.0,
                   hue=0.0, grayscale_prob=0.0, blur_prob=0.0)

# The same with BYOL's/SimCLR's crop floor of 8%: a harder invariance task (tried for the quick run).
_GRAY_STRONG = dataclasses.replace(_GRAY, crop_scale=(0.08, 1.0))

PRESETS: Dict[str, Tuple[ViewConfig, ViewConfig]] = {
    "byol": (_BYOL1, _BYOL2),
    "stl10": (_STL10, _STL10),
    "cifar10": (_CIFAR10, _CIFAR10),
    "grayscale": (_GRAY, _GRAY),
    "grayscale_strong": (_GRAY_STRONG, _GRAY_STRONG),
    "none": (ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
                        jitter_prob=0.0, grayscale_prob=0.0),) * 2,
}

PresetLike = Union[str, ViewConfig, Tuple[ViewConfig, ViewConfig]]


def get_preset(preset: PresetLike) -> Tuple[ViewConfig, ViewConfig]:
    """`(view1, view2)` configs from a preset name, one ViewConfig (both views) or a pair."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose one of "
                             f"{sorted(PRESETS)} (or register one in keras_ncssl.augment.PRESETS)")
        return PRESETS[preset]
    if isinstance(preset, ViewConfig):
        return preset, preset
    if (isinstance(preset, (tuple, list)) and len(preset) == 2
            and all(isinstance(p, ViewConfig) for p in preset)):
        return tuple(preset)
    raise ValueError(f"preset={preset!r} must be a name in {sorted(PRESETS)}, a ViewConfig "
                     "or a pair of ViewConfig")


def parse_view_options(text: str) -> Dict[int, Dict[str, object]]:
    """`"crop_scale=0.3:1,brightness=0.2,2.solarize_prob=0.2"` -> {view: {field: value}}.

    Comma-separated `field=value` items; a pair is written `low:high`. A field applies to both
    views, or to one with a `1.`/`2.` prefix. Returns {0: ..., 1: ...} (view indices) for
    `with_view_options`; an empty text gives empty dicts.
    """
    fields = {f.name: f for f in dataclasses.fields(ViewConfig)}
    out: Dict[int, Dict[str, object]] = {0: {}, 1: {}}
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        views = (0, 1)
        if key[:2] in ("1.", "2."):
            views, key = (int(key[0]) - 1,), key[2:]
        if not sep or key not in fields:
            raise ValueError(f"augmentation option {item!r}: write FIELD=VALUE (or 1.FIELD=VALUE / "
                             f"2.FIELD=VALUE for one view) with FIELD one of {sorted(fields)}")
        try:
            parsed = tuple(float(v) for v in value.split(":"))
        except ValueError:
            raise ValueError(f"augmentation option {item!r}: {value!r} is not a number or a "
                             "low:high pair of numbers") from None
        is_pair = isinstance(getattr(ViewConfig(), key), tuple)
        if len(parsed) != (2 if is_pair else 1):
            raise ValueError(f"augmentation option {item!r}: {key} takes "
                             f"{'a low:high pair' if is_pair else 'one number'}")
        for view in views:
            out[view][key] = parsed if is_pair else parsed[0]
    return out


def with_view_options(preset: PresetLike, options: str) -> Tuple[ViewConfig, ViewConfig]:
    """The `(view1, view2)` configs of `preset` with `parse_view_options(options)` applied
    (each changed config is validated again by `ViewConfig`)."""
    changes = parse_view_options(options)
    return tuple(dataclasses.replace(cfg, **changes[v]) for v, cfg in enumerate(get_preset(preset)))


# ---------------------------------------------------------------------------------------------
# Input conversion (shared by pretraining and evaluation)
# ---------------------------------------------------------------------------------------------

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
        x = tf.reduce_sum(x * tf.constant(_LUMA, tf.float32), axis=-1, keepdims=True)
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
    centre-crop it. Needed because per-batch vectorisation wants one shape per batch.
    """
    side = int(round(image_size * ratio))
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
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
    luma = np.asarray(_LUMA, np.float32)
    return np.asarray([luma @ mean]), np.asarray([luma @ std])


def normalize(x, mean, std) -> tf.Tensor:
    """(x - mean) / std per channel."""
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# ---------------------------------------------------------------------------------------------
# Random parameters (stateless, per sample)
# ---------------------------------------------------------------------------------------------

def _uniform(seed, n, low, high):
    return tf.random.stateless_uniform([n], seed=seed, minval=low, maxval=high)


def _bernoulli(seed, n, p):
    return tf.random.stateless_uniform([n], seed=seed) < p


def sample_crop_boxes(seed, batch_size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                      height=1, width=1, attempts=10) -> tf.Tensor:
    """Per-sample random-resized-crop boxes, [B, 4] as fractions (y1, x1, y2, x2) of the image.

    torchvision's RandomResizedCrop, vectorised: `attempts` candidates per sample with area
    fraction ~ U(scale) and log(aspect) ~ U(log ratio); the first that fits is used; if none
    fits, a centre crop of the whole image with its aspect clamped into `ratio`. `height` and
    `width` (pixels) matter only for non-square images, where the aspect is in pixels.
    """
    _check_range("scale", tuple(scale), 1e-6, 1.0, pair=True)
    _check_range("ratio", tuple(ratio), 1e-3, 1e3, pair=True)
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


def resample_matrix(start, length, in_size: int, out_size: int, flip=None) -> tf.Tensor:
    """Per-sample 1-D resampling operators [B, out_size, in_size] for a crop along one axis.

    `start`, `length`: [B] crop position and extent as fractions of the axis. Output pixel k
    reads the source at its cell centre, u_k = (start + (k + 1/2) length / out) in - 1/2
    (half-pixel centres: the full crop at out = in is an exact identity), with a triangle
    (bilinear) kernel widened to the source spacing when shrinking, i.e. antialiased like
    `tf.image.resize(..., antialias=True)`. Weights are renormalised at the border (edge
    clamp). A flipped sample gets its output order reversed, which mirrors the crop.
    """
    in_px = float(in_size)
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


# ---------------------------------------------------------------------------------------------
# Photometric ops on float [0, 1] batches in the planar-row layout [B, H, C, W]
# ---------------------------------------------------------------------------------------------

def _gray(x):
    """BT.601 luma [B, H, 1, W] of a [B, H, C, W] batch."""
    if x.shape[2] == 1:
        return x
    return tf.reduce_sum(x * tf.reshape(tf.constant(_LUMA, tf.float32), [1, 1, 3, 1]),
                         axis=2, keepdims=True)


def _bcast(v):
    return tf.reshape(v, [-1, 1, 1, 1])


def _shift_hue(x, delta):
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
        x = tf.clip_by_value(_shift_hue(x, _bcast(params["hue"])), 0.0, 1.0)
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
    jitter = _bernoulli(seeds[2], n, config.jitter_prob)
    erase_seeds = tf.random.experimental.stateless_split(seeds[11], 2)
    erase_boxes = sample_crop_boxes(erase_seeds[1], n, config.erase_scale, config.erase_ratio,
                                    height, width)
    # sample_crop_boxes falls back to the whole image when no attempt fits; torchvision's
    # RandomErasing then erases nothing, and so does this.
    erase_area = (erase_boxes[:, 2] - erase_boxes[:, 0]) * (erase_boxes[:, 3] - erase_boxes[:, 1])

    def factor(s, strength):
        return tf.where(jitter, _uniform(s, n, max(0.0, 1.0 - strength), 1.0 + strength), 1.0)

    return {
        "boxes": sample_crop_boxes(seeds[0], n, config.crop_scale, config.crop_ratio,
                                   height, width),
        "flip": _bernoulli(seeds[1], n, config.flip_prob),
        "brightness": factor(seeds[3], config.brightness),
        "contrast": factor(seeds[4], config.contrast),
        "saturation": factor(seeds[5], config.saturation),
        "hue": tf.where(jitter, _uniform(seeds[6], n, -config.hue, config.hue), 0.0),
        "grayscale": _bernoulli(seeds[7], n, config.grayscale_prob),
        "blur": _bernoulli(seeds[8], n, config.blur_prob),
        "blur_sigma": _uniform(seeds[9], n, config.blur_sigma[0], config.blur_sigma[1]),
        "solarize": _bernoulli(seeds[10], n, config.solarize_prob),
        # seeds[11] was unused before erasing existed: the draws above are unchanged by it.
        "erase": _bernoulli(erase_seeds[0], n, config.erase_prob)
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
    local_views = _check_local_views(local_views, local_size)
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


def _check_local_views(local_views, local_size):
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


# ---------------------------------------------------------------------------------------------
# tf.data pipelines
# ---------------------------------------------------------------------------------------------

def _images_only(ds: tf.data.Dataset) -> tf.data.Dataset:
    spec = ds.element_spec
    if isinstance(spec, tuple):
        return ds.map(lambda *parts: parts[0])
    if isinstance(spec, dict):
        if "image" not in spec:
            raise ValueError(f"dict elements need an 'image' key, got {sorted(spec)}")
        return ds.map(lambda ex: ex["image"])
    return ds


def _resolve(data, image_size, channels, mean, std):
    """(images dataset, image_size, channels, mean, std) from DatasetSplits or a dataset."""
    if hasattr(data, "pretrain") and hasattr(data, "image_shape"):
        ds = data.pretrain
        native = tuple(data.image_shape)
        mean = data.mean if mean is None else mean
        std = data.std if std is None else std
    elif isinstance(data, tf.data.Dataset):
        ds = _images_only(data)
        native = tuple(ds.element_spec.shape)
    else:
        raise ValueError(f"expected DatasetSplits or tf.data.Dataset, got {type(data).__name__}")
    if len(native) != 3:
        raise ValueError(f"images must be [H, W, C]; element shape is {native}")
    if image_size is None:
        if native[0] is None or native[0] != native[1]:
            raise ValueError(f"image_size is required for non-square or variable-size images "
                             f"(native shape {native})")
        image_size = native[0]
    if channels is None:
        channels = native[2]
    if int(image_size) < 2:
        raise ValueError(f"image_size={image_size!r} must be >= 2")
    mean = (0.0,) * (native[2] or 1) if mean is None else mean
    std = (1.0,) * (native[2] or 1) if std is None else std
    return ds, int(image_size), int(channels), mean, std, native


def pretrain_dataset(data, preset: PresetLike = "byol", batch_size: int = 256,
                     image_size: Optional[int] = None, channels: Optional[int] = None,
                     seed: int = 0, input_context: Optional[tf.distribute.InputContext] = None,
                     shuffle_buffer: int = 10_000, repeat: bool = False,
                     mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None,
                     resize_method: str = "resize",
                     jit_compile: bool = True, local_views: int = 0,
                     local_size: Optional[int] = None,
                     local_config: Optional[ViewConfig] = None) -> tf.data.Dataset:
    """The pretraining input: a dataset of `(view1, view2)` float32 batches [B, S, S, C].

    With `local_views` = M > 0 (multi-crop) each element is instead a dict
    `{"view1", "view2", "local_views": (M batches [B, s, s, C])}`, s = `local_size`; the
    models train on both forms (see `make_view_fn` for the local views' augmentation).

    Args:
        data: `DatasetSplits` (uses `.pretrain`, `.mean`, `.std`) or a `tf.data.Dataset` of
            single images (or `(image, label)` pairs; labels are dropped).
        preset: a name in `PRESETS`, a `ViewConfig`, or a `(view1, view2)` pair.
        batch_size: the global batch size; with `input_context` each replica gets
            `input_context.get_per_replica_batch_size(batch_size)`.
        image_size, channels: the encoder's input (default: native size and channels).
        seed: drives shuffling and every augmentation; same seed -> same views (tf.data's
            seeded shuffle/random ops also fold in TF's global seed, if one is set).
        input_context: from `strategy.distribute_datasets_from_function`; the input is
            sharded by `input_pipeline_id` and each pipeline gets its own random stream.
        shuffle_buffer: elements in the shuffle buffer (0 disables shuffling).
        repeat: repeat forever (then pass `steps_per_epoch` to `fit`). Without it each pass
            is one epoch; every pass reshuffles and draws new augmentations.
        mean, std: override the normalisation statistics.
        resize_method: "resize" or "pad" for the native -> input conversion.
        jit_compile: compile the augmentation with XLA (CPU); False runs the same ops in
            plain TensorFlow (slower; for builds without XLA).
        local_views, local_size, local_config: multi-crop's extra low-resolution views.

    Batches are dropped at the end of a pass if incomplete (`drop_remainder=True`): BYOL's
    BatchNorm and the predictor's correlation estimate want full batches.
    """
    ds, image_size, channels, mean, std, native = _resolve(data, image_size, channels, mean,
                                                           std)
    get_preset(preset)  # fail early on a bad preset
    local_views = _check_local_views(local_views, local_size)
    if resize_method not in RESIZE_METHODS:
        raise ValueError(f"resize_method={resize_method!r}; choose one of {list(RESIZE_METHODS)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be positive")
    if int(shuffle_buffer) < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer!r} must be >= 0")
    pipeline_id = 0
    per_replica = int(batch_size)
    if input_context is not None:
        per_replica = input_context.get_per_replica_batch_size(int(batch_size))
        pipeline_id = int(input_context.input_pipeline_id)
        if input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, pipeline_id)
    if native[0] is None or native[1] is None:
        ds = ds.map(lambda img: stage_variable_size(img, image_size),
                    num_parallel_calls=AUTOTUNE)
    if shuffle_buffer:
        ds = ds.shuffle(int(shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(per_replica, drop_remainder=True, num_parallel_calls=AUTOTUNE)
    # One key per batch from a stream that is fixed by `seed` but re-drawn on every pass
    # (rerandomize_each_iteration), so epochs differ while runs stay reproducible. It is
    # attached to the batch before the parallel map, so map order cannot change which batch
    # gets which randomness.
    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    base = tf.constant([seed, pipeline_id], tf.int64)
    work_channels = 1 if (native[2] == 1 and channels == 3) else channels
    view_fn = make_view_fn(preset, mean, std, channels, image_size, jit_compile, local_views,
                           local_size, local_config)
    # "resize": the crop resamples native -> S itself; "pad" pads first, then crops S -> S.
    convert_size = image_size if resize_method == "pad" else None

    def make_views(images, key):
        batch_seed = tf.random.experimental.stateless_fold_in(base, key)
        x = convert_images(images, convert_size, work_channels, resize_method)
        views = view_fn(x, batch_seed)
        if not local_views:
            return views
        return {"view1": views[0], "view2": views[1], "local_views": views[2]}

    ds = tf.data.Dataset.zip((ds, keys)).map(make_views, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def eval_dataset(ds, batch_size: int = 256, image_size: Optional[int] = None,
                 channels: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None,
                 resize_method: str = "resize") -> tf.data.Dataset:
    """Evaluation input: `(x, y)` batches (or `x` for image-only data), no augmentation.

    The same `convert_images` as pretraining (variable-size images: the 256/224 resize and
    centre crop), then normalisation. Keeps the last, smaller batch; order is preserved.
    `mean`/`std` default to no normalisation; pass `DatasetSplits.mean/std`.
    """
    if not isinstance(ds, tf.data.Dataset):
        raise ValueError(f"expected a tf.data.Dataset, got {type(ds).__name__}")
    spec = ds.element_spec
    labelled = isinstance(spec, tuple)
    img_spec = spec[0] if labelled else spec
    native = tuple(img_spec.shape)
    if image_size is None:
        if native[0] is None or native[0] != native[1]:
            raise ValueError(f"image_size is required for non-square or variable-size images "
                             f"(native shape {native})")
        image_size = native[0]
    image_size = int(image_size)
    channels = int(channels if channels is not None else native[2])
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be positive")
    mean = (0.0,) if mean is None else mean
    std = (1.0,) if std is None else std
    mean, std = normalization_stats(mean, std, channels)

    if native[0] is None or native[1] is None:
        def stage(*parts):
            img = tf.image.resize_with_crop_or_pad(
                stage_variable_size(parts[0], image_size), image_size, image_size)
            return (img,) + tuple(parts[1:]) if labelled else img
        ds = ds.map(stage, num_parallel_calls=AUTOTUNE)

    def prepare(*parts):
        x = normalize(convert_images(parts[0], image_size, channels, resize_method), mean, std)
        return (x,) + tuple(parts[1:]) if labelled else x

    return ds.batch(int(batch_size)).map(prepare, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
