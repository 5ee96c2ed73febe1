"""experiments/run.py end to end on digits: stages, report, export, resume, bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from run_tiny import ENV, ROOT, RUN, TINY, embeddings, error_lines, parse, run


def tensorboard_scalars(directory):
    """{tag: {step: value}} of the scalar summaries in a TensorBoard log directory."""
    import tensorflow as tf
    scalars = {}
    for name in sorted(os.listdir(directory)):
        for event in tf.compat.v1.train.summary_iterator(str(directory / name)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


@pytest.mark.slow
def test_all_stages_write_report_and_encoder(tmp_path):
    workdir = tmp_path / "run"
    run(workdir)
    report = json.loads((workdir / "report.json").read_text())
    for key in ("linear_probe_top1", "knn_top1", "few_label_top1_mean", "epochs", "train_seconds",
                "images_per_sec", "flags", "baselines", "protocol"):
        assert report[key] is not None, key
    assert {"random_init", "raw_pixels"} <= set(report["baselines"])
    assert 0.1 < report["linear_probe_top1"] <= 1.0 and report["epochs"] == 2
    assert len(report["history"]) == 2 and "knn_top1" in report["history"][0]
    assert report["flags"]["dataset"] == "digits"
    # The monitor's value before training is the untrained encoder's: the curve's own baseline.
    assert 0.0 < report["knn_monitor_at_init"] <= 1.0
    assert report["knn_monitor_at_init"] != report["history"][0]["knn_top1"]
    markdown = (workdir / "report.md").read_text()
    assert "random init" in markdown and "plots/spectrum.png" in markdown
    assert "before training" in markdown
    assert f"effective rank of F: {report['final_effective_rank']:.2f};" in markdown
    assert (workdir / "plots" / "spectrum.png").stat().st_size > 1000
    x = np.random.default_rng(0).normal(size=(3, 16, 16, 1)).astype(np.float32)
    assert embeddings(workdir, x).shape == (3, report["trained"]["feature_dim"])
    # The monitors run between fits (pretraining._BetweenFits) and still reach TensorBoard: one
    # value per epoch, equal to the history's.
    scalars = tensorboard_scalars(workdir / "logs" / "train")
    for key in ("loss", "knn_top1", "effective_rank"):
        assert scalars[f"epoch_{key}"] == pytest.approx(
            {epoch: row[key] for epoch, row in enumerate(report["history"])}, rel=1e-6), key
    # The same command again: already complete, stages rerun from the checkpoint.
    again = run(workdir, "--mode=report")
    assert "Report:" in again.stdout


@pytest.mark.slow
def test_knn_monitor_every_n_epochs_in_history_and_tensorboard(tmp_path):
    """--knn_monitor_every=2 over 4 epochs: the first, every second and the last epoch (1, 2, 4)."""
    workdir = tmp_path / "run"
    run(workdir, "--mode=pretrain", "--epochs=4", "--steps_per_epoch=2", "--knn_monitor_every=2")
    history = json.loads((workdir / "pretrain.json").read_text())["history"]
    assert [row["epoch"] for row in history if "knn_top1" in row] == [1, 2, 4]
    assert sorted(tensorboard_scalars(workdir / "logs" / "train")["epoch_knn_top1"]) == [0, 1, 3]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path):
    flags = ["--mode=pretrain", "--epochs=2", "--steps_per_epoch=8", "--checkpoint_every_steps=2",
             "--knn_monitor_every=0"]
    reference = tmp_path / "reference"
    run(reference, *flags)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, RUN, *TINY, f"--workdir={interrupted}", *flags], cwd=ROOT,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        state = interrupted / "checkpoints" / "checkpoint"
        while time.time() < deadline:  # wait for a mid-epoch checkpoint of epoch 1, then kill -9
            if state.exists() and "ckpt-" in state.read_text():
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (interrupted / "pretrain.json").exists()
    resumed = run(interrupted, *flags)
    assert "Resuming" in resumed.stdout
    for workdir in (reference, interrupted):
        run(workdir, *flags, "--mode=export")
    x = np.random.default_rng(1).normal(size=(8, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(embeddings(interrupted, x), embeddings(reference, x), rtol=1e-4, atol=1e-5)
    # The interrupted epoch's logged means cover all of its steps, as the uninterrupted run's do.
    a = json.loads((reference / "pretrain.json").read_text())["history"]
    b = json.loads((interrupted / "pretrain.json").read_text())["history"]
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] == [1, 2]
    for key in ("loss", "projection_std"):
        np.testing.assert_allclose([h[key] for h in b], [h[key] for h in a], rtol=1e-5, err_msg=key)
    rows = (interrupted / "logs" / "history.csv").read_text().splitlines()
    assert len(rows) == 3  # a header and one row per epoch


@pytest.mark.slow
def test_multi_crop_run_trains_and_exports_a_fixed_size_encoder(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--mode=pretrain", "--epochs=1", "--steps_per_epoch=3", "--local_views=2", "--local_size=8",
             "--local_crop_scale=0.2,0.5"]
    run(workdir, *flags)
    saved = json.loads((workdir / "flags.json").read_text())["training"]
    assert (saved["local_views"], saved["local_size"], saved["local_crop_scale"]) == (2, 8, ["0.2", "0.5"])
    history = json.loads((workdir / "pretrain.json").read_text())["history"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    run(workdir, *flags[1:], "--mode=export")
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 1)).astype(np.float32)
    assert embeddings(workdir, x).shape == (2, 64)  # the export keeps the 16 px input signature
    other = run(workdir, *flags[1:], "--local_views=0", "--mode=pretrain", check=False)
    assert other.returncode != 0 and "--local_views: workdir has 2, this run asks 0" in other.stderr


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--mode=pretrain", "--epochs=1", "--steps_per_epoch=4", "--checkpoint_every_steps=2",
             "--knn_monitor_every=0"]
    run(workdir, *flags)
    checkpoints = workdir / "checkpoints"
    newest = max((p for p in checkpoints.iterdir() if p.name.endswith(".index")),
                 key=lambda p: int(p.name.split("-")[1].split(".")[0]))
    for data in checkpoints.glob(newest.name.replace(".index", ".data-*")):
        data.write_bytes(data.read_bytes()[:10])  # truncated, as a killed write might leave it
    result = run(workdir, *flags)
    assert "could not be restored" in result.stderr and "falling back" in result.stderr
    # With every checkpoint corrupt, it refuses to restart from scratch.
    for data in checkpoints.glob("*.data-*"):
        data.write_bytes(b"garbage")
    result = run(workdir, *flags, check=False)
    assert result.returncode != 0 and "Refusing to start from scratch" in result.stderr


@pytest.mark.slow
def test_workdir_of_another_configuration_is_refused_untouched(tmp_path):
    workdir = tmp_path / "run"
    run(workdir, "--mode=pretrain", "--epochs=1", "--steps_per_epoch=2", "--knn_monitor_every=0")
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    result = run(workdir, "--mode=pretrain", "--epochs=1", "--steps_per_epoch=2", "--eps=0.3", check=False)
    assert result.returncode != 0
    assert "different configuration" in result.stderr and "--eps: workdir has 0.1, this run asks 0.3" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before
    # A workdir made before a flag existed (here: no stem_stride in flags.json) means its default.
    saved = json.loads((workdir / "flags.json").read_text())
    del saved["training"]["stem_stride"]
    (workdir / "flags.json").write_text(json.dumps(saved))
    same = run(workdir, "--mode=pretrain", "--epochs=1", "--steps_per_epoch=2", "--knn_monitor_every=0")
    assert "already complete" in same.stdout
    other = run(workdir, "--mode=pretrain", "--epochs=1", "--steps_per_epoch=2", "--stem_stride=1", check=False)
    assert other.returncode != 0 and "--stem_stride: workdir has 2, this run asks 1" in other.stderr


@pytest.mark.parametrize("flag,message", [
    ("--freq=0", "--freq=0: must be an integer >= 1"),
    ("--rho=1.5", "--rho=1.5: must be in [0, 1)"),
    ("--rho=fast", "--rho='fast': give a number in [0, 1) or 'none'"),
    ("--batch_size=0", "--batch_size=0: must be >= 1"),
    ("--synchronized_bn=yes", "choose auto, true or false"),
    ("--stem_stride=3", "--stem_stride=3: choose 1 or 2"),
    ("--encoder=resnet18 --stem_stride=1", "applies to --encoder=small only"),
    ("--encoder=resnet18 --widths=16,32", "--widths=['16', '32'] applies to --encoder=small only"),
    ("--widths=16,x", "--widths=16,x: give positive integers"),
    ("--widths=16,0", "--widths=16,0: every width must be >= 1"),
    ("--convs_per_stage=0", "--convs_per_stage=0: must be >= 1"),
    ("--augment_options=crop_scale=0.3", "--augment_options='crop_scale=0.3': augmentation option"),
    ("--augment_options=nope=1", "FIELD one of"),
    ("--local_views=-1", "--local_views=-1: must be >= 0"),
    ("--local_size=1", "--local_size=1: must be >= 2 pixels"),
    ("--local_crop_scale=0.5,0.2", "--local_crop_scale=0.5,0.2: give two area fractions"),
    ("--local_crop_scale=0.5", "--local_crop_scale=0.5: give two area fractions"),
    ("--steps_per_execution=0", "--steps_per_execution=0: give auto or an integer >= 1"),
    ("--steps_per_execution=3", "--steps_per_execution=3 --checkpoint_every_steps=200: checkpoints are taken "
                                "between executions, so --checkpoint_every_steps must be a multiple of "
                                "--steps_per_execution (or 0), e.g. 201"),
])
def test_bad_flag_values_name_the_value_and_the_fix(flag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse("--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), *flag.split())


def test_stem_stride_reaches_the_small_encoder():
    import builders
    for stride in (1, 2):
        config = parse("--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), f"--stem_stride={stride}")
        encoder = builders.build_encoder(config)
        first_conv = next(layer for layer in encoder.layers if "conv" in type(layer).__name__.lower())
        assert first_conv.strides == (stride, stride)


def test_small_encoder_flags_build_that_architecture():
    import builders
    config = parse("--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), "--widths=8,16,24",
                   "--convs_per_stage=2", "--stem_stride=1")
    encoder = builders.build_encoder(config)
    convs = [layer for layer in encoder.layers if "conv" in type(layer).__name__.lower()]
    assert [c.filters for c in convs] == [8, 8, 16, 16, 24, 24] and encoder.output_shape[-1] == 24
    assert [c.strides[0] for c in convs] == [1, 1, 2, 1, 2, 1]


def test_augment_options_reach_the_pretraining_views():
    """--augment_options changes the views the runner trains on (here: erase everything)."""
    import pretraining
    from keras_ncssl import data
    config = parse("--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), "--dataset=digits",
                   "--image_size=8", "--batch_size=4", "--augment_options=erase_prob=1,erase_scale=1:1,"
                   "erase_ratio=1:1,erase_value=1,jitter_prob=0")
    splits = data.load_dataset("digits", validation_fraction=0.1, seed=0)
    view1, view2 = next(iter(pretraining.pretrain_input(config, splits, epoch=0)))
    erased = (1.0 - np.asarray(splits.mean)) / np.asarray(splits.std)  # pixel value 1, normalised
    for view in (view1, view2):
        np.testing.assert_allclose(view.numpy(), np.broadcast_to(erased, view.shape), rtol=1e-5)


def test_steps_per_execution_auto_divides_the_checkpoint_interval(monkeypatch):
    """auto: up to 8 steps per call on a CPU-only machine with one replica, the largest that divides
    --checkpoint_every_steps; 1 with an accelerator or several replicas; a number is kept."""
    import builders
    from keras_ncssl import runtime
    quick = "--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags")

    class Strategy:
        def __init__(self, replicas):
            self.num_replicas_in_sync = replicas

    monkeypatch.setattr(runtime, "accelerators", lambda: [])
    for every, expected in ((200, 8), (100, 5), (7, 7), (9, 3), (0, 8), (1, 1)):
        config = parse(quick, f"--checkpoint_every_steps={every}")
        assert builders.steps_per_execution(config, Strategy(1)) == expected, every
    config = parse(quick)
    assert builders.steps_per_execution(config, Strategy(2)) == 1
    assert builders.steps_per_execution(parse(quick, "--steps_per_execution=4"), Strategy(1)) == 4
    monkeypatch.setattr(runtime, "accelerators", lambda: ["GPU:0"])
    assert builders.steps_per_execution(config, Strategy(1)) == 1


@pytest.mark.parametrize("every,per_call,first,steps,expected", [
    (4, 2, 0, 10, [4, 8]),         # calls end at 2, 4, ..., 10: saves at the multiples, none at the epoch's end
    (4, 4, 0, 8, [4]),
    (6, 4, 0, 13, [8, 12]),        # not a multiple (settings changed on resume): the first call past each
    (4, 4, 2, 12, [6, 10]),        # resumed between multiples of 4
    (0, 4, 0, 12, []),
])
def test_step_checkpoint_saves_at_the_first_execution_end_past_each_multiple(every, per_call, first, steps, expected):
    import pretraining
    saved = []
    saver = pretraining._StepCheckpoint(saved.append, every, first, steps)
    for end in range(per_call - 1, steps - first + per_call - 1, per_call):  # Keras' end_step per call
        saver.on_train_batch_end(end)
    assert saved == expected


def test_flag_values_resolve():
    config = parse("--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), "--rho=none")
    assert config["rho"] is None and config["predictor"] == "directpred" and config["dataset"] == "fashion_mnist"


@pytest.mark.parametrize("flag,message", [
    ("--predictor=direct", "value should be one of"),
    ("--dataset=cifar10", "cifar10"),
])
@pytest.mark.slow
def test_bad_flags_fail_before_training(tmp_path, flag, message):
    result = run(tmp_path / "run", flag, "--data_dir=" + str(tmp_path / "no_data"), check=False, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()
    assert "epoch 1/" not in result.stdout and "Data:" not in result.stdout  # no data loaded, no step taken


@pytest.mark.slow
def test_batch_not_divisible_by_replicas_fails_clearly(tmp_path):
    result = run(tmp_path / "run", "--strategy=cpu:2", "--batch_size=33", check=False, timeout=120)
    assert result.returncode != 0
    assert "--batch_size=33" in result.stderr and "2 replicas" in result.stderr


def test_short_flagfile_form_resolves_from_the_root_and_from_experiments(tmp_path, monkeypatch):
    import runner_flags
    stl10 = os.path.join(ROOT, "experiments", "stl10.flags")
    for where in (ROOT, os.path.join(ROOT, "experiments"), str(tmp_path)):
        monkeypatch.chdir(where)
        resolved = runner_flags.resolve_flagfile_arguments(["run.py", "--flagfile=stl10.flags", "--seed=1"])
        assert resolved[0] == "run.py" and resolved[2] == "--seed=1"
        assert os.path.samefile(resolved[1].split("=", 1)[1], stl10), where
    # A file of that name where it is run wins; a name found nowhere is left for absl to report.
    (tmp_path / "stl10.flags").write_text("--epochs=1\n")
    monkeypatch.chdir(tmp_path)
    assert runner_flags.resolve_flagfile_arguments(["--flagfile=stl10.flags"]) == ["--flagfile=stl10.flags"]
    assert runner_flags.resolve_flagfile_arguments(["--flagfile=none.flags"]) == ["--flagfile=none.flags"]


@pytest.mark.slow
def test_short_flagfile_form_runs_the_stl10_configuration(tmp_path):
    # `--flagfile=stl10.flags` from the repository root: STL-10 is absent, so it fails fast with
    # the dataset's one-line message, which shows the flagfile was found and its flags applied.
    (tmp_path / "tfds").mkdir()  # exists, but holds no STL-10
    result = subprocess.run([sys.executable, RUN, "--flagfile=stl10.flags", f"--workdir={tmp_path / 'w'}",
                             f"--data_dir={tmp_path / 'tfds'}"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("run.py: error: --dataset=stl10 ") and "manual" in line


@pytest.mark.slow
def test_two_replica_run_end_to_end_and_exports(tmp_path):
    workdir = tmp_path / "run"
    run(workdir, "--strategy=cpu:2", "--epochs=1", "--steps_per_epoch=3", "--eval_baselines=false")
    report = json.loads((workdir / "report.json").read_text())
    assert report["flags"]["strategy"] == "cpu:2" and report["linear_probe_top1"] > 0.1
    x = np.random.default_rng(2).normal(size=(2, 16, 16, 1)).astype(np.float32)
    assert np.all(np.isfinite(embeddings(workdir, x)))


def test_predictor_flag_choices_are_the_rules_and_the_trainable_predictors():
    """runner_flags cannot import the registry (TensorFlow) before --help: its list must match."""
    import runner_flags
    from keras_ncssl.predictors import RULES
    from keras_ncssl.predictors.baselines import TRAINABLE
    assert sorted(runner_flags.PREDICTORS) == sorted([*RULES, *TRAINABLE])


def test_run_configuration_groups_every_flag_once_and_never_changes():
    import dataclasses

    import run_config
    import runner_flags
    config = parse("--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), "--rho=none", "--widths=8,16")
    assert isinstance(config, run_config.RunConfig)
    fields = [f.name for cls in run_config.GROUPS.values() for f in dataclasses.fields(cls)]
    assert sorted(fields) == sorted(runner_flags.NAMES)  # each flag in exactly one group
    assert not config.ungrouped  # a new flag: add it to its group in run_config.py
    # The groups hold the resolved values; the flat names read the same ones.
    assert config.predictor.rho is None and config.model.widths == [8, 16] and config["widths"] == [8, 16]
    assert config.optimisation.lr == config["lr"] and config.model.encoder == "small"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optimisation.lr = 1.0
    with pytest.raises(AttributeError, match="replace"):
        config.model = None
    evaluating = config.replace(mode="eval")
    assert (evaluating.run.mode, config.run.mode) == ("eval", "all")
    assert json.loads(json.dumps(evaluating.as_dict()))["mode"] == "eval"
    with pytest.raises(KeyError, match="no flag 'nope'"):
        config["nope"]


def test_report_of_an_empty_workdir_records_the_run_configuration(tmp_path):
    import report
    config = parse("--flagfile=" + os.path.join(ROOT, "experiments", "quick.flags"), f"--workdir={tmp_path}")
    path = report.write(config)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["flags"] == json.loads(json.dumps(config.as_dict())) and saved[report.LINEAR_PROBE] is None
    assert "--encoder=small" in open(path).read()
