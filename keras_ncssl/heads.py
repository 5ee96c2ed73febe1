"""Projector and MLP heads (Linear-BN-ReLU-...-Linear) with the papers' defaults.

The DirectPred code [LM] (`models/mlp_head.py`, `MLPHead`) builds both the projector and the
2-layer predictor as Linear(bias) - BatchNorm1d(affine=False) - ReLU - Linear(bias); the
DirectPred CIFAR/STL sizes are projector 512 -> 512 -> 128 and predictor 128 -> 512 -> 128
([DP] §2.5). BYOL uses affine BN (4096 hidden, 256 out for ResNet-50); SimSiam's projector has
BN on every layer including the output. All of these are arguments.

Initialisation follows PyTorch's `nn.Linear` default so that runs compare with the reference
code: kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)). BN uses PyTorch's momentum 0.1
(Keras momentum 0.9) and epsilon 1e-5.

The heads are `keras.Sequential` models of built-in layers with a known input dimension, so
they are built at construction and serialise without this library's code.
"""
import math
import numbers

import keras
from keras import layers

__all__ = ["mlp_head", "projector"]


def _dim(value, arg, owner):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {arg}={value!r} must be a positive int.")
    return int(value)


def _torch_linear(units, fan_in, use_bias, name):
    """nn.Linear's default init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), same bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return layers.Dense(
        units, use_bias=use_bias,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name=name)


def mlp_head(input_dim, hidden_dims=(512,), output_dim=128, *, use_bias=True, bn_affine=False,
             output_bn=False, output_bn_affine=None, synchronized_bn=False, bn_momentum=0.9,
             bn_epsilon=1e-5, name="mlp_head"):
    """Generic MLP: [Linear - BN - ReLU] per hidden dim, then Linear (optionally + BN).

    Examples (ALGORITHMS.md §1, §2.5):
        DirectPred 2-layer predictor:  mlp_head(128, 512, 128, name="predictor")
        BYOL (R-50) predictor:         mlp_head(256, 4096, 256, bn_affine=True)
        SimSiam projector:             mlp_head(2048, (2048, 2048), 2048, bn_affine=True,
                                                output_bn=True)
        SimSiam predictor:             mlp_head(2048, 512, 2048, bn_affine=True)

    Args:
        input_dim: input feature dimension.
        hidden_dims: an int or a sequence of ints (empty: a single Linear layer).
        output_dim: output dimension.
        use_bias: biases on the Linear layers ([LM] default True).
        bn_affine: learn BN scale/offset on the hidden layers ([LM] default False).
        output_bn: BatchNorm on the output (SimSiam projector); no ReLU after it.
        output_bn_affine: affine for the output BN (default: `bn_affine`).
        synchronized_bn: BatchNormalization(synchronized=True), cross-replica statistics.
        bn_momentum, bn_epsilon: Keras BN momentum (= 1 - torch momentum) and epsilon.
        name: model name; layers are named "{name}_linear{i}", "{name}_bn{i}", "{name}_relu{i}".

    Returns:
        A built `keras.Sequential` mapping (batch, input_dim) -> (batch, output_dim).
    """
    owner = "mlp_head"
    input_dim = _dim(input_dim, "input_dim", owner)
    output_dim = _dim(output_dim, "output_dim", owner)
    if isinstance(hidden_dims, numbers.Integral):
        hidden_dims = (hidden_dims,)
    elif hidden_dims is None:
        hidden_dims = ()
    hidden_dims = tuple(_dim(h, "hidden_dims entry", owner) for h in hidden_dims)
    if not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"{owner}: bn_momentum={bn_momentum!r} must lie in [0, 1).")
    if output_bn_affine is None:
        output_bn_affine = bn_affine

    def bn(affine, layer_name):
        return layers.BatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon, center=affine, scale=affine,
            synchronized=synchronized_bn, name=layer_name)

    stack = [keras.Input(shape=(input_dim,), name=f"{name}_input")]
    fan_in = input_dim
    for i, h in enumerate(hidden_dims):
        stack += [_torch_linear(h, fan_in, use_bias, f"{name}_linear{i}"),
                  bn(bn_affine, f"{name}_bn{i}"),
                  layers.ReLU(name=f"{name}_relu{i}")]
        fan_in = h
    stack.append(_torch_linear(output_dim, fan_in, use_bias, f"{name}_linear{len(hidden_dims)}"))
    if output_bn:
        stack.append(bn(output_bn_affine, f"{name}_bn{len(hidden_dims)}"))
    return keras.Sequential(stack, name=name)


def projector(input_dim, hidden_dim=512, output_dim=128, synchronized_bn=False, bn_affine=False,
              use_bias=True, num_layers=2, output_bn=False, bn_momentum=0.9, bn_epsilon=1e-5,
              name="projector"):
    """Projector head g: Linear(bias) - BN - ReLU - Linear(bias), [LM]/[DP] defaults.

    Defaults are the DirectPred code's ([LM] `MLPHead` options: has_bias=True,
    has_bn_affine=False; sizes 512 -> 512 -> 128, [DP] §2.5). For BYOL's head use
    `bn_affine=True, hidden_dim=4096, output_dim=256`; for SimSiam's 3-layer projector
    `num_layers=3, output_bn=True, bn_affine=True`.

    Args:
        input_dim: encoder feature dimension.
        hidden_dim: width of the hidden layer(s).
        output_dim: projection dimension d (the predictor is d x d).
        synchronized_bn: cross-replica BN statistics.
        bn_affine: learn BN scale/offset ([LM]: False; BYOL: True).
        use_bias: biases on the Linear layers.
        num_layers: number of Linear layers (>= 1); num_layers - 1 hidden layers.
        output_bn: BN on the output (SimSiam).
        bn_momentum, bn_epsilon, name: as in `mlp_head`.
    """
    if not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"projector: num_layers={num_layers!r} must be an int >= 1.")
    hidden_dim = _dim(hidden_dim, "hidden_dim", "projector")
    return mlp_head(input_dim, (hidden_dim,) * (num_layers - 1), output_dim, use_bias=use_bias,
                    bn_affine=bn_affine, output_bn=output_bn, synchronized_bn=synchronized_bn,
                    bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, name=name)
