"""The export stage: the encoder's SavedModel and encoder.keras, with the run's metadata
(training flags, step and eval.json's accuracy table when it is of this encoder)."""
import os

import runner_flags
from builders import input_shape
from keras_ncssl import export
from keras_ncssl.files import read_json
from workdir import workdir_file


_ACCURACY_KEYS = ("linear_probe_top1", "knn_top1", "few_label_top1_mean", "few_label_top1_std",
                  "few_label_n_per_class", "feature_dim", "n_train", "n_test")


def _accuracy_table(config, step):
    """eval.json's accuracy table, or None with the reason when it is not of this encoder."""
    path = workdir_file(config, "eval.json")
    if not os.path.exists(path):
        return None, "no eval.json: run --mode=eval, then --mode=export"
    results = read_json(path)
    evaluated = (results.get("encoder_step") or {}).get("step")
    state = workdir_file(config, "checkpoints", "checkpoint")
    # An eval.json that does not record its step: older than the newest checkpoint means stale.
    stale = (evaluated != step) if evaluated is not None else (
        os.path.exists(state) and os.path.getmtime(path) < os.path.getmtime(state))
    if stale:
        return None, (f"eval.json evaluated another model (step {evaluated}) than this encoder's "
                      f"(step {step}): run --mode=eval, then --mode=export")
    table = {name: {k: results[name][k] for k in _ACCURACY_KEYS if k in results[name]}
             for name in ("trained", "random_init", "raw_pixels") if name in results}
    return {"protocol": results.get("protocol"), **table}, None


def export_metadata(config, model, trained_step=None):
    """What the export records about its run: training flags, step and the accuracy table.

    ``trained_step``: {"step", "total_steps", "complete"} as eval.json records it; without it
    the step is the optimizer's iteration count."""
    iterations = int(model.optimizer.iterations.numpy())
    step = iterations if trained_step is None else trained_step["step"]
    accuracy, missing = _accuracy_table(config, step)
    return {"training_flags": runner_flags.training_subset(config), "training_step": step,
            "training_complete": None if trained_step is None else trained_step["complete"],
            "optimizer_iterations": iterations, "accuracy": accuracy,
            "accuracy_missing_because": missing}


def export_stage(config, model, splits, trained_step=None):
    """The encoder export: raw-image signatures with the dataset statistics, encoder.keras."""
    # As eval_arrays -> augment.eval_dataset: resize fixed-size data; variable-size data
    # (ImageNet) is resized on the shorter side and centre-cropped.
    geometry = "center_crop" if None in tuple(splits.image_shape[:2]) else "resize"
    path = export.export_encoder(model, workdir_file(config, "encoder"), input_shape=input_shape(config),
                                 mean=splits.mean, std=splits.std, preprocessing=geometry,
                                 metadata=export_metadata(config, model, trained_step),
                                 keras_model=True)
    print(f"Exported the encoder to {path} (signature 'serve': raw uint8 images -> embeddings; "
          f"'serve_normalized'; {export.KERAS_FILE}).", flush=True)
    return path
