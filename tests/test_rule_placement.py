"""Where DirectPredictor runs its rule (rule_device), and the guards around the eigendecomposition.

No GPU here: placement is checked on the two logical CPU devices of conftest.py (the device a
traced eigh is pinned to, and real execution across devices), and the "auto" decision on
GPU device strings directly.
"""
import contextlib

import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import distribute
from keras_ncssl.predictors import RULES, DirectPredictor
from keras_ncssl.predictors.layer import HOST_CPU, resolve_rule_device

D = 8

needs_two_cpus = pytest.mark.skipif(len(tf.config.list_logical_devices("CPU")) < 2,
                                    reason="TensorFlow initialised before conftest split the CPU in two")


def reference_directpred(f, eps=0.1):
    """[DP] code's rule in float64 numpy: r = max(s, 0) / s_max, p = max(sqrt(r) + eps, 1e-4)."""
    s, u = np.linalg.eigh((f + f.T) / 2)
    p = np.maximum(np.sqrt(np.maximum(s, 0) / s.max()) + eps, 1e-4)
    return (u * p) @ u.T


def make(device=None, **kwargs):
    with tf.device(device) if device else contextlib.nullcontext():
        layer = DirectPredictor(**kwargs)
        layer.build((None, D))
    return layer


def _batch(rng, n=64):
    return (rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0, size=D)).astype(np.float32)


@pytest.mark.parametrize("rule_device,variable_device,uses_eigh,expected", [
    ("auto", "/job:localhost/replica:0/task:0/device:GPU:0", True, HOST_CPU),
    ("auto", "/job:worker/replica:0/task:1/device:GPU:3", True, HOST_CPU),
    ("auto", "/job:localhost/replica:0/task:0/device:GPU:0", False, None),  # matmul-only rules stay
    ("auto", "/job:localhost/replica:0/task:0/device:CPU:0", True, None),
    ("auto", "/job:worker/replica:0/task:0/device:TPU:0", True, None),
    ("auto", "", True, None),
    ("cpu", "/device:GPU:0", False, HOST_CPU),
    (None, "/device:GPU:0", True, None),
    ("/device:GPU:1", "/device:GPU:0", True, "/device:GPU:1"),
])
def test_auto_moves_eigh_rules_off_a_gpu_only(rule_device, variable_device, uses_eigh, expected):
    assert resolve_rule_device(rule_device, variable_device, uses_eigh) == expected


def _eigh_devices(layer, outer_device):
    """Devices of the eigendecompositions in the traced refresh (inside the tf.cond branch)."""
    with tf.device(outer_device):
        graph = tf.function(layer.refresh).get_concrete_function().graph.as_graph_def()
    nodes = [n for f in graph.library.function for n in f.node_def] + list(graph.node)
    return [n.device for n in nodes if n.op.startswith("SelfAdjointEig")]


@needs_two_cpus
@pytest.mark.parametrize("rule_device,expected", [
    ("cpu", HOST_CPU), ("/device:CPU:1", "/device:CPU:1"), (None, ""), ("auto", "")])
def test_traced_refresh_pins_eigh_to_the_rule_device(rng, rule_device, expected):
    layer = make("/device:CPU:1", rule_device=rule_device)
    assert "CPU:1" in layer.kernel.value.device
    layer.update(tf.constant(_batch(rng)))
    assert _eigh_devices(layer, "/device:CPU:1") == [expected]


@needs_two_cpus
def test_rule_on_another_device_gives_the_reference_kernel(rng):
    layer = make("/device:CPU:1", rule_device=HOST_CPU, rho=0.0)
    compiled = tf.function(layer.update)
    for x in (_batch(rng), _batch(rng)):
        assert bool(compiled(tf.constant(x)))
        np.testing.assert_allclose(layer.kernel.numpy(), reference_directpred(x.astype(np.float64).T @ x / len(x)),
                                   atol=3e-5)
    x = _batch(rng)
    layer.update(tf.constant(x))  # eagerly too
    np.testing.assert_allclose(layer.kernel.numpy(), reference_directpred(x.astype(np.float64).T @ x / len(x)),
                               atol=3e-5)


@needs_two_cpus
def test_two_replicas_with_the_rule_on_the_host_hold_the_global_kernel(rng):
    # The cached strategy: a second MirroredStrategy over the same devices would reuse collective
    # keys (tensorflow#62790, BUILD_NOTES "Distribution").
    strategy = distribute.get_strategy("cpu:2")
    with strategy.scope():
        layer = make(rule_device="cpu", rho=0.0)
    x = _batch(rng)
    halves = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(x[32 * context.replica_id_in_sync_group:][:32]))
    tf.function(lambda v: strategy.run(layer.update, args=(v,)))(halves)
    expected = reference_directpred(x.astype(np.float64).T @ x / len(x))
    copies = [part.numpy() for part in layer.kernel.value.values]
    assert len(copies) == 2
    np.testing.assert_array_equal(copies[0], copies[1])
    np.testing.assert_allclose(copies[0], expected, atol=3e-5)


def _counting(rule, calls, fail_above=None):
    """A rule that counts its calls (eagerly) and, for d > fail_above, raises as cuSOLVER does."""
    def counted(correlation, **options):
        calls.append(int(correlation.shape[-1]))
        if fail_above is not None and correlation.shape[-1] > fail_above:
            raise tf.errors.InvalidArgumentError(None, None, "Heevd failed with error code 3\nmore detail")
        return rule(correlation, **options)
    counted.uses_eigh = True
    return counted


def test_zero_correlation_never_reaches_the_rule(rng):
    calls = []
    layer = make(rule=_counting(RULES["directpred"], calls))
    layer.update(tf.constant(_batch(rng)))
    kernel, before = layer.kernel.numpy().copy(), len(calls)
    layer.correlation.assign(np.zeros((D, D), np.float32))  # the collapsed / never-filled F
    with pytest.warns(RuntimeWarning, match="zero correlation.*refresh was skipped"):
        assert not bool(layer.refresh())
    assert len(calls) == before  # not called at all: the zero matrix fails GPU eigh (tensorflow#47661)
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
    assert int(layer.num_skipped.numpy()) == 1


def test_failed_eigendecomposition_skips_the_refresh_with_a_warning(rng):
    calls = []
    layer = make(rule=_counting(RULES["directpred"], calls, fail_above=2))  # the 2 x 2 check at construction passes
    with pytest.warns(RuntimeWarning, match=r"eigendecomposition failed \(Heevd failed with error code 3\); "
                                            r"the predictor refresh was skipped\.$"):
        assert not bool(layer.update(tf.constant(_batch(rng))))
    np.testing.assert_array_equal(layer.kernel.numpy(), np.eye(D))
    assert int(layer.num_skipped.numpy()) == 1 and int(layer.num_updates.numpy()) == 1
    # The statistics were folded; the next good refresh uses them.
    good = make(rule="directpred", rho=0.0)
    x = _batch(rng)
    good.update(tf.constant(x))
    np.testing.assert_allclose(good.kernel.numpy(), reference_directpred(x.astype(np.float64).T @ x / len(x)),
                               atol=3e-5)


@pytest.mark.parametrize("bad", ["gpu please", "/device:QPU:0:x", 3])
def test_bad_rule_device_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"rule_device=.*choose 'auto'.*'cpu'.*None.*'/device:CPU:0'"):
        DirectPredictor(rule_device=bad)


def test_rule_device_round_trips_through_get_config():
    for value in ("auto", "cpu", None, "/device:CPU:1"):
        layer = DirectPredictor(rule_device=value)
        clone = DirectPredictor.from_config(layer.get_config())
        assert clone.rule_device == value and clone.get_config() == layer.get_config()
    old = DirectPredictor().get_config()
    del old["rule_device"]  # a model saved before the option existed
    assert DirectPredictor.from_config(old).rule_device == "auto"
