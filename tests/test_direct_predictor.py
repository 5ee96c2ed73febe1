"""The DirectPredictor layer: statistics, refresh schedule, guards, precision, serialisation."""
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl.predictors import (RULES, DirectPredictor, LinearPredictor, get_predictor)

D = 8


def make(d=D, **kwargs):
    layer = DirectPredictor(**kwargs)
    layer.build((None, d))
    return layer


def batches(rng, n_steps, n=32, d=D):
    return [rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) for _ in range(n_steps)]


def reference_correlations(xs, rho):
    """Independent float64 reference: F_0 = mean(f f^T), F_k = rho F + (1 - rho) mean(f f^T)."""
    out, f = [], None
    for k, x in enumerate(xs):
        batch = x.T @ x / len(x)
        if rho is None:
            f = batch if f is None else f + (batch - f) / (k + 1)
        else:
            f = batch if f is None else rho * f + (1 - rho) * batch
        out.append(f)
    return out


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.0, None])
def test_correlation_follows_the_ema(rng, rho):
    layer = make(rho=rho)
    xs = batches(rng, 5)
    for x, expected in zip(xs, reference_correlations(xs, rho)):
        layer.update(tf.constant(x, tf.float32))
        np.testing.assert_allclose(layer.correlation.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert int(layer.num_updates.numpy()) == 5 and int(layer.step.numpy()) == 5


@pytest.mark.parametrize("freq", [1, 3])
def test_refresh_happens_exactly_when_freq_says(rng, freq):
    layer = make(freq=freq, rho=0.3, eps=0.1)
    xs = batches(rng, 8)
    refs = reference_correlations(xs, 0.3)
    kernel = np.eye(D)
    for step, (x, f) in enumerate(zip(xs, refs)):
        refreshed = bool(layer.update(tf.constant(x, tf.float32)))
        due = step % freq == 0  # the code's `niter % freq == 0`, niter from 0
        assert refreshed == due, step
        if due:
            kernel = RULES["directpred"](f, eps=0.1)
        np.testing.assert_allclose(layer.kernel.numpy(), kernel, atol=2e-5)


def test_kernel_trainable_only_between_refreshes():
    assert not make(freq=1).kernel.trainable
    assert make(freq=5).kernel.trainable
    assert all(not w.trainable for w in make(freq=5).weights if w.name != "kernel")


def test_kernel_is_aligned_with_f_after_update(rng):
    layer = make(rule="directpred")
    for x in batches(rng, 3):
        layer.update(tf.constant(x, tf.float32))
    f, kernel = layer.correlation.numpy().astype(np.float64), layer.kernel.numpy().astype(np.float64)
    assert np.linalg.norm(f @ kernel - kernel @ f) < 1e-4 * np.linalg.norm(f)


def test_call_is_x_times_kernel(rng):
    layer = make()
    layer.kernel.assign(rng.normal(size=(D, D)).astype(np.float32))
    x = rng.normal(size=(4, D)).astype(np.float32)
    np.testing.assert_allclose(layer(x).numpy(), x @ layer.kernel.numpy(), rtol=1e-5, atol=1e-6)


def test_zero_mean_uses_centred_correlation(rng):
    layer = make(zero_mean=True, rho=0.5)
    xs = [x + 3.0 for x in batches(rng, 3)]
    mean = None
    for x in xs:
        layer.update(tf.constant(x, tf.float32))
        mean = x.mean(0) if mean is None else 0.5 * mean + 0.5 * x.mean(0)
    f = reference_correlations(xs, 0.5)[-1] - np.outer(mean, mean)
    np.testing.assert_allclose(layer.statistics_for_rule()[0].numpy(), f, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.kernel.numpy(), RULES["directpred"](f, eps=0.1), atol=5e-4)


def test_predictor_ema_smooths_the_kernel(rng):
    layer = make(rule="newton_schulz", predictor_ema=0.9, eps=0.2, rho=0.0)
    x = batches(rng, 1)[0]
    layer.update(tf.constant(x, tf.float32))
    new = RULES["newton_schulz"](x.T @ x / len(x), eps=0.2)
    np.testing.assert_allclose(layer.kernel.numpy(), 0.9 * np.eye(D) + 0.1 * new, atol=1e-5)


def test_cross_correlation_rules_get_target(rng):
    layer = make(rule="lrp", rho=0.0, eps=0.0)
    x = rng.normal(size=(64, D))
    target = x @ rng.normal(size=(D, D))
    layer.update(tf.constant(x, tf.float32), tf.constant(target, tf.float32))
    expected = np.linalg.lstsq(x, target, rcond=None)[0]
    np.testing.assert_allclose(layer.kernel.numpy(), expected, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="needs target_projections"):
        layer.update(tf.constant(x, tf.float32))


def test_non_finite_statistics_are_skipped_with_a_warning(rng):
    layer = make()
    xs = batches(rng, 2)
    layer.update(tf.constant(xs[0], tf.float32))
    kernel, correlation = layer.kernel.numpy().copy(), layer.correlation.numpy().copy()
    bad = xs[1].copy()
    bad[3, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        refreshed = layer.update(tf.constant(bad, tf.float32))
    assert not bool(refreshed)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    np.testing.assert_array_equal(layer.correlation.numpy(), correlation)
    assert int(layer.num_skipped.numpy()) >= 1
    bad[3, 2] = np.inf
    compiled = tf.function(layer.update)  # inside a train_step: no crash, no NaN weights
    compiled(tf.constant(bad, tf.float32))
    assert np.all(np.isfinite(layer.kernel.numpy())) and np.all(np.isfinite(layer.correlation.numpy()))
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)


def test_non_finite_correlation_skips_refresh(rng):
    layer = make()
    layer.update(tf.constant(batches(rng, 1)[0], tf.float32))
    kernel = layer.kernel.numpy().copy()
    layer.correlation.assign(np.full((D, D), np.inf, np.float32))
    with pytest.warns(RuntimeWarning, match="refresh was skipped"):
        assert not bool(layer.refresh())
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)


def test_refresh_before_any_statistics_keeps_identity():
    layer = make()
    assert not bool(layer.refresh())
    np.testing.assert_array_equal(layer.kernel.numpy(), np.eye(D))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=1.0), r"rho must be in \[0, 1\) or None .*got 1.0"),
    (dict(rho=-0.1), r"rho must be .*got -0.1"),
    (dict(eps=-0.5), r"eps must be a finite number >= 0; got -0.5"),
    (dict(rule="direct_pred"), r"unknown predictor rule 'direct_pred'"),
    (dict(freq=0), r"freq must be an integer >= 1.*got 0"),
    (dict(freq=2.5), r"freq must be an integer >= 1.*got 2.5"),
    (dict(predictor_ema=1.0), r"predictor_ema must be in \[0, 1\); got 1.0"),
    (dict(statistics_dtype="float16"), r"statistics_dtype must be"),
    (dict(rule_options={"power": 0.5, "colour": 1}), r"rule_options .* not accepted by rule 'directpred'"),
    (dict(rule="directcopy", rule_options={"normalize": "max"}), r"normalize must be one of"),
])
def test_invalid_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DirectPredictor(**kwargs)


def test_mismatched_dims_fail_clearly(rng):
    layer = make(d=D)
    with pytest.raises(ValueError, match=r"projections must be \[batch, 8\]"):
        layer.update(tf.constant(rng.normal(size=(4, D + 1)), tf.float32))


def test_mixed_float16_keeps_statistics_in_float32(rng):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = DirectPredictor()
        x = tf.constant(rng.normal(size=(64, D)), tf.float16)
        y = layer(x)
        assert y.dtype == tf.float16
        assert layer.kernel.dtype == "float32" and layer.correlation.dtype == "float32"
        layer.update(x)
        f64 = x.numpy().astype(np.float64)
        expected = RULES["directpred"](f64.T @ f64 / 64, eps=0.1)
        np.testing.assert_allclose(layer.kernel.numpy(), expected, atol=1e-4)
    finally:
        keras.config.set_dtype_policy(previous)


def test_get_config_round_trip():
    layer = DirectPredictor(rule="directcopy", rho=None, eps=0.25, freq=5, predictor_ema=0.5,
                            zero_mean=True, rule_options={"normalize": "frobenius"}, name="p")
    clone = DirectPredictor.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert (clone.rule, clone.rho, clone.eps, clone.freq) == ("directcopy", None, 0.25, 5)


SAVE_AND_RELOAD = textwrap.dedent("""
    import sys, numpy as np, keras
    import keras_ncssl.predictors  # registers the layer for deserialisation
    model = keras.saving.load_model(sys.argv[1])
    layer = model.get_layer("predictor")
    x = np.load(sys.argv[2])
    np.savez(sys.argv[3], out=model(x).numpy(), kernel=layer.kernel.numpy(),
             correlation=layer.correlation.numpy(), step=layer.step.numpy(),
             config=str(sorted(layer.get_config().items())))
""")


@pytest.mark.slow
@pytest.mark.parametrize("rule_device", ["auto", "cpu"])
def test_saves_and_reloads_with_state_in_a_fresh_process(rng, tmp_path, rule_device):
    layer = DirectPredictor(rule="directpred", rho=0.5, eps=0.05, freq=2, rule_device=rule_device,
                            name="predictor")
    model = keras.Sequential([keras.Input((D,)), layer])
    for x in batches(rng, 3):
        layer.update(tf.constant(x, tf.float32))
    x = rng.normal(size=(5, D)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    model.save(tmp_path / "m.keras")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", SAVE_AND_RELOAD, str(tmp_path / "m.keras"),
                    str(tmp_path / "x.npy"), str(tmp_path / "out.npz")], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["out"], model(x).numpy())
    np.testing.assert_array_equal(out["kernel"], layer.kernel.numpy())
    np.testing.assert_array_equal(out["correlation"], layer.correlation.numpy())
    assert int(out["step"]) == 3
    assert str(out["config"]) == str(sorted(layer.get_config().items()))


def test_symmetric_linear_predictor_stays_symmetric(rng):
    layer = LinearPredictor(symmetric=True)
    model = keras.Sequential([keras.Input((D,)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = rng.normal(size=(32, D)), rng.normal(size=(32, D))
    model.fit(x, y, epochs=2, verbose=0)
    k = layer.kernel.numpy()
    np.testing.assert_allclose(k, k.T, atol=1e-6)
    assert np.abs(k - k.T).max() < np.abs(k).max()  # non-trivial


def test_linear_predictor_has_no_bias_and_torch_init():
    layer = LinearPredictor()
    layer.build((None, 128))
    assert [w.name for w in layer.weights] == ["kernel"]
    assert np.abs(layer.kernel.numpy()).max() <= 128 ** -0.5


def test_get_predictor_covers_every_name():
    for name in RULES:
        assert isinstance(get_predictor(name, D), DirectPredictor)
    assert isinstance(get_predictor("linear", D), LinearPredictor)
    assert get_predictor("linear_symmetric", D).symmetric
    assert isinstance(get_predictor("none", D), keras.layers.Identity)
    with pytest.raises(ValueError, match="unknown predictor 'mpl'"):
        get_predictor("mpl", D)
    with pytest.raises(ValueError, match="apply to DirectPredictor rules only"):
        get_predictor("linear", D, rho=0.3)
