"""Train-step throughput: the configuration of ../shared/bench/peer_torch_step.py in Keras.

BYOL, CIFAR-stem ResNet-18 (512-d), projector 512-512-128 (BN), a 128 x 128 linear predictor
set by DirectPred every step (rho 0.3, eps 0.1), EMA 0.996, SGD(0.03, momentum 0.9, coupled
wd 4e-4), both views of a batch of random images; augmentation excluded. Prints one JSON line
with images_per_sec = batch / median step time (a sample = one pair of views).

    python experiments/bench.py train_step --encoder=resnet18 --image_size=32 --batch_size=128 --predictor=directpred
    python experiments/bench.py train_step ... --forward_views_together --jit_compile
"""
import argparse
import json
import os
import statistics
import time


def parse(argv):
    p = argparse.ArgumentParser(prog="bench.py train_step")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--width_multiplier", type=float, default=1.0)
    p.add_argument("--stem_stride", type=int, default=None, help="small encoder only (1 or 2)")
    p.add_argument("--widths", default=None, help="small encoder only: channels per stage, e.g. 32,64,128,256")
    p.add_argument("--convs_per_stage", type=int, default=None, help="small encoder only")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--predictor", default="directpred")
    p.add_argument("--projector_hidden", type=int, default=512)
    p.add_argument("--projection_dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--forward_views_together", action="store_true",
                   help="one encoder pass over both views (BN statistics pool the views)")
    p.add_argument("--jit_compile", action="store_true", help="XLA-compile the train step")
    p.add_argument("--mixed_precision", default=None, help="e.g. mixed_bfloat16")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = TF default)")
    p.add_argument("--rule_device", default="auto",
                   help="DirectPredictor's rule placement: auto | cpu | none | a device string")
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_ncssl import encoders, heads, models, optimizers
    from keras_ncssl.predictors import get_predictor

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.mixed_precision:
        keras.config.set_dtype_policy(args.mixed_precision)
    shape = (args.image_size, args.image_size, args.channels)
    options = {"width_multiplier": args.width_multiplier}
    if args.stem_stride is not None:
        options["stem_stride"] = args.stem_stride
    if args.widths:
        options["widths"] = tuple(int(w) for w in args.widths.split(","))
    if args.convs_per_stage is not None:
        options["convs_per_stage"] = args.convs_per_stage
    encoder = encoders.get_encoder(args.encoder, shape, **options)
    projector = heads.projector(encoder.output_shape[-1], args.projector_hidden, args.projection_dim)
    rule_device = None if args.rule_device == "none" else args.rule_device
    options = (dict(rho=0.3, eps=0.1, freq=1, rule_device=rule_device)
               if args.predictor not in ("linear", "mlp", "none") else {})
    predictor = get_predictor(args.predictor, args.projection_dim, **options)
    model = models.BYOL(encoder, projector, predictor, tau_base=0.996, tau_schedule="constant",
                        forward_views_together=args.forward_views_together)
    model.compile(optimizer=optimizers.SGD(0.03, momentum=0.9, weight_decay=4e-4),
                  jit_compile=args.jit_compile)
    rng = np.random.default_rng(0)
    x1 = tf.constant(rng.normal(size=(args.batch_size, *shape)).astype(np.float32))
    x2 = tf.constant(rng.normal(size=(args.batch_size, *shape)).astype(np.float32))
    # The same compiled function fit() runs; called directly so no input pipeline is timed.
    model.make_train_function()
    step = model.train_function

    def one():
        logs = step(iter([(x1, x2)]))
        float(logs["loss"])  # block until the step has finished

    for _ in range(args.warmup):
        one()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(json.dumps({
        "bench": "train_step", "framework": f"keras {keras.__version__} / tf {tf.__version__}",
        "encoder": args.encoder, "width_multiplier": args.width_multiplier,
        "stem_stride": args.stem_stride, "widths": args.widths, "convs_per_stage": args.convs_per_stage,
        "feature_dim": int(encoder.output_shape[-1]), "predictor": args.predictor, "batch": args.batch_size,
        "image": args.image_size, "forward_views_together": args.forward_views_together,
        "jit_compile": args.jit_compile, "mixed_precision": args.mixed_precision, "rule_device": args.rule_device,
        "device": (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name,
        "step_s": round(median, 4), "images_per_sec": round(args.batch_size / median, 2),
        "steps": args.steps}))
