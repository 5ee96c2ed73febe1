"""Shims for the older Keras 3 releases inside the supported range, and guards for the private
Keras methods keras_ncssl overrides (`keras_ncssl/_versions.py` holds the range).

Each shim names the releases that need it; when the floor passes that release, delete the
shim and call the Keras API directly. BUILD_NOTES.md ("Supported versions") lists what broke
on which version.
"""
import inspect

import keras

from keras_ncssl import _versions

__all__ = ["batchnorm_renorm", "require_private_method"]


def batchnorm_renorm(layer):
    """Whether a ``keras.layers.BatchNormalization`` uses batch renormalisation.

    Keras 3.13 and older have no ``renorm`` option (added in 3.14), so never renormalise.
    """
    return bool(getattr(layer, "renorm", False))


def require_private_method(base, name, parameters, backend="tensorflow"):
    """Raise ImportError unless ``base.name`` exists and takes ``parameters``.

    A subclass that overrides a private Keras method is silently bypassed when Keras renames
    or drops it; this makes that a loud failure at import that names the fix. Checked only
    on ``backend`` (the method belongs to that backend's trainer).
    """
    if keras.backend.backend() != backend:
        return
    method = getattr(base, name, None)
    found = None
    if method is not None:
        found = tuple(p for p in inspect.signature(method).parameters if p != "self")
        if found[:len(parameters)] == tuple(parameters):
            return
    version, _ = _versions.installed_version("keras")
    has = ("does not have it" if method is None
           else f"has it with parameters {found}")
    low, high = _versions.TESTED["keras"]
    requirement = _versions.requirement("keras")
    raise ImportError(
        f"keras_ncssl overrides the private Keras method {base.__name__}.{name}"
        f"({', '.join(parameters)}) (tested on Keras {low} to {high}); keras {version} {has}. "
        f"Fix: pip install '{requirement}'")
