"""The streaming linear probe (SGD over tf.data) against the in-memory probe, and its choice by
feature memory."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from keras_ncssl import evaluation as ev

GRID = (1e-1, 1e-2, 1e-3, 1e-4)
# Stated tolerance: the streaming probe's test accuracy is within 2 points of the in-memory
# probe's on scikit-learn's digits (497 test images; measured 0.0-0.2 points, BUILD_NOTES).
TOLERANCE = 0.02


def _digits():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32).reshape(-1, 8, 8, 1), y[order]
    return [(x[:1000], y[:1000]), (x[1000:1300], y[1000:1300]), (x[1300:], y[1300:])]


def _flatten_encoder():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten()])


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_streaming_probe_matches_in_memory_probe_on_digits(replicas):
    splits = _digits()
    in_memory = ev.linear_probe(*[(x.reshape(len(x), -1), y) for x, y in splits], l2_grid=GRID)
    # Reduction to one device, not collectives: collective instance keys are per process and
    # other multi-replica tests in this process would otherwise clash with this strategy's.
    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                               cross_device_ops=tf.distribute.ReductionToOneDevice())
                if replicas == 2 else tf.distribute.get_strategy())
    with strategy.scope():
        encoder = _flatten_encoder()
    datasets = [tf.data.Dataset.from_tensor_slices(split).batch(100) for split in splits]
    result = ev.streaming_linear_probe(encoder, *datasets, num_classes=10, l2_grid=GRID,
                                       epochs=10, batch_size=64, strategy=strategy)
    assert result["method"] == "streaming_sgd" and result["l2"] in GRID
    assert set(result["val_top1"]) == set(GRID)
    assert abs(result["top1"] - in_memory["top1"]) <= TOLERANCE, (result, in_memory["top1"])
    # Far above chance (10%) and the random-label baseline: the heads really trained.
    assert result["top1"] > 0.9


def test_streaming_probe_test_labels_only_score_the_chosen_head():
    """Selection reads validation only: shuffled test labels leave l2 and val_top1 unchanged."""
    splits = _digits()
    encoder = _flatten_encoder()
    datasets = [tf.data.Dataset.from_tensor_slices(split).batch(200) for split in splits]
    x_test, y_test = splits[2]
    shuffled = tf.data.Dataset.from_tensor_slices(
        (x_test, np.random.default_rng(1).permutation(y_test))).batch(200)
    options = dict(num_classes=10, l2_grid=(1e-1, 1e-3), epochs=2, batch_size=128)
    a = ev.streaming_linear_probe(encoder, *datasets, **options)
    b = ev.streaming_linear_probe(encoder, datasets[0], datasets[1], shuffled, **options)
    assert a["l2"] == b["l2"] and a["val_top1"] == b["val_top1"]
    assert b["top1"] < 0.3 < a["top1"]


def test_needs_streaming_by_feature_bytes_and_bad_options():
    # ImageNet: 1.28 M train + 50k val/test images x 2048 float32 features.
    assert ev.feature_bytes(1_381_167, 2048) == 4 * 1_381_167 * 2048
    assert ev.needs_streaming(1_381_167, 2048, ev.DEFAULT_FEATURE_MEMORY_BUDGET)
    assert not ev.needs_streaming(70_000, 784, ev.DEFAULT_FEATURE_MEMORY_BUDGET)
    assert ev.needs_streaming(1001, 1000, 4_000_000) and not ev.needs_streaming(1000, 1000, 4_000_000)
    with pytest.raises(ValueError, match="budget_bytes must be positive"):
        ev.needs_streaming(10, 10, 0)
    data = tf.data.Dataset.from_tensor_slices(_digits()[0]).batch(10)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        ev.streaming_linear_probe(_flatten_encoder(), data, data, data, num_classes=10, epochs=0)
    with pytest.raises(ValueError, match="val must be a batched tf.data.Dataset"):
        ev.streaming_linear_probe(_flatten_encoder(), data, _digits()[1], data, num_classes=10)
