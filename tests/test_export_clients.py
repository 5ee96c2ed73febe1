"""The export as its users meet it: a fresh process without keras_ncssl (SavedModel and the
plain-Keras file, with a fine-tuning step), bad inputs in a process that could abort,
`saved_model_cli` (what TF Serving sees) and TFLite on raw uint8 images."""
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf

from export_helpers import bn_encoder, relative_error, run_fresh_python
from keras_ncssl import augment, distribute, export

SIZE = 12
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.2, 0.3)


def _export(rng, path, channels=3, **options):
    encoder = bn_encoder(rng, (SIZE, SIZE, channels))
    return encoder, export.export_encoder(encoder, path, mean=MEAN[:channels],
                                          std=STD[:channels], **options)


def _expected_raw(encoder, raw, channels=3):
    """The evaluation's features (augment.eval_dataset preprocessing, inference mode)."""
    x = next(iter(augment.eval_dataset(tf.data.Dataset.from_tensor_slices(raw), batch_size=len(raw),
                                       image_size=SIZE, channels=channels, mean=MEAN[:channels],
                                       std=STD[:channels])))
    return encoder(x, training=False).numpy()


@pytest.mark.slow  # a second Python process importing TensorFlow
def test_fresh_process_without_keras_ncssl_serves_and_fine_tunes(rng, tmp_path):
    """SavedModel (raw and normalised signatures) and encoder.keras, loaded where importing
    keras_ncssl raises; for an encoder and for one built under MirroredStrategy (loaded
    without any strategy scope)."""
    raw = rng.integers(0, 256, (4, 19, 15, 1), dtype=np.uint8)
    x = rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "x.npy", x)
    made = {"plain": _export(rng, tmp_path / "plain")[0]}
    if len(tf.config.list_logical_devices("CPU")) >= 2:
        with distribute.get_strategy("cpu:2").scope():
            made["mirrored"] = bn_encoder(rng, (SIZE, SIZE, 3), name="mirrored")
        export.export_encoder(made["mirrored"], tmp_path / "mirrored", mean=MEAN, std=STD)
    expected = {name: (_expected_raw(encoder, raw), encoder(x, training=False).numpy())
                for name, encoder in made.items()}

    code = textwrap.dedent(f"""
        import json
        import keras
        import numpy as np
        import tensorflow as tf
        root = {str(tmp_path)!r}
        raw, x = np.load(root + "/raw.npy"), np.load(root + "/x.npy")
        report = {{}}
        for name in {sorted(made)!r}:
            path = root + "/" + name
            sigs = tf.saved_model.load(path).signatures
            out = sigs["serve"](images=tf.constant(raw))
            assert set(out) == {{"embeddings"}}, set(out)
            np.save(path + ".raw.npy", out["embeddings"].numpy())
            np.save(path + ".x.npy", sigs["serve_normalized"](images=tf.constant(x))["embeddings"])
            model = keras.models.load_model(path + "/encoder.keras")
            classes = sorted({{type(layer).__module__ + "." + type(layer).__name__
                              for layer in model.layers}})
            np.save(path + ".keras.npy", model(x, training=False).numpy())
            # One fine-tuning step with plain Keras: a head on the encoder, SGD, 3 classes.
            head = keras.Sequential([model, keras.layers.Dense(3)])
            head.compile(optimizer=keras.optimizers.SGD(0.1),
                         loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            before = [w.numpy().copy() for w in model.weights]
            loss = float(head.train_on_batch(x, np.array([0, 1, 2, 0])))
            changed = [not np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights)]
            report[name] = {{"classes": classes, "loss": loss, "changed": sum(changed),
                            "weights": len(changed),
                            "moving_changed": sum(c for c, w in zip(changed, model.weights)
                                                  if "moving" in w.path)}}
        import sys
        report["imported"] = sorted(m for m in sys.modules if m.startswith("keras_ncssl"))
        print(json.dumps(report))
    """)
    done = run_fresh_python(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("imported") == []
    for name, (want_raw, want_x) in expected.items():
        assert relative_error(np.load(tmp_path / f"{name}.raw.npy"), want_raw) <= 1e-5, name
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.x.npy"), want_x, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.keras.npy"), want_x, atol=1e-5)
        got = report[name]
        assert all(c.startswith("keras.") for c in got["classes"]), got["classes"]
        assert "keras.src.layers.normalization.batch_normalization.BatchNormalization" in \
            got["classes"]
        assert np.isfinite(got["loss"])
        # Every trainable weight moved and the BN statistics were updated (training mode).
        assert got["moving_changed"] == 4 and got["changed"] == got["weights"], got


# Issue 24: in the old export a rank-3 image reached the convolution and oneDNN aborted the
# whole process (exit 134), and other sizes than the declared one were embedded silently.
# Run in a subprocess, so an abort fails this test instead of killing pytest.
BAD_INPUTS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    sigs = tf.saved_model.load(sys.argv[1]).signatures
    size = int(sys.argv[2])
    results = []

    def attempt(name, shape, dtype):
        if name not in sigs:
            results.append([name, list(shape), "missing signature"])
            return
        try:
            out = sigs[name](images=tf.zeros(shape, dtype))["embeddings"]
            results.append([name, list(shape), "ok", list(out.shape)])
        except tf.errors.InvalidArgumentError as error:
            results.append([name, list(shape), "InvalidArgumentError", error.message])
        print(json.dumps(results[-1]), flush=True)  # what was reached before any abort

    for name in ("serve", "serve_normalized"):
        dtype = sigs[name].structured_input_signature[1]["images"].dtype if name in sigs else None
        attempt(name, (size, size, 1), dtype)  # one image without its batch axis
        for side in (32, 10, 2):
            attempt(name, (2, side, side, 1), dtype)
        attempt(name, (0, size, size, 1), dtype)
    print("RESULTS " + json.dumps(results))
""")


@pytest.mark.slow  # a subprocess
def test_bad_inputs_fail_with_clear_errors_not_an_abort(rng, tmp_path):
    _, path = _export(rng, tmp_path / "enc", channels=1)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", BAD_INPUTS, path, str(SIZE)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"the process died (exit {done.returncode}) after:\n"
                                  f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    results = json.loads(done.stdout.split("RESULTS ", 1)[1])
    by_case = {(name, tuple(shape)): rest for name, shape, *rest in results}
    rank3 = by_case["serve", (SIZE, SIZE, 1)]
    assert rank3[0] == "InvalidArgumentError" and "expected shape [?,?,?,?]" in rank3[1]
    rank3 = by_case["serve_normalized", (SIZE, SIZE, 1)]
    assert rank3[0] == "InvalidArgumentError"
    assert f"expected shape [?,{SIZE},{SIZE},1]" in rank3[1]
    for side in (32, 10, 2):
        # Raw images of any size are resized, as the evaluation would ...
        assert by_case["serve", (2, side, side, 1)] == ["ok", [2, 16]]
        # ... preprocessed ones must have the encoder's size.
        error = by_case["serve_normalized", (2, side, side, 1)]
        assert error[0] == "InvalidArgumentError"
        assert f"[2,{side},{side},1] is not compatible with expected shape [?,{SIZE},{SIZE},1]" \
            in error[1]
    for name in ("serve", "serve_normalized"):
        assert by_case[name, (0, SIZE, SIZE, 1)] == ["ok", [0, 16]]


def _saved_model_cli():
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    return [cli] if os.path.exists(cli) else [sys.executable, "-m",
                                              "tensorflow.python.tools.saved_model_cli"]


def _signature_blocks(text):
    """saved_model_cli show --all output -> {signature: block text}."""
    parts = re.split(r"signature_def\['([^']+)'\]:", text)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.slow  # subprocesses
def test_saved_model_cli_shows_and_runs_the_signatures(rng, tmp_path):
    """What TF Serving sees: signature names, dtypes and shapes; and `run` on raw uint8."""
    encoder, path = _export(rng, tmp_path / "enc")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    shown = subprocess.run([*_saved_model_cli(), "show", "--dir", path, "--all"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    blocks = _signature_blocks(shown.stdout)
    assert {"serve", "serve_float", "serve_normalized", "serving_default"} <= set(blocks)
    expected = {"serve": ("DT_UINT8", "(-1, -1, -1, -1)"),
                "serving_default": ("DT_UINT8", "(-1, -1, -1, -1)"),
                "serve_float": ("DT_FLOAT", "(-1, -1, -1, -1)"),
                "serve_normalized": ("DT_FLOAT", f"(-1, {SIZE}, {SIZE}, 3)")}
    for name, (dtype, shape) in expected.items():
        block = re.sub(r"\s+", " ", blocks[name])
        assert re.search(rf"inputs\['images'\] tensor_info: dtype: {dtype} shape: "
                         rf"{re.escape(shape)} name: {name}_images:0", block), block
        assert "outputs['embeddings'] tensor_info: dtype: DT_FLOAT shape: (-1, 16)" in block
        assert "Method name is: tensorflow/serving/predict" in block
    raw = rng.integers(0, 256, (3, 17, 21, 3), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    ran = subprocess.run([*_saved_model_cli(), "run", "--dir", path, "--tag_set", "serve",
                          "--signature_def", "serve", "--inputs", f"images={tmp_path}/raw.npy",
                          "--outdir", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    got = np.load(tmp_path / "out" / "embeddings.npy")
    assert relative_error(got, _expected_raw(encoder, raw)) <= 1e-5


@pytest.mark.slow  # TFLite conversion: ~10 s
def test_tflite_runs_serve_on_raw_uint8_images(rng, tmp_path):
    _, path = _export(rng, tmp_path / "enc")
    converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=["serve"])
    model = converter.convert()  # built-in TFLite ops only: no Flex delegate needed
    with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated" (-> LiteRT)
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=model)
    assert list(interpreter.get_signature_list()) == ["serve"]
    runner = interpreter.get_signature_runner("serve")
    serve = export.load_encoder(path).embed_raw
    worst = 0.0
    for shape in ((3, SIZE, SIZE, 3), (2, 28, 20, 1), (1, 5, 7, 3)):
        raw = rng.integers(0, 256, shape, dtype=np.uint8)
        got = runner(images=raw)["embeddings"]
        worst = max(worst, relative_error(got, serve(raw)))
    assert worst <= 1e-4, worst
    print(f"TFLite vs SavedModel, largest relative difference: {worst:.1e}")


@pytest.mark.slow  # tf2onnx conversion in a subprocess
def test_onnx_runs_serve_on_raw_uint8_images(rng, tmp_path):
    """Optional client: tf2onnx and onnxruntime are not project dependencies (BUILD_NOTES.md,
    "Exported encoders": tf2onnx 1.17 works with TF 2.21); skipped where they are missing."""
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    _, path = _export(rng, tmp_path / "enc")
    onnx_path = str(tmp_path / "serve.onnx")
    done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", path,
                           "--signature_def", "serve", "--opset", "17", "--output", onnx_path],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    session = ort.InferenceSession(onnx_path)
    (inputs,) = session.get_inputs()
    assert (inputs.name, inputs.type) == ("images", "tensor(uint8)")
    serve = export.load_encoder(path).embed_raw
    for shape in ((3, SIZE, SIZE, 3), (2, 23, 9, 1)):
        raw = rng.integers(0, 256, shape, dtype=np.uint8)
        got = session.run(["embeddings"], {"images": raw})[0]
        assert relative_error(got, serve(raw)) <= 1e-4, shape
