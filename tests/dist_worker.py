"""A tiny BYOL + DirectPred run shared by tests/test_distribute.py and its worker processes.

Imported by the tests (in-process, one and two replicas) and run as a script by each worker
of the multi-worker test:

    TF_CONFIG=... python tests/dist_worker.py --init init.npz --out worker0.npz --checkpoint ckpt

The script trains the same model as `build_model` from the initial weights in ``--init`` on
the same global batches as `make_views` under ``get_strategy("multi_worker")``, and writes
`snapshot` of the result to ``--out``, and a tf.train.Checkpoint to ``--checkpoint``
(chief) or a per-worker path beside it (`distribute.worker_path`). It configures no logical devices: each worker process
uses its one CPU device.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

SHAPE = (8, 8, 1)
FEATURES = 4
PROJECTION = 8
GLOBAL_BATCH = 16
STEPS = 6


def make_views(steps=STEPS, batch=GLOBAL_BATCH, seed=0):
    """(view1, view2) float32 arrays of ``steps * batch`` examples, fixed by ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(steps * batch, *SHAPE)).astype(np.float32)
    x2 = (x1 + 0.3 * rng.normal(size=x1.shape)).astype(np.float32)
    return x1, x2


def build_model(synchronized_bn=True, steps=STEPS, shape=SHAPE):
    """BYOL on a one-conv encoder, a 4 -> 16 -> 8 projector and a DirectPredictor(freq=2).

    freq=2 makes the kernel both overwritten (steps 0, 2, 4 ...) and trained by the optimizer
    (in between), so both paths are compared. Call inside ``strategy.scope()``.
    ``shape=(None, None, 1)`` builds an encoder that takes any size (multi-crop).
    """
    import keras

    from keras_ncssl import heads
    from keras_ncssl.models import BYOL
    from keras_ncssl.predictors import DirectPredictor

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(FEATURES, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(synchronized=synchronized_bn)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    encoder = keras.Model(inputs, x, name="encoder")
    projector = heads.projector(FEATURES, 16, PROJECTION, synchronized_bn=synchronized_bn,
                                bn_affine=True)
    model = BYOL(encoder, projector, DirectPredictor(rho=0.3, freq=2), total_steps=steps)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def dataset_fn(x1, x2, global_batch=GLOBAL_BATCH):
    """``fn(input_context)`` for distribute_datasets_from_function.

    Shards examples (not batches) by input pipeline, then batches the per-replica size. Global
    step k then covers examples [k B, (k + 1) B) whatever the layout: with W pipelines of R
    replicas, pipeline w holds examples w, w + W, ... and its R replicas take consecutive
    per-replica batches of them.
    """
    import tensorflow as tf

    def fn(context):
        dataset = tf.data.Dataset.from_tensor_slices((x1, x2))
        dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
        return dataset.batch(context.get_per_replica_batch_size(global_batch), drop_remainder=True)

    return fn


def single_dataset(x1, x2, global_batch=GLOBAL_BATCH):
    """The one-device input: the same examples in global batches."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x1, x2)).batch(global_batch, drop_remainder=True)


def train(model, dataset, steps=STEPS):
    """``fit`` for exactly ``steps`` steps (steps_per_epoch: see distribute.py on cardinality)."""
    model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return model


def snapshot(model):
    """{group: [arrays]}: what a distributed run must reproduce, grouped for the report."""
    import numpy as np

    def arrays(variables):
        return [np.array(v.numpy()) for v in variables]

    bn_stats = [v for v in model.encoder.weights + model.projector.weights if not v.trainable]
    return {
        "online": arrays(model.online_variables),
        "target": arrays([t for t, _ in model.target_pairs()]),
        "bn_moving_stats": arrays(bn_stats),
        "correlation": arrays([model.predictor.correlation]),
        "kernel": arrays([model.predictor.kernel]),
        "counters": [np.array(int(model.optimizer.iterations.numpy())),
                     np.array(int(model.predictor.step.numpy())),
                     np.array(int(model.predictor.num_updates.numpy()))],
    }


def save_snapshot(path, snap):
    import numpy as np

    np.savez(path, **{f"{group}/{i}": a for group, items in snap.items()
                      for i, a in enumerate(items)})


def load_snapshot(path):
    import numpy as np

    snap = {}
    with np.load(path) as data:
        for key in sorted(data.files, key=lambda k: (k.split("/")[0], int(k.split("/")[1]))):
            snap.setdefault(key.split("/")[0], []).append(data[key])
    return snap


def max_abs_diff(a, b):
    """{group: max |a - b|} over two snapshots."""
    import numpy as np

    return {group: max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
                       for x, y in zip(a[group], b[group])) for group in a}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--init", required=True, help="npz of model.get_weights() to start from")
    parser.add_argument("--out", required=True, help="where to write the snapshot (npz)")
    parser.add_argument("--checkpoint", required=True, help="tf.train.Checkpoint path prefix")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from keras_ncssl import distribute

    # Created first: MultiWorkerMirroredStrategy must start its server before TF runs anything.
    strategy = distribute.get_strategy("multi_worker")
    with strategy.scope():
        model = build_model(synchronized_bn=True, steps=args.steps)
    with np.load(args.init) as init:
        model.set_weights([init[f"w{i}"] for i in range(len(init.files))])
    x1, x2 = make_views(args.steps)
    data = distribute.distribute_pretrain_dataset(strategy, dataset_fn(x1, x2), GLOBAL_BATCH)
    train(model, data, args.steps)
    snap = snapshot(model)
    # Every replica must hold the same predictor kernel: record the largest disagreement.
    kernel = model.predictor.kernel.value
    parts = [p.numpy() for p in getattr(kernel, "values", (kernel,))]
    spread = max(float(np.abs(part - parts[0]).max()) for part in parts)
    snap["kernel_replica_spread"] = [np.array(spread)]
    save_snapshot(args.out, snap)
    # Every worker takes part in the save; only the chief writes the shared path.
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    ckpt.write(distribute.worker_path(args.checkpoint, strategy))
    print(f"worker {strategy.cluster_resolver.task_id}: {strategy.num_replicas_in_sync} replicas, "
          f"done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
