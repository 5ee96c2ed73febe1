"""Distributed training: strategies by name, global batches, and 1 vs N replicas agreeing.

The multi-replica tests use MirroredStrategy over the two logical CPU devices conftest.py
configures ("cpu:2"); the multi-worker test starts two worker processes on 127.0.0.1. The
model, data and snapshot helpers are shared with those workers (tests/dist_worker.py).
"""
import functools
import json
import os
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf

import dist_worker as dw
from keras_ncssl import augment, distribute
from keras_ncssl.export import export_encoder, load_encoder

# Largest |1 replica - 2 replicas| allowed after dw.STEPS steps, per quantity. Measured on
# TF 2.21 / Keras 3.15: <= 2e-5 (online weights), <= 1e-7 (target), <= 1e-5 (correlation,
# kernel). The float32 noise floor is the same size: permuting the examples inside each
# batch on one device moves the online weights by 1.2e-5. Without synchronised BatchNorm
# the two runs differ by 6e-2 after the first step, so this tolerance has teeth.
ATOL = 1e-4
FLOAT_GROUPS = ("online", "target", "bn_moving_stats", "correlation", "kernel")


def _cpu_devices():
    return len(tf.config.list_logical_devices("CPU"))


needs_two_cpus = pytest.mark.skipif(
    _cpu_devices() < 2, reason="TensorFlow initialised before conftest split the CPU in two")


def _components(variable):
    """The per-replica copies of a (Keras) variable; one entry when not distributed."""
    value = getattr(variable, "value", variable)
    return [np.array(part.numpy()) for part in getattr(value, "values", (value,))]


@pytest.fixture(scope="module")
def pair():
    """One BYOL+DirectPred model trained on one device and one on cpu:2, same start, same data."""
    strategy = distribute.get_strategy("cpu:2")
    single = dw.build_model()
    init = single.get_weights()
    with strategy.scope():
        double = dw.build_model()
    double.set_weights(init)
    x1, x2 = dw.make_views()
    history1 = single.fit(dw.single_dataset(x1, x2), epochs=1, steps_per_epoch=dw.STEPS, verbose=0)
    data = distribute.distribute_pretrain_dataset(strategy, dw.dataset_fn(x1, x2), dw.GLOBAL_BATCH)
    history2 = double.fit(data, epochs=1, steps_per_epoch=dw.STEPS, verbose=0)
    return types.SimpleNamespace(
        strategy=strategy, single=single, double=double, init=init, x=x1,
        snap1=dw.snapshot(single), snap2=dw.snapshot(double),
        history1=history1.history, history2=history2.history)


# -- strategies by name ------------------------------------------------------------------------

def test_default_strategy_has_one_replica():
    strategy = distribute.get_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert distribute.get_strategy(strategy) is strategy
    # "mirrored": every local GPU, or without one every logical CPU device (2 here).
    gpus = len(tf.config.list_logical_devices("GPU"))
    assert distribute.get_strategy("mirrored").num_replicas_in_sync == (gpus or _cpu_devices())


@needs_two_cpus
def test_cpu_n_mirrors_over_logical_cpus():
    strategy = distribute.get_strategy("cpu:2")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2
    assert sorted(d.split("/")[-1] for d in strategy.extended.worker_devices) == ["device:CPU:0",
                                                                                   "device:CPU:1"]
    assert distribute.get_strategy(" CPU:1 ").num_replicas_in_sync == 1


def test_cpu_n_after_initialisation_explains_why():
    too_many = _cpu_devices() + 1
    with pytest.raises(RuntimeError, match=rf"needs {too_many} logical CPU devices but TensorFlow "
                                           rf"was initialised with {too_many - 1}.*before "
                                           "TensorFlow initialises"):
        distribute.get_strategy(f"cpu:{too_many}")


@pytest.mark.parametrize("name,match", [
    ("gpus", r"unknown strategy 'gpus'; choose one of default, mirrored, cpu:N, multi_worker, tpu"),
    ("cpu:0", r"'cpu:0'.*N must be >= 1"),
    ("cpu:two", r"'cpu:two'.*positive integer N"),
    (3, r"must be a string, one of default, mirrored"),
])
def test_bad_strategy_names_fail_clearly(name, match):
    with pytest.raises(ValueError, match=match):
        distribute.get_strategy(name)


def test_tpu_address_only_with_tpu():
    with pytest.raises(ValueError, match=r"tpu_address='grpc://10.0.0.2:8470' is only used with "
                                         r"strategy 'tpu'; got strategy 'mirrored'"):
        distribute.get_strategy("mirrored", tpu_address="grpc://10.0.0.2:8470")


def test_single_process_is_chief_and_writes_in_place():
    strategy = distribute.get_strategy("default")
    assert distribute.is_chief(strategy)
    assert distribute.worker_path("/runs/a/ckpt", strategy) == "/runs/a/ckpt"


@pytest.mark.parametrize("tf_config,match", [
    (None, r"needs the TF_CONFIG environment variable.*it is not set"),
    ("{not json", r"TF_CONFIG is not valid JSON"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), r"non-empty 'cluster'"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}),
     r"'task' with a 'type' among \['worker'\] and an 'index'"),
])
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, match):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=match):
        distribute.get_strategy("multi_worker")


@needs_two_cpus
def test_strategies_over_the_same_devices_share_collective_keys():
    """Two models trained one after the other in one process (a sweep, a test suite) must not
    reuse collective instance keys: separate MirroredStrategy objects over the same devices do,
    and the second all-reduce of another shape then fails with "Shape mismatch in the
    collective instance 100"."""
    first = distribute.get_strategy("cpu:2")
    assert distribute.get_strategy(" cpu:2 ") is first

    def all_reduce(strategy, size):
        @tf.function
        def step():
            return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
                "sum", tf.ones([size])))
        return strategy.experimental_local_results(step())[0].numpy()

    np.testing.assert_array_equal(all_reduce(first, 3), np.full(3, 2.0))
    np.testing.assert_array_equal(all_reduce(distribute.get_strategy("cpu:2"), 5), np.full(5, 2.0))


# -- global batch and BatchNorm ----------------------------------------------------------------

@needs_two_cpus
def test_global_batch_is_split_evenly_or_rejected():
    two = distribute.get_strategy("cpu:2")
    assert distribute.check_global_batch(16, two) == 8
    assert distribute.check_global_batch(np.int64(6), two) == 3
    assert distribute.check_global_batch(15, distribute.get_strategy("default")) == 15
    with pytest.raises(ValueError, match=r"global batch_size=15 is not divisible by the 2 replicas "
                                         r"in sync.*multiple of 2, e.g. 14 or 16"):
        distribute.check_global_batch(15, two)
    with pytest.raises(ValueError, match=r"e.g. 2\.$"):
        distribute.check_global_batch(1, two)
    for bad in (0, -4, 2.5, True, "16"):
        with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
            distribute.check_global_batch(bad, two)


@needs_two_cpus
def test_synchronized_bn_defaults_on_with_several_replicas():
    assert distribute.use_synchronized_bn(distribute.get_strategy("cpu:2")) is True
    assert distribute.use_synchronized_bn(distribute.get_strategy("default")) is False
    assert distribute.use_synchronized_bn(None, setting=True) is True
    assert distribute.use_synchronized_bn(distribute.get_strategy("cpu:2"), setting=False) is False
    with pytest.raises(ValueError, match=r"'auto', True or False; got 'yes'"):
        distribute.use_synchronized_bn(None, setting="yes")


# -- distributed input -------------------------------------------------------------------------

@needs_two_cpus
def test_distribute_pretrain_dataset_gives_each_replica_its_share():
    strategy = distribute.get_strategy("cpu:2")
    images = tf.data.Dataset.from_tensor_slices(
        np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8))
    # augment.pretrain_dataset takes `input_context`: a partial of it is a dataset_fn.
    fn = functools.partial(augment.pretrain_dataset, images, preset="none", batch_size=16,
                           shuffle_buffer=0)
    data = distribute.distribute_pretrain_dataset(strategy, fn, 16)
    view1, view2 = next(iter(data))
    shapes = [tuple(part.shape) for part in strategy.experimental_local_results(view1)]
    assert shapes == [(8, 8, 8, 1), (8, 8, 8, 1)]
    assert len(strategy.experimental_local_results(view2)) == 2

    def global_batch_on_every_replica(context):  # the classic mistake: ignores the context
        rows = tf.data.Dataset.from_tensor_slices(np.zeros((64, 2), np.float32))
        return rows.batch(16, drop_remainder=True)

    with pytest.raises(ValueError, match=r"dataset_fn yields batches of 16, but the global batch "
                                         r"16 over 2 replicas needs 8 per replica"):
        distribute.distribute_pretrain_dataset(strategy, global_batch_on_every_replica, 16)

    def maybe_partial_batches(context):
        rows = tf.data.Dataset.from_tensor_slices(np.zeros((60, 2), np.float32))
        return rows.batch(context.get_per_replica_batch_size(16))

    with pytest.raises(ValueError, match=r"batches of unknown size.*exactly 8 examples.*"
                                         r"drop_remainder=True"):
        distribute.distribute_pretrain_dataset(strategy, maybe_partial_batches, 16)
    with pytest.raises(ValueError, match=r"batch_size=15 is not divisible by the 2 replicas"):
        distribute.distribute_pretrain_dataset(strategy, fn, 15)


@needs_two_cpus
def test_fit_on_data_from_a_function_needs_steps_per_epoch(pair):
    # Keras would read 2 x 6 per-replica batches as 12 steps and run a 7th, failing one that
    # still advances optimizer.iterations (measured: 7 iterations for 6 batches).
    x1, x2 = dw.make_views()
    data = distribute.distribute_pretrain_dataset(pair.strategy, dw.dataset_fn(x1, x2),
                                                  dw.GLOBAL_BATCH)
    with pytest.raises(ValueError, match=r"with 2 replicas per worker needs steps_per_epoch"):
        pair.double.fit(data, epochs=1, verbose=0)
    distribute.check_fit_length(data, dw.STEPS, pair.strategy)  # given: fine
    distribute.check_fit_length(dw.single_dataset(x1, x2), None, pair.strategy)  # Keras counts it


# -- 1 replica vs 2 replicas -------------------------------------------------------------------

@needs_two_cpus
def test_two_replicas_match_one_replica_on_the_same_global_batch(pair):
    diffs = dw.max_abs_diff(pair.snap1, pair.snap2)
    print("max |1 replica - 2 replicas|:", diffs)
    for group in FLOAT_GROUPS:
        assert diffs[group] <= ATOL, (group, diffs)
    # Same step count everywhere: optimizer iterations, predictor steps and folded batches.
    assert [int(c) for c in pair.snap2["counters"]] == [dw.STEPS] * 3
    assert diffs["counters"] == 0
    # The logged loss and the collapse monitor are global-batch quantities on 2 replicas too.
    for key in ("loss", "projection_std"):
        assert abs(pair.history1[key][-1] - pair.history2[key][-1]) <= ATOL, key
    # The comparison is not vacuous: training moved the weights and set the kernel.
    moved = max(float(np.abs(a - b).max()) for a, b in zip(pair.init, pair.single.get_weights()))
    assert moved > 100 * ATOL
    assert np.abs(pair.snap2["kernel"][0] - np.eye(dw.PROJECTION)).max() > 100 * ATOL


@needs_two_cpus
def test_every_replica_holds_the_same_predictor_and_target(pair):
    model = pair.double
    predictor = model.predictor
    for variable in (predictor.kernel, predictor.correlation, predictor.step,
                     predictor.num_updates):
        copies = _components(variable)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)
    for target, _ in model.target_pairs():
        copies = _components(target)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=target.path)


@pytest.mark.slow
@needs_two_cpus
def test_multi_crop_on_two_replicas_matches_one_replica(pair):
    """Local views (one encoder pass over all of them, synchronised BN, their rows in F) give
    the same training on 2 replicas as on one device with the same global batches."""
    x1, x2 = dw.make_views()
    rng = np.random.default_rng(1)
    local_views = tuple(rng.normal(size=(len(x1), 4, 4, 1)).astype(np.float32) for _ in range(2))

    def elements():
        return tf.data.Dataset.from_tensor_slices({"view1": x1, "view2": x2, "local_views": local_views})

    def fn(context):
        return elements().shard(context.num_input_pipelines, context.input_pipeline_id).batch(
            context.get_per_replica_batch_size(dw.GLOBAL_BATCH), drop_remainder=True)

    single = dw.build_model(shape=(None, None, 1))
    init = single.get_weights()
    with pair.strategy.scope():
        double = dw.build_model(shape=(None, None, 1))
    double.set_weights(init)
    dw.train(single, elements().batch(dw.GLOBAL_BATCH, drop_remainder=True))
    dw.train(double, distribute.distribute_pretrain_dataset(pair.strategy, fn, dw.GLOBAL_BATCH))
    diffs = dw.max_abs_diff(dw.snapshot(single), dw.snapshot(double))
    for group in FLOAT_GROUPS:
        assert diffs[group] <= ATOL, (group, diffs)
    # Not vacuous: the local views changed the run (same start and globals, no locals).
    plain = dw.build_model(shape=(None, None, 1))
    plain.set_weights(init)
    dw.train(plain, dw.single_dataset(x1, x2))
    assert dw.max_abs_diff(dw.snapshot(single), dw.snapshot(plain))["online"] > 100 * ATOL


# -- checkpoints and export --------------------------------------------------------------------

@needs_two_cpus
def test_checkpoint_from_two_replicas_restores_without_a_strategy(pair, tmp_path):
    trained = pair.double
    expected = [np.array(w) for w in trained.get_weights()]

    restored = dw.build_model()
    restored.optimizer.build(restored.online_variables)  # so load_weights restores its state too
    trained.save_weights(str(tmp_path / "byol.weights.h5"))
    restored.load_weights(str(tmp_path / "byol.weights.h5"))
    for a, b in zip(expected, restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(trained.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(np.array(a.numpy()), np.array(b.numpy()), err_msg=a.path)

    # tf.train.Checkpoint with the optimizer too: what resuming a run needs.
    path = tf.train.Checkpoint(model=trained, optimizer=trained.optimizer).write(
        str(tmp_path / "ckpt"))
    resumed = dw.build_model()
    resumed.optimizer.build(resumed.online_variables)
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).read(path).assert_consumed()
    for a, b in zip(expected, resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.optimizer.iterations.numpy()) == dw.STEPS
    for a, b in zip(trained.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_array_equal(np.array(a.numpy()), np.array(b.numpy()), err_msg=a.path)


@needs_two_cpus
def test_encoder_trained_on_two_replicas_exports_and_loads_without_a_strategy(pair, tmp_path):
    export_encoder(pair.double, str(tmp_path / "encoder"))
    serve = load_encoder(str(tmp_path / "encoder"))
    images = pair.x[:4]
    expected = pair.double.encoder(images, training=False)
    out = serve(tf.constant(images))
    out = out["embeddings"] if isinstance(out, dict) else out
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=1e-6)


# -- several worker processes ------------------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_two_cpus
def test_two_worker_processes_match_one_process(pair, tmp_path):
    """MultiWorkerMirroredStrategy over 127.0.0.1, one CPU replica per worker process."""
    init = tmp_path / "init.npz"
    np.savez(init, **{f"w{i}": w for i, w in enumerate(pair.init)})
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    script = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    procs, logs = [], []
    try:
        for index in range(2):
            config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            env = dict(os.environ, TF_CONFIG=json.dumps(config), TF_CPP_MIN_LOG_LEVEL="2",
                       CUDA_VISIBLE_DEVICES="")
            log = open(tmp_path / f"worker{index}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, script, "--init", str(init), "--out",
                 str(tmp_path / f"worker{index}.npz"), "--checkpoint", str(tmp_path / "ckpt"),
                 "--steps", str(dw.STEPS)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 240
        # Poll both: a worker that dies leaves its peer blocked in a collective until killed.
        while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
            if any(proc.poll() not in (None, 0) for proc in procs):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:  # never leave a worker (or its gRPC server) behind
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read()[-3000:])
        log.close()
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f"worker exit codes {codes}:\n" + "\n----\n".join(outputs)

    snaps = [dw.load_snapshot(tmp_path / f"worker{i}.npz") for i in range(2)]
    for snap in snaps:
        assert float(snap.pop("kernel_replica_spread")[0]) == 0.0
    between_workers = dw.max_abs_diff(snaps[0], snaps[1])
    assert all(value == 0.0 for value in between_workers.values()), between_workers
    diffs = dw.max_abs_diff(pair.snap1, snaps[0])
    print("max |1 process - 2 workers|:", diffs)
    for group in FLOAT_GROUPS:
        assert diffs[group] <= ATOL, (group, diffs)
    assert [int(c) for c in snaps[0]["counters"]] == [dw.STEPS] * 3

    # The chief's checkpoint restores into a model without a strategy; worker 1 wrote aside.
    assert os.path.exists(tmp_path / ".worker1" / "ckpt.index")
    restored = dw.build_model()
    restored.optimizer.build(restored.online_variables)
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(
        str(tmp_path / "ckpt")).assert_consumed()
    restored_snap = dw.snapshot(restored)
    assert dw.max_abs_diff(snaps[0], restored_snap) == {group: 0.0 for group in snaps[0]}
