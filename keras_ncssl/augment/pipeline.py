"""tf.data pipelines: `pretrain_dataset` (two views per element, or 2 + M) and `eval_dataset`."""
from typing import Optional, Sequence

import tensorflow as tf

from keras_ncssl.augment.config import PresetLike, ViewConfig, get_preset
from keras_ncssl.augment.convert import (RESIZE_METHODS, convert_images, normalization_stats, normalize,
                                         stage_variable_size)
from keras_ncssl.augment.views import check_local_views, make_view_fn

AUTOTUNE = tf.data.AUTOTUNE


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
    local_views = check_local_views(local_views, local_size)
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
