"""Offline evaluation of a frozen encoder: linear probe, weighted kNN, few-label probe.

Protocol (PITFALLS.md "Evaluation protocol"; ALGORITHMS.md 2.5 for why the paper's is not used):

* Features come from the frozen encoder called with ``training=False`` (BatchNorm uses its
  moving statistics and is never updated).
* Linear probe: features standardised with the mean/std of the training split only, then a
  multinomial logistic regression (full-batch L-BFGS, :class:`SoftmaxRegression`, converged
  when the largest gradient entry is <= 1e-4 per grid fit, 1e-5 for the tested one). Its L2
  strength is chosen on the validation split from a small grid; the test split is scored
  once, with the chosen model. The paper ([LM] ``linear_feature_eval.py``) instead reports
  the best *test* accuracy over 50 probe epochs, which selects on the test set and is
  optimistic; numbers from this module are therefore not directly comparable to its tables.
* Weighted kNN (Wu et al. 2018, InstDisc; the DINO evaluation code): cosine similarity,
  k = 200 nearest training features, each votes for its label with weight exp(sim / T),
  T = 0.1. No hyper-parameter is selected, so the test split is used directly.
* Streaming linear probe (`streaming`), for features over a memory budget (ImageNet): the same
  protocol, one head per L2 strength trained by SGD over tf.data under a tf.distribute strategy.
* Few-label probe: n labelled examples per class drawn from the training split with several
  seeds; the same linear probe; mean, std and per-draw accuracies.

All of these are run on any "encoder": a trained model's ``.encoder``, a randomly initialised
copy of it (:func:`random_init_copy`) or ``keras.layers.Flatten()`` for raw pixels
(:func:`evaluate_raw_pixels`), so that baselines share exactly one protocol.

Splits are ``(features, labels)`` tuples of numpy arrays for the ``*_probe``/``knn_*``
functions, and ``(images, labels)`` tuples or batched ``tf.data`` datasets of
``(images, labels)`` for the functions taking an encoder.

Modules: `features` (extraction, split checks), `probe` (linear probe), `softmax` (its
K-FAC-preconditioned L-BFGS solver), `streaming` (SGD probe over tf.data), `knn`, `few_label`, `protocol`
(everything in one call, baselines), `monitor` (the `KNNMonitor` callback). Everything public is
importable from `keras_ncssl.evaluation`.
"""
from keras_ncssl.evaluation.features import (accuracy, as_labels, check_split, extract_features, make_feature_fn,
                                             resolve_encoder)
from keras_ncssl.evaluation.few_label import FEW_LABEL_L2_GRID, few_label_probe, sample_few_labels
from keras_ncssl.evaluation.knn import knn_predict, knn_top1
from keras_ncssl.evaluation.monitor import KNNMonitor
from keras_ncssl.evaluation.probe import (DEFAULT_L2_GRID, DEFAULT_MAX_ITER, DEFAULT_TEST_TOL, DEFAULT_TOL, REFIT_CHOICES, SoftmaxRegression, Standardizer,
                                          linear_probe)
from keras_ncssl.evaluation.streaming import (DEFAULT_FEATURE_MEMORY_BUDGET, evaluate_encoder_streaming,
                                              feature_bytes, needs_streaming, streaming_linear_probe)
from keras_ncssl.evaluation.protocol import (evaluate_encoder, evaluate_features, evaluate_raw_pixels,
                                             random_init_copy)

__all__ = [
    "DEFAULT_FEATURE_MEMORY_BUDGET", "evaluate_encoder_streaming", "feature_bytes", "needs_streaming", "streaming_linear_probe",
    "DEFAULT_L2_GRID", "DEFAULT_MAX_ITER", "DEFAULT_TEST_TOL", "DEFAULT_TOL", "FEW_LABEL_L2_GRID", "KNNMonitor", "REFIT_CHOICES", "SoftmaxRegression",
    "Standardizer", "accuracy", "as_labels", "check_split", "evaluate_encoder", "evaluate_features", "evaluate_raw_pixels",
    "extract_features", "few_label_probe", "knn_predict", "knn_top1", "linear_probe",
    "make_feature_fn", "random_init_copy", "resolve_encoder", "sample_few_labels",
]
