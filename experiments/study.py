"""Study definitions for experiments/sweep.py: find, load and validate a study.

A study is a module of experiments/studies/ (``--study=paper_claims``) or a path to a .py or
.json file that defines CONFIGS (list of {"name", "flags", "description"}) and optionally CLAIMS
and DESCRIPTION; see experiments/studies/paper_claims.py. A claim is {"kind": "at_least", "a",
"b", "metric", "text"} (mean metric of a >= that of b) or {"kind": "collapse", "config",
"text"}; claims.py evaluates them.
"""
import importlib
import importlib.util
import json
import os
import re

STUDIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "studies")

# Flags the sweep itself sets per run; a study or --extra that sets them would break the layout
# (--workdir, --seed), the base (--flagfile) or the "report.json means done" rule (--mode).
OWNED_FLAGS = ("workdir", "seed", "flagfile", "mode")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def known_studies():
    """Names of the studies in experiments/studies/."""
    return sorted(f[:-3] for f in os.listdir(STUDIES_DIR) if f.endswith(".py") and not f.startswith("_"))


def load_study(spec):
    """The study named ``spec`` (experiments/studies/<spec>.py) or at a .py/.json path, validated.

    Returns {"name", "description", "configs": [{"name", "flags", "description"}], "claims"}.
    Raises ValueError naming the study and the fix.
    """
    path = spec if spec.endswith((".py", ".json")) else os.path.join(STUDIES_DIR, spec + ".py")
    if not os.path.exists(path):
        raise ValueError(f"--study={spec}: no such study ({path}); known: {', '.join(known_studies())}, "
                         "or give a path to a .py/.json study file.")
    name = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".json"):
        with open(path) as handle:
            raw = {key.upper(): value for key, value in json.load(handle).items()}
    elif os.path.dirname(os.path.abspath(path)) == STUDIES_DIR:
        raw = vars(importlib.import_module(f"studies.{name}"))  # a study may import its siblings
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
        check_flags(config["flags"], f"study {path}, configuration {config['name']}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"study {path}: duplicate configuration names {duplicates}.")
    for claim in study["claims"]:
        needed = [claim.get("config")] if claim.get("kind") == "collapse" else [claim.get("a"), claim.get("b")]
        if claim.get("kind") not in ("at_least", "collapse") or any(n not in names for n in needed):
            raise ValueError(f"study {path}: claim {claim!r} needs kind at_least (a, b, metric) or collapse "
                             f"(config) over configurations of the study ({', '.join(names)}).")


def check_flags(args, where):
    """``args`` are run.py --flags that leave the sweep's own flags (OWNED_FLAGS) alone."""
    for arg in args:
        if not arg.startswith("--"):
            raise ValueError(f"{where}: {arg!r} is not a --flag (run.py takes flags only).")
        name = arg[2:].split("=", 1)[0]
        if name in OWNED_FLAGS:
            raise ValueError(f"{where}: --{name} is set by the sweep itself; remove it.")
