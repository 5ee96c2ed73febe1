"""Frozen-encoder features: which encoder to call, how (`training=False`), in batches."""
import inspect

import keras
import numpy as np
import tensorflow as tf

from keras_ncssl.evaluation.blocks import block_count


def resolve_encoder(model_or_encoder):
    """The encoder of a BYOL/SimSiam model (anything with ``.encoder``), or the argument itself.

    Evaluating the online encoder, never the EMA target (lightly#1471), is the caller's
    contract with the models: ``model.encoder`` is the online one.
    """
    encoder = getattr(model_or_encoder, "encoder", None)
    if encoder is not None:
        return encoder
    if callable(model_or_encoder):
        return model_or_encoder
    raise ValueError(
        f"model_or_encoder={model_or_encoder!r} is neither a model with an `.encoder` attribute "
        "nor a callable encoder; pass a BYOL/SimSiam model, a keras.Model or a layer.")


def _accepts_training(fn):
    if isinstance(fn, keras.layers.Layer):
        return True
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "training" or p.kind is p.VAR_KEYWORD for p in parameters)


def make_feature_fn(encoder, blocks=None):
    """A compiled ``images -> float32 features`` function calling ``encoder`` in inference mode.

    Built once and reused (e.g. by :class:`KNNMonitor` every epoch) so the encoder is traced
    once per input shape rather than once per call. ``reduce_retracing`` stops a last,
    smaller batch from adding a second trace per epoch.

    ``blocks``: the batch is split into this many row blocks, each a separate encoder call in
    the same graph, so that they run side by side where ops get one intra-op thread each
    (:mod:`keras_ncssl.evaluation.blocks`; None picks the count from the thread pools). In
    inference mode every row's features depend on that row alone, so blocks change nothing
    but the schedule.
    """
    encoder = resolve_encoder(encoder)
    pass_training = _accepts_training(encoder)
    blocks = block_count() if blocks is None else int(blocks)

    def call(images):
        out = encoder(images, training=False) if pass_training else encoder(images)
        # Mixed-precision encoders return float16; probes and kNN work in float32.
        return tf.cast(out, tf.float32)

    @tf.function(reduce_retracing=True)
    def features(images):
        if blocks == 1 or images.shape.rank is None:
            return call(images)
        rows = tf.shape(images)[0]
        # Padding with zero rows up to `blocks` keeps every block non-empty (an encoder
        # need not accept an empty batch); the padded rows' features are dropped.
        extra = tf.maximum(blocks - rows, 0)
        padded = tf.pad(images, [[0, extra]] + [[0, 0]] * (images.shape.rank - 1))
        total = rows + extra
        bounds = [total * i // blocks for i in range(blocks + 1)]
        parts = [call(padded[bounds[i]:bounds[i + 1]]) for i in range(blocks)]
        return tf.concat(parts, 0)[:rows]

    return features


def as_labels(labels):
    """Labels as a vector of class ids: accepts a vector, an [N, 1] column or one-hot rows
    (reduced by argmax)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2:
        labels = labels.argmax(axis=1)  # one-hot
    if labels.ndim != 1:
        raise ValueError(f"labels must be a vector of class ids or one-hot rows; got shape "
                         f"{labels.shape}")
    return labels


def _batches(data, batch_size):
    """Yields (images, labels-or-None) batches from an array, a tuple or a batched dataset."""
    if isinstance(data, tf.data.Dataset):
        for element in data:
            if isinstance(element, dict):
                if "image" not in element:
                    raise ValueError(f"dataset dict elements need an 'image' key; got keys "
                                     f"{sorted(element)}")
                yield element["image"], element.get("label")
            elif isinstance(element, (tuple, list)):
                yield element[0], element[1] if len(element) > 1 else None
            else:
                yield element, None
        return
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"data as a tuple must be (images, labels); got {len(data)} items")
        images, labels = data
    else:
        images, labels = data, None
    images = np.asarray(images)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        yield images[start:stop], None if labels is None else labels[start:stop]


def extract_features(encoder, data, batch_size=512, feature_fn=None):
    """Frozen-encoder features of ``data``.

    Args:
        encoder: a model with ``.encoder`` or an encoder (keras.Model/layer/callable) mapping
            normalised images [B, H, W, C] to pooled features [B, D].
        data: ``(images, labels)`` numpy arrays, an images array alone, or a *batched*
            ``tf.data.Dataset`` of ``(images, labels)`` (or ``{"image", "label"}``) batches.
        batch_size: batch size for numpy inputs (datasets keep their own batching).
        feature_fn: optional result of :func:`make_feature_fn` to reuse its trace.

    Returns:
        ``(features, labels)``: float32 array [N, D] and the labels as a numpy vector (None
        when ``data`` has no labels).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    fn = make_feature_fn(encoder) if feature_fn is None else feature_fn
    features, labels = [], []
    for images, batch_labels in _batches(data, batch_size):
        out = fn(tf.convert_to_tensor(images, tf.float32)).numpy()
        if out.ndim != 2:
            raise ValueError(f"the encoder must return pooled features [batch, dim]; got shape "
                             f"{out.shape}. End it with GlobalAveragePooling2D or Flatten.")
        features.append(out)
        if batch_labels is not None:
            labels.append(np.asarray(batch_labels))
    if not features:
        raise ValueError("data is empty: no batches to extract features from")
    labels = as_labels(np.concatenate(labels)) if labels else None
    return np.concatenate(features).astype(np.float32, copy=False), labels


def check_split(split, name):
    """A ``(features [N, D], labels)`` tuple as (float32 features, label vector), checked.

    ``name`` names the split in the error (e.g. "train"). Raises ValueError for a non-tuple,
    non-2-D features, or a row/label count mismatch or empty split.
    """
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise ValueError(f"{name} must be a (features, labels) tuple; got {type(split).__name__}")
    x = np.asarray(split[0], dtype=np.float32)
    y = as_labels(split[1])
    if x.ndim != 2:
        raise ValueError(f"{name} features must be 2-D [N, D]; got shape {x.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{name}: {len(x)} feature rows and {len(y)} labels; need equal, > 0")
    return x, y


def accuracy(predictions, labels):
    """Top-1 accuracy: the fraction of ``predictions`` equal to ``labels`` (a float)."""
    return float(np.mean(predictions == labels))
