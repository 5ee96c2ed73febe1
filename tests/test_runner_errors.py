"""experiments/run.py on bad input, divergence and log files: one line, nothing written, resumable."""
import json
import os
import pty
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from run_tiny import ENV, ROOT, RUN, TINY, error_lines, keep_only_checkpoint, run

PRETRAIN = ["--mode=pretrain", "--epochs=1", "--steps_per_epoch=2", "--knn_monitor_every=0"]


def snapshot(directory):
    """{path: (size, mtime)} of everything under ``directory`` ({} when it does not exist)."""
    if not os.path.exists(directory):
        return {}
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(directory) for f in files}


# (extra flags, what the one error line must contain). "{file}" is an existing regular file.
BAD_INPUT = [
    (["--eps=-1"], "--eps=-1.0: must be a number >= 0"),
    (["--rho=1.5"], "--rho=1.5: must be in [0, 1)"),
    (["--lr=nan"], "--lr=nan: must be > 0"),
    (["--momentum=1"], "--momentum=1.0: must be in [0, 1)"),
    (["--batch_size=7", "--strategy=cpu:2"], "--batch_size=7 is not divisible by the 2 replicas of --strategy=cpu:2; "
                                             "use a multiple of 2"),
    (["--batch_size=5000"], "--batch_size=5000 exceeds the"),
    (["--dataset=nonsense"], "--dataset=nonsense: unknown dataset 'nonsense'; choose one of"),
    (["--data_dir=/no/such/dir"], "--data_dir=/no/such/dir: no such directory"),
    (["--encoder=resnet7"], "--encoder=resnet7: unknown; choose one of resnet18"),
    (["--strategy=gpu:2"], "--strategy=gpu:2: unknown strategy 'gpu:2'; choose one of"),
    (["--allow_changes=epochs"], "--allow_changes=epochs: epochs cannot change on resume (allowed: lr"),
    (["--mode=eval"], "--mode=eval needs an existing work directory"),
    (["--workdir={file}"], "exists and is not a directory"),
]


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", BAD_INPUT, ids=[" ".join(e) for e, _ in BAD_INPUT])
def test_bad_input_is_one_line_nothing_written(tmp_path, extra, message):
    afile = tmp_path / "a_file"
    afile.write_text("not a directory")
    workdir = tmp_path / "run"
    extra = [e.replace("{file}", str(afile)) for e in extra]
    result = run(workdir, *PRETRAIN, *extra, check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not workdir.exists() and afile.read_text() == "not a directory"


@pytest.mark.slow
def test_a_failed_start_leaves_an_existing_workdir_unchanged_and_the_fix_then_runs(tmp_path):
    workdir = tmp_path / "run"
    run(workdir, *PRETRAIN, "--epochs=2")
    run(workdir, *PRETRAIN, "--epochs=2", "--eps=-1", check=False)  # warm the file system cache
    before = snapshot(workdir)
    for bad in (["--eps=-1"], ["--batch_size=7", "--strategy=cpu:2"], ["--predictor=directcopy"]):
        result = run(workdir, *PRETRAIN, "--epochs=2", *bad, check=False, timeout=120)
        assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr[-2000:]
        assert snapshot(workdir) == before, bad
    again = run(workdir, *PRETRAIN, "--epochs=2")  # the corrected command on the same workdir
    assert "already complete" in again.stdout


def _checkpoint_arrays(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_dtype_map()
            if reader.get_variable_to_dtype_map()[name].is_floating}


@pytest.mark.slow
def test_divergence_stops_keeps_finite_checkpoints_and_resumes_with_a_lower_lr(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--mode=pretrain", "--epochs=3", "--steps_per_epoch=6", "--checkpoint_every_steps=0",
             "--knn_monitor_every=0", "--max_consecutive_nonfinite=3"]
    run(workdir, *flags)
    keep_only_checkpoint(workdir, 6)  # as if stopped after epoch 1
    diverged = run(workdir, *flags, "--lr=1e12", "--allow_changes=lr", check=False)
    assert diverged.returncode == 3, diverged.stderr[-3000:]
    (line,) = error_lines(diverged)
    assert "diverged" in line and "epoch 2" in line, line
    assert "--lr=1e+11 --allow_changes=lr" in line and "Traceback" not in diverged.stderr
    prefixes = sorted({p.name.split(".")[0] for p in (workdir / "checkpoints").glob("ckpt-*.index")})
    assert prefixes == ["ckpt-6"]  # no checkpoint was taken once steps were being skipped
    for name, value in _checkpoint_arrays(workdir / "checkpoints" / "ckpt-6").items():
        assert np.all(np.isfinite(value)), name
    resumed = run(workdir, *flags, "--lr=0.01", "--allow_changes=lr")
    assert "Resuming" in resumed.stdout and "epoch 3/3" in resumed.stdout
    saved = json.loads((workdir / "flags.json").read_text())
    assert saved["training"]["lr"] == 0.01
    assert [h["changes"]["lr"]["to"] for h in saved["history"]] == [1e12, 0.01]
    history = json.loads((workdir / "pretrain.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(np.isfinite(h["loss"]) for h in history)
    # Without --allow_changes the lr is still part of the configuration.
    refused = run(workdir, *flags, "--lr=0.02", check=False)
    assert refused.returncode == 2 and "add --allow_changes=lr" in error_lines(refused)[0]


@pytest.mark.slow
def test_log_to_a_file_has_one_line_per_epoch_and_no_redraws(tmp_path):
    base = [a for a in TINY if not a.startswith("--verbose")]  # the default: --verbose=auto
    log = tmp_path / "stdout.log"
    with open(log, "w") as handle:
        run(tmp_path / "run", "--mode=pretrain", "--epochs=2", "--steps_per_epoch=6", base=base, stdout=handle)
    text = log.read_text()
    assert "\r" not in text and "\x1b" not in text
    assert re.search(r"^epoch 1/2: loss=", text, re.M) and re.search(r"^epoch 2/2: loss=", text, re.M)
    assert len(text) < 2000, text


@pytest.mark.slow
def test_a_terminal_still_gets_the_progress_bar(tmp_path):
    base = [a for a in TINY if not a.startswith("--verbose")]
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, RUN, *base, f"--workdir={tmp_path / 'run'}", "--mode=pretrain",
                                "--epochs=1", "--steps_per_epoch=6", "--knn_monitor_every=0"],
                               cwd=ROOT, env=ENV, stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "6/6" in text and "epoch 1/1: loss=" in text  # Keras' bar, then the runner's line
