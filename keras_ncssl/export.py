"""Encoder-only SavedModel export, loadable without keras_ncssl, Keras or a strategy scope.

PITFALLS.md "Export and reuse": peers export whole training models that need the library's
code or the distribution scope to load (tensorflow/similarity#287, #188; keras-io#926,
#1309), or hand out graphs whose tensors users look up by name (simclr#177, #193, #108).
This module writes the encoder only, with one named signature:

    serve(images: float32 [None, H, W, C]) -> {"embeddings": float32 [None, D]}

(also exposed as ``serving_default`` for TF Serving), with the encoder called in inference
mode (``training=False``: BatchNorm uses its moving statistics). Images must be normalised
exactly as during training; the export does no preprocessing.

Mechanism: ``keras.export.ExportArchive`` (Keras 3.15) tracks the encoder's variables and
traces one endpoint from an explicit ``tf.TensorSpec(name="images")``; ``write_out`` calls
``tf.saved_model.save`` with the endpoint as a signature. It is chosen over a hand-written
``tf.Module`` because it also tracks lookup tables of preprocessing layers and converts
non-TensorFlow variables, and the result is a plain SavedModel: loading it needs only
``tf.saved_model.load(path).signatures["serve"]``. Distributed (MirroredStrategy) variables
are saved as single variables, so no strategy scope is needed to load.

Writing is atomic at the directory level: the SavedModel is written to a temporary
directory beside ``path`` and checked by reloading it and comparing its output with the
in-memory encoder; only then does it replace ``path`` (old export renamed aside, new one
renamed in, old one deleted). If anything fails before that, ``path`` is untouched.
"""
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_ncssl.evaluation import resolve_encoder

SIGNATURE = "serve"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
METADATA_FILE = os.path.join("assets.extra", "keras_ncssl_encoder.json")


def _full_input_shape(encoder, input_shape):
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
    if len(shape) == 3:
        shape = (None,) + shape
    if len(shape) != 4:
        raise ValueError(f"input_shape={input_shape!r}: expected (H, W, C) or "
                         "(batch, H, W, C)")
    for dim in shape[1:]:
        if dim is not None and (not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"input_shape={input_shape!r}: dimensions must be positive "
                             "integers or None")
    # The batch dimension is always left open.
    return (None,) + tuple(None if d is None else int(d) for d in shape[1:])


def _save_archive(archive, directory):
    """Writes the archive; a separate function so tests can make the write fail."""
    archive.write_out(directory, verbose=False)


def _looks_like_saved_model(path):
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "saved_model.pb"))
        or os.path.exists(os.path.join(path, "saved_model.pbtxt")))


def _verify(directory, encoder, shape):
    """Reloads the written SavedModel and checks it reproduces the in-memory encoder."""
    loaded = tf.saved_model.load(directory)
    if SIGNATURE not in loaded.signatures:
        raise RuntimeError(f"export check failed: no {SIGNATURE!r} signature in {directory}")
    if None in shape[1:]:
        return None  # no concrete test batch for an open spatial shape
    images = np.random.default_rng(0).normal(size=(2,) + shape[1:]).astype(np.float32)
    exported = loaded.signatures[SIGNATURE](**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME]
    expected = tf.cast(encoder(images, training=False), tf.float32)
    if exported.shape != expected.shape or not np.allclose(exported, expected, rtol=1e-4,
                                                           atol=1e-5):
        raise RuntimeError("export check failed: the reloaded SavedModel's embeddings differ "
                           "from the in-memory encoder's")
    return int(expected.shape[-1])


def export_encoder(model_or_encoder, path, input_shape=None, *, verify=True):
    """Writes an encoder-only SavedModel with a ``serve`` signature to ``path``.

    Args:
        model_or_encoder: a BYOL/SimSiam model (its online ``.encoder`` is exported) or an
            encoder (keras.Model or layer) mapping images [B, H, W, C] to features [B, D].
        path: directory to write. An existing SavedModel there is replaced once the new one
            is complete; any other existing file or directory is refused (ValueError), so a
            mistyped path never deletes unrelated data.
        input_shape: (H, W, C), or (batch, H, W, C) with the batch ignored; H and W may be
            None for a fully convolutional encoder. Default: the encoder's ``input_shape``.
        verify: reload the written SavedModel and compare it with the encoder on a random
            batch before replacing ``path``.

    Returns:
        ``path`` as a string.

    Load it anywhere with ``tf.saved_model.load(path).signatures["serve"](images=x)
    ["embeddings"]``, or with :func:`load_encoder`.
    """
    encoder = resolve_encoder(model_or_encoder)
    if not isinstance(encoder, keras.layers.Layer):
        raise ValueError(f"the encoder must be a Keras layer or model to be exported; got "
                         f"{type(encoder).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not _looks_like_saved_model(path):
        raise ValueError(f"path={path!r} exists and is not a SavedModel directory; refusing to "
                         "replace it. Choose a new path or remove it yourself.")
    shape = _full_input_shape(encoder, input_shape)
    if not encoder.built:
        if None in shape[1:]:
            raise ValueError(f"encoder is not built and input_shape={shape!r} is not fully "
                             "known; build it (call it once) or give H, W and C")
        encoder(np.zeros((1,) + shape[1:], np.float32), training=False)

    def serve(images):
        # float32 out even under a mixed-precision policy: callers compare embeddings.
        return {OUTPUT_NAME: tf.cast(encoder(images, training=False), tf.float32)}

    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[
        tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])

    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        _save_archive(archive, staging)
        dim = _verify(staging, encoder, shape) if verify else None
        os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump({"signature": SIGNATURE, "input": INPUT_NAME, "output": OUTPUT_NAME,
                       "input_shape": list(shape), "embedding_dim": dim,
                       "encoder_name": getattr(encoder, "name", None),
                       "tensorflow_version": tf.__version__,
                       "keras_version": keras.__version__}, f, indent=1)
        _replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


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


class LoadedEncoder:
    """A callable around an exported encoder: ``embeddings = encoder(images)``.

    Holds the loaded object so its variables stay alive as long as the signature is used
    (a bare ``tf.saved_model.load(p).signatures[...]`` can outlive them).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._loaded = tf.saved_model.load(self.path)
        if SIGNATURE not in self._loaded.signatures:
            raise ValueError(f"{self.path!r} has no {SIGNATURE!r} signature (has "
                             f"{sorted(self._loaded.signatures)}); was it written by "
                             "export_encoder?")
        self.signature = self._loaded.signatures[SIGNATURE]

    @property
    def input_shape(self):
        """(None, H, W, C) as exported."""
        return tuple(self.signature.structured_input_signature[1][INPUT_NAME].shape)

    @property
    def embedding_dim(self):
        return self.signature.structured_outputs[OUTPUT_NAME].shape[-1]

    def __call__(self, images):
        """Embeddings float32 [B, D] (a tf.Tensor) of normalised images [B, H, W, C]."""
        images = tf.convert_to_tensor(images, tf.float32)
        return self.signature(**{INPUT_NAME: images})[OUTPUT_NAME]


def load_encoder(path):
    """Loads an export of :func:`export_encoder` as a callable ``images -> embeddings``."""
    return LoadedEncoder(path)
