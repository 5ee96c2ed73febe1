"""The encoder as a `.keras` file of built-in Keras layers, for fine-tuning without keras_ncssl.

The encoders use `normalization.FusedBatchNormalization`, a subclass of
`keras.layers.BatchNormalization`, and `convolution.PatchGradientConv2D`, a subclass of
`keras.layers.Conv2D`, each with the parent's config and weights, changing only how training
computes (the fused step; the kernel gradient). A `.keras` file naming them needs
`import keras_ncssl` to load. `to_plain_keras` clones a functional or sequential encoder with
every such layer replaced by its built-in Keras parent (same config, so the same weights in the
same order), and
`check_plain_keras_file` proves that the written file names built-in Keras classes only.
"""
import json
import zipfile

import keras

from keras_ncssl.convolution import PatchGradientConv2D
from keras_ncssl.encoders import all_layers
from keras_ncssl.normalization import FusedBatchNormalization

# Library layers and the built-in Keras layer with the same config, weights and inference math.
PLAIN_EQUIVALENTS = {FusedBatchNormalization: keras.layers.BatchNormalization,
                     PatchGradientConv2D: keras.layers.Conv2D}


class NotPlainKerasError(ValueError):
    """The encoder cannot be written with built-in Keras layers only."""


def _is_builtin(cls):
    return cls.__module__.split(".")[0] == "keras"


def to_plain_keras(encoder):
    """A copy of `encoder` made of built-in Keras layers only, with identical weights."""
    custom = sorted({f"{type(layer).__module__}.{type(layer).__name__}"
                     for layer in all_layers(encoder) if not _is_builtin(type(layer))
                     and type(layer) not in PLAIN_EQUIVALENTS and not isinstance(
                         layer, keras.Model)})
    if custom:
        raise NotPlainKerasError(f"the encoder uses layers that are not built into Keras: "
                                 f"{custom}; a plain .keras file cannot hold them")

    def clone(layer):
        cls = PLAIN_EQUIVALENTS.get(type(layer), type(layer))
        return cls.from_config(layer.get_config())

    try:
        plain = keras.models.clone_model(encoder, clone_function=clone, recursive=True)
    except ValueError as error:  # subclassed models cannot be cloned layer by layer
        raise NotPlainKerasError(f"encoder {encoder.name!r} ({type(encoder).__name__}) is not a "
                                 f"functional or sequential model: {error}") from None
    if not _is_builtin(type(plain)):
        raise NotPlainKerasError(f"encoder {encoder.name!r} is a {type(encoder).__name__}, not "
                                 "a built-in keras.Model")
    plain.set_weights(encoder.get_weights())
    return plain


def _class_references(config):
    """Every (module, class_name, registered_name) a Keras config refers to."""
    if isinstance(config, dict):
        if "class_name" in config and "module" in config:
            yield config.get("module"), config["class_name"], config.get("registered_name")
        for value in config.values():
            yield from _class_references(value)
    elif isinstance(config, list):
        for value in config:
            yield from _class_references(value)


def check_plain_keras_file(path):
    """Raises NotPlainKerasError if the `.keras` file at `path` refers to a non-Keras class."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    foreign = sorted({f"{module}.{name} (registered as {registered!r})"
                      for module, name, registered in _class_references(config)
                      if module is None or not str(module).startswith("keras")
                      or registered not in (None, name)})
    if foreign:
        raise NotPlainKerasError(f"{path} refers to classes outside Keras: {foreign}")
