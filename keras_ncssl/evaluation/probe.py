"""Linear probe: standardised features, multinomial logistic regression by full-batch L-BFGS,
its L2 strength chosen on the validation split and the test split scored once."""
import copy
import math
import time

import numpy as np

from keras_ncssl.evaluation.features import _accuracy, _check_split

# Per-sample L2 strengths (objective: mean cross-entropy + l2/2 * ||W||^2), strongest first.
# A per-sample strength, unlike scikit-learn's C, means the same thing for 54k training
# examples and for a 10-per-class draw, and for a train+val refit. 1e-5 is nearly
# unregularised at 54k examples.
DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
REFIT_CHOICES = ("train", "train+val")


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
    """Multinomial logistic regression, full-batch L-BFGS (scipy), L2 on weights, not bias.

    Objective: mean cross-entropy + l2/2 ||W||^2, i.e. scikit-learn's LogisticRegression
    with C = 1 / (l2 N), which the tests use as an independent reference. Written out
    rather than calling scikit-learn because on a shared 2-core machine scikit-learn's
    solver took about 3x longer per iteration here (and, in float32, thrashed in its line
    search). Each evaluation is two [N, D] x [D, K] products; float64 keeps the loss and
    gradient consistent, so L-BFGS stops on the gradient norm rather than a failed line
    search, which in float32 cost twice the evaluations.
    """

    def __init__(self, classes, dim):
        self.classes = np.asarray(classes)
        self.weights = np.zeros((dim, len(self.classes)))
        self.bias = np.zeros(len(self.classes))
        self.n_iter = 0
        self.status = ""

    def fit(self, x, class_ids, l2, max_iter, tol):
        """Minimises from the current weights (a warm start); ``class_ids`` index classes."""
        from scipy.optimize import minimize

        n, dim = x.shape
        k = len(self.classes)
        rows = np.arange(n)

        def loss_and_grad(theta):
            weights, bias = theta[:dim * k].reshape(dim, k), theta[dim * k:]
            logits = x @ weights + bias
            logits -= logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            total = exp.sum(axis=1)
            loss = np.mean(np.log(total) - logits[rows, class_ids])
            loss += 0.5 * l2 * np.dot(theta[:dim * k], theta[:dim * k])
            residual = exp / total[:, None]
            residual[rows, class_ids] -= 1.0
            residual /= n
            grad = np.concatenate([(x.T @ residual + l2 * weights).ravel(), residual.sum(0)])
            return loss, grad

        theta = np.concatenate([self.weights.ravel(), self.bias])
        result = minimize(loss_and_grad, theta, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "gtol": tol,
                                   "ftol": 64 * np.finfo(np.float64).eps})
        self.weights = result.x[:dim * k].reshape(dim, k)
        self.bias = result.x[dim * k:]
        self.n_iter, self.status = int(result.nit), str(result.message)
        return self

    def predict(self, x):
        return self.classes[np.argmax(x @ self.weights + self.bias, axis=1)]


def _fit_l2_path(x, y, grid, max_iter, tol, on_fit, init=None):
    """Fits one model per L2 value, strongest first, each warm-started from the previous.

    Warm-starting along the regularisation path costs a fraction of independent fits.
    ``tol`` (on the largest gradient entry) must be well below the gradient gap between
    neighbouring L2 values, (l2_prev - l2) * |W|, or a warm start stops at iteration 0 and
    returns the previous value's model (scikit-learn's default 1e-4 does that at 54k).
    """
    classes, class_ids = np.unique(y, return_inverse=True)
    model = copy.deepcopy(init) if init is not None else SoftmaxRegression(classes, x.shape[1])
    if not np.array_equal(model.classes, classes):
        model = SoftmaxRegression(classes, x.shape[1])
    for l2 in grid:
        start = time.perf_counter()
        model.fit(x, class_ids, l2, max_iter, tol)
        on_fit(l2, copy.deepcopy(model), time.perf_counter() - start)
    return model


def linear_probe(train, val, test, *, l2_grid=DEFAULT_L2_GRID, refit="train", max_iter=200,
                 tol=1e-5, standardize_with=None):
    """Validation-selected multinomial logistic-regression probe on frozen features.

    Protocol: standardise with training-split statistics; for each L2 strength (objective
    mean cross-entropy + l2/2 ||W||^2, bias unpenalised; scikit-learn's C = 1 / (l2 N)) fit
    on the training split (full-batch L-BFGS, warm-started along the grid from the
    strongest L2) and score the validation split; pick the best (ties go to the stronger
    regularisation); score the test split once, with the chosen model.

    Refit: ``"train"`` (default) tests the very model that was validated: nothing about it
    changes between selection and test, and the validation split stays a clean held-out set
    whose score can be reported beside the test score. ``"train+val"`` refits with the
    chosen per-sample L2 on the union (statistics recomputed on it): about 10% more labels
    for Fashion-MNIST's 54k/6k split, at the cost of testing a model that was never validated.

    Args:
        train, val, test: ``(features [N, D], labels [N])`` tuples.
        l2_grid: positive per-sample L2 strengths to select from.
        refit: one of ``REFIT_CHOICES``.
        max_iter, tol: L-BFGS limits per grid value (iterations; largest gradient entry).
        standardize_with: optional unlabelled feature array whose mean/std replace the
            training split's (the few-label probe passes the whole unlabelled training split).

    Returns:
        dict with ``top1`` (test accuracy), ``l2`` (chosen), ``C`` (the equivalent
        scikit-learn C of the tested model), ``val_top1`` ({l2: val accuracy} for every grid
        value), ``train_top1``, ``n_iter`` ({l2: iterations}, plus ``"refit"``),
        ``converged`` (every fit stopped before ``max_iter``), ``refit``, ``seconds``.
    """
    if refit not in REFIT_CHOICES:
        raise ValueError(f"refit={refit!r}; allowed: {REFIT_CHOICES}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol!r}")
    grid = _check_grid(l2_grid)
    x_train, y_train = _check_split(train, "train")
    x_val, y_val = _check_split(val, "val")
    x_test, y_test = _check_split(test, "test")
    for name, x in (("val", x_val), ("test", x_test)):
        if x.shape[1] != x_train.shape[1]:
            raise ValueError(f"{name} features have dim {x.shape[1]}, train has "
                             f"{x_train.shape[1]}")
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"the training split needs at least 2 classes; got "
                         f"{np.unique(y_train).tolist()}")
    start = time.perf_counter()

    standardize = Standardizer(x_train if standardize_with is None else standardize_with)
    xs_train, xs_val = standardize(x_train), standardize(x_val)
    val_top1, n_iter, models = {}, {}, {}

    def on_fit(l2, model, _seconds):
        val_top1[l2] = _accuracy(model.predict(xs_val), y_val)
        n_iter[l2] = model.n_iter
        models[l2] = model

    _fit_l2_path(xs_train, y_train, grid, max_iter, tol, on_fit)
    best = grid[0]
    for l2 in grid[1:]:
        if val_top1[l2] > val_top1[best]:
            best = l2
    model, n_fit = models[best], len(y_train)
    train_top1 = _accuracy(model.predict(xs_train), y_train)
    del models, xs_val

    if refit == "train+val":
        x_all = np.concatenate([x_train, x_val])
        y_all = np.concatenate([y_train, y_val])
        if standardize_with is None:
            standardize = Standardizer(x_all)
        xs_all = standardize(x_all)
        model = _fit_l2_path(xs_all, y_all, (best,), max_iter, tol,
                             lambda *_: None, init=model)
        n_iter["refit"], n_fit = model.n_iter, len(y_all)
        train_top1 = _accuracy(model.predict(xs_all), y_all)

    # The only use of the test split.
    top1 = _accuracy(model.predict(standardize(x_test)), y_test)
    return {
        "top1": top1,
        "l2": best,
        "C": 1.0 / (best * n_fit),
        "val_top1": val_top1,
        "train_top1": train_top1,
        "n_iter": n_iter,
        "converged": all(v < max_iter for v in n_iter.values()),
        "refit": refit,
        "seconds": time.perf_counter() - start,
    }
