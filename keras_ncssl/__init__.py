"""keras_ncssl: non-contrastive self-supervised learning with directly set predictors.

BYOL and SimSiam as Keras 3 models, with predictors set in closed form from a running
correlation of their inputs: DirectPred (Tian, Chen & Ganguli, ICML 2021), DirectCopy
(Wang et al. 2021) and the Edge-of-Orthogonality predictors (Richemond et al., ICML 2023).

    import keras_ncssl as ncssl
    encoder = ncssl.encoders.get_encoder("resnet18", (32, 32, 3))
    model = ncssl.BYOL(encoder, ncssl.heads.projector(512), ncssl.DirectPredictor())
"""
from keras_ncssl._versions import check_versions

check_versions()  # first: an unsupported TensorFlow/Keras fails here, with the pip fix

from keras_ncssl import (augment, callbacks, checkpoint, data, diagnostics, distribute,  # noqa: F401,E402
                         encoders, evaluation, export, heads, losses, models, normalization,
                         optimizers, predictors, schedules, theory)
from keras_ncssl.export import export_encoder, load_encoder  # noqa: E402
from keras_ncssl.models import BYOL, SimSiam  # noqa: E402
from keras_ncssl.predictors import RULES, DirectPredictor, LinearPredictor, get_predictor  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BYOL", "SimSiam", "DirectPredictor", "LinearPredictor", "RULES", "get_predictor",
           "export_encoder", "load_encoder"]
