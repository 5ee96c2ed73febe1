"""Builders of the run's model from its configuration: encoder, predictor, optimizer and the
compiled BYOL/SimSiam model. Shared by the runner's stages and the benchmarks
(experiments/benchmarks/train_step.py), so a benchmark times exactly what a run trains."""
import inspect

import keras

from keras_ncssl import distribute, encoders, heads, models, optimizers, predictors, runtime, schedules

# On a CPU-only machine the small CNN's convolutions with at most this many output positions
# compute their kernel gradient as one product (encoders.small_cnn, BUILD_NOTES "The kernel
# gradient as one product"); accelerators keep their own convolution kernels. 64 takes every
# stage after the stem at 28 and 32 px (7x7 / 8x8 maps and smaller); the stem's 14x14-16x16 maps
# are faster with oneDNN's kernel (BUILD_NOTES "Patches by one gather").
SMALL_MODEL_CPU_PATCH_GRADIENT_POSITIONS = 64

# --steps_per_execution=auto on a CPU-only machine with one replica: train steps per call of the
# compiled train function. Between two calls Keras' fit loop runs Python (callbacks, logs) while
# the cores wait: 8 steps per call made the quick run's epochs 9-10 % faster in short alternating runs,
# 1-2 % in two paired `make demo` runs (BUILD_NOTES "Steps per execution, and issue 19 on a Zen 4
# host"). Accelerators and several replicas keep Keras' default of 1.
CPU_STEPS_PER_EXECUTION = 8

# Flags that become keyword arguments of the predictor's rule, each given to the rules whose
# signature takes it (as encoders.get_encoder routes its options): {rule argument: flag}.
RULE_OPTION_FLAGS = {"power": "power", "eps_inside": "eps_inside", "normalize": "normalize",
                     "iterations": "rule_iterations"}


def synchronized_bn(config, strategy):
    """Whether BatchNorm synchronises over replicas (--synchronized_bn, auto = with > 1)."""
    setting = {"auto": "auto", "true": True, "false": False}[config.model.synchronized_bn]
    return distribute.use_synchronized_bn(strategy, setting)


def input_shape(config):
    """(height, width, channels) of the encoder's input: --image_size, --channels."""
    return (config.data.image_size, config.data.image_size, config.data.channels)


def encoder_input_shape(config):
    """Multi-crop feeds the encoder two sizes: build it for any size then."""
    return (None, None, config.data.channels) if config.data.local_views else input_shape(config)


def build_encoder(config, synchronized_bn=False):
    """The encoder of ``config.model`` (keras_ncssl.encoders), untrained."""
    model = config.model
    options = dict(synchronized_bn=synchronized_bn, width_multiplier=model.width_multiplier)
    if model.encoder.startswith("resnet"):
        options["stem"] = model.stem
    elif model.encoder == "small":
        options["stem_stride"] = model.stem_stride
        options["convs_per_stage"] = model.convs_per_stage
        if not runtime.accelerators():
            options["patch_gradient_positions"] = SMALL_MODEL_CPU_PATCH_GRADIENT_POSITIONS
        if model.widths:
            options["widths"] = tuple(model.widths)
    return encoders.get_encoder(model.encoder, encoder_input_shape(config), **options)


def rule_options(predictor):
    """The keyword arguments of the rule of ``predictor`` (a PredictorConfig): those of
    RULE_OPTION_FLAGS its signature takes (--rule_iterations=0 means the rule's own default)."""
    parameters = inspect.signature(predictors.RULES[predictor.predictor]).parameters
    options = {argument: getattr(predictor, flag) for argument, flag in RULE_OPTION_FLAGS.items()
               if argument in parameters}
    if not options.get("iterations", True):
        del options["iterations"]
    return options


def build_predictor(config, synchronized_bn=False):
    """A DirectPredictor for a rule of keras_ncssl.predictors.RULES, else a trainable predictor."""
    predictor, dim = config.predictor, config.model.projection_dim
    if predictor.predictor in predictors.RULES:
        return predictors.get_predictor(
            predictor.predictor, dim, rho=predictor.rho, eps=predictor.eps, freq=predictor.freq,
            predictor_ema=predictor.predictor_ema, zero_mean=predictor.zero_mean,
            rule_options=rule_options(predictor),
            rule_device=None if predictor.rule_device == "none" else predictor.rule_device)
    return predictors.get_predictor(predictor.predictor, dim, hidden_dim=predictor.predictor_hidden,
                                    synchronized_bn=synchronized_bn)


def build_optimizer(config, total_steps, steps_per_epoch):
    """SGD or LARS with the learning-rate schedule (warm-up, cosine) and the predictor's
    learning-rate multiplier / weight-decay selection of ``config.optimisation``."""
    opt = config.optimisation
    warmup = int(round(opt.warmup_epochs * steps_per_epoch))
    lr = opt.lr
    if opt.lr_schedule == "cosine" or warmup:
        lr = schedules.WarmupCosine(opt.lr, total_steps, warmup_steps=min(warmup, total_steps),
                                    constant=opt.lr_schedule == "constant")
    options = dict(learning_rate=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    if opt.predictor_lr_multiplier != 1.0:
        options["lr_multipliers"] = {"predictor": opt.predictor_lr_multiplier}
    if opt.predictor_only_weight_decay:
        options["weight_decay_include"] = ["predictor"]
    cls = optimizers.SGD if opt.optimizer == "sgd" else optimizers.LARS
    return cls(**options)


def steps_per_execution(config, strategy):
    """--steps_per_execution as a number. auto: on a CPU-only machine with one replica the largest
    N <= CPU_STEPS_PER_EXECUTION that divides --checkpoint_every_steps (checkpoints are taken between
    calls, so they stay where asked); otherwise 1."""
    setting = config.run.steps_per_execution
    if setting != "auto":
        return setting
    if runtime.accelerators() or strategy.num_replicas_in_sync > 1:
        return 1
    every = config.run.checkpoint_every_steps
    return max(n for n in range(1, CPU_STEPS_PER_EXECUTION + 1) if not every or every % n == 0)


def build_model(config, total_steps, steps_per_epoch, strategy):
    """The BYOL/SimSiam model of the configuration, compiled, weights seeded by --seed."""
    model_config, opt = config.model, config.optimisation
    keras.utils.set_random_seed(opt.seed)
    sync = synchronized_bn(config, strategy)
    encoder = build_encoder(config, sync)
    projector = heads.projector(encoder.output_shape[-1], model_config.projector_hidden, model_config.projection_dim,
                                synchronized_bn=sync, bn_affine=model_config.projector_bn_affine)
    predictor = build_predictor(config, sync)
    common = dict(forward_views_together=model_config.forward_views_together,
                  max_consecutive_nonfinite=opt.max_consecutive_nonfinite)
    if model_config.method == "byol":
        model = models.BYOL(encoder, projector, predictor, tau_base=opt.tau_base, tau_schedule=opt.tau_schedule,
                            ema=opt.ema, total_steps=total_steps, **common)
    else:
        model = models.SimSiam(encoder, projector, predictor, **common)
    model.compile(optimizer=build_optimizer(config, total_steps, steps_per_epoch), jit_compile=opt.jit_compile,
                  steps_per_execution=steps_per_execution(config, strategy))
    model.optimizer.build(model.online_variables)  # slots must exist before a restore
    return model
