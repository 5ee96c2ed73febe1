"""SGD with coupled L2 (PyTorch semantics) and LARS on the Keras 3 `keras.optimizers.Optimizer` API.

Both optimizers choose, per variable, whether it is decayed, whether LARS adapts its learning
rate, and a learning-rate multiplier, from patterns matched against `variable.path` (Keras 3,
e.g. "byol/predictor/kernel"). A pattern matches when it is a plain substring of the path
(no regular expressions). The decisions are made once, in `build`, so nothing is matched
inside the compiled step.

Weight decay here is *coupled* L2 (the gradient gets + wd * w before momentum), as in
`torch.optim.SGD(weight_decay=...)` used by the DirectPred paper ([DP] §2.5: lr 0.03, momentum
0.9, wd 4e-4). Keras' own `weight_decay=` argument is *decoupled* (w <- w - lr * wd * w, applied
outside the momentum), which is a different optimizer; these classes never apply it.

Serialisation: every option is a float, a bool, a list of strings or a dict str -> float, so
`get_config` is plain JSON and `from_config` is the default `cls(**config)`.
"""
import math
import numbers

import keras
import tensorflow as tf
from keras import ops

__all__ = ["SGD", "LARS", "LARS_DEFAULT_EXCLUDE"]

# Keras 3 names: Dense/Conv "bias"; BatchNormalization/LayerNormalization "gamma" and "beta".
LARS_DEFAULT_EXCLUDE = ("bias", "gamma", "beta")


def _patterns(value, arg, owner):
    """Normalise a pattern argument to a tuple of strings (None -> None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    value = tuple(value)
    for p in value:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{owner}: {arg} must be a list of non-empty strings (substrings of "
                             f"variable.path); got {p!r} in {value!r}.")
    return value


def _matches(path, patterns):
    return any(p in path for p in patterns)


def _variable_path(variable):
    path = getattr(variable, "path", None)
    return path if path is not None else str(variable.name)


def _non_negative(value, arg, owner):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"{owner}: {arg}={value!r} must be a finite number >= 0.")
    return float(value)


def _dense(gradient):
    # A sparse gradient (embedding lookup) is densified: the decay and the trust ratio act on
    # the whole variable anyway.
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


class _PatternOptimizer(keras.optimizers.Optimizer):
    """Shared plumbing: coupled L2 with include/exclude patterns, momentum and lr multipliers."""

    _default_exclude = ()

    def __init__(self, learning_rate, momentum, nesterov, weight_decay,
                 exclude_from_weight_decay, weight_decay_include, lr_multipliers, name,
                 **kwargs):
        owner = type(self).__name__
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = _non_negative(learning_rate, "learning_rate", owner)
        momentum = _non_negative(momentum, "momentum", owner)
        if momentum >= 1.0:
            raise ValueError(f"{owner}: momentum={momentum!r} must lie in [0, 1).")
        weight_decay = _non_negative(0.0 if weight_decay is None else weight_decay,
                                     "weight_decay", owner)
        if nesterov and momentum == 0.0:
            raise ValueError(f"{owner}: nesterov=True needs momentum > 0 (got momentum=0).")
        exclude = _patterns(exclude_from_weight_decay, "exclude_from_weight_decay", owner)
        include = _patterns(weight_decay_include, "weight_decay_include", owner)
        multipliers = {}
        for pattern, mult in dict(lr_multipliers or {}).items():
            _patterns([pattern], "lr_multipliers keys", owner)
            multipliers[pattern] = _non_negative(mult, f"lr_multipliers[{pattern!r}]", owner)
        # Keras' decoupled decay stays off: weight_decay=None for the base class.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self._wd_exclude = self._default_exclude if exclude is None else exclude
        self._wd_include = include
        self._lr_multipliers = multipliers
        self._wd_exclude_ids = set()

    # ---- per-variable decisions -------------------------------------------------------------

    def _decays(self, variable):
        if self.weight_decay == 0.0:
            return False
        if self._var_key(variable) in self._wd_exclude_ids:
            return False
        path = _variable_path(variable)
        if self._wd_include is not None and not _matches(path, self._wd_include):
            return False
        return not _matches(path, self._wd_exclude)

    def _lr_multiplier(self, variable):
        # The first matching pattern (dict order) wins.
        path = _variable_path(variable)
        for pattern, mult in self._lr_multipliers.items():
            if pattern in path:
                return mult
        return 1.0

    def _use_weight_decay(self, variable):
        return self._decays(variable)

    def _apply_weight_decay(self, variables):
        """Disabled: the coupled L2 term is added to the gradient in `update_step`."""
        return

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exclude variables (by object) or patterns (substrings of `variable.path`) from decay.

        Same call as the Keras base class; must be called before the optimizer is built. Adds
        to the constructor's `exclude_from_weight_decay` patterns (not serialised for var_list).
        """
        if self.built:
            raise ValueError("exclude_from_weight_decay() must be called before the optimizer "
                             "is built.")
        if var_list:
            self._wd_exclude_ids.update(self._var_key(v) for v in var_list)
        if var_names:
            self._wd_exclude = self._wd_exclude + _patterns(
                var_names, "var_names", type(self).__name__)

    def variable_settings(self):
        """{variable.path: dict(decay=..., lr_multiplier=..., ...)} for the built optimizer."""
        if not self.built:
            raise ValueError("variable_settings() needs a built optimizer (call build or apply).")
        return {_variable_path(v): dict(self._settings[i])
                for i, v in enumerate(self._trainable_variables)}

    def _variable_settings(self, variable):
        return {"decay": self._decays(variable), "lr_multiplier": self._lr_multiplier(variable)}

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        # Tuples, not lists: Keras' tracker would wrap a list attribute.
        self._settings = tuple(self._variable_settings(v) for v in variables)
        self.momentums = []
        if self.momentum != 0.0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")

    # ---- the update ------------------------------------------------------------------------

    def _direction(self, gradient, variable, settings):
        """The vector fed to the momentum buffer (before the learning rate)."""
        raise NotImplementedError

    def update_step(self, gradient, variable, learning_rate):
        settings = self._settings[self._get_variable_index(variable)]
        dtype = variable.dtype
        gradient = ops.cast(_dense(gradient), dtype)
        direction = self._direction(gradient, variable, settings)
        lr = ops.cast(learning_rate, dtype) * settings["lr_multiplier"]
        if self.momentum != 0.0:
            buf = self.momentums[self._get_variable_index(variable)]
            momentum = ops.cast(self.momentum, dtype)
            new_buf = momentum * buf + direction
            self.assign(buf, new_buf)
            if self.nesterov:
                direction = direction + momentum * new_buf
            else:
                direction = new_buf
        self.assign_sub(variable, lr * direction)

    def get_config(self):
        config = super().get_config()
        config.update({
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "exclude_from_weight_decay": list(self._wd_exclude),
            "weight_decay_include": (None if self._wd_include is None
                                     else list(self._wd_include)),
            "lr_multipliers": dict(self._lr_multipliers),
        })
        return config


@keras.saving.register_keras_serializable(package="keras_ncssl")
class SGD(_PatternOptimizer):
    """SGD with momentum and coupled L2 weight decay: `torch.optim.SGD` semantics.

    Per variable w with gradient g, lr multiplier a (from `lr_multipliers`, default 1) and
    decay mask d (1 unless excluded):

        g   <- g + d * wd * w
        buf <- momentum * buf + g          (buf starts at 0, so the first buf is g, as in torch)
        w   <- w - lr * a * buf            (nesterov: w <- w - lr * a * (g + momentum * buf))

    Defaults are the DirectPred paper's setting ([DP] §2.5, `torch.optim.SGD(lr=0.03,
    momentum=0.9, weight_decay=4e-4)`), which decays every parameter including biases and BN.

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: in [0, 1). dampening is 0 (torch default).
        nesterov: torch's Nesterov variant.
        weight_decay: coupled L2 coefficient wd >= 0.
        exclude_from_weight_decay: patterns (substrings of `variable.path`) never decayed;
            default: none.
        weight_decay_include: if given, only variables matching one of these patterns decay
            (e.g. ["predictor"] for the paper's "wd on predictor only", [DP] Tab. 5).
        lr_multipliers: dict pattern -> multiplier of the learning rate (e.g.
            {"predictor": 10.0} for the predictor rate alpha_p, [DP] §3); first match wins.
        **kwargs: other `keras.optimizers.Optimizer` arguments (clipnorm, name, use_ema, ...),
            except the base class' decoupled `weight_decay`, which this replaces.
    """

    def __init__(self, learning_rate=0.03, momentum=0.9, nesterov=False, weight_decay=4e-4,
                 exclude_from_weight_decay=None, weight_decay_include=None, lr_multipliers=None,
                 name="sgd", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay,
                         exclude_from_weight_decay=exclude_from_weight_decay,
                         weight_decay_include=weight_decay_include,
                         lr_multipliers=lr_multipliers, name=name, **kwargs)

    def _direction(self, gradient, variable, settings):
        if settings["decay"]:
            return gradient + ops.cast(self.weight_decay, variable.dtype) * variable
        return gradient


@keras.saving.register_keras_serializable(package="keras_ncssl")
class LARS(_PatternOptimizer):
    """LARS as in BYOL / SimCLR (You et al. 2017; [BYOL] App. C), with coupled weight decay.

    Per variable w with gradient g:

        u   <- g + d * wd * w                         (d = 0 for variables excluded from decay)
        u   <- eta * ||w|| / ||u|| * u                (only if adapted; ratio 1 if a norm is 0)
        buf <- momentum * buf + u
        w   <- w - lr * a * buf                       (nesterov: w - lr * a * (u + momentum*buf))

    The learning rate multiplies outside the momentum buffer (BYOL's optax chain: decay ->
    trust ratio -> momentum -> scale by -lr; PyTorch-style), so a learning-rate schedule does
    not leak into the buffer.

    Exclusion rule: variables whose `variable.path` contains one of
    `exclude_from_weight_decay` (default `LARS_DEFAULT_EXCLUDE` = "bias", "gamma", "beta": the
    biases and the BatchNorm/LayerNorm scale and offset in Keras 3 naming) get neither decay
    nor adaptation; `exclude_from_layer_adaptation` (default: the same list as
    `exclude_from_weight_decay`, SimCLR's convention) controls adaptation separately. A
    variable excluded from adaptation is updated as plain momentum SGD.

    Args:
        learning_rate: float or `LearningRateSchedule` (BYOL: 0.2 * batch / 256).
        momentum: in [0, 1).
        nesterov: Nesterov momentum.
        weight_decay: coupled L2 coefficient (BYOL: 1.5e-6).
        eta: trust coefficient (BYOL: 1e-3).
        exclude_from_weight_decay, weight_decay_include, lr_multipliers: as in `SGD`.
        exclude_from_layer_adaptation: patterns never adapted; None = same as
            `exclude_from_weight_decay`.
    """

    _default_exclude = LARS_DEFAULT_EXCLUDE

    def __init__(self, learning_rate=0.2, momentum=0.9, nesterov=False, weight_decay=1.5e-6,
                 eta=1e-3, exclude_from_weight_decay=None, exclude_from_layer_adaptation=None,
                 weight_decay_include=None, lr_multipliers=None, name="lars", **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay,
                         exclude_from_weight_decay=exclude_from_weight_decay,
                         weight_decay_include=weight_decay_include,
                         lr_multipliers=lr_multipliers, name=name, **kwargs)
        self.eta = _non_negative(eta, "eta", "LARS")
        adapt = _patterns(exclude_from_layer_adaptation, "exclude_from_layer_adaptation", "LARS")
        self._adapt_exclude = adapt

    def _adaptation_excludes(self):
        return self._wd_exclude if self._adapt_exclude is None else self._adapt_exclude

    def _variable_settings(self, variable):
        settings = super()._variable_settings(variable)
        settings["adapt"] = not _matches(_variable_path(variable), self._adaptation_excludes())
        return settings

    def _direction(self, gradient, variable, settings):
        dtype = variable.dtype
        update = gradient
        if settings["decay"]:
            update = update + ops.cast(self.weight_decay, dtype) * variable
        if settings["adapt"]:
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            u_norm = ops.sqrt(ops.sum(ops.square(update)))
            valid = ops.logical_and(w_norm > 0, u_norm > 0)
            # The inner where keeps 0/0 out of the graph (NaN-free gradients of the ratio).
            ratio = ops.cast(self.eta, dtype) * w_norm / ops.where(valid, u_norm, 1.0)
            update = update * ops.where(valid, ratio, ops.ones_like(ratio))
        return update

    def get_config(self):
        config = super().get_config()
        config.update({
            "eta": self.eta,
            "exclude_from_layer_adaptation": (None if self._adapt_exclude is None
                                              else list(self._adapt_exclude)),
        })
        return config
