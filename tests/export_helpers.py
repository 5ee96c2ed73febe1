"""Encoders and checks shared by the export tests (test_export*.py)."""
import os
import subprocess
import sys

import keras
import numpy as np

from keras_ncssl import encoders


def randomize_batchnorm(model, rng):
    """Random BN statistics and affine parameters in every BatchNormalization of `model`, so
    inference mode, training mode and a wrong BN class all give other outputs."""
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            d = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=d).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=d).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=d).astype(np.float32))
            layer.beta.assign(rng.normal(scale=0.2, size=d).astype(np.float32))
    return model


def bn_encoder(rng, shape, widths=(8, 16), name="encoder"):
    """The library's small CNN (FusedBatchNormalization; PatchGradientConv2D on maps of <= 16
    positions, as the runner builds it on a CPU) with random BN parameters."""
    encoder = encoders.small_cnn(shape, widths=widths, name=name, patch_gradient_positions=16)
    return randomize_batchnorm(encoder, rng)


def relative_error(got, expected):
    """max |got - expected| / max |expected|: the issue's "<= 1e-5 relative"."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def run_fresh_python(code, cwd, timeout=300):
    """Runs `code` in a new Python process in which importing keras_ncssl raises ImportError.

    The package is editable-installed into the venv, so an empty PYTHONPATH alone would not
    keep it out: a meta-path guard makes "never imports keras_ncssl" enforced, not observed.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH="")
    guard = ("import sys\nclass _Block:\n    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] == 'keras_ncssl':\n"
             "            raise ImportError('keras_ncssl is blocked in this process')\n"
             "sys.meta_path.insert(0, _Block())\n")
    return subprocess.run([sys.executable, "-c", guard + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
