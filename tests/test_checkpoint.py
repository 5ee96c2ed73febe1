"""TrainingCheckpoint: leftovers of deleted or killed saves are removed; files are readable."""
import json
import os
import stat

import keras
import numpy as np
import pytest

from keras_ncssl.checkpoint import TrainingCheckpoint, write_json_atomic


def tiny_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.optimizer.build(model.trainable_variables)
    return model


def test_records_of_deleted_checkpoints_and_killed_saves_are_removed(tmp_path):
    checkpoint = TrainingCheckpoint(str(tmp_path), tiny_model(), max_to_keep=2)
    for number in range(1, 6):
        if number == 4:  # what a save killed midway leaves behind
            (tmp_path / "ckpt-3_temp").mkdir()
            (tmp_path / "ckpt-3_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x" * 10)
        checkpoint.save(0, number, {"history": []}, number=number)
    records = sorted(p.name for p in tmp_path.glob("*.records.json"))
    assert records == ["ckpt-4.records.json", "ckpt-5.records.json"]
    assert not (tmp_path / "ckpt-3_temp").exists()
    assert [os.path.basename(p) for p in checkpoint.manager.checkpoints] == ["ckpt-4", "ckpt-5"]


def test_json_and_records_get_the_umask_mode_like_checkpoints(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(str(tmp_path / "flags.json"), {"a": 1})
        TrainingCheckpoint(str(tmp_path / "ckpt"), tiny_model()).save(0, 1, {}, number=1)
    finally:
        os.umask(old)
    for path in [tmp_path / "flags.json", tmp_path / "ckpt" / "ckpt-1.records.json",
                 tmp_path / "ckpt" / "ckpt-1.index"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert json.loads((tmp_path / "flags.json").read_text()) == {"a": 1}


def test_restore_says_which_newest_checkpoint_it_fell_back_from(tmp_path):
    model = tiny_model()
    checkpoint = TrainingCheckpoint(str(tmp_path), model, max_to_keep=3)
    checkpoint.save(0, 1, {"n": 1}, number=1)
    checkpoint.save(0, 2, {"n": 2}, number=2)
    assert checkpoint.restore()[1] == 2 and checkpoint.fell_back_from is None
    for data in tmp_path.glob("ckpt-2.data-*"):
        data.write_bytes(b"garbage")
    fresh = TrainingCheckpoint(str(tmp_path), tiny_model(), max_to_keep=3)
    with pytest.warns(RuntimeWarning, match="falling back"):
        epoch, step, records = fresh.restore()
    assert (step, records) == (1, {"n": 1})
    assert fresh.fell_back_from.endswith("ckpt-2")
    np.testing.assert_array_equal(fresh.checkpoint.model.get_weights()[0], model.get_weights()[0])
