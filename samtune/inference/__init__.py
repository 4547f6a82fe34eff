"""Inference: the promptable predictor (and, later, automatic mask generation)."""
from samtune.inference.predictor import Predictor
from samtune.inference.transforms import ResizeLongestSide

__all__ = ["Predictor", "ResizeLongestSide"]
