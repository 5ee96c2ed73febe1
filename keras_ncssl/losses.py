"""BYOL and SimSiam losses (ALGORITHMS.md §1).

Per-sample losses take predictions p and targets z of shape (batch, dim) and return shape
(batch,). They compute in float32 (float64 inputs stay float64) so that a mixed-precision model
(float16/bfloat16 activations) gets an accurate loss; this is the "keep the predictor path in
float32" rule of PITFALLS.md.
"""
import keras
import tensorflow as tf
from keras import ops

__all__ = ["LOSSES", "DIRECTION_WEIGHTS", "l2_normalize", "normalized_mse", "negative_cosine",
           "symmetric_loss", "projection_std"]

# torch.nn.functional.normalize's default: x / max(||x||, eps).
DEFAULT_EPSILON = 1e-12


def _as_float(x):
    x = ops.convert_to_tensor(x)
    if keras.backend.standardize_dtype(x.dtype) in ("float32", "float64"):
        return x
    return ops.cast(x, "float32")


def l2_normalize(x, epsilon=DEFAULT_EPSILON):
    """x / max(||x||_2, epsilon) along the last axis, in at least float32.

    Written as x * rsqrt(max(sum x^2, epsilon^2)) (PyTorch `F.normalize` semantics), which has a
    finite gradient at x = 0.
    """
    if not epsilon > 0:
        raise ValueError(f"l2_normalize: epsilon={epsilon!r} must be > 0.")
    x = _as_float(x)
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(ops.maximum(squared, ops.cast(epsilon, x.dtype) ** 2))


def _cosine(p, z, epsilon):
    p, z = _as_float(p), _as_float(z)
    if keras.backend.standardize_dtype(p.dtype) != keras.backend.standardize_dtype(z.dtype):
        # float32 vs float64: compute in float64.
        p, z = ops.cast(p, "float64"), ops.cast(z, "float64")
    return ops.sum(l2_normalize(p, epsilon) * l2_normalize(z, epsilon), axis=-1)


def normalized_mse(p, z, epsilon=DEFAULT_EPSILON):
    """BYOL loss per sample: ||p/||p|| - z/||z||||^2 = 2 - 2 cos(p, z) ([BYOL] Eq. 2)."""
    return 2.0 - 2.0 * _cosine(p, z, epsilon)


def negative_cosine(p, z, epsilon=DEFAULT_EPSILON):
    """SimSiam loss per sample: D(p, z) = -cos(p, z) ([SimSiam] Eq. 1)."""
    return -_cosine(p, z, epsilon)


# kind -> per-sample loss; DIRECTION_WEIGHTS[kind] multiplies each of the two view directions.
LOSSES = {"byol": normalized_mse, "simsiam": negative_cosine}
# [BYOL] sums the two directions (L + L~); [SimSiam] averages them (1/2 D(p1,z2) + 1/2 D(p2,z1)).
DIRECTION_WEIGHTS = {"byol": 1.0, "simsiam": 0.5}


def symmetric_loss(kind, p1, p2, z1, z2, epsilon=DEFAULT_EPSILON, local_predictions=()):
    """Symmetrised scalar loss over the two views, optionally with multi-crop local views.

    byol:    mean_b L(p1, sg z2) + mean_b L(p2, sg z1), L = normalized_mse   ([BYOL] §3.2)
    simsiam: 0.5 mean_b D(p1, sg z2) + 0.5 mean_b D(p2, sg z1), D = -cos    ([SimSiam] Eq. 2)

    p1, p2 are the online predictions of views 1 and 2; z1, z2 the target projections (BYOL:
    target network; SimSiam: the online projections). The z's are wrapped in stop_gradient here
    (for BYOL too), so no gradient reaches them whatever the caller did.

    Multi-crop ([SwAV] Caron et al. 2020, as BYOL runs it in solo-learn): the predictions q_m
    of M local views are each compared with both global targets, and every term is averaged
    over the 2 + 2M (prediction, target) pairs, rescaled to the two-view loss:

        loss = w * 2 / (2 + 2M) * [L(p1, z2) + L(p2, z1) + sum_m (L(q_m, z1) + L(q_m, z2))]

    (w = 1 for byol, 0.5 for simsiam), so M = 0 is the loss above and the loss (and hence the
    gradient scale a learning rate was tuned for) does not grow with M. (solo-learn sums the
    pairs instead.)

    Returns a float32 (or float64 for float64 inputs) scalar.
    """
    if kind not in LOSSES:
        raise ValueError(
            f"symmetric_loss: unknown kind={kind!r}; allowed: {', '.join(sorted(LOSSES))}.")
    fn, weight = LOSSES[kind], DIRECTION_WEIGHTS[kind]
    z1, z2 = ops.stop_gradient(z1), ops.stop_gradient(z2)
    total = ops.mean(fn(p1, z2, epsilon)) + ops.mean(fn(p2, z1, epsilon))
    for q in local_predictions:
        total = total + ops.mean(fn(q, z1, epsilon)) + ops.mean(fn(q, z2, epsilon))
    return weight * total * (2.0 / (2.0 + 2.0 * len(local_predictions)))


def projection_std(z):
    """Mean over dimensions of the per-dimension std of l2-normalised projections.

    ~1/sqrt(d) for healthy, spread-out projections; 0 for a collapsed (constant) output
    ([BYOL]/[SimSiam]'s collapse monitor).
    """
    z = l2_normalize(z)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tf.reduce_mean(tf.math.reduce_std(z, axis=0))
    # Several replicas: the std over the global batch from all-reduced moments, so that the
    # monitor does not depend on how the batch is split (equal per-replica batches).
    moments = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                 [tf.reduce_mean(z, axis=0), tf.reduce_mean(tf.square(z), axis=0)])
    return tf.reduce_mean(tf.sqrt(tf.maximum(moments[1] - tf.square(moments[0]), 0.0)))
