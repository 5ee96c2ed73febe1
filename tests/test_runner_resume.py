"""experiments/run.py: partial models are refused by eval/export, resumed histories are exact."""
import csv
import json

import numpy as np
import pytest

from run_tiny import error_lines, keep_only_checkpoint, run

FLAGS = ["--epochs=2", "--steps_per_epoch=6", "--checkpoint_every_steps=0", "--knn_monitor_every=0",
         "--eval_baselines=false"]


@pytest.mark.slow
def test_eval_and_export_refuse_a_partial_model_unless_allowed(tmp_path):
    workdir = tmp_path / "run"
    run(workdir, "--mode=pretrain", *FLAGS)
    keep_only_checkpoint(workdir, 6)  # training stopped after epoch 1 of 2
    for mode in ("eval", "export"):
        refused = run(workdir, f"--mode={mode}", *FLAGS, check=False)
        assert refused.returncode == 2, refused.stderr[-2000:]
        (line,) = error_lines(refused)
        assert "unfinished" in line and "step 6 of 12" in line and "--allow_partial" in line, line
    assert not (workdir / "eval.json").exists() and not (workdir / "encoder").exists()
    run(workdir, "--mode=eval", "--allow_partial", *FLAGS)
    assert json.loads((workdir / "eval.json").read_text())["encoder_step"] == {
        "step": 6, "total_steps": 12, "complete": False}
    # Finished, then the newest checkpoint corrupted: the fallback is partial too.
    run(workdir, "--mode=pretrain", *FLAGS)
    for data in (workdir / "checkpoints").glob("ckpt-12.data-*"):
        data.write_bytes(b"garbage")
    refused = run(workdir, "--mode=export", *FLAGS, check=False)
    assert refused.returncode == 2 and "ckpt-12) could not be read" in error_lines(refused)[0]


@pytest.mark.slow
def test_a_workdir_with_history_but_no_checkpoint_warns_and_keeps_one_row_per_epoch(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--mode=pretrain", "--epochs=1", "--steps_per_epoch=3", "--knn_monitor_every=0"]
    run(workdir, *flags)
    for path in (workdir / "checkpoints").iterdir():
        path.unlink()
    again = run(workdir, *flags)
    assert "has a training history but no checkpoint" in again.stderr
    with open(workdir / "logs" / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1"]


@pytest.mark.slow
def test_a_corrupt_image_names_the_flag_that_skips_it(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 256, size=(16, 16, 1), dtype=np.uint8)
            (tmp_path / "images" / label / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not a png")
    flags = ["--dataset=image_folder", f"--data_dir={tmp_path / 'images'}", "--mode=pretrain", "--epochs=1",
             "--batch_size=8", "--steps_per_epoch=2", "--knn_monitor_every=0"]
    refused = run(tmp_path / "run", *flags, check=False)
    assert refused.returncode == 2 and "--on_corrupt=skip" in error_lines(refused)[0]
    assert not (tmp_path / "run").exists()
    run(tmp_path / "run", *flags, "--on_corrupt=skip")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["default", "cpu:2"])
def test_the_runner_skips_a_batch_with_a_nan_pixel_and_trains_on(tmp_path, monkeypatch, strategy):
    """In-process runner with one NaN pixel injected into the 3rd training batch of epoch 1."""
    import tensorflow as tf

    from run_tiny import TINY, parse

    config = parse(*TINY, f"--workdir={tmp_path / 'run'}", "--mode=pretrain", "--epochs=2", "--steps_per_epoch=6",
                   "--knn_monitor_every=0", f"--strategy={strategy}")
    import pretraining
    import runner
    if strategy != "default" and len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPUs")
    original = pretraining.pretrain_input

    def poisoned(config, splits, epoch):
        def inject(index, views):
            view1, view2 = views
            bad = tf.logical_and(tf.equal(index, 2), tf.equal(epoch, 0))
            mask = tf.scatter_nd([[0, 1, 1, 0]], [1.0], tf.shape(view1))
            return tf.where(tf.logical_and(bad, mask > 0), tf.constant(np.nan, view1.dtype), view1), view2
        return original(config, splits, epoch).enumerate().map(inject)

    monkeypatch.setattr(pretraining, "pretrain_input", poisoned)
    with pytest.warns(RuntimeWarning, match="1 training step"):
        runner.run(config)
    history = json.loads((tmp_path / "run" / "pretrain.json").read_text())["history"]
    assert [h["nonfinite_steps"] for h in history] == [1.0, 1.0]
    assert all(np.isfinite(h["loss"]) for h in history)
    assert all(np.all(np.isfinite(w)) for w in runner_model(runner, config).get_weights())


def runner_model(runner, config):
    """The trained model restored from the workdir's newest checkpoint."""
    config = config.replace(mode="eval")
    prepared = runner.preflight(config)
    runner.restore_for_eval(config, prepared.splits, prepared.model)
    return prepared.model
