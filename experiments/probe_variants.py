"""Few-label probe under other feature preprocessings, for a trained workdir and its baseline.

    python experiments/probe_variants.py --flagfile=experiments/quick.flags --workdir=runs/quick

A diagnostic for BUILD_NOTES ("Quick run"): is the gap between the trained and the random-init
encoder in the 10-label probe a property of the protocol's standardisation? For each
preprocessing, the same draws as the runner's probe (L2 chosen on the validation split), and a
cosine nearest-centroid classifier on the same draws. Features are cached in
WORKDIR/probe_features.npz.
"""
import os
import sys

import numpy as np
from absl import app, flags

import runner_flags  # defines every flag of run.py

FLAGS = flags.FLAGS


def preprocess(kind, reference, x):
    """Statistics come from the unlabelled training split, as in the runner's probe."""
    mean, std = reference.mean(0), reference.std(0)
    std = np.where(std > 1e-6 * std.mean(), std, 1.0)
    x = np.asarray(x, np.float64)
    # Unit-norm rows are rescaled by sqrt(D) so that the probe's L2 grid keeps its meaning.
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True) * np.sqrt(z.shape[1])  # noqa: E731
    return {"standardise": lambda: (x - mean) / std,
            "centre+l2": lambda: unit(x - mean),
            "l2": lambda: unit(x),
            "standardise+l2": lambda: unit((x - mean) / std)}[kind]()


def main(argv):
    del argv
    import keras

    import runner
    from builders import build_encoder
    from evaluation_stage import eval_arrays
    from keras_ncssl import evaluation

    config = runner_flags.resolved(FLAGS).replace(mode="eval")
    cache = os.path.join(config["workdir"], "probe_features.npz")
    if not os.path.exists(cache):
        prepared = runner.preflight(config)  # the data and the model of the workdir's flags
        splits, model = prepared.splits, prepared.model
        runner.restore_for_eval(config, splits, model)
        data = {s: eval_arrays(config, splits, s) for s in ("train", "validation", "test")}
        keras.utils.set_random_seed(config["seed"])
        encoders = {"trained": model.encoder, "random_init": build_encoder(config)}
        arrays = {f"y_{s}": y for s, (_, y) in data.items()}
        for name, encoder in encoders.items():
            for s, split in data.items():
                arrays[f"{name}_{s}"] = evaluation.extract_features(encoder, split)[0]
        np.savez(cache, **arrays)
    f = np.load(cache)
    y = {s: f[f"y_{s}"] for s in ("train", "validation", "test")}
    for name in ("trained", "random_init"):
        x_train = f[f"{name}_train"]
        for kind in ("standardise", "centre+l2", "l2", "standardise+l2"):
            x = {s: preprocess(kind, x_train, f[f"{name}_{s}"]) for s in y}
            probe, centroid = [], []
            for seed in range(config["few_label_draws"]):
                index = evaluation.sample_few_labels(y["train"], config["few_label_per_class"], seed)
                # The probe standardises with `standardize_with`'s mean/std: two rows at mean +-1
                # give std 1, so it only shifts x, which a logistic regression with an
                # unpenalised bias is invariant to; x stays preprocessed as `kind` says.
                result = evaluation.linear_probe(
                    (x["train"][index], y["train"][index]), (x["validation"], y["validation"]),
                    (x["test"], y["test"]), l2_grid=evaluation.FEW_LABEL_L2_GRID,
                    standardize_with=np.stack([x["train"].mean(0) - 1, x["train"].mean(0) + 1]))
                probe.append(result["top1"])
                classes = np.unique(y["train"])
                centres = np.stack([x["train"][index][y["train"][index] == c].mean(0) for c in classes])
                centres /= np.linalg.norm(centres, axis=1, keepdims=True)
                scores = x["test"] @ centres.T / np.linalg.norm(x["test"], axis=1, keepdims=True)
                centroid.append(np.mean(classes[np.argmax(scores, 1)] == y["test"]))
            print(f"{name:12s} {kind:15s} probe {100 * np.mean(probe):6.2f} ± "
                  f"{100 * np.std(probe, ddof=1):.2f}   nearest centroid {100 * np.mean(centroid):6.2f}",
                  flush=True)


if __name__ == "__main__":
    app.run(main, argv=runner_flags.resolve_flagfile_arguments(sys.argv))
