"""Run a study (named configurations x seeds) with experiments/run.py, then aggregate the reports.

    python experiments/sweep.py --study=paper_claims --base_flagfile=experiments/quick.flags \
        --root=runs/sweep --seeds=0,1,2
    python experiments/sweep.py ... --only=directpred,sgd_linear --extra=--epochs=2
    python experiments/sweep.py ... --dry_run          # print the commands, run nothing
    python experiments/sweep.py ... --aggregate_only   # only rewrite results.md / results.json

Every run has its own work directory ``<root>/<config>/seed<k>`` and is one subprocess

    python experiments/run.py --flagfile=<base> <config flags> <extra flags> --seed=<k> --workdir=<dir>

(absl: later flags win, so --extra overrides the configuration, which overrides the base).
Its output is appended to ``<dir>/run.log``. Runs go one at a time, seed-major (every
configuration of seed 0, then of seed 1, ...) so that an interrupted sweep has already covered
every configuration once.

Resuming: rerun the same command. A run whose report.json exists is skipped; any other run is
started again with the same command, and run.py resumes it from its newest checkpoint. A run
whose directory was made with different training flags (a changed --extra or base flagfile) is
reported as a mismatch and not touched. A failed run is recorded in
``<root>/sweep_status.json`` (exit code, last lines of its log) and the sweep goes on; the exit
code of the sweep is 1 when any run failed.

Aggregation writes ``<root>/results.md`` and ``<root>/results.json``: per configuration the
number of seeds and mean +- std (ddof=1, over seeds) of the linear probe, few-label probe and
kNN accuracies, the final projection std, the effective rank of F and the train time; the
random-init and raw-pixel baseline rows from whichever runs evaluated them (one per seed); and
the study's claims, each "held", "did not hold" or "inconclusive".

A study is a module in experiments/studies/ (``--study=paper_claims``) or a path to a .py or
.json file that defines CONFIGS (list of {"name", "flags", "description"}) and optionally CLAIMS
and DESCRIPTION; see experiments/studies/paper_claims.py.
"""
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

_HERE = os.path.dirname(os.path.abspath(__file__))
RUN_PY = os.path.join(_HERE, "run.py")
STUDIES_DIR = os.path.join(_HERE, "studies")

# Flags the sweep itself sets per run; a study or --extra that sets them would break the layout
# (--workdir, --seed), the base (--flagfile) or the "report.json means done" rule (--mode).
OWNED_FLAGS = ("workdir", "seed", "flagfile", "mode")
# Flags that define the budget: every run of a study must agree on them for a fair comparison.
BUDGET_FLAGS = ("dataset", "image_size", "encoder", "width_multiplier", "projection_dim", "batch_size",
                "epochs", "steps_per_epoch", "pretrain_limit", "lr", "weight_decay")
# (report.json key, table header, kind): "acc" values are fractions shown in %.
METRICS = (("linear_probe_top1", "linear probe (%)", "acc"),
           ("few_label_top1_mean", "few-label (%)", "acc"),
           ("knn_top1", "kNN (%)", "acc"),
           ("final_projection_std", "final projection std", "std"),
           ("final_effective_rank", "effective rank of F", "rank"),
           ("train_seconds", "train time (s)", "seconds"))
_METRIC_KIND = {key: kind for key, _, kind in METRICS}
BASELINE_METRICS = ("linear_probe_top1", "few_label_top1_mean", "knn_top1")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SEED_DIR = re.compile(r"^seed(\d+)$")

HELD, NOT_HELD = "held", "did not hold"
WITHIN_STD = "inconclusive (difference within one std)"
FEW_SEEDS = "inconclusive (fewer than 2 seeds: no std)"


# -- studies -----------------------------------------------------------------------------------

def load_study(spec):
    """The study named ``spec`` (experiments/studies/<spec>.py) or at a .py/.json path, validated.

    Returns {"name", "description", "configs": [{"name", "flags", "description"}], "claims"}.
    """
    path = spec if spec.endswith((".py", ".json")) else os.path.join(STUDIES_DIR, spec + ".py")
    if not os.path.exists(path):
        known = sorted(f[:-3] for f in os.listdir(STUDIES_DIR) if f.endswith(".py") and not f.startswith("_"))
        raise ValueError(f"--study={spec}: no such study ({path}); known: {', '.join(known)}, "
                         "or give a path to a .py/.json study file.")
    name = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".json"):
        with open(path) as handle:
            raw = json.load(handle)
        raw = {key.upper(): value for key, value in raw.items()}
    else:
        module_spec = importlib.util.spec_from_file_location(f"_sweep_study_{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        raw = vars(module)
    configs = [dict(name=c["name"], flags=list(c.get("flags", [])), description=c.get("description", ""))
               for c in raw.get("CONFIGS", [])]
    study = {"name": name, "description": raw.get("DESCRIPTION", ""), "configs": configs,
             "claims": list(raw.get("CLAIMS", []))}
    _validate_study(study, path)
    return study


def _validate_study(study, path):
    if not study["configs"]:
        raise ValueError(f"study {path} defines no CONFIGS.")
    names = [c["name"] for c in study["configs"]]
    for config in study["configs"]:
        if not _NAME.match(config["name"]):
            raise ValueError(f"study {path}: configuration name {config['name']!r} is not a safe directory name.")
        _check_flags(config["flags"], f"study {path}, configuration {config['name']}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"study {path}: duplicate configuration names {duplicates}.")
    for claim in study["claims"]:
        needed = [claim.get("config")] if claim.get("kind") == "collapse" else [claim.get("a"), claim.get("b")]
        if claim.get("kind") not in ("at_least", "collapse") or any(n not in names for n in needed):
            raise ValueError(f"study {path}: claim {claim!r} needs kind at_least (a, b, metric) or collapse "
                             f"(config) over configurations of the study ({', '.join(names)}).")


def _check_flags(args, where):
    for arg in args:
        if not arg.startswith("--"):
            raise ValueError(f"{where}: {arg!r} is not a --flag (run.py takes flags only).")
        name = arg[2:].split("=", 1)[0]
        if name in OWNED_FLAGS:
            raise ValueError(f"{where}: --{name} is set by the sweep itself; remove it.")


# -- flag bookkeeping (to refuse a workdir that belongs to a different command) -----------------

def resolve_flagfile(path):
    """``stl10.flags`` means experiments/stl10.flags when it is not a path from here (as run.py)."""
    if not os.path.exists(path) and os.path.exists(os.path.join(_HERE, path)):
        path = os.path.join(_HERE, path)
    if not os.path.exists(path):
        raise ValueError(f"--base_flagfile={path}: no such file.")
    return os.path.abspath(path)


def read_flagfile(path):
    """The --flags of an absl flagfile, nested --flagfile lines expanded, comments dropped."""
    args = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith(("#", "//")):
                continue
            if line.startswith("--flagfile="):
                args += read_flagfile(resolve_flagfile(line.split("=", 1)[1]))
            else:
                args.append(line)
    return args


def _parse_bool(text):
    text = str(text).strip().lower()
    if text in ("true", "t", "1", "yes", "y"):
        return True
    if text in ("false", "f", "0", "no", "n"):
        return False
    return None


def _same_value(text, saved):
    """Does the command-line ``text`` give the value run.py saved as ``saved``?"""
    if isinstance(saved, bool):
        return _parse_bool(text) == saved
    if saved is None:
        return str(text).strip().lower() in ("none", "")
    if isinstance(saved, (int, float)):
        try:
            return math.isclose(float(text), float(saved), rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            return False
    return str(text) == str(saved)


def flag_mismatches(args, training):
    """``--name: command gives X, workdir has Y`` for every training flag ``args`` set differently.

    ``args`` is the run's full argument list with the base flagfile expanded; ``training`` the
    workdir's flags.json "training" dict. Flags not in ``training`` (evaluation, logging) may
    change between invocations, as in run.py itself.
    """
    given = {}
    for arg in args:
        body = arg[2:]
        name, value = body.split("=", 1) if "=" in body else (body, "true")
        if name not in training and name.startswith("no") and name[2:] in training and "=" not in body:
            name, value = name[2:], "false"
        given[name] = value  # later flags win, as in absl
    return [f"--{name}: this command gives {value!r}, the workdir has {training[name]!r}"
            for name, value in sorted(given.items()) if name in training and not _same_value(value, training[name])]


# -- running -----------------------------------------------------------------------------------

def plan(study, base_flagfile, root, seeds, only=None, extra=(), python=sys.executable):
    """The runs of the sweep, seed-major: a list of dicts {config, seed, workdir, command, args}."""
    configs = study["configs"]
    if only:
        names = [c["name"] for c in configs]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"--only: {unknown} not in study {study['name']} ({', '.join(names)}).")
        configs = [c for c in configs if c["name"] in only]
    extra = list(extra)
    _check_flags(extra, "--extra")
    base = resolve_flagfile(base_flagfile)
    base_args = read_flagfile(base)
    runs = []
    for seed in seeds:
        for config in configs:
            workdir = os.path.abspath(os.path.join(root, config["name"], f"seed{seed}"))
            own = config["flags"] + extra + [f"--seed={seed}"]
            runs.append({"config": config["name"], "seed": int(seed), "workdir": workdir,
                         "command": [python, RUN_PY, f"--flagfile={base}", *own, f"--workdir={workdir}"],
                         "args": base_args + own})
    return runs


def _log_tail(path, start, lines):
    """The last ``lines`` non-empty lines written to ``path`` after byte ``start``."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(start, handle.tell() - 65536))
        text = handle.read().decode("utf-8", errors="replace")
    # Keras progress bars redraw with \r: each redraw counts as a line.
    return [line for line in text.replace("\r", "\n").split("\n") if line.strip()][-lines:]


def execute(run, stream=False, tail_lines=25):
    """Run one command, appending its output to <workdir>/run.log; returns (exit code, tail lines)."""
    os.makedirs(run["workdir"], exist_ok=True)
    log_path = os.path.join(run["workdir"], "run.log")
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # unbuffered: the log follows the run live
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log_path, "ab") as log:
        start = log.tell()
        log.write(f"\n### sweep {datetime.datetime.now().isoformat(timespec='seconds')}: "
                  f"{shlex.join(run['command'])}\n".encode())
        log.flush()
        process = subprocess.Popen(run["command"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            for chunk in iter(lambda: process.stdout.read1(65536), b""):
                log.write(chunk)
                log.flush()
                if stream:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
            returncode = process.wait()
        except BaseException:
            # Ctrl-C reaches the child too (same process group); make sure it is gone before we
            # exit, so the next sweep does not race a half-dead run for the same checkpoint.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
    return returncode, _log_tail(log_path, start, tail_lines)


def _write_json_atomic(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(payload, handle, indent=1, default=float)
    os.replace(path + ".tmp", path)


def _read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as handle:
        return json.load(handle)


def sweep(runs, root, dry_run=False, stream=False, echo=print):
    """Run (or with ``dry_run`` print) every unfinished run; returns the per-run status dict.

    Progress lines go to ``echo`` and, unless ``dry_run``, to <root>/sweep.log.
    """
    status_path = os.path.join(root, "sweep_status.json")
    status = _read_json(status_path, {})
    log = None if dry_run else open(os.path.join(_makedirs(root), "sweep.log"), "a")

    def say(message):
        echo(message)
        if log:
            log.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {message}\n")
            log.flush()

    results = {}
    try:
        for index, run in enumerate(runs, 1):
            key = f"{run['config']}/seed{run['seed']}"
            label = f"[{index}/{len(runs)}] {key}"
            saved = _read_json(os.path.join(run["workdir"], "flags.json"))
            problems = flag_mismatches(run["args"], saved.get("training", {})) if saved else []
            record = {"command": shlex.join(run["command"]), "workdir": run["workdir"]}
            if problems:
                record.update(status="mismatch", problems=problems)
                say(f"{label}: NOT RUN: {run['workdir']} belongs to a different command:\n  " + "\n  ".join(problems)
                    + "\n  (use another --root, or repeat the original --extra / --base_flagfile)")
            elif os.path.exists(os.path.join(run["workdir"], "report.json")):
                record.update(status="ok", skipped=True)
                say(f"{label}: skipped (report.json exists)")
            elif dry_run:
                record.update(status="pending")
                say(f"{label}: {'resume' if saved else 'run'}: {record['command']}")
            else:
                say(f"{label}: {'resuming' if saved else 'running'} (log: {run['workdir']}/run.log)")
                began = time.time()
                try:
                    returncode, tail = execute(run, stream=stream)
                except KeyboardInterrupt:
                    status[key] = {**status.get(key, {}), **record, "status": "interrupted"}
                    _write_json_atomic(status_path, status)
                    say(f"{label}: interrupted; rerun the same command to resume it from its checkpoint")
                    raise
                record.update(returncode=returncode, seconds=round(time.time() - began, 1),
                              finished=datetime.datetime.now().isoformat(timespec="seconds"))
                if returncode == 0 and os.path.exists(os.path.join(run["workdir"], "report.json")):
                    record.update(status="ok")
                    say(f"{label}: done in {record['seconds']:.0f} s")
                else:
                    record.update(status="failed", log_tail=tail)
                    say(f"{label}: FAILED (exit code {returncode}) after {record['seconds']:.0f} s; last lines:\n    "
                        + "\n    ".join(tail[-8:]))
            results[key] = record
            if not dry_run:
                status[key] = {**status.get(key, {}), **record}
                for stale in ("log_tail", "problems", "skipped"):  # details of an earlier attempt
                    if stale not in record:
                        status[key].pop(stale, None)
                _write_json_atomic(status_path, status)  # after every run: survives an interrupt
    finally:
        if log:
            log.close()
    return results


def _makedirs(path):
    os.makedirs(path, exist_ok=True)
    return path


# -- aggregation -------------------------------------------------------------------------------

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
            report = _read_json(os.path.join(directory, entry, "report.json")) if match else None
            if report is not None:
                runs.append((int(match.group(1)), report))
        found[config["name"]] = sorted(runs, key=lambda item: item[0])
    return found


def baseline_rows(study, found):
    """Random-init and raw-pixel summaries, one value per seed from the first run that has it.

    The baselines depend on the seed and the architecture only (the untrained encoder is built
    with the run's seed), so any configuration's evaluation of a seed stands for all of them.
    """
    rows = {}
    for kind in ("random_init", "raw_pixels"):
        per_seed = {}
        for config in study["configs"]:
            for seed, report in found[config["name"]]:
                result = (report.get("baselines") or {}).get(kind)
                if result and seed not in per_seed:
                    per_seed[seed] = (config["name"], result)
        if per_seed:
            seeds = sorted(per_seed)
            rows[kind] = {"n": len(seeds), "seeds": seeds, "from": {s: per_seed[s][0] for s in seeds},
                          "metrics": {m: summarize(per_seed[s][1].get(m) for s in seeds) for m in BASELINE_METRICS}}
    return rows


def _fmt(summary, kind, n_runs=None):
    if summary is None or summary["mean"] is None:
        return "–"
    scale, digits = {"acc": (100.0, 2), "std": (1.0, 4), "rank": (1.0, 2), "seconds": (1.0, 1)}[kind]
    std = "n/a" if summary["std"] is None else f"{scale * summary['std']:.{digits}f}"
    text = f"{scale * summary['mean']:.{digits}f} ± {std}"
    if n_runs is not None and summary["n"] != n_runs:  # some runs lack this metric
        text += f" (n={summary['n']})"
    return text


def _display_scale(metric):
    """(factor, unit) to show ``metric`` in a claim: accuracies in points, the rest as they are."""
    return (100.0, " points") if _METRIC_KIND.get(metric, "acc") == "acc" else (1.0, "")


def _describe(name, summary, metric="linear_probe_top1"):
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
    random_init = baselines.get("random_init", {}).get("metrics", {}).get("linear_probe_top1")
    for claim in study["claims"]:
        result = {"text": claim.get("text", ""), **claim}
        if claim["kind"] == "at_least":
            metric = claim.get("metric", "linear_probe_top1")
            a, b = (summaries.get(claim[k], {}).get("metrics", {}).get(metric) for k in ("a", "b"))
            missing = [claim[k] for k, s in (("a", a), ("b", b)) if not s or s["n"] == 0]
            if missing:
                result.update(verdict="not evaluated", detail=f"no runs of {', '.join(missing)}")
            else:
                verdict, difference, tolerance = _compare(a, b)
                scale, unit = _display_scale(metric)
                result.update(verdict=verdict, difference=difference, tolerance=tolerance,
                              a_summary=a, b_summary=b,
                              detail=f"{metric}: {_describe(claim['a'], a, metric)} vs "
                                     f"{_describe(claim['b'], b, metric)}; difference {scale * difference:+.2f}{unit}"
                                     + ("" if tolerance is None else f", one std {scale * tolerance:.2f}"))
        else:
            result.update(_collapse_verdict(claim["config"], summaries.get(claim["config"]), random_init))
        results.append(result)
    return results


def _collapse_verdict(name, summary, random_init):
    """Collapsed if the final projection std < 0.1/sqrt(d) or the probe is not above random init.

    The std test is absolute (a collapsed representation has std ~ 0, a healthy one ~ 1/sqrt(d));
    the probe test compares seed spreads like the other claims, because a collapsed encoder still
    gets the random-init accuracy of its (partly) untrained features.
    """
    if not summary or summary["n"] == 0:
        return {"verdict": "not evaluated", "detail": f"no runs of {name}"}
    std, probe, d = (summary["metrics"]["final_projection_std"], summary["metrics"]["linear_probe_top1"],
                     summary["projection_dim"])
    threshold = 0.1 / math.sqrt(d) if d else None
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


def aggregate(study, root, write=True):
    """Summaries, baselines and claims of every finished run under ``root``; writes results.md/json."""
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
        for seed, report in runs:
            budget = tuple((k, report.get("flags", {}).get(k)) for k in BUDGET_FLAGS)
            budgets.setdefault(budget, []).append(f"{config['name']}/seed{seed}")
    baselines = baseline_rows(study, found)
    claims = check_claims(study, summaries, baselines)
    warnings = []
    if len(budgets) > 1:  # the claims compare configurations at one budget
        for budget, runs in budgets.items():
            changed = ", ".join(f"{k}={v}" for k, v in budget)
            warnings.append(f"runs differ in budget: {changed}: {', '.join(runs)}")
    status = _read_json(os.path.join(root, "sweep_status.json"), {})
    names = {c["name"] for c in study["configs"]}
    failures = [{"run": key, **record} for key, record in sorted(status.items())
                if record.get("status") in ("failed", "mismatch") and key.split("/")[0] in names
                and not os.path.exists(os.path.join(root, key, "report.json"))]
    results = {"study": study["name"], "description": study["description"], "root": os.path.abspath(root),
               "generated": datetime.datetime.now().isoformat(timespec="seconds"),
               "budget": dict(next(iter(budgets))) if len(budgets) == 1 else None,
               "configs": summaries, "baselines": baselines, "claims": claims, "failures": failures,
               "not_run": [c["name"] for c in study["configs"] if c["name"] not in summaries],
               "warnings": warnings}
    if write:
        _write_json_atomic(os.path.join(root, "results.json"), results)
        path = os.path.join(root, "results.md")
        with open(path + ".tmp", "w") as handle:
            handle.write(markdown(results))
        os.replace(path + ".tmp", path)
    return results


def markdown(results):
    """results.md: the table, the claims, the configurations, failures and warnings."""
    lines = [f"# Sweep results: {results['study']}", ""]
    if results["description"]:
        lines += [results["description"], ""]
    if results["budget"]:
        lines += ["Budget (every run): " + ", ".join(f"{k}={v}" for k, v in results["budget"].items()
                                                  if v is not None) + ".", ""]
    lines += ["Mean ± std over seeds (std with ddof=1; n/a below 2 seeds). Accuracies are % on the test split; "
              "few-label is each seed's mean over its label draws, then mean ± std over seeds. "
              "– = not recorded (the runner measures F only for closed-form predictors).", "",
              "| configuration | n seeds | " + " | ".join(header for _, header, _ in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for name, summary in results["configs"].items():
        cells = [_fmt(summary["metrics"][key], kind, summary["n"]) for key, _, kind in METRICS]
        lines.append(f"| {name} | {summary['n']} | " + " | ".join(cells) + " |")
    labels = {"random_init": "random init (untrained encoder)", "raw_pixels": "raw pixels"}
    for kind, row in results["baselines"].items():
        cells = [_fmt(row["metrics"].get(key), k, row["n"]) if key in BASELINE_METRICS else "–"
                 for key, _, k in METRICS]
        lines.append(f"| {labels[kind]} | {row['n']} | " + " | ".join(cells) + " |")
    if results["baselines"]:
        origin = results["baselines"].get("random_init") or next(iter(results["baselines"].values()))
        lines += ["", "Baseline rows: one evaluation per seed, from " +
                  ", ".join(f"seed {s}: `{c}`" for s, c in origin["from"].items()) + "."]
    if results["not_run"]:
        lines += ["", "No finished runs yet: " + ", ".join(f"`{n}`" for n in results["not_run"]) + "."]
    if results["claims"]:
        lines += ["", "## Claims", ""]
        lines += [f"- **{c['verdict']}**: {c['text']}. {c.get('detail', '')}." for c in results["claims"]]
    lines += ["", "## Configurations", ""]
    for name, summary in results["configs"].items():
        lines.append(f"- `{name}` (seeds {', '.join(map(str, summary['seeds']))}): {summary['description']}. "
                     f"Flags: `{' '.join(summary['flags'])}`")
    if results["failures"]:
        lines += ["", "## Failed or refused runs", ""]
        for failure in results["failures"]:
            if failure["status"] == "mismatch":
                lines.append(f"- `{failure['run']}`: workdir belongs to a different command: "
                             + "; ".join(failure.get("problems", [])))
            else:
                lines += [f"- `{failure['run']}`: exit code {failure.get('returncode')}, last lines of its run.log:",
                          "", "```", *failure.get("log_tail", [])[-12:], "```", ""]
    if results["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------

flags.DEFINE_string("study", "paper_claims", "Study: a module of experiments/studies/ or a .py/.json path.")
flags.DEFINE_string("base_flagfile", "experiments/quick.flags", "run.py flagfile every configuration starts from.")
flags.DEFINE_string("root", "runs/sweep", "Sweep directory: <root>/<config>/seed<k>, results.md/json.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (comma-separated integers).")
flags.DEFINE_list("only", [], "Run only these configurations (comma-separated names).")
flags.DEFINE_multi_string("extra", [], "Extra run.py flags for every run, after the configuration's "
                          "(repeatable; a value may hold several, e.g. --extra='--epochs=2 --verbose=2').")
flags.DEFINE_bool("dry_run", False, "Print the commands (and which runs are done), run nothing.")
flags.DEFINE_bool("aggregate_only", False, "Only aggregate the existing reports into results.md/json.")
flags.DEFINE_bool("stream", False, "Also echo each run's output here (it always goes to <workdir>/run.log).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --flag "
                             "(pass run.py flags with --extra=--name=value)")
    try:
        return _main()
    except ValueError as error:  # bad study / flags: the message names the fix, no traceback
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the run was stopped and recorded; no traceback needed
        return 130


def _main():
    study = load_study(FLAGS.study)
    if not FLAGS.aggregate_only:
        try:
            seeds = [int(s) for s in FLAGS.seeds]
        except ValueError:
            raise ValueError(f"--seeds={','.join(FLAGS.seeds)}: give comma-separated integers.") from None
        extra = [arg for value in FLAGS.extra for arg in shlex.split(value)]
        runs = plan(study, FLAGS.base_flagfile, FLAGS.root, seeds, only=FLAGS.only, extra=extra)
        results = sweep(runs, FLAGS.root, dry_run=FLAGS.dry_run, stream=FLAGS.stream,
                        echo=lambda message: print(message, flush=True))
        if FLAGS.dry_run:
            return 0
        bad = sorted(k for k, r in results.items() if r["status"] != "ok")
    else:
        bad = []
    results = aggregate(study, FLAGS.root)
    print(f"Results: {os.path.join(FLAGS.root, 'results.md')} ({len(results['configs'])} configurations "
          f"with finished runs)", flush=True)
    for claim in results["claims"]:
        print(f"  {claim['verdict']}: {claim['text']}", flush=True)
    if bad:
        print(f"{len(bad)} run(s) failed or were refused: {', '.join(bad)} (see {FLAGS.root}/sweep_status.json)")
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
