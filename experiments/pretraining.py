"""The pretraining stage: the augmented input of each epoch, Keras fit with resumable
checkpoints (every N steps and at epoch ends), the monitors, pretrain.json and history.csv."""
import csv
import hashlib
import io
import os
import sys
import time

import keras
import numpy as np

from evaluation_stage import eval_arrays
from keras_ncssl import augment, distribute, evaluation, models, runtime
from keras_ncssl.callbacks import SpectrumMonitor
from keras_ncssl.checkpoint import TrainingCheckpoint
from keras_ncssl.files import write_json_atomic, write_text_atomic
from runner_flags import ConfigError
from workdir import workdir_file


class TrainingDivergedError(RuntimeError):
    """Training stopped on non-finite losses or weights; the newest checkpoint is finite."""


def epoch_seed(seed, epoch):
    """A per-epoch seed, so the pipeline of any epoch can be rebuilt exactly on resume."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def steps_per_epoch(config, splits, replicas):
    if config.optimisation.batch_size % replicas:
        raise ConfigError(f"--batch_size={config.optimisation.batch_size} is not divisible by the {replicas} replicas "
                         f"of --strategy={config.run.strategy}; use a multiple of {replicas}.")
    n = splits.num_examples["pretrain"]
    if config.data.pretrain_limit:
        n = min(n, config.data.pretrain_limit)
    steps = n // config.optimisation.batch_size
    if config.optimisation.steps_per_epoch:
        steps = min(steps, config.optimisation.steps_per_epoch)
    if steps < 1:
        raise ConfigError(f"--batch_size={config.optimisation.batch_size} exceeds the {n} pretraining images; use a "
                          f"batch size <= {n}.")
    return steps


def pretrain_input(config, splits, epoch):
    images = splits.pretrain
    if config.data.pretrain_limit:
        images = images.take(config.data.pretrain_limit)
    preset = augment.with_view_options(config.data.augment, config.data.augment_options)
    local = {}
    if config.data.local_views:
        scale = [float(v) for v in config.data.local_crop_scale]
        local = dict(local_views=config.data.local_views,
                     local_size=config.data.local_size or max(2, config.data.image_size // 2),
                     local_config=augment.local_view_config(preset, scale))
    return augment.pretrain_dataset(
        images, preset=preset, batch_size=config.optimisation.batch_size, image_size=config.data.image_size,
        channels=config.data.channels, seed=epoch_seed(config.optimisation.seed, epoch), mean=splits.mean,
        std=splits.std, shuffle_buffer=min(splits.num_examples["pretrain"], 20_000), **local)


class _StepCheckpoint(keras.callbacks.Callback):
    """Checkpoints every N steps inside an epoch (the epoch-end save is the runner's).

    Keras calls back once per execution of ``steps_per_execution`` steps, with ``batch`` the index
    of its last step in this fit; the save comes at the first call at or past each multiple of N
    (exactly at it when N is a multiple of steps_per_execution, as runner_flags asks, and the
    epoch did not resume between two multiples of steps_per_execution)."""

    def __init__(self, save, every, first_step, steps):
        super().__init__()
        self.save, self.every, self.first, self.steps = save, every, first_step, steps
        self.done = first_step

    def on_train_batch_end(self, batch, logs=None):
        step = self.first + batch + 1
        if self.every and step // self.every > self.done // self.every and step < self.steps:
            self.save(step)
        self.done = step


def _metric_sums(model):
    """{name: [total, count]} of the model's running-mean metrics (loss, projection_std)."""
    return {m.name: [float(m.total.numpy()), float(m.count.numpy())]
            for m in model.metrics if isinstance(m, keras.metrics.Mean)}


class _ResumeEpochMetrics(keras.callbacks.Callback):
    """Puts back the running sums of an epoch interrupted after some steps, so that the resumed
    epoch's logged means cover all of its steps, as an uninterrupted run's do (Keras resets the
    metrics just before ``on_epoch_begin``)."""

    def __init__(self, sums):
        super().__init__()
        self.sums = sums

    def on_epoch_begin(self, epoch, logs=None):
        for metric in self.model.metrics:
            if metric.name in self.sums:
                total, count = self.sums[metric.name]
                metric.total.assign(total)
                metric.count.assign(count)
        self.sums = {}


def _write_history_csv(path, history):
    """logs/history.csv, rewritten from the checkpointed records: one row per epoch, whatever
    the interruptions (a resumed epoch is one row, never two)."""
    columns = []
    for row in history:
        columns += [k for k in row if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, text.getvalue())


class _BetweenFits:
    """The epoch-end callbacks (monitors, TensorBoard), driven by the runner after each epoch's
    ``fit`` returns instead of inside it.

    Why: eager work inside ``fit`` (the monitors' eigh and feature extraction, summary writes)
    put 40-70 % of the following epochs into a state where the same train step ran 1.25-1.5x
    slower for the whole epoch (BUILD_NOTES, "The slow epochs"); the same work between two fits
    did not. The hooks are the Keras ones, called in list order with the same ``logs`` dict, so
    each callback sees what the ones before it added (the kNN and spectrum scalars reach
    TensorBoard and history.csv) and ``params["epochs"]`` is the whole run's. (Keras'
    ``CallbackList.on_epoch_end`` hands the callbacks a converted copy of ``logs``, so the
    runner's history would not see the monitors' scalars.)
    """

    def __init__(self, callbacks, model, epochs, steps):
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            callback.set_model(model)
            callback.set_params({"epochs": epochs, "steps": steps, "verbose": 0})

    def __enter__(self):
        for callback in self.callbacks:
            callback.on_train_begin()
        return self

    def on_epoch_end(self, epoch, logs):
        for callback in self.callbacks:
            callback.on_epoch_end(epoch, logs)

    def __exit__(self, *exc_info):
        for callback in reversed(self.callbacks):
            callback.on_train_end()


def _fit_verbosity(config):
    """--verbose=auto: Keras' progress bar in a terminal; elsewhere (a file, make, CI) none, so
    the log holds only the runner's line per epoch instead of megabytes of redraws."""
    if config.run.verbose == "auto":
        return 1 if sys.stdout.isatty() else 0
    return int(config.run.verbose)


def _non_finite_weights(model):
    """Paths of the model's floating-point weights that hold a NaN or Inf."""
    return [v.path for v in model.weights
            if "float" in str(v.dtype) and not np.all(np.isfinite(np.asarray(v.numpy())))]


def _diverged(config, message):
    return TrainingDivergedError(
        f"{message} No checkpoint with non-finite weights was written: the newest one in "
        f"{workdir_file(config, 'checkpoints')} is the last finite state. To resume from it with a lower "
        f"learning rate, rerun the same command with --lr={config.optimisation.lr / 10:g} --allow_changes=lr.")


def pretrain(config, strategy, splits, model):
    steps = steps_per_epoch(config, splits, strategy.num_replicas_in_sync)
    # Every worker saves (the save is collective); only the chief writes the real directory.
    checkpoint = TrainingCheckpoint(distribute.worker_path(workdir_file(config, "checkpoints"), strategy),
                                    model, config.run.keep_checkpoints)
    state = checkpoint.restore()
    start_epoch, start_step, records = (0, 0, {"history": [], "spectrum": [], "train_seconds": 0.0,
                                                "images_trained": 0}) if state is None else state
    if state is not None:
        print(f"Resuming {config.run.workdir} at epoch {start_epoch + 1}, step {start_step}/{steps}.")
        try:  # a constant --lr is an optimizer variable, restored with the checkpoint: --lr rules
            model.optimizer.learning_rate = config.optimisation.lr
        except TypeError:  # a schedule: rebuilt from the flags, nothing was restored
            pass
    if state is None and (os.path.exists(workdir_file(config, "pretrain.json"))
                          or os.path.exists(workdir_file(config, "logs", "history.csv"))):
        print(f"WARNING: {config.run.workdir} has a training history but no checkpoint: training restarts from "
              "scratch and its history is rewritten.", file=sys.stderr, flush=True)
    if start_epoch >= config.optimisation.epochs:
        print(f"Pretraining already complete ({config.optimisation.epochs} epochs).")
        return model
    # Trainable predictors keep no correlation: the monitor then measures F on these images.
    probe = eval_arrays(config, splits, "validation", 512)[0] if splits.num_classes else None
    monitor = SpectrumMonitor(probe_images=probe)  # warns below diagnostics.collapse_threshold(d)
    monitor.records = list(records["spectrum"])
    knn = None
    if config.evaluation.knn_monitor_every and splits.num_classes:
        bank = eval_arrays(config, splits, "train", config.evaluation.knn_monitor_bank)
        queries = eval_arrays(config, splits, "validation", config.evaluation.knn_monitor_queries)
        knn = evaluation.KNNMonitor(*bank, *queries, k=min(config.evaluation.knn_k, len(bank[1])),
                                    temperature=config.evaluation.knn_temperature,
                                    every_n_epochs=config.evaluation.knn_monitor_every)
    os.makedirs(workdir_file(config, "logs"), exist_ok=True)
    # Order matters: the monitors put their scalars into the logs TensorBoard then writes.
    between = _BetweenFits([c for c in (knn, monitor) if c is not None]
                           + [keras.callbacks.TensorBoard(workdir_file(config, "logs"))],
                           model, config.optimisation.epochs, steps)
    verbose = _fit_verbosity(config)

    def save(epoch, step_in_epoch):
        bad = _non_finite_weights(model)  # the train step skips non-finite updates, but a finite
        if bad:                           # update can still overflow the weights it is added to
            where = f"epoch {epoch + 1}, step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epoch}"
            raise _diverged(config, f"training diverged at {where}: {len(bad)} "
                                    f"weight tensor(s) are no longer finite ({', '.join(bad[:3])}).")
        if int(model.consecutive_nonfinite_steps.numpy()):
            # Steps are being skipped: perhaps the start of a divergence. The newest checkpoint
            # stays the last one taken before it.
            where = f"epoch {epoch + 1}, step {step_in_epoch}" if step_in_epoch else f"the end of epoch {epoch}"
            print(f"Not checkpointing at {where}: the last step was skipped as non-finite.", file=sys.stderr,
                  flush=True)
            return
        records["spectrum"] = monitor.records
        if step_in_epoch:
            records["partial_epoch"] = {"epoch": epoch, "step": step_in_epoch, "metric_sums": _metric_sums(model)}
        else:
            records.pop("partial_epoch", None)
        checkpoint.save(epoch, step_in_epoch, records, number=epoch * steps + step_in_epoch)

    with between:
        if knn is not None and state is None:  # the untrained encoder's value: the curve's own baseline
            records["knn_top1_at_init"] = float(knn.evaluate())
            print(f"kNN monitor before training: {records['knn_top1_at_init']:.4f}", flush=True)
        for epoch in range(start_epoch, config.optimisation.epochs):
            first = start_step if epoch == start_epoch else 0
            dataset = pretrain_input(config, splits, epoch).skip(first).take(steps - first)
            step_saver = _StepCheckpoint(lambda s, e=epoch: save(e, s), config.run.checkpoint_every_steps, first,
                                         steps)
            extra = [step_saver]
            partial = records.get("partial_epoch")
            if first and partial and (partial["epoch"], partial["step"]) == (epoch, first):
                extra.append(_ResumeEpochMetrics(partial["metric_sums"]))
            began = time.perf_counter()
            try:
                history = model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1,
                                    steps_per_epoch=steps - first, callbacks=extra, verbose=verbose)
            except models.NonFiniteTrainingError as error:
                raise _diverged(config, f"epoch {epoch + 1}/{config.optimisation.epochs}: {error}") from None
            seconds = time.perf_counter() - began
            logs = {k: float(v[-1]) for k, v in history.history.items()}
            between.on_epoch_end(epoch, logs)  # before the checkpoint: it saves the spectrum records
            images = (steps - first) * config.optimisation.batch_size
            logs.update(epoch=epoch + 1, seconds=seconds, images_per_sec=images / seconds)
            records["history"].append(logs)
            records["train_seconds"] += seconds
            records["images_trained"] += images
            save(epoch + 1, 0)
            if distribute.is_chief(strategy):
                _write_history_csv(workdir_file(config, "logs", "history.csv"), records["history"])
            summary = " ".join(f"{k}={logs[k]:.4g}" for k in ("loss", "projection_std", "knn_top1", "effective_rank")
                               if k in logs)
            if logs.get("nonfinite_steps"):
                summary += f" nonfinite_steps={int(logs['nonfinite_steps'])}"
            print(f"epoch {epoch + 1}/{config.optimisation.epochs}: {summary} ({seconds:.0f}s, "
                  f"{logs['images_per_sec']:.0f} img/s)", flush=True)
    if not distribute.is_chief(strategy):
        return model
    write_json_atomic(workdir_file(config, "pretrain.json"), {
        "epochs": config.optimisation.epochs, "steps_per_epoch": steps, "history": records["history"],
        "spectrum": monitor.records, "knn_top1_at_init": records.get("knn_top1_at_init"),
        "train_seconds": records["train_seconds"],
        "runtime": dict(runtime.describe(), steps_per_execution=model.steps_per_execution),
        "images_per_sec": records["images_trained"] / max(records["train_seconds"], 1e-9)})
    return model
