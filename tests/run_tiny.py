"""experiments/run.py on a tiny digits configuration, as a subprocess: shared by the runner tests."""
import copy
import os
import re
import subprocess
import sys
import time

import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
QUICK = "--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags")
TINY = [QUICK, "--mixed_precision=none", "--dataset=digits", "--image_size=16", "--channels=1", "--width_multiplier=0.25",
        "--projector_hidden=64", "--projection_dim=16", "--predictor_hidden=32", "--batch_size=32", "--epochs=2",
        "--steps_per_epoch=6", "--knn_monitor_bank=300", "--knn_monitor_queries=100", "--knn_k=20",
        "--few_label_draws=2", "--verbose=0"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def run(workdir, *extra, check=True, timeout=600, base=TINY, stdout=None):
    """run.py with ``base`` + ``extra`` flags on ``workdir``; raises with its output if it fails
    and ``check``. ``stdout``: an open file to send stdout to (otherwise captured)."""
    command = [sys.executable, RUN, *base, f"--workdir={workdir}", *extra]
    if stdout is None:
        result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    else:
        result = subprocess.run(command, cwd=ROOT, env=ENV, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"run.py failed ({result.returncode}):\n{(result.stdout or '')[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def embeddings(workdir, x):
    """The exported encoder's embeddings of normalised images (serve takes raw ones)."""
    serve = tf.saved_model.load(os.path.join(workdir, "encoder")).signatures["serve_normalized"]
    return serve(images=tf.constant(x))["embeddings"].numpy()


def error_lines(result):
    """The lines of stderr that run.py's error handler wrote."""
    return [line for line in result.stderr.splitlines() if line.startswith("run.py: error:")]


def keep_only_checkpoint(workdir, number):
    """Make ``workdir`` look as if training had stopped right after checkpoint ``number``."""
    directory = os.path.join(workdir, "checkpoints")
    for name in os.listdir(directory):
        match = re.match(r"ckpt-(\d+)\.", name)
        if match and int(match.group(1)) > number:
            os.remove(os.path.join(directory, name))
    now = time.time()  # CheckpointManager only lists checkpoints newer than last_preserved_timestamp
    with open(os.path.join(directory, "checkpoint"), "w") as handle:
        handle.write(f'model_checkpoint_path: "ckpt-{number}"\nall_model_checkpoint_paths: "ckpt-{number}"\n'
                     f"all_model_checkpoint_timestamps: {now - 1}\nlast_preserved_timestamp: {now - 1000}\n")


def parse(*argv):
    """The runner's flags parsed in-process, as run.py parses them (no TensorFlow start-up)."""
    from absl import flags
    import runner_flags  # experiments/ is on sys.path in the tests (setup.cfg: pythonpath)
    values = flags.FlagValues()
    for name in runner_flags.NAMES:
        values[name] = copy.deepcopy(flags.FLAGS[name])  # the same definitions, fresh values
    values(["run.py", *argv])
    return runner_flags.resolved(values)
