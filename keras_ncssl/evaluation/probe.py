"""Linear probe: standardised features, multinomial logistic regression by full-batch L-BFGS,
its L2 strength chosen on the validation split and the test split scored once."""
import copy
import math
import time

import numpy as np

from keras_ncssl.evaluation.features import accuracy, check_split
from keras_ncssl.evaluation.softmax import SoftmaxObjective, minimize_softmax

# Per-sample L2 strengths (objective: mean cross-entropy + l2/2 * ||W||^2), strongest first.
# A per-sample strength, unlike scikit-learn's C, means the same thing for 54k training
# examples and for a 10-per-class draw, and for a train+val refit. 1e-5 is nearly
# unregularised at 54k examples.
DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
REFIT_CHOICES = ("train", "train+val")
# A fit has converged when the largest entry of the regularised objective's gradient is at
# most DEFAULT_TOL: scikit-learn's lbfgs criterion and default on the same mean loss. On
# Fashion-MNIST (BUILD_NOTES "Fast, converged evaluation") validation accuracies at 1e-4 and
# at 1e-5 differ by at most 0.07 points on encoder features, 0.18 on raw pixels at l2 = 1e-5.
DEFAULT_TOL = 1e-4
# The tested model is solved on to 1e-5, where Fashion-MNIST's accuracies have settled.
DEFAULT_TEST_TOL = 1e-5
DEFAULT_MAX_ITER = 500


def _check_grid(l2_grid):
    grid = tuple(float(v) for v in np.atleast_1d(np.asarray(l2_grid, dtype=np.float64)))
    if not grid or any(not math.isfinite(v) or v <= 0 for v in grid):
        raise ValueError(f"l2_grid must be a non-empty sequence of positive finite numbers; got "
                         f"{l2_grid!r}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"l2_grid has repeated values: {l2_grid!r}")
    return tuple(sorted(grid, reverse=True))


class Standardizer:
    """Per-feature standardisation with statistics from one array (the training split).

    Constant features (std below 1e-6 of the mean std, e.g. always-black border pixels)
    are centred but not scaled, instead of being blown up by a near-zero std. Output is
    float64: see :class:`SoftmaxRegression`.
    """

    def __init__(self, features):
        features = np.asarray(features)
        self.mean = features.mean(axis=0, dtype=np.float64)
        std = features.std(axis=0, dtype=np.float64)
        floor = 1e-6 * max(float(std.mean()), 1e-12)
        self.std = np.where(std > floor, std, 1.0)

    def __call__(self, features):
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.std


class SoftmaxRegression:
    """Multinomial logistic regression, L2 on the weights, not the bias.

    Objective: mean cross-entropy + l2/2 ||W||^2, i.e. scikit-learn's LogisticRegression
    with C = 1 / (l2 N), which the tests use as an independent reference. Solved by
    K-FAC-preconditioned L-BFGS (:mod:`keras_ncssl.evaluation.softmax`) until the largest
    entry of the objective's gradient is at most ``tol``; ``gradient_max`` and ``converged``
    record where a fit stopped.
    """

    def __init__(self, classes, dim):
        self.classes = np.asarray(classes)
        self.weights = np.zeros((dim, len(self.classes)))
        self.bias = np.zeros(len(self.classes))
        self.n_iter = 0
        self.gradient_max = float("inf")
        self.converged = False
        self.status = ""

    def fit(self, x, class_ids, l2, max_iter, tol, objective=None):
        """Minimises from the current weights (a warm start); ``class_ids`` index classes.

        ``objective``: a :class:`SoftmaxObjective` of (x, class_ids) to reuse (its feature
        spectrum is computed once for a whole L2 path).
        """
        if objective is None:
            objective = SoftmaxObjective(x, class_ids, len(self.classes))
        self.weights, self.bias, info = minimize_softmax(objective, self.weights, self.bias, l2,
                                                         tol=tol, max_iter=max_iter)
        self.n_iter, self.status = info["n_iter"], info["status"]
        self.gradient_max, self.converged = info["gradient_max"], info["converged"]
        return self

    def predict(self, x):
        return self.classes[np.argmax(x @ self.weights + self.bias, axis=1)]


def _fit_l2_path(x, y, grid, max_iter, tol, on_fit, init=None):
    """Fits one model per L2 value, strongest first, each warm-started from the previous.

    Warm-starting along the regularisation path costs a fraction of independent fits.
    ``tol`` (on the largest gradient entry) must be well below the gradient gap between
    neighbouring L2 values, (l2_prev - l2) * |W|, or a warm start stops at iteration 0 and
    returns the previous value's model.
    """
    classes, class_ids = np.unique(y, return_inverse=True)
    model = copy.deepcopy(init) if init is not None else SoftmaxRegression(classes, x.shape[1])
    if not np.array_equal(model.classes, classes):
        model = SoftmaxRegression(classes, x.shape[1])
    objective = SoftmaxObjective(x, class_ids, len(classes))
    for l2 in grid:
        start = time.perf_counter()
        model.fit(x, class_ids, l2, max_iter, tol, objective=objective)
        on_fit(l2, copy.deepcopy(model), time.perf_counter() - start)
    return model, objective


def linear_probe(train, val, test, *, l2_grid=DEFAULT_L2_GRID, refit="train", max_iter=DEFAULT_MAX_ITER,
                 tol=DEFAULT_TOL, test_tol=DEFAULT_TEST_TOL, standardize_with=None):
    """Validation-selected multinomial logistic-regression probe on frozen features.

    Protocol: standardise with training-split statistics; for each L2 strength (objective
    mean cross-entropy + l2/2 ||W||^2, bias unpenalised; scikit-learn's C = 1 / (l2 N)) fit
    on the training split (full-batch L-BFGS, warm-started along the grid from the
    strongest L2) and score the validation split; pick the best (ties go to the stronger
    regularisation); score the test split once, with the chosen model, first solved on to
    the tighter ``test_tol`` from where selection left it (the same L2, the same data).

    Refit: ``"train"`` (default) tests the very model that was validated: nothing about it
    changes between selection and test, and the validation split stays a clean held-out set
    whose score can be reported beside the test score. ``"train+val"`` refits with the
    chosen per-sample L2 on the union (statistics recomputed on it): about 10% more labels
    for Fashion-MNIST's 54k/6k split, at the cost of testing a model that was never validated.

    Args:
        train, val, test: ``(features [N, D], labels [N])`` tuples.
        l2_grid: positive per-sample L2 strengths to select from.
        refit: one of ``REFIT_CHOICES``.
        max_iter, tol: per grid value, the L-BFGS iteration limit and the convergence
            tolerance on the largest entry of the objective's gradient.
        test_tol: the tolerance of the tested model (``tol`` where that is smaller).
        standardize_with: optional unlabelled feature array whose mean/std replace the
            training split's (the few-label probe passes the whole unlabelled training split),
            or a :class:`Standardizer` of such an array (computed once for many probes).

    Returns:
        dict with ``top1`` (test accuracy), ``l2`` (chosen), ``C`` (the equivalent
        scikit-learn C of the tested model), ``val_top1`` ({l2: val accuracy} for every grid
        value), ``train_top1``, ``n_iter`` ({l2: iterations}, plus ``"refit"``),
        ``gradient_max`` ({l2: max |gradient| where the fit stopped}, plus ``"tested"``),
        ``converged`` (every grid fit reached ``tol`` and the tested model ``test_tol``),
        ``tol``, ``test_tol``, ``refit``, ``seconds``.
    """
    if refit not in REFIT_CHOICES:
        raise ValueError(f"refit={refit!r}; allowed: {REFIT_CHOICES}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    if not test_tol > 0:
        raise ValueError(f"test_tol must be positive; got {test_tol!r}")
    test_tol = min(test_tol, tol)
    grid = _check_grid(l2_grid)
    x_train, y_train = check_split(train, "train")
    x_val, y_val = check_split(val, "val")
    x_test, y_test = check_split(test, "test")
    for name, x in (("val", x_val), ("test", x_test)):
        if x.shape[1] != x_train.shape[1]:
            raise ValueError(f"{name} features have dim {x.shape[1]}, train has "
                             f"{x_train.shape[1]}")
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"the training split needs at least 2 classes; got "
                         f"{np.unique(y_train).tolist()}")
    start = time.perf_counter()

    if isinstance(standardize_with, Standardizer):
        standardize = standardize_with
    else:
        standardize = Standardizer(x_train if standardize_with is None else standardize_with)
    xs_train, xs_val = standardize(x_train), standardize(x_val)
    val_top1, n_iter, gradient_max, models = {}, {}, {}, {}

    def on_fit(l2, model, _seconds):
        val_top1[l2] = accuracy(model.predict(xs_val), y_val)
        n_iter[l2], gradient_max[l2] = model.n_iter, model.gradient_max
        models[l2] = model

    _, objective = _fit_l2_path(xs_train, y_train, grid, max_iter, tol, on_fit)
    best = grid[0]
    for l2 in grid[1:]:
        if val_top1[l2] > val_top1[best]:
            best = l2
    model, n_fit = models[best], len(y_train)
    del models, xs_val

    if refit == "train+val":
        x_all = np.concatenate([x_train, x_val])
        y_all = np.concatenate([y_train, y_val])
        if standardize_with is None:
            standardize = Standardizer(x_all)
        xs_all = standardize(x_all)
        del objective
        model, _ = _fit_l2_path(xs_all, y_all, (best,), max_iter, test_tol,
                                lambda *_: None, init=model)
        n_fit = len(y_all)
        train_top1 = accuracy(model.predict(xs_all), y_all)
    else:
        model.fit(None, None, best, max_iter, test_tol, objective=objective)
        train_top1 = accuracy(model.predict(xs_train), y_train)
    n_iter["tested"], gradient_max["tested"] = model.n_iter, model.gradient_max

    # The only use of the test split.
    top1 = accuracy(model.predict(standardize(x_test)), y_test)
    return {
        "top1": top1,
        "l2": best,
        "C": 1.0 / (best * n_fit),
        "val_top1": val_top1,
        "train_top1": train_top1,
        "n_iter": n_iter,
        "gradient_max": gradient_max,
        "converged": (all(gradient_max[l2] <= tol for l2 in grid)
                      and gradient_max["tested"] <= test_tol),
        "tol": float(tol),
        "test_tol": float(test_tol),
        "refit": refit,
        "seconds": time.perf_counter() - start,
    }
