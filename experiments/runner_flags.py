"""Every flag of experiments/run.py, and their validation before anything runs.

Flags are grouped: TRAINING flags define the pretraining run and must match an existing
workdir's (except those in RESUMABLE, which ``--allow_changes`` lets a resumed run change);
the others (stage, evaluation, logging) may change between invocations.

Every check here is on the values alone (no TensorFlow); `runner.preflight` checks what needs
the data, the devices or the model, all before the work directory is touched.
"""
import math
import os

from absl import flags

from keras_ncssl.augment import config as augment_config  # option parsing only: no TensorFlow
from run_config import RunConfig

TRAINING = []  # names of flags that define the pretraining run
# Training flags a resumed run may change (--allow_changes): they enter no saved state. The
# optimizer's learning-rate variable is re-set from --lr after a restore (runner.pretrain).
RESUMABLE = ("lr", "momentum", "weight_decay")


class ConfigError(ValueError):
    """A flag value (or combination) that cannot run; the message names the flag and the fix.

    run.py prints it as one line and exits with status 2, nothing written."""


def _training(define, name, *args, **kwargs):
    TRAINING.append(name)
    return define(name, *args, **kwargs)


PREDICTORS = ["directpred", "directcopy", "lrp", "neumann", "visser", "newton_schulz", "ns2", "stiefel",
              "linear", "linear_symmetric", "mlp", "none"]

# -- run ---------------------------------------------------------------------------------------
flags.DEFINE_string("workdir", "runs/default", "Work directory: checkpoints, logs, report, encoder/.")
flags.DEFINE_enum("mode", "all", ["all", "pretrain", "eval", "export", "report"], "Stage(s) to run.")
flags.DEFINE_string("strategy", "default", "default | cpu:N | mirrored | multi_worker | tpu.")
flags.DEFINE_string("tpu_address", None, "TPU address for --strategy=tpu.")
flags.DEFINE_string("data_dir", None, "Data directory (tfds data_dir, image folder root, ...).")
flags.DEFINE_bool("download", False, "Let tensorflow-datasets download a missing dataset.")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"],
                  "Keras fit output: 0 none, 1 progress bar, 2 Keras' line per epoch; auto = the progress bar in a "
                  "terminal, otherwise (a file, a pipe, make, CI) only the runner's one line per epoch.")
flags.DEFINE_list("allow_changes", [], "Training flags this run may change on an existing workdir (resume), "
                  f"from: {', '.join(RESUMABLE)}; each change is recorded in flags.json's history.")
flags.DEFINE_bool("allow_partial", False, "Let --mode=eval/export use a workdir whose training is unfinished "
                  "(or whose newest checkpoint was unreadable): the report records the step used.")
flags.DEFINE_integer("max_consecutive_nonfinite", 20, "Stop (diverged) after this many consecutive training steps "
                     "with a non-finite loss or gradients; each is skipped (0 = never stop).")
flags.DEFINE_enum("on_corrupt", "raise", ["raise", "skip"], "--dataset=image_folder: an unreadable image "
                  "fails the run (raise) or is skipped and counted (skip).")
flags.DEFINE_string("rule_device", "auto", "Where DirectPredictor's rule runs: auto (the host CPU for eigh rules "
                    "when the model is on a GPU), cpu, none (with the model) or a device string.")
flags.DEFINE_bool("debug", False, "Show Python tracebacks for configuration errors too.")
flags.DEFINE_string("threads", "auto", "TensorFlow thread pools: auto (one intra-op thread for --encoder=small "
                    "on a CPU-only machine, the fastest measured: BUILD_NOTES 'Quick run speed'; else TensorFlow's "
                    "default), default (TensorFlow's), N (intra-op) or N,M (intra-op, inter-op).")
flags.DEFINE_string("steps_per_execution", "auto", "Train steps per call of the compiled train function (Keras "
                    "steps_per_execution): auto (on a CPU-only machine with one replica the largest N <= 8 that "
                    "divides --checkpoint_every_steps, which saves fit's Python work between steps; else 1) or N. "
                    "Per-step callbacks (checkpoints, the divergence check) then run every N steps.")
# -- data --------------------------------------------------------------------------------------
_training(flags.DEFINE_string, "dataset", "fashion_mnist", "Dataset registry name (keras_ncssl.data).")
_training(flags.DEFINE_integer, "image_size", 32, "Encoder input size (pixels).")
_training(flags.DEFINE_integer, "channels", 3, "Encoder input channels (grey data is repeated).")
_training(flags.DEFINE_string, "augment", "byol", "Augmentation preset (keras_ncssl.augment.PRESETS).")
_training(flags.DEFINE_string, "augment_options", "", "Preset changes, e.g. 'crop_scale=0.3:1,brightness=0.2' "
          "(1./2. prefix: one view); fields of keras_ncssl.augment.ViewConfig.")
_training(flags.DEFINE_integer, "local_views", 0, "Multi-crop: extra low-resolution local views per image (0 = off).")
_training(flags.DEFINE_integer, "local_size", 0, "Multi-crop: local view size in pixels (0 = image_size // 2).")
_training(flags.DEFINE_list, "local_crop_scale", ["0.1", "0.4"], "Multi-crop: area range of the local crops.")
_training(flags.DEFINE_float, "validation_fraction", 0.1, "Train fraction held out for probe selection.")
_training(flags.DEFINE_integer, "pretrain_limit", 0, "Use only the first N pretraining images (0 = all).")
# -- model -------------------------------------------------------------------------------------
_training(flags.DEFINE_enum, "method", "byol", ["byol", "simsiam"], "BYOL (EMA target) or SimSiam.")
_training(flags.DEFINE_string, "encoder", "resnet18", "Encoder (keras_ncssl.encoders.ENCODERS).")
_training(flags.DEFINE_enum, "stem", "cifar", ["cifar", "imagenet"], "ResNet stem.")
_training(flags.DEFINE_float, "width_multiplier", 1.0, "Encoder width multiplier.")
_training(flags.DEFINE_integer, "stem_stride", 2, "Stride of the small encoder's first conv (1 or 2).")
_training(flags.DEFINE_list, "widths", [], "Small encoder: channels per stage, e.g. 32,64,128,256 (empty = default).")
_training(flags.DEFINE_integer, "convs_per_stage", 1, "Small encoder: conv-BN-ReLU layers per stage.")
_training(flags.DEFINE_integer, "projector_hidden", 512, "Projector hidden width.")
_training(flags.DEFINE_integer, "projection_dim", 128, "Projection (predictor) dimension d.")
_training(flags.DEFINE_bool, "projector_bn_affine", False, "Affine BN in the heads ([DP] code: off).")
_training(flags.DEFINE_string, "synchronized_bn", "auto", "auto (on with >1 replica) | true | false.")
_training(flags.DEFINE_bool, "forward_views_together", False, "One encoder pass over both views.")
# -- predictor ---------------------------------------------------------------------------------
_training(flags.DEFINE_enum, "predictor", "directpred", PREDICTORS, "Predictor rule or trainable baseline.")
_training(flags.DEFINE_string, "rho", "0.3", "Correlation EMA in [0, 1), or 'none' for a running average.")
_training(flags.DEFINE_float, "eps", 0.1, "Additive eps I of the rule (DirectPred eps / EO ridge).")
_training(flags.DEFINE_integer, "freq", 1, "Refresh the predictor every freq steps (>1: SGD in between).")
_training(flags.DEFINE_float, "power", 0.5, "DirectPred root order (0.5 = sqrt; 1 = DirectCopy-like).")
_training(flags.DEFINE_bool, "eps_inside", False, "DirectPred: p = (s/s_max + eps)^power.")
_training(flags.DEFINE_enum, "normalize", "spectral", ["spectral", "frobenius", "none"], "DirectCopy norm.")
_training(flags.DEFINE_bool, "zero_mean", False, "Centre the correlation (off in [DP]).")
_training(flags.DEFINE_float, "predictor_ema", 0.0, "EMA of the kernel across refreshes ([EO]).")
_training(flags.DEFINE_integer, "rule_iterations", 0, "Iterations for visser/newton_schulz/ns2/stiefel (0 = default).")
_training(flags.DEFINE_integer, "predictor_hidden", 512, "Hidden width of the mlp predictor.")
# -- optimisation ------------------------------------------------------------------------------
_training(flags.DEFINE_bool, "ema", True, "BYOL target EMA (false: target = online under stop-grad).")
_training(flags.DEFINE_float, "tau_base", 0.996, "EMA decay at the start.")
_training(flags.DEFINE_enum, "tau_schedule", "constant", ["constant", "cosine"], "EMA schedule ([DP]: constant).")
_training(flags.DEFINE_enum, "optimizer", "sgd", ["sgd", "lars"], "SGD (coupled L2, PyTorch) or LARS.")
_training(flags.DEFINE_float, "lr", 0.03, "Peak learning rate.")
_training(flags.DEFINE_float, "momentum", 0.9, "Momentum.")
_training(flags.DEFINE_float, "weight_decay", 4e-4, "Weight decay.")
_training(flags.DEFINE_enum, "lr_schedule", "constant", ["constant", "cosine"], "Learning-rate schedule.")
_training(flags.DEFINE_float, "warmup_epochs", 0.0, "Linear warm-up epochs.")
_training(flags.DEFINE_float, "predictor_lr_multiplier", 1.0, "Predictor learning rate x alpha_p.")
_training(flags.DEFINE_bool, "predictor_only_weight_decay", False, "Decay the predictor only ([DP] Tab. 5).")
_training(flags.DEFINE_integer, "batch_size", 128, "Global batch size.")
_training(flags.DEFINE_integer, "epochs", 100, "Pretraining epochs.")
_training(flags.DEFINE_integer, "steps_per_epoch", 0, "Cap steps per epoch (0 = a full pass).")
_training(flags.DEFINE_integer, "seed", 0, "Seed of weights, shuffling and augmentation.")
_training(flags.DEFINE_enum, "mixed_precision", "auto", ["auto", "none", "mixed_float16", "mixed_bfloat16"],
          "Keras dtype policy of training; auto = mixed_bfloat16 on a CPU-only machine with native bf16 "
          "(AVX512_BF16/AMX), else none (float32: GPUs, TPUs, older CPUs). Predictor statistics and eigh stay "
          "float32; evaluation and the export always compute in float32.")
_training(flags.DEFINE_bool, "jit_compile", False, "XLA-compile the train step.")
# -- checkpoints, monitoring, evaluation ---------------------------------------------------------
flags.DEFINE_integer("checkpoint_every_steps", 200, "Also checkpoint every N steps within an epoch (0: epoch ends only).")
flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
flags.DEFINE_integer("knn_monitor_every", 1, "kNN monitor every N epochs (0 = off).")
flags.DEFINE_integer("knn_monitor_bank", 5000, "kNN monitor: training images in the bank.")
flags.DEFINE_integer("knn_monitor_queries", 1000, "kNN monitor: validation queries.")
flags.DEFINE_integer("knn_k", 200, "kNN neighbours.")
flags.DEFINE_float("knn_temperature", 0.1, "kNN temperature.")
flags.DEFINE_integer("few_label_per_class", 10, "Few-label probe: labels per class.")
flags.DEFINE_integer("few_label_draws", 5, "Few-label probe: number of draws.")
flags.DEFINE_integer("probe_train_limit", 0, "Cap the probe's training split (0 = all).")
flags.DEFINE_bool("eval_baselines", True, "Also evaluate a random-init encoder and raw pixels.")
flags.DEFINE_enum("linear_probe", "auto", ["auto", "in_memory", "streaming"],
                  "Linear probe: in_memory = L-BFGS on all features (with kNN and few-label probe); streaming = "
                  "SGD heads on frozen features over tf.data under the run's strategy (linear probe only); auto = "
                  "streaming when the float32 features of train+validation+test exceed --probe_memory_budget_mb.")
flags.DEFINE_float("probe_memory_budget_mb", 4096, "--linear_probe=auto: feature memory (MiB) above which the "
                     "probe streams (ImageNet's 1.33 M x 2048 features: 10.4 GiB).")
flags.DEFINE_integer("streaming_probe_epochs", 30, "--linear_probe=streaming: SGD epochs over the training split.")


NAMES = [f.name for f in flags.FLAGS.get_key_flags_for_module(__name__)]
EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))


def resolve_flagfile_arguments(argv):
    """``--flagfile=stl10.flags`` given from anywhere means experiments/stl10.flags when no such
    file exists where it is run (the README's commands are run from the repository root)."""
    out = []
    for arg in argv:
        if arg.startswith("--flagfile="):
            path = arg.split("=", 1)[1]
            if not os.path.exists(path) and os.path.exists(os.path.join(EXPERIMENTS, path)):
                arg = "--flagfile=" + os.path.join(EXPERIMENTS, path)
        out.append(arg)
    return out


# (flag, lowest, highest, what the message says is allowed); None = unbounded.
_RANGES = [
    ("batch_size", 1, None, ">= 1"), ("epochs", 1, None, ">= 1"), ("image_size", 1, None, ">= 1"),
    ("channels", 1, None, ">= 1"), ("projection_dim", 1, None, ">= 1"), ("projector_hidden", 1, None, ">= 1"),
    ("predictor_hidden", 1, None, ">= 1"), ("steps_per_epoch", 0, None, ">= 0 (0 = a full pass)"),
    ("pretrain_limit", 0, None, ">= 0 (0 = all)"), ("seed", 0, None, ">= 0"),
    ("checkpoint_every_steps", 0, None, ">= 0 (0 = epoch ends only)"), ("keep_checkpoints", 1, None, ">= 1"),
    ("knn_monitor_every", 0, None, ">= 0 (0 = off)"), ("knn_monitor_bank", 1, None, ">= 1"),
    ("knn_monitor_queries", 1, None, ">= 1"), ("knn_k", 1, None, ">= 1"), ("few_label_per_class", 0, None, ">= 0"),
    ("few_label_draws", 1, None, ">= 1"), ("probe_train_limit", 0, None, ">= 0 (0 = all)"),
    ("streaming_probe_epochs", 1, None, ">= 1"),
    ("max_consecutive_nonfinite", 0, None, ">= 0 (0 = never stop)"), ("rule_iterations", 0, None, ">= 0 (0 = default)"),
    ("lr", 0.0, None, "> 0"), ("momentum", 0.0, 1.0, "in [0, 1)"), ("weight_decay", 0.0, None, ">= 0"),
    ("tau_base", 0.0, 1.0, "in [0, 1]"), ("warmup_epochs", 0.0, None, ">= 0"),
    ("predictor_lr_multiplier", 0.0, None, "> 0"), ("predictor_ema", 0.0, 1.0, "in [0, 1)"),
    ("knn_temperature", 0.0, None, "> 0"), ("probe_memory_budget_mb", 0.0, None, "> 0"), ("power", 0.0, None, "> 0"),
    ("width_multiplier", 0.0, None, "> 0"),
]
_OPEN_LOW = {"lr", "predictor_lr_multiplier", "knn_temperature", "probe_memory_budget_mb", "power", "width_multiplier"}
_OPEN_HIGH = {"momentum", "predictor_ema"}


def _check_ranges(config):
    """Every numeric flag finite and in its range (a NaN learning rate would train on NaN)."""
    for name, low, high, allowed in _RANGES:
        value = config[name]
        bad = isinstance(value, float) and not math.isfinite(value)
        bad = bad or (low is not None and (value < low or (name in _OPEN_LOW and value == low)))
        bad = bad or (high is not None and (value > high or (name in _OPEN_HIGH and value == high)))
        if bad:
            raise ConfigError(f"--{name}={value}: must be {allowed}.")


def resolved(values):
    """The RunConfig of the flags ``values``: every check on the values alone, then the typed,
    grouped configuration; raises ConfigError naming the flag and the fix. The one place a run's
    configuration is built (run.py, the sweep, the benchmarks, the tests)."""
    config = {name: values[name].value for name in NAMES}
    rho = str(config["rho"]).lower()
    if rho == "none":
        config["rho"] = None
    else:
        try:
            config["rho"] = float(rho)
        except ValueError:
            raise ConfigError(f"--rho={config['rho']!r}: give a number in [0, 1) or 'none'.") from None
        if not 0.0 <= config["rho"] < 1.0:
            raise ConfigError(f"--rho={config['rho']}: must be in [0, 1) (or 'none' for a running average).")
    if config["freq"] < 1:
        raise ConfigError(f"--freq={config['freq']}: must be an integer >= 1 (1 = refresh every step).")
    _check_ranges(config)
    if not math.isfinite(config["eps"]) or (config["eps"] < 0 and not config["eps_inside"]):
        raise ConfigError(f"--eps={config['eps']}: must be a number >= 0 (the eps I added to the predictor; "
                          "a negative shift only with --predictor=directpred --eps_inside).")
    if config["eps_inside"] and config["predictor"] != "directpred":
        raise ConfigError(f"--eps_inside applies to --predictor=directpred only (got --predictor={config['predictor']}).")
    if not 0.0 < config["validation_fraction"] < 1.0:
        raise ConfigError(f"--validation_fraction={config['validation_fraction']}: must be in (0, 1).")
    if config["synchronized_bn"] not in ("auto", "true", "false"):
        raise ConfigError(f"--synchronized_bn={config['synchronized_bn']!r}: choose auto, true or false.")
    if config["stem_stride"] not in (1, 2):
        raise ConfigError(f"--stem_stride={config['stem_stride']}: choose 1 or 2.")
    if config["stem_stride"] != 2 and config["encoder"] != "small":
        raise ConfigError(f"--stem_stride={config['stem_stride']} applies to --encoder=small only "
                          f"(got --encoder={config['encoder']}; ResNets take --stem=cifar|imagenet).")
    _check_augmentation(config)
    _check_small_encoder(config)
    _check_paths(config)
    config["threads"] = _parse_threads(config["threads"])
    config["steps_per_execution"] = _parse_steps_per_execution(config["steps_per_execution"],
                                                               config["checkpoint_every_steps"])
    unknown = sorted(set(config["allow_changes"]) - set(RESUMABLE))
    if unknown:
        raise ConfigError(f"--allow_changes={','.join(config['allow_changes'])}: {', '.join(unknown)} cannot change "
                          f"on resume (allowed: {', '.join(RESUMABLE)}); start a new --workdir instead.")
    return RunConfig(config)


def _parse_threads(value):
    """--threads -> "auto", "default" or (intra_op, inter_op) with 0 = TensorFlow's default."""
    if value in ("auto", "default"):
        return value
    try:
        numbers = tuple(int(v) for v in value.split(","))
        if len(numbers) not in (1, 2) or min(numbers) < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--threads={value}: give auto, default, N (intra-op threads) or N,M (intra-op, "
                          "inter-op), each >= 1.") from None
    return numbers if len(numbers) == 2 else (numbers[0], 0)


def _parse_steps_per_execution(value, checkpoint_every_steps):
    """--steps_per_execution -> "auto" or N >= 1 (dividing --checkpoint_every_steps: the step checkpoint
    can only be taken between two calls of the train function)."""
    if value == "auto":
        return value
    try:
        number = int(value)
        if number < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--steps_per_execution={value}: give auto or an integer >= 1.") from None
    if checkpoint_every_steps % number:
        raise ConfigError(f"--steps_per_execution={number} --checkpoint_every_steps={checkpoint_every_steps}: "
                          "checkpoints are taken between executions, so --checkpoint_every_steps must be a multiple "
                          f"of --steps_per_execution (or 0), e.g. {-(-checkpoint_every_steps // number) * number}.")
    return number


def _check_paths(config):
    """--workdir must be (or become) a directory; a given --data_dir must exist."""
    workdir = os.path.expanduser(config["workdir"])
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={config['workdir']}: exists and is not a directory; give a directory "
                          "(new or a previous run's).")
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent if not os.path.isdir(workdir) else workdir, os.W_OK):
        raise ConfigError(f"--workdir={config['workdir']}: not writable here; choose a directory you can write.")
    config["workdir"] = workdir
    if config["data_dir"] is not None:
        data_dir = os.path.expanduser(config["data_dir"])
        if not os.path.exists(data_dir) and not config["download"]:
            raise ConfigError(f"--data_dir={config['data_dir']}: no such directory; give the directory that holds "
                              f"the {config['dataset']} data (or omit --data_dir for the default location).")
        config["data_dir"] = data_dir


def _check_augmentation(config):
    """--augment_options and the multi-crop flags. local_size and local_crop_scale stay as
    given (0 = auto; strings), so that flags.json compares equal with a workdir made before
    they existed; runner.py resolves them."""
    try:
        augment_config.with_view_options(config["augment"], config["augment_options"])
    except ValueError as error:
        raise ConfigError(f"--augment={config['augment']!r} --augment_options={config['augment_options']!r}: "
                         f"{error}") from None
    if config["local_views"] < 0:
        raise ConfigError(f"--local_views={config['local_views']}: must be >= 0 (0 = no multi-crop).")
    if config["local_size"] == 1 or config["local_size"] < 0:
        raise ConfigError(f"--local_size={config['local_size']}: must be >= 2 pixels (or 0 = image_size // 2).")
    try:
        scale = tuple(float(v) for v in config["local_crop_scale"])
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--local_crop_scale={','.join(map(str, config['local_crop_scale']))}: give two "
                         "area fractions low,high with 0 < low <= high <= 1, e.g. 0.1,0.4.") from None


def _check_small_encoder(config):
    """--widths (made ints here) and --convs_per_stage: the small CNN's architecture flags."""
    for name, default_value in {"widths": [], "convs_per_stage": 1}.items():
        if config[name] != default_value and config["encoder"] != "small":
            raise ConfigError(f"--{name}={config[name]} applies to --encoder=small only (got --encoder="
                             f"{config['encoder']}; ResNets take --width_multiplier).")
    try:
        config["widths"] = [int(w) for w in config["widths"]]
    except ValueError:
        raise ConfigError(f"--widths={','.join(config['widths'])}: give positive integers, e.g. 32,64,128,256.") from None
    if any(w < 1 for w in config["widths"]):
        raise ConfigError(f"--widths={','.join(map(str, config['widths']))}: every width must be >= 1.")
    if config["convs_per_stage"] < 1:
        raise ConfigError(f"--convs_per_stage={config['convs_per_stage']}: must be >= 1.")


def default(name):
    """The default of flag ``name`` (a workdir made before the flag existed used this value)."""
    return flags.FLAGS[name].default


def training_subset(config):
    """The flags that define the pretraining run (compared against an existing workdir)."""
    return {name: config[name] for name in TRAINING}


def training_differences(saved_training, training):
    """{flag: (workdir's value, this run's value)} of every training flag that differs.

    ``saved_training``: a workdir's flags.json "training"; a flag added after the workdir was
    made is taken at its default there. One comparison for run.py's workdir check and the sweep's.
    """
    saved = {name: saved_training.get(name, default(name)) for name in training}
    return {name: (saved[name], value) for name, value in training.items() if saved[name] != value}
