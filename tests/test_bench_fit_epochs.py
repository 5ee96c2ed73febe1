"""experiments/bench.py fit_epochs runs the runner's model on its real input, one fit per epoch,
and reports one rate per fit (or per epoch of one fit) with the threads and precision it used;
bench.py train_step times the run's own steps per execution; bench.py conv_gradient times the
small CNN's convolutions one by one."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("single_fit", [False, True])
def test_fit_epochs_reports_a_rate_per_fit_and_the_runtime(single_fit):
    result = subprocess.run(
        [sys.executable, os.path.join("experiments", "bench.py"), "fit_epochs",
         "--flagfile=experiments/quick.flags", "--steps=3", "--fits=2", "--steps_per_execution=2",
         "--mixed_precision=none", "--knn_monitor_every=0", "--callbacks=epoch_end,spectrum",
         f"--single_fit={single_fit}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "experiments")))
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["benchmark"] == "fit_epochs" and row["steps"] == 3 and row["steps_per_execution"] == 2
    assert len(row["pairs_per_sec"]) == 2 and all(rate > 0 for rate in row["pairs_per_sec"])
    assert row["runtime"]["precision"] == "none" and row["runtime"]["intra_op_threads"] == 1
    assert row["callbacks"] == ["epoch_end", "spectrum"] and row["single_fit"] is single_fit


def test_train_step_bench_runs_the_runs_steps_per_execution():
    """Each timed call of the train function runs --steps_per_execution steps, as the run's fit does;
    the rate is per step (the optimizer's step count proves how many ran)."""
    result = subprocess.run(
        [sys.executable, os.path.join("experiments", "bench.py"), "train_step",
         "--flagfile=experiments/quick.flags", "--steps=8", "--warmup=4", "--steps_per_execution=4",
         "--mixed_precision=none", "--batch_size=16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "experiments")))
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["bench"] == "train_step" and row["steps_per_execution"] == 4 and row["steps"] == 8
    assert row["optimizer_steps"] == 4 + 8 and row["images_per_sec"] > 0


def test_conv_gradient_bench_times_every_convolution_of_the_small_cnn():
    """One line per convolution of small_cnn at the size (its padded input and output positions),
    with CPU and wall times of both layers and both patch matrices."""
    result = subprocess.run(
        [sys.executable, os.path.join("experiments", "bench.py"), "conv_gradient", "--image_size=32",
         "--channels=3", "--batch_size=4", "--calls=2", "--rounds=1", "--precision=float32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "experiments")))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [row["input"] for row in rows] == [[4, 34, 34, 3], [4, 18, 18, 32], [4, 10, 10, 64], [4, 6, 6, 128]]
    assert [row["output_positions"] for row in rows] == [256, 64, 16, 4]
    kinds = {"conv2d", "patch_gradient", "patches_gather", "patches_extract"}
    assert all(set(row["cpu_ms"]) == kinds and min(row["wall_ms"].values()) > 0 for row in rows)
