"""Builders of the run's model from its configuration: encoder, predictor, optimizer and the
compiled BYOL/SimSiam model. Shared by the runner's stages and the benchmarks
(experiments/benchmarks/train_step.py), so a benchmark times exactly what a run trains."""
import inspect

import keras

from keras_ncssl import distribute, encoders, heads, models, optimizers, predictors, schedules

# Flags that become keyword arguments of the predictor's rule, each given to the rules whose
# signature takes it (as encoders.get_encoder routes its options): {rule argument: flag}.
RULE_OPTION_FLAGS = {"power": "power", "eps_inside": "eps_inside", "normalize": "normalize",
                     "iterations": "rule_iterations"}


def synchronized_bn(config, strategy):
    """Whether BatchNorm synchronises over replicas (--synchronized_bn, auto = with > 1)."""
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


def rule_options(config):
    """The rule keyword arguments of --predictor's rule: those of RULE_OPTION_FLAGS its
    signature takes (--rule_iterations=0 means the rule's own default)."""
    parameters = inspect.signature(predictors.RULES[config["predictor"]]).parameters
    options = {argument: config[flag] for argument, flag in RULE_OPTION_FLAGS.items() if argument in parameters}
    if not options.get("iterations", True):
        del options["iterations"]
    return options


def build_predictor(config, synchronized_bn=False):
    name = config["predictor"]
    if name in predictors.RULES:
        return predictors.get_predictor(
            name, config["projection_dim"], rho=config["rho"], eps=config["eps"], freq=config["freq"],
            predictor_ema=config["predictor_ema"], zero_mean=config["zero_mean"], rule_options=rule_options(config),
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
    sync = synchronized_bn(config, strategy)
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
