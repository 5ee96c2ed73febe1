"""BYOL / SimSiam models: step order, EMA, stop-gradient, predictor statistics, saving."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import heads
from keras_ncssl.models import BYOL, SimSiam
from keras_ncssl.predictors import RULES, DirectPredictor, LinearPredictor, get_predictor

SHAPE = (8, 8, 1)
PROJ = 16


def tiny_encoder(name="encoder", shape=SHAPE):
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name=name)


def build(cls=BYOL, predictor="directpred", seed=0, shape=SHAPE, **kwargs):
    keras.utils.set_random_seed(seed)
    encoder = tiny_encoder(shape=shape)
    projector = heads.projector(8, 32, PROJ)
    pred = get_predictor(predictor, PROJ) if isinstance(predictor, str) else predictor
    model = cls(encoder, projector, pred, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def views(rng, n=16):
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    return x, (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32)


def values(variables):
    return [np.array(v.numpy(), dtype=np.float64) for v in variables]


@pytest.mark.parametrize("policy", ["batch_stats", "ema"])
def test_target_is_ema_of_new_online_weights(rng, policy):
    model = build(tau_base=0.9, tau_schedule="constant", target_batchnorm=policy)
    for target, _ in model.target_pairs():  # make target != online so the test can fail
        target.assign(target + rng.normal(size=target.shape).astype(np.float32) * 0.1)
    pairs = model.target_pairs()
    old_target = values([t for t, _ in pairs])
    old_online = values([o for _, o in pairs])
    model.train_step(views(rng))
    new_online = values([o for _, o in pairs])
    assert any(not np.allclose(a, b) for a, b in zip(old_online, new_online))
    for (target, _), old, new in zip(pairs, old_target, new_online):
        np.testing.assert_allclose(target.numpy(), 0.9 * old + 0.1 * new, rtol=1e-6, atol=1e-6)
    trainable = {id(w) for w in model.encoder.trainable_weights + model.projector.trainable_weights}
    averaged = {id(o) for _, o in pairs}
    if policy == "batch_stats":
        assert averaged == trainable  # moving statistics are not averaged
    else:
        assert averaged > trainable  # every weight, moving mean/variance included


def test_no_gradient_reaches_the_target(rng):
    model = build(tau_base=1.0, tau_schedule="constant")
    x1, x2 = views(rng)
    target_vars = model.target_encoder.weights + model.target_projector.weights
    with tf.GradientTape() as tape:
        loss, _ = model.compute_symmetric_loss(x1, x2, training=True)
    assert all(g is None for g in tape.gradient(loss, target_vars))
    averaged = [t for t, _ in model.target_pairs()]
    before = values(averaged)
    model.train_step((x1, x2))  # tau = 1: the target's parameters must not move at all
    for b, v in zip(before, values(averaged)):
        np.testing.assert_array_equal(b, v)


def test_simsiam_has_no_gradient_through_the_target_branch(rng):
    model = build(SimSiam, predictor="linear")
    x1, x2 = views(rng)
    variables = model.online_variables
    with tf.GradientTape() as tape:
        loss, (z1, z2, t1, t2) = model.compute_symmetric_loss(x1, x2, training=True)
    full = tape.gradient(loss, variables)
    # The same loss with the targets as constants computed from the same forward pass.
    t1c, t2c = tf.constant(t1.numpy()), tf.constant(t2.numpy())
    with tf.GradientTape() as tape:
        z1, z2, p1, p2 = model._online(x1, x2, True)
        d = lambda p, z: -tf.reduce_mean(tf.reduce_sum(tf.math.l2_normalize(p, -1) * tf.math.l2_normalize(z, -1), -1))  # noqa: E731
        reference = 0.5 * d(p1, t2c) + 0.5 * d(p2, t1c)
    expected = tape.gradient(reference, variables)
    assert not hasattr(model, "target_encoder")
    np.testing.assert_allclose(float(loss), float(reference), rtol=1e-5)
    for g, e in zip(full, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["directpred", "directcopy"])
def test_predictor_state_after_a_step_matches_independent_recomputation(rng, rule):
    model = build(predictor=get_predictor(rule, PROJ, rho=0.3, eps=0.1))
    for step in range(2):
        x1, x2 = views(rng)
        # online projections with the pre-step weights, as the step itself sees them
        z = np.concatenate([model.projector(model.encoder(x, training=True), training=True).numpy()
                            for x in (x1, x2)]).astype(np.float64)
        batch = z.T @ z / len(z)
        expected_f = batch if step == 0 else 0.3 * expected_f + 0.7 * batch  # noqa: F821
        model.train_step((x1, x2))
        np.testing.assert_allclose(model.predictor.correlation.numpy(), expected_f, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(model.predictor.kernel.numpy(), RULES[rule](expected_f, eps=0.1), atol=2e-4)


def _np_cos(p, z):
    return np.sum(p * z, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(z, axis=-1))


@pytest.mark.parametrize("cls", [BYOL, SimSiam])
def test_multi_crop_step_loss_and_predictor_statistics_match_a_recomputation(rng, cls):
    """Local views: each prediction is compared with both global targets, the loss averages
    the 2 + 2M pairs, and F folds one row per loss term (a local view twice)."""
    model = build(cls, predictor=get_predictor("directpred", PROJ, rho=0.3, eps=0.1), shape=(None, None, 1),
                  **({"tau_base": 0.99} if cls is BYOL else {}))
    x1, x2 = views(rng)
    local_views = tuple(rng.normal(size=(16, 4, 4, 1)).astype(np.float32) for _ in range(2))
    for step in range(2):
        def project(x):
            return model.projector(model.encoder(x, training=True), training=True).numpy().astype(np.float64)
        z1, z2 = project(x1), project(x2)
        z_local = np.split(project(np.concatenate(local_views)), 2)
        t1, t2 = ((model._target(x, True).numpy().astype(np.float64) for x in (x1, x2)) if cls is BYOL
                  else (z1, z2))
        kernel = model.predictor.kernel.numpy().astype(np.float64)
        pairs = [(z1, t2), (z2, t1)] + [(z, t) for z in z_local for t in (t1, t2)]
        per = (lambda p, t: 2 - 2 * _np_cos(p, t)) if cls is BYOL else (lambda p, t: -0.5 * _np_cos(p, t))
        expected_loss = 2.0 / len(pairs) * sum(np.mean(per(z @ kernel, t)) for z, t in pairs)
        rows = np.concatenate([z for z, _ in pairs])
        batch = rows.T @ rows / len(rows)
        expected_f = batch if step == 0 else 0.3 * expected_f + 0.7 * batch  # noqa: F821
        model.reset_metrics()  # the logged loss is then this step's, not a running mean
        logs = model.train_step({"view1": x1, "view2": x2, "local_views": local_views})
        np.testing.assert_allclose(float(logs["loss"]), expected_loss, rtol=2e-5)
        np.testing.assert_allclose(model.predictor.correlation.numpy(), expected_f, rtol=2e-4, atol=2e-6)
        np.testing.assert_allclose(model.predictor.kernel.numpy(), RULES["directpred"](expected_f, eps=0.1),
                                   atol=2e-4)


def test_multi_crop_needs_an_encoder_that_takes_the_local_size(rng):
    model = build()  # the encoder was built for 8x8 inputs
    x1, x2 = views(rng)
    data = {"view1": x1, "view2": x2, "local_views": (x1[:, :4, :4],)}
    with pytest.raises(ValueError, match=r"local views are 4x4 px but the encoder was built for 8x8 .*"
                                         r"input_shape=\(None, None, channels\)"):
        model.train_step(data)


def test_step_order_forward_uses_the_kernel_from_before_the_step(rng):
    model = build()
    x1, x2 = views(rng)
    model.train_step((x1, x2))
    kernel_before = model.predictor.kernel.numpy().copy()
    seen = []
    original = model.predictor.call
    model.predictor.call = lambda inputs: (seen.append(model.predictor.kernel.numpy().copy()), original(inputs))[1]
    model.train_step(views(rng))
    model.predictor.call = original
    np.testing.assert_array_equal(seen[0], kernel_before)
    assert not np.allclose(model.predictor.kernel.numpy(), kernel_before)


def test_metrics_and_test_step_do_not_update(rng):
    model = build()
    logs = model.train_step(views(rng))
    assert {"loss", "projection_std", "tau", "learning_rate"} <= set(logs)
    assert 0.0 < float(logs["projection_std"]) <= 1.0
    weights = values(model.weights)
    logs = model.test_step(views(rng))
    assert {"loss", "projection_std"} <= set(logs)
    for before, after in zip(weights, values(model.weights)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.slow
def test_cosine_tau_needs_the_run_length(rng):
    model = build()
    ds = tf.data.Dataset.from_tensor_slices(views(rng, 32)).batch(8)
    history = model.fit(ds, epochs=2, verbose=0)
    assert int(model.total_steps.numpy()) == 8
    taus = history.history["tau"]
    assert taus[0] < taus[1] <= 1.0
    unknown = ds.repeat().filter(lambda a, b: True)
    with pytest.raises(ValueError, match="needs the run length"):
        build().fit(unknown, epochs=1, verbose=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau_base=1.5), r"tau_base must be a number in \[0, 1\]; got 1.5"),
    (dict(tau_base=-0.1), r"tau_base .* got -0.1"),
    (dict(tau_schedule="linear"), r"tau_schedule must be one of .*'linear'"),
    (dict(target_batchnorm="frozen"), r"target_batchnorm must be one of"),
    (dict(loss="mse"), r"loss must be one of"),
    (dict(total_steps=0), r"total_steps must be a positive integer"),
])
def test_invalid_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(**kwargs)


def test_predictor_dimension_mismatch_fails_at_construction():
    wrong = DirectPredictor()
    wrong.build((None, PROJ + 4))
    with pytest.raises(ValueError, match=f"must map the projector's {PROJ} dimensions to {PROJ}"):
        build(predictor=wrong)
    mlp = heads.mlp_head(PROJ, (32,), PROJ + 1, name="predictor")
    with pytest.raises(ValueError, match=f"maps {PROJ} -> {PROJ + 1} dimensions"):
        build(predictor=mlp)


@pytest.mark.parametrize("predictor", ["linear", "linear_symmetric", "mlp", "none", "stiefel", "lrp"])
def test_every_predictor_trains(rng, predictor):
    model = build(predictor=predictor)
    for _ in range(2):
        logs = model.train_step(views(rng))
    assert np.isfinite(float(logs["loss"]))


def test_freq5_trains_the_kernel_between_refreshes(rng):
    model = build(predictor=get_predictor("directpred", PROJ, freq=5))
    assert any(v is model.predictor.kernel for v in model.online_variables)
    model.train_step(views(rng))
    refreshed = model.predictor.kernel.numpy().copy()
    model.train_step(views(rng))  # step 1: no refresh, an SGD step moves the kernel
    assert not np.allclose(model.predictor.kernel.numpy(), refreshed)


def test_forward_views_together_pools_batchnorm_statistics_over_both_views(rng):
    """In training mode the joint pass normalises with the statistics of both views, the
    per-view passes (the reference code's) with each view's own: checked against the encoder and
    projector called directly, and the two must differ (the heads have BatchNorm)."""
    joint = build(forward_views_together=True)
    per_view = build(forward_views_together=False)  # same seed: the same weights
    x1, x2 = views(rng)
    _, (z1, z2, *_) = joint.compute_symmetric_loss(x1, x2, training=True)
    _, (y1, y2, *_) = per_view.compute_symmetric_loss(x1, x2, training=True)

    def forward(model, x):
        return model.projector(model.encoder(x, training=True), training=True).numpy()

    pooled = forward(joint, np.concatenate([x1, x2]))
    np.testing.assert_allclose(z1.numpy(), pooled[:len(x1)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z2.numpy(), pooled[len(x1):], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y1.numpy(), forward(per_view, x1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2.numpy(), forward(per_view, x2), rtol=1e-5, atol=1e-5)
    assert not np.allclose(z1.numpy(), y1.numpy(), atol=1e-3)


def test_mixed_precision_step(rng):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build()
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05)))
        logs = model.train_step(views(rng))
        assert np.isfinite(float(logs["loss"]))
        assert logs["loss"].dtype == tf.float32
        assert model.predictor.correlation.dtype == "float32"
        assert model.encoder.compute_dtype == "float16"
        assert np.all(np.isfinite(model.predictor.kernel.numpy()))
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.slow
def test_xla_compiled_fit_matches_the_plain_fit_and_still_skips_non_finite_batches(rng):
    """jit_compile=True compiles the whole step (eigh included; the skip warning has no XLA
    kernel, so under XLA a skipped update is only counted) and computes the same thing."""
    x1, x2 = views(rng, 32)
    bad1 = x1.copy()
    bad1[0, 0, 0, 0] = np.nan
    results = []
    for jit in (False, True):
        model = build()
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=jit)
        model.fit(tf.data.Dataset.from_tensor_slices((x1, x2)).batch(16), epochs=1, verbose=0)
        kernel = model.predictor.kernel.numpy().copy()
        model.fit(tf.data.Dataset.from_tensor_slices((bad1[:16], x2[:16])).batch(16), epochs=1,
                  verbose=0)
        results.append((model.predictor.correlation.numpy(), kernel, model.predictor.kernel.numpy(),
                        int(model.nonfinite_steps.numpy()), int(model.predictor.num_skipped.numpy())))
    (f0, k0, _, s0, p0), (f1, k1, k1_after, s1, p1) = results
    np.testing.assert_allclose(f1, f0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(k1, k0, rtol=1e-4, atol=1e-5)
    # The NaN batch: the whole step is skipped in both (counted once, by the model).
    assert s0 == s1 == 1 and p0 == p1 == 0
    np.testing.assert_array_equal(k1_after, k1)


def own_config(config):
    """The model's own settings and the predictor's config (sub-model layer names vary)."""
    keys = ("loss", "ema", "tau_base", "tau_schedule", "total_steps", "target_batchnorm",
            "forward_views_together")
    predictor = {k: v for k, v in config["predictor"]["config"].items() if k != "dtype"}
    return sorted((k, str(config[k])) for k in keys) + sorted((k, str(v)) for k, v in predictor.items())


RELOAD = textwrap.dedent("""
    import json, sys, numpy as np, keras
    import keras_ncssl  # registers the custom objects
    model = keras.saving.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    p = model.predictor
    np.savez(sys.argv[3], features=model(x).numpy(), kernel=p.kernel.numpy(),
             correlation=p.correlation.numpy(), step=p.step.numpy(),
             target=model.target_encoder.weights[0].numpy(), total_steps=model.total_steps.numpy(),
             config=json.dumps(model.get_config(), default=str))
""")


@pytest.mark.slow
def test_save_and_reload_in_a_fresh_process(rng, tmp_path):
    model = build(tau_schedule="constant")
    for _ in range(2):
        model.train_step(views(rng))
    x = views(rng, 4)[0]
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "byol.keras")
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "byol.keras"), str(tmp_path / "x.npy"),
                    str(tmp_path / "out.npz")], check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["features"], model(x).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["kernel"], model.predictor.kernel.numpy())
    np.testing.assert_array_equal(out["correlation"], model.predictor.correlation.numpy())
    np.testing.assert_array_equal(out["target"], model.target_encoder.weights[0].numpy())
    assert int(out["step"]) == 2
    reloaded = json.loads(str(out["config"]))
    assert own_config(reloaded) == own_config(json.loads(json.dumps(model.get_config(), default=str)))


def test_symmetric_linear_predictor_via_model(rng):
    model = build(predictor=LinearPredictor(symmetric=True, name="predictor"))
    model.train_step(views(rng))
    k = model.predictor.kernel.numpy()
    np.testing.assert_allclose(k, k.T, atol=1e-6)


def test_spectrum_monitor_warns_below_the_collapse_threshold_of_the_projection_dim():
    import warnings

    from keras_ncssl.callbacks import SpectrumMonitor
    from keras_ncssl.diagnostics import collapse_threshold
    monitor = SpectrumMonitor(every_n_epochs=100)  # default threshold: 0.1/sqrt(PROJ) = 0.025
    monitor.set_model(build())
    threshold = collapse_threshold(PROJ)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.on_epoch_end(0, {"projection_std": 1.01 * threshold})
        assert not [w for w in caught if "collapsing" in str(w.message)]
        monitor.on_epoch_end(1, {"projection_std": 0.99 * threshold})
    assert [w for w in caught if "collapsing" in str(w.message) and "0.025" in str(w.message)]
