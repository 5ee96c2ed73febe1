"""Few-label probe: n labels per class drawn from the training split, the linear probe, mean ± std."""
import numpy as np

from keras_ncssl.evaluation.features import as_labels, check_split
from keras_ncssl.evaluation.probe import DEFAULT_MAX_ITER, DEFAULT_TOL, Standardizer, linear_probe

# A few labels in many dimensions want stronger regularisation (on synthetic 512-D features
# 10 per class picked the edge, 1e-1, of the grid of `probe.DEFAULT_L2_GRID`). As l2 grows the
# probe tends to a class-mean (centroid) classifier, a strong few-shot baseline, so the grid
# reaches l2 = 10.
FEW_LABEL_L2_GRID = (10.0, 1.0, 1e-1, 1e-2, 1e-3)


def sample_few_labels(labels, n_per_class, seed):
    """Sorted indices of exactly ``n_per_class`` examples of every class, drawn with ``seed``.

    Every class present in ``labels`` is sampled without replacement; a class with fewer
    than ``n_per_class`` examples is an error rather than a silently unbalanced draw.
    """
    labels = as_labels(labels)
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
                    l2_grid=FEW_LABEL_L2_GRID, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """Linear probe trained on ``n_per_class`` labels per class, over several random draws.

    Per draw (seed): sample the labelled subset from the training split, standardise with the
    statistics of the *whole* training split's features (they need no labels, so using them
    is fair in the semi-supervised setting, and 10 examples per class would give noisy
    stds), choose the L2 strength on the validation split and score the test split once.
    Selection uses the full validation labels; pass a one-value ``l2_grid`` to fix the
    strength instead.

    Returns:
        dict with ``mean``, ``std`` (sample std, ddof=1, over draws; NaN for one draw),
        ``per_draw`` (test accuracies), ``l2_per_draw``, ``n_per_class``, ``seeds``,
        ``converged`` (every fit of every draw reached max |gradient| <= ``tol``).
    """
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one draw; got an empty sequence")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds has repeats, which would repeat draws: {seeds!r}")
    x_train, y_train = check_split(train, "train")
    standardize = Standardizer(x_train)  # the same for every draw: computed once
    per_draw, l2_per_draw, converged = [], [], []
    for seed in seeds:
        index = sample_few_labels(y_train, n_per_class, seed)
        result = linear_probe((x_train[index], y_train[index]), val, test, l2_grid=l2_grid,
                              max_iter=max_iter, tol=tol, standardize_with=standardize)
        per_draw.append(result["top1"])
        l2_per_draw.append(result["l2"])
        converged.append(result["converged"])
    return {
        "mean": float(np.mean(per_draw)),
        "std": float(np.std(per_draw, ddof=1)) if len(per_draw) > 1 else float("nan"),
        "per_draw": per_draw,
        "l2_per_draw": l2_per_draw,
        "n_per_class": int(n_per_class),
        "seeds": list(seeds),
        "converged": all(converged),
    }
