"""Keras callbacks that watch training: the predictor and the representation (SpectrumMonitor),
and the stop on consecutive non-finite steps that every BYOL/SimSiam fit adds (StopOnNonFinite)."""
import warnings

import keras
import numpy as np

from keras_ncssl import diagnostics
from keras_ncssl.predictors.layer import DirectPredictor


class SpectrumMonitor(keras.callbacks.Callback):
    """Per-epoch spectrum of F and W_p, eigen-alignment and collapse warnings ([DP] Fig. 2).

    At the end of every ``every_n_epochs``-th epoch it reads the predictor-input correlation F
    (a :class:`DirectPredictor`'s running ``correlation``; for other predictors, the
    correlation of the online projections of ``probe_images``) and the predictor matrix W_p
    (``kernel``, where the predictor has one), then records with the functions of
    :mod:`keras_ncssl.diagnostics`:

    - ``spectrum(F)`` and the eigenvalues of sym(W_p),
    - the eigen-alignment cos(u_j, W_p u_j) over F's eigenvectors u_j,
    - ``effective_rank(F)`` and ``commutator_norm(F, W_p)``.

    Scalars go into ``logs`` (``effective_rank``, ``alignment_mean``, ``commutator_norm``) so
    History, CSV and TensorBoard see them; the full per-epoch arrays stay in ``self.records``
    for the report. It warns when ``projection_std`` falls below ``collapse_std`` (the loss
    keeps falling as a model collapses, PITFALLS.md; default
    ``diagnostics.collapse_threshold(d)`` = 0.1/sqrt(d) of the model's projection dimension d)
    and when the predictor skipped updates because of non-finite statistics.
    """

    def __init__(self, probe_images=None, every_n_epochs=1, collapse_std=None):
        super().__init__()
        self.probe_images = probe_images
        self.every_n_epochs = int(every_n_epochs)
        self.collapse_std = None if collapse_std is None else float(collapse_std)
        self.records = []
        self._skipped = 0

    def _correlation(self):
        predictor = self.model.predictor
        if isinstance(predictor, DirectPredictor):
            return predictor.statistics_for_rule()[0].numpy().astype(np.float64)
        if self.probe_images is None:
            return None
        z = self.model.projector(self.model.encoder(self.probe_images, training=False), training=False)
        z = np.asarray(z, np.float64)
        return z.T @ z / len(z)

    def measure(self):
        """The diagnostics of the model as it stands: a dict of arrays and scalars."""
        correlation = self._correlation()
        kernel = getattr(self.model.predictor, "kernel", None)
        kernel = None if kernel is None else np.asarray(kernel.numpy(), np.float64)
        record = {}
        if correlation is not None:
            record["spectrum_F"] = diagnostics.spectrum(correlation).tolist()
            record["effective_rank"] = float(diagnostics.effective_rank(correlation))
        if kernel is not None:
            record["spectrum_Wp"] = diagnostics.spectrum(kernel).tolist()
        if correlation is not None and kernel is not None:
            alignment, _ = diagnostics.eigen_alignment(correlation, kernel)
            record["alignment"] = alignment.tolist()
            record["alignment_mean"] = float(np.mean(alignment))
            record["commutator_norm"] = float(diagnostics.commutator_norm(correlation, kernel))
        return record

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if (epoch + 1) % self.every_n_epochs == 0:
            record = self.measure()
            record["epoch"] = int(epoch) + 1
            self.records.append(record)
            for key in ("effective_rank", "alignment_mean", "commutator_norm"):
                if key in record:
                    logs[key] = record[key]
        std = logs.get("projection_std")
        threshold = self.collapse_std
        if threshold is None:
            threshold = diagnostics.collapse_threshold(self.model.projector.output_shape[-1])
        if std is not None and float(std) < threshold:
            warnings.warn(f"epoch {epoch + 1}: projection_std {float(std):.4g} < {threshold:.4g}: "
                          "the representation is collapsing.", RuntimeWarning, stacklevel=2)
        skipped = getattr(self.model.predictor, "num_skipped", None)
        if skipped is not None and int(skipped.numpy()) > self._skipped:
            warnings.warn(f"epoch {epoch + 1}: the predictor skipped {int(skipped.numpy()) - self._skipped} "
                          "update(s) with non-finite statistics.", RuntimeWarning, stacklevel=2)
            self._skipped = int(skipped.numpy())


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: too many consecutive steps had a non-finite loss or gradients."""


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises `NonFiniteTrainingError` once ``max_consecutive_nonfinite`` steps in a row were
    skipped; warns at the epoch's end about steps that were skipped and then recovered."""

    def __init__(self, limit):
        super().__init__()
        self.limit = int(limit)
        self.epoch, self.batch, self.reported = 0, 0, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.reported is None:
            self.reported = int(self.model.nonfinite_steps.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.batch = batch
        run = int(self.model.consecutive_nonfinite_steps.numpy())
        if self.limit and run >= self.limit:
            raise NonFiniteTrainingError(
                f"training diverged: {run} consecutive steps had a non-finite loss or gradients (epoch "
                f"{self.epoch + 1}, batch {batch + 1} of the epoch, optimizer step "
                f"{int(self.model.optimizer.iterations.numpy())}); every skipped step left the weights "
                "unchanged. Lower the learning rate, or check the inputs for NaN/Inf.")

    def on_epoch_end(self, epoch, logs=None):
        total = int(self.model.nonfinite_steps.numpy())
        if total > self.reported:
            warnings.warn(f"epoch {epoch + 1}: {total - self.reported} training step(s) had a non-finite loss "
                          "or gradients and were skipped (see nonfinite_steps).", RuntimeWarning, stacklevel=2)
            self.reported = total
