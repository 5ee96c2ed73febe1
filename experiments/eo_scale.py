"""Spectral norm of every Edge-of-Orthogonality base (eps = 0) on synthetic correlation spectra.

    python experiments/eo_scale.py                                  # this version, both scales
    git show 82fb801:keras_ncssl/predictors/rules.py > /tmp/old_rules.py
    python experiments/eo_scale.py --old_rules=/tmp/old_rules.py    # ... and an older rules.py

Prints a markdown table (min-max over --draws random rotations) per spectrum:
"few": eigenvalues 1, 0.6, 0.3, then 10^-1.5 ... 10^-5, d/8 exact zeros (a trained projector);
"flat": d/2 eigenvalues 1 and d/2 zeros. The cross-correlation of LRP/NE is C = F R with
R = I + 0.05 G / sqrt(d) (a target network close to the online one). `scale="paper"` is
evaluated on F / ||F||_2 (its kernel depends on F's scale). BUILD_NOTES "Edge of Orthogonality
at the paper's scale" quotes this table.
"""
import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before keras_ncssl.predictors loads TensorFlow

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from keras_ncssl.predictors import RULES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("old_rules", None, "A rules.py of another version to compare with (optional).")
flags.DEFINE_list("dims", ["16", "64", "128"], "Dimensions d.")
flags.DEFINE_integer("draws", 5, "Random rotations per (spectrum, d).")
flags.DEFINE_integer("seed", 25, "Seed.")

EO_RULES = ("lrp", "neumann", "visser", "newton_schulz", "ns2", "stiefel")


def spectrum(kind, d):
    if kind == "few":
        n_zero = d // 8
        return np.concatenate([[1.0, 0.6, 0.3], np.logspace(-1.5, -5, d - 3 - n_zero), np.zeros(n_zero)])
    return np.concatenate([np.ones(d // 2), np.zeros(d - d // 2)])


def load_rules(path):
    spec = importlib.util.spec_from_file_location("_other_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RULES


def base_norm(rules, name, f, c, **options):
    if rules[name].needs_cross_correlation:
        options["cross_correlation"] = c
    return np.linalg.norm(rules[name](f, eps=0.0, **options), 2)


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    old = load_rules(FLAGS.old_rules) if FLAGS.old_rules else None
    columns = (["old"] if old else []) + ["spectral", "paper"]
    for kind in ("few", "flat"):
        print(f"\nspectrum {kind!r}\n\n| rule | d | " + " | ".join(columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for d in map(int, FLAGS.dims):
            norms = {}
            for _ in range(FLAGS.draws):
                q, _ = np.linalg.qr(rng.normal(size=(d, d)))
                f = (q * spectrum(kind, d)) @ q.T  # ||F||_2 = 1
                c = f @ (np.eye(d) + 0.05 * rng.normal(size=(d, d)) / np.sqrt(d))
                for name in EO_RULES:
                    row = norms.setdefault(name, {k: [] for k in columns})
                    if old:
                        row["old"].append(base_norm(old, name, f, c))
                    row["spectral"].append(base_norm(RULES, name, f, c))
                    if name != "lrp":  # LRP has no scale option: it is scale-free
                        row["paper"].append(base_norm(RULES, name, f, c, scale="paper"))
            for name, row in norms.items():
                cells = [f"{min(v):.3g}–{max(v):.3g}" if v else "–" for v in row.values()]
                print(f"| {name} | {d} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
