"""The runner's export stage: raw images give the runner's evaluation features (eval_arrays +
encoder(training=False)), and the metadata records flags, training step and accuracy table."""
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

import builders
import evaluation_stage
import export_stage
from export_helpers import randomize_batchnorm, relative_error
from run_tiny import ROOT, parse
from keras_ncssl import data, export

FLAGS = ["--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), "--dataset=digits",
         "--image_size=16", "--channels=3", "--widths=8,16", "--projector_hidden=32",
         "--projection_dim=8", "--batch_size=8", "--epochs=1"]


def _splits(rng, shape, mean=None, std=None, n=24):
    x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    y = np.arange(n) % 3
    return data.splits_from_arrays("arrays", x, y, x[:10], y[:10], 0.25, 0, num_classes=3,
                                   mean=mean, std=std)


@pytest.fixture
def trained(tmp_path, rng):
    """(config, model) as the runner builds them, with non-trivial BN state and step 7."""
    config = parse(*FLAGS, f"--workdir={tmp_path}")
    model = builders.build_model(config, 10, 10, tf.distribute.get_strategy())
    randomize_batchnorm(model.encoder, rng)
    model.optimizer.iterations.assign(7)
    return config, model


def test_serve_gives_the_runners_evaluation_features(trained, rng):
    config, model = trained
    train = _splits(rng, (20, 20, 1))  # grey training data of another size than the encoder's
    path = export_stage.export_stage(config, model, train,
                               {"step": 7, "total_steps": 10, "complete": False})
    loaded = export.load_encoder(path)
    worst = 0.0
    # The training data's own images, then images of other sizes and channel counts, each
    # evaluated by the runner with the run's statistics.
    for shape in ((20, 20, 1), (9, 13, 1), (16, 16, 3), (40, 24, 3), (3, 2, 1)):
        splits = train if shape == (20, 20, 1) else _splits(rng, shape, train.mean, train.std)
        x, _ = evaluation_stage.eval_arrays(config, splits, "test")
        expected = model.encoder(x, training=False).numpy()
        raw = splits.numpy("test")[0]
        for images in (raw, raw.astype(np.float32)):  # serve (uint8) and serve_float (0..255)
            error = relative_error(loaded.embed_raw(images), expected)
            assert error <= 1e-5, (shape, images.dtype, error)
            worst = max(worst, error)
    print(f"largest relative difference to the runner's evaluation features: {worst:.2e}")
    meta = loaded.metadata
    pre = meta["preprocessing"]
    assert (pre["image_size"], pre["channels"], pre["geometry"]) == (16, 3, "resize")
    np.testing.assert_allclose(pre["mean"], np.repeat(train.mean, 3), rtol=1e-6)
    np.testing.assert_allclose(pre["std"], np.repeat(train.std, 3), rtol=1e-6)
    assert meta["keras_model"] == export.KERAS_FILE
    run = meta["metadata"]
    assert run["training_step"] == 7 and run["training_complete"] is False
    assert run["optimizer_iterations"] == 7 and run["training_flags"]["image_size"] == 16
    assert run["training_flags"]["dataset"] == "digits" and "workdir" not in run["training_flags"]
    assert run["accuracy"] is None and "no eval.json" in run["accuracy_missing_because"]


def _write_eval(config, **extra):
    results = {"protocol": "p", "trained": {"linear_probe_top1": 0.8, "knn_top1": 0.7,
                                            "linear_probe_val_top1": {"0.1": 0.5}},
               "random_init": {"linear_probe_top1": 0.3}, **extra}
    with open(os.path.join(config["workdir"], "eval.json"), "w") as f:
        json.dump(results, f)


def test_metadata_carries_the_accuracy_table_of_this_encoder_only(trained):
    config, model = trained
    _write_eval(config, encoder_step={"step": 7, "total_steps": 10, "complete": False})
    meta = export_stage.export_metadata(config, model)  # the step from optimizer.iterations: 7
    assert meta["accuracy"] == {"protocol": "p",
                                "trained": {"linear_probe_top1": 0.8, "knn_top1": 0.7},
                                "random_init": {"linear_probe_top1": 0.3}}
    assert meta["accuracy_missing_because"] is None
    json.dumps(meta)  # stored as JSON
    assert meta["training_step"] == 7 and meta["training_complete"] is None
    # The runner's step of the restored checkpoint wins over the optimizer's count.
    trained_step = {"step": 5, "total_steps": 10, "complete": False}
    assert export_stage.export_metadata(config, model, trained_step)["accuracy"] is None
    _write_eval(config, encoder_step=trained_step)  # evaluated an earlier checkpoint
    meta = export_stage.export_metadata(config, model)
    assert meta["accuracy"] is None and "(step 5)" in meta["accuracy_missing_because"]
    assert export_stage.export_metadata(config, model, trained_step)["accuracy"]["trained"]
    # No step in eval.json: a checkpoint newer than it means another encoder.
    _write_eval(config)
    os.makedirs(os.path.join(config["workdir"], "checkpoints"))
    state = os.path.join(config["workdir"], "checkpoints", "checkpoint")
    with open(state, "w") as f:
        f.write("ckpt")
    later = time.time() + 10
    os.utime(state, (later, later))
    assert export_stage.export_metadata(config, model)["accuracy"] is None
    os.utime(state, (later - 100, later - 100))
    assert export_stage.export_metadata(config, model)["accuracy"]["trained"]["knn_top1"] == 0.7
