"""Optimizers (coupled-L2 SGD, LARS) and schedules (EMA tau, warm-up cosine) vs numpy float64."""
import math

import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_ncssl import distribute, optimizers, schedules
from keras_ncssl.optimizers import LARS, SGD
from keras_ncssl.schedules import WarmupCosine, ema_tau


# ---------------------------------------------------------------------------------------------
# schedules

def test_ema_tau_cosine_values():
    k_total = 1000
    assert float(ema_tau(0, k_total, 0.996)) == pytest.approx(0.996, abs=1e-7)
    assert float(ema_tau(500, k_total, 0.996)) == pytest.approx(1 - 0.004 / 2, abs=1e-7)
    assert float(ema_tau(1000, k_total, 0.996)) == pytest.approx(1.0, abs=1e-7)
    assert float(ema_tau(5000, k_total, 0.996)) == pytest.approx(1.0, abs=1e-7)  # clipped
    k = 250
    expected = 1 - (1 - 0.99) * (math.cos(math.pi * k / k_total) + 1) / 2
    assert float(ema_tau(k, k_total, 0.99)) == pytest.approx(expected, abs=1e-7)


def test_ema_tau_constant_and_tensor_step():
    assert float(ema_tau(123, 1000, 0.996, schedule="constant")) == pytest.approx(0.996)

    @tf.function
    def traced(step):
        return ema_tau(step, 100, 0.9)

    for k in (0, 37, 100):
        expected = 1 - 0.1 * (math.cos(math.pi * k / 100) + 1) / 2
        assert float(traced(tf.constant(k, tf.int64))) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau_base=1.5), "tau_base=1.5"),
    (dict(tau_base=-0.1), "tau_base=-0.1"),
    (dict(schedule="linear"), "'linear'.*cosine.*constant"),
    (dict(total_steps=0), "total_steps=0"),
])
def test_ema_tau_invalid_arguments(kwargs, match):
    args = dict(step=0, total_steps=10, tau_base=0.99, schedule="cosine")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ema_tau(**args)


def _np_warmup_cosine(k, peak, total, warmup, end, constant=False):
    if k < warmup:
        return peak * k / warmup
    if constant:
        return peak
    progress = min(max((k - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kwargs,end", [
    (dict(peak_lr=0.3, total_steps=50, warmup_steps=10), 0.0),
    (dict(peak_lr=0.3, total_steps=50, warmup_steps=10, final_lr=0.01), 0.01),
    (dict(peak_lr=0.3, total_steps=50, warmup_steps=0, alpha=0.1), 0.03),
    (dict(peak_lr=0.3, total_steps=50, warmup_steps=10, constant=True), None),
])
def test_warmup_cosine_matches_numpy(kwargs, end):
    schedule = WarmupCosine(**kwargs)
    for k in range(0, 60):
        expected = _np_warmup_cosine(k, kwargs["peak_lr"], kwargs["total_steps"],
                                     kwargs["warmup_steps"], end,
                                     constant=kwargs.get("constant", False))
        assert float(schedule(k)) == pytest.approx(expected, rel=1e-5, abs=1e-7), k


def test_warmup_cosine_serialisation_round_trip():
    schedule = WarmupCosine(0.5, 100, warmup_steps=7, alpha=0.2)
    restored = keras.optimizers.schedules.deserialize(
        keras.optimizers.schedules.serialize(schedule))
    assert isinstance(restored, WarmupCosine)
    assert restored.get_config() == schedule.get_config()
    for k in (0, 3, 7, 50, 100, 120):
        assert float(restored(k)) == pytest.approx(float(schedule(k)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(peak_lr=-1.0, total_steps=10), "peak_lr"),
    (dict(peak_lr=0.1, total_steps=0), "total_steps"),
    (dict(peak_lr=0.1, total_steps=10, warmup_steps=11), "warmup_steps=11"),
    (dict(peak_lr=0.1, total_steps=10, final_lr=0.0, alpha=0.1), "not both"),
    (dict(peak_lr=0.1, total_steps=10, alpha=2.0), "alpha"),
])
def test_warmup_cosine_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(**kwargs)


# ---------------------------------------------------------------------------------------------
# optimizer fixtures and numpy references

def _net():
    """Variables with known paths: enc/{kernel,bias}, bn/{gamma,beta}, predictor/{kernel,bias}."""
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, name="enc"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(3, name="predictor"),
    ], name="net")
    return model.trainable_variables


def _paths(variables):
    return [v.path.split("/", 1)[-1] if v.path.startswith("net/") else v.path
            for v in variables]


def _random_grads(variables, steps, rng):
    return [[rng.normal(size=v.shape) for v in variables] for _ in range(steps)]


def _run(opt, variables, grads, graph=False):
    def apply(g):
        opt.apply([tf.constant(x, tf.float32) for x in g], variables)

    if graph:
        fn = tf.function(lambda g: opt.apply(g, variables))
        for g in grads:
            fn([tf.constant(x, tf.float32) for x in g])
    else:
        for g in grads:
            apply(g)
    return [np.asarray(v, dtype=np.float64) for v in variables]


def _np_reference(params, grads, lr_fn, momentum, wd, decay, mult, nesterov=False,
                  adapt=None, eta=None):
    """torch.optim.SGD (dampening 0) / BYOL LARS in float64.

    u = g + wd*w (if decay); LARS: u *= eta ||w|| / ||u|| (if adapt and both norms > 0);
    buf = m*buf + u; w -= lr*mult*(buf or u + m*buf for Nesterov).
    """
    params = [np.array(p, dtype=np.float64) for p in params]
    bufs = [np.zeros_like(p) for p in params]
    for k, step_grads in enumerate(grads):
        lr = lr_fn(k)
        for i, g in enumerate(step_grads):
            u = g + (wd * params[i] if decay[i] else 0.0)
            if adapt is not None and adapt[i]:
                w_norm, u_norm = np.linalg.norm(params[i]), np.linalg.norm(u)
                if w_norm > 0 and u_norm > 0:
                    u = u * eta * w_norm / u_norm
            bufs[i] = momentum * bufs[i] + u
            d = u + momentum * bufs[i] if nesterov else bufs[i]
            params[i] = params[i] - lr * mult[i] * d
    return params


def _init(variables, rng):
    for v in variables:
        v.assign(rng.normal(size=v.shape))
    return [np.asarray(v, dtype=np.float64) for v in variables]


# ---------------------------------------------------------------------------------------------
# SGD

def test_variable_paths_used_in_tests():
    assert _paths(_net()) == ["enc/kernel", "enc/bias", "bn/gamma", "bn/beta",
                              "predictor/kernel", "predictor/bias"]


@pytest.mark.parametrize("graph", [False, True])
def test_sgd_matches_torch_semantics(graph, rng):
    variables = _net()
    init = _init(variables, rng)
    grads = _random_grads(variables, 6, rng)
    opt = SGD(learning_rate=0.05, momentum=0.9, weight_decay=0.1)  # big wd: coupling matters
    got = _run(opt, variables, grads, graph=graph)
    want = _np_reference(init, grads, lambda k: 0.05, 0.9, 0.1, [True] * 6, [1.0] * 6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Keras' own SGD(weight_decay=...) is decoupled (w -= lr*wd*w outside the momentum) and
    # lands elsewhere.
    keras_vars = _net()
    for v, x in zip(keras_vars, init):
        v.assign(x)
    decoupled = _run(keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.1), keras_vars,
                     grads)
    assert not np.allclose(got[0], decoupled[0], atol=1e-3)


def test_sgd_exclusion_include_multipliers_nesterov_and_schedule(rng):
    variables = _net()
    init = _init(variables, rng)
    grads = _random_grads(variables, 5, rng)
    schedule = WarmupCosine(0.1, total_steps=5, warmup_steps=2, final_lr=0.01)
    opt = SGD(learning_rate=schedule, momentum=0.8, nesterov=True, weight_decay=0.05,
              exclude_from_weight_decay=["bias"], weight_decay_include=["predictor", "bn"],
              lr_multipliers={"predictor": 10.0, "gamma": 0.5})
    got = _run(opt, variables, grads, graph=True)
    #        enc/kernel enc/bias bn/gamma bn/beta predictor/kernel predictor/bias
    decay = [False, False, True, True, True, False]
    mult = [1.0, 1.0, 0.5, 1.0, 10.0, 10.0]
    lr_fn = lambda k: _np_warmup_cosine(k, 0.1, 5, 2, 0.01)  # noqa: E731
    want = _np_reference(init, grads, lr_fn, 0.8, 0.05, decay, mult, nesterov=True)
    for g, w, path in zip(got, want, _paths(variables)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=path)
    settings = opt.variable_settings()
    assert [s["decay"] for s in settings.values()] == decay
    assert [s["lr_multiplier"] for s in settings.values()] == mult


def test_sgd_without_momentum_and_weight_decay(rng):
    variables = _net()
    init = _init(variables, rng)
    grads = _random_grads(variables, 3, rng)
    got = _run(SGD(learning_rate=0.2, momentum=0.0, weight_decay=0.0), variables, grads)
    want = _np_reference(init, grads, lambda k: 0.2, 0.0, 0.0, [False] * 6, [1.0] * 6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_exclude_from_weight_decay_method(rng):
    variables = _net()
    init = _init(variables, rng)
    grads = _random_grads(variables, 3, rng)
    opt = SGD(learning_rate=0.1, momentum=0.5, weight_decay=0.2)
    opt.exclude_from_weight_decay(var_list=[variables[0]], var_names=["bn"])
    got = _run(opt, variables, grads)
    decay = [False, True, False, False, True, True]
    want = _np_reference(init, grads, lambda k: 0.1, 0.5, 0.2, decay, [1.0] * 6)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_sgd_under_mirrored_strategy_matches_single_device(rng):
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices (conftest)")
    grads = _random_grads(_net(), 3, rng)
    init_rng = np.random.default_rng(0)
    single_vars = _net()
    _init(single_vars, init_rng)
    single = _run(SGD(learning_rate=0.1, weight_decay=0.01,
                      weight_decay_include=["predictor"], lr_multipliers={"bn": 2.0}),
                  single_vars, grads)
    strategy = distribute.get_strategy("cpu:2")
    with strategy.scope():
        variables = _net()
        _init(variables, np.random.default_rng(0))
        opt = SGD(learning_rate=0.1, weight_decay=0.01, weight_decay_include=["predictor"],
                  lr_multipliers={"bn": 2.0})
        # As Model.fit does: build (create the momentum slots) in cross-replica context.
        opt.build(variables)

    @tf.function
    def step(g):
        def replica_fn():
            # Gradients are summed across replicas: each replica contributes half.
            opt.apply([x / 2.0 for x in g], variables)
        strategy.run(replica_fn)

    for g in grads:
        step([tf.constant(x, tf.float32) for x in g])
    for got, want in zip(variables, single):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# LARS

@pytest.mark.parametrize("graph", [False, True])
def test_lars_default_excludes_bias_and_bn(graph, rng):
    variables = _net()
    init = _init(variables, rng)
    grads = _random_grads(variables, 5, rng)
    opt = LARS(learning_rate=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    got = _run(opt, variables, grads, graph=graph)
    #           enc/kernel enc/bias bn/gamma bn/beta predictor/kernel predictor/bias
    adapt = [True, False, False, False, True, False]
    want = _np_reference(init, grads, lambda k: 0.5, 0.9, 0.1, adapt, [1.0] * 6,
                         adapt=adapt, eta=0.02)
    for g, w, path in zip(got, want, _paths(variables)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=path)
    # The trust ratio matters: plain momentum SGD would land elsewhere.
    sgd = _np_reference(init, grads, lambda k: 0.5, 0.9, 0.1, adapt, [1.0] * 6)
    assert not np.allclose(got[0], sgd[0], atol=1e-3)


def test_lars_separate_adaptation_include_multiplier_and_zero_weights(rng):
    variables = _net()
    init = _init(variables, rng)
    variables[4].assign(np.zeros(variables[4].shape))  # ||w|| = 0: trust ratio 1
    init[4] = np.zeros(variables[4].shape)
    grads = _random_grads(variables, 4, rng)
    opt = LARS(learning_rate=0.3, momentum=0.9, weight_decay=0.05, eta=0.01,
               exclude_from_weight_decay=["bias", "bn"], exclude_from_layer_adaptation=["enc"],
               weight_decay_include=["enc", "predictor"], lr_multipliers={"predictor": 3.0})
    got = _run(opt, variables, grads, graph=True)
    #           enc/kernel enc/bias bn/gamma bn/beta predictor/kernel predictor/bias
    decay = [True, False, False, False, True, False]
    adapt = [False, False, True, True, True, True]
    mult = [1.0, 1.0, 1.0, 1.0, 3.0, 3.0]
    want = _np_reference(init, grads, lambda k: 0.3, 0.9, 0.05, decay, mult, adapt=adapt,
                         eta=0.01)
    for g, w, path in zip(got, want, _paths(variables)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=path)
    settings = list(opt.variable_settings().values())
    assert [s["adapt"] for s in settings] == adapt


# ---------------------------------------------------------------------------------------------
# serialisation and validation

@pytest.mark.parametrize("make", [
    lambda: SGD(learning_rate=WarmupCosine(0.2, 100, 10), weight_decay=1e-3,
                exclude_from_weight_decay=["bias"], weight_decay_include=["predictor"],
                lr_multipliers={"predictor": 10.0}, nesterov=True, clipnorm=1.0),
    lambda: LARS(learning_rate=0.4, weight_decay=1e-5, eta=0.02,
                 exclude_from_layer_adaptation=["bn"], lr_multipliers={"head": 2.0}),
])
def test_optimizer_serialisation_round_trip(make):
    opt = make()
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(restored) is type(opt)
    config, restored_config = opt.get_config(), restored.get_config()
    config.pop("name"), restored_config.pop("name")
    assert restored_config == config
    assert config["weight_decay"] > 0


def test_model_with_optimizer_saves_and_reloads(tmp_path, rng):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="predictor")])
    model.compile(optimizer=LARS(learning_rate=WarmupCosine(0.1, 10, 2),
                                 lr_multipliers={"predictor": 2.0}), loss="mse")
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, LARS)
    assert loaded.optimizer.get_config()["lr_multipliers"] == {"predictor": 2.0}
    assert isinstance(loaded.optimizer._learning_rate, WarmupCosine)


def test_lars_default_exclusion_list():
    assert LARS().get_config()["exclude_from_weight_decay"] == list(
        optimizers.LARS_DEFAULT_EXCLUDE)
    assert LARS().get_config()["exclude_from_layer_adaptation"] is None
    assert SGD().get_config()["exclude_from_weight_decay"] == []


@pytest.mark.parametrize("call,match", [
    (lambda: SGD(weight_decay=-1e-4), "weight_decay=-0.0001"),
    (lambda: SGD(momentum=1.0), "momentum=1.0"),
    (lambda: SGD(momentum=0.0, nesterov=True), "nesterov"),
    (lambda: SGD(learning_rate=-0.1), "learning_rate"),
    (lambda: SGD(exclude_from_weight_decay=[""]), "exclude_from_weight_decay"),
    (lambda: SGD(weight_decay_include=[3]), "weight_decay_include"),
    (lambda: SGD(lr_multipliers={"predictor": -2.0}), "predictor"),
    (lambda: LARS(eta=-1.0), "eta"),
])
def test_optimizer_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_integer_learning_rate_is_accepted():
    assert SGD(learning_rate=1).get_config()["learning_rate"] == 1.0
    # schedules module exposes the EMA schedule names used by models
    assert schedules.EMA_SCHEDULES == ("cosine", "constant")
