"""The work directory of a run: its files, the check that it belongs to this configuration,
and the restore of its newest checkpoint for --mode=eval/export.

Layout:
    flags.json            the resolved flags of the run that created it (and a history of changes)
    checkpoints/          atomic training checkpoints (+ records JSON), resumable
    logs/                 TensorBoard (train/ scalars per epoch) and history.csv
    pretrain.json         per-epoch history and diagnostics, train time and throughput
    eval.json             trained / random-init / raw-pixel results, one protocol
    encoder/              the export: SavedModel (serve: raw images -> embeddings), encoder.keras
    report.json, report.md, plots/*.png
"""
import os
import time

import runner_flags
from keras_ncssl.files import read_json, write_json_atomic
from runner_flags import ConfigError


class ConfigMismatchError(ConfigError):
    """The work directory belongs to a run with different training flags."""


def workdir_file(config, *parts):
    """A path inside --workdir."""
    return os.path.join(config.run.workdir, *parts)


def check_workdir(config):
    """Create the workdir or check it belongs to this configuration; never overwrite.

    Training flags must match the workdir's, except those named in --allow_changes (from
    runner_flags.RESUMABLE): a change is recorded in flags.json's "history" and becomes the
    workdir's value. Raises ConfigError (one line) before anything is written.
    """
    flags_path = workdir_file(config, "flags.json")
    training = runner_flags.training_subset(config)
    if os.path.exists(flags_path):
        saved = read_json(flags_path)
        diff = runner_flags.training_differences(saved.get("training", {}), training)
        allowed = {k: d for k, d in diff.items() if k in config.run.allow_changes}
        refused = {k: d for k, d in diff.items() if k not in allowed}
        if refused:
            lines = "; ".join(f"--{k}: workdir has {a!r}, this run asks {b!r}" for k, (a, b) in sorted(refused.items()))
            resumable = [k for k in refused if k in runner_flags.RESUMABLE]
            hint = (f" (or, to change {', '.join(resumable)} on resume, add --allow_changes={','.join(resumable)})"
                    if resumable else "")
            raise ConfigMismatchError(
                f"--workdir={config.run.workdir} belongs to a different configuration: {lines}. Use a new --workdir, "
                f"or repeat the original flags to resume it{hint}. Nothing was changed.")
        if allowed and config.run.mode in ("all", "pretrain"):
            saved["training"].update({k: b for k, (a, b) in allowed.items()})
            saved.setdefault("history", []).append({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "changes": {k: {"from": a, "to": b} for k, (a, b) in sorted(allowed.items())}})
            write_json_atomic(flags_path, saved)
            print("Changed on resume (recorded in flags.json): "
                  + ", ".join(f"--{k} {a!r} -> {b!r}" for k, (a, b) in sorted(allowed.items())), flush=True)
        return
    if config.run.mode not in ("all", "pretrain"):
        raise ConfigError(f"--mode={config.run.mode} needs an existing work directory with a pretrained model; "
                          f"--workdir={config.run.workdir} has no flags.json. Run --mode=pretrain (or all) first.")
    os.makedirs(config.run.workdir, exist_ok=True)
    write_json_atomic(flags_path, {"training": training, "all": config.as_dict()})
