"""experiments/benchmarks/device_check.py on a machine without a GPU: the GPU parts are skipped
with the reason, the CPU half of eigh runs, and the STL-10 run and the 1-vs-N comparison (over two
logical CPUs) run on the CPU when asked, so the check's own code is exercised before a GPU day."""
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "benchmarks", "device_check.py")


@pytest.mark.slow
@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="checks the CPU-only behaviour")
def test_device_check_without_a_gpu_writes_json_and_skips_gpu_parts(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, SCRIPT, str(out), "--cpu_dims=128", "--on_cpu=stl10_run,multi_gpu",
                             "--stl10_steps=1", "--budget_s=900"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1200, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "device_check.json").read_text())
    parts = report["parts"]

    env = parts["env"]
    assert env["tensorflow"] == tf.__version__ and env["tf_gpus"] == [] and env["cpus"] >= 1
    assert "torch" in env or "torch_error" in env  # the peer's absence is said, not hidden

    assert parts["train_step"] == {"skipped": "no GPU visible to TensorFlow or PyTorch"}

    eigh = parts["eigh"]
    assert eigh["devices"] == ["/device:CPU:0"] and eigh["torch_cuda"] == {}
    for kind in ("random_psd", "rank1", "zero"):
        cpu = eigh["tf"][f"d128_{kind}"]["/device:CPU:0"]
        assert cpu["ok"] and cpu["reconstruction_rel_error"] < 1e-4 and cpu["orthogonality_error"] < 1e-4, kind
    # The layer's guard: a zero F is skipped and counted, the others applied; no placement on a CPU.
    assert eigh["refresh"]["d128_zero"]["auto"] == {"applied": False, "num_skipped": 1, "placement": None}
    assert eigh["refresh"]["d128_rank1"]["None"]["applied"] is True

    stl10 = parts["stl10_run"]
    assert stl10["returncode"] == 0 and stl10["ran_on_cpu"], stl10
    assert stl10["steps_per_epoch"] == 1 and stl10["export_input_shape"] == [None, 96, 96, 3]
    assert stl10["eval_counts"] == [50, 10, 40] and "pretrain 128" in stl10["data_line"]

    multi = parts["multi_gpu"]
    assert multi["devices"] == ["/device:CPU:0", "/device:CPU:1"] and multi["ran_on_cpu"]
    assert multi["equal"] and multi["weights_moved"] > 100 * multi["tolerance"], multi
