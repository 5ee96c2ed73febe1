"""Whole-fit throughput on the real augmented input: the runner's model and input, one `model.fit`
per epoch as the runner calls it, without its callbacks unless --callbacks names some. Every flag
of run.py applies (--steps_per_execution too).

The train_step benchmark times one compiled step on a fixed batch; this one times what a run's
epochs see, fit after fit, to show how much the rate varies between fits of the same process
(BUILD_NOTES "Quick run speed": on the 2-core EPYC some fits run at two thirds of the others'
rate). Prints one JSON line: pairs per second of each fit.

    python experiments/bench.py fit_epochs --flagfile=experiments/quick.flags --steps=936 --fits=5
    python experiments/bench.py fit_epochs --flagfile=experiments/quick.flags --steps=936 --steps_per_execution=1
    python experiments/bench.py fit_epochs --flagfile=experiments/quick.flags --steps=936 --fits=6 --single_fit \
        --callbacks=spectrum
"""
import json
import tempfile
import time

from absl import flags

from benchmarks import prepare_run

CALLBACKS = ("spectrum", "tensorboard", "epoch_end")
flags.DEFINE_integer("steps", 300, "Steps per fit (936 = a Fashion-MNIST epoch at batch 64).")
flags.DEFINE_integer("fits", 5, "Fits to time, each on a fresh epoch's input.")
flags.DEFINE_float("pause_s", 0.0, "Seconds to sleep between fits (the runner spends a few on its epoch-end "
                   "monitors, checkpoint and summaries).")
flags.DEFINE_enum("between", "none", ["none", "alloc", "spectrum"], "Work between fits: none; alloc (a few "
                  "eager tensors of random sizes, kept alive: the allocator's state changes); spectrum (the "
                  "runner's SpectrumMonitor measurement).")
flags.DEFINE_list("callbacks", [], "Callbacks to attach to every fit: spectrum (the runner's SpectrumMonitor), "
                  "tensorboard (into a temporary folder), epoch_end (an empty on_epoch_end).")
flags.DEFINE_bool("single_fit", False, "One fit of --fits epochs (as a library user calls fit; --pause_s and "
                  "--between do not apply) instead of one fit per epoch (as the runner does).")
flags.register_validator("callbacks", lambda names: set(names) <= set(CALLBACKS),
                         f"--callbacks: allowed names are {', '.join(CALLBACKS)}.")
FLAGS = flags.FLAGS


def main(argv):
    config, prepared = prepare_run("fit_epochs", argv, mode="pretrain")
    import keras
    import numpy as np
    import pretraining
    import tensorflow as tf

    from keras_ncssl import runtime
    from keras_ncssl.callbacks import SpectrumMonitor

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # does nothing: is a callback's mere presence enough?
            pass

    model = prepared.model
    tensorboard_dir = tempfile.TemporaryDirectory()
    make = {"spectrum": SpectrumMonitor, "epoch_end": EpochEnd,
            "tensorboard": lambda: keras.callbacks.TensorBoard(tensorboard_dir.name)}
    attached = [make[name]() for name in FLAGS.callbacks]
    monitor = SpectrumMonitor()
    monitor.set_model(model)
    rng, kept = np.random.default_rng(0), []
    rates = []
    if FLAGS.single_fit:
        class EpochTimer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):  # first, so the attached callbacks' work is not timed
                rates.append(round(FLAGS.steps * config["batch_size"] / (time.perf_counter() - self.start)))

        dataset = pretraining.pretrain_input(config, prepared.splits, 0).repeat()
        model.fit(dataset, epochs=FLAGS.fits, steps_per_epoch=FLAGS.steps, verbose=0,
                  callbacks=[EpochTimer(), *attached])
    else:
        for epoch in range(FLAGS.fits):
            if epoch:
                time.sleep(FLAGS.pause_s)
                if FLAGS.between == "alloc":
                    kept += [tf.random.normal([int(n)]) for n in rng.integers(1, 1 << 20, size=4)]
                elif FLAGS.between == "spectrum":
                    monitor.measure()
            dataset = pretraining.pretrain_input(config, prepared.splits, epoch).take(FLAGS.steps)
            start = time.perf_counter()
            model.fit(dataset, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0, callbacks=attached)
            rates.append(round(FLAGS.steps * config["batch_size"] / (time.perf_counter() - start)))
    print(json.dumps({"benchmark": "fit_epochs", "pairs_per_sec": rates, "steps": FLAGS.steps,
                      "single_fit": FLAGS.single_fit,
                      "steps_per_execution": model.steps_per_execution, "callbacks": FLAGS.callbacks,
                      "runtime": runtime.describe(prepared.precision)}), flush=True)
