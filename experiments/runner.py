"""The stages of experiments/run.py on one work directory: preflight (every check that can fail
on bad input, before anything is written), then pretrain, eval, export and report.

The stages live in their own modules: builders.py (the model), pretraining.py, evaluation_stage.py,
export_stage.py, report.py; workdir.py holds the work directory's layout and its configuration
check.
"""
import os
import sys
import types

import keras
import tensorflow as tf

from builders import build_model
from evaluation_stage import evaluate
from export_stage import export_stage
from keras_ncssl import data, distribute, encoders, runtime
from keras_ncssl.checkpoint import TrainingCheckpoint
from pretraining import pretrain, steps_per_epoch
from runner_flags import ConfigError
from workdir import check_workdir, workdir_file


def load_data(config):
    """The dataset's splits (keras_ncssl.data) of ``config.data``; prints what was loaded."""
    options = {"download": True} if config.data.download else {}
    if config.data.dataset == "image_folder":
        options["on_corrupt"] = config.data.on_corrupt
    splits = data.load_dataset(config.data.dataset, data_dir=config.data.data_dir,
                               validation_fraction=config.data.validation_fraction, seed=0, **options)
    counts = ", ".join(f"{split} {n}" for split, n in splits.num_examples.items())
    print(f"Data: {splits.name} from {splits.source or 'memory'} ({counts}).", flush=True)
    return splits


def get_strategy(config):
    """The tf.distribute strategy of --strategy (configures devices: before TensorFlow starts)."""
    return distribute.get_strategy(config.run.strategy, tpu_address=config.run.tpu_address)


def restore_for_eval(config, splits, model):
    """Restore the newest checkpoint into ``model``; refuse a partial one unless --allow_partial.

    Returns {"step", "total_steps", "complete"}: which training step the encoder comes from.
    """
    steps = steps_per_epoch(config, splits, 1)
    total = steps * config.optimisation.epochs
    checkpoint = TrainingCheckpoint(workdir_file(config, "checkpoints"), model)
    state = checkpoint.restore()
    if state is None:
        raise ConfigError(f"--mode={config.run.mode}: --workdir={config.run.workdir} has no checkpoint to evaluate; "
                          "run --mode=pretrain first.")
    epoch, step_in_epoch, _ = state
    step = epoch * steps + step_in_epoch
    newest = checkpoint.fell_back_from
    complete = step >= total and newest is None
    if not complete and not config.run.allow_partial:
        why = (f"its newest checkpoint ({os.path.basename(newest)}) could not be read, and the newest readable one"
               if newest else "its training is unfinished: the newest checkpoint")
        raise ConfigError(f"--mode={config.run.mode}: --workdir={config.run.workdir}: {why} is at step {step} of "
                          f"{total}. Finish training (rerun with --mode=pretrain), or pass --allow_partial to "
                          f"{config.run.mode} the step-{step} model.")
    if not complete:
        print(f"WARNING: --allow_partial: using the model of step {step} of {total}.", file=sys.stderr, flush=True)
    return {"step": step, "total_steps": total, "complete": complete}


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
    if config["threads"] == "auto":  # a preference: where TensorFlow already runs (in-process use), keep its pools
        try:
            runtime.set_threads(*threads_for(config))
        except RuntimeError:
            pass
    else:
        _config_errors(f"--threads={config['threads']}", lambda: runtime.set_threads(*threads_for(config)))
    if training:
        prepared.strategy = _config_errors(f"--strategy={config['strategy']}", lambda: get_strategy(config))
        if (config["steps_per_execution"] not in ("auto", 1) and prepared.strategy.num_replicas_in_sync > 1
                and not runtime.accelerators()):  # keras_ncssl.distribute: "Limits seen"
            raise ConfigError(f"--steps_per_execution={config['steps_per_execution']} --strategy={config['strategy']}: "
                              "several replicas on CPU devices fail with more than one step per execution in "
                              "TensorFlow 2.21 ('You must feed a value for placeholder'); use --steps_per_execution=1 "
                              "or auto.")
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

    auto: for the small CNN on a CPU-only machine, one intra-op thread (the online and target
    passes of the two views then run side by side on the inter-op pool instead of splitting
    each small kernel across cores; BUILD_NOTES "Quick run speed"); otherwise TensorFlow's
    default, which suits the large kernels of the ResNets and accelerators."""
    if config["threads"] == "default":
        return 0, 0
    if config["threads"] == "auto":
        return SMALL_MODEL_CPU_THREADS if config["encoder"] == "small" and not runtime.accelerators() else (0, 0)
    return config["threads"]


SMALL_MODEL_CPU_THREADS = (1, 0)


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
    mode = config.run.mode
    prepared = preflight(config)
    check_workdir(config)
    model, splits = prepared.model, prepared.splits
    if mode in ("eval", "export"):
        prepared.trained_step = restore_for_eval(config, splits, model)
    if mode in ("all", "pretrain"):
        model = pretrain(config, prepared.strategy, splits, model)
    if mode == "all":
        steps = steps_per_epoch(config, splits, prepared.strategy.num_replicas_in_sync)
        total = steps * config.optimisation.epochs
        prepared.trained_step = {"step": total, "total_steps": total, "complete": True}
    if mode in ("all", "eval"):
        evaluate(config, model, splits, prepared.trained_step)
    if mode in ("all", "export"):
        export_stage(config, model, splits, prepared.trained_step)
    if mode in ("all", "report"):
        import report
        path = report.write(config)
        print(f"Report: {path}", flush=True)
