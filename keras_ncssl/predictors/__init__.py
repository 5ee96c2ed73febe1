"""Predictors: closed-form rules, the DirectPredictor layer and trainable baselines.

    from keras_ncssl.predictors import RULES, direct_pred_kernel, DirectPredictor
"""
from keras_ncssl.predictors.baselines import (LinearPredictor, Symmetric, get_predictor,
                                              mlp_predictor)
from keras_ncssl.predictors.layer import DirectPredictor
from keras_ncssl.predictors.rules import (RULES, direct_copy_kernel, direct_pred_kernel, get_rule,
                                          least_squares_kernel, neumann_kernel, newton_schulz_kernel,
                                          newton_schulz_sqrt, ns2_kernel, register_rule,
                                          stiefel_kernel, visser_kernel)

__all__ = [
    "RULES", "register_rule", "get_rule", "direct_pred_kernel", "direct_copy_kernel",
    "least_squares_kernel", "neumann_kernel", "visser_kernel", "newton_schulz_kernel",
    "newton_schulz_sqrt", "ns2_kernel", "stiefel_kernel", "DirectPredictor", "LinearPredictor",
    "Symmetric", "mlp_predictor", "get_predictor",
]
