"""Atomic, resumable training checkpoints.

Everything a run needs to continue exactly is in one ``tf.train.Checkpoint``: the online and
target networks, the predictor's state (kernel, correlation, step counters), the optimizer's
slots and iteration count, and the run's progress (epoch, step within the epoch). Run-level
records (per-epoch history, diagnostics) go in a JSON file beside each checkpoint.

Atomicity: TensorFlow writes a checkpoint's data before the ``checkpoint`` state file names it,
and the JSON side file is written to a temporary name and renamed, so a run killed mid-write
leaves at worst a newest checkpoint that fails to load. :meth:`TrainingCheckpoint.restore`
then falls back to the previous one with a warning; if none loads it raises, and never
silently starts from scratch.
"""
import json
import os
import re
import shutil
import warnings

import tensorflow as tf

from keras_ncssl.files import write_json_atomic  # noqa: F401  (also this module's public name)


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none of them could be restored."""


class TrainingCheckpoint:
    """Saves and restores a model (with its optimizer) and the run's progress.

    ``model.optimizer`` must be built (``optimizer.build(variables)``) before ``restore`` so
    its slot variables exist to receive the saved values.
    """

    def __init__(self, directory, model, max_to_keep=3):
        self.directory = directory
        self.progress = tf.Variable([0, 0], dtype=tf.int64, trainable=False, name="progress")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              progress=self.progress)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=max_to_keep)
        self.fell_back_from = None  # after restore(): the newest checkpoint, if it was unreadable

    @staticmethod
    def _records_path(prefix):
        return prefix + ".records.json"

    def save(self, epoch, step_in_epoch, records, number):
        """Save at (``epoch``, ``step_in_epoch`` completed steps); ``records`` is JSON."""
        self.progress.assign([epoch, step_in_epoch])
        # The records are written first under the name the checkpoint will get, so a
        # checkpoint the state file names always has its records.
        prefix = os.path.join(self.directory, f"ckpt-{number}")
        write_json_atomic(self._records_path(prefix), {"epoch": epoch, "step_in_epoch": step_in_epoch,
                                                        "records": records})
        path = self.manager.save(checkpoint_number=number)
        self._remove_leftovers()
        return path

    def _remove_leftovers(self):
        """Records of checkpoints the manager has deleted, and the temporary directories of
        saves that were killed midway (TensorFlow writes ``ckpt-N_temp/`` and renames it)."""
        if not os.path.isdir(self.directory):
            return
        kept = {os.path.basename(p) for p in self.manager.checkpoints}
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(".records.json") and name[:-len(".records.json")] not in kept:
                os.remove(path)
            elif re.fullmatch(r"ckpt-\d+_temp.*", name) and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    def restore(self):
        """Restore the newest loadable checkpoint: (epoch, step_in_epoch, records) or None.

        None means the directory holds no checkpoint (a fresh run).
        """
        candidates = list(reversed(self.manager.checkpoints))
        errors = []
        self.fell_back_from = None
        for prefix in candidates:
            try:
                with open(self._records_path(prefix)) as handle:
                    side = json.load(handle)
                status = self.checkpoint.read(prefix)
                status.assert_existing_objects_matched()  # every object of ours was in the file
                status.expect_partial()  # the file's save_counter is not restored: no warning at exit
            except Exception as error:  # a truncated or corrupt file raises many types
                errors.append(f"{prefix}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                warnings.warn(f"checkpoint {prefix} could not be restored ({errors[-1]}); "
                              "falling back to the previous one.", RuntimeWarning, stacklevel=2)
                self.fell_back_from = self.fell_back_from or prefix
                continue
            epoch, step = (int(v) for v in self.progress.numpy())
            if (epoch, step) != (side["epoch"], side["step_in_epoch"]):
                raise CheckpointRestoreError(f"{prefix}: progress {epoch, step} disagrees with its "
                                             f"records {side['epoch'], side['step_in_epoch']}.")
            return epoch, step, side["records"]
        if candidates:
            raise CheckpointRestoreError(
                f"none of the checkpoints in {self.directory} could be restored:\n  " + "\n  ".join(errors)
                + "\nRefusing to start from scratch over them: move the work directory away to start over.")
        return None
