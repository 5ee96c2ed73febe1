"""Train-step throughput of exactly what the runner trains: its flags, builders and set-up.

Every flag of experiments/run.py applies (precision, --threads, --strategy, batch, model), so
a flagfile times its own run's step; augmentation and input are excluded (random images of
the configured shape, one fixed batch). Prints one JSON line: images_per_sec = global batch /
median step time (a sample = one pair of views), and the precision/threads/steps per execution
actually used. With steps_per_execution N (the runner's --steps_per_execution) each timed call of
the train function runs N steps, as in the run's fit, and a step's time is the call's over N.

    python experiments/bench.py train_step --flagfile=experiments/quick.flags --steps=60 --warmup=10
    python experiments/bench.py train_step --encoder=resnet18 --image_size=32 --batch_size=128   # the peer's ResNet step
    python experiments/bench.py train_step --flagfile=experiments/quick.flags --mixed_precision=none --threads=default
"""
import json
import os
import statistics
import sys
import time

from absl import flags

from benchmarks import prepare_run

flags.DEFINE_integer("steps", 8, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (tracing, allocation).")
flags.DEFINE_string("profile_dir", "", "Also trace --steps steps with the TensorFlow profiler into this "
                    "folder (TensorBoard's Profile tab) and print where the time went (op_profile.py).")
FLAGS = flags.FLAGS


def main(argv):
    config, prepared = prepare_run("train_step", argv, mode="pretrain")
    import builders
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_ncssl import runtime

    model, strategy = prepared.model, prepared.strategy
    shape = builders.input_shape(config)
    rng = np.random.default_rng(0)
    views = tuple(tf.constant(rng.normal(size=(config["batch_size"], *shape)).astype(np.float32))
                  for _ in range(2))
    dataset = tf.data.Dataset.from_tensors(views).repeat()
    if strategy.num_replicas_in_sync > 1:
        dataset = strategy.experimental_distribute_dataset(dataset.unbatch().batch(config["batch_size"]))
    iterator = iter(dataset)
    model.make_train_function()  # the compiled function fit() runs, called directly
    per_call = model.steps_per_execution
    calls = max(1, round(FLAGS.steps / per_call))

    def one():
        logs = model.train_function(iterator)
        float(logs["loss"])  # block until the steps have finished

    for _ in range(max(1, -(-FLAGS.warmup // per_call))):
        one()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        one()
        times.append((time.perf_counter() - start) / per_call)
    median = statistics.median(times)
    if FLAGS.profile_dir:  # a separate traced run: tracing slows the steps it records
        from benchmarks import op_profile
        tf.profiler.experimental.start(FLAGS.profile_dir)
        for _ in range(calls):
            one()
        tf.profiler.experimental.stop()
        print(op_profile.summary(FLAGS.profile_dir, steps=calls * per_call), file=sys.stderr)
    described = runtime.describe()
    print(json.dumps({
        "bench": "train_step", "framework": f"keras {keras.__version__} / tf {tf.__version__}",
        "encoder": config["encoder"], "image": config["image_size"], "channels": config["channels"],
        "feature_dim": int(model.encoder.output_shape[-1]), "projection_dim": config["projection_dim"],
        "predictor": config["predictor"], "batch": config["batch_size"], "strategy": config["strategy"],
        "replicas": strategy.num_replicas_in_sync, "precision": described["precision"],
        "intra_op_threads": described["intra_op_threads"], "inter_op_threads": described["inter_op_threads"],
        "jit_compile": config["jit_compile"], "forward_views_together": config["forward_views_together"],
        "steps_per_execution": per_call,
        "step_s": round(median, 5), "images_per_sec": round(config["batch_size"] / median, 2),
        "steps": calls * per_call, "optimizer_steps": int(model.optimizer.iterations.numpy()),
        "load_avg_1min": os.getloadavg()[0]}))
