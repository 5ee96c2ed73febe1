"""Benchmarks run by experiments/bench.py: one module per benchmark, each with ``main(argv)``."""
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
