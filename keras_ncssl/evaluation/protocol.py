"""One call for the whole protocol on features, an encoder or raw pixels; the random-init baseline."""
import time

import keras

from keras_ncssl.evaluation.features import check_split, extract_features, make_feature_fn, resolve_encoder
from keras_ncssl.evaluation.few_label import FEW_LABEL_L2_GRID, few_label_probe
from keras_ncssl.evaluation.knn import knn_top1
from keras_ncssl.evaluation.probe import DEFAULT_L2_GRID, DEFAULT_MAX_ITER, DEFAULT_TOL, linear_probe


def evaluate_features(train, val, test, *, l2_grid=DEFAULT_L2_GRID, refit="train",
                      max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL, knn_k=200, knn_temperature=0.1, few_label_n=10,
                      few_label_seeds=(0, 1, 2, 3, 4), few_label_l2_grid=FEW_LABEL_L2_GRID):
    """Linear probe, kNN (bank = training split, queries = test split) and few-label probe.

    Splits are ``(features, labels)`` tuples. ``l2_grid`` is the linear probe's grid and
    ``few_label_l2_grid`` the few-label probe's (both chosen on the validation split).
    ``few_label_n=None`` skips the few-label probe (its keys are then None). Returns a flat,
    JSON-serialisable dict (``linear_probe_val_top1`` has float keys, written as strings).
    """
    x_train, y_train = check_split(train, "train")
    train = (x_train, y_train)
    timings = {}

    start = time.perf_counter()
    probe = linear_probe(train, val, test, l2_grid=l2_grid, refit=refit, max_iter=max_iter,
                         tol=tol)
    timings["linear_probe"] = time.perf_counter() - start

    start = time.perf_counter()
    knn = knn_top1(train, test, k=knn_k, temperature=knn_temperature)
    timings["knn"] = time.perf_counter() - start

    few = None
    if few_label_n is not None:
        start = time.perf_counter()
        few = few_label_probe(train, val, test, n_per_class=few_label_n,
                              seeds=few_label_seeds, l2_grid=few_label_l2_grid,
                              max_iter=max_iter, tol=tol)
        timings["few_label"] = time.perf_counter() - start

    return {
        "linear_probe_top1": probe["top1"],
        "linear_probe_l2": probe["l2"],
        "linear_probe_val_top1": probe["val_top1"],
        "linear_probe_train_top1": probe["train_top1"],
        "linear_probe_converged": probe["converged"],
        "linear_probe_tol": probe["tol"],
        "linear_probe_gradient_max": probe["gradient_max"],
        "linear_probe_n_iter": probe["n_iter"],
        "linear_probe_refit": refit,
        "knn_top1": knn,
        "knn_k": int(knn_k),
        "knn_temperature": float(knn_temperature),
        "few_label_n_per_class": None if few is None else few["n_per_class"],
        "few_label_top1_mean": None if few is None else few["mean"],
        "few_label_top1_std": None if few is None else few["std"],
        "few_label_top1_per_draw": None if few is None else few["per_draw"],
        "few_label_l2_per_draw": None if few is None else few["l2_per_draw"],
        "few_label_converged": None if few is None else few["converged"],
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
