"""Benchmarks run by experiments/bench.py: one module per benchmark, each with ``main(argv)``."""
import os
import sys

from absl import flags


def parse_flags(flag_values, prog, argv, doc):
    """Parse ``argv`` into the benchmark's own absl FlagValues (so that the names of two
    benchmarks, or of a benchmark and run.py, never clash); --help prints ``doc`` and the flags."""
    if "--help" in argv or "-h" in argv:
        print(f"{doc}\n{prog} flags:\n{flag_values.get_help()}")
        sys.exit(0)
    try:
        flag_values([prog, *argv])
    except flags.Error as error:
        sys.exit(f"{prog}: error: {error}")
    return flag_values


def prepare_run(name, argv, **replace):
    """The runner's flags (absl FLAGS, a flagfile included) -> (config, prepared): the config with
    ``replace`` applied and ``runner.preflight`` done, so a benchmark times exactly the run's own
    set-up (precision, threads, strategy, model). A bad flag exits with the runner's one-line error."""
    import runner_flags
    try:
        flags.FLAGS([f"bench.py {name}", *runner_flags.resolve_flagfile_arguments(argv)])
    except flags.Error as error:
        sys.exit(f"bench.py {name}: error: {error}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        config = runner_flags.resolved(flags.FLAGS).replace(**replace)
        import runner
        prepared = runner.preflight(config)
        if config["mode"] == "eval":
            prepared.trained_step = runner.restore_for_eval(config, prepared.splits, prepared.model)
    except runner_flags.ConfigError as error:
        sys.exit(f"bench.py {name}: error: {error}")
    return config, prepared
