"""View configurations (`ViewConfig`), the named presets and `--augment_options` parsing."""
import dataclasses
from typing import Dict, Tuple, Union


def check_range(name, value, low, high, pair=False):
    """``value`` in [low, high] (``pair``: a (min, max) pair inside it); ValueError naming ``name``
    otherwise. Shared by ViewConfig and the crop sampler."""
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
        check_range("crop_scale", self.crop_scale, 1e-6, 1.0, pair=True)
        check_range("crop_ratio", self.crop_ratio, 1e-3, 1e3, pair=True)
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob",
                     "solarize_prob", "solarize_threshold", "blur_kernel_fraction",
                     "erase_prob", "erase_value"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation"):
            check_range(name, getattr(self, name), 0.0, 10.0)
        check_range("hue", self.hue, 0.0, 0.5)
        check_range("blur_sigma", self.blur_sigma, 1e-3, 100.0, pair=True)
        check_range("erase_scale", self.erase_scale, 1e-6, 1.0, pair=True)
        check_range("erase_ratio", self.erase_ratio, 1e-3, 1e3, pair=True)


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
