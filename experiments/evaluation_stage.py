"""The evaluation stage: linear probe, kNN and few-label probe of the trained encoder and the
baselines (eval.json), and the labelled arrays in the encoder's input format."""
import keras
import numpy as np
import tensorflow as tf

from builders import build_encoder
from keras_ncssl import augment, encoders, evaluation
from keras_ncssl.files import write_json_atomic
from workdir import workdir_file as _path


def eval_arrays(config, splits, split, limit=None, as_dataset=False):
    """(normalised images in the encoder's input format, labels) of a labelled split; with
    ``as_dataset`` the batched dataset of them instead, read from the split's tf.data source
    (nothing is held in memory: the streaming probe's input)."""
    source = getattr(splits, split) if as_dataset else tf.data.Dataset.from_tensor_slices(
        splits.numpy(split, limit=limit))
    ds = augment.eval_dataset(source.take(limit) if as_dataset and limit else source, batch_size=1024,
                              image_size=config["image_size"], channels=config["channels"],
                              mean=splits.mean, std=splits.std)
    if as_dataset:
        return ds
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in ds])
    return np.concatenate(xs), np.concatenate(ys)


def evaluate(config, model, splits, trained_step=None):
    """Linear probe, kNN and few-label probe for the trained encoder and the two baselines.

    ``trained_step``: {"step", "total_steps", "complete"}, recorded in eval.json."""
    limit = config["probe_train_limit"] or None
    counts = splits.num_examples
    n_features = min(counts["train"], limit or counts["train"]) + counts["validation"] + counts["test"]
    streaming = config["linear_probe"] == "streaming" or (config["linear_probe"] == "auto" and evaluation.needs_streaming(
        n_features, model.encoder.output_shape[-1], int(config["probe_memory_budget_mb"] * 2**20)))
    protocol = ("frozen encoder (training=False) features, standardised on the probe's training split; "
                "multinomial logistic regression with its L2 strength chosen on the validation split "
                f"(validation = {config['validation_fraction']:.0%} of train, fixed seed), test split used once; ")
    if streaming:  # features over the memory budget: SGD heads over tf.data, linear probe only
        strategy = model.distribute_strategy
        datasets = [eval_arrays(config, splits, s, limit if s == "train" else None, as_dataset=True)
                    for s in ("train", "validation", "test")]
        results = {"protocol": protocol + f"solved by SGD over tf.data ({config['streaming_probe_epochs']} epochs, one "
                   "head per L2 strength); kNN, few-label probe and raw pixels skipped (--linear_probe="
                   f"{config['linear_probe']}, --probe_memory_budget_mb={config['probe_memory_budget_mb']})"}
        with strategy.scope():  # float32 features whatever the training precision (as the export's)
            to_probe = {"trained": encoders.float32_copy(model.encoder)}
        if config["eval_baselines"]:
            keras.utils.set_random_seed(config["seed"])
            with strategy.scope():
                to_probe["random_init"] = encoders.float32_copy(build_encoder(config))  # same architecture and seed
        for name, encoder in to_probe.items():
            print(f"Evaluating the {name} encoder (streaming linear probe) ...", flush=True)
            results[name] = evaluation.evaluate_encoder_streaming(
                encoder, *datasets, num_classes=splits.num_classes, epochs=config["streaming_probe_epochs"],
                strategy=strategy)
        results["encoder_step"] = trained_step
        write_json_atomic(_path(config, "eval.json"), results)
        print(f"linear probe {results['trained']['linear_probe_top1']:.4f} (streaming)", flush=True)
        return results
    train = eval_arrays(config, splits, "train", limit)
    val, test = eval_arrays(config, splits, "validation"), eval_arrays(config, splits, "test")
    options = dict(knn_k=config["knn_k"], knn_temperature=config["knn_temperature"],
                   few_label_n=config["few_label_per_class"] or None,
                   few_label_seeds=tuple(range(config["few_label_draws"])))
    results = {"protocol": protocol + (
        f"solved by L-BFGS to max|gradient| <= {evaluation.DEFAULT_TOL:g} per L2 value, "
        f"{evaluation.DEFAULT_TEST_TOL:g} for the tested model; "
        f"weighted kNN (cosine, k={config['knn_k']}, T={config['knn_temperature']}) with the training "
        f"split as bank; few-label probe with {config['few_label_per_class']} labels per class over "
        f"{config['few_label_draws']} draws")}
    print("Evaluating the trained encoder ...", flush=True)
    # float32 features whatever the training precision (as the export computes them)
    results["trained"] = evaluation.evaluate_encoder(encoders.float32_copy(model.encoder), train, val, test,
                                                     **options)
    if config["eval_baselines"]:
        print("Evaluating the random-init baseline ...", flush=True)
        keras.utils.set_random_seed(config["seed"])
        random_encoder = encoders.float32_copy(build_encoder(config))  # the same architecture and seed, untrained
        results["random_init"] = evaluation.evaluate_encoder(random_encoder, train, val, test, **options)
        print("Evaluating the raw-pixel baseline ...", flush=True)
        native = [splits.numpy(s, limit=limit if s == "train" else None) for s in ("train", "validation", "test")]
        mean, std = np.asarray(splits.mean, np.float32), np.asarray(splits.std, np.float32)
        native = [(((x / 255.0 - mean) / std).astype(np.float32), y) for x, y in native]
        results["raw_pixels"] = evaluation.evaluate_raw_pixels(*native, **options)
    results["encoder_step"] = trained_step
    write_json_atomic(_path(config, "eval.json"), results)
    t = results["trained"]
    print(f"linear probe {t['linear_probe_top1']:.4f}  kNN {t['knn_top1']:.4f}  "
          f"few-label {t['few_label_top1_mean']:.4f}", flush=True)
    return results


# Evaluation numbers the export's metadata carries (per encoder: trained, random_init, raw_pixels).
