"""Throughput benchmarks: `python experiments/bench.py NAME [--options]`.

Each benchmark lives in `experiments/benchmarks/NAME.py` and exposes `main(argv)`; each
prints one JSON line per measurement. Performance goals are checked here, never by timed tests.

    python experiments/bench.py predictor_refresh --dim=128
    python experiments/bench.py train_step --encoder=resnet18 --image_size=32 --batch_size=128 --predictor=directpred
    python experiments/bench.py input --dataset=fashion_mnist --preset=grayscale
    python experiments/bench.py evaluation --flagfile=experiments/quick.flags --workdir=runs/quick
    python experiments/bench.py fit_epochs --flagfile=experiments/quick.flags --steps=936 --fits=5
    python experiments/bench.py conv_gradient --image_size=28 --channels=1
"""
import importlib
import pkgutil
import sys


def available():
    import benchmarks
    # op_profile is the train_step benchmark's trace reader; peer_* run in the PyTorch environment
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name != "op_profile" and not m.name.startswith("peer_"))


def main(argv):
    names = available()
    if len(argv) < 2 or argv[1] not in names:
        given = argv[1] if len(argv) > 1 else "(none)"
        sys.exit(f"bench.py: unknown benchmark {given!r}; choose one of {names}\n{__doc__}")
    importlib.import_module(f"benchmarks.{argv[1]}").main(argv[2:])


if __name__ == "__main__":
    main(sys.argv)
