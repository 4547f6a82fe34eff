"""Inference: the promptable predictor and automatic mask generation."""
from samtune.inference.amg import AutomaticMaskGenerator, to_coco_results, to_sa1b_json
from samtune.inference.predictor import Predictor
from samtune.inference.transforms import ResizeLongestSide

__all__ = ["AutomaticMaskGenerator", "Predictor", "ResizeLongestSide", "to_coco_results", "to_sa1b_json"]
