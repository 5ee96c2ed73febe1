"""experiments/run.py chooses the streaming linear probe when the features exceed
--probe_memory_budget_mb, and records what it ran in eval.json."""
import json

import pytest

from run_tiny import run

FLAGS = ["--epochs=1", "--steps_per_epoch=4", "--checkpoint_every_steps=0", "--knn_monitor_every=0",
         "--streaming_probe_epochs=2"]


@pytest.mark.slow
def test_features_over_the_budget_stream_and_under_it_stay_in_memory(tmp_path):
    workdir = tmp_path / "run"
    run(workdir, "--mode=pretrain", *FLAGS)
    # Digits' 1797 images' features are over 0.1 MiB: auto streams.
    run(workdir, "--mode=eval", "--probe_memory_budget_mb=0.1", *FLAGS)
    results = json.loads((workdir / "eval.json").read_text())
    assert "SGD over tf.data" in results["protocol"]
    for name in ("trained", "random_init"):
        assert results[name]["linear_probe_method"] == "streaming_sgd"
        assert 0.0 <= results[name]["linear_probe_top1"] <= 1.0
        assert results[name]["knn_top1"] is None
    assert "raw_pixels" not in results
    run(workdir, "--mode=report", "--probe_memory_budget_mb=0.1", *FLAGS)  # kNN / few-label shown as not measured
    report = json.loads((workdir / "report.json").read_text())
    assert report["gain_over_random_init"]["knn"] is None
    assert report["gain_over_random_init"]["linear_probe"] == pytest.approx(
        results["trained"]["linear_probe_top1"] - results["random_init"]["linear_probe_top1"])
    assert "| – | – |" in (workdir / "report.md").read_text()
    # The default budget holds them: the in-memory probe, converged, with kNN.
    run(workdir, "--mode=eval", *FLAGS)
    results = json.loads((workdir / "eval.json").read_text())
    assert "L-BFGS to max|gradient|" in results["protocol"]
    for name in ("trained", "random_init", "raw_pixels"):
        assert results[name]["linear_probe_converged"] is True
        assert results[name]["knn_top1"] is not None
