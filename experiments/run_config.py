"""The run configuration: every flag of run.py, validated, typed and grouped by what it configures.

`runner_flags.resolved` builds it once from the parsed flags (after every check on the values
alone); the stages read the group they need (``config.model.encoder``, ``config.optimisation.lr``).
A RunConfig is also a read-only mapping from flag name to value (``config["encoder"]``), the
names flags.json and report.json use, so that code written against the flags (and the saved
``flags.json``) reads it the same way. It never changes once built: ``replace(mode="eval")``
gives a new one.
"""
import collections.abc
import dataclasses
import types
from typing import List, Optional, Tuple, Union


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Where and how this invocation runs; may change between invocations of one workdir."""
    workdir: str
    mode: str  # all | pretrain | eval | export | report
    strategy: str
    tpu_address: Optional[str]
    verbose: str
    allow_changes: List[str]
    allow_partial: bool
    debug: bool
    threads: Union[str, Tuple[int, int]]  # "auto", "default" or (intra_op, inter_op), 0 = TF's default
    steps_per_execution: Union[str, int]  # "auto" or N >= 1 (builders.steps_per_execution)
    checkpoint_every_steps: int
    keep_checkpoints: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset, its splits and the augmented views the encoder is trained on."""
    dataset: str
    data_dir: Optional[str]
    download: bool
    on_corrupt: str
    image_size: int
    channels: int
    augment: str
    augment_options: str
    local_views: int
    local_size: int  # 0 = image_size // 2
    local_crop_scale: List[str]  # as given (flags.json compares them as strings)
    validation_fraction: float
    pretrain_limit: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The method and the networks: encoder, projector head."""
    method: str  # byol | simsiam
    encoder: str
    stem: str
    width_multiplier: float
    stem_stride: int
    widths: List[int]
    convs_per_stage: int
    projector_hidden: int
    projection_dim: int
    projector_bn_affine: bool
    synchronized_bn: str  # auto | true | false
    forward_views_together: bool


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """The predictor: a closed-form rule of keras_ncssl.predictors.RULES or a trainable one."""
    predictor: str
    rho: Optional[float]  # None = a running average
    eps: float
    freq: int
    power: float
    eps_inside: bool
    normalize: str
    zero_mean: bool
    predictor_ema: float
    rule_iterations: int  # 0 = the rule's default
    predictor_hidden: int
    rule_device: str  # where the rule runs: auto | cpu | none (with the model) | a device string


@dataclasses.dataclass(frozen=True)
class OptimisationConfig:
    """The target network, the optimizer, its schedule, the budget and the numerics."""
    ema: bool
    tau_base: float
    tau_schedule: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: str
    warmup_epochs: float
    predictor_lr_multiplier: float
    predictor_only_weight_decay: bool
    batch_size: int
    epochs: int
    steps_per_epoch: int  # 0 = a full pass
    seed: int
    mixed_precision: str
    jit_compile: bool
    max_consecutive_nonfinite: int  # stop (diverged) after this many skipped steps; 0 = never


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """The kNN monitor during training and the probes of the evaluation stage."""
    knn_monitor_every: int
    knn_monitor_bank: int
    knn_monitor_queries: int
    knn_k: int
    knn_temperature: float
    few_label_per_class: int
    few_label_draws: int
    probe_train_limit: int
    eval_baselines: bool
    linear_probe: str
    probe_memory_budget_mb: float
    streaming_probe_epochs: int


GROUPS = {"run": RunSettings, "data": DataConfig, "model": ModelConfig, "predictor": PredictorConfig,
          "optimisation": OptimisationConfig, "evaluation": EvaluationConfig}
# flag name -> the group that holds it.
GROUP_OF = {field.name: group for group, cls in GROUPS.items() for field in dataclasses.fields(cls)}


class RunConfig(collections.abc.Mapping):
    """The validated configuration of one run.py invocation (see the module docstring)."""

    def __init__(self, values):
        missing = sorted(set(GROUP_OF) - set(values))
        if missing:
            raise ValueError(f"RunConfig: no value for {missing}")
        for group, cls in GROUPS.items():
            names = [field.name for field in dataclasses.fields(cls)]
            object.__setattr__(self, group, cls(**{name: values[name] for name in names}))
        # A flag defined in runner_flags but not yet given a group here: still readable by name
        # (config["name"]); tests/test_runner.py fails until it is added to its group above.
        object.__setattr__(self, "ungrouped", types.MappingProxyType(
            {name: value for name, value in values.items() if name not in GROUP_OF}))

    run: RunSettings
    data: DataConfig
    model: ModelConfig
    predictor: PredictorConfig
    optimisation: OptimisationConfig
    evaluation: EvaluationConfig

    def __setattr__(self, name, value):
        raise AttributeError("a RunConfig does not change: use config.replace(name=value)")

    def __getitem__(self, name):
        if name in GROUP_OF:
            return getattr(getattr(self, GROUP_OF[name]), name)
        if name in self.ungrouped:
            return self.ungrouped[name]
        raise KeyError(f"no flag {name!r} in the run configuration")

    def __iter__(self):
        return iter([*GROUP_OF, *self.ungrouped])

    def __len__(self):
        return len(GROUP_OF) + len(self.ungrouped)

    def __repr__(self):
        return "RunConfig(" + ", ".join(f"{group}={getattr(self, group)!r}" for group in GROUPS) + ")"

    def replace(self, **changes):
        """A copy with the flags ``changes`` set (e.g. ``mode="eval"``); not validated again."""
        return RunConfig({**self.as_dict(), **changes})

    def as_dict(self):
        """{flag name: value}: what flags.json's "all" records."""
        return {name: self[name] for name in self}
