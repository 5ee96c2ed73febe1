"""The stages of experiments/run.py: pretrain, eval, export, report, on one work directory.

Work directory layout:
    flags.json            the resolved flags of the run that created it
    checkpoints/          atomic training checkpoints (+ records JSON), resumable
    logs/                 TensorBoard (train/ scalars per epoch) and history.csv
    pretrain.json         per-epoch history and diagnostics, train time and throughput
    eval.json             trained / random-init / raw-pixel results, one protocol
    encoder/              the exported SavedModel (serve: images -> embeddings)
    report.json, report.md, plots/*.png
"""
import hashlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

import runner_flags
from keras_ncssl import (augment, data, distribute, encoders, evaluation, export, heads, models, optimizers,
                         predictors, schedules)
from keras_ncssl.callbacks import SpectrumMonitor
from keras_ncssl.checkpoint import TrainingCheckpoint, write_json_atomic


class ConfigMismatchError(ValueError):
    """The work directory belongs to a run with different training flags."""


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
    """Create the workdir or check it belongs to this configuration; never overwrite."""
    flags_path = _path(config, "flags.json")
    training = runner_flags.training_subset(config)
    if os.path.exists(flags_path):
        saved = _read_json(flags_path)
        saved_training = saved.get("training", {})
        # A flag added after the workdir was made is taken at its default there.
        saved_training = {k: saved_training.get(k, runner_flags.default(k)) for k in training}
        diff = {k: (saved_training[k], v) for k, v in training.items() if saved_training[k] != v}
        if diff:
            lines = "\n".join(f"  --{k}: workdir has {a!r}, this run asks {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ConfigMismatchError(
                f"work directory {config['workdir']} belongs to a different configuration:\n{lines}\n"
                "Use a new --workdir, or repeat the original flags to resume it. Nothing was changed.")
        return
    if config["mode"] not in ("all", "pretrain"):
        raise ValueError(f"--mode={config['mode']} needs an existing work directory with a pretrained "
                         f"model; {config['workdir']} has no flags.json. Run --mode=pretrain (or all) first.")
    os.makedirs(config["workdir"], exist_ok=True)
    write_json_atomic(flags_path, {"training": training, "all": config})


def load_data(config):
    splits = data.load_dataset(config["dataset"], data_dir=config["data_dir"],
                               validation_fraction=config["validation_fraction"], seed=0,
                               **({"download": True} if config["download"] else {}))
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
            predictor_ema=config["predictor_ema"], zero_mean=config["zero_mean"], rule_options=rule_options)
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
    common = dict(forward_views_together=config["forward_views_together"])
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
        raise ValueError(f"--batch_size={config['batch_size']} is not divisible by the {replicas} replicas "
                         f"of --strategy={config['strategy']}; use a multiple of {replicas}.")
    n = splits.num_examples["pretrain"]
    if config["pretrain_limit"]:
        n = min(n, config["pretrain_limit"])
    steps = n // config["batch_size"]
    if config["steps_per_epoch"]:
        steps = min(steps, config["steps_per_epoch"])
    if steps < 1:
        raise ValueError(f"--batch_size={config['batch_size']} exceeds the {n} pretraining images.")
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


def eval_arrays(config, splits, split, limit=None):
    """(normalised images in the encoder's input format, labels) of a labelled split."""
    x, y = splits.numpy(split, limit=limit)
    ds = augment.eval_dataset(tf.data.Dataset.from_tensor_slices((x, y)), batch_size=1024,
                              image_size=config["image_size"], channels=config["channels"],
                              mean=splits.mean, std=splits.std)
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


def pretrain(config, strategy, splits):
    steps = steps_per_epoch(config, splits, strategy.num_replicas_in_sync)
    total = steps * config["epochs"]
    if config["mixed_precision"] != "none":
        keras.config.set_dtype_policy(config["mixed_precision"])
    with strategy.scope():
        model = build_model(config, total, steps, strategy)
    # Every worker saves (the save is collective); only the chief writes the real directory.
    checkpoint = TrainingCheckpoint(distribute.worker_path(_path(config, "checkpoints"), strategy), model,
                                    config["keep_checkpoints"])
    state = checkpoint.restore()
    start_epoch, start_step, records = (0, 0, {"history": [], "spectrum": [], "train_seconds": 0.0,
                                                "images_trained": 0}) if state is None else state
    if state is not None:
        print(f"Resuming {config['workdir']} at epoch {start_epoch + 1}, step {start_step}/{steps}.")
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
    callbacks += [keras.callbacks.TensorBoard(_path(config, "logs")),
                  keras.callbacks.CSVLogger(_path(config, "logs", "history.csv"), append=True)]
    os.makedirs(_path(config, "logs"), exist_ok=True)

    def save(epoch, step_in_epoch):
        records["spectrum"] = monitor.records
        checkpoint.save(epoch, step_in_epoch, records, number=epoch * steps + step_in_epoch)

    for epoch in range(start_epoch, config["epochs"]):
        first = start_step if epoch == start_epoch else 0
        dataset = pretrain_input(config, splits, epoch).skip(first).take(steps - first)
        step_saver = _StepCheckpoint(lambda s, e=epoch: save(e, s), config["checkpoint_every_steps"], first)
        began = time.perf_counter()
        history = model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps - first,
                            callbacks=callbacks + [step_saver], verbose=config["verbose"])
        seconds = time.perf_counter() - began
        logs = {k: float(v[-1]) for k, v in history.history.items()}
        logs.update(epoch=epoch + 1, seconds=seconds, images_per_sec=(steps - first) * config["batch_size"] / seconds)
        records["history"].append(logs)
        records["train_seconds"] += seconds
        records["images_trained"] += (steps - first) * config["batch_size"]
        save(epoch + 1, 0)
        summary = " ".join(f"{k}={logs[k]:.4g}" for k in ("loss", "projection_std", "knn_top1", "effective_rank")
                           if k in logs)
        print(f"epoch {epoch + 1}/{config['epochs']}: {summary} ({seconds:.0f}s, "
              f"{logs['images_per_sec']:.0f} img/s)", flush=True)
    if not distribute.is_chief(strategy):
        return model
    write_json_atomic(_path(config, "pretrain.json"), {
        "epochs": config["epochs"], "steps_per_epoch": steps, "history": records["history"],
        "spectrum": monitor.records, "knn_top1_at_init": records.get("knn_top1_at_init"),
        "train_seconds": records["train_seconds"],
        "images_per_sec": records["images_trained"] / max(records["train_seconds"], 1e-9)})
    return model


def restore_for_eval(config, splits):
    """The trained model from the newest checkpoint (under the default strategy)."""
    steps = steps_per_epoch(config, splits, 1)
    model = build_model(config, steps * config["epochs"], steps, tf.distribute.get_strategy())
    state = TrainingCheckpoint(_path(config, "checkpoints"), model).restore()
    if state is None:
        raise ValueError(f"{config['workdir']} has no checkpoint to evaluate: run --mode=pretrain first.")
    return model


def evaluate(config, model, splits):
    """Linear probe, kNN and few-label probe for the trained encoder and the two baselines."""
    limit = config["probe_train_limit"] or None
    train = eval_arrays(config, splits, "train", limit)
    val, test = eval_arrays(config, splits, "validation"), eval_arrays(config, splits, "test")
    options = dict(knn_k=config["knn_k"], knn_temperature=config["knn_temperature"],
                   few_label_n=config["few_label_per_class"] or None,
                   few_label_seeds=tuple(range(config["few_label_draws"])))
    results = {"protocol": (
        "frozen encoder (training=False) features, standardised on the probe's training split; "
        "multinomial logistic regression with its L2 strength chosen on the validation split "
        f"(validation = {config['validation_fraction']:.0%} of train, fixed seed), test split used once; "
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
    write_json_atomic(_path(config, "eval.json"), results)
    t = results["trained"]
    print(f"linear probe {t['linear_probe_top1']:.4f}  kNN {t['knn_top1']:.4f}  "
          f"few-label {t['few_label_top1_mean']}", flush=True)
    return results


def export_stage(config, model):
    path = export.export_encoder(model, _path(config, "encoder"), input_shape=input_shape(config))
    print(f"Exported the encoder to {path} (signature 'serve': images -> embeddings).", flush=True)
    return path


def run(config):
    """Run the stages --mode asks for on --workdir."""
    mode = config["mode"]
    # Everything that can fail on bad input fails here, before the workdir is touched:
    # the strategy (it must configure devices before TensorFlow starts), the data, the batch.
    strategy = get_strategy(config) if mode in ("all", "pretrain") else None
    splits = load_data(config) if mode != "report" else None
    if strategy is not None:
        steps_per_epoch(config, splits, strategy.num_replicas_in_sync)
    check_workdir(config)
    model = None
    if mode in ("all", "pretrain"):
        model = pretrain(config, strategy, splits)
    if mode in ("all", "eval", "export") and model is None:
        model = restore_for_eval(config, splits)
    if mode in ("all", "eval"):
        evaluate(config, model, splits)
    if mode in ("all", "export"):
        export_stage(config, model)
    if mode in ("all", "report"):
        import report
        path = report.write(config)
        print(f"Report: {path}", flush=True)
