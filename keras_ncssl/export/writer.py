"""`export_encoder`: the encoder-only export, written atomically and checked before it lands.

PITFALLS.md "Export and reuse": peers export whole training models that need the library's
code or the distribution scope to load (tensorflow/similarity#287, #188; keras-io#926,
#1309), or hand out graphs whose tensors users look up by name (simclr#177, #193, #108).
The export directory holds:

    saved_model.pb, variables/    SavedModel with signatures serve (raw uint8 images, also
                                  serving_default), serve_float, serve_normalized (`serving`)
    encoder.keras                 the encoder with built-in Keras layers only (`plain_keras`)
    assets.extra/keras_ncssl_encoder.json
                                  signatures, preprocessing (image size, channels, mean, std,
                                  geometry, steps), versions, and the caller's `metadata`

Mechanism: ``keras.export.ExportArchive`` (Keras 3.15) tracks the encoder's variables and
traces each endpoint from an explicit ``tf.TensorSpec(name="images")``; ``write_out`` calls
``tf.saved_model.save`` with the endpoints as signatures. It is chosen over a hand-written
``tf.Module`` because it also tracks lookup tables of preprocessing layers and converts
non-TensorFlow variables, and the result is a plain SavedModel: loading it needs only
``tf.saved_model.load(path).signatures["serve"]``. Distributed (MirroredStrategy) variables
are saved as single variables, so no strategy scope is needed to load.

Writing is atomic at the directory level: everything is written to a temporary directory
beside ``path`` and checked there (the reloaded SavedModel against the in-memory encoder and
against `augment.eval_dataset`'s preprocessing, the reloaded `.keras` file against the encoder);
only then does it replace ``path`` (old export renamed aside, new one renamed in, old one
deleted). If anything fails before that, ``path`` is untouched.
"""
import json
import os
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_ncssl import encoders
from keras_ncssl.evaluation import resolve_encoder
from keras_ncssl.export import plain_keras, serving
from keras_ncssl.export.contract import evaluation_input, make_contract

KERAS_FILE = "encoder.keras"
METADATA_FILE = os.path.join("assets.extra", "keras_ncssl_encoder.json")
FORMAT_VERSION = 2


def _encoder_input_shape(encoder, input_shape):
    """(H, W, C) from `input_shape` ((H, W, C) or (batch, H, W, C)) or the encoder's own."""
    if input_shape is None:
        try:
            shape = encoder.input_shape
        except (AttributeError, ValueError):
            shape = None
        if not isinstance(shape, tuple) or not shape or isinstance(shape[0], (tuple, list)):
            raise ValueError(
                f"cannot infer the input shape of encoder "
                f"{getattr(encoder, 'name', type(encoder).__name__)!r} (got {shape!r}); pass "
                "input_shape=(H, W, C)")
        input_shape = shape
    shape = tuple(input_shape)
    if len(shape) == 4:
        shape = shape[1:]  # the batch dimension is always left open
    if len(shape) != 3:
        raise ValueError(f"input_shape={input_shape!r}: expected (H, W, C) or "
                         "(batch, H, W, C)")
    for dim in shape:
        if dim is not None and (not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"input_shape={input_shape!r}: dimensions must be positive "
                             "integers or None")
    if shape[2] is None:
        raise ValueError(f"input_shape={input_shape!r}: the channel count must be known")
    return tuple(None if d is None else int(d) for d in shape)


def _save_archive(archive, directory):
    """Writes the archive; a separate function so tests can make the write fail."""
    archive.write_out(directory, verbose=False)


def _looks_like_saved_model(path):
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "saved_model.pb"))
        or os.path.exists(os.path.join(path, "saved_model.pbtxt")))


def _agree(got, expected, what):
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"export check failed: {what}")


def _verify(directory, encoder, contract):
    """Reloads the written SavedModel and checks every signature against the encoder."""
    loaded = tf.saved_model.load(directory)
    names = {serving.SIGNATURE, serving.FLOAT_SIGNATURE, serving.NORMALIZED_SIGNATURE,
             "serving_default"}
    if not names <= set(loaded.signatures):
        raise RuntimeError(f"export check failed: signatures {sorted(loaded.signatures)} in "
                           f"{directory}, expected {sorted(names)}")
    rng = np.random.default_rng(0)
    size, out = contract.image_size, serving.OUTPUT_NAME

    def call(name, images):
        return loaded.signatures[name](**{serving.INPUT_NAME: tf.constant(images)})[out]

    normalized = rng.normal(size=(2,) + contract.input_shape[1:]).astype(np.float32)
    _agree(call(serving.NORMALIZED_SIGNATURE, normalized), encoder(normalized, training=False),
           "the reloaded SavedModel's embeddings differ from the in-memory encoder's")
    raw = rng.integers(0, 256, (2, size + 3, size + 5, 1), dtype=np.uint8)  # another size, grey
    embedded = call(serving.SIGNATURE, raw)
    _agree(embedded, encoder(evaluation_input(raw, contract), training=False),
           "serve's embeddings of raw images differ from the evaluation preprocessing's")
    _agree(call(serving.FLOAT_SIGNATURE, raw.astype(np.float32)), embedded,
           "serve_float disagrees with serve on the same pixels")


def _write_plain_keras(encoder, directory, contract, required):
    """Writes and checks `encoder.keras`; returns (file name or None, why not)."""
    try:
        plain = plain_keras.to_plain_keras(encoder)
    except plain_keras.NotPlainKerasError as error:
        if required:
            raise
        warnings.warn(f"export_encoder: no {KERAS_FILE} written: {error}", stacklevel=3)
        return None, str(error)
    path = os.path.join(directory, KERAS_FILE)
    plain.save(path)
    plain_keras.check_plain_keras_file(path)
    images = np.random.default_rng(1).normal(size=(2,) + contract.input_shape[1:])
    images = images.astype(np.float32)
    _agree(keras.models.load_model(path)(images, training=False),
           encoder(images, training=False),
           f"the reloaded {KERAS_FILE} differs from the in-memory encoder")
    return KERAS_FILE, None


def _checked_metadata(metadata):
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata={metadata!r} must be a dict (it is stored as JSON)")
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata is not JSON-serialisable ({error}); pass plain numbers, "
                         "strings, lists and dicts") from None


def export_encoder(model_or_encoder, path, input_shape=None, *, mean=None, std=None,
                   image_size=None, preprocessing="resize", metadata=None, keras_model=None,
                   verify=True):
    """Writes the encoder export (SavedModel, `encoder.keras`, metadata) to ``path``.

    Args:
        model_or_encoder: a BYOL/SimSiam model (its online ``.encoder`` is exported) or an
            encoder (keras.Model or layer) mapping images [B, H, W, C] to features [B, D].
        path: directory to write. An existing SavedModel there is replaced once the new one
            is complete; any other existing file or directory is refused (ValueError), so a
            mistyped path never deletes unrelated data.
        input_shape: the encoder's (H, W, C), or (batch, H, W, C) with the batch ignored; C
            must be 1 or 3. Default: the encoder's ``input_shape``.
        mean, std: the dataset statistics the training images were normalised with (1 or 3
            values in [0, 1] units, e.g. ``DatasetSplits.mean/std``); None: not normalised.
        image_size: the side S the encoder was trained at; default H (= W). Required when
            the encoder takes any size.
        preprocessing: what `augment.eval_dataset` did to evaluation images: "resize" (the
            default, and the runner's for fixed-size data), "pad", or "center_crop" (for
            variable-size data). See `contract.GEOMETRIES`.
        metadata: a JSON-serialisable dict stored as is under "metadata" (the runner stores
            its training flags, the training step and the accuracy table).
        keras_model: write ``encoder.keras`` (built-in Keras layers only): True requires it,
            False skips it, None (default) writes it when the encoder allows (a functional
            or sequential model) and otherwise warns and records why not.
        verify: reload what was written and compare it with the encoder before replacing
            ``path``.

    Returns:
        ``path`` as a string.

    Load it anywhere with ``tf.saved_model.load(path).signatures["serve"](images=uint8)
    ["embeddings"]``, with ``keras.models.load_model(path + "/encoder.keras")``, or with
    :func:`load_encoder`.
    """
    encoder = resolve_encoder(model_or_encoder)
    if not isinstance(encoder, keras.layers.Layer):
        raise ValueError(f"the encoder must be a Keras layer or model to be exported; got "
                         f"{type(encoder).__name__}")
    if isinstance(encoder, keras.Model):  # deployed features are float32, whatever the training policy
        encoder = encoders.float32_copy(encoder)
    if keras_model not in (None, True, False):
        raise ValueError(f"keras_model={keras_model!r}; choose True, False or None (auto)")
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not _looks_like_saved_model(path):
        raise ValueError(f"path={path!r} exists and is not a SavedModel directory; refusing to "
                         "replace it. Choose a new path or remove it yourself.")
    contract = make_contract(_encoder_input_shape(encoder, input_shape), image_size, mean, std,
                             preprocessing)
    metadata = _checked_metadata(metadata)
    # Builds an unbuilt encoder too.
    dim = int(encoder(np.zeros((1,) + contract.input_shape[1:], np.float32),
                      training=False).shape[-1])

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    serving.add_signatures(archive, encoder, contract)

    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        _save_archive(archive, staging)
        if verify:
            _verify(staging, encoder, contract)
        keras_file, why_not = (None, "keras_model=False") if keras_model is False else \
            _write_plain_keras(encoder, staging, contract, keras_model is True)
        _write_metadata(staging, encoder, contract, dim, keras_file, why_not, metadata)
        _replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _write_metadata(directory, encoder, contract, dim, keras_file, why_not, metadata):
    import keras_ncssl  # the package imports this module: its version only at call time
    os.makedirs(os.path.join(directory, "assets.extra"), exist_ok=True)
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump({
            "format_version": FORMAT_VERSION,
            "default_signature": serving.SIGNATURE,
            "signatures": serving.describe_signatures(contract, dim),
            "input": serving.INPUT_NAME, "output": serving.OUTPUT_NAME,
            "input_shape": list(contract.input_shape), "embedding_dim": dim,
            "preprocessing": contract.to_json(),
            "keras_model": keras_file, "keras_model_missing_because": why_not,
            "encoder_name": getattr(encoder, "name", None),
            "tensorflow_version": tf.__version__, "keras_version": keras.__version__,
            "keras_ncssl_version": keras_ncssl.__version__,
            "metadata": metadata}, f, indent=1)


def _replace(staging, path):
    """Moves the finished export at ``staging`` to ``path``, keeping the old one until then.

    POSIX cannot atomically rename over a non-empty directory, so the old export is first
    renamed aside (same filesystem, so each rename is atomic); if the second rename fails
    the old one is put back. ``path`` is briefly absent between the two renames, never
    partially written.
    """
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    parent, base = os.path.split(path)
    aside = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rmdir(aside)  # only the unique name is wanted
    os.rename(path, aside)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)
