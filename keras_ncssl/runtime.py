"""What the machine offers, and the precision and threading that run fastest on it.

    precision = runtime.auto_precision()     # "mixed_bfloat16" on a CPU with native bf16, else "none"
    runtime.set_threads(intra_op=1, inter_op=2)
    runtime.describe()                       # {"devices": ..., "cpu_bf16": ..., "threads": ...} for reports

bfloat16 matmuls and convolutions run natively on x86 CPUs with AVX512_BF16 or AMX-BF16 (and
Arm CPUs with the BF16 extension); elsewhere oneDNN emulates them and they are *slower* than
float32, so ``auto_precision`` picks ``mixed_bfloat16`` only where the CPU has the instructions
and no accelerator is visible. On GPUs and TPUs it keeps float32 ("none"): choosing a GPU policy
(mixed_float16 or mixed_bfloat16) is left to the user. A DirectPredictor keeps its statistics
and eigendecomposition in float32 under any policy.
"""
import os
import platform

import tensorflow as tf

PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (cpuinfo "flags"), Arm (cpuinfo "Features")


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU feature flags the kernel reports (Linux), as a set; empty where unknown."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_native_bfloat16(flags=None):
    """True if the CPU computes bfloat16 dot products in hardware (AVX512_BF16, AMX-BF16, Arm BF16)."""
    return bool(_BF16_FLAGS & (cpu_flags() if flags is None else set(flags)))


def accelerators():
    """Names of the visible GPUs and TPUs (physical devices; nothing is initialised)."""
    return [d.name for kind in ("GPU", "TPU") for d in tf.config.list_physical_devices(kind)]


def auto_precision(flags=None, accelerator_names=None):
    """The Keras dtype policy to train with when the user asked for "auto".

    "mixed_bfloat16" on a CPU-only machine whose CPU has native bfloat16; "none" (float32)
    otherwise, including every machine with a GPU or TPU (their users' path is unchanged).
    """
    accelerator_names = accelerators() if accelerator_names is None else accelerator_names
    if accelerator_names:
        return "none"
    return "mixed_bfloat16" if cpu_has_native_bfloat16(flags) else "none"


def resolve_precision(name, flags=None, accelerator_names=None):
    """``name`` ("auto" or one of PRECISIONS) -> one of PRECISIONS; ValueError otherwise."""
    if name == "auto":
        return auto_precision(flags, accelerator_names)
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r}: choose auto or one of {', '.join(PRECISIONS)}.")
    return name


def set_threads(intra_op=0, inter_op=0):
    """TensorFlow's thread pools (0 = TensorFlow's default); before TensorFlow starts running ops.

    Raises RuntimeError naming the fix if TensorFlow has already initialised its pools.
    """
    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra_op))
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter_op))
    except RuntimeError as error:
        raise RuntimeError(f"threads (intra_op={intra_op}, inter_op={inter_op}) must be set before TensorFlow "
                           f"runs its first op: {error}") from None


def describe(precision=None):
    """A JSON-able summary of the run's hardware, precision and threading, for reports."""
    return {
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "cpu_native_bfloat16": cpu_has_native_bfloat16(), "accelerators": accelerators(),
        "precision": precision if precision is not None else keras_policy_name(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "tensorflow": tf.__version__,
    }


def keras_policy_name():
    import keras
    name = keras.config.dtype_policy().name
    return "none" if name == "float32" else name
