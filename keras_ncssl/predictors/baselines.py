"""Trainable predictor baselines of [DP] and a factory for every predictor by name."""
import keras
import tensorflow as tf

from keras_ncssl.predictors.layer import DirectPredictor
from keras_ncssl.predictors.rules import RULES

# torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the [DP] baselines used it.
TORCH_LINEAR_INIT = dict(class_name="VarianceScaling",
                         config=dict(scale=1.0 / 3.0, mode="fan_in", distribution="uniform"))


@keras.saving.register_keras_serializable(package="keras_ncssl")
class Symmetric(keras.constraints.Constraint):
    """Projects a square kernel onto symmetric matrices after every optimizer step.

    [DP] Tab. 3's "sym" columns: W_p <- (W_p + W_p^T) / 2 after each update.
    """

    def __call__(self, w):
        return 0.5 * (w + tf.transpose(w))


@keras.saving.register_keras_serializable(package="keras_ncssl")
class LinearPredictor(keras.layers.Layer):
    """Trainable d x d linear predictor ``y = x @ kernel`` (no bias by default), [DP] "1-layer".

    ``symmetric=True`` keeps the kernel symmetric (the "sym W_p" ablation of [DP] Tab. 3).
    """

    def __init__(self, use_bias=False, symmetric=False, **kwargs):
        super().__init__(**kwargs)
        self.use_bias = bool(use_bias)
        self.symmetric = bool(symmetric)

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(dim, dim), initializer=keras.initializers.get(TORCH_LINEAR_INIT),
            constraint=Symmetric() if self.symmetric else None)
        bound = dim ** -0.5
        self.bias = (self.add_weight(name="bias", shape=(dim,),
                                     initializer=keras.initializers.RandomUniform(-bound, bound))
                     if self.use_bias else None)

    def call(self, inputs):
        outputs = tf.matmul(inputs, tf.cast(self.kernel, inputs.dtype))
        if self.bias is not None:
            outputs = outputs + tf.cast(self.bias, inputs.dtype)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "use_bias": self.use_bias, "symmetric": self.symmetric}


def mlp_predictor(dim, hidden_dim=512, synchronized_bn=False, name="predictor"):
    """The 2-layer predictor: Linear(d -> hidden)-BN-ReLU-Linear(hidden -> d).

    [DP] code: 128 -> 512 -> 128 on STL-10/CIFAR; BYOL's ImageNet head is 256 -> 4096 -> 256.
    """
    from keras_ncssl import heads  # the shared MLP head builder

    return heads.mlp_head(dim, (hidden_dim,), dim,
                          synchronized_bn=synchronized_bn, name=name)


TRAINABLE = ("linear", "linear_symmetric", "mlp", "none")


def get_predictor(name, dim, *, hidden_dim=512, synchronized_bn=False, **options):
    """Any predictor by name, so the paper's ablations are one argument away.

    ``name``: a rule in ``RULES`` (a :class:`DirectPredictor` with ``**options``: rho, eps,
    freq, predictor_ema, zero_mean, rule_options), "linear" (trainable, no bias),
    "linear_symmetric", "mlp" (2-layer, ``hidden_dim``), or "none" (identity: no predictor).
    """
    if name in RULES:
        return DirectPredictor(rule=name, name="predictor", **options)
    if options:
        raise ValueError(f"options {sorted(options)} apply to DirectPredictor rules only, not to predictor {name!r}.")
    if name == "linear":
        return LinearPredictor(name="predictor")
    if name == "linear_symmetric":
        return LinearPredictor(symmetric=True, name="predictor")
    if name == "mlp":
        return mlp_predictor(dim, hidden_dim=hidden_dim, synchronized_bn=synchronized_bn)
    if name == "none":
        return keras.layers.Identity(name="predictor")
    raise ValueError(f"unknown predictor {name!r}; choose a rule {sorted(RULES)} or one of {list(TRAINABLE)}.")
