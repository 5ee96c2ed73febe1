"""Heads (projector / MLP) and losses (normalised MSE, negative cosine, symmetric)."""
import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_ncssl import heads, losses


# ---------------------------------------------------------------------------------------------
# heads

def _layer_types(model):
    return [type(l).__name__ for l in model.layers]


def test_projector_defaults_follow_directpred_code():
    proj = heads.projector(512)
    assert proj.name == "projector"
    assert proj.output_shape == (None, 128)
    assert _layer_types(proj) == ["Dense", "BatchNormalization", "ReLU", "Dense"]
    linear0, bn, _, linear1 = proj.layers
    assert linear0.use_bias and linear1.use_bias and linear0.units == 512
    # [LM] MLPHead: BatchNorm1d(affine=False), torch momentum 0.1 / eps 1e-5.
    assert not bn.center and not bn.scale
    assert bn.momentum == pytest.approx(0.9) and bn.epsilon == pytest.approx(1e-5)
    trainable = sum(int(np.prod(v.shape)) for v in proj.trainable_weights)
    assert trainable == 512 * 512 + 512 + 512 * 128 + 128


def test_projector_options():
    byol = heads.projector(2048, hidden_dim=4096, output_dim=256, bn_affine=True,
                           synchronized_bn=True, name="byol_projector")
    bn = byol.layers[1]
    assert bn.center and bn.scale and bn.synchronized
    assert byol.output_shape == (None, 256) and byol.name == "byol_projector"
    simsiam = heads.projector(512, hidden_dim=64, output_dim=32, num_layers=3, output_bn=True,
                              bn_affine=True)
    assert _layer_types(simsiam) == ["Dense", "BatchNormalization", "ReLU"] * 2 + [
        "Dense", "BatchNormalization"]
    single = heads.projector(16, output_dim=8, num_layers=1)
    assert _layer_types(single) == ["Dense"]


def test_mlp_head_predictor_shape_and_init(rng):
    pred = heads.mlp_head(128, 512, 128, name="predictor")
    assert pred.name == "predictor" and pred.output_shape == (None, 128)
    assert sum(int(np.prod(v.shape)) for v in pred.trainable_weights) == (
        128 * 512 + 512 + 512 * 128 + 128)
    # nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias.
    big = heads.mlp_head(400, (), 300)
    kernel, bias = (np.asarray(w) for w in big.layers[0].weights)
    bound = 1.0 / np.sqrt(400)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert abs(kernel.std() / (bound / np.sqrt(3.0)) - 1.0) < 0.03
    out = pred(rng.normal(size=(6, 128)).astype("float32"), training=True)
    assert tuple(out.shape) == (6, 128)


def test_heads_round_trip(tmp_path, rng):
    head = heads.mlp_head(16, (32, 24), 8, bn_affine=True, output_bn=True, name="h")
    for layer in head.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(size=layer.moving_mean.shape))
    path = str(tmp_path / "h.keras")
    head.save(path)
    loaded = keras.saving.load_model(path)
    x = rng.normal(size=(5, 16)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)),
                                  np.asarray(head(x, training=False)))
    assert loaded.name == "h"


@pytest.mark.parametrize("call,match", [
    (lambda: heads.projector(0), "input_dim"),
    (lambda: heads.projector(8, hidden_dim=-1), "hidden_dim"),
    (lambda: heads.projector(8, num_layers=0), "num_layers"),
    (lambda: heads.mlp_head(8, (4, 0), 2), "hidden_dims"),
    (lambda: heads.mlp_head(8, 4, 2.5), "output_dim"),
    (lambda: heads.mlp_head(8, 4, 2, bn_momentum=1.0), "bn_momentum"),
])
def test_heads_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------
# losses (numpy float64 references)

def _np_cos(p, z, eps=1e-12):
    pn = p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), eps)
    zn = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), eps)
    return np.sum(pn * zn, axis=-1)


def test_per_sample_losses_match_numpy(rng):
    p = rng.normal(size=(7, 5))
    z = rng.normal(size=(7, 5)) * 3.0
    np.testing.assert_allclose(np.asarray(losses.normalized_mse(p, z)), 2 - 2 * _np_cos(p, z),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(losses.negative_cosine(p, z)), -_np_cos(p, z),
                               rtol=1e-12, atol=1e-12)
    # normalized_mse is the squared distance of the normalised vectors ([BYOL] Eq. 2).
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(losses.normalized_mse(p, z)),
                               np.sum((pn - zn) ** 2, axis=1), rtol=1e-10)


def test_zero_vectors_give_finite_loss_and_gradient():
    p = tf.zeros((2, 4))
    z = tf.ones((2, 4))
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = tf.reduce_mean(losses.normalized_mse(p, z))
    grad = tape.gradient(loss, p)
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(2.0)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("kind", ["byol", "simsiam"])
def test_symmetric_loss_value_and_gradients(kind, rng):
    b, d = 6, 4
    p1, p2, z1, z2 = (rng.normal(size=(b, d)) for _ in range(4))
    if kind == "byol":
        expected = np.mean(2 - 2 * _np_cos(p1, z2)) + np.mean(2 - 2 * _np_cos(p2, z1))
        weight = 2.0  # d/dp (2 - 2cos) = -2 dcos/dp; directions summed
    else:
        expected = 0.5 * np.mean(-_np_cos(p1, z2)) + 0.5 * np.mean(-_np_cos(p2, z1))
        weight = 0.5  # d/dp (-cos) = -dcos/dp; directions averaged
    tensors = [tf.constant(a, tf.float32) for a in (p1, p2, z1, z2)]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = losses.symmetric_loss(kind, *tensors)
    grads = tape.gradient(loss, tensors)
    assert loss.shape == () and loss.dtype == tf.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # No gradient reaches the targets (stop_gradient inside).
    assert grads[2] is None and grads[3] is None
    # dcos(p, z)/dp = (z_hat - cos p_hat) / ||p||, averaged over the batch.
    p_norm = np.linalg.norm(p1, axis=1, keepdims=True)
    z_hat = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    dcos = (z_hat - _np_cos(p1, z2)[:, None] * p1 / p_norm) / p_norm
    np.testing.assert_allclose(np.asarray(grads[0]), -weight * dcos / b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["byol", "simsiam"])
def test_multi_crop_loss_averages_every_pair_against_both_global_targets(kind, rng):
    b, d, m = 5, 4, 3
    p1, p2, z1, z2 = (rng.normal(size=(b, d)) for _ in range(4))
    q = [rng.normal(size=(b, d)) for _ in range(m)]
    per = (lambda p, z: 2 - 2 * _np_cos(p, z)) if kind == "byol" else (lambda p, z: -_np_cos(p, z))
    weight = 1.0 if kind == "byol" else 0.5
    pairs = [(p1, z2), (p2, z1)] + [(qm, z) for qm in q for z in (z1, z2)]
    expected = weight * 2.0 / len(pairs) * sum(np.mean(per(p, z)) for p, z in pairs)
    tensors = [tf.constant(a) for a in (p1, p2, z1, z2)]
    local = [tf.constant(a) for a in q]
    with tf.GradientTape() as tape:
        tape.watch(local)
        loss = losses.symmetric_loss(kind, *tensors, local_predictions=local)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-10)
    assert all(g is not None for g in tape.gradient(loss, local))  # the locals are trained
    # No local views: exactly the two-view loss.
    assert float(losses.symmetric_loss(kind, *tensors, local_predictions=())) == float(losses.symmetric_loss(kind, *tensors))


def test_float16_inputs_give_float32_loss(rng):
    arrays = [rng.normal(size=(8, 16)).astype("float16") for _ in range(4)]
    for kind in ("byol", "simsiam"):
        loss = losses.symmetric_loss(kind, *[tf.constant(a) for a in arrays])
        assert loss.dtype == tf.float32
        p1, p2, z1, z2 = (a.astype("float64") for a in arrays)
        if kind == "byol":
            ref = np.mean(2 - 2 * _np_cos(p1, z2)) + np.mean(2 - 2 * _np_cos(p2, z1))
        else:
            ref = -0.5 * (np.mean(_np_cos(p1, z2)) + np.mean(_np_cos(p2, z1)))
        # Computing in float16 would be off by ~1e-3.
        np.testing.assert_allclose(float(loss), ref, rtol=1e-6, atol=1e-6)
    per_sample = losses.normalized_mse(tf.constant(arrays[0]), tf.constant(arrays[1]))
    assert per_sample.dtype == tf.float32


def test_symmetric_loss_unknown_kind():
    x = tf.ones((2, 3))
    with pytest.raises(ValueError, match="'mse'.*byol"):
        losses.symmetric_loss("mse", x, x, x, x)
    assert set(losses.LOSSES) == {"byol", "simsiam"}
