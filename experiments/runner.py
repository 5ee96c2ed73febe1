"""The stages of experiments/run.py: pretrain, eval, export, report, on one work directory.

Work directory layout:
    flags.json            the resolved flags of the run that created it
    checkpoints/          atomic training checkpoints (+ records JSON), resumable
    logs/                 TensorBoard (train/ scalars per epoch) and history.csv
    pretrain.json         per-epoch history and diagnostics, train time and throughput
    eval.json             trained / random-init / raw-pixel results, one protocol
    encoder/              the export: SavedModel (serve: raw images -> embeddings), encoder.keras
    report.json, report.md, plots/*.png
"""
import csv
import hashlib
import json
import os
import sys
import time
import types

import keras
import numpy as np
import tensorflow as tf

import runner_flags
from keras_ncssl import (augment, data, distribute, encoders, evaluation, export, heads, models, optimizers,
                         predictors, runtime, schedules)
from keras_ncssl.callbacks import SpectrumMonitor
from keras_ncssl.checkpoint import TrainingCheckpoint, write_json_atomic
from runner_flags import ConfigError


class ConfigMismatchError(ConfigError):
    """The work directory belongs to a run with different training flags."""


class TrainingDivergedError(RuntimeError):
    """Training stopped on non-finite losses or weights; the newest checkpoint is finite."""


def _path(config, *parts):
    return os.path.join(config["workdir"], *parts)


def _read_json(path):
    with open(path) as handle:
        return json.load(handle)


def _epoch_seed(seed, epoch):
    """A per-epoch seed, so the pipeline of any epoch can be rebuilt exactly on resume."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# -- set-up ------------------------------------------------------------------------------------

def check_workdir(config):
    """Create the workdir or check it belongs to this configuration; never overwrite.

    Training flags must match the workdir's, except those named in --allow_changes (from
    runner_flags.RESUMABLE): a change is recorded in flags.json's "history" and becomes the
    workdir's value. Raises ConfigError (one line) before anything is written.
    """
    flags_path = _path(config, "flags.json")
    training = runner_flags.training_subset(config)
    if os.path.exists(flags_path):
        saved = _read_json(flags_path)
        saved_training = saved.get("training", {})
        # A flag added after the workdir was made is taken at its default there.
        saved_training = {k: saved_training.get(k, runner_flags.default(k)) for k in training}
        diff = {k: (saved_training[k], v) for k, v in training.items() if saved_training[k] != v}
        allowed = {k: d for k, d in diff.items() if k in config["allow_changes"]}
        refused = {k: d for k, d in diff.items() if k not in allowed}
        if refused:
            lines = "; ".join(f"--{k}: workdir has {a!r}, this run asks {b!r}" for k, (a, b) in sorted(refused.items()))
            resumable = [k for k in refused if k in runner_flags.RESUMABLE]
            hint = (f" (or, to change {', '.join(resumable)} on resume, add --allow_changes={','.join(resumable)})"
                    if resumable else "")
            raise ConfigMismatchError(
                f"--workdir={config['workdir']} belongs to a different configuration: {lines}. Use a new --workdir, "
                f"or repeat the original flags to resume it{hint}. Nothing was changed.")
        if allowed and config["mode"] in ("all", "pretrain"):
            saved["training"].update({k: b for k, (a, b) in allowed.items()})
            saved.setdefault("history", []).append({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "changes": {k: {"from": a, "to": b} for k, (a, b) in sorted(allowed.items())}})
            write_json_atomic(flags_path, saved)
            print("Changed on resume (recorded in flags.json): "
                  + ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in sorted(allowed.items())), flush=True)
        return
    if config["mode"] not in ("all", "pretrain"):
        raise ConfigError(f"--mode={config['mode']} needs an existing work directory with a pretrained model; "
                          f"--workdir={config['workdir']} has no flags.json. Run --mode=pretrain (or all) first.")
    os.makedirs(config["workdir"], exist_ok=True)
    write_json_atomic(flags_path, {"training": training, "all": config})


def load_data(config):
    options = {"download": True} if config["download"] else {}
    if config["dataset"] == "image_folder":
        options["on_corrupt"] = config["on_corrupt"]
    splits = data.load_dataset(config["dataset"], data_dir=config["data_dir"],
                               validation_fraction=config["validation_fraction"], seed=0, **options)
    counts = ", ".join(f"{split} {n}" for split, n in splits.num_examples.items())
    print(f"Data: {splits.name} from {splits.source or 'memory'} ({counts}).", flush=True)
    return splits


def get_strategy(config):
    return distribute.get_strategy(config["strategy"], tpu_address=config["tpu_address"])


def _synchronized_bn(config, strategy):
    setting = {"auto": "auto", "true": True, "false": False}[config["synchronized_bn"]]
    return distribute.use_synchronized_bn(strategy, setting)


def input_shape(config):
    return (config["image_size"], config["image_size"], config["channels"])


def encoder_input_shape(config):
    """Multi-crop feeds the encoder two sizes: build it for any size then."""
    return (None, None, config["channels"]) if config["local_views"] else input_shape(config)


def build_encoder(config, synchronized_bn=False):
    options = dict(synchronized_bn=synchronized_bn, width_multiplier=config["width_multiplier"])
    if config["encoder"].startswith("resnet"):
        options["stem"] = config["stem"]
    elif config["encoder"] == "small":
        options["stem_stride"] = config["stem_stride"]
        options["convs_per_stage"] = config["convs_per_stage"]
        if config["widths"]:
            options["widths"] = tuple(config["widths"])
    return encoders.get_encoder(config["encoder"], encoder_input_shape(config), **options)


def build_predictor(config, synchronized_bn=False):
    name = config["predictor"]
    if name in predictors.RULES:
        rule_options = {}
        if name == "directpred":
            rule_options = dict(power=config["power"], eps_inside=config["eps_inside"])
        elif name == "directcopy":
            rule_options = dict(normalize=config["normalize"])
        elif config["rule_iterations"] and name in ("visser", "newton_schulz", "ns2", "stiefel"):
            rule_options = dict(iterations=config["rule_iterations"])
        return predictors.get_predictor(
            name, config["projection_dim"], rho=config["rho"], eps=config["eps"], freq=config["freq"],
            predictor_ema=config["predictor_ema"], zero_mean=config["zero_mean"], rule_options=rule_options,
            rule_device=None if config["rule_device"] == "none" else config["rule_device"])
    return predictors.get_predictor(name, config["projection_dim"], hidden_dim=config["predictor_hidden"],
                                    synchronized_bn=synchronized_bn)


def build_optimizer(config, total_steps, steps_per_epoch):
    warmup = int(round(config["warmup_epochs"] * steps_per_epoch))
    lr = config["lr"]
    if config["lr_schedule"] == "cosine" or warmup:
        lr = schedules.WarmupCosine(config["lr"], total_steps, warmup_steps=min(warmup, total_steps),
                                    constant=config["lr_schedule"] == "constant")
    options = dict(learning_rate=lr, momentum=config["momentum"], weight_decay=config["weight_decay"])
    if config["predictor_lr_multiplier"] != 1.0:
        options["lr_multipliers"] = {"predictor": config["predictor_lr_multiplier"]}
    if config["predictor_only_weight_decay"]:
        options["weight_decay_include"] = ["predictor"]
    cls = optimizers.SGD if config["optimizer"] == "sgd" else optimizers.LARS
    return cls(**options)


def build_model(config, total_steps, steps_per_epoch, strategy):
    """The BYOL/SimSiam model of the configuration, compiled, weights seeded by --seed."""
    keras.utils.set_random_seed(config["seed"])
    sync = _synchronized_bn(config, strategy)
    encoder = build_encoder(config, sync)
    projector = heads.projector(encoder.output_shape[-1], config["projector_hidden"], config["projection_dim"],
                                synchronized_bn=sync, bn_affine=config["projector_bn_affine"])
    predictor = build_predictor(config, sync)
    common = dict(forward_views_together=config["forward_views_together"],
                  max_consecutive_nonfinite=config["max_consecutive_nonfinite"])
    if config["method"] == "byol":
        model = models.BYOL(encoder, projector, predictor, tau_base=config["tau_base"],
                            tau_schedule=config["tau_schedule"], ema=config["ema"],
                            total_steps=total_steps, **common)
    else:
        model = models.SimSiam(encoder, projector, predictor, **common)
    model.compile(optimizer=build_optimizer(config, total_steps, steps_per_epoch),
                  jit_compile=config["jit_compile"])
    model.optimizer.build(model.online_variables)  # slots must exist before a restore
    return model


def steps_per_epoch(config, splits, replicas):
    if config["batch_size"] % replicas:
        raise ConfigError(f"--batch_size={config['batch_size']} is not divisible by the {replicas} replicas "
                         f"of --strategy={config['strategy']}; use a multiple of {replicas}.")
    n = splits.num_examples["pretrain"]
    if config["pretrain_limit"]:
        n = min(n, config["pretrain_limit"])
    steps = n // config["batch_size"]
    if config["steps_per_epoch"]:
        steps = min(steps, config["steps_per_epoch"])
    if steps < 1:
        raise ConfigError(f"--batch_size={config['batch_size']} exceeds the {n} pretraining images; use a "
                          f"batch size <= {n}.")
    return steps


def pretrain_input(config, splits, epoch):
    images = splits.pretrain
    if config["pretrain_limit"]:
        images = images.take(config["pretrain_limit"])
    preset = augment.with_view_options(config["augment"], config["augment_options"])
    local = {}
    if config["local_views"]:
        scale = [float(v) for v in config["local_crop_scale"]]
        local = dict(local_views=config["local_views"],
                     local_size=config["local_size"] or max(2, config["image_size"] // 2),
                     local_config=augment.local_view_config(preset, scale))
    return augment.pretrain_dataset(
        images, preset=preset, batch_size=config["batch_size"], image_size=config["image_size"],
        channels=config["channels"], seed=_epoch_seed(config["seed"], epoch), mean=splits.mean,
        std=splits.std, shuffle_buffer=min(splits.num_examples["pretrain"], 20_000), **local)


def eval_arrays(config, splits, split, limit=None, as_dataset=False):
    """(normalised images in the encoder's input format, labels) of a labelled split; with
    ``as_dataset`` the batched dataset of them instead, read from the split's tf.data source
    (nothing is held in memory: the streaming probe's input)."""
    source = getattr(splits, split) if as_dataset else tf.data.Dataset.from_tensor_slices(
        splits.numpy(split, limit=limit))
    ds = augment.eval_dataset(source.take(limit) if as_dataset and limit else source, batch_size=1024,
                              image_size=config["image_size"], channels=config["channels"],
                              mean=splits.mean, std=splits.std)
    if as_dataset:
        return ds
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in ds])
    return np.concatenate(xs), np.concatenate(ys)


# -- stages ------------------------------------------------------------------------------------

class _StepCheckpoint(keras.callbacks.Callback):
    """Checkpoints every N steps inside an epoch (the epoch-end save is the runner's)."""

    def __init__(self, save, every, first_step):
        super().__init__()
        self.save, self.every, self.step = save, every, first_step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.every and self.step % self.every == 0:
            self.save(self.step)


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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def _fit_verbosity(config):
    """--verbose=auto: Keras' progress bar in a terminal; elsewhere (a file, make, CI) none, so
    the log holds only the runner's line per epoch instead of megabytes of redraws."""
    if config["verbose"] == "auto":
        return 1 if sys.stdout.isatty() else 0
    return int(config["verbose"])


def _non_finite_weights(model):
    """Paths of the model's floating-point weights that hold a NaN or Inf."""
    return [v.path for v in model.weights
            if "float" in str(v.dtype) and not np.all(np.isfinite(np.asarray(v.numpy())))]


def _diverged(config, message):
    return TrainingDivergedError(
        f"{message} No checkpoint with non-finite weights was written: the newest one in "
        f"{_path(config, 'checkpoints')} is the last finite state. To resume from it with a lower learning rate, "
        f"rerun the same command with --lr={config['lr'] / 10:g} --allow_changes=lr.")


def pretrain(config, strategy, splits, model):
    steps = steps_per_epoch(config, splits, strategy.num_replicas_in_sync)
    # Every worker saves (the save is collective); only the chief writes the real directory.
    checkpoint = TrainingCheckpoint(distribute.worker_path(_path(config, "checkpoints"), strategy), model,
                                    config["keep_checkpoints"])
    state = checkpoint.restore()
    start_epoch, start_step, records = (0, 0, {"history": [], "spectrum": [], "train_seconds": 0.0,
                                                "images_trained": 0}) if state is None else state
    if state is not None:
        print(f"Resuming {config['workdir']} at epoch {start_epoch + 1}, step {start_step}/{steps}.")
        try:  # a constant --lr is an optimizer variable, restored with the checkpoint: --lr rules
            model.optimizer.learning_rate = config["lr"]
        except TypeError:  # a schedule: rebuilt from the flags, nothing was restored
            pass
    if state is None and (os.path.exists(_path(config, "pretrain.json"))
                          or os.path.exists(_path(config, "logs", "history.csv"))):
        print(f"WARNING: {config['workdir']} has a training history but no checkpoint: training restarts from "
              "scratch and its history is rewritten.", file=sys.stderr, flush=True)
    if start_epoch >= config["epochs"]:
        print(f"Pretraining already complete ({config['epochs']} epochs).")
        return model
    # Trainable predictors keep no correlation: the monitor then measures F on these images.
    probe = eval_arrays(config, splits, "validation", 512)[0] if splits.num_classes else None
    monitor = SpectrumMonitor(probe_images=probe, collapse_std=0.1 / np.sqrt(config["projection_dim"]))
    monitor.records = list(records["spectrum"])
    callbacks = [monitor]
    if config["knn_monitor_every"] and splits.num_classes:
        bank = eval_arrays(config, splits, "train", config["knn_monitor_bank"])
        queries = eval_arrays(config, splits, "validation", config["knn_monitor_queries"])
        knn = evaluation.KNNMonitor(*bank, *queries, k=min(config["knn_k"], len(bank[1])),
                                    temperature=config["knn_temperature"],
                                    every_n_epochs=config["knn_monitor_every"])
        callbacks.insert(0, knn)
        if state is None:  # the untrained encoder's value: the curve's own baseline
            knn.set_model(model)
            records["knn_top1_at_init"] = float(knn.evaluate())
            print(f"kNN monitor before training: {records['knn_top1_at_init']:.4f}", flush=True)
    callbacks += [keras.callbacks.TensorBoard(_path(config, "logs"))]
    os.makedirs(_path(config, "logs"), exist_ok=True)
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
            print(f"Not checkpointing at {where}: the last step was skipped as non-finite.", file=sys.stderr, flush=True)
            return
        records["spectrum"] = monitor.records
        if step_in_epoch:
            records["partial_epoch"] = {"epoch": epoch, "step": step_in_epoch, "metric_sums": _metric_sums(model)}
        else:
            records.pop("partial_epoch", None)
        checkpoint.save(epoch, step_in_epoch, records, number=epoch * steps + step_in_epoch)

    for epoch in range(start_epoch, config["epochs"]):
        first = start_step if epoch == start_epoch else 0
        dataset = pretrain_input(config, splits, epoch).skip(first).take(steps - first)
        step_saver = _StepCheckpoint(lambda s, e=epoch: save(e, s), config["checkpoint_every_steps"], first)
        extra = [step_saver]
        partial = records.get("partial_epoch")
        if first and partial and (partial["epoch"], partial["step"]) == (epoch, first):
            extra.append(_ResumeEpochMetrics(partial["metric_sums"]))
        began = time.perf_counter()
        try:
            history = model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps - first,
                                callbacks=callbacks + extra, verbose=verbose)
        except models.NonFiniteTrainingError as error:
            raise _diverged(config, f"epoch {epoch + 1}/{config['epochs']}: {error}") from None
        seconds = time.perf_counter() - began
        logs = {k: float(v[-1]) for k, v in history.history.items()}
        logs.update(epoch=epoch + 1, seconds=seconds, images_per_sec=(steps - first) * config["batch_size"] / seconds)
        records["history"].append(logs)
        records["train_seconds"] += seconds
        records["images_trained"] += (steps - first) * config["batch_size"]
        save(epoch + 1, 0)
        if distribute.is_chief(strategy):
            _write_history_csv(_path(config, "logs", "history.csv"), records["history"])
        summary = " ".join(f"{k}={logs[k]:.4g}" for k in ("loss", "projection_std", "knn_top1", "effective_rank")
                           if k in logs)
        if logs.get("nonfinite_steps"):
            summary += f" nonfinite_steps={int(logs['nonfinite_steps'])}"
        print(f"epoch {epoch + 1}/{config['epochs']}: {summary} ({seconds:.0f}s, "
              f"{logs['images_per_sec']:.0f} img/s)", flush=True)
    if not distribute.is_chief(strategy):
        return model
    write_json_atomic(_path(config, "pretrain.json"), {
        "epochs": config["epochs"], "steps_per_epoch": steps, "history": records["history"],
        "spectrum": monitor.records, "knn_top1_at_init": records.get("knn_top1_at_init"),
        "train_seconds": records["train_seconds"], "runtime": runtime.describe(),
        "images_per_sec": records["images_trained"] / max(records["train_seconds"], 1e-9)})
    return model


def restore_for_eval(config, splits, model):
    """Restore the newest checkpoint into ``model``; refuse a partial one unless --allow_partial.

    Returns {"step", "total_steps", "complete"}: which training step the encoder comes from.
    """
    steps = steps_per_epoch(config, splits, 1)
    total = steps * config["epochs"]
    checkpoint = TrainingCheckpoint(_path(config, "checkpoints"), model)
    state = checkpoint.restore()
    if state is None:
        raise ConfigError(f"--mode={config['mode']}: --workdir={config['workdir']} has no checkpoint to evaluate; "
                          "run --mode=pretrain first.")
    epoch, step_in_epoch, _ = state
    step = epoch * steps + step_in_epoch
    newest = checkpoint.fell_back_from
    complete = step >= total and newest is None
    if not complete and not config["allow_partial"]:
        why = (f"its newest checkpoint ({os.path.basename(newest)}) could not be read, and the newest readable one"
               if newest else "its training is unfinished: the newest checkpoint")
        raise ConfigError(f"--mode={config['mode']}: --workdir={config['workdir']}: {why} is at step {step} of "
                          f"{total}. Finish training (rerun with --mode=pretrain), or pass --allow_partial to "
                          f"{config['mode']} the step-{step} model.")
    if not complete:
        print(f"WARNING: --allow_partial: using the model of step {step} of {total}.", file=sys.stderr, flush=True)
    return {"step": step, "total_steps": total, "complete": complete}


def evaluate(config, model, splits, trained_step=None):
    """Linear probe, kNN and few-label probe for the trained encoder and the two baselines.

    ``trained_step``: {"step", "total_steps", "complete"}, recorded in eval.json."""
    limit = config["probe_train_limit"] or None
    counts = splits.num_examples
    n_features = min(counts["train"], limit or counts["train"]) + counts["validation"] + counts["test"]
    streaming = config["linear_probe"] == "streaming" or (config["linear_probe"] == "auto" and evaluation.needs_streaming(
        n_features, model.encoder.output_shape[-1], int(config["probe_memory_budget_mb"] * 2**20)))
    protocol = ("frozen encoder (training=False) features, standardised on the probe's training split; "
                "multinomial logistic regression with its L2 strength chosen on the validation split "
                f"(validation = {config['validation_fraction']:.0%} of train, fixed seed), test split used once; ")
    if streaming:  # features over the memory budget: SGD heads over tf.data, linear probe only
        strategy = model.distribute_strategy
        datasets = [eval_arrays(config, splits, s, limit if s == "train" else None, as_dataset=True)
                    for s in ("train", "validation", "test")]
        results = {"protocol": protocol + f"solved by SGD over tf.data ({config['streaming_probe_epochs']} epochs, one "
                   "head per L2 strength); kNN, few-label probe and raw pixels skipped (--linear_probe="
                   f"{config['linear_probe']}, --probe_memory_budget_mb={config['probe_memory_budget_mb']})"}
        encoders = {"trained": model.encoder}
        if config["eval_baselines"]:
            keras.utils.set_random_seed(config["seed"])
            with strategy.scope():
                encoders["random_init"] = build_encoder(config)  # the same architecture and seed, untrained
        for name, encoder in encoders.items():
            print(f"Evaluating the {name} encoder (streaming linear probe) ...", flush=True)
            results[name] = evaluation.evaluate_encoder_streaming(
                encoder, *datasets, num_classes=splits.num_classes, epochs=config["streaming_probe_epochs"],
                strategy=strategy)
        results["encoder_step"] = trained_step
        write_json_atomic(_path(config, "eval.json"), results)
        print(f"linear probe {results['trained']['linear_probe_top1']:.4f} (streaming)", flush=True)
        return results
    train = eval_arrays(config, splits, "train", limit)
    val, test = eval_arrays(config, splits, "validation"), eval_arrays(config, splits, "test")
    options = dict(knn_k=config["knn_k"], knn_temperature=config["knn_temperature"],
                   few_label_n=config["few_label_per_class"] or None,
                   few_label_seeds=tuple(range(config["few_label_draws"])))
    results = {"protocol": protocol + (
        f"solved by L-BFGS to max|gradient| <= {evaluation.DEFAULT_TOL:g} per L2 value, "
        f"{evaluation.DEFAULT_TEST_TOL:g} for the tested model; "
        f"weighted kNN (cosine, k={config['knn_k']}, T={config['knn_temperature']}) with the training "
        f"split as bank; few-label probe with {config['few_label_per_class']} labels per class over "
        f"{config['few_label_draws']} draws")}
    print("Evaluating the trained encoder ...", flush=True)
    results["trained"] = evaluation.evaluate_encoder(model.encoder, train, val, test, **options)
    if config["eval_baselines"]:
        print("Evaluating the random-init baseline ...", flush=True)
        keras.utils.set_random_seed(config["seed"])
        random_encoder = build_encoder(config)  # the same architecture and seed, untrained
        results["random_init"] = evaluation.evaluate_encoder(random_encoder, train, val, test, **options)
        print("Evaluating the raw-pixel baseline ...", flush=True)
        native = [splits.numpy(s, limit=limit if s == "train" else None) for s in ("train", "validation", "test")]
        mean, std = np.asarray(splits.mean, np.float32), np.asarray(splits.std, np.float32)
        native = [(((x / 255.0 - mean) / std).astype(np.float32), y) for x, y in native]
        results["raw_pixels"] = evaluation.evaluate_raw_pixels(*native, **options)
    results["encoder_step"] = trained_step
    write_json_atomic(_path(config, "eval.json"), results)
    t = results["trained"]
    print(f"linear probe {t['linear_probe_top1']:.4f}  kNN {t['knn_top1']:.4f}  "
          f"few-label {t['few_label_top1_mean']}", flush=True)
    return results


# Evaluation numbers the export's metadata carries (per encoder: trained, random_init, raw_pixels).
_ACCURACY_KEYS = ("linear_probe_top1", "knn_top1", "few_label_top1_mean", "few_label_top1_std",
                  "few_label_n_per_class", "feature_dim", "n_train", "n_test")


def _accuracy_table(config, step):
    """eval.json's accuracy table, or None with the reason when it is not of this encoder."""
    path = _path(config, "eval.json")
    if not os.path.exists(path):
        return None, "no eval.json: run --mode=eval, then --mode=export"
    results = _read_json(path)
    evaluated = (results.get("encoder_step") or {}).get("step")
    state = _path(config, "checkpoints", "checkpoint")
    # An eval.json that does not record its step: older than the newest checkpoint means stale.
    stale = (evaluated != step) if evaluated is not None else (
        os.path.exists(state) and os.path.getmtime(path) < os.path.getmtime(state))
    if stale:
        return None, (f"eval.json evaluated another model (step {evaluated}) than this encoder's "
                      f"(step {step}): run --mode=eval, then --mode=export")
    table = {name: {k: results[name][k] for k in _ACCURACY_KEYS if k in results[name]}
             for name in ("trained", "random_init", "raw_pixels") if name in results}
    return {"protocol": results.get("protocol"), **table}, None


def export_metadata(config, model, trained_step=None):
    """What the export records about its run: training flags, step and the accuracy table.

    ``trained_step``: {"step", "total_steps", "complete"} as eval.json records it; without it
    the step is the optimizer's iteration count."""
    iterations = int(model.optimizer.iterations.numpy())
    step = iterations if trained_step is None else trained_step["step"]
    accuracy, missing = _accuracy_table(config, step)
    return {"training_flags": runner_flags.training_subset(config), "training_step": step,
            "training_complete": None if trained_step is None else trained_step["complete"],
            "optimizer_iterations": iterations, "accuracy": accuracy,
            "accuracy_missing_because": missing}


def export_stage(config, model, splits, trained_step=None):
    """The encoder export: raw-image signatures with the dataset statistics, encoder.keras."""
    # As eval_arrays -> augment.eval_dataset: resize fixed-size data; variable-size data
    # (ImageNet) is resized on the shorter side and centre-cropped.
    geometry = "center_crop" if None in tuple(splits.image_shape[:2]) else "resize"
    path = export.export_encoder(model, _path(config, "encoder"), input_shape=input_shape(config),
                                 mean=splits.mean, std=splits.std, preprocessing=geometry,
                                 metadata=export_metadata(config, model, trained_step),
                                 keras_model=True)
    print(f"Exported the encoder to {path} (signature 'serve': raw uint8 images -> embeddings; "
          f"'serve_normalized'; {export.KERAS_FILE}).", flush=True)
    return path


def preflight(config):
    """Everything that can fail on bad input, checked before the work directory is touched.

    The strategy (it must configure devices before TensorFlow starts), the data, the batch's
    divisibility, the model itself (built once here and used by the stages) and, for
    eval/export of an existing run, its checkpoint. Any failure is a ConfigError naming the
    flags involved; run.py prints it as one line.
    """
    mode = config["mode"]
    training = mode in ("all", "pretrain")
    prepared = types.SimpleNamespace(strategy=None, splits=None, model=None, trained_step=None)
    # Thread pools first: TensorFlow fixes them when it runs its first op.
    _config_errors(f"--threads={config['threads']}", lambda: runtime.set_threads(*threads_for(config)))
    if training:
        prepared.strategy = _config_errors(f"--strategy={config['strategy']}", lambda: get_strategy(config))
    if mode == "report":
        return prepared
    try:
        prepared.splits = _config_errors(f"--dataset={config['dataset']}"
                                         + (f" --data_dir={config['data_dir']}" if config["data_dir"] else ""),
                                         lambda: load_data(config))
    except ConfigError as error:  # the library names its argument; a runner user needs the flag
        raise ConfigError(str(error).replace("on_corrupt='skip'", "--on_corrupt=skip")) from None
    counts = prepared.splits.num_examples
    if prepared.splits.num_classes and min(counts.get(s, 0) for s in ("train", "validation", "test")) < 1:
        raise ConfigError(f"--dataset={config['dataset']} --validation_fraction={config['validation_fraction']}: "
                          f"the labelled splits are train {counts.get('train', 0)}, validation "
                          f"{counts.get('validation', 0)}, test {counts.get('test', 0)} images; the probes need "
                          "each non-empty (more labelled images, or a larger --validation_fraction).")
    strategy = prepared.strategy or tf.distribute.get_strategy()
    steps = steps_per_epoch(config, prepared.splits, strategy.num_replicas_in_sync)
    if config["encoder"] not in encoders.ENCODERS:
        raise ConfigError(f"--encoder={config['encoder']}: unknown; choose one of {', '.join(sorted(encoders.ENCODERS))}.")
    prepared.precision = runtime.resolve_precision(config["mixed_precision"])
    if prepared.precision != "none":
        keras.config.set_dtype_policy(prepared.precision)

    def build():
        with strategy.scope():
            return build_model(config, steps * config["epochs"], steps, strategy)

    prepared.model = _config_errors("the model of these flags (--encoder, --predictor, --eps ...)", build)
    return prepared


def threads_for(config):
    """(intra_op, inter_op) thread counts for --threads (0 = TensorFlow's default).

    auto: TensorFlow's default, except on a CPU-only machine where the measured best is taken
    (BUILD_NOTES "Quick run speed")."""
    if config["threads"] == "default":
        return 0, 0
    if config["threads"] == "auto":
        return AUTO_THREADS if not runtime.accelerators() else (0, 0)
    return config["threads"]


AUTO_THREADS = (0, 0)


def _config_errors(what, fn):
    """fn(), with the input errors it raises (ValueError, a missing file, a device set-up that
    cannot be done) turned into a one-line ConfigError that starts with ``what``."""
    try:
        return fn()
    except ConfigError:
        raise
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"{what}: {text}") from error


def run(config):
    """Run the stages --mode asks for on --workdir (see preflight for what is checked first)."""
    mode = config["mode"]
    prepared = preflight(config)
    check_workdir(config)
    model, splits = prepared.model, prepared.splits
    if mode in ("eval", "export"):
        prepared.trained_step = restore_for_eval(config, splits, model)
    if mode in ("all", "pretrain"):
        model = pretrain(config, prepared.strategy, splits, model)
    if mode == "all":
        steps = steps_per_epoch(config, splits, prepared.strategy.num_replicas_in_sync)
        prepared.trained_step = {"step": steps * config["epochs"], "total_steps": steps * config["epochs"],
                                 "complete": True}
    if mode in ("all", "eval"):
        evaluate(config, model, splits, prepared.trained_step)
    if mode in ("all", "export"):
        export_stage(config, model, splits, prepared.trained_step)
    if mode in ("all", "report"):
        import report
        path = report.write(config)
        print(f"Report: {path}", flush=True)
