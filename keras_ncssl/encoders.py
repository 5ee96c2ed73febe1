"""Encoders (backbones) returning pooled features: ResNet-18/34/50 and a small CPU CNN.

Every builder returns a functional `keras.Model` mapping images (batch, H, W, C) to pooled
features (batch, D), with D = `model.output_shape[-1]`. Built-in Keras layers plus
`normalization.FusedBatchNormalization` (Keras' BatchNormalization trained with TensorFlow's
fused kernel, same weights and config) and, where asked for, `convolution.PatchGradientConv2D`
(Conv2D whose kernel gradient is one matrix product, same weights and config), so a `.keras`
file needs `import keras_ncssl` to reload; the export (`export_encoder`) needs nothing: a
SavedModel, and an `encoder.keras` in which these layers are replaced by their Keras parents.

Conventions (chosen to match the PyTorch code the papers used, [LM] and torchvision):
- Layout is channels-last on every layer (`data_format="channels_last"`, BN axis -1),
  whatever `keras.config.image_data_format()` says.
- Conv layers have no bias (BN follows) and are initialised kaiming-normal, fan_out, ReLU gain
  (torchvision's ResNet init): N(0, 2 / (k*k*out_channels)), untruncated.
- BatchNorm uses PyTorch's defaults: momentum 0.9 in Keras terms (0.1 in torch) and
  epsilon 1e-5; gamma = 1, beta = 0; the fused kernel in training mode (~13% of a ResNet-18
  step on CPU). `synchronized_bn=True` uses `synchronized=True` (the unfused path), i.e.
  batch statistics over all replicas (SimSiam 68.0 vs 65.1 without; PITFALLS.md).
- ResNets follow torchvision: BasicBlock for 18/34, Bottleneck v1.5 (stride on the 3x3) for 50,
  1x1 conv + BN shortcut when the shape changes. `stem="cifar"`: 3x3 conv stride 1, no
  max-pool (the DirectPred CIFAR/STL setting); `stem="imagenet"`: 7x7 stride 2 + 3x3 max-pool
  stride 2. Layer names mirror torchvision's ("layer2_0_conv1" = layer2.0.conv1).
"""
import inspect

import keras
from keras import layers

from keras_ncssl.convolution import PatchGradientConv2D
from keras_ncssl.normalization import FusedBatchNormalization

__all__ = ["ENCODERS", "all_layers", "computes_in_float32", "float32_copy", "get_encoder", "resnet", "resnet18",
           "resnet34", "resnet50", "small_cnn", "RESNET_STEMS", "conv_kernel_initializer"]

RESNET_STEMS = ("cifar", "imagenet")
_CL = "channels_last"

# depth -> (block kind, blocks per stage)
_RESNET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def conv_kernel_initializer():
    """torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu") as used by torchvision."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal")


def _check_input_shape(input_shape, owner):
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 3 or not isinstance(shape[-1], int) or shape[-1] < 1 \
            or any(d is not None and (not isinstance(d, int) or d < 1) for d in shape[:2]):
        raise ValueError(f"{owner}: input_shape={input_shape!r} must be (height, width, "
                         "channels) channels-last, with a known channel count (height/width may "
                         "be None).")
    return shape


class _Builder:
    """Holds the BN/conv settings shared by the layers of one network."""

    def __init__(self, synchronized_bn, bn_momentum, bn_epsilon, patch_gradient_positions=0):
        self.synchronized_bn = bool(synchronized_bn)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.patch_gradient_positions = int(patch_gradient_positions)

    def _conv_class(self, x, kernel, stride, padding):
        """PatchGradientConv2D where the output map is known and has at most
        ``patch_gradient_positions`` positions (there its kernel gradient is faster), else Conv2D."""
        height, width = x.shape[1], x.shape[2]
        if padding != "valid" or height is None or width is None:
            return layers.Conv2D
        positions = ((height - kernel) // stride + 1) * ((width - kernel) // stride + 1)
        return PatchGradientConv2D if positions <= self.patch_gradient_positions else layers.Conv2D

    def conv(self, x, filters, kernel, stride, name):
        padding = "same"
        if kernel > 1 and stride > 1:
            # torchvision pads k // 2 on each side; Keras "same" pads asymmetrically when the
            # stride is 2 on an even size (0 before, 1 after), which shifts features by a
            # pixel. Explicit symmetric zero-padding + "valid" matches torch exactly. (With
            # stride 1 and odd k, "same" is already symmetric and saves a copy.)
            x = layers.ZeroPadding2D(kernel // 2, data_format=_CL, name=f"{name}_pad")(x)
            padding = "valid"
        return self._conv_class(x, kernel, stride, padding)(
            filters, kernel, strides=stride, padding=padding, use_bias=False, data_format=_CL,
            kernel_initializer=conv_kernel_initializer(), name=name)(x)

    def bn(self, x, name, gamma_zero=False):
        return FusedBatchNormalization(
            axis=-1, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            synchronized=self.synchronized_bn,
            gamma_initializer="zeros" if gamma_zero else "ones", name=name)(x)

    def conv_bn_relu(self, x, filters, kernel, stride, name, conv_name=None, bn_name=None):
        x = self.conv(x, filters, kernel, stride, conv_name or f"{name}_conv")
        x = self.bn(x, bn_name or f"{name}_bn")
        return layers.ReLU(name=f"{name}_relu")(x)

    def shortcut(self, x, filters, stride, name):
        if stride == 1 and x.shape[-1] == filters:
            return x
        x = self.conv(x, filters, 1, stride, f"{name}_downsample_0")
        return self.bn(x, f"{name}_downsample_1")

    def basic_block(self, x, filters, stride, name, zero_init_residual):
        """torchvision BasicBlock: 3x3(stride)-BN-ReLU-3x3-BN, + shortcut, ReLU (expansion 1)."""
        shortcut = self.shortcut(x, filters, stride, name)
        y = self.conv_bn_relu(x, filters, 3, stride, f"{name}_1", f"{name}_conv1", f"{name}_bn1")
        y = self.conv(y, filters, 3, 1, f"{name}_conv2")
        y = self.bn(y, f"{name}_bn2", gamma_zero=zero_init_residual)
        y = layers.Add(name=f"{name}_add")([shortcut, y])
        return layers.ReLU(name=f"{name}_out")(y)

    def bottleneck_block(self, x, filters, stride, name, zero_init_residual):
        """torchvision Bottleneck (v1.5): 1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1(4x)-BN, + sc."""
        out = 4 * filters
        shortcut = self.shortcut(x, out, stride, name)
        y = self.conv_bn_relu(x, filters, 1, 1, f"{name}_1", f"{name}_conv1", f"{name}_bn1")
        y = self.conv_bn_relu(y, filters, 3, stride, f"{name}_2", f"{name}_conv2", f"{name}_bn2")
        y = self.conv(y, out, 1, 1, f"{name}_conv3")
        y = self.bn(y, f"{name}_bn3", gamma_zero=zero_init_residual)
        y = layers.Add(name=f"{name}_add")([shortcut, y])
        return layers.ReLU(name=f"{name}_out")(y)


def resnet(input_shape=(32, 32, 3), depth=18, stem="cifar", width_multiplier=1.0,
           synchronized_bn=False, zero_init_residual=False, bn_momentum=0.9, bn_epsilon=1e-5,
           name=None):
    """torchvision-layout ResNet-{18,34,50} without the fc layer, global-average pooled.

    He et al. 2016; torchvision `resnet18/34/50` (fc removed). Feature dim: 512 * w (18/34) or
    2048 * w (50) for width_multiplier w (base widths 64-128-256-512 times w, rounded).

    Args:
        input_shape: (H, W, C), channels last; H and W may be None.
        depth: 18, 34 or 50.
        stem: "cifar" (3x3 conv stride 1, no max-pool; for 32-96 px images) or "imagenet"
            (7x7 conv stride 2 + 3x3 max-pool stride 2).
        width_multiplier: scales every width (> 0).
        synchronized_bn: BatchNormalization(synchronized=True) for cross-replica statistics.
        zero_init_residual: gamma = 0 in the last BN of each block (torchvision option; off).
        bn_momentum, bn_epsilon: Keras BN momentum (= 1 - torch momentum) and epsilon.
        name: model name (default "resnet{depth}").
    """
    if depth not in _RESNET_LAYOUTS:
        raise ValueError(f"resnet: depth={depth!r} is not supported; allowed: "
                         f"{sorted(_RESNET_LAYOUTS)}.")
    if stem not in RESNET_STEMS:
        raise ValueError(f"resnet: stem={stem!r} is not supported; allowed: "
                         f"{', '.join(RESNET_STEMS)}.")
    if not width_multiplier > 0:
        raise ValueError(f"resnet: width_multiplier={width_multiplier!r} must be > 0.")
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"resnet: bn_momentum={bn_momentum!r} must lie in [0, 1).")
    shape = _check_input_shape(input_shape, "resnet")
    kind, blocks = _RESNET_LAYOUTS[depth]
    builder = _Builder(synchronized_bn, bn_momentum, bn_epsilon)
    block = builder.basic_block if kind == "basic" else builder.bottleneck_block

    def width(c):
        return max(1, int(round(c * width_multiplier)))

    inputs = keras.Input(shape=shape, name="images")
    if stem == "cifar":
        x = builder.conv_bn_relu(inputs, width(64), 3, 1, "stem", "conv1", "bn1")
    else:
        x = builder.conv_bn_relu(inputs, width(64), 7, 2, "stem", "conv1", "bn1")
        # torch pads the max-pool with -inf; after a ReLU the inputs are >= 0, so zeros are
        # equivalent.
        x = layers.ZeroPadding2D(1, data_format=_CL, name="maxpool_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="valid", data_format=_CL,
                                name="maxpool")(x)
    for stage, (filters, n_blocks) in enumerate(zip((64, 128, 256, 512), blocks)):
        for b in range(n_blocks):
            stride = 2 if (stage > 0 and b == 0) else 1
            x = block(x, width(filters), stride, f"layer{stage + 1}_{b}", zero_init_residual)
    x = layers.GlobalAveragePooling2D(data_format=_CL, name="avgpool")(x)
    return keras.Model(inputs, x, name=name or f"resnet{depth}")


def resnet18(input_shape=(32, 32, 3), **options):
    """ResNet-18 (BasicBlock, 2-2-2-2), 512-d features; see `resnet`."""
    return resnet(input_shape, depth=18, **options)


def resnet34(input_shape=(32, 32, 3), **options):
    """ResNet-34 (BasicBlock, 3-4-6-3), 512-d features; see `resnet`."""
    return resnet(input_shape, depth=34, **options)


def resnet50(input_shape=(224, 224, 3), stem="imagenet", **options):
    """ResNet-50 (Bottleneck v1.5, 3-4-6-3), 2048-d features; see `resnet`.

    Written out (not `keras.applications.ResNet50`) so that it shares the torchvision layout
    (stride on the 3x3, no conv biases, BN eps 1e-5), the init and the synchronized-BN option
    with the other ResNets; the parameter count equals torchvision's resnet50 minus fc.
    """
    return resnet(input_shape, depth=50, stem=stem, **options)


def small_cnn(input_shape=(32, 32, 3), widths=(32, 64, 128, 256), width_multiplier=1.0,
              convs_per_stage=1, stem_stride=2, synchronized_bn=False, bn_momentum=0.9,
              bn_epsilon=1e-5, patch_gradient_positions=0, name="small_cnn"):
    """A small VGG-style CNN sized for a 2-core CPU: features = widths[-1] * width_multiplier.

    Stage s (s = 0..len(widths)-1) is `convs_per_stage` x [3x3 conv - BN - ReLU] with
    widths[s] * width_multiplier channels; the first conv of stage s > 0 has stride 2 (stage 0
    uses `stem_stride`), then global average pooling.

    Cost: with channels doubling as the resolution halves, every stage after the first costs
    the same, H_s^2 * 9 * C_in * C_out multiply-adds. With the defaults on 32x32 inputs the
    feature maps are 16, 8, 4, 2 px and a forward pass is ~3.6 M multiply-adds per image
    (stem_stride=1: 32, 16, 8, 4 px and ~15 M; ResNet-18/cifar: ~560 M). On the 2-core CPU
    this project targets, training time scales with these counts, which is why the default
    strides at the stem: the quick Fashion-MNIST run needs several hundred images/s.

    Args:
        input_shape: (H, W, C), channels last.
        widths: channels per stage (a non-empty sequence of positive ints).
        width_multiplier: scales every width (> 0).
        convs_per_stage: conv-BN-ReLU layers per stage (>= 1).
        stem_stride: stride of the first conv: 2 (default, cheap) or 1 (4x the compute,
            finer features).
        synchronized_bn, bn_momentum, bn_epsilon: as in `resnet`.
        patch_gradient_positions: convolutions whose output map has at most this many positions
            (H x W, known from `input_shape`) are `convolution.PatchGradientConv2D`: the same
            layer, trained with the kernel gradient as one matrix product, faster on small maps
            on CPU (16, the last two stages at 28-32 px, made the quick run's step 16-22 %
            faster; 64, every stage after the stem, another 5-17 % with patches by one gather).
            0 (default): plain Conv2D everywhere.
    """
    try:
        widths = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"small_cnn: widths={widths!r} must be a non-empty sequence of "
                         "positive ints.")
    if not width_multiplier > 0:
        raise ValueError(f"small_cnn: width_multiplier={width_multiplier!r} must be > 0.")
    if not isinstance(convs_per_stage, int) or convs_per_stage < 1:
        raise ValueError(f"small_cnn: convs_per_stage={convs_per_stage!r} must be an int >= 1.")
    if stem_stride not in (1, 2):
        raise ValueError(f"small_cnn: stem_stride={stem_stride!r}; allowed: 1, 2.")
    if not isinstance(patch_gradient_positions, int) or patch_gradient_positions < 0:
        raise ValueError(f"small_cnn: patch_gradient_positions={patch_gradient_positions!r} must be an int >= 0.")
    shape = _check_input_shape(input_shape, "small_cnn")
    builder = _Builder(synchronized_bn, bn_momentum, bn_epsilon, patch_gradient_positions)
    inputs = keras.Input(shape=shape, name="images")
    x = inputs
    for s, w in enumerate(widths):
        filters = max(1, int(round(w * width_multiplier)))
        for c in range(convs_per_stage):
            stride = (stem_stride if s == 0 else 2) if c == 0 else 1
            x = builder.conv_bn_relu(x, filters, 3, stride, f"stage{s + 1}_{c}")
    x = layers.GlobalAveragePooling2D(data_format=_CL, name="avgpool")(x)
    return keras.Model(inputs, x, name=name)


ENCODERS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "small": small_cnn,
}


def get_encoder(name, input_shape, **options):
    """Build the encoder registered as `name` (see `ENCODERS`) for `input_shape`.

    `options` go to the builder: for the ResNets `stem`, `width_multiplier`,
    `synchronized_bn`, `zero_init_residual`, `bn_momentum`, `bn_epsilon`, `name`; for
    "small" `widths`, `width_multiplier`, `convs_per_stage`, `stem_stride`,
    `patch_gradient_positions`, `synchronized_bn`, `bn_momentum`, `bn_epsilon`, `name`.
    """
    if name not in ENCODERS:
        raise ValueError(f"get_encoder: unknown encoder name={name!r}; allowed: "
                         f"{', '.join(sorted(ENCODERS))}.")
    builder = ENCODERS[name]
    allowed = _builder_options(builder)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"get_encoder: unknown option(s) {unknown} for encoder {name!r}; "
                         f"allowed: {', '.join(allowed)}.")
    return builder(input_shape, **options)


def all_layers(model):
    """Every layer of ``model``, the layers of nested models included (depth first)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def computes_in_float32(encoder):
    """True when every layer of ``encoder`` (nested models included) computes in float32."""
    return all(layer.compute_dtype == "float32" for layer in all_layers(encoder))


def float32_copy(encoder):
    """``encoder`` itself if it computes in float32, else a float32 clone with its weights.

    Mixed precision (``mixed_bfloat16``/``mixed_float16``) is a training-speed choice: the
    variables are float32 already, but features computed in bfloat16 keep ~3 significant digits.
    Evaluation and export use this copy, so their features are the float32 function of the
    trained weights on every machine (whether or not it has bf16 instructions)."""
    if computes_in_float32(encoder):
        return encoder

    def clone(layer):
        return type(layer).from_config({**layer.get_config(), "dtype": "float32"})

    try:
        copy = keras.models.clone_model(encoder, clone_function=clone, recursive=True)
    except ValueError as error:  # a subclassed model cannot be cloned layer by layer
        raise ValueError(f"float32_copy: encoder {encoder.name!r} ({type(encoder).__name__}) computes in "
                         f"{encoder.compute_dtype} and is not functional or sequential, so it cannot be "
                         f"rebuilt in float32: {error}") from None
    copy.set_weights(encoder.get_weights())
    return copy


def _builder_options(builder):
    params = dict(inspect.signature(builder).parameters)
    if builder in (resnet18, resnet34, resnet50):
        params.update(inspect.signature(resnet).parameters)
        params.pop("depth")
    params.pop("input_shape")
    params.pop("options", None)
    return sorted(params)
