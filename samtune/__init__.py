"""samtune: train and adapt the Segment Anything Model with PyTorch Lightning.

The top level re-exports the pure-PyTorch parts (no Lightning import):
``build_sam``, ``Sam``, ``Predictor`` and the model registry.
"""
from samtune.build import available_models, build_sam, get_config, register_model
from samtune.inference.predictor import Predictor
from samtune.modeling.sam import Sam

__version__ = "0.1.0"

__all__ = ["build_sam", "available_models", "get_config", "register_model", "Predictor", "Sam", "__version__"]
