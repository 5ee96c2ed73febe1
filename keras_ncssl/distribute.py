"""Distribution strategies by name, global-batch checks and distributed pretraining input.

    strategy = keras_ncssl.distribute.get_strategy("mirrored")   # or "cpu:2", "multi_worker", "tpu"
    per_replica = check_global_batch(256, strategy)              # 256 = the global batch
    with strategy.scope():
        sync = use_synchronized_bn(strategy)                      # True with > 1 replica
        encoder = encoders.get_encoder("resnet18", (32, 32, 3), synchronized_bn=sync)
        projector = heads.projector(512, synchronized_bn=sync)
        model = BYOL(encoder, projector, DirectPredictor())
        model.compile(optimizer=...)
    data = distribute_pretrain_dataset(
        strategy, lambda context: augment.pretrain_dataset(splits, batch_size=256,
                                                           input_context=context), 256)
    model.fit(data, steps_per_epoch=..., epochs=...)

What makes a run under a strategy equal to one device on the same global batch (PITFALLS.md
"Distribution"; tested in tests/test_distribute.py):

- the batch size a user gives is the *global* batch; each of the ``num_replicas_in_sync``
  replicas gets ``batch_size / num_replicas_in_sync`` examples (`check_global_batch`);
- ``BYOL.train_step`` divides the per-replica mean loss by ``num_replicas_in_sync`` once,
  because the optimizer sums the replicas' gradients;
- BatchNorm statistics are over the global batch (``synchronized_bn``, `use_synchronized_bn`);
- the DirectPredictor all-reduces its batch correlation before its EMA and eigendecomposition,
  and its state lives in ``aggregation="only_first_replica"`` variables, so every replica holds
  the same kernel;
- the target EMA is assigned in replica context to variables of the default aggregation
  (NONE), which TensorFlow (2.16+) updates locally without communication; each replica
  averages its copy with its copy of the online weights, which the optimizer keeps identical,
  so the targets stay identical too;
- no variable is assigned inside ``tf.cond`` in a replica (a merge_call there is an error).

Limits seen on TF 2.21 / Keras 3.15 (with any Keras model, not only these): under
MirroredStrategy over logical CPU devices, ``steps_per_execution > 1`` ("You must feed a value
for placeholder tensor") and ``jit_compile=True`` fail; keep the defaults there. Keras 3's
``fit`` under MultiWorkerMirroredStrategy needs the workarounds in `step_logs` and
``BYOL._maybe_symbolic_build``. Multiple GPUs and TPUs were not available to test.

Library code reads no flags: the runner passes ``flags.strategy`` to `get_strategy`.
"""
import inspect
import json
import numbers
import os
import re

import tensorflow as tf

__all__ = ["STRATEGY_NAMES", "get_strategy", "check_global_batch", "use_synchronized_bn",
           "distribute_pretrain_dataset", "check_fit_length", "is_chief", "worker_path",
           "step_logs"]

STRATEGY_NAMES = ("default", "mirrored", "cpu:N", "multi_worker", "tpu")

_CPU_PATTERN = re.compile(r"^cpu:(\d+)$")


def get_strategy(name="default", tpu_address=None):
    """A ``tf.distribute.Strategy`` from a name.

    Args:
        name: one of
            - ``"default"``: the default (no-op, one device) strategy;
            - ``"mirrored"``: ``MirroredStrategy`` over all local GPUs (without a GPU, over
              the logical CPU devices: one unless the CPU was split);
            - ``"cpu:N"``: ``MirroredStrategy`` over N logical CPU devices (tests and
              debugging of multi-replica code on a machine without GPUs). The logical devices
              are configured here if TensorFlow has not initialised its devices yet; if it
              has, at least N must already exist;
            - ``"multi_worker"``: ``MultiWorkerMirroredStrategy`` from the ``TF_CONFIG``
              environment variable (every worker runs the same program with its own
              ``task.index``);
            - ``"tpu"``: ``TPUStrategy`` through a ``TPUClusterResolver``.
          A ``tf.distribute.Strategy`` instance is returned as it is.
        tpu_address: for ``"tpu"`` only: the TPU name or ``grpc://host:port`` address
            (None: the resolver's default, e.g. the ``TPU_NAME`` of a Cloud TPU VM).

    Raises:
        ValueError: an unknown name, a bad N, ``tpu_address`` without ``"tpu"``, or a missing
            or malformed ``TF_CONFIG`` for ``"multi_worker"``.
        RuntimeError: ``"cpu:N"`` after TensorFlow initialised fewer than N CPU devices, or
            no TPU could be reached.
    """
    if isinstance(name, tf.distribute.Strategy):
        return name
    if not isinstance(name, str):
        raise ValueError(f"strategy name must be a string, one of {', '.join(STRATEGY_NAMES)}; "
                         f"got {name!r}.")
    key = name.strip().lower()
    if tpu_address is not None and key != "tpu":
        raise ValueError(f"tpu_address={tpu_address!r} is only used with strategy 'tpu'; "
                         f"got strategy {name!r}.")
    if key == "default":
        return tf.distribute.get_strategy()
    if key == "mirrored":
        return _mirrored(None)
    if key == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if key == "tpu":
        return _tpu_strategy(tpu_address)
    match = _CPU_PATTERN.match(key)
    if match:
        return _cpu_strategy(int(match.group(1)), name)
    if key.startswith("cpu"):
        raise ValueError(f"strategy {name!r}: 'cpu:N' needs a positive integer N of logical CPU "
                         "devices, e.g. 'cpu:2'.")
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)} "
                     "(N = number of logical CPU devices).")


def _cpu_strategy(n, name):
    """MirroredStrategy over the first n logical CPU devices, configuring them if still possible."""
    if n < 1:
        raise ValueError(f"strategy {name!r}: N must be >= 1 logical CPU devices; got {n}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is None or len(current) < n:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
        except RuntimeError:
            pass  # already initialised: use the devices it has, if there are enough
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < n:
        raise RuntimeError(
            f"strategy {name!r} needs {n} logical CPU devices but TensorFlow was initialised "
            f"with {len(devices)}. Call get_strategy({name!r}) before TensorFlow initialises its "
            "devices (before any tensor, model or dataset is created), or configure the devices "
            "first with tf.config.set_logical_device_configuration.")
    return _mirrored(tuple(device.name for device in devices[:n]))


# One MirroredStrategy per device set and process. Every MirroredStrategy numbers its collectives
# from the same keys (group 1, instances from 100), and TensorFlow caches a collective's shape by
# those keys for the life of the process: a second strategy over the same devices reuses the keys
# and fails with "Shape mismatch in the collective instance 100" (tensorflow#62790), e.g. when a
# sweep or a test suite trains several models in one process. Reusing the strategy keeps the keys
# unique; a strategy holds no per-model state, so sharing it is safe.
_MIRRORED = {}


def _mirrored(devices):
    """The process-wide MirroredStrategy over ``devices`` (None: all local GPUs, else CPUs)."""
    if devices not in _MIRRORED:
        _MIRRORED[devices] = tf.distribute.MirroredStrategy(
            list(devices) if devices is not None else None)
    return _MIRRORED[devices]


def _check_tf_config():
    """Fail with an example if TF_CONFIG is missing or malformed (TF would fall back silently)."""
    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\'')
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError("strategy 'multi_worker' needs the TF_CONFIG environment variable (the "
                         f"cluster and this worker's task), e.g. {example}; it is not set.")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}): {raw!r}; expected e.g. "
                         f"{example}.") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(v, list) and v for v in cluster.values()):
        raise ValueError(f"TF_CONFIG needs a non-empty 'cluster' mapping job names to lists of "
                         f"'host:port'; got {raw!r}; expected e.g. {example}.")
    if not isinstance(task, dict) or task.get("type") not in cluster \
            or not isinstance(task.get("index"), int) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise ValueError(f"TF_CONFIG needs a 'task' with a 'type' among {sorted(cluster)} and an "
                         f"'index' into that job's list; got task={task!r}; expected e.g. "
                         f"{example}.")


def _tpu_strategy(tpu_address):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        where = f"at {tpu_address!r}" if tpu_address else "(no tpu_address given)"
        raise RuntimeError(f"strategy 'tpu': no TPU could be reached {where}: "
                           f"{str(error).splitlines()[0] if str(error) else type(error).__name__}. "
                           "Pass the TPU name or 'grpc://host:port' as tpu_address, or run on a "
                           "TPU VM.") from error
    return tf.distribute.TPUStrategy(resolver)


def check_global_batch(batch_size, strategy=None):
    """The per-replica batch size for a global ``batch_size`` under ``strategy``.

    The batch size is global: a run on N replicas sees the same ``batch_size`` examples per
    step as one device, ``batch_size / N`` on each replica. Raises ValueError if
    ``batch_size`` is not a positive integer divisible by ``num_replicas_in_sync``.
    """
    strategy = strategy or tf.distribute.get_strategy()
    replicas = int(strategy.num_replicas_in_sync)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (the global batch); "
                         f"got {batch_size!r}.")
    batch_size = int(batch_size)
    if batch_size % replicas:
        lower = batch_size // replicas * replicas
        nearest = [size for size in (lower, lower + replicas) if size > 0]
        raise ValueError(
            f"the global batch_size={batch_size} is not divisible by the {replicas} replicas in "
            f"sync: every replica must get the same number of examples (BatchNorm and the "
            f"predictor's correlation average equal per-replica batches). Use a multiple of "
            f"{replicas}, e.g. {' or '.join(str(s) for s in nearest)}.")
    return batch_size // replicas


def use_synchronized_bn(strategy=None, setting="auto"):
    """Whether BatchNorm layers should be ``synchronized`` (global-batch statistics).

    ``setting`` "auto" (default): True exactly when ``strategy`` (default: the current one)
    has more than one replica in sync; per-replica statistics change the method
    (PITFALLS.md "Distribution"), and with one replica synchronisation only costs time.
    True / False force it. Pass the result as ``synchronized_bn=`` to the encoder and head
    builders (`keras_ncssl.encoders`, `keras_ncssl.heads`).
    """
    if setting is True or setting is False:
        return setting
    if setting != "auto":
        raise ValueError(f"synchronized BatchNorm setting must be 'auto', True or False; "
                         f"got {setting!r}.")
    strategy = strategy or tf.distribute.get_strategy()
    return int(strategy.num_replicas_in_sync) > 1


def distribute_pretrain_dataset(strategy, dataset_fn, global_batch_size=None, options=None):
    """``strategy.distribute_datasets_from_function`` with a per-replica batch check.

    ``dataset_fn(input_context)`` builds one input pipeline: it must shard by
    ``input_context.input_pipeline_id`` (one pipeline per worker) and batch by
    ``input_context.get_per_replica_batch_size(global_batch_size)``, which is what
    ``augment.pretrain_dataset(data, batch_size=global_batch_size, input_context=...)`` does.
    A function with an ``input_context`` parameter, e.g.
    ``functools.partial(augment.pretrain_dataset, data, batch_size=256)``, gets it by keyword.
    Within a worker, the replicas take consecutive per-replica batches.

    If ``global_batch_size`` is given it is checked (`check_global_batch`) and so is the
    dataset's static batch dimension, which must equal the per-replica size: a pipeline that
    batches the *global* size on every replica would silently multiply the batch by the
    replica count, and one with a partial last batch (unknown batch dimension) would give
    replicas unequal shares, which the all-reduced means (BatchNorm, the predictor's
    correlation) assume equal.

    Keras reads the length of the result as the per-replica batches of one pipeline, i.e.
    replicas-per-worker times the number of global steps, and runs into the end of the data
    with a step that fails after advancing ``optimizer.iterations``: pass ``steps_per_epoch``
    to ``fit`` (with ``repeat=True`` in ``augment.pretrain_dataset`` for several epochs).

    Returns a distributed dataset for ``model.fit`` (a plain dataset under the default
    strategy).
    """
    per_replica = None if global_batch_size is None else check_global_batch(
        global_batch_size, strategy)
    by_keyword = _has_parameter(dataset_fn, "input_context")

    def pipeline(context):
        dataset = dataset_fn(input_context=context) if by_keyword else dataset_fn(context)
        if not isinstance(dataset, tf.data.Dataset):
            raise ValueError(f"dataset_fn must return a tf.data.Dataset; got "
                             f"{type(dataset).__name__}.")
        if per_replica is not None:
            for spec in tf.nest.flatten(dataset.element_spec):
                batch = spec.shape[0] if spec.shape.rank else None
                if batch is None:
                    raise ValueError(
                        f"dataset_fn yields batches of unknown size (element spec {spec}); "
                        f"every replica must get exactly {per_replica} examples (the global "
                        f"batch {global_batch_size} over {strategy.num_replicas_in_sync} "
                        "replicas): batch with drop_remainder=True, or pass "
                        "global_batch_size=None to skip this check.")
                if batch != per_replica:
                    raise ValueError(
                        f"dataset_fn yields batches of {batch}, but the global batch "
                        f"{global_batch_size} over {strategy.num_replicas_in_sync} replicas "
                        f"needs {per_replica} per replica: batch with "
                        "input_context.get_per_replica_batch_size(global_batch_size).")
        return dataset

    return strategy.distribute_datasets_from_function(pipeline, options)


def _has_parameter(fn, name):
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables have no signature
        return False


def check_fit_length(data, steps_per_epoch, strategy=None):
    """Raise before ``fit`` would run one step past the end of a distributed dataset.

    Keras takes the length of a ``distribute_datasets_from_function`` dataset from one input
    pipeline, counted in per-replica batches: with R replicas per worker that is R times the
    number of global steps. ``fit`` then asks for more steps than there are, and the step that
    meets the end of the data fails only after advancing data-independent counters
    (``optimizer.iterations``, hence the learning-rate and EMA schedules). Measured on
    TF 2.21 / Keras 3.15 with cpu:2: 7 optimizer iterations for 6 global batches. So with
    more than one replica per worker, ``steps_per_epoch`` is required for such a dataset.
    """
    if steps_per_epoch is not None or type(data).__name__ != "DistributedDatasetsFromFunction":
        return
    strategy = strategy or tf.distribute.get_strategy()
    local_replicas = len(strategy.extended.worker_devices)
    if local_replicas > 1:
        raise ValueError(
            f"fit on a dataset from distribute_datasets_from_function with {local_replicas} "
            "replicas per worker needs steps_per_epoch: Keras would count the per-replica "
            f"batches of one pipeline ({local_replicas} x the global steps) and overrun the "
            "epoch by a failing step that still advances optimizer.iterations. Pass "
            "steps_per_epoch = number of examples // global batch size (or repeat the data "
            "and choose it).")


def is_chief(strategy=None):
    """Whether this process should write the run's files (checkpoints, logs, exports).

    True except under a multi-worker strategy, where only the ``chief`` task (or worker 0 if
    the cluster has no chief) is.
    """
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if not _multi_worker(strategy) or resolver is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return not has_chief and resolver.task_type == "worker" and int(resolver.task_id) == 0


def worker_path(path, strategy=None):
    """``path`` on the chief; a per-worker path beside it on the other workers.

    Under MultiWorkerMirroredStrategy every worker must take part in saving a checkpoint (a
    save may read synchronised values with collectives), but they must not write the same
    files: the others write to ``<dir>/.worker<i>/<name>`` (TensorFlow's recommended pattern),
    which they may delete afterwards.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if is_chief(strategy):
        return path
    resolver = strategy.cluster_resolver
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{resolver.task_type}{resolver.task_id}", name)


def _multi_worker(strategy):
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access


def step_logs(logs):
    """A ``train_step``'s logs in a form Keras can average across workers.

    Keras 3 (checked on 3.15) averages step logs under a multi-worker
    MultiWorkerMirroredStrategy with ``strategy.reduce("MEAN", value, axis=0)``, which fails
    on scalars ("Invalid reduction dimension 0 for input with 0 dimensions",
    tensorflow#72388). There, each scalar gets a batch axis of length 1, which that reduction
    averages back to a scalar; everywhere else the logs are returned unchanged. Call in
    replica context (inside ``train_step`` / ``test_step``).
    """
    if not _multi_worker(tf.distribute.get_strategy()):
        return logs
    return {key: tf.reshape(value, [1]) if getattr(value, "shape", None) is not None
            and value.shape.rank == 0 else value for key, value in logs.items()}
