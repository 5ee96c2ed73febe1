"""Input-pipeline throughput: two-view pretraining batches per second.

    python experiments/bench.py input --dataset=fashion_mnist --preset=grayscale \
        --batch_size=256 --image_size=32 --steps=50
    python experiments/bench.py input --dataset=synthetic96 --preset=stl10 --steps=20

`--dataset=synthetic96` is an STL-10-sized stand-in (96x96x3 random smooth images, preset
`stl10`, which blurs every view). Prints one JSON line: `images_per_sec` counts two-view
*pairs* (what one train-step example consumes), `view_images_per_sec` counts single views.
The goal (issue 4) is >= 5x what the train step consumes in the same configuration.
"""
import argparse
import json
import os
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
                                  repeat=True)
    it = iter(ds)
    for _ in range(args.warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(args.steps):
        v1, v2 = next(it)
    seconds = time.perf_counter() - start
    pairs = args.steps * args.batch_size
    print(json.dumps({
        "benchmark": "input", "dataset": args.dataset, "preset": preset,
        "batch_size": args.batch_size, "image_size": image_size, "channels": channels,
        "view_shape": [int(d) for d in v1.shape], "steps": args.steps,
        "seconds": round(seconds, 3), "batches_per_sec": round(args.steps / seconds, 2),
        "images_per_sec": round(pairs / seconds, 1),
        "view_images_per_sec": round(2 * pairs / seconds, 1),
        "cpu_count": os.cpu_count(), "tf_version": tf.__version__,
    }), flush=True)


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
