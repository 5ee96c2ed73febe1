"""`KNNMonitor`: the online kNN accuracy of the encoder on held-out subsets, once per epoch."""
import keras
import numpy as np

from keras_ncssl.evaluation.features import as_labels, extract_features, make_feature_fn, resolve_encoder
from keras_ncssl.evaluation.knn import knn_top1


class KNNMonitor(keras.callbacks.Callback):
    """Logs the weighted-kNN top-1 of ``model.encoder`` as ``logs["knn_top1"]`` during fit.

    An online collapse monitor (PITFALLS.md "Monitoring collapse": the loss keeps falling
    while a model collapses). Bank: features of ``bank_images`` (a training subset) with
    ``bank_labels``; queries: ``query_images`` (a validation subset). It is an *online*
    number on subsets, not the offline evaluation: say which one a table shows.

    It writes into the epoch's ``logs`` dict, so CSVLogger and TensorBoard record it when
    they come after this callback in the ``callbacks`` list; Keras appends History and the
    progress bar after all user callbacks, so those always see it. It runs on the first
    epoch of each ``fit`` (so CSVLogger, which fixes its columns at the first epoch, gets
    the column), on every ``every_n_epochs``-th epoch and on the last; other epochs carry
    no key. ``self.history`` holds ``(epoch, top1)`` pairs.

    Not registered as a Keras serializable: callbacks are never saved in model files, and
    its images are data rather than configuration. ``get_config`` gives its settings.
    """

    def __init__(self, bank_images, bank_labels, query_images, query_labels, *, k=200,
                 temperature=0.1, every_n_epochs=1, batch_size=512, name="knn_top1",
                 encoder=None):
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer; got "
                             f"{every_n_epochs!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer; got {k!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive; got {temperature!r}")
        self.bank_images = np.asarray(bank_images, dtype=np.float32)
        self.bank_labels = as_labels(bank_labels)
        self.query_images = np.asarray(query_images, dtype=np.float32)
        self.query_labels = as_labels(query_labels)
        for what, images, labels in (("bank", self.bank_images, self.bank_labels),
                                     ("query", self.query_images, self.query_labels)):
            if len(images) != len(labels) or len(images) == 0:
                raise ValueError(f"{what}: {len(images)} images and {len(labels)} labels; "
                                 "need equal, > 0")
        self.k, self.temperature = k, float(temperature)
        self.every_n_epochs, self.batch_size, self.name = every_n_epochs, batch_size, name
        self._encoder = encoder
        self._feature_fn = None
        self._first_epoch = None
        self.history = []

    def get_config(self):
        return {"k": self.k, "temperature": self.temperature,
                "every_n_epochs": self.every_n_epochs, "batch_size": self.batch_size,
                "name": self.name, "bank_size": len(self.bank_labels),
                "query_size": len(self.query_labels)}

    def _encoder_to_monitor(self):
        if self._encoder is not None:
            return resolve_encoder(self._encoder)
        encoder = getattr(self.model, "encoder", None)
        if encoder is None:
            raise ValueError(f"KNNMonitor needs model.encoder; {type(self.model).__name__} has "
                             "none. Pass encoder=... to KNNMonitor.")
        return encoder

    def on_train_begin(self, logs=None):
        self._feature_fn = make_feature_fn(self._encoder_to_monitor())
        self._first_epoch = None

    def evaluate(self):
        """kNN top-1 of the encoder as it is now."""
        if self._feature_fn is None:
            self._feature_fn = make_feature_fn(self._encoder_to_monitor())
        bank, _ = extract_features(None, self.bank_images, self.batch_size,
                                   feature_fn=self._feature_fn)
        queries, _ = extract_features(None, self.query_images, self.batch_size,
                                      feature_fn=self._feature_fn)
        return knn_top1((bank, self.bank_labels), (queries, self.query_labels), k=self.k,
                        temperature=self.temperature)

    def on_epoch_end(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch
        last = self.params.get("epochs") if self.params else None
        if not (epoch == self._first_epoch or (epoch + 1) % self.every_n_epochs == 0
                or (last is not None and epoch == last - 1)):
            return
        top1 = self.evaluate()
        self.history.append((epoch, top1))
        if logs is not None:
            logs[self.name] = top1
