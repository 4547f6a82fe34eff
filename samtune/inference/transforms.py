"""Resize-longest-side geometry for images, points and boxes (the official predictor's ``transform``)."""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from samtune.modeling.preprocessing import Interpolation, get_preprocess_shape, resize_longest_side

__all__ = ["ResizeLongestSide"]


class ResizeLongestSide:
    """Resize images so their longest side is ``target_length``, and map coordinates accordingly.

    Same methods and results as ``segment_anything.utils.transforms.ResizeLongestSide``, so code that calls
    ``predictor.transform.apply_boxes_torch(...)`` keeps working. With ``interpolation="bilinear"`` images are
    resized with PIL's bilinear filter on uint8 data, exactly as the official predictor does; ``"area"`` is
    OpenCV's ``INTER_AREA`` (LiteMedSAM's convention), which also takes 16-bit and float images.
    """

    def __init__(self, target_length: int, interpolation: Interpolation = "bilinear") -> None:
        self.target_length = target_length
        self.interpolation = interpolation

    get_preprocess_shape = staticmethod(get_preprocess_shape)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, C]`` -> ``[h, w, C]`` with ``max(h, w) == target_length`` (see the class docstring)."""
        return resize_longest_side(image, self.target_length, self.interpolation)

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """``[..., 2]`` (x, y) in original pixels -> model-input pixels (float64)."""
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """``[B, 4]`` xyxy in original pixels -> model-input pixels."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` float -> resized with antialiased bilinear interpolation (not bit-equal to PIL).

        The size comes from ``H, W`` (the official method reads ``B, C`` there, a known bug, so the two differ).
        """
        size = get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """Tensor version of :meth:`apply_coords`; returns float32 whatever the input dtype, as the official one."""
        old_h, old_w = original_size
        new_h, new_w = get_preprocess_shape(old_h, old_w, self.target_length)
        scale = torch.tensor([new_w / old_w, new_h / old_h], device=coords.device)
        return coords.float() * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        """Tensor version of :meth:`apply_boxes`."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
