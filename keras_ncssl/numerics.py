"""Warnings from inside compiled training steps, and finiteness checks across replicas.

A Python warning inside a ``tf.function`` fires once, at trace time; a step that goes wrong
later must say so when it happens. `graph_warning` prints from the graph (``tf.print`` to
stderr) when a condition holds at run time, or warns normally when executing eagerly.
"""
import sys
import warnings

import tensorflow as tf


def in_xla_context():
    """True while tracing a function compiled with XLA (``jit_compile=True``)."""
    try:  # private but stable since TF 1.x; without it we assume no XLA and keep tf.print
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover
        return False
    return control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def graph_warning(condition, text, stacklevel=3):
    """Warn with ``text`` when the bool tensor ``condition`` is true at run time.

    Under XLA (``jit_compile=True``) nothing is printed: PrintV2 has no XLA kernel, so such a
    step would not compile. Callers count the event in a variable as well, and a callback turns
    the count into a Python warning at the epoch's end.
    """
    if tf.executing_eagerly():
        if bool(condition):
            warnings.warn(text, RuntimeWarning, stacklevel=stacklevel)
        return
    if in_xla_context():
        return

    def warn():
        tf.print("WARNING:", text, output_stream=sys.stderr)
        return tf.constant(True)

    tf.cond(condition, warn, lambda: tf.constant(False))


def all_finite(tensors):
    """A bool scalar: every element of every tensor (None entries ignored) is finite."""
    checks = [tf.reduce_all(tf.math.is_finite(t.values if isinstance(t, tf.IndexedSlices) else t))
              for t in tensors if t is not None]
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def all_finite_across_replicas(tensors):
    """`all_finite` agreed by every replica in sync (one all-reduce), so that all of them take
    the same decision: a replica whose own batch is finite still skips a step another replica
    could not take."""
    finite = all_finite(tensors)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return finite
    bad = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32))
    return tf.equal(bad, 0.0)
