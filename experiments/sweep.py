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
whose directory was made with different training flags (a changed --extra or base flagfile,
compared as run.py resolves them) is reported as a mismatch and not touched. A failed run is recorded in
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

This file is the command line only; the machinery is split by job: study.py (loading and
validating a study), sweep_runs.py (the plan and the subprocesses), claims.py (aggregation and
claims), results_md.py (results.md / results.json).
"""
import shlex
import sys

from absl import app, flags

import claims
import results_md
import runner_flags
import study as study_lib
import sweep_runs

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
    # run.py's flags are defined here too (sweep_runs parses each run's command with them): one
    # given to the sweep itself would be silently unused.
    given = [name for name in runner_flags.NAMES if FLAGS[name].present]
    if given:
        raise app.UsageError(f"--{given[0]} is a run.py flag, not a sweep.py one: pass it to every run with "
                             f"--extra=--{given[0]}=VALUE, or set it in the study or --base_flagfile.")
    try:
        return _main()
    except ValueError as error:  # bad study / flags: the message names the fix, no traceback
        print(f"sweep.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the run was stopped and recorded; no traceback needed
        return 130


def _main():
    study = study_lib.load_study(FLAGS.study)
    if not FLAGS.aggregate_only:
        try:
            seeds = [int(s) for s in FLAGS.seeds]
        except ValueError:
            raise ValueError(f"--seeds={','.join(FLAGS.seeds)}: give comma-separated integers.") from None
        extra = [arg for value in FLAGS.extra for arg in shlex.split(value)]
        runs = sweep_runs.plan(study, FLAGS.base_flagfile, FLAGS.root, seeds, only=FLAGS.only, extra=extra)
        results = sweep_runs.sweep(runs, FLAGS.root, dry_run=FLAGS.dry_run, stream=FLAGS.stream,
                                   echo=lambda message: print(message, flush=True))
        if FLAGS.dry_run:
            return 0
        bad = sorted(k for k, r in results.items() if r["status"] != "ok")
    else:
        bad = []
    results = claims.aggregate(study, FLAGS.root)
    path = results_md.write(results, FLAGS.root)
    print(f"Results: {path} ({len(results['configs'])} configurations with finished runs)", flush=True)
    for claim in results["claims"]:
        print(f"  {claim['verdict']}: {claim['text']}", flush=True)
    if bad:
        print(f"{len(bad)} run(s) failed or were refused: {', '.join(bad)} (see {FLAGS.root}/sweep_status.json)")
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
