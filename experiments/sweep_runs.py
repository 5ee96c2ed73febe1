"""Running a study: the plan (one run.py command per configuration and seed), each run as a
subprocess with its output in <workdir>/run.log, and <root>/sweep_status.json.

Which runs are done, resumable or refused is decided from the work directories themselves: a
run with a report.json is done; a workdir whose flags.json has other training flags than the
command's (compared as run.py resolves them, e.g. ``--eps=0.10`` equals a saved 0.1) is refused
and not touched; any other run is (re)started and run.py resumes it from its newest checkpoint.
"""
import copy
import datetime
import os
import shlex
import subprocess
import sys
import time

from absl import flags

import runner_flags
import study as study_lib
from keras_ncssl.files import read_json, write_json_atomic

RUN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")


def plan(study, base_flagfile, root, seeds, only=None, extra=(), python=sys.executable):
    """The runs of the sweep, seed-major: a list of dicts {config, seed, workdir, command, training}.

    ``training`` is the run's training flags as run.py resolves them; a configuration whose flags
    run.py would refuse raises ValueError here, before anything runs.
    """
    configs = study["configs"]
    if only:
        names = [c["name"] for c in configs]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"--only: {unknown} not in study {study['name']} ({', '.join(names)}).")
        configs = [c for c in configs if c["name"] in only]
    extra = list(extra)
    study_lib.check_flags(extra, "--extra")
    [base] = runner_flags.resolve_flagfile_arguments([f"--flagfile={base_flagfile}"])
    base = base.split("=", 1)[1]
    if not os.path.exists(base):
        raise ValueError(f"--base_flagfile={base_flagfile}: no such file (here or in experiments/).")
    base = os.path.abspath(base)
    runs = []
    for seed in seeds:
        for config in configs:
            workdir = os.path.abspath(os.path.join(root, config["name"], f"seed{seed}"))
            own = config["flags"] + extra + [f"--seed={seed}"]
            try:
                training = training_flags([f"--flagfile={base}", *own, f"--workdir={workdir}"])
            except runner_flags.ConfigError as error:
                raise ValueError(f"configuration {config['name']} (seed {seed}): {error}") from None
            runs.append({"config": config["name"], "seed": int(seed), "workdir": workdir,
                         "command": [python, RUN_PY, f"--flagfile={base}", *own, f"--workdir={workdir}"],
                         "training": training})
    return runs


def training_flags(args):
    """The training flags (runner_flags.training_subset) run.py resolves from ``args``.

    Parsed with run.py's own flag definitions into a fresh FlagValues (absl expands any
    --flagfile), so a bad value is the ConfigError run.py would print.
    """
    values = flags.FlagValues()
    for name in runner_flags.NAMES:
        values[name] = copy.deepcopy(flags.FLAGS[name])  # the same definitions, fresh values
    try:
        values(["run.py", *args])
    except flags.Error as error:
        raise runner_flags.ConfigError(str(error)) from None
    return runner_flags.training_subset(runner_flags.resolved(values))


def mismatches(run):
    """How ``run``'s workdir (if it exists) differs from its command: lines naming each flag."""
    saved = read_json(os.path.join(run["workdir"], "flags.json"), None)
    if saved is None:
        return []
    diff = runner_flags.training_differences(saved.get("training", {}), run["training"])
    return [f"--{name}: workdir has {a!r}, this command asks {b!r}" for name, (a, b) in sorted(diff.items())]


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
        log.write(f"\n### sweep {_now()}: {shlex.join(run['command'])}\n".encode())
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


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def sweep(runs, root, dry_run=False, stream=False, echo=print):
    """Run (or with ``dry_run`` print) every unfinished run; returns the per-run status dict.

    Progress lines go to ``echo`` and, unless ``dry_run``, to <root>/sweep.log.
    """
    status_path = os.path.join(root, "sweep_status.json")
    status = read_json(status_path, {})
    if not dry_run:
        os.makedirs(root, exist_ok=True)
    log = None if dry_run else open(os.path.join(root, "sweep.log"), "a")

    def say(message):
        echo(message)
        if log:
            log.write(f"{_now()} {message}\n")
            log.flush()

    results = {}
    try:
        for index, run in enumerate(runs, 1):
            key = f"{run['config']}/seed{run['seed']}"
            record = _attempt(run, f"[{index}/{len(runs)}] {key}", dry_run, stream, say,
                              lambda r, k=key: _record(status, status_path, k, r))
            results[key] = record
            if not dry_run:
                _record(status, status_path, key, record)
    finally:
        if log:
            log.close()
    return results


def _record(status, path, key, record):
    """Merge ``record`` into the status of ``key`` and write sweep_status.json (after every run,
    so that it survives an interrupt)."""
    status[key] = {**status.get(key, {}), **record}
    for stale in ("log_tail", "problems", "skipped"):  # details of an earlier attempt
        if stale not in record:
            status[key].pop(stale, None)
    write_json_atomic(path, status)


def _attempt(run, label, dry_run, stream, say, on_interrupt):
    """One run: refused, skipped, printed (dry run) or executed; returns its status record."""
    problems = mismatches(run)
    resuming = os.path.exists(os.path.join(run["workdir"], "flags.json"))
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
        say(f"{label}: {'resume' if resuming else 'run'}: {record['command']}")
    else:
        say(f"{label}: {'resuming' if resuming else 'running'} (log: {run['workdir']}/run.log)")
        began = time.time()
        try:
            returncode, tail = execute(run, stream=stream)
        except KeyboardInterrupt:
            on_interrupt({**record, "status": "interrupted"})
            say(f"{label}: interrupted; rerun the same command to resume it from its checkpoint")
            raise
        record.update(returncode=returncode, seconds=round(time.time() - began, 1), finished=_now())
        if returncode == 0 and os.path.exists(os.path.join(run["workdir"], "report.json")):
            record.update(status="ok")
            say(f"{label}: done in {record['seconds']:.0f} s")
        else:
            record.update(status="failed", log_tail=tail)
            say(f"{label}: FAILED (exit code {returncode}) after {record['seconds']:.0f} s; last lines:\n    "
                + "\n    ".join(tail[-8:]))
    return record
