"""Streaming linear probe: SGD on frozen features over tf.data, for splits whose features do not
fit in memory (ImageNet: 1.28 M x 2048 float32 = 10.5 GB).

The protocol of :func:`keras_ncssl.evaluation.linear_probe`, solved by minibatch SGD instead of
full-batch L-BFGS, as the linear evaluation of BYOL (Grill et al. 2020, C.1) and DirectPred
(Tian et al. 2021) is: features from the frozen encoder (``training=False``), standardised with
the training split's mean/std (one streaming pass, float64 sums), multinomial logistic
regression

    f_l2(W, b) = E_i [CE(x_i W + b, y_i)] + l2/2 ||W||^2

for every L2 strength of the grid at once (one linear head per strength on the same features:
the encoder's forward pass, the cost at this scale, is shared), the strength chosen on the
validation split and the test split scored once, with the chosen head. Nothing but one batch
of features is ever held. Training runs under the given ``tf.distribute`` strategy through
``keras.Model.fit``.

Unlike the in-memory probe there is no gradient tolerance: SGD runs a fixed number of epochs
(momentum 0.9, cosine learning rate), and the result reports each head's final training loss.
"""
import time

import keras
import numpy as np
import tensorflow as tf

from keras_ncssl.evaluation.features import make_feature_fn, resolve_encoder
from keras_ncssl.evaluation.probe import DEFAULT_L2_GRID, _check_grid

# Feature bytes (float32, train + validation + test) above which the runner streams.
DEFAULT_FEATURE_MEMORY_BUDGET = 4 << 30


def feature_bytes(num_examples, feature_dim):
    """Bytes of float32 features for ``num_examples`` images of ``feature_dim`` features."""
    return 4 * int(num_examples) * int(feature_dim)


def needs_streaming(num_examples, feature_dim, budget_bytes=DEFAULT_FEATURE_MEMORY_BUDGET):
    """True when the features of ``num_examples`` images would exceed ``budget_bytes``."""
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be positive; got {budget_bytes!r}")
    return feature_bytes(num_examples, feature_dim) > budget_bytes


def _feature_statistics(feature_fn, train):
    """(mean, std, count) of the training split's features in one pass (float64 sums), with
    :class:`Standardizer`'s floor for constant features."""
    count, total, total_sq = 0, 0.0, 0.0
    for images, _ in train:
        f = feature_fn(images).numpy().astype(np.float64)
        count += len(f)
        total = total + f.sum(axis=0)
        total_sq = total_sq + (f * f).sum(axis=0)
    if count == 0:
        raise ValueError("train is empty: no batches to compute feature statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    floor = 1e-6 * max(float(std.mean()), 1e-12)
    return mean, np.where(std > floor, std, 1.0), count


class _MultiHeadLoss(keras.losses.Loss):
    """Sum over heads of the mean cross-entropy; y_pred is [B, heads, K] logits."""

    def call(self, y_true, y_pred):
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        heads = tf.shape(y_pred)[1]
        labels = tf.repeat(labels[:, None], heads, axis=1)
        per_head = tf.keras.losses.sparse_categorical_crossentropy(labels, y_pred,
                                                                    from_logits=True)
        return tf.reduce_sum(per_head, axis=1)


def _probe_model(encoder, feature_dim, mean, std, num_classes, grid):
    """images -> frozen encoder (training=False) -> standardise -> one Dense head per L2."""
    encoder = resolve_encoder(encoder)
    feature_fn = make_feature_fn(encoder)
    images = keras.Input(shape=encoder.input_shape[1:] if hasattr(encoder, "input_shape")
                         else (None,))
    features = keras.layers.Lambda(lambda x: tf.stop_gradient(feature_fn(x)),
                                   output_shape=(feature_dim,))(images)
    standardised = keras.layers.Lambda(
        lambda f: (f - mean.astype(np.float32)) / std.astype(np.float32),
        output_shape=(feature_dim,))(features)
    # keras' L2(c) adds c ||W||^2 to the batch's mean loss: c = l2 / 2 per head.
    heads = [keras.layers.Dense(num_classes, kernel_initializer="zeros",
                                kernel_regularizer=keras.regularizers.L2(l2 / 2),
                                name=f"head_{i}")(standardised) for i, l2 in enumerate(grid)]
    logits = keras.layers.Lambda(lambda hs: tf.stack(hs, axis=1),
                                 output_shape=(len(grid), num_classes))(heads)
    return keras.Model(images, logits)


def _predict_heads(model, data):
    """(argmax class per head [N, heads], labels [N]) over a batched dataset."""
    predictions, labels = [], []
    for images, batch_labels in data:
        predictions.append(np.argmax(model(images, training=False).numpy(), axis=-1))
        labels.append(np.reshape(np.asarray(batch_labels), [-1]))
    return np.concatenate(predictions), np.concatenate(labels)


def streaming_linear_probe(encoder, train, val, test, *, num_classes, l2_grid=DEFAULT_L2_GRID,
                           epochs=30, batch_size=256, learning_rate=0.1, shuffle_buffer=10000,
                           seed=0, strategy=None):
    """Validation-selected linear probe on frozen features, trained by SGD over tf.data.

    Args:
        encoder: a model with ``.encoder`` or an encoder mapping normalised images to pooled
            features [B, D]. Under a multi-replica ``strategy`` it must have been built in
            that strategy's scope (the runner's is).
        train, val, test: *batched* ``tf.data`` datasets of ``(images, labels)``, labels
            class ids in 0..num_classes-1 (e.g. ``augment.eval_dataset``); ``train`` is
            unbatched, shuffled with ``shuffle_buffer`` and ``seed`` and rebatched to
            ``batch_size`` every epoch.
        num_classes: number of classes.
        l2_grid: per-sample L2 strengths, one head each (the in-memory probe's meaning).
        epochs, learning_rate: SGD (momentum 0.9) with a cosine decay from ``learning_rate``
            to 0 over all steps; the lr is for standardised features and the batch's mean loss.
        strategy: a ``tf.distribute.Strategy`` (default: the current one).

    Returns:
        dict with ``top1`` (test), ``l2`` (chosen), ``val_top1`` ({l2: accuracy}),
        ``train_loss_sum_over_heads`` (the last epoch's mean loss summed over the heads,
        regularisers included), ``epochs``, ``method``
        ("streaming_sgd"), ``converged`` (None: SGD has no gradient tolerance),
        ``seconds``.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("num_classes", num_classes), ("shuffle_buffer", shuffle_buffer)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate!r}")
    for name, data in (("train", train), ("val", val), ("test", test)):
        if not isinstance(data, tf.data.Dataset):
            raise ValueError(f"{name} must be a batched tf.data.Dataset of (images, labels); got "
                             f"{type(data).__name__}. For arrays use linear_probe.")
    grid = _check_grid(l2_grid)
    strategy = strategy or tf.distribute.get_strategy()
    start = time.perf_counter()

    feature_fn = make_feature_fn(encoder)
    mean, std, examples = _feature_statistics(feature_fn, train)
    stream = (train.unbatch().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
              .batch(batch_size).repeat().prefetch(tf.data.AUTOTUNE))
    steps_per_epoch = -(-examples // batch_size)
    with strategy.scope():
        model = _probe_model(encoder, len(mean), mean, std, int(num_classes), grid)
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate,
                                                          epochs * steps_per_epoch)
        model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
                      loss=_MultiHeadLoss())
    history = model.fit(stream, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False,
                        verbose=0)
    last_loss = float(history.history["loss"][-1])

    predictions, labels = _predict_heads(model, val)
    val_top1 = {l2: float(np.mean(predictions[:, i] == labels)) for i, l2 in enumerate(grid)}
    best = 0
    for i in range(1, len(grid)):
        if val_top1[grid[i]] > val_top1[grid[best]]:
            best = i
    # The only use of the test split.
    predictions, labels = _predict_heads(model, test)
    return {
        "top1": float(np.mean(predictions[:, best] == labels)),
        "l2": grid[best],
        "val_top1": val_top1,
        "train_loss_sum_over_heads": last_loss,
        "epochs": int(epochs),
        "method": "streaming_sgd",
        "converged": None,
        "seconds": time.perf_counter() - start,
    }


def evaluate_encoder_streaming(encoder, train, val, test, *, num_classes, l2_grid=DEFAULT_L2_GRID,
                               epochs=30, strategy=None):
    """:func:`streaming_linear_probe` with :func:`evaluate_features`' keys, for the runner.

    kNN and the few-label probe need the training split's features in memory, so their keys
    are None here and ``skipped`` says why.
    """
    result = streaming_linear_probe(encoder, train, val, test, num_classes=num_classes,
                                    l2_grid=l2_grid, epochs=epochs, strategy=strategy)
    return {
        "linear_probe_top1": result["top1"],
        "linear_probe_l2": result["l2"],
        "linear_probe_val_top1": result["val_top1"],
        "linear_probe_converged": None,
        "linear_probe_method": result["method"],
        "linear_probe_epochs": result["epochs"],
        "linear_probe_train_loss_sum_over_heads": result["train_loss_sum_over_heads"],
        "knn_top1": None,
        "few_label_top1_mean": None,
        "skipped": "kNN and few-label probe: the features exceed the memory budget",
        "seconds": {"linear_probe": result["seconds"]},
    }
