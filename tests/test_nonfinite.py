"""A training step with a non-finite loss or gradients is skipped whole, on one or two replicas."""
import numpy as np
import pytest
import tensorflow as tf

import dist_worker as dw
from keras_ncssl import distribute
from keras_ncssl.models import NonFiniteTrainingError

BAD_STEP = 2  # the global batch that carries one NaN (or Inf) pixel


def poisoned(value=np.nan, steps=dw.STEPS, bad_steps=(BAD_STEP,)):
    """dist_worker's views with one pixel of each global batch in ``bad_steps`` set to ``value``."""
    x1, x2 = dw.make_views(steps=steps)
    for step in bad_steps:
        x1[step * dw.GLOBAL_BATCH + 3, 4, 5, 0] = value
    return x1, x2


def without_steps(x, steps):
    keep = [i for i in range(len(x)) if i // dw.GLOBAL_BATCH not in steps]
    return x[keep]


def train(model, x1, x2, strategy=None):
    if strategy is None:
        data = dw.single_dataset(x1, x2)
    else:
        data = distribute.distribute_pretrain_dataset(strategy, dw.dataset_fn(x1, x2), dw.GLOBAL_BATCH)
    return model.fit(data, epochs=1, steps_per_epoch=len(x1) // dw.GLOBAL_BATCH, verbose=0).history


def assert_same_state(a, b, atol=0.0):
    sa, sb = dw.snapshot(a), dw.snapshot(b)
    for group in sa:
        for x, y in zip(sa[group], sb[group]):
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=group)


@pytest.mark.slow
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_nan_pixel_skips_exactly_that_step_on_one_replica(value, capfd):
    x1, x2 = poisoned(value)
    model = dw.build_model(synchronized_bn=False)
    with pytest.warns(RuntimeWarning, match="1 training step"):
        history = train(model, x1, x2)
    # Every weight, BN statistic, optimizer slot and the predictor are as if that batch had
    # never been there: the same model trained on the other batches only.
    reference = dw.build_model(synchronized_bn=False)
    train(reference, without_steps(x1, {BAD_STEP}), without_steps(x2, {BAD_STEP}))
    assert_same_state(model, reference)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert int(model.nonfinite_steps.numpy()) == 1 and int(model.consecutive_nonfinite_steps.numpy()) == 0
    assert int(model.optimizer.iterations.numpy()) == dw.STEPS - 1
    assert int(model.predictor.num_skipped.numpy()) == 0  # counted once, by the model
    assert history["nonfinite_steps"][-1] == 1.0 and np.isfinite(history["loss"][-1])
    assert "non-finite loss or gradients" in capfd.readouterr().err
    clean = np.random.default_rng(0).normal(size=(4, *dw.SHAPE)).astype(np.float32)
    assert np.all(np.isfinite(model.encoder(clean, training=False).numpy()))


@pytest.mark.slow
@pytest.mark.skipif(len(tf.config.list_logical_devices("CPU")) < 2, reason="needs two logical CPUs")
def test_a_nan_pixel_on_one_replica_skips_the_step_on_both():
    x1, x2 = poisoned()  # the NaN lands in the first replica's half of the global batch
    strategy = distribute.get_strategy("cpu:2")
    single = dw.build_model()
    init = single.get_weights()
    with strategy.scope():
        double = dw.build_model()
    double.set_weights(init)
    with pytest.warns(RuntimeWarning):
        train(single, x1, x2)
    with pytest.warns(RuntimeWarning):
        train(double, x1, x2, strategy)
    assert_same_state(single, double, atol=1e-4)
    assert int(double.nonfinite_steps.numpy()) == 1
    assert int(double.optimizer.iterations.numpy()) == dw.STEPS - 1
    assert all(np.all(np.isfinite(w)) for w in double.get_weights())


def test_consecutive_non_finite_steps_stop_training_with_a_clear_error():
    x1, x2 = poisoned(steps=dw.STEPS, bad_steps=(1, 2, 3, 4))
    model = dw.build_model(synchronized_bn=False)
    model.max_consecutive_nonfinite = 3
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive steps had a non-finite loss.*epoch 1, batch 4"):
        train(model, x1, x2)
    assert int(model.nonfinite_steps.numpy()) == 3
    assert int(model.optimizer.iterations.numpy()) == 1  # only the first, clean step was taken
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_max_consecutive_nonfinite_is_validated_and_serialised():
    model = dw.build_model(synchronized_bn=False)
    assert model.get_config()["max_consecutive_nonfinite"] == 20
    with pytest.raises(ValueError, match="max_consecutive_nonfinite must be an integer >= 0"):
        type(model)(model.encoder, model.projector, model.predictor, max_consecutive_nonfinite=-1)
