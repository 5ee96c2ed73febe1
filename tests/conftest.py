"""Test set-up shared by every test module."""
import os
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, configured before TensorFlow initialises its devices, so that
# multi-replica tests (MirroredStrategy over "cpu:2") run in the same process as the rest.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:  # already initialised by an earlier import; multi-replica tests skip
    pass


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test id: fresh inputs per test, reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
