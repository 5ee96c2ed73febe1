"""Schedules: the BYOL target-EMA decay tau_k and a warm-up + cosine learning rate.

Both are written with `keras.ops`, so they work on Python numbers and on (symbolic) tensors
inside `tf.function`, e.g. with `optimizer.iterations` as the step.
"""
import math
import numbers

import keras
from keras import ops

__all__ = ["EMA_SCHEDULES", "ema_tau", "WarmupCosine"]

EMA_SCHEDULES = ("cosine", "constant")


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def ema_tau(step, total_steps, tau_base=0.996, schedule="cosine"):
    """EMA decay of the target network at step k.

    [BYOL] §3.2 (ALGORITHMS.md §1): tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, which
    goes from tau_base at k = 0 to 1 at k = K. k / K is clipped to [0, 1], so tau stays 1 after
    K. `schedule="constant"` returns tau_base at every step (the DirectPred code, [LM], uses a
    constant 0.996).

    Args:
        step: current step k, a Python number or an integer/float (symbolic) tensor.
        total_steps: K > 0, a Python number or a tensor.
        tau_base: initial decay in [0, 1] (a Python number or a tensor; numbers are validated).
        schedule: "cosine" or "constant".

    Returns:
        A float32 scalar tensor.
    """
    if schedule not in EMA_SCHEDULES:
        raise ValueError(
            f"ema_tau: unknown schedule={schedule!r}; allowed: {', '.join(EMA_SCHEDULES)}.")
    if _is_number(tau_base) and not 0.0 <= float(tau_base) <= 1.0:
        raise ValueError(f"ema_tau: tau_base={tau_base!r} must lie in [0, 1].")
    if _is_number(total_steps) and not total_steps > 0:
        raise ValueError(f"ema_tau: total_steps={total_steps!r} must be > 0.")
    if _is_number(step) and step < 0:
        raise ValueError(f"ema_tau: step={step!r} must be >= 0.")
    tau_base = ops.cast(tau_base, "float32")
    if schedule == "constant":
        return tau_base
    progress = ops.clip(ops.cast(step, "float32") / ops.cast(total_steps, "float32"), 0.0, 1.0)
    return 1.0 - (1.0 - tau_base) * (ops.cos(math.pi * progress) + 1.0) / 2.0


@keras.saving.register_keras_serializable(package="keras_ncssl")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0, then cosine decay (or a constant learning rate).

    With peak lr L, warm-up W and total K steps (k counts optimizer updates from 0, as
    `optimizer.iterations` does; [BYOL]/[SimCLR] convention, so the first update uses lr 0
    when W > 0):

        lr_k = L k / W                                              for k < W
        lr_k = f + (L - f) (1 + cos(pi (k - W) / (K - W))) / 2      for W <= k < K
        lr_k = f                                                    for k >= K

    where the final lr f = `final_lr`, or `alpha * L` (keras `CosineDecay` convention) when
    `alpha` is given. `constant=True` keeps lr_k = L after the warm-up (the DirectPred code [LM]
    and the SimSiam predictor use a constant learning rate).
    """

    def __init__(self, peak_lr, total_steps, warmup_steps=0, final_lr=None, alpha=None,
                 constant=False, name="warmup_cosine"):
        if not _is_number(peak_lr) or peak_lr < 0:
            raise ValueError(f"WarmupCosine: peak_lr={peak_lr!r} must be a number >= 0.")
        if not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"WarmupCosine: total_steps={total_steps!r} must be an int >= 1.")
        if (not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0
                or warmup_steps > total_steps):
            raise ValueError(f"WarmupCosine: warmup_steps={warmup_steps!r} must be an int in "
                             f"[0, total_steps={total_steps}].")
        if final_lr is not None and alpha is not None:
            raise ValueError(f"WarmupCosine: give final_lr={final_lr!r} or alpha={alpha!r}, "
                             "not both.")
        if alpha is not None and (not _is_number(alpha) or not 0.0 <= alpha <= 1.0):
            raise ValueError(f"WarmupCosine: alpha={alpha!r} must be a number in [0, 1].")
        if final_lr is not None and (not _is_number(final_lr) or final_lr < 0):
            raise ValueError(f"WarmupCosine: final_lr={final_lr!r} must be a number >= 0.")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_lr = None if final_lr is None else float(final_lr)
        self.alpha = None if alpha is None else float(alpha)
        self.constant = bool(constant)
        self.name = name

    @property
    def _end_lr(self):
        if self.alpha is not None:
            return self.alpha * self.peak_lr
        return 0.0 if self.final_lr is None else self.final_lr

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.peak_lr
        warmup = float(self.warmup_steps)
        if self.warmup_steps > 0:
            warm = peak * step / warmup
        else:
            warm = ops.full_like(step, peak)
        if self.constant:
            after = ops.full_like(step, peak)
        else:
            # max(., 1) avoids 0/0 when warm-up covers every step (then only `warm` is used).
            decay_steps = max(float(self.total_steps - self.warmup_steps), 1.0)
            progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
            end = self._end_lr
            after = end + (peak - end) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < warmup, warm, after)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "final_lr": self.final_lr,
            "alpha": self.alpha,
            "constant": self.constant,
            "name": self.name,
        }
