"""Input-pipeline throughput: two-view pretraining batches per second.

    python experiments/bench.py input --dataset=fashion_mnist --preset=grayscale \
        --batch_size=256 --image_size=32 --steps=50
    python experiments/bench.py input --dataset=synthetic96 --preset=stl10 --steps=20

`--dataset=synthetic96` is an STL-10-sized stand-in (96x96x3 random smooth images, preset
`stl10`, which blurs every view). Prints one JSON line: `images_per_sec` (median over
`--repeats` runs) counts two-view *pairs* (what one train-step example consumes),
`view_images_per_sec` single views; `load_avg_1min` says how busy the machine was.
The goal (issue 4) is >= 5x what the train step consumes in the same configuration.
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SYNTHETIC = {"synthetic96": (96, 96, 3), "synthetic32": (32, 32, 3)}


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench.py input", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist",
                   help="a keras_ncssl.data dataset name, or synthetic96 / synthetic32")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--preset", default=None,
                   help="augmentation preset (default: grayscale for 1-channel data, stl10 for "
                        "synthetic96, else byol)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=None, help="default: 32, or 96 for "
                   "synthetic96")
    p.add_argument("--channels", type=int, default=None, help="default: native channels")
    p.add_argument("--steps", type=int, default=50, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of --steps batches; the median is reported")
    p.add_argument("--no_jit", action="store_true", help="augment without XLA")
    p.add_argument("--num_examples", type=int, default=4096, help="synthetic set size")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv):
    args = _parse(argv)
    import tensorflow as tf
    from keras_ncssl import augment, data

    if args.dataset in SYNTHETIC:
        shape = SYNTHETIC[args.dataset]
        splits = data.load_dataset("synthetic", image_shape=shape, num_examples=args.num_examples,
                                   num_test=64)
        default_preset = "stl10" if shape[0] >= 96 else "byol"
    else:
        splits = data.load_dataset(args.dataset, data_dir=args.data_dir)
        default_preset = "grayscale" if splits.image_shape[-1] == 1 else "byol"
    preset = args.preset or default_preset
    image_size = args.image_size or (96 if args.dataset == "synthetic96" else 32)
    channels = args.channels or splits.image_shape[-1]

    ds = augment.pretrain_dataset(splits, preset, batch_size=args.batch_size,
                                  image_size=image_size, channels=channels, seed=args.seed,
                                  repeat=True, jit_compile=not args.no_jit)
    it = iter(ds)
    start = time.perf_counter()
    for _ in range(args.warmup):  # includes tracing and the XLA compilation
        v1, _ = next(it)
    warmup_seconds = time.perf_counter() - start
    rates = []
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        for _ in range(args.steps):
            v1, _ = next(it)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    median = statistics.median(rates)
    print(json.dumps({
        "benchmark": "input", "dataset": args.dataset, "preset": preset,
        "batch_size": args.batch_size, "image_size": image_size, "channels": channels,
        "jit_compile": not args.no_jit, "view_shape": [int(d) for d in v1.shape],
        "steps": args.steps, "repeats": len(rates),
        "images_per_sec": round(median, 1), "view_images_per_sec": round(2 * median, 1),
        "images_per_sec_runs": [round(r, 1) for r in rates],
        "warmup_seconds": round(warmup_seconds, 2),
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "tf_version": tf.__version__,
    }), flush=True)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
