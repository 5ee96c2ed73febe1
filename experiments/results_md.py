"""A study's results.md and results.json (from claims.aggregate): the table, the claims, the
configurations, failures and warnings."""
import os

import claims
from keras_ncssl.files import write_json_atomic, write_text_atomic
from report import format_value

# (scale, digits) of each metric kind of claims.METRICS.
_DISPLAY = {"acc": (100.0, 2), "std": (1.0, 4), "rank": (1.0, 2), "seconds": (1.0, 1)}


def write(results, root):
    """<root>/results.json and <root>/results.md; returns the results.md path."""
    write_json_atomic(os.path.join(root, "results.json"), results)
    path = os.path.join(root, "results.md")
    write_text_atomic(path, markdown(results))
    return path


def format_summary(summary, kind, n_runs=None):
    """``mean ± std`` of a claims.summarize summary in the display units of ``kind``; "–" when
    nothing was recorded, "(n=k)" when only k of the configuration's n_runs recorded it."""
    if summary is None or summary["mean"] is None:
        return "–"
    scale, digits = _DISPLAY[kind]
    std = format_value(None if summary["std"] is None else scale * summary["std"], f".{digits}f")
    text = f"{format_value(scale * summary['mean'], f'.{digits}f')} ± {std}"
    if n_runs is not None and summary["n"] != n_runs:  # some runs lack this metric
        text += f" (n={summary['n']})"
    return text


def markdown(results):
    """results.md: the table, the claims, the configurations, failures and warnings."""
    lines = [f"# Sweep results: {results['study']}", ""]
    if results["description"]:
        lines += [results["description"], ""]
    if results["budget"]:
        lines += ["Budget (every run): " + ", ".join(f"{k}={v}" for k, v in results["budget"].items()
                                                  if v is not None) + ".", ""]
    lines += _table(results)
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


def _table(results):
    """The mean ± std table: one row per configuration, then the baseline rows."""
    metrics = claims.METRICS
    lines = ["Mean ± std over seeds (std with ddof=1; n/a below 2 seeds). Accuracies are % on the test split; "
             "few-label is each seed's mean over its label draws, then mean ± std over seeds. "
             "– = not recorded (the runner measures F only for closed-form predictors).", "",
             "| configuration | n seeds | " + " | ".join(header for _, header, _ in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for name, summary in results["configs"].items():
        cells = [format_summary(summary["metrics"][key], kind, summary["n"]) for key, _, kind in metrics]
        lines.append(f"| {name} | {summary['n']} | " + " | ".join(cells) + " |")
    labels = {"random_init": "random init (untrained encoder)", "raw_pixels": "raw pixels"}
    for kind, row in results["baselines"].items():
        cells = [format_summary(row["metrics"].get(key), k, row["n"]) if key in claims.BASELINE_METRICS else "–"
                 for key, _, k in metrics]
        lines.append(f"| {labels[kind]} | {row['n']} | " + " | ".join(cells) + " |")
    if results["baselines"]:
        origin = results["baselines"].get("random_init") or next(iter(results["baselines"].values()))
        lines += ["", "Baseline rows: one evaluation per seed, from " +
                  ", ".join(f"seed {s}: `{c}`" for s, c in origin["from"].items()) + "."]
    return lines
