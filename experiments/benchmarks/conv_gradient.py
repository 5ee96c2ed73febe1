"""The small CNN's convolutions alone: Conv2D against PatchGradientConv2D, forward + both gradients.

    python experiments/bench.py conv_gradient
    python experiments/bench.py conv_gradient --image_size=32 --channels=3 --threads=0

For each convolution of `encoders.small_cnn` at --image_size (its padded input, stride, widths),
one JSON line with the median over --rounds of the CPU time (process time, all threads) and the
wall time per call of: forward + input and kernel gradients with `keras.layers.Conv2D`
(oneDNN's backward-weights kernel) and with `convolution.PatchGradientConv2D` (kernel gradient
P^T G), and of the patch matrix P alone, by `convolution.patch_matrix` (one gather) and by
`tf.image.extract_patches`. The kinds alternate within each round, so a drifting host moves
them together. CPU time is what counts in the train step, where both cores are busy.
"""
import json
import os
import statistics
import time

from absl import flags

from benchmarks import parse_flags

FLAGS = flags.FlagValues()
flags.DEFINE_integer("image_size", 28, "Input size of the encoder.", flag_values=FLAGS)
flags.DEFINE_integer("channels", 1, "Input channels.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Batch (one view of the quick run).", flag_values=FLAGS)
flags.DEFINE_enum("precision", "mixed_bfloat16", ["mixed_bfloat16", "float32"], "Keras dtype policy.",
                  flag_values=FLAGS)
flags.DEFINE_integer("threads", 1, "Intra-op threads (the quick run's 1; 0 = TensorFlow's default).",
                     flag_values=FLAGS)
flags.DEFINE_integer("calls", 100, "Calls per timing.", flag_values=FLAGS)
flags.DEFINE_integer("rounds", 5, "Alternating rounds (medians are reported).", flag_values=FLAGS)


def main(argv):
    args = parse_flags(FLAGS, "bench.py conv_gradient", argv, __doc__)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from keras_ncssl import encoders
    from keras_ncssl.convolution import PatchGradientConv2D, patch_matrix

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    keras.mixed_precision.set_global_policy(args.precision)
    model = encoders.small_cnn((args.image_size, args.image_size, args.channels))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    compute_dtype = keras.mixed_precision.global_policy().compute_dtype
    for index, conv in enumerate(convs):
        in_shape = (args.batch_size, *conv.input.shape[1:])
        x = tf.cast(tf.random.stateless_normal(in_shape, seed=[index, 0]), compute_dtype)
        options = dict(filters=conv.filters, kernel_size=conv.kernel_size, strides=conv.strides,
                       padding=conv.padding, use_bias=False)
        layers = {"conv2d": keras.layers.Conv2D(**options), "patch_gradient": PatchGradientConv2D(**options)}
        calls = {}
        for name, layer in layers.items():
            layer.build(in_shape)

            @tf.function
            def step(x, layer=layer):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    loss = tf.reduce_sum(tf.cast(layer(x), tf.float32) ** 2)
                return tape.gradient(loss, [x, layer.kernel])
            calls[name] = step
        kh, kw = conv.kernel_size
        strides = conv.strides
        calls["patches_gather"] = tf.function(lambda x: patch_matrix(x, (kh, kw), strides))
        calls["patches_extract"] = tf.function(lambda x: tf.image.extract_patches(
            x, [1, kh, kw, 1], [1, *strides, 1], [1, 1, 1, 1], "VALID"))
        cpu = {name: [] for name in calls}
        wall = {name: [] for name in calls}
        for call in calls.values():
            for _ in range(10):
                call(x)
        for _ in range(args.rounds):
            for name, call in calls.items():
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                for _ in range(args.calls):
                    call(x)
                cpu[name].append((time.process_time() - start_cpu) / args.calls)
                wall[name].append((time.perf_counter() - start_wall) / args.calls)
        out_h, out_w = conv.output.shape[1:3]
        print(json.dumps({
            "bench": "conv_gradient", "layer": conv.name, "input": list(in_shape), "padding": conv.padding,
            "output_positions": int(out_h * out_w), "filters": conv.filters, "precision": args.precision,
            "threads": args.threads or "default",
            "cpu_ms": {name: round(1e3 * statistics.median(v), 3) for name, v in cpu.items()},
            "wall_ms": {name: round(1e3 * statistics.median(v), 3) for name, v in wall.items()}}), flush=True)
