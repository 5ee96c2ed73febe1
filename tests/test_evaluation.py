"""Tests of keras_ncssl.evaluation: probe selection on val only, kNN vs brute force, few-label
draws, KNNMonitor in fit, and the frozen (training=False) feature extraction."""
import csv
import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from keras_ncssl import evaluation as ev

TIGHT = {"tol": 1e-10, "max_iter": 3000}  # both sides converge to the same optimum


def _clusters(rng, n, num_classes=3, dim=16, spread=8.0, noise=1.0, centres=None):
    if centres is None:
        centres = rng.normal(size=(num_classes, dim)) * spread
    y = rng.integers(0, len(centres), n)
    x = centres[y] + noise * rng.normal(size=(n, centres.shape[1]))
    return x.astype(np.float32), y, centres


def _noisy_problem(rng):
    """Few training points in many dimensions: the L2 strength matters and grid values
    disagree on many test points."""
    centres = rng.normal(size=(4, 40)) * 0.35  # 4 classes in 40-D
    train = _clusters(rng, 120, centres=centres)[:2]
    val = _clusters(rng, 400, centres=centres)[:2]
    test = _clusters(rng, 400, centres=centres)[:2]
    return train, val, test


def _independent_models(train, grid):
    """Cold-started scikit-learn fits per L2 value, with numpy standardisation."""
    x, y = train
    mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
    models = {}
    for l2 in grid:
        clf = LogisticRegression(C=1.0 / (l2 * len(y)), **TIGHT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(((x - mean) / std).astype(np.float32), y)
        models[l2] = clf
    return models, (lambda f: ((f - mean) / std).astype(np.float32))


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_clusters_near_perfect(rng):
    centres = None
    splits = []
    for n in (300, 150, 150):
        x, y, centres = _clusters(rng, n, centres=centres)
        splits.append((x, y))
    # tol 1e-7, well below the gradient gap between neighbouring L2 values here (at the
    # default 1e-4 the previous value's model already passes for l2 = 1e-4).
    result = ev.linear_probe(*splits, tol=1e-7)
    assert result["top1"] >= 0.99 and result["converged"]
    assert set(result["val_top1"]) == set(ev.DEFAULT_L2_GRID)
    # Each warm-started grid value really moved off the previous solution.
    assert all(result["n_iter"][l2] > 0 for l2 in ev.DEFAULT_L2_GRID), result["n_iter"]
    assert result["refit"] == "train"


def test_linear_probe_random_labels_is_chance(rng):
    x = rng.normal(size=(2800, 20)).astype(np.float32)
    y = rng.integers(0, 4, 2800)
    result = ev.linear_probe((x[:400], y[:400]), (x[400:800], y[400:800]),
                             (x[800:], y[800:]))
    # 2000 test points: binomial sd of the accuracy is about 0.01.
    assert abs(result["top1"] - 0.25) < 0.05


def test_linear_probe_selects_val_best_like_independent_sklearn(rng):
    train, val, test = _noisy_problem(rng)
    grid = (1.0, 1e-1, 1e-2, 1e-3)
    result = ev.linear_probe(train, val, test, l2_grid=grid, **TIGHT)
    models, standardize = _independent_models(train, grid)
    expected = {l2: float(np.mean(m.predict(standardize(val[0])) == val[1]))
                for l2, m in models.items()}
    assert result["val_top1"] == pytest.approx(expected, abs=1e-12)
    best = max(sorted(grid, reverse=True), key=lambda l2: expected[l2])  # ties: stronger
    assert result["l2"] == best
    assert result["C"] == pytest.approx(1.0 / (best * len(train[1])))
    assert len(set(expected.values())) > 1, "the grid should matter on this problem"
    assert result["top1"] == pytest.approx(
        np.mean(models[best].predict(standardize(test[0])) == test[1]))


def test_test_split_is_not_used_for_selection(rng):
    """Test labels made to agree exactly with another grid value's model: selecting on test
    would pick that value with 100%; the probe must keep the val-best and report less."""
    train, val, test = _noisy_problem(rng)
    grid = (1.0, 1e-1, 1e-2, 1e-3)
    models, standardize = _independent_models(train, grid)
    val_acc = {l2: np.mean(m.predict(standardize(val[0])) == val[1]) for l2, m in models.items()}
    best = max(sorted(grid, reverse=True), key=lambda l2: val_acc[l2])
    test_preds = {l2: m.predict(standardize(test[0])) for l2, m in models.items()}
    other = max((l2 for l2 in grid if l2 != best),
                key=lambda l2: np.mean(test_preds[l2] != test_preds[best]))
    assert np.mean(test_preds[other] != test_preds[best]) > 0.05
    rigged_test = (test[0], test_preds[other])

    result = ev.linear_probe(train, val, rigged_test, l2_grid=grid, **TIGHT)
    assert result["l2"] == best
    assert result["top1"] == pytest.approx(np.mean(test_preds[best] == test_preds[other]))
    assert result["top1"] < 0.95
    # Nothing but the final number depends on the test labels.
    shuffled = (test[0], rng.permutation(test[1]))
    again = ev.linear_probe(train, val, shuffled, l2_grid=grid, **TIGHT)
    assert again["l2"] == result["l2"] and again["val_top1"] == result["val_top1"]


def test_linear_probe_refit_on_train_plus_val(rng):
    centres = None
    splits = []
    for n in (200, 100, 100):
        x, y, centres = _clusters(rng, n, centres=centres)
        splits.append((x, y))
    result = ev.linear_probe(*splits, refit="train+val", l2_grid=(1e-2, 1e-3))
    assert result["refit"] == "train+val"
    assert "tested" in result["n_iter"] and result["converged"]
    assert result["C"] == pytest.approx(1.0 / (result["l2"] * 300))
    assert result["top1"] >= 0.99


@pytest.mark.parametrize("kwargs, message", [
    ({"refit": "test"}, "refit='test'"),
    ({"l2_grid": (1e-3, 0.0)}, "l2_grid"),
    ({"l2_grid": ()}, "l2_grid"),
    ({"max_iter": 0}, "max_iter"),
])
def test_linear_probe_rejects_bad_options(rng, kwargs, message):
    x, y, _ = _clusters(rng, 30)
    with pytest.raises(ValueError, match=message):
        ev.linear_probe((x, y), (x, y), (x, y), **kwargs)


def test_linear_probe_rejects_mismatched_splits(rng):
    x, y, _ = _clusters(rng, 30)
    with pytest.raises(ValueError, match="val features have dim 3"):
        ev.linear_probe((x, y), (x[:, :3], y), (x, y))
    with pytest.raises(ValueError, match="test: 30 feature rows and 29 labels"):
        ev.linear_probe((x, y), (x, y), (x, y[:-1]))


# ----------------------------------------------------------------------------- kNN


def _brute_force_knn(bank, bank_labels, queries, k, temperature):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    classes = np.unique(bank_labels)
    out = []
    for q in queries.astype(np.float64):
        sims = bank.astype(np.float64) @ q
        nearest = np.argsort(-sims)[:k]
        votes = [np.sum(np.exp(sims[nearest][bank_labels[nearest] == c] / temperature))
                 for c in classes]
        out.append(classes[int(np.argmax(votes))])
    return np.array(out)


@pytest.mark.parametrize("k, temperature", [(20, 0.1), (200, 0.1), (5, 0.05), (1000, 0.5)])
def test_knn_matches_brute_force(rng, k, temperature):
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    labels = rng.choice([3, 7, 11, 12, 40], size=500)  # non-contiguous ids come back as-is
    queries = rng.normal(size=(150, 16)).astype(np.float32)
    got = ev.knn_predict(bank, labels, queries, k=k, temperature=temperature, batch_size=37)
    expected = _brute_force_knn(bank, labels, queries, min(k, 500), temperature)
    np.testing.assert_array_equal(got, expected)


def test_knn_query_blocks_give_the_same_neighbours(rng, monkeypatch):
    """Query blocks (side by side on the inter-op pool under one intra-op thread) change only the
    schedule: the brute-force predictions, for batches that split evenly, unevenly and not at all."""
    from keras_ncssl.evaluation import knn
    monkeypatch.setattr(knn, "block_count", lambda rows, min_rows: min(3, rows))
    bank = rng.normal(size=(300, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    queries = rng.normal(size=(101, 8)).astype(np.float32)
    got = ev.knn_predict(bank, labels, queries, k=15, temperature=0.1, batch_size=50)
    np.testing.assert_array_equal(got, _brute_force_knn(bank, labels, queries, 15, 0.1))


def test_block_count_follows_the_intra_op_pool(monkeypatch):
    from keras_ncssl.evaluation import blocks
    monkeypatch.setattr(blocks.os, "cpu_count", lambda: 8)
    for intra_op, rows, want in [(0, 10**6, 1), (1, 10**6, 8), (2, 10**6, 4), (1, 3 * 4096, 3), (1, 10, 1)]:
        monkeypatch.setattr(blocks.tf.config.threading, "get_intra_op_parallelism_threads",
                            lambda: intra_op)
        assert blocks.block_count(rows, min_rows=4096) == want, (intra_op, rows)
    parts = blocks.split_rows(np.arange(10).reshape(5, 2), 3)
    assert [len(p) for p in parts] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(10).reshape(5, 2))


def test_knn_top1_on_clusters_and_bad_options(rng):
    x, y, centres = _clusters(rng, 400)
    xq, yq, _ = _clusters(rng, 100, centres=centres)
    assert ev.knn_top1((x, y), (xq, yq), k=50) >= 0.99
    with pytest.raises(ValueError, match="temperature"):
        ev.knn_predict(x, y, xq, temperature=0.0)
    with pytest.raises(ValueError, match="k must be"):
        ev.knn_predict(x, y, xq, k=0)


# ----------------------------------------------------------------------------- few labels


def test_sample_few_labels_exact_counts_and_seeds(rng):
    labels = rng.integers(0, 5, 1000)
    draws = [ev.sample_few_labels(labels, 10, seed) for seed in (0, 1, 2)]
    for index in draws:
        assert len(np.unique(index)) == 50
        np.testing.assert_array_equal(np.bincount(labels[index], minlength=5), [10] * 5)
    assert not np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[1], draws[2])
    np.testing.assert_array_equal(draws[0], ev.sample_few_labels(labels, 10, 0))
    with pytest.raises(ValueError, match="class 9 has 1 examples"):
        ev.sample_few_labels(np.append(labels, 9), 10, 0)


def test_few_label_probe_statistics(rng):
    centres = rng.normal(size=(3, 16)) * 1.5
    train = _clusters(rng, 600, centres=centres)[:2]
    val = _clusters(rng, 200, centres=centres)[:2]
    test = _clusters(rng, 200, centres=centres)[:2]
    seeds = (4, 5, 6)
    result = ev.few_label_probe(train, val, test, n_per_class=5, seeds=seeds,
                                l2_grid=(1e-1, 1e-2))
    assert result["mean"] == pytest.approx(np.mean(result["per_draw"]))
    assert result["std"] == pytest.approx(np.std(result["per_draw"], ddof=1))
    assert len(result["per_draw"]) == 3 and result["seeds"] == list(seeds)
    # Each draw is the plain probe on that seed's subset, standardised with all of train.
    index = ev.sample_few_labels(train[1], 5, seeds[1])
    single = ev.linear_probe((train[0][index], train[1][index]), val, test,
                             l2_grid=(1e-1, 1e-2), standardize_with=train[0])
    assert result["per_draw"][1] == single["top1"]
    one = ev.few_label_probe(train, val, test, n_per_class=5, seeds=(0,), l2_grid=(1e-1,))
    assert np.isnan(one["std"])


# ----------------------------------------------------------------------------- features


def _bn_encoder(rng, shape=(6, 6, 1), dim=5):
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(dim, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    encoder = keras.Model(inputs, x)
    bn = encoder.layers[2]
    bn.moving_mean.assign(rng.normal(size=dim).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=dim).astype(np.float32))
    return encoder


def test_extract_features_is_frozen_and_input_agnostic(rng):
    encoder = _bn_encoder(rng)
    images = rng.normal(size=(23, 6, 6, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 23)
    before = [w.numpy().copy() for w in encoder.weights]
    features, got_labels = ev.extract_features(encoder, (images, labels), batch_size=8)
    np.testing.assert_allclose(features, encoder(images, training=False), atol=1e-5)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(got_labels, labels)
    for old, new in zip(before, encoder.weights):
        np.testing.assert_array_equal(old, new.numpy())  # BN moving stats untouched

    one_hot = np.eye(3, dtype=np.float32)[labels]
    ds = tf.data.Dataset.from_tensor_slices((images, one_hot)).batch(10)
    ds_features, ds_labels = ev.extract_features(encoder, ds)
    np.testing.assert_allclose(ds_features, features, atol=1e-5)
    np.testing.assert_array_equal(ds_labels, labels)

    no_labels, none = ev.extract_features(encoder, images)
    assert none is None and no_labels.shape == (23, 5)


@pytest.mark.parametrize("rows", [1, 2, 7, 23])
def test_feature_blocks_match_one_call(rng, rows):
    """Row blocks (separate encoder calls in one graph) give each row's own features, also for
    batches with fewer rows than blocks (padded, the padding dropped)."""
    encoder = _bn_encoder(rng)
    images = rng.normal(size=(rows, 6, 6, 1)).astype(np.float32)
    want = encoder(images, training=False).numpy()
    got = ev.make_feature_fn(encoder, blocks=3)(tf.constant(images)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_extract_features_resolves_model_encoder_and_rejects_unpooled(rng):
    encoder = _bn_encoder(rng)
    holder = type("Holder", (), {"encoder": encoder})()
    images = rng.normal(size=(4, 6, 6, 1)).astype(np.float32)
    np.testing.assert_allclose(ev.extract_features(holder, images)[0],
                               encoder(images, training=False), atol=1e-5)
    with pytest.raises(ValueError, match="pooled features"):
        ev.extract_features(keras.layers.Conv2D(2, 3), images)
    with pytest.raises(ValueError, match="neither a model"):
        ev.resolve_encoder(42)


def test_evaluate_encoder_trained_random_and_raw_pixels(rng):
    centres = rng.normal(size=(3, 6, 6, 1)) * 2.0

    def split(n):
        y = rng.integers(0, 3, n)
        return (centres[y] + rng.normal(size=(n, 6, 6, 1))).astype(np.float32), y

    train, val, test = split(240), split(90), split(90)
    encoder = _bn_encoder(rng)
    options = {"l2_grid": (1e-2, 1e-3), "few_label_n": 5, "few_label_seeds": (0, 1),
               "knn_k": 20}
    raw = ev.evaluate_raw_pixels(train, val, test, **options)
    assert raw["feature_dim"] == 36 and raw["linear_probe_top1"] >= 0.95
    fresh = ev.random_init_copy(encoder)
    assert fresh is not encoder and fresh.output_shape == encoder.output_shape
    assert not np.allclose(fresh.layers[1].kernel.numpy(), encoder.layers[1].kernel.numpy())
    for result in (raw, ev.evaluate_encoder(fresh, train, val, test, **options)):
        for key in ("linear_probe_top1", "knn_top1", "few_label_top1_mean"):
            assert 0.0 <= result[key] <= 1.0
        assert len(result["few_label_top1_per_draw"]) == 2
        assert {"features", "linear_probe", "knn", "few_label"} <= set(result["seconds"])
        json.dumps(result)  # the runner writes it into report.json
    skipped = ev.evaluate_features(ev.extract_features(encoder, train),
                                   ev.extract_features(encoder, val),
                                   ev.extract_features(encoder, test),
                                   few_label_n=None, l2_grid=(1e-2,), knn_k=10)
    assert skipped["few_label_top1_mean"] is None


# ----------------------------------------------------------------------------- callback


class _ToyModel(keras.Model):
    """A stand-in for BYOL/SimSiam: an `.encoder` and a train_step that nudges it."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def call(self, images, training=False):
        return self.encoder(images, training=training)

    def train_step(self, data):
        images = data[0] if isinstance(data, tuple) else data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.encoder(images, training=True)))
        grads = tape.gradient(loss, self.encoder.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.encoder.trainable_variables))
        return {"loss": loss}


def test_knn_monitor_logs_into_fit_history_and_csv(rng, tmp_path):
    encoder = _bn_encoder(rng)
    model = _ToyModel(encoder)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    images = rng.normal(size=(64, 6, 6, 1)).astype(np.float32)
    bank_y, query_y = rng.integers(0, 3, 40), rng.integers(0, 3, 20)
    monitor = ev.KNNMonitor(images[:40], bank_y, images[40:60], query_y, k=10,
                            every_n_epochs=3, batch_size=16)
    csv_path = tmp_path / "log.csv"
    history = model.fit(tf.data.Dataset.from_tensor_slices(images).batch(16), epochs=4,
                        verbose=0, shuffle=False,
                        callbacks=[monitor, keras.callbacks.CSVLogger(str(csv_path))])
    # First epoch, every third ((epoch + 1) % 3 == 0) and the last.
    assert [epoch for epoch, _ in monitor.history] == [0, 2, 3]
    assert history.history["knn_top1"] == [top1 for _, top1 in monitor.history]
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [row["knn_top1"] != "NA" for row in rows] == [True, False, True, True]

    bank = ev.extract_features(encoder, images[:40])[0]
    query = ev.extract_features(encoder, images[40:60])[0]
    assert monitor.history[-1][1] == ev.knn_top1((bank, bank_y), (query, query_y), k=10)
    assert monitor.get_config()["bank_size"] == 40


def test_knn_monitor_rejects_bad_settings(rng):
    images = rng.normal(size=(4, 6, 6, 1)).astype(np.float32)
    labels = np.arange(4)
    with pytest.raises(ValueError, match="every_n_epochs"):
        ev.KNNMonitor(images, labels, images, labels, every_n_epochs=0)
    with pytest.raises(ValueError, match="query: 4 images and 3 labels"):
        ev.KNNMonitor(images, labels, images, labels[:3])
