"""Offline evaluation of a frozen encoder: linear probe, weighted kNN, few-label probe.

Protocol (PITFALLS.md "Evaluation protocol"; ALGORITHMS.md 2.5 for why the paper's is not used):

* Features come from the frozen encoder called with ``training=False`` (BatchNorm uses its
  moving statistics and is never updated).
* Linear probe: features standardised with the mean/std of the training split only, then a
  multinomial logistic regression (full-batch L-BFGS, :class:`SoftmaxRegression`). Its L2
  strength is chosen on the validation split from a small grid; the test split is scored
  once, with the chosen model. The paper ([LM] ``linear_feature_eval.py``) instead reports
  the best *test* accuracy over 50 probe epochs, which selects on the test set and is
  optimistic; numbers from this module are therefore not directly comparable to its tables.
* Weighted kNN (Wu et al. 2018, InstDisc; the DINO evaluation code): cosine similarity,
  k = 200 nearest training features, each votes for its label with weight exp(sim / T),
  T = 0.1. No hyper-parameter is selected, so the test split is used directly.
* Few-label probe: n labelled examples per class drawn from the training split with several
  seeds; the same linear probe; mean, std and per-draw accuracies.

All of these are run on any "encoder": a trained model's ``.encoder``, a randomly initialised
copy of it (:func:`random_init_copy`) or ``keras.layers.Flatten()`` for raw pixels
(:func:`evaluate_raw_pixels`), so that baselines share exactly one protocol.

Splits are ``(features, labels)`` tuples of numpy arrays for the ``*_probe``/``knn_*``
functions, and ``(images, labels)`` tuples or batched ``tf.data`` datasets of
``(images, labels)`` for the functions taking an encoder.
"""
import copy
import inspect
import math
import time

import keras
import numpy as np
import tensorflow as tf

# Per-sample L2 strengths (objective: mean cross-entropy + l2/2 * ||W||^2), strongest first.
# A per-sample strength, unlike scikit-learn's C, means the same thing for 54k training
# examples and for a 10-per-class draw, and for a train+val refit. 1e-5 is nearly
# unregularised at 54k examples.
DEFAULT_L2_GRID = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
# A few labels in many dimensions want stronger regularisation (on synthetic 512-D features
# 10 per class picked the edge, 1e-1, of the grid above). As l2 grows the probe tends to a
# class-mean (centroid) classifier, a strong few-shot baseline, so the grid reaches l2 = 10.
FEW_LABEL_L2_GRID = (10.0, 1.0, 1e-1, 1e-2, 1e-3)
REFIT_CHOICES = ("train", "train+val")


# ----------------------------------------------------------------------------- features


def resolve_encoder(model_or_encoder):
    """The encoder of a BYOL/SimSiam model (anything with ``.encoder``), or the argument itself.

    Evaluating the online encoder, never the EMA target (lightly#1471), is the caller's
    contract with the models: ``model.encoder`` is the online one.
    """
    encoder = getattr(model_or_encoder, "encoder", None)
    if encoder is not None:
        return encoder
    if callable(model_or_encoder):
        return model_or_encoder
    raise ValueError(
        f"model_or_encoder={model_or_encoder!r} is neither a model with an `.encoder` attribute "
        "nor a callable encoder; pass a BYOL/SimSiam model, a keras.Model or a layer.")


def _accepts_training(fn):
    if isinstance(fn, keras.layers.Layer):
        return True
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "training" or p.kind is p.VAR_KEYWORD for p in parameters)


def make_feature_fn(encoder):
    """A compiled ``images -> float32 features`` function calling ``encoder`` in inference mode.

    Built once and reused (e.g. by :class:`KNNMonitor` every epoch) so the encoder is traced
    once per input shape rather than once per call. ``reduce_retracing`` stops a last,
    smaller batch from adding a second trace per epoch.
    """
    encoder = resolve_encoder(encoder)
    pass_training = _accepts_training(encoder)

    @tf.function(reduce_retracing=True)
    def features(images):
        out = encoder(images, training=False) if pass_training else encoder(images)
        # Mixed-precision encoders return float16; probes and kNN work in float32.
        return tf.cast(out, tf.float32)

    return features


def _as_labels(labels):
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2:
        labels = labels.argmax(axis=1)  # one-hot
    if labels.ndim != 1:
        raise ValueError(f"labels must be a vector of class ids or one-hot rows; got shape "
                         f"{labels.shape}")
    return labels


def _batches(data, batch_size):
    """Yields (images, labels-or-None) batches from an array, a tuple or a batched dataset."""
    if isinstance(data, tf.data.Dataset):
        for element in data:
            if isinstance(element, dict):
                if "image" not in element:
                    raise ValueError(f"dataset dict elements need an 'image' key; got keys "
                                     f"{sorted(element)}")
                yield element["image"], element.get("label")
            elif isinstance(element, (tuple, list)):
                yield element[0], element[1] if len(element) > 1 else None
            else:
                yield element, None
        return
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"data as a tuple must be (images, labels); got {len(data)} items")
        images, labels = data
    else:
        images, labels = data, None
    images = np.asarray(images)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        yield images[start:stop], None if labels is None else labels[start:stop]


def extract_features(encoder, data, batch_size=512, feature_fn=None):
    """Frozen-encoder features of ``data``.

    Args:
        encoder: a model with ``.encoder`` or an encoder (keras.Model/layer/callable) mapping
            normalised images [B, H, W, C] to pooled features [B, D].
        data: ``(images, labels)`` numpy arrays, an images array alone, or a *batched*
            ``tf.data.Dataset`` of ``(images, labels)`` (or ``{"image", "label"}``) batches.
        batch_size: batch size for numpy inputs (datasets keep their own batching).
        feature_fn: optional result of :func:`make_feature_fn` to reuse its trace.

    Returns:
        ``(features, labels)``: float32 array [N, D] and the labels as a numpy vector (None
        when ``data`` has no labels).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    fn = make_feature_fn(encoder) if feature_fn is None else feature_fn
    features, labels = [], []
    for images, batch_labels in _batches(data, batch_size):
        out = fn(tf.convert_to_tensor(images, tf.float32)).numpy()
        if out.ndim != 2:
            raise ValueError(f"the encoder must return pooled features [batch, dim]; got shape "
                             f"{out.shape}. End it with GlobalAveragePooling2D or Flatten.")
        features.append(out)
        if batch_labels is not None:
            labels.append(np.asarray(batch_labels))
    if not features:
        raise ValueError("data is empty: no batches to extract features from")
    labels = _as_labels(np.concatenate(labels)) if labels else None
    return np.concatenate(features).astype(np.float32, copy=False), labels


# ----------------------------------------------------------------------------- linear probe


def _check_split(split, name):
    if not isinstance(split, (tuple, list)) or len(split) != 2:
        raise ValueError(f"{name} must be a (features, labels) tuple; got {type(split).__name__}")
    x = np.asarray(split[0], dtype=np.float32)
    y = _as_labels(split[1])
    if x.ndim != 2:
        raise ValueError(f"{name} features must be 2-D [N, D]; got shape {x.shape}")
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{name}: {len(x)} feature rows and {len(y)} labels; need equal, > 0")
    return x, y


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


def _accuracy(predictions, labels):
    return float(np.mean(predictions == labels))


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


# ----------------------------------------------------------------------------- kNN


def _l2_normalize(x):
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def knn_predict(bank_features, bank_labels, query_features, *, k=200, temperature=0.1,
                batch_size=256):
    """Weighted kNN labels (InstDisc / DINO): cosine top-k, votes weighted by exp(sim / T).

    Queries are processed in batches of ``batch_size`` against the whole bank with one
    matrix multiply each (a [batch, N_bank] float32 block: 61 MB for 256 x 60k), so memory
    stays bounded for 60k x 10k. ``k`` is capped at the bank size. Weights use
    exp((sim - max sim) / T), which rescales each query's votes by a constant and so leaves
    the prediction unchanged while avoiding overflow for small T.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive; got {temperature!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    bank = _l2_normalize(bank_features)
    queries = _l2_normalize(query_features)
    bank_labels = _as_labels(bank_labels)
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank and query features must be [N, D] with the same D; got "
                         f"{bank.shape} and {queries.shape}")
    if len(bank) != len(bank_labels) or len(bank) == 0:
        raise ValueError(f"{len(bank)} bank features and {len(bank_labels)} labels; need "
                         "equal, > 0")
    classes, bank_ids = np.unique(bank_labels, return_inverse=True)
    num_classes = len(classes)
    k = min(int(k), len(bank))
    predictions = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        sim = queries[start:start + batch_size] @ bank.T
        if k < len(bank):
            neighbours = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        else:
            neighbours = np.broadcast_to(np.arange(len(bank)), sim.shape)
        top = np.take_along_axis(sim, neighbours, axis=1).astype(np.float64)
        weights = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)
        rows = np.arange(len(sim))[:, None]
        votes = np.bincount((rows * num_classes + bank_ids[neighbours]).ravel(),
                            weights=weights.ravel(), minlength=len(sim) * num_classes)
        predictions[start:start + len(sim)] = votes.reshape(len(sim), num_classes).argmax(1)
    return classes[predictions]


def knn_top1(bank, query, *, k=200, temperature=0.1, batch_size=256):
    """Top-1 accuracy of :func:`knn_predict`; ``bank`` and ``query`` are (features, labels)."""
    x_bank, y_bank = _check_split(bank, "bank")
    x_query, y_query = _check_split(query, "query")
    predictions = knn_predict(x_bank, y_bank, x_query, k=k, temperature=temperature,
                              batch_size=batch_size)
    return _accuracy(predictions, y_query)


# ----------------------------------------------------------------------------- few labels


def sample_few_labels(labels, n_per_class, seed):
    """Sorted indices of exactly ``n_per_class`` examples of every class, drawn with ``seed``.

    Every class present in ``labels`` is sampled without replacement; a class with fewer
    than ``n_per_class`` examples is an error rather than a silently unbalanced draw.
    """
    labels = _as_labels(labels)
    if not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive integer; got {n_per_class!r}")
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < n_per_class:
            raise ValueError(f"class {cls.tolist()!r} has {len(members)} examples; n_per_class="
                             f"{n_per_class} needs at least that many")
        chosen.append(rng.choice(members, size=n_per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def few_label_probe(train, val, test, *, n_per_class=10, seeds=(0, 1, 2, 3, 4),
                    l2_grid=FEW_LABEL_L2_GRID, max_iter=200, tol=1e-5):
    """Linear probe trained on ``n_per_class`` labels per class, over several random draws.

    Per draw (seed): sample the labelled subset from the training split, standardise with the
    statistics of the *whole* training split's features (they need no labels, so using them
    is fair in the semi-supervised setting, and 10 examples per class would give noisy
    stds), choose the L2 strength on the validation split and score the test split once.
    Selection uses the full validation labels; pass a one-value ``l2_grid`` to fix the
    strength instead.

    Returns:
        dict with ``mean``, ``std`` (sample std, ddof=1, over draws; NaN for one draw),
        ``per_draw`` (test accuracies), ``l2_per_draw``, ``n_per_class``, ``seeds``.
    """
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one draw; got an empty sequence")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds has repeats, which would repeat draws: {seeds!r}")
    x_train, y_train = _check_split(train, "train")
    per_draw, l2_per_draw = [], []
    for seed in seeds:
        index = sample_few_labels(y_train, n_per_class, seed)
        result = linear_probe((x_train[index], y_train[index]), val, test, l2_grid=l2_grid,
                              max_iter=max_iter, tol=tol, standardize_with=x_train)
        per_draw.append(result["top1"])
        l2_per_draw.append(result["l2"])
    return {
        "mean": float(np.mean(per_draw)),
        "std": float(np.std(per_draw, ddof=1)) if len(per_draw) > 1 else float("nan"),
        "per_draw": per_draw,
        "l2_per_draw": l2_per_draw,
        "n_per_class": int(n_per_class),
        "seeds": list(seeds),
    }


# ----------------------------------------------------------------------------- one call


def evaluate_features(train, val, test, *, l2_grid=DEFAULT_L2_GRID, refit="train",
                      max_iter=200, knn_k=200, knn_temperature=0.1, few_label_n=10,
                      few_label_seeds=(0, 1, 2, 3, 4), few_label_l2_grid=FEW_LABEL_L2_GRID):
    """Linear probe, kNN (bank = training split, queries = test split) and few-label probe.

    Splits are ``(features, labels)`` tuples. ``l2_grid`` is the linear probe's grid and
    ``few_label_l2_grid`` the few-label probe's (both chosen on the validation split).
    ``few_label_n=None`` skips the few-label probe (its keys are then None). Returns a flat,
    JSON-serialisable dict (``linear_probe_val_top1`` has float keys, written as strings).
    """
    x_train, y_train = _check_split(train, "train")
    train = (x_train, y_train)
    timings = {}

    start = time.perf_counter()
    probe = linear_probe(train, val, test, l2_grid=l2_grid, refit=refit, max_iter=max_iter)
    timings["linear_probe"] = time.perf_counter() - start

    start = time.perf_counter()
    knn = knn_top1(train, test, k=knn_k, temperature=knn_temperature)
    timings["knn"] = time.perf_counter() - start

    few = None
    if few_label_n is not None:
        start = time.perf_counter()
        few = few_label_probe(train, val, test, n_per_class=few_label_n,
                              seeds=few_label_seeds, l2_grid=few_label_l2_grid,
                              max_iter=max_iter)
        timings["few_label"] = time.perf_counter() - start

    return {
        "linear_probe_top1": probe["top1"],
        "linear_probe_l2": probe["l2"],
        "linear_probe_val_top1": probe["val_top1"],
        "linear_probe_train_top1": probe["train_top1"],
        "linear_probe_converged": probe["converged"],
        "linear_probe_refit": refit,
        "knn_top1": knn,
        "knn_k": int(knn_k),
        "knn_temperature": float(knn_temperature),
        "few_label_n_per_class": None if few is None else few["n_per_class"],
        "few_label_top1_mean": None if few is None else few["mean"],
        "few_label_top1_std": None if few is None else few["std"],
        "few_label_top1_per_draw": None if few is None else few["per_draw"],
        "few_label_l2_per_draw": None if few is None else few["l2_per_draw"],
        "feature_dim": int(x_train.shape[1]),
        "n_train": len(y_train),
        "n_val": len(val[1]),
        "n_test": len(test[1]),
        "seconds": timings,
    }


def evaluate_encoder(encoder, train, val, test, *, batch_size=512, **options):
    """Extracts frozen features of the three splits and runs :func:`evaluate_features`.

    The runner calls this for the trained encoder, a random-init copy
    (:func:`random_init_copy`) and raw pixels (:func:`evaluate_raw_pixels`), so all three
    rows of its table share one protocol. Splits: ``(images, labels)`` arrays or batched
    ``(images, labels)`` datasets. ``options`` go to :func:`evaluate_features`.
    """
    fn = make_feature_fn(encoder)
    start = time.perf_counter()
    splits = [extract_features(encoder, split, batch_size, feature_fn=fn)
              for split in (train, val, test)]
    seconds = time.perf_counter() - start
    for name, (_, labels) in zip(("train", "val", "test"), splits):
        if labels is None:
            raise ValueError(f"the {name} split has no labels; evaluation needs "
                             "(images, labels)")
    result = evaluate_features(*splits, **options)
    result["seconds"]["features"] = seconds
    return result


def evaluate_raw_pixels(train, val, test, *, batch_size=512, **options):
    """The raw-pixel baseline: flattened (normalised) images through the same protocol.

    The probe standardises per pixel like any feature; kNN uses cosine similarity on the
    flattened images, exactly as on encoder features.
    """
    return evaluate_encoder(keras.layers.Flatten(), train, val, test, batch_size=batch_size,
                            **options)


def random_init_copy(model_or_encoder):
    """A freshly initialised encoder of the same architecture (the random-init baseline).

    ``keras.models.clone_model`` rebuilds the layers from their configs, so initialisers
    without a fixed seed draw new weights; the trained weights are not copied. An encoder
    whose initialisers carry fixed seeds gets the weights it started training from, which
    is the same baseline.
    """
    encoder = resolve_encoder(model_or_encoder)
    try:
        clone = keras.models.clone_model(encoder)
    except Exception as error:  # clone_model raises many types for unsupported models
        raise ValueError(f"cannot clone encoder {getattr(encoder, 'name', encoder)!r} "
                         f"({type(encoder).__name__}): {error}. Build a fresh encoder with "
                         "the same builder instead.") from error
    return clone


# ----------------------------------------------------------------------------- callback


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
        self.bank_labels = _as_labels(bank_labels)
        self.query_images = np.asarray(query_images, dtype=np.float32)
        self.query_labels = _as_labels(query_labels)
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
