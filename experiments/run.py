"""The experiment runner: pretrain -> evaluate -> export -> report.

    python experiments/run.py --flagfile=experiments/quick.flags --workdir=runs/quick
    python experiments/run.py --flagfile=stl10.flags --workdir=runs/stl10 --data_dir=~/tensorflow_datasets
    python experiments/run.py --flagfile=experiments/quick.flags --workdir=runs/quick --mode=eval

Rerunning the same command on the same workdir resumes from its newest checkpoint. Every stage
can run alone on an existing workdir (--mode). Only this directory parses flags; the library
takes plain arguments.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

try:
    import runner_flags  # noqa: E402  (defines every flag; experiments/ is this script's directory)
except ModuleNotFoundError as missing:  # the library is installed by `make setup` (pip install -e .)
    if (missing.name or "").split(".")[0] != "keras_ncssl":
        raise
    sys.exit("run.py: error: cannot import keras_ncssl: run with the project's environment (make setup, then "
             ".venv/bin/python experiments/run.py ...), or pip install -e . in yours.")

flags.adopt_module_key_flags(runner_flags)  # --help lists the runner's flags
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --flag")
    if not FLAGS["verbosity"].present:  # absl's app.run logs INFO (a line per checkpoint save): keep warnings
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        config = runner_flags.resolved(FLAGS)
        import runner  # imports TensorFlow: after flag parsing, so --help is fast

        runner.run(config)
    except runner_flags.ConfigError as error:
        _fail(error, status=2)
    except Exception as error:  # only the runner's own divergence stop; anything else is a bug
        if type(error).__name__ != "TrainingDivergedError":
            raise
        _fail(error, status=3)


def _fail(error, status):
    """One line on stderr and a non-zero exit: a configuration error (2) or divergence (3).
    --debug shows the traceback as well."""
    if FLAGS.debug:
        import traceback
        traceback.print_exc()
    print(f"run.py: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    app.run(main, argv=runner_flags.resolve_flagfile_arguments(sys.argv))
