"""The DirectPredictor layer: a linear predictor set in closed form from running statistics."""
import contextlib
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_ncssl.predictors.rules import get_rule

_STATE_DTYPE = "float32"  # statistics never live in float16, whatever the layer's policy
HOST_CPU = "/device:CPU:0"  # merged with the replica's job/task: the local host under any strategy
# Errors a failed eigendecomposition raises (cuSOLVER's "Heevd failed", Eigen's "not successful").
_SOLVER_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.InternalError, tf.errors.UnknownError)


def check_rule_device(rule_device):
    """``rule_device`` as given, if it is "auto", "cpu", None or a device string; else ValueError."""
    if rule_device is None or rule_device in ("auto", "cpu"):
        return rule_device
    if isinstance(rule_device, str):
        try:
            tf.DeviceSpec.from_string(rule_device)
            return rule_device
        except ValueError:
            pass
    raise ValueError(
        f"rule_device={rule_device!r}: choose 'auto' (host CPU when the predictor's variables are on a GPU "
        "and the rule uses eigh), 'cpu' (always the host CPU), None (no placement: where the model runs) "
        "or a device string such as '/device:CPU:0'.")


def resolve_rule_device(rule_device, variable_device, uses_eigh):
    """Where the rule runs: a device string, or None for no placement (the model's device).

    "auto" moves eigendecomposition rules to the host CPU when the variables live on a GPU:
    cuSOLVER's eigh fails on exactly the matrices a predictor meets at initialisation or under
    collapse (a zero matrix: tensorflow#47661; low-rank float32 matrices: pytorch#94772,
    #105359, the same solver), and a d x d eigh (d <= 2048) is cheap on the host. Rules that
    only multiply matrices stay on the GPU.
    """
    if rule_device == "auto":
        on_gpu = (tf.DeviceSpec.from_string(variable_device or "").device_type or "").upper() == "GPU"
        return HOST_CPU if (on_gpu and uses_eigh) else None
    return HOST_CPU if rule_device == "cpu" else rule_device


def _in_xla_context():
    """True while tracing a function compiled with XLA (``jit_compile=True``)."""
    try:  # private but stable since TF 1.x; without it we assume no XLA and keep tf.print
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover
        return False
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


@keras.saving.register_keras_serializable(package="keras_ncssl")
class DirectPredictor(keras.layers.Layer):
    r"""Linear predictor ``y = x @ kernel`` whose kernel is set from a running correlation.

    Statistics ([DP] §4 and its official code): after each optimizer step the detached
    online projections f of both views (pre-l2, 2B rows) are folded into

        F <- rho F + (1 - rho) mean(f f^T)          (the first batch initialises F)

    or, with ``rho=None``, the running average F <- F + (mean(f f^T) - F) / (n + 1).
    F is the raw, *uncentred* correlation (centring hurts, per [DP]); ``zero_mean=True``
    tracks the mean mu the same way and uses F - mu mu^T. Rules that need the target
    (LRP, NE) also get C = E[f_online f_target^T].

    Every ``freq`` updates (on update 0, freq, 2 freq, ... as the code's ``niter % freq``)
    the kernel is overwritten by ``rule(F, eps=eps, **rule_options)`` (see
    :mod:`keras_ncssl.predictors.rules`), optionally smoothed by ``predictor_ema`` m:
    kernel <- m kernel + (1 - m) rule(F) ([EO] uses such an EMA for stability). With
    ``freq > 1`` the kernel is also trainable, so the optimizer trains it between refreshes,
    the paper's "DirectPred (freq=5)"; with ``freq = 1`` it is non-trainable (a gradient step
    that is overwritten at once changes nothing).

    Numerics: statistics and the rule run in float32 (or ``statistics_dtype="float64"``) under
    stop_gradient, whatever the mixed-precision policy; a non-finite batch statistic or kernel
    skips that update, leaves the weights unchanged and warns (``num_skipped`` counts them).
    The rule is never called on a non-finite or all-zero F (the zero matrix fails cuSOLVER's
    eigh, tensorflow#47661): that refresh is skipped with a warning too, and so, when running
    eagerly, is one whose eigendecomposition raises.

    Placement (``rule_device``): by default ("auto") the rule runs on the host CPU when the
    layer's variables live on a GPU and the rule uses an eigendecomposition, because GPU eigh
    fails on zero and low-rank float32 matrices (see :func:`resolve_rule_device`); inside a
    compiled train step such a failure aborts the step and cannot be caught in the graph.
    Under ``jit_compile=True`` the rule runs where XLA compiles the step (no placement).

    Distribution: under a multi-replica ``tf.distribute`` strategy the per-replica batch
    statistics are all-reduced (mean over equal per-replica batches = the global-batch mean)
    before use, so every replica folds the same matrix and computes the same kernel; state
    variables use ``aggregation="only_first_replica"`` so they may be assigned in replica
    context (replica 0's value is broadcast, so the copies are identical by construction).
    Such an assignment is a merge_call, which TensorFlow forbids inside ``tf.cond``: every
    assignment here is unconditional, a skipped update writing back the old value.
    ``all_reduce`` overrides the reduction (a callable on a list of tensors).

    Args:
        rule: a name in ``RULES`` ("directpred", "directcopy", "lrp", "neumann", "visser",
            "newton_schulz", "ns2", "stiefel", or one you registered).
        rho: EMA weight of the old correlation, in [0, 1) (0.3 in [DP]); None = running average.
        eps: the rule's additive ``eps * I`` (DirectPred's eps, [EO]'s ridge alpha).
        freq: refresh the kernel every ``freq`` updates (int >= 1).
        predictor_ema: m in [0, 1) for kernel <- m kernel + (1 - m) rule(F); 0 overwrites.
        zero_mean: centre the correlation (off in [DP]).
        rule_options: extra keyword arguments for the rule (``power``, ``eps_inside``,
            ``normalize``, ``iterations`` ...).
        statistics_dtype: "float32" or "float64": the dtype of the batch statistics and of the
            rule's evaluation (eigh); the stored state is float32.
        rule_device: "auto" (host CPU for eigh rules when the variables are on a GPU), "cpu"
            (always the host CPU), None (no placement) or a device string ("/device:CPU:0").
    """

    def __init__(self, rule="directpred", rho=0.3, eps=0.1, freq=1, predictor_ema=0.0,
                 zero_mean=False, rule_options=None, statistics_dtype="float32", all_reduce=None,
                 rule_device="auto", **kwargs):
        super().__init__(**kwargs)
        self._rule = get_rule(rule)
        self.rule = rule if isinstance(rule, str) else getattr(rule, "rule_name", rule.__name__)
        if rho is not None and not (isinstance(rho, (int, float)) and 0.0 <= rho < 1.0):
            raise ValueError(f"rho must be in [0, 1) or None (running average); got {rho!r}.")
        if not isinstance(freq, (int, np.integer)) or isinstance(freq, bool) or freq < 1:
            raise ValueError(f"freq must be an integer >= 1 (refresh every freq steps); got {freq!r}.")
        if not 0.0 <= predictor_ema < 1.0:
            raise ValueError(f"predictor_ema must be in [0, 1); got {predictor_ema!r}.")
        if statistics_dtype not in ("float32", "float64"):
            raise ValueError(f"statistics_dtype must be 'float32' or 'float64' (never float16); got {statistics_dtype!r}.")
        self.rho = None if rho is None else float(rho)
        self.eps = float(eps)
        self.freq = int(freq)
        self.predictor_ema = float(predictor_ema)
        self.zero_mean = bool(zero_mean)
        self.rule_options = dict(rule_options or {})
        self.statistics_dtype = statistics_dtype
        self.all_reduce = all_reduce
        self.rule_device = check_rule_device(rule_device)
        # Validate eps and the options now, not deep inside fit: run the rule on a 2 x 2 F.
        try:
            self._kernel_from(tf.eye(2, dtype=statistics_dtype), tf.eye(2, dtype=statistics_dtype))
        except TypeError as error:
            raise ValueError(f"rule_options {self.rule_options} are not accepted by rule {self.rule!r}: {error}") from None

    @property
    def needs_cross_correlation(self):
        return bool(getattr(self._rule, "needs_cross_correlation", False))

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(f"DirectPredictor needs a known feature dimension; got input shape {input_shape}.")
        self.dim = int(dim)
        state = dict(trainable=False, dtype=_STATE_DTYPE, aggregation="only_first_replica", autocast=False)
        self.kernel = self.add_weight(
            name="kernel", shape=(dim, dim), initializer="identity", trainable=self.freq > 1,
            dtype=_STATE_DTYPE, aggregation="only_first_replica")
        self.correlation = self.add_weight(name="correlation", shape=(dim, dim), initializer="zeros", **state)
        self.mean = (self.add_weight(name="mean", shape=(dim,), initializer="zeros", **state)
                     if self.zero_mean else None)
        self.cross_correlation = (
            self.add_weight(name="cross_correlation", shape=(dim, dim), initializer="zeros", **state)
            if self.needs_cross_correlation else None)
        counter = dict(trainable=False, dtype="int64", initializer="zeros", aggregation="only_first_replica")
        self.step = self.add_weight(name="step", shape=(), **counter)
        self.num_updates = self.add_weight(name="num_updates", shape=(), **counter)
        self.num_skipped = self.add_weight(name="num_skipped", shape=(), **counter)

    def call(self, inputs):
        return tf.matmul(inputs, tf.cast(self.kernel, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    # -- statistics -------------------------------------------------------------------------

    def _reduce(self, tensors):
        if self.all_reduce is not None:
            return list(self.all_reduce(tensors))
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return list(context.all_reduce(tf.distribute.ReduceOp.MEAN, tensors))
        return tensors

    def batch_statistics(self, projections, target_projections=None):
        """mean(f f^T) (and mean(f), mean(f f'^T) where used) of one batch, all-reduced."""
        f = tf.cast(tf.stop_gradient(projections), self.statistics_dtype)
        if f.shape.rank != 2 or (f.shape[-1] is not None and f.shape[-1] != self.dim):
            raise ValueError(f"projections must be [batch, {self.dim}]; got shape {f.shape}.")
        n = tf.cast(tf.shape(f)[0], f.dtype)
        stats = [tf.matmul(f, f, transpose_a=True) / n]
        if self.zero_mean:
            stats.append(tf.reduce_mean(f, axis=0))
        if self.needs_cross_correlation:
            if target_projections is None:
                raise ValueError(f"rule {self.rule!r} needs target_projections in update().")
            g = tf.cast(tf.stop_gradient(target_projections), self.statistics_dtype)
            stats.append(tf.matmul(f, g, transpose_a=True) / n)
        return self._reduce(stats)

    def update_statistics(self, projections, target_projections=None, skip=False):
        """Fold one batch of (detached) online projections into the running statistics.

        ``projections``: [N, d], both views concatenated. ``skip`` (bool or bool tensor): the
        caller skipped this training step (e.g. a non-finite loss), so nothing is folded and
        nothing is counted here. Returns a bool tensor: folded.
        """
        stats = self.batch_statistics(projections, target_projections)
        skip = tf.convert_to_tensor(skip, tf.bool)
        finite_stats = tf.reduce_all([tf.reduce_all(tf.math.is_finite(s)) for s in stats])
        finite = tf.logical_and(finite_stats, tf.logical_not(skip))
        variables = [self.correlation]
        if self.zero_mean:
            variables.append(self.mean)
        if self.needs_cross_correlation:
            variables.append(self.cross_correlation)

        n = tf.cast(self.num_updates, self.statistics_dtype)
        if self.rho is None:
            weight_new = 1.0 / (n + 1.0)
        else:  # the first batch initialises the EMA, as in [DP]'s code
            weight_new = tf.where(n > 0, tf.constant(1.0 - self.rho, n.dtype), tf.ones_like(n))
        # The variables are assigned unconditionally, a skipped batch writing back the old
        # value: under a tf.distribute strategy, assigning an aggregated variable in replica
        # context is a merge_call, which TensorFlow rejects inside tf.cond.
        for variable, batch in zip(variables, stats):
            old = tf.cast(variable, self.statistics_dtype)
            new = old + weight_new * (batch - old)
            variable.assign(tf.cast(tf.where(finite, new, old), _STATE_DTYPE))
        self.num_updates.assign_add(tf.cast(finite, "int64"))
        self._report_skip(tf.logical_and(tf.logical_not(finite_stats), tf.logical_not(skip)),
                          "non-finite batch statistics; the correlation update was skipped")
        return finite

    # -- kernel -----------------------------------------------------------------------------

    def _kernel_from(self, correlation, cross_correlation):
        options = dict(self.rule_options)
        if self.needs_cross_correlation:
            options["cross_correlation"] = cross_correlation
        return self._rule(correlation, eps=self.eps, **options)

    def statistics_for_rule(self):
        """(F, C) as the rule sees them: F - mu mu^T under ``zero_mean``; C or None."""
        correlation = tf.cast(self.correlation, self.statistics_dtype)
        if self.zero_mean:
            mean = tf.cast(self.mean, self.statistics_dtype)
            correlation = correlation - mean[:, None] * mean[None, :]
        cross = (tf.cast(self.cross_correlation, self.statistics_dtype)
                 if self.needs_cross_correlation else None)
        return correlation, cross

    def refresh(self):
        """Recompute the kernel from the current statistics. Returns a bool tensor: applied.

        Skipped (kernel unchanged) before any statistics exist, and, with a warning, when the
        statistics or the rule's result are not finite.
        """
        return self._refresh(tf.constant(True))

    def rule_placement(self):
        """The device the rule runs on now (None: no placement); see :func:`resolve_rule_device`."""
        if _in_xla_context():  # one compiled cluster: an inner device scope cannot split it
            return None
        value = getattr(self.kernel, "value", self.kernel)
        return resolve_rule_device(self.rule_device, getattr(value, "device", ""),
                                   bool(getattr(self._rule, "uses_eigh", False)))

    def _refresh(self, due):
        """``refresh`` if the bool tensor ``due`` is true; the kernel is unchanged otherwise.

        Only the kernel's computation is conditional (eigh runs only when due); the kernel is
        assigned unconditionally (the old value when not applied), for the same reason as in
        ``update_statistics``: no assignment inside tf.cond under a strategy.
        """
        correlation, cross = self.statistics_for_rule()
        attempt = tf.logical_and(due, self.num_updates > 0)
        old = tf.cast(self.kernel, _STATE_DTYPE)
        device = self.rule_placement()

        # eigh of a non-finite matrix can fail or hang, and of the zero matrix fails on cuSOLVER:
        # the rule runs only on a finite, non-zero F (F is PSD, so max |F| = 0 iff F = 0).
        usable = tf.logical_and(tf.reduce_all(tf.math.is_finite(correlation)),
                                tf.reduce_max(tf.abs(correlation)) > 0)

        def compute():
            with tf.device(device) if device else contextlib.nullcontext():
                kernel = tf.cast(tf.stop_gradient(self._kernel_from(correlation, cross)), _STATE_DTYPE)
            return kernel, tf.reduce_all(tf.math.is_finite(kernel))

        message = "non-finite or zero correlation, or non-finite kernel; the predictor refresh was skipped"
        try:
            kernel, ok = tf.cond(tf.logical_and(attempt, usable), compute, lambda: (old, tf.constant(False)))
        except _SOLVER_ERRORS as error:
            if not tf.executing_eagerly():
                raise
            kernel, ok = old, tf.constant(False)
            first_line = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
            message = f"the rule's eigendecomposition failed ({first_line}); the predictor refresh was skipped"
        m = self.predictor_ema
        new = kernel if m == 0.0 else m * old + (1.0 - m) * kernel
        self.kernel.assign(tf.where(ok, new, old))
        self._report_skip(tf.logical_and(attempt, tf.logical_not(ok)), message)
        return ok

    def update(self, projections, target_projections=None, skip=False):
        """One training step's update: fold the statistics, then refresh if due.

        The kernel is refreshed on updates 0, freq, 2 freq, ... (the code's
        ``niter % freq == 0``) unless that batch was skipped as non-finite, or the caller
        skipped the step (``skip``: then the step counter stays too). Returns a bool tensor:
        the kernel was refreshed.
        """
        folded = self.update_statistics(projections, target_projections, skip=skip)
        # A skipped batch skips its refresh too: the kernel stays exactly as it was.
        due = tf.logical_and(folded, tf.equal(self.step % self.freq, 0))
        refreshed = self._refresh(due)
        self.step.assign_add(tf.cast(tf.logical_not(tf.convert_to_tensor(skip, tf.bool)), "int64"))
        return refreshed

    def _report_skip(self, skipped, message):
        """Count a skipped update (bool tensor ``skipped``) and warn about it."""
        self.num_skipped.assign_add(tf.cast(skipped, "int64"))
        text = f"DirectPredictor({self.name}): {message}."
        if tf.executing_eagerly():
            if bool(skipped):
                warnings.warn(text, RuntimeWarning, stacklevel=3)
            return

        if _in_xla_context():
            # PrintV2 has no XLA kernel (jit_compile=True fails to compile): count only;
            # callbacks.SpectrumMonitor reads `num_skipped` and warns at the epoch's end.
            return

        def warn():  # inside a compiled train_step a Python warning would fire at trace time only
            tf.print("WARNING:", text, output_stream=sys.stderr)
            return tf.constant(True)

        tf.cond(skipped, warn, lambda: tf.constant(False))

    def get_config(self):
        config = super().get_config()
        config.update(rule=self.rule, rho=self.rho, eps=self.eps, freq=self.freq,
                      predictor_ema=self.predictor_ema, zero_mean=self.zero_mean,
                      rule_options=dict(self.rule_options), statistics_dtype=self.statistics_dtype,
                      rule_device=self.rule_device)
        return config
