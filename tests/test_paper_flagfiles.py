"""The paper flagfiles end to end on the CPU, on small files in the real binary layouts.

`experiments/run.py --flagfile=stl10.flags` (and cifar10 / cifar100) with only run-length
flags changed: one epoch, and a few-label probe of 2 labels per class over one draw (the data
have 5-9 labelled images per class). Everything else is the flagfile's: the real model
(ResNet-18; the imagenet stem at 96 px for STL-10, the 3x3 stem at 32 px for CIFAR), batch 128,
the DirectPred predictor, baselines, export and report. The files are written by
keras_ncssl.data's writers, which tests/test_data_binary.py checks byte for byte against
independent writers of the formats.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_ncssl import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
RUN_LENGTH = ["--epochs=1", "--few_label_per_class=2", "--few_label_draws=1", "--checkpoint_every_steps=0",
              "--verbose=0"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def run_flagfile(flagfile, data_dir, workdir):
    command = [sys.executable, RUN, f"--flagfile={flagfile}", f"--data_dir={data_dir}", f"--workdir={workdir}",
               *RUN_LENGTH]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result.stdout


def check_run(workdir, image_size, counts, pretrain_steps):
    """Pretrained for the expected steps, evaluated on train/validation/test, exported at image_size."""
    pretrain = json.loads((workdir / "pretrain.json").read_text())
    assert pretrain["steps_per_epoch"] == pretrain_steps and len(pretrain["history"]) == 1
    assert np.isfinite(pretrain["history"][0]["loss"])
    trained = json.loads((workdir / "eval.json").read_text())["trained"]
    assert (trained["n_train"], trained["n_val"], trained["n_test"]) == (counts["train"], counts["validation"],
                                                                         counts["test"])
    assert 0.0 <= trained["linear_probe_top1"] <= 1.0 and trained["feature_dim"] == 512
    report = json.loads((workdir / "report.json").read_text())
    assert {"random_init", "raw_pixels"} <= set(report["baselines"])
    assert (workdir / "report.md").stat().st_size > 0
    signatures = tf.saved_model.load(str(workdir / "encoder")).signatures
    serve = signatures["serve_normalized"]
    spec = serve.structured_input_signature[1]["images"]
    assert spec.shape.as_list() == [None, image_size, image_size, 3]
    out = serve(images=tf.random.normal((2, image_size, image_size, 3)))["embeddings"].numpy()
    assert out.shape == (2, 512) and np.all(np.isfinite(out))
    raw = tf.zeros((2, image_size + 5, image_size - 3, 3), tf.uint8)  # raw pixels, another size
    assert signatures["serve"](images=raw)["embeddings"].shape == (2, 512)
    return report


@pytest.mark.slow
def test_stl10_flagfile_pretrains_on_train_and_unlabelled(tmp_path, rng):
    # 60 labelled (6 per class: the 10 % validation split keeps one per class) + 68 unlabelled
    # = 128 = one batch of the flagfile's 128: one step is only possible with the unlabelled split.
    n_train, n_unlabelled = 60, 68
    data.write_stl10_binary(str(tmp_path / "stl10_binary"),
                            (rng.integers(0, 256, (n_train, 96, 96, 3), dtype=np.uint8), np.arange(n_train) % 10),
                            (rng.integers(0, 256, (20, 96, 96, 3), dtype=np.uint8), np.arange(20) % 10),
                            rng.integers(0, 256, (n_unlabelled, 96, 96, 3), dtype=np.uint8))
    workdir = tmp_path / "run"
    stdout = run_flagfile("stl10.flags", tmp_path, workdir)
    assert "Data: stl10 from STL-10 binary folder" in stdout
    assert "(pretrain 128, train 50, validation 10, test 20)" in stdout
    report = check_run(workdir, 96, {"train": 50, "validation": 10, "test": 20}, pretrain_steps=1)
    flags = report["flags"]
    assert (flags["dataset"], flags["image_size"], flags["encoder"], flags["stem"], flags["batch_size"]) == \
        ("stl10", 96, "resnet18", "imagenet", 128)


def _cifar_arrays(rng, classes, per_class, n_test):
    labels = np.repeat(classes, per_class)
    return ((rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels),
            (rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), rng.choice(classes, n_test)))


@pytest.mark.slow
@pytest.mark.parametrize("name,classes", [
    ("cifar10", np.arange(10)),
    # 13 of the 100 classes, the last one included, 10 images each: a stratified validation
    # split needs >= 6 images per class, and 1,000 images would only slow the test down.
    ("cifar100", np.array([0, 8, 16, 24, 33, 41, 49, 57, 66, 74, 82, 90, 99])),
])
def test_cifar_flagfiles_end_to_end(tmp_path, rng, name, classes):
    train, test = _cifar_arrays(rng, classes, per_class=13 if name == "cifar10" else 10, n_test=20)
    data.write_cifar_binary(name, str(tmp_path / data.CIFAR_LAYOUTS[name].folder), train, test)
    workdir = tmp_path / "run"
    stdout = run_flagfile(f"{name}.flags", tmp_path, workdir)
    n = len(train[1])
    validation = len(classes)  # one per class
    assert f"Data: {name} from {name} binary folder" in stdout
    assert f"(pretrain {n}, train {n - validation}, validation {validation}, test 20)" in stdout
    report = check_run(workdir, 32, {"train": n - validation, "validation": validation, "test": 20},
                       pretrain_steps=n // 128)
    flags = report["flags"]
    assert (flags["dataset"], flags["image_size"], flags["encoder"], flags["stem"], flags["batch_size"]) == \
        (name, 32, "resnet18", "cifar", 128)
