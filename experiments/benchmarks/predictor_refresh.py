"""Predictor refresh cost: one JSON line per rule with the median time of rule(F) at --dim.

    python experiments/bench.py predictor_refresh --dim=128
    python experiments/bench.py predictor_refresh --dim=512 --rules=directpred,stiefel

The refresh is what DirectPredictor.refresh() runs inside the compiled train step: the rule on
a d x d correlation in float32, compiled with tf.function (as in fit), timed after warm-up.
Compare with `bench.py train_step` (ResNet-18, batch 128) for the ≤ 2 % (128-d) / ≤ 5 %
(512-d) goal.
"""
import json
import os
import statistics
import time

from absl import flags

from benchmarks import parse_flags

FLAGS = flags.FlagValues()
flags.DEFINE_multi_integer("dim", [], "Dimension d (repeatable; default 128).", flag_values=FLAGS)
flags.DEFINE_list("rules", [], "Rules to time (default: every registered rule).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 20, "Timed refreshes per rule (the median is reported).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Dtype of F.", flag_values=FLAGS)


def main(argv):
    args = parse_flags(FLAGS, "bench.py predictor_refresh", argv, __doc__)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from keras_ncssl.predictors import RULES

    names = args.rules or sorted(RULES)
    for dim in args.dim or [128]:
        rng = np.random.default_rng(dim)
        z = rng.normal(size=(4 * dim, dim)) * rng.uniform(0.1, 2.0, size=dim)
        f = tf.constant(z.T @ z / len(z), args.dtype)
        for name in names:
            rule = RULES[name]
            options = {"cross_correlation": f} if rule.needs_cross_correlation else {}
            compiled = tf.function(lambda m, rule=rule, options=options: rule(m, **options))
            compiled(f).numpy()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                compiled(f).numpy()
                times.append(time.perf_counter() - start)
            print(json.dumps({"bench": "predictor_refresh", "rule": name, "dim": dim, "dtype": args.dtype,
                              "uses_eigh": bool(rule.uses_eigh),
                              "refresh_ms": round(1e3 * statistics.median(times), 3)}), flush=True)
