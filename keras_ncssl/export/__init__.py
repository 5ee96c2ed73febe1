"""Encoder export for deployment and reuse, loadable without keras_ncssl.

`export_encoder(model_or_encoder, path, mean=..., std=..., ...)` writes one directory:

* a SavedModel whose ``serve`` signature (also ``serving_default``) takes raw uint8 images of
  any size, [N, H, W, 1 or 3], applies the evaluation's preprocessing (channels, resize,
  normalisation with the stored statistics) and returns ``{"embeddings": float32 [N, D]}`` from
  the encoder in inference mode; ``serve_float`` takes the same pixels as float32 0..255, and
  ``serve_normalized`` takes already preprocessed [N, S, S, C] images (`serving`);
* ``encoder.keras``, the encoder with built-in Keras layers only, for fine-tuning with plain
  Keras (`plain_keras`);
* ``assets.extra/keras_ncssl_encoder.json``: signatures, the preprocessing (image size,
  channels, mean, std, geometry, steps in words), versions and the caller's metadata.

Modules: `contract` (the preprocessing's parameters, checked), `serving` (the signatures'
TensorFlow ops and input checks), `plain_keras` (the `.keras` file), `writer` (atomic write and
verification), `loader` (`load_encoder`).
"""
from keras_ncssl.export.contract import GEOMETRIES, InputContract, evaluation_input, make_contract
from keras_ncssl.export.loader import LoadedEncoder, load_encoder
from keras_ncssl.export.plain_keras import NotPlainKerasError, to_plain_keras
from keras_ncssl.export.serving import (FLOAT_SIGNATURE, INPUT_NAME, NORMALIZED_SIGNATURE, OUTPUT_NAME,
                                        SIGNATURE)
from keras_ncssl.export.writer import KERAS_FILE, METADATA_FILE, export_encoder

__all__ = [
    "FLOAT_SIGNATURE", "GEOMETRIES", "INPUT_NAME", "InputContract", "KERAS_FILE", "LoadedEncoder",
    "METADATA_FILE", "NORMALIZED_SIGNATURE", "NotPlainKerasError", "OUTPUT_NAME", "SIGNATURE",
    "evaluation_input", "export_encoder", "load_encoder", "make_contract", "to_plain_keras",
]
