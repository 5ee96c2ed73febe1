"""Row blocks: how the evaluation's compiled ops use every core when TensorFlow's intra-op pool is small.

TensorFlow fixes its thread pools once per process. The runner trains the small CNN with one
intra-op thread (its small kernels run faster side by side on the inter-op pool than split
across cores), so in the same process every matmul of the evaluation that follows would run on
one core. Splitting the rows of the large products into independent blocks inside one
``tf.function`` gives the executor one op per block to run side by side on the inter-op pool:
the same arithmetic, summed or concatenated in a fixed order, on all cores.

With TensorFlow's default pools (intra-op = every core) one block is used: each op already
splits itself.
"""
import os

import numpy as np
import tensorflow as tf


def block_count(rows=None, min_rows=1):
    """Blocks to split ``rows`` rows into: cores per intra-op thread, at most one per ``min_rows``
    (``rows=None``: a batch of unknown size, no cap)."""
    intra_op = tf.config.threading.get_intra_op_parallelism_threads()
    if intra_op <= 0:  # TensorFlow's default: every op uses every core
        return 1
    per_core = max(1, (os.cpu_count() or 1) // intra_op)
    if rows is None:
        return per_core
    return int(max(1, min(per_core, rows // max(1, min_rows))))


def split_rows(array, blocks):
    """``array`` as ``blocks`` contiguous row blocks (sizes differ by at most one)."""
    return tuple(np.array_split(np.asarray(array), int(blocks)))
