"""BYOL and SimSiam as Keras models with an idiomatic ``train_step``.

    model = keras_ncssl.BYOL(encoder, projector, predictor)
    model.compile(optimizer=keras_ncssl.optimizers.SGD(0.03, momentum=0.9, weight_decay=4e-4))
    model.fit(two_view_dataset, epochs=100)       # the dataset yields (view1, view2)

One training step ([DP] §2.2 as the official code runs it):
1. forward both views through the online network with the predictor kernel as it stands;
2. the symmetric loss against the target projections (BYOL: the EMA target network;
   SimSiam / ``ema=False``: the online projections under stop_gradient);
3. the optimizer step on the online weights (encoder, projector, trainable predictor);
4. a :class:`~keras_ncssl.predictors.DirectPredictor` folds the detached online projections of
   both views into its correlation and refreshes its kernel every ``freq`` steps;
5. the target EMA: xi <- tau xi + (1 - tau) theta.

Multi-crop ([SwAV] Caron et al. 2020): a dataset of dicts ``{"view1", "view2", "local_views"}``
(``augment.pretrain_dataset(..., local_views=M, local_size=s)``) adds M low-resolution views;
each local prediction is compared with both global targets (no target pass on the locals),
the loss averages all 2 + 2M pairs (`losses.symmetric_loss`), and the DirectPredictor folds
one row per loss term. The encoder must then accept both sizes: build it with
``input_shape=(None, None, channels)``.

Non-finite steps: a step whose loss, gradients or new BatchNorm statistics are not finite on
any replica (a NaN pixel, an overflow) is skipped whole: optimizer, BatchNorm statistics, predictor and target EMA keep
their values, ``nonfinite_steps`` counts it and a warning is printed. After
``max_consecutive_nonfinite`` such steps in a row ``fit`` raises `NonFiniteTrainingError`
(the run has diverged; skipping cannot help).

Target BatchNorm policy (``target_batchnorm``):
- ``"batch_stats"`` (default): the target network runs in training mode, normalising with the
  current batch's statistics, and only trainable weights are averaged. This is what both the
  PyTorch reference code ([LM], lightly) and DeepMind's BYOL do: the target's moving
  statistics are never used for the loss.
- ``"ema"``: the target runs in inference mode and *every* weight, moving mean/variance
  included, is averaged: Keras' "average all weights" policy.
"""
import keras
import tensorflow as tf

from keras_ncssl import losses as losses_lib
from keras_ncssl.losses import projection_std  # noqa: F401  (also this module's name)
from keras_ncssl._compat import require_private_method
from keras_ncssl.callbacks import NonFiniteTrainingError, StopOnNonFinite  # noqa: F401  (models.NonFiniteTrainingError)
from keras_ncssl.distribute import check_fit_length, step_logs
from keras_ncssl.numerics import all_finite_across_replicas, graph_warning
from keras_ncssl.predictors.layer import DirectPredictor
from keras_ncssl.schedules import EMA_SCHEDULES, ema_tau

TARGET_BATCHNORM = ("batch_stats", "ema")

# `_NonContrastive._maybe_symbolic_build` overrides this private method of Keras' TensorFlow
# trainer (Keras 3.5 to 3.15 have it unchanged): fail at import, with the fix, if it is gone.
require_private_method(keras.Model, "_maybe_symbolic_build", ("iterator", "data_batch"))


def _feature_dim(model, what):
    shape = model.output_shape if hasattr(model, "output_shape") else None
    if not shape or shape[-1] is None:
        raise ValueError(f"{what} must have a known output dimension; got output shape {shape}.")
    return int(shape[-1])


class _NonContrastive(keras.Model):
    """Shared base of :class:`BYOL` and :class:`SimSiam`; see the module docstring."""

    def __init__(self, encoder, projector, predictor, *, loss="byol", ema=True, tau_base=0.996,
                 tau_schedule="cosine", total_steps=None, target_batchnorm="batch_stats",
                 forward_views_together=False, max_consecutive_nonfinite=20, **kwargs):
        super().__init__(**kwargs)
        if loss not in losses_lib.LOSSES:
            raise ValueError(f"loss must be one of {sorted(losses_lib.LOSSES)}; got {loss!r}.")
        if not (isinstance(tau_base, (int, float)) and 0.0 <= tau_base <= 1.0):
            raise ValueError(f"tau_base must be a number in [0, 1]; got {tau_base!r}.")
        if tau_schedule not in EMA_SCHEDULES:
            raise ValueError(f"tau_schedule must be one of {list(EMA_SCHEDULES)}; got {tau_schedule!r}.")
        if target_batchnorm not in TARGET_BATCHNORM:
            raise ValueError(f"target_batchnorm must be one of {TARGET_BATCHNORM}; got {target_batchnorm!r}.")
        if total_steps is not None and (int(total_steps) != total_steps or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None; got {total_steps!r}.")
        if int(max_consecutive_nonfinite) != max_consecutive_nonfinite or max_consecutive_nonfinite < 0:
            raise ValueError("max_consecutive_nonfinite must be an integer >= 0 (0: never stop); got "
                             f"{max_consecutive_nonfinite!r}.")
        self.max_consecutive_nonfinite = int(max_consecutive_nonfinite)
        self.encoder, self.projector, self.predictor = encoder, projector, predictor
        self.loss_kind = loss
        self.ema = bool(ema)
        self.tau_base = float(tau_base)
        self.tau_schedule = tau_schedule
        self.target_batchnorm = target_batchnorm
        self.forward_views_together = bool(forward_views_together)

        feature_dim = _feature_dim(encoder, "encoder")
        if not projector.built:
            projector.build((None, feature_dim))
        projection_dim = _feature_dim(projector, "projector")
        self._check_predictor(projection_dim)
        if self.ema:
            self.target_encoder = keras.models.clone_model(encoder)
            self.target_projector = keras.models.clone_model(projector)
            self.target_encoder.set_weights(encoder.get_weights())  # BYOL starts from a copy
            self.target_projector.set_weights(projector.get_weights())
            # The target stays `trainable` on purpose: a Keras BatchNormalization with
            # trainable=False always normalises with its moving statistics, which would break
            # the "batch_stats" policy. The optimizer never sees it (see online_variables).
        self.total_steps = self.add_weight(
            name="total_steps", shape=(), dtype="int64", trainable=False,
            initializer=keras.initializers.Constant(total_steps or 0))
        counter = dict(shape=(), dtype="int64", trainable=False, initializer="zeros",
                       aggregation="only_first_replica")
        self.nonfinite_steps = self.add_weight(name="nonfinite_steps", **counter)
        self.consecutive_nonfinite_steps = self.add_weight(name="consecutive_nonfinite_steps", **counter)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.std_tracker = keras.metrics.Mean(name="projection_std")
        # Every sub-network is built above, so the model is too: save_weights / load_weights
        # work before any call, and no symbolic build is needed under a strategy (see
        # _maybe_symbolic_build).
        self.built = True

    def _check_predictor(self, projection_dim):
        """Fail now, not deep inside fit, unless the predictor maps d -> d (d = projection dim)."""
        try:
            out = self.predictor(tf.zeros((2, projection_dim)), training=False)
        except Exception as error:  # a built layer of another size fails in its matmul
            raise ValueError(f"the predictor must map the projector's {projection_dim} dimensions to "
                             f"{projection_dim}; calling it on [batch, {projection_dim}] failed: "
                             f"{str(error).splitlines()[0]}") from None
        if out.shape[-1] != projection_dim:
            raise ValueError(f"the predictor maps {projection_dim} -> {out.shape[-1]} dimensions, but "
                             f"it must map the projector's {projection_dim} -> {projection_dim}.")

    # -- forward ----------------------------------------------------------------------------

    def call(self, images, training=False):
        """The encoder's features: what a downstream user of the model wants."""
        return self.encoder(images, training=training)

    def _online(self, x1, x2, training):
        if self.forward_views_together:  # one pass; BN statistics then pool both views
            z = self.projector(self.encoder(tf.concat([x1, x2], 0), training=training), training=training)
            z1, z2 = tf.split(z, 2)
        else:  # the reference code's per-view passes (per-view BN statistics)
            z1 = self.projector(self.encoder(x1, training=training), training=training)
            z2 = self.projector(self.encoder(x2, training=training), training=training)
        return z1, z2, self.predictor(z1, training=training), self.predictor(z2, training=training)

    def _target(self, x, training):
        training = training and self.target_batchnorm == "batch_stats"
        return tf.stop_gradient(
            self.target_projector(self.target_encoder(x, training=training), training=training))

    def _online_locals(self, local_views, training):
        """Projections and predictions of the multi-crop local views: one encoder pass over all
        of them (they share a size; their BN statistics pool the local views)."""
        if not local_views:
            return (), ()
        fixed = tuple(getattr(self.encoder, "input_shape", (None, None, None))[1:3])
        given = tuple(local_views[0].shape[1:3])
        if any(f is not None and f != g for f, g in zip(fixed, given)):
            raise ValueError(f"the local views are {given[0]}x{given[1]} px but the encoder was built for "
                             f"{fixed[0]}x{fixed[1]} inputs only; build it with input_shape=(None, None, "
                             "channels) to train with multi-crop local views.")
        z = self.projector(self.encoder(tf.concat(local_views, 0), training=training), training=training)
        return tuple(tf.split(z, len(local_views))), tuple(tf.split(self.predictor(z, training=training),
                                                                    len(local_views)))

    def compute_symmetric_loss(self, x1, x2, training, targets=None, local_views=()):
        """The symmetric loss and (z1, z2, t1, t2); ``targets`` = precomputed (t1, t2).

        ``local_views``: multi-crop's local views, predicted against both global targets
        (`losses.symmetric_loss`); their projections are then a fifth item of the tuple.
        """
        if targets is None and self.ema:
            targets = self._target(x1, training), self._target(x2, training)
        z1, z2, p1, p2 = self._online(x1, x2, training)
        t1, t2 = targets if self.ema else (tf.stop_gradient(z1), tf.stop_gradient(z2))
        z_locals, q_locals = self._online_locals(local_views, training)
        loss = losses_lib.symmetric_loss(self.loss_kind, p1, p2, t1, t2, local_predictions=q_locals)
        return loss, (z1, z2, t1, t2) + ((z_locals,) if local_views else ())

    # -- training ---------------------------------------------------------------------------

    @staticmethod
    def _views(data):
        """(view1, view2, local views) of a batch: a (view1, view2) pair, or a dict with
        "view1", "view2" and optionally "local_views" (a tuple of batches, multi-crop)."""
        if isinstance(data, dict):
            return data["view1"], data["view2"], tuple(data.get("local_views", ()))
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise ValueError("the dataset must yield (view1, view2) pairs of image batches (or dicts with "
                             "view1, view2 and local_views); got "
                             f"{type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}.")
        return data[0], data[1], ()

    def current_tau(self):
        """tau at the current optimizer step (cosine from tau_base to 1 over total_steps)."""
        if self.tau_schedule == "constant":
            return tf.constant(self.tau_base, tf.float32)
        return ema_tau(self.optimizer.iterations, tf.maximum(self.total_steps, 1), self.tau_base,
                       self.tau_schedule)

    def train_step(self, data):
        x1, x2, local_views = self._views(data)
        tau = self.current_tau()  # tau_k for update k, read before the step increments k
        online = self.online_variables
        if not self.optimizer.built:  # before any tf.cond below: variables are made outside it
            self.optimizer.build(online)
        single_replica = tf.distribute.get_strategy().num_replicas_in_sync == 1
        # What a skipped step must give back: the BatchNorm statistics that the forward passes
        # update before the loss is known, and, with several replicas, whatever the optimizer
        # writes (a replica cannot branch around the optimizer's all-reduce: see _apply).
        rollback = self._state_written_by_forward()
        if not single_replica:
            rollback += list(online) + list(self.optimizer.variables)
        saved = [tf.identity(v) for v in rollback]
        # The target needs no gradient: run it before the tape so nothing of it is recorded.
        targets = (self._target(x1, True), self._target(x2, True)) if self.ema else None
        with tf.GradientTape() as tape:
            loss, (z1, z2, t1, t2, *z_locals) = self.compute_symmetric_loss(x1, x2, True, targets, local_views)
            penalties = self.encoder.losses + self.projector.losses + self.predictor.losses
            total = loss + tf.cast(tf.add_n(penalties), loss.dtype) if penalties else loss
            # Keras sums replica gradients under a strategy: scale the per-replica mean once.
            total = total / tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, total.dtype)
            scaled = self.optimizer.scale_loss(total)
        gradients = tape.gradient(scaled, online)
        # A loss-scale optimizer (mixed_float16) skips overflowing scaled gradients itself and
        # lowers its scale: only the loss decides here then.
        scaling = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        # The forward passes' new BatchNorm statistics count too: activations that overflow
        # make an infinite moving variance while the normalised loss stays finite.
        finite = all_finite_across_replicas([total] + self._state_written_by_forward()
                                            + ([] if scaling else list(gradients)))
        self._apply(finite, gradients, online, single_replica)
        for variable, value in zip(rollback, saved):
            variable.assign(tf.where(finite, variable, value))
        if isinstance(self.predictor, DirectPredictor):
            # One row per loss term (input, target): a local view enters twice, once per target.
            inputs, outputs = [z1, z2], [t2, t1]
            for z in (z_locals[0] if z_locals else ()):
                inputs += [z, z]
                outputs += [t1, t2]
            self.predictor.update(tf.concat(inputs, 0), tf.concat(outputs, 0), skip=tf.logical_not(finite))
        if self.ema:
            self.update_target(tf.where(finite, tf.cast(tau, tf.float32), 1.0))  # tau = 1: unchanged
        skipped = tf.cast(tf.logical_not(finite), "int64")
        self.nonfinite_steps.assign_add(skipped)
        self.consecutive_nonfinite_steps.assign((self.consecutive_nonfinite_steps + 1) * skipped)
        graph_warning(tf.logical_not(finite), f"{self.name}: a training step had a non-finite loss or "
                      "gradients; the whole update was skipped.")
        weight = tf.cast(finite, tf.float32)
        self.loss_tracker.update_state(tf.where(finite, tf.cast(loss, tf.float32), 0.0), sample_weight=weight)
        self.std_tracker.update_state(tf.where(finite, projection_std(z1), 0.0), sample_weight=weight)
        return step_logs({"loss": self.loss_tracker.result(), "projection_std": self.std_tracker.result(),
                          "tau": tau, "learning_rate": tf.cast(self.optimizer.learning_rate, tf.float32),
                          "nonfinite_steps": tf.cast(self.nonfinite_steps, tf.float32)})

    def _apply(self, finite, gradients, variables, single_replica):
        """The optimizer step, taken only if ``finite``.

        One replica branches around it (no cost). Several replicas cannot: the optimizer
        all-reduces the gradients, a synchronisation point that TensorFlow forbids inside a
        replica's ``tf.cond``; there the step is taken and ``train_step`` writes the old values
        back (``tf.where``), the same decision on every replica.
        """
        if single_replica:
            def step():
                self.optimizer.apply_gradients(zip(gradients, variables))
                return tf.constant(True)

            tf.cond(finite, step, lambda: tf.constant(False))
        else:
            self.optimizer.apply_gradients(zip(gradients, variables))

    def _state_written_by_forward(self):
        """Non-trainable variables the training-mode forward passes write (BatchNorm moving
        statistics of the online and target networks; a DirectPredictor writes nothing there)."""
        networks = [self.encoder, self.projector]
        if not isinstance(self.predictor, DirectPredictor):
            networks.append(self.predictor)
        if self.ema:
            networks += [self.target_encoder, self.target_projector]
        return [v for network in networks for v in network.non_trainable_weights]

    def test_step(self, data):
        x1, x2, local_views = self._views(data)
        loss, (z1, *_) = self.compute_symmetric_loss(x1, x2, training=False, local_views=local_views)
        self.loss_tracker.update_state(loss)
        self.std_tracker.update_state(projection_std(z1))
        return step_logs({"loss": self.loss_tracker.result(), "projection_std": self.std_tracker.result()})

    @property
    def metrics(self):
        return [self.loss_tracker, self.std_tracker]

    @property
    def online_variables(self):
        """Variables the optimizer trains: encoder, projector and the trainable predictor."""
        return (self.encoder.trainable_variables + self.projector.trainable_variables
                + self.predictor.trainable_variables)

    def target_pairs(self):
        """(target, online) variable pairs the EMA updates, per ``target_batchnorm``."""
        # clone_model keeps the layer order, so the weight lists align one to one.
        targets = self.target_encoder.weights + self.target_projector.weights
        onlines = self.encoder.weights + self.projector.weights
        keep_all = self.target_batchnorm == "ema"
        return [(t, o) for t, o in zip(targets, onlines) if keep_all or o.trainable]

    def update_target(self, tau):
        """xi <- tau xi + (1 - tau) theta for every (target, online) pair ([BYOL] §3.1)."""
        for target, online in self.target_pairs():
            t = tf.cast(tau, target.dtype)
            target.assign(t * target + (1.0 - t) * tf.cast(online, target.dtype))

    def fit(self, x=None, y=None, epochs=1, steps_per_epoch=None, **kwargs):
        """``keras.Model.fit``; also sets ``total_steps`` for the cosine EMA schedule if unset,
        and stops with `NonFiniteTrainingError` after ``max_consecutive_nonfinite`` skipped steps."""
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [StopOnNonFinite(self.max_consecutive_nonfinite)]
        if isinstance(x, tf.data.Dataset):  # Keras ignores shuffle for datasets, with a warning each fit
            kwargs.setdefault("shuffle", False)
        check_fit_length(x, steps_per_epoch, self.distribute_strategy)  # see distribute.py
        if self.ema and self.tau_schedule == "cosine" and int(self.total_steps.numpy()) == 0:
            steps = steps_per_epoch
            if steps is None and isinstance(x, tf.data.Dataset):
                cardinality = int(x.cardinality().numpy())
                steps = cardinality if cardinality > 0 else None
            if steps is None:
                raise ValueError(
                    "tau_schedule='cosine' needs the run length: pass total_steps to the model, "
                    "steps_per_epoch to fit, or a dataset of known cardinality.")
            self.total_steps.assign(int(steps) * (int(epochs) - int(kwargs.get("initial_epoch", 0))))
        return super().fit(x, y, epochs=epochs, steps_per_epoch=steps_per_epoch, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Build what ``__init__`` left unbuilt (the optimizer) under the model's strategy.

        Keras 3 (3.5 to 3.15) builds a model made under a strategy from its first batch,
        which it first averages with ``strategy.reduce``; MultiWorkerMirroredStrategy cannot
        reduce a nest such as the (view1, view2) pair and fails. Every layer here is built in
        ``__init__``, so only the optimizer remains: it is built in the strategy's scope (its
        slots mirrored like the weights) on the online variables, as ``apply_gradients``
        builds it without a strategy, so checkpoints have the same layout either way.
        """
        strategy = getattr(self, "_distribute_strategy", None)
        if strategy is None:  # no strategy: Keras builds lazily, as it always did
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        with strategy.scope():
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.online_variables)

    # -- serialisation ----------------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update(
            encoder=serialize(self.encoder), projector=serialize(self.projector),
            predictor=serialize(self.predictor), loss=self.loss_kind, ema=self.ema,
            tau_base=self.tau_base, tau_schedule=self.tau_schedule,
            total_steps=int(self.total_steps.numpy()) or None,
            target_batchnorm=self.target_batchnorm, forward_views_together=self.forward_views_together,
            max_consecutive_nonfinite=self.max_consecutive_nonfinite)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "projector", "predictor"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_ncssl")
class BYOL(_NonContrastive):
    """BYOL [Grill et al. 2020]: online encoder -> projector -> predictor, EMA target.

    Defaults follow [DP]'s small-data setting except the EMA schedule: ``tau_schedule="cosine"``
    from ``tau_base`` = 0.996 to 1 ([BYOL]); the DirectPred paper used ``"constant"`` 0.996.
    ``ema=False`` drops the target network (target = online under stop_gradient, i.e. tau = 0):
    the "no EMA" columns of [DP] Tab. 3. ``loss`` "byol" (2 - 2 cos, summed over directions).
    """

    def __init__(self, encoder, projector, predictor, tau_base=0.996, tau_schedule="cosine", **kwargs):
        super().__init__(encoder, projector, predictor, tau_base=tau_base, tau_schedule=tau_schedule,
                         **kwargs)


@keras.saving.register_keras_serializable(package="keras_ncssl")
class SimSiam(_NonContrastive):
    """SimSiam [Chen & He 2021]: no target network; targets are the online projections under
    stop_gradient; loss 1/2 D(p1, sg z2) + 1/2 D(p2, sg z1) with D = -cos."""

    def __init__(self, encoder, projector, predictor, **kwargs):
        kwargs.setdefault("loss", "simsiam")
        kwargs["ema"] = False
        kwargs.setdefault("tau_schedule", "constant")
        super().__init__(encoder, projector, predictor, **kwargs)
