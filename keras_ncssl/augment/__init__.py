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

Modules: `config` (ViewConfig, presets, option strings), `convert` (input geometry and
normalisation), `geometry` (random parameters, separable crop/flip/blur), `views` (colour ops,
erasing, the view functions, multi-crop), `pipeline` (tf.data). Everything public is importable
from `keras_ncssl.augment`.
"""
import importlib

# Public name -> the module that defines it; imported on first use (PEP 562), so that the
# option parser in `config` is usable without starting TensorFlow (experiments/runner_flags.py).
_MODULES = {
    "config": ("PRESETS", "PresetLike", "ViewConfig", "get_preset", "parse_view_options", "with_view_options"),
    "convert": ("RESIZE_METHODS", "convert_images", "normalization_stats", "normalize", "stage_variable_size"),
    "geometry": ("apply_separable", "blur_matrix", "resample_matrix", "sample_crop_boxes"),
    "pipeline": ("AUTOTUNE", "eval_dataset", "pretrain_dataset"),
    "views": ("LOCAL_CROP_SCALE", "apply_view", "augment_batch", "blur_kernel_size", "erase_mask",
              "local_view_config", "make_view_fn", "sample_view_params", "two_views"),
}
_NAMES = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "AUTOTUNE", "LOCAL_CROP_SCALE", "PRESETS", "PresetLike", "RESIZE_METHODS", "ViewConfig",
    "apply_separable", "apply_view", "augment_batch", "blur_kernel_size", "blur_matrix",
    "convert_images", "erase_mask", "eval_dataset", "get_preset", "local_view_config",
    "make_view_fn", "normalization_stats", "normalize", "parse_view_options", "pretrain_dataset",
    "resample_matrix", "sample_crop_boxes", "sample_view_params", "stage_variable_size",
    "two_views", "with_view_options",
]


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"keras_ncssl.augment.{_NAMES[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"keras_ncssl.augment.{name}")
    raise AttributeError(f"module 'keras_ncssl.augment' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_NAMES) + list(_MODULES))
