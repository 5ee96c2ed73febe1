"""experiments/sweep.py and its modules: a tiny study end to end, resuming, dry run, failures,
refused workdirs, aggregation maths, claims."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import claims
import results_md
import study as study_lib
import sweep_runs
from claims import FEW_SEEDS, HELD, NOT_HELD, WITHIN_STD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "experiments", "sweep.py")
TINY_STUDY = os.path.join(ROOT, "tests", "sweep_tiny_study.py")  # a test-only study

# The smallest budget that still runs every stage (tests/test_runner.py's TINY, one short epoch).
TINY = ["--dataset=digits", "--image_size=16", "--channels=1", "--width_multiplier=0.25", "--projector_hidden=64",
        "--projection_dim=16", "--predictor_hidden=32", "--batch_size=32", "--epochs=1", "--steps_per_epoch=3",
        "--knn_monitor_every=0", "--few_label_draws=2", "--knn_k=20", "--verbose=0"]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def aggregate(study, root):
    """What sweep.py does after the runs: aggregate, then write results.md/json."""
    results = claims.aggregate(study, str(root))
    results_md.write(results, str(root))
    return results


def run_sweep(*args, timeout=600):
    return subprocess.run([sys.executable, SWEEP, "--base_flagfile=experiments/quick.flags", *args], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def table_row(markdown, name):
    """The cells of the results.md table row of ``name``."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, (name, markdown)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.slow
def test_tiny_study_runs_aggregates_and_skips_finished_runs(tmp_path):
    root = tmp_path / "sweep"
    # Two --extra forms: one value holding several flags, and a repeated flag.
    extra = [f"--extra={' '.join(TINY[:-1])}", f"--extra={TINY[-1]}"]
    first = run_sweep(f"--study={TINY_STUDY}", f"--root={root}", "--seeds=0", *extra)
    assert first.returncode == 0, first.stdout + first.stderr
    reports = [root / name / "seed0" / "report.json" for name in ("directpred", "sgd_linear")]
    assert all(path.exists() for path in reports)
    assert "--dataset=digits" in (root / "directpred" / "seed0" / "run.log").read_text()
    markdown = (root / "results.md").read_text()
    for name in ("directpred", "sgd_linear"):
        row = table_row(markdown, name)
        assert row[1] == "1" and row[2].endswith("± n/a"), row  # one seed: no std
    # Only `directpred` evaluates the baselines; the random-init row comes from it.
    assert table_row(markdown, "random init (untrained encoder)")[1] == "1"
    results = json.loads((root / "results.json").read_text())
    assert results["baselines"]["random_init"]["from"] == {"0": "directpred"}
    assert results["claims"][0]["verdict"] == FEW_SEEDS
    assert results["budget"]["dataset"] == "digits" and not results["failures"]

    # The same command again: nothing reruns, the reports are untouched, results are rewritten.
    mtimes = [path.stat().st_mtime_ns for path in reports]
    log_size = (root / "directpred" / "seed0" / "run.log").stat().st_size
    again = run_sweep(f"--study={TINY_STUDY}", f"--root={root}", "--seeds=0", *extra, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped (report.json exists)") == 2, again.stdout
    assert [path.stat().st_mtime_ns for path in reports] == mtimes
    assert (root / "directpred" / "seed0" / "run.log").stat().st_size == log_size
    assert "skipped" in (root / "sweep.log").read_text()

    # A different budget on the same root is refused (run.py would refuse it too), not mixed in.
    changed = run_sweep(f"--study={TINY_STUDY}", f"--root={root}", "--seeds=0", *extra, "--extra=--epochs=2",
                        "--only=sgd_linear", timeout=120)
    assert changed.returncode == 1 and "--epochs: workdir has 1, this command asks 2" in changed.stdout
    assert [path.stat().st_mtime_ns for path in reports] == mtimes


@pytest.mark.slow
def test_dry_run_prints_commands_and_runs_nothing(tmp_path):
    root = tmp_path / "sweep"
    result = run_sweep("--study=paper_claims", f"--root={root}", "--seeds=0,1", "--only=directpred,no_predictor",
                       "--extra=--epochs=2", "--dry_run", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "run.py" in line]
    assert len(lines) == 4  # 2 configurations x 2 seeds
    assert "--predictor=none" in lines[1] and "--seed=1" in lines[3] and all("--epochs=2" in line for line in lines)
    assert f"--workdir={root}/no_predictor/seed1" in lines[3]
    assert not root.exists()


def test_plan_is_seed_major_and_a_dry_run_writes_nothing(tmp_path):
    root = tmp_path / "sweep"
    study = study_lib.load_study("paper_claims")
    runs = sweep_runs.plan(study, "quick.flags", str(root), [0, 1], only=["directpred", "no_predictor"],
                           extra=["--epochs=2"])
    assert [(r["config"], r["seed"]) for r in runs] == [("directpred", 0), ("no_predictor", 0),
                                                        ("directpred", 1), ("no_predictor", 1)]
    # The training flags are run.py's resolved values: the base, then the configuration, then --extra.
    assert runs[1]["training"]["predictor"] == "none" and all(r["training"]["epochs"] == 2 for r in runs)
    assert runs[3]["training"]["seed"] == 1 and runs[3]["command"][-1] == f"--workdir={root}/no_predictor/seed1"
    lines = []
    results = sweep_runs.sweep(runs, str(root), dry_run=True, echo=lines.append)
    assert {r["status"] for r in results.values()} == {"pending"} and len(lines) == 4
    assert not root.exists()


def test_plan_refuses_a_configuration_run_py_would_refuse(tmp_path):
    study = {"name": "s", "configs": [{"name": "bad", "flags": ["--rho=1.5"], "description": ""}], "claims": []}
    with pytest.raises(ValueError, match=re.escape("configuration bad (seed 0): --rho=1.5: must be in [0, 1)")):
        sweep_runs.plan(study, "quick.flags", str(tmp_path), [0])
    with pytest.raises(ValueError, match="--seed is set by the sweep itself"):
        sweep_runs.plan(study, "quick.flags", str(tmp_path), [0], extra=["--seed=3"])


def test_a_failed_run_is_recorded_with_its_log_and_the_sweep_goes_on(tmp_path):
    root = tmp_path / "sweep"
    runs = [{"config": name, "seed": 0, "workdir": str(root / name / "seed0"), "training": {},
             "command": ["sh", "-c", f"echo {name} went wrong; exit {code}"]} for name, code in (("a", 3), ("b", 4))]
    lines = []
    results = sweep_runs.sweep(runs, str(root), echo=lines.append)
    assert [results[k]["status"] for k in ("a/seed0", "b/seed0")] == ["failed", "failed"]
    status = json.loads((root / "sweep_status.json").read_text())
    assert status["b/seed0"]["returncode"] == 4 and status["a/seed0"]["log_tail"][-1] == "a went wrong"
    assert "went wrong" in (root / "a" / "seed0" / "run.log").read_text()
    study = {"name": "s", "description": "", "configs": [{"name": n, "flags": [], "description": ""} for n in "ab"],
             "claims": []}
    markdown = results_md.markdown(claims.aggregate(study, str(root)))
    assert "## Failed or refused runs" in markdown and "`b/seed0`: exit code 4" in markdown


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    (tmp_path / "empty").mkdir()  # a data directory without the data: run.py fails on each run
    study = tmp_path / "broken.json"
    study.write_text(json.dumps({"configs": [{"name": "bad_a", "flags": ["--dataset=cifar10"]},
                                             {"name": "bad_b", "flags": ["--dataset=cifar100"]}]}))
    root = tmp_path / "sweep"
    result = run_sweep(f"--study={study}", f"--root={root}", "--seeds=0", f"--extra=--data_dir={tmp_path / 'empty'}",
                       timeout=300)
    assert result.returncode == 1 and result.stdout.count("FAILED (exit code") == 2, result.stdout
    status = json.loads((root / "sweep_status.json").read_text())
    assert status["bad_b/seed0"]["status"] == "failed" and status["bad_b/seed0"]["returncode"] == 2
    assert any("cifar10" in line for line in status["bad_a/seed0"]["log_tail"])
    markdown = (root / "results.md").read_text()
    assert "## Failed or refused runs" in markdown and "`bad_b/seed0`: exit code" in markdown


@pytest.mark.slow
def test_a_sweep_flag_error_names_the_fix(tmp_path):
    result = run_sweep("--study=nope", f"--root={tmp_path}", timeout=60)
    assert result.returncode == 2 and "--study=nope: no such study" in result.stderr
    wrong = run_sweep("--epochs=2", f"--root={tmp_path}", timeout=60)
    assert wrong.returncode != 0 and "--extra=--epochs=VALUE" in wrong.stderr


def _report(lp, few, knn, std, rank, seconds, d=64, epochs=4, random_init=None):
    report = {"linear_probe_top1": lp, "few_label_top1_mean": few, "knn_top1": knn, "final_projection_std": std,
              "final_effective_rank": rank, "train_seconds": seconds, "baselines": {},
              "flags": {"projection_dim": d, "epochs": epochs, "dataset": "fashion_mnist"}}
    if random_init is not None:
        report["baselines"]["random_init"] = {"linear_probe_top1": random_init, "few_label_top1_mean": 0.5,
                                              "knn_top1": 0.6}
    return report


def _write(root, config, seed, report):
    directory = root / config / f"seed{seed}"
    directory.mkdir(parents=True)
    (directory / "report.json").write_text(json.dumps(report))


def test_aggregation_matches_numpy_and_checks_claims(tmp_path):
    root = tmp_path / "sweep"
    study = study_lib.load_study("paper_claims")
    directpred = {"lp": [0.80, 0.81, 0.82], "few": [0.60, None, 0.64], "knn": [0.70, 0.72, 0.71]}
    for seed in range(3):
        # Baselines in seeds 0 and 1 from `directpred`, seed 2 from `sgd_linear` ("whichever has it").
        _write(root, "directpred", seed, _report(directpred["lp"][seed], directpred["few"][seed],
                                                 directpred["knn"][seed], 0.11, 20.0 + seed, 100.0 + seed,
                                                 random_init=[0.50, 0.52, None][seed]))
        _write(root, "sgd_linear", seed, _report(0.75 + 0.005 * seed, 0.55, 0.65, 0.1, None, 90.0,
                                                 random_init=[0.99, 0.99, 0.54][seed]))  # seeds 0, 1 already had one
        _write(root, "no_predictor", seed, _report(0.70, 0.5, 0.6, 0.001 * (seed + 1), 1.0, 80.0))
        _write(root, "symmetric_no_ema", seed, _report(0.78 + 0.002 * seed, 0.5, 0.6, 0.1, 3.0, 80.0))
        _write(root, "directpred_eps0", seed, _report([0.80, 0.815, 0.805][seed], 0.6, 0.7, 0.1, 20.0, 100.0))
    _write(root, "directcopy", 0, _report(0.79, 0.6, 0.7, 0.1, 18.0, 100.0))  # one seed only
    (root / "mlp_predictor" / "seed0").mkdir(parents=True)  # an unfinished run: no report.json

    results = aggregate(study, root)
    dp = results["configs"]["directpred"]
    assert dp["n"] == 3 and dp["seeds"] == [0, 1, 2]
    lp = dp["metrics"]["linear_probe_top1"]
    assert math.isclose(lp["mean"], np.mean(directpred["lp"]))
    assert math.isclose(lp["std"], np.std(directpred["lp"], ddof=1))
    few = dp["metrics"]["few_label_top1_mean"]
    assert few["n"] == 2 and math.isclose(few["std"], np.std([0.60, 0.64], ddof=1))
    assert results["configs"]["sgd_linear"]["metrics"]["final_effective_rank"]["n"] == 0
    directcopy = results["configs"]["directcopy"]
    assert directcopy["n"] == 1 and directcopy["metrics"]["knn_top1"]["std"] is None
    assert "mlp_predictor" in results["not_run"] and "mlp_predictor" not in results["configs"]
    random_init = results["baselines"]["random_init"]
    assert random_init["from"] == {0: "directpred", 1: "directpred", 2: "sgd_linear"}
    assert math.isclose(random_init["metrics"]["linear_probe_top1"]["mean"], np.mean([0.50, 0.52, 0.54]))

    verdicts = {(c.get("a"), c.get("b"), c.get("config")): c for c in results["claims"]}
    assert verdicts[("directpred", "sgd_linear", None)]["verdict"] == HELD  # +5.5 points, std 0.01
    no_predictor = verdicts[(None, None, "no_predictor")]
    assert no_predictor["verdict"] == HELD and "3/3 seeds below" in no_predictor["detail"]
    assert math.isclose(no_predictor["threshold"], 0.1 / 8)
    # Healthy std (0.1 > 0.0125) and a probe 26 points above random init: no collapse.
    assert verdicts[(None, None, "symmetric_no_ema")]["verdict"] == NOT_HELD
    eps = verdicts[("directpred", "directpred_eps0", None)]
    eps0 = results["configs"]["directpred_eps0"]["metrics"]["linear_probe_top1"]
    assert abs(lp["mean"] - eps0["mean"]) <= max(lp["std"], eps0["std"])  # +0.33 points, std 1.0
    assert eps["verdict"] == WITHIN_STD and math.isclose(eps["difference"], lp["mean"] - eps0["mean"])

    markdown = (root / "results.md").read_text()
    row = table_row(markdown, "directpred")
    assert row[1] == "3" and row[2] == f"{100 * lp['mean']:.2f} ± {100 * lp['std']:.2f}"
    assert row[3].endswith("(n=2)")  # few-label missing in one seed
    assert table_row(markdown, "directcopy")[1] == "1"
    assert table_row(markdown, "random init (untrained encoder)")[1] == "3"
    assert f"**{WITHIN_STD}**: DirectPred eps=0.1 >= eps=0" in markdown
    assert json.loads((root / "results.json").read_text())["configs"]["directpred"]["n"] == 3


def test_collapse_claim_from_the_probe_and_mixed_budgets(tmp_path):
    study = {"name": "s", "description": "", "configs": [{"name": n, "flags": [], "description": ""}
                                                          for n in ("a", "b")],
             "claims": [{"kind": "collapse", "config": "b", "text": "b collapses"}]}
    root = tmp_path / "sweep"
    for seed in range(2):
        _write(root, "a", seed, _report(0.8, 0.6, 0.7, 0.1, 10.0, 1.0, random_init=0.50 + 0.01 * seed))
        # Healthy std but a probe below random init: collapsed in the sense of the claim.
        _write(root, "b", seed, _report(0.49, 0.4, 0.4, 0.1, 10.0, 1.0, epochs=4 + seed))
    results = aggregate(study, root)
    assert results["claims"][0]["verdict"] == HELD and "difference -1.50 points" in results["claims"][0]["detail"]
    assert results["budget"] is None and any("differ in budget" in w for w in results["warnings"])


def test_a_workdir_is_compared_by_resolved_values(tmp_path):
    base = ["--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags")]
    workdir = tmp_path / "run"
    workdir.mkdir()
    saved = sweep_runs.training_flags(base + ["--rho=0.3", "--eps=0.1", "--ema=true", "--epochs=4"])
    del saved["stem_stride"]  # a workdir made before the flag existed: its default there
    (workdir / "flags.json").write_text(json.dumps({"training": saved}))

    def problems(*args):
        training = sweep_runs.training_flags(base + list(args))
        return sweep_runs.mismatches({"workdir": str(workdir), "training": training})

    assert problems("--rho=0.30", "--eps=1e-1", "--ema", "--epochs=4", "--verbose=2") == []
    bad = problems("--noema", "--eps=0", "--epochs=5", "--stem_stride=1", "--projection_dim=32")
    assert [line.split(":")[0] for line in bad] == ["--ema", "--epochs", "--eps", "--projection_dim", "--stem_stride"]
    assert "--eps: workdir has 0.1, this command asks 0.0" in bad


def test_eo_ridge_study_is_directpred_with_each_rule_at_its_best_ridge(tmp_path):
    study = study_lib.load_study("eo_ridge")
    reference = study_lib.load_study("paper_claims")["configs"][0]
    assert reference["name"] == "directpred"
    configs = {c["name"]: c["flags"] for c in study["configs"]}
    assert configs["directpred"] == reference["flags"]
    eo = {name: flags for name, flags in configs.items() if "_ridge" in name}
    assert len(eo) == 9
    for name, flags in eo.items():
        rule, alpha = name.split("_ridge")
        changed = {flag for flag in flags if flag not in reference["flags"]}
        assert changed == {f"--predictor={rule}", f"--eps={alpha}", "--eval_baselines=false"}, name
        claim = next(c for c in study["claims"] if c.get("a") == name)
        assert claim["b"] == "directpred" and claim["metric"] == "final_effective_rank"

    # An effective-rank claim is shown in rank units, not as a percentage.
    root = tmp_path / "sweep"
    for seed in range(2):
        _write(root, "directpred", seed, _report(0.8, 0.6, 0.7, 0.1, 5.0 + seed, 1.0))
        _write(root, "stiefel_ridge0.3", seed, _report(0.8, 0.6, 0.7, 0.1, 2.0 + seed, 1.0))
    claim = next(c for c in claims.aggregate(study, str(root))["claims"]
                 if c.get("a") == "stiefel_ridge0.3")
    assert claim["verdict"] == NOT_HELD
    assert "`stiefel_ridge0.3` 2.50 ± 0.71 (n=2) vs `directpred` 5.50 ± 0.71" in claim["detail"]
    assert "difference -3.00, one std 0.71" in claim["detail"]
