"""Aggregating a study's finished runs: mean +- std over seeds, baseline rows, and the claims.

Per configuration: the number of seeds and mean +- std (ddof=1, over seeds) of the metrics in
METRICS (report.json's keys); the random-init and raw-pixel baselines from whichever runs
evaluated them (one per seed); and each claim "held", "did not hold" or "inconclusive".
"""
import datetime
import math
import os
import re

import numpy as np

import report
from keras_ncssl.diagnostics import collapse_threshold
from keras_ncssl.files import read_json

# Flags that define the budget: every run of a study must agree on them for a fair comparison.
BUDGET_FLAGS = ("dataset", "image_size", "encoder", "width_multiplier", "projection_dim", "batch_size",
                "epochs", "steps_per_epoch", "pretrain_limit", "lr", "weight_decay")
# (report.json key, table header, kind): "acc" values are fractions shown in %.
METRICS = ((report.LINEAR_PROBE, "linear probe (%)", "acc"),
           (report.FEW_LABEL, "few-label (%)", "acc"),
           (report.KNN, "kNN (%)", "acc"),
           (report.FINAL_PROJECTION_STD, "final projection std", "std"),
           (report.FINAL_EFFECTIVE_RANK, "effective rank of F", "rank"),
           (report.TRAIN_SECONDS, "train time (s)", "seconds"))
METRIC_KIND = {key: kind for key, _, kind in METRICS}
BASELINE_METRICS = report.ACCURACIES
_SEED_DIR = re.compile(r"^seed(\d+)$")

HELD, NOT_HELD = "held", "did not hold"
WITHIN_STD = "inconclusive (difference within one std)"
FEW_SEEDS = "inconclusive (fewer than 2 seeds: no std)"


def summarize(values):
    """{"mean", "std" (ddof=1; None below 2 values), "n", "values"} of the non-None ``values``."""
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(values)
    return {"mean": float(np.mean(values)) if n else None,
            "std": float(np.std(values, ddof=1)) if n >= 2 else None, "n": n, "values": values}


def collect(study, root):
    """{config: [(seed, report)]} for every <root>/<config>/seed<k>/report.json of the study."""
    found = {}
    for config in study["configs"]:
        directory = os.path.join(root, config["name"])
        runs = []
        for entry in (os.listdir(directory) if os.path.isdir(directory) else []):
            match = _SEED_DIR.match(entry)
            result = read_json(os.path.join(directory, entry, "report.json"), None) if match else None
            if result is not None:
                runs.append((int(match.group(1)), result))
        found[config["name"]] = sorted(runs, key=lambda item: item[0])
    return found


def baseline_rows(study, found):
    """Random-init and raw-pixel summaries, one value per seed from the first run that has it.

    The baselines depend on the seed and the architecture only (the untrained encoder is built
    with the run's seed), so any configuration's evaluation of a seed stands for all of them.
    """
    rows = {}
    for kind in report.BASELINES:
        per_seed = {}
        for config in study["configs"]:
            for seed, result in found[config["name"]]:
                baseline = (result.get("baselines") or {}).get(kind)
                if baseline and seed not in per_seed:
                    per_seed[seed] = (config["name"], baseline)
        if per_seed:
            seeds = sorted(per_seed)
            rows[kind] = {"n": len(seeds), "seeds": seeds, "from": {s: per_seed[s][0] for s in seeds},
                          "metrics": {m: summarize(per_seed[s][1].get(m) for s in seeds) for m in BASELINE_METRICS}}
    return rows


def _display_scale(metric):
    """(factor, unit) to show ``metric`` in a claim: accuracies in points, the rest as they are."""
    return (100.0, " points") if METRIC_KIND.get(metric, "acc") == "acc" else (1.0, "")


def _describe(name, summary, metric=report.LINEAR_PROBE):
    scale, _ = _display_scale(metric)
    std = "n/a" if summary["std"] is None else f"{scale * summary['std']:.2f}"
    return f"`{name}` {scale * summary['mean']:.2f} ± {std} (n={summary['n']})"


def _compare(a, b):
    """Verdict of "a >= b" for two summaries: held / did not hold / inconclusive, and the numbers."""
    difference = a["mean"] - b["mean"]
    if a["n"] < 2 or b["n"] < 2:
        return FEW_SEEDS, difference, None
    tolerance = max(a["std"], b["std"])  # "within one std": the larger of the two seed spreads
    if abs(difference) <= tolerance:
        return WITHIN_STD, difference, tolerance
    return (HELD if difference > 0 else NOT_HELD), difference, tolerance


def check_claims(study, summaries, baselines):
    """Evaluate the study's CLAIMS on the per-configuration summaries; a list of result dicts."""
    results = []
    random_init = baselines.get("random_init", {}).get("metrics", {}).get(report.LINEAR_PROBE)
    for claim in study["claims"]:
        result = {"text": claim.get("text", ""), **claim}
        if claim["kind"] == "at_least":
            result.update(_at_least_verdict(claim, summaries))
        else:
            result.update(_collapse_verdict(claim["config"], summaries.get(claim["config"]), random_init))
        results.append(result)
    return results


def _at_least_verdict(claim, summaries):
    metric = claim.get("metric", report.LINEAR_PROBE)
    a, b = (summaries.get(claim[k], {}).get("metrics", {}).get(metric) for k in ("a", "b"))
    missing = [claim[k] for k, s in (("a", a), ("b", b)) if not s or s["n"] == 0]
    if missing:
        return {"verdict": "not evaluated", "detail": f"no runs of {', '.join(missing)}"}
    verdict, difference, tolerance = _compare(a, b)
    scale, unit = _display_scale(metric)
    return {"verdict": verdict, "difference": difference, "tolerance": tolerance, "a_summary": a, "b_summary": b,
            "detail": f"{metric}: {_describe(claim['a'], a, metric)} vs {_describe(claim['b'], b, metric)}; "
                      f"difference {scale * difference:+.2f}{unit}"
                      + ("" if tolerance is None else f", one std {scale * tolerance:.2f}")}


def _collapse_verdict(name, summary, random_init):
    """Collapsed if the final projection std < diagnostics.collapse_threshold(d) = 0.1/sqrt(d) or
    the probe is not above random init.

    The std test is absolute (a collapsed representation has std ~ 0, a healthy one ~ 1/sqrt(d));
    the probe test compares seed spreads like the other claims, because a collapsed encoder still
    gets the random-init accuracy of its (partly) untrained features.
    """
    if not summary or summary["n"] == 0:
        return {"verdict": "not evaluated", "detail": f"no runs of {name}"}
    std, probe, d = (summary["metrics"][report.FINAL_PROJECTION_STD], summary["metrics"][report.LINEAR_PROBE],
                     summary["projection_dim"])
    threshold = collapse_threshold(d) if d else None
    out = {"threshold": threshold, "projection_std": std, "linear_probe": probe, "random_init": random_init}
    parts = []
    if std["mean"] is not None and threshold is not None:
        below = sum(v < threshold for v in std["values"])
        parts.append(f"final projection std {std['mean']:.4g} (threshold 0.1/sqrt({d}) = {threshold:.4g}; "
                     f"{below}/{std['n']} seeds below)")
        if std["mean"] < threshold:
            return {**out, "verdict": HELD, "detail": "; ".join(parts) + ": collapsed"}
    if not random_init or random_init["n"] == 0 or probe["n"] == 0:
        return {**out, "verdict": "inconclusive (no random-init baseline to compare the probe with)",
                "detail": "; ".join(parts)}
    difference = probe["mean"] - random_init["mean"]
    parts.append(f"linear probe {_describe(name, probe)} vs {_describe('random init', random_init)}; "
                 f"difference {100 * difference:+.2f} points")
    if difference <= 0:
        verdict = HELD  # not above the untrained encoder: nothing was learned
    elif probe["n"] < 2 or random_init["n"] < 2:
        verdict = FEW_SEEDS
    else:
        tolerance = max(probe["std"], random_init["std"])
        parts[-1] += f", one std {100 * tolerance:.2f}"
        verdict = WITHIN_STD if difference <= tolerance else NOT_HELD
    return {**out, "verdict": verdict, "detail": "; ".join(parts)}


def aggregate(study, root):
    """Summaries, baselines, claims, failures and warnings of every finished run under ``root``."""
    found = collect(study, root)
    summaries, budgets = {}, {}
    for config in study["configs"]:
        runs = found[config["name"]]
        if not runs:
            continue
        dims = {r.get("flags", {}).get("projection_dim") for _, r in runs}
        summaries[config["name"]] = {
            "n": len(runs), "seeds": [s for s, _ in runs], "flags": config["flags"],
            "description": config["description"], "projection_dim": dims.pop() if len(dims) == 1 else None,
            "metrics": {key: summarize(r.get(key) for _, r in runs) for key, _, _ in METRICS}}
        for seed, result in runs:
            budget = tuple((k, result.get("flags", {}).get(k)) for k in BUDGET_FLAGS)
            budgets.setdefault(budget, []).append(f"{config['name']}/seed{seed}")
    baselines = baseline_rows(study, found)
    warnings = []
    if len(budgets) > 1:  # the claims compare configurations at one budget
        for budget, runs in budgets.items():
            changed = ", ".join(f"{k}={v}" for k, v in budget)
            warnings.append(f"runs differ in budget: {changed}: {', '.join(runs)}")
    status = read_json(os.path.join(root, "sweep_status.json"), {})
    names = {c["name"] for c in study["configs"]}
    failures = [{"run": key, **record} for key, record in sorted(status.items())
                if record.get("status") in ("failed", "mismatch") and key.split("/")[0] in names
                and not os.path.exists(os.path.join(root, key, "report.json"))]
    return {"study": study["name"], "description": study["description"], "root": os.path.abspath(root),
            "generated": datetime.datetime.now().isoformat(timespec="seconds"),
            "budget": dict(next(iter(budgets))) if len(budgets) == 1 else None,
            "configs": summaries, "baselines": baselines, "claims": check_claims(study, summaries, baselines),
            "failures": failures, "not_run": [c["name"] for c in study["configs"] if c["name"] not in summaries],
            "warnings": warnings}
