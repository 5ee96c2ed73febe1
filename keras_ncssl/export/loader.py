"""`load_encoder`: the export as a Python callable (TensorFlow only, no Keras model code)."""
import json
import os

import numpy as np
import tensorflow as tf

from keras_ncssl.export import serving
from keras_ncssl.export.writer import METADATA_FILE


class LoadedEncoder:
    """An exported encoder: ``encoder(normalised)`` like the Keras encoder, ``embed_raw(pixels)``.

    Holds the loaded object so its variables stay alive as long as the signatures are used
    (a bare ``tf.saved_model.load(p).signatures[...]`` can outlive them).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._loaded = tf.saved_model.load(self.path)
        names = (serving.SIGNATURE, serving.FLOAT_SIGNATURE, serving.NORMALIZED_SIGNATURE)
        missing = [name for name in names if name not in self._loaded.signatures]
        if missing:
            raise ValueError(f"{self.path!r} has no {missing} signature(s) (has "
                             f"{sorted(self._loaded.signatures)}); was it written by this "
                             "version of export_encoder? Export it again.")
        self.signatures = {name: self._loaded.signatures[name] for name in names}
        with open(os.path.join(self.path, METADATA_FILE)) as f:
            self.metadata = json.load(f)

    @property
    def input_shape(self):
        """(None, S, S, C): the shape of the encoder's normalised input."""
        spec = self.signatures[serving.NORMALIZED_SIGNATURE].structured_input_signature[1]
        return tuple(spec[serving.INPUT_NAME].shape)

    @property
    def embedding_dim(self):
        outputs = self.signatures[serving.SIGNATURE].structured_outputs
        return outputs[serving.OUTPUT_NAME].shape[-1]

    def _call(self, name, images, dtype):
        images = tf.convert_to_tensor(images, dtype)
        return self.signatures[name](**{serving.INPUT_NAME: images})[serving.OUTPUT_NAME]

    def __call__(self, images):
        """Embeddings float32 [B, D] (a tf.Tensor) of preprocessed images [B, S, S, C]."""
        if _dtype(images) == tf.uint8:
            raise ValueError("images are uint8 raw pixels; call .embed_raw(images) for raw "
                             "images, or pass preprocessed (normalised) float images")
        return self._call(serving.NORMALIZED_SIGNATURE, images, tf.float32)

    def embed_raw(self, images):
        """Embeddings of raw images [B, H, W, 1 or 3]: uint8, or float pixel values 0..255."""
        if _dtype(images) == tf.uint8:
            return self._call(serving.SIGNATURE, images, tf.uint8)
        return self._call(serving.FLOAT_SIGNATURE, images, tf.float32)


def _dtype(images):
    return tf.as_dtype(images.dtype if tf.is_tensor(images) else np.asarray(images).dtype)


def load_encoder(path):
    """Loads an export of :func:`export_encoder` as a :class:`LoadedEncoder`."""
    return LoadedEncoder(path)
