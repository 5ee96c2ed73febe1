"""keras_ncssl: non-contrastive self-supervised learning with directly set predictors.

BYOL and SimSiam as Keras 3 models, with predictors set in closed form from a running
correlation of their inputs: DirectPred (Tian, Chen & Ganguli, ICML 2021), DirectCopy
(Wang et al. 2021) and the Edge-of-Orthogonality predictors (Richemond et al., ICML 2023).

    import keras_ncssl as ncssl
    encoder = ncssl.encoders.get_encoder("resnet18", (32, 32, 3))
    model = ncssl.BYOL(encoder, ncssl.heads.projector(512), ncssl.DirectPredictor())

Submodules and the names below are imported on first use (PEP 562), so that importing the
package, or its numpy-only parts (``keras_ncssl.theory``, ``keras_ncssl.diagnostics``), does not
start TensorFlow. The custom Keras objects (models, layers, optimizers, schedules) must be
registered before ``keras.saving.load_model`` reads a file that holds them: ``import keras_ncssl``
does that when Keras is already imported (``import keras, keras_ncssl``), and so does the first use
of any Keras part of the package (``keras_ncssl.BYOL``, ``keras_ncssl.models`` ...).
"""
import importlib
import sys

from keras_ncssl._versions import check_versions

check_versions()  # first: an unsupported TensorFlow/Keras fails here, with the pip fix

__version__ = "0.1.0"

SUBMODULES = ("augment", "callbacks", "checkpoint", "convolution", "data", "diagnostics", "distribute", "encoders",
              "evaluation", "export", "files", "heads", "losses", "models", "normalization", "numerics",
              "optimizers", "predictors", "runtime", "schedules", "theory")
# Public name -> the submodule that defines it.
_NAMES = {"BYOL": "models", "SimSiam": "models", "DirectPredictor": "predictors",
          "LinearPredictor": "predictors", "RULES": "predictors", "get_predictor": "predictors",
          "export_encoder": "export", "load_encoder": "export"}

__all__ = list(_NAMES)
# The modules that register Keras serializables (keras.saving.register_keras_serializable).
_SERIALIZABLES = ("convolution", "models", "normalization", "optimizers", "predictors", "schedules")


def register_keras_objects():
    """Import the modules whose classes Keras must know to load a saved model or optimizer."""
    for module in _SERIALIZABLES:
        importlib.import_module(f"keras_ncssl.{module}")


def __getattr__(name):
    if name in SUBMODULES:
        module = importlib.import_module(f"keras_ncssl.{name}")
        if "keras" in sys.modules:  # a Keras part is in use: make saved files loadable too
            register_keras_objects()
        return module
    if name in _NAMES:
        register_keras_objects()
        return getattr(importlib.import_module(f"keras_ncssl.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'keras_ncssl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(SUBMODULES) + list(_NAMES))


if "keras" in sys.modules:  # Keras is loaded already: registering costs no TensorFlow start-up
    register_keras_objects()
