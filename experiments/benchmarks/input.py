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
import json
import os
import statistics
import time

from absl import flags

from benchmarks import parse_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SYNTHETIC = {"synthetic96": (96, 96, 3), "synthetic32": (32, 32, 3)}


FLAGS = flags.FlagValues()
flags.DEFINE_string("dataset", "fashion_mnist", "A keras_ncssl.data dataset name, or synthetic96 / synthetic32.",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "Data directory of the dataset.", flag_values=FLAGS)
flags.DEFINE_string("preset", None, "Augmentation preset (default: grayscale for 1-channel data, stl10 for "
                    "synthetic96, else byol).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 256, "Batch size.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", None, "Default: 32, or 96 for synthetic96.", flag_values=FLAGS)
flags.DEFINE_integer("channels", None, "Default: native channels.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "Timed batches.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 5, "Untimed batches first.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed runs of --steps batches; the median is reported.", flag_values=FLAGS)
flags.DEFINE_bool("no_jit", False, "Augment without XLA.", flag_values=FLAGS)
flags.DEFINE_integer("num_examples", 4096, "Synthetic set size.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed.", flag_values=FLAGS)


def main(argv):
    args = parse_flags(FLAGS, "bench.py input", argv, __doc__)
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
