"""Wall time of the runner's evaluation stage, exactly as --mode=eval runs it.

The flags of experiments/run.py apply (a flagfile evaluates its own run's encoder): the newest
checkpoint of --workdir is restored (a partial one is accepted) and ``runner.evaluate`` is
timed, trained + random-init + raw-pixel encoders with linear probe, kNN and few-label probe.
Its eval.json goes to a temporary directory, never into --workdir. Prints one JSON line:
the wall seconds, each encoder's seconds per part, accuracies and convergence.

    python experiments/run.py --flagfile=experiments/quick.flags --epochs=1 --steps_per_epoch=100 \\
        --mode=pretrain --workdir=/tmp/quick1
    python experiments/bench.py evaluation --flagfile=experiments/quick.flags --workdir=/tmp/quick1
"""
import json
import tempfile
import time

from benchmarks import prepare_run


def main(argv):
    config, prepared = prepare_run("evaluation", argv, mode="eval", allow_partial=True)
    trained_step = prepared.trained_step
    import runner
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        results = runner.evaluate(config.replace(workdir=scratch), prepared.model, prepared.splits,
                                  trained_step)
        wall = time.perf_counter() - start
    row = {"benchmark": "evaluation", "wall_s": round(wall, 2), "step": trained_step["step"]}
    for name in ("trained", "random_init", "raw_pixels"):
        if name in results:
            r = results[name]
            row[name] = {"seconds": {k: round(v, 2) for k, v in r["seconds"].items()},
                         "linear_probe_top1": r["linear_probe_top1"],
                         "linear_probe_l2": r["linear_probe_l2"],
                         "linear_probe_val_top1": r["linear_probe_val_top1"],
                         "linear_probe_converged": r["linear_probe_converged"],
                         "linear_probe_gradient_max": r.get("linear_probe_gradient_max"),
                         "linear_probe_n_iter": r.get("linear_probe_n_iter"),
                         "knn_top1": r["knn_top1"], "few_label_top1_mean": r["few_label_top1_mean"]}
    print(json.dumps(row, default=str), flush=True)
