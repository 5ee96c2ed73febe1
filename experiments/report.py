"""report.json and report.md (with plots) from a work directory's pretrain.json and eval.json."""
import os

import numpy as np

from keras_ncssl.files import read_json, write_json_atomic, write_text_atomic

# report.json's per-run scalars that a study aggregates over seeds (claims.py): one name each.
LINEAR_PROBE, FEW_LABEL, KNN = "linear_probe_top1", "few_label_top1_mean", "knn_top1"
FINAL_PROJECTION_STD, FINAL_EFFECTIVE_RANK = "final_projection_std", "final_effective_rank"
TRAIN_SECONDS = "train_seconds"
ACCURACIES = (LINEAR_PROBE, FEW_LABEL, KNN)
BASELINES = ("random_init", "raw_pixels")  # the keys of report.json's "baselines" (eval.json's)


def format_value(value, spec, missing="n/a"):
    """``value`` formatted with ``spec`` (e.g. ".4f"), or ``missing`` when it was not recorded."""
    return missing if value is None else format(float(value), spec)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _load(workdir, name):
    return read_json(os.path.join(workdir, name), None)


def _series(history, key):
    return [h["epoch"] for h in history if key in h], [h[key] for h in history if key in h]


def plot_training(history, path):
    plt = _pyplot()
    keys = [k for k in ("loss", "projection_std", "knn_top1", "effective_rank") if _series(history, k)[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(*_series(history, key), marker="o")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_spectrum(spectrum, path):
    """[DP] Fig. 2: log eig(F), eig(W_p) and the alignment cos(u_j, W_p u_j) over training."""
    plt = _pyplot()
    panels = [("spectrum_F", "log10 eig(F)"), ("spectrum_Wp", "eig(W_p)"), ("alignment", "cos(u_j, W_p u_j)")]
    panels = [(k, t) for k, t in panels if any(k in r for r in spectrum)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    colours = plt.cm.viridis(np.linspace(0, 1, max(len(spectrum), 2)))
    for ax, (key, title) in zip(axes[0], panels):
        for colour, record in zip(colours, spectrum):
            if key not in record:
                continue
            values = np.asarray(record[key], float)
            if key == "spectrum_F":
                values = np.log10(np.maximum(values, 1e-12))
            ax.plot(values, color=colour, label=f"epoch {record['epoch']}")
        ax.set_title(title)
        ax.set_xlabel("eigen-index j (F's eigenvalues, descending)")
        if key == "alignment":  # 1 = W_p maps u_j onto itself ([DP] Thm 3); no offset axis
            ax.set_ylim(-1.05, 1.05)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _percent(value, sign=""):
    """A fraction as points (``sign="+"``: signed), or "–" when not measured (e.g. the streaming
    probe skips kNN and the few-label probe)."""
    return "–" if value is None else f"{100 * value:{sign}.2f}"


def _difference(a, b):
    return None if a is None or b is None else a - b


def _row(name, result):
    if not result:
        return f"| {name} | – | – | – |"
    few = result.get("few_label_top1_mean")
    few_text = "–" if few is None else f"{100 * few:.2f} ± {100 * (result.get('few_label_top1_std') or 0):.2f}"
    return (f"| {name} | {_percent(result.get('linear_probe_top1'))} | {_percent(result.get('knn_top1'))} | "
            f"{few_text} |")


def write(config):
    """Write report.json and report.md for ``config['workdir']``; returns the report.md path."""
    workdir = config["workdir"]
    pretrain = _load(workdir, "pretrain.json") or {}
    evaluation = _load(workdir, "eval.json") or {}
    flags = (_load(workdir, "flags.json") or {}).get("all") or dict(config)
    trained = evaluation.get("trained", {})
    history = pretrain.get("history", [])
    spectrum = pretrain.get("spectrum", [])
    report = {
        LINEAR_PROBE: trained.get(LINEAR_PROBE),
        KNN: trained.get(KNN),
        FEW_LABEL: trained.get(FEW_LABEL),
        "few_label_top1_std": trained.get("few_label_top1_std"),
        "few_label_n_per_class": trained.get("few_label_n_per_class"),
        "baselines": {k: evaluation.get(k) for k in BASELINES if k in evaluation},
        "gain_over_random_init": (
            {key: _difference(trained.get(name), evaluation["random_init"].get(name))
             for key, name in (("linear_probe", LINEAR_PROBE), ("few_label", FEW_LABEL), ("knn", KNN))}
            if trained and "random_init" in evaluation else None),
        "protocol": evaluation.get("protocol"),
        "epochs": pretrain.get("epochs"),
        TRAIN_SECONDS: pretrain.get("train_seconds"),
        "images_per_sec": pretrain.get("images_per_sec"),
        "knn_monitor_at_init": pretrain.get("knn_top1_at_init"),
        "runtime": pretrain.get("runtime"),
        "encoder_step": evaluation.get("encoder_step"),
        FINAL_PROJECTION_STD: history[-1].get("projection_std") if history else None,
        FINAL_EFFECTIVE_RANK: spectrum[-1].get("effective_rank") if spectrum else None,
        "history": history,
        "trained": trained,
        "flags": flags,
    }
    write_json_atomic(os.path.join(workdir, "report.json"), report)
    plots = os.path.join(workdir, "plots")
    os.makedirs(plots, exist_ok=True)
    lines = [f"# keras_ncssl run: {os.path.basename(os.path.abspath(workdir))}", "",
             f"{flags.get('method', '?').upper()} with predictor `{flags.get('predictor')}` on "
             f"`{flags.get('dataset')}` ({flags.get('encoder')} encoder, {flags.get('image_size')} px), "
             f"{pretrain.get('epochs', '?')} epochs, batch {flags.get('batch_size')}.", ""]
    if evaluation:
        lines += ["## Accuracy (test split, %)", "", "| encoder | linear probe | kNN | few-label |",
                  "|---|---|---|---|", _row("trained (online encoder)", trained),
                  _row("random init (same architecture, untrained)", evaluation.get("random_init")),
                  _row("raw pixels", evaluation.get("raw_pixels")), "",
                  f"Protocol: {evaluation.get('protocol')}.", ""]
        if report["gain_over_random_init"]:
            gain = report["gain_over_random_init"]
            lines += [f"Self-supervision bought {_percent(gain['linear_probe'], '+')} points of linear probe, "
                      f"{_percent(gain['few_label'], '+')} few-label and {_percent(gain['knn'], '+')} kNN over the "
                      "untrained encoder of this run (one seed: compare across seeds before concluding).", ""]
    if pretrain:
        lines += ["## Training", "", f"Train time {pretrain['train_seconds']:.0f} s, "
                  f"{pretrain['images_per_sec']:.1f} images/s (a sample = a pair of views).", ""]
        rt = pretrain.get("runtime")
        if rt:
            lines += [f"Precision `{rt['precision']}`; TensorFlow threads intra-op {rt['intra_op_threads'] or 'default'}, "
                      f"inter-op {rt['inter_op_threads'] or 'default'}; "
                      f"{rt.get('steps_per_execution', 1)} train step(s) per execution; {rt['cpu_count']} CPUs "
                      f"(native bfloat16: {'yes' if rt['cpu_native_bfloat16'] else 'no'}), accelerators: "
                      f"{', '.join(rt['accelerators']) or 'none'}.", ""]
        if pretrain.get("knn_top1_at_init") is not None and history:
            lines += [f"kNN monitor (online, on subsets): {pretrain['knn_top1_at_init']:.4f} before training, "
                      f"{history[-1].get('knn_top1', float('nan')):.4f} after the last epoch.", ""]
    if history:
        plot_training(history, os.path.join(plots, "training.png"))
        lines += ["![training curves](plots/training.png)", ""]
    if spectrum:
        plot_spectrum(spectrum, os.path.join(plots, "spectrum.png"))
        lines += ["## Predictor and representation spectrum ([DP] Fig. 2)", "",
                  "![spectrum and eigen-alignment](plots/spectrum.png)", "",
                  f"Final effective rank of F: {format_value(report.get(FINAL_EFFECTIVE_RANK), '.2f')}; "
                  f"mean alignment cos(u_j, W_p u_j): {format_value(spectrum[-1].get('alignment_mean'), '.4f')}.",
                  ""]
    lines += ["## Flags", "", "```", *(f"--{k}={v}" for k, v in sorted(flags.items())), "```", ""]
    path = os.path.join(workdir, "report.md")
    write_text_atomic(path, "\n".join(lines))
    return path
