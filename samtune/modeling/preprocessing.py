"""Input conventions shared by the model, the predictor and the data pipelines.

Two conventions exist among the supported checkpoints:

* ``"sam"`` (official SAM, MobileSAM): 0-255 RGB, resize the longest side to ``img_size``, subtract
  ``PIXEL_MEAN`` and divide by ``PIXEL_STD``, pad bottom/right with zeros to ``img_size`` x ``img_size``.
* ``"minmax"`` (LiteMedSAM): resize the longest side to ``img_size`` (256), min-max scale the resized image
  to [0, 1] (no mean/std), pad bottom/right with zeros.

Geometry (longest side, rounding, bottom/right padding) is identical for both. The resize filter is part of each
model's convention too (``Interpolation``): the official SAM predictor resizes uint8 images with PIL's bilinear
filter, LiteMedSAM's reference code with OpenCV's ``INTER_AREA``. The filter changes the results measurably
(LiteMedSAM box IoU on the EM asset: 0.595 with area, 0.669 with PIL bilinear), so each model keeps its own.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Normalization = Literal["sam", "minmax"]
Interpolation = Literal["bilinear", "area"]

PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


def default_interpolation(normalization: Normalization) -> Interpolation:
    """The resize filter that goes with an input ``normalization``: ``"area"`` for ``"minmax"`` (LiteMedSAM),
    ``"bilinear"`` for ``"sam"``."""
    return "area" if normalization == "minmax" else "bilinear"


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
    """Size (h, w) of an image of size (old_h, old_w) once its longest side is resized to ``long_side``.

    Rounds like the official ``ResizeLongestSide`` (``int(x + 0.5)``), so masks, boxes and points land on
    the same pixels as in the official predictor.

    Raises:
        ValueError: the image is empty, or so elongated that its short side would round to 0 pixels.
    """
    if old_h < 1 or old_w < 1:
        raise ValueError(f"empty image: {old_h}x{old_w} pixels (height x width)")
    scale = long_side * 1.0 / max(old_h, old_w)
    new_h, new_w = int(old_h * scale + 0.5), int(old_w * scale + 0.5)
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"an image of {old_h}x{old_w} pixels (height x width) resized to a longest side of {long_side} would be "
            f"{new_h}x{new_w}: its aspect ratio must be at most {2 * long_side}:1 (crop or tile it)"
        )
    return new_h, new_w


def normalize_image(
    image: torch.Tensor, normalization: Normalization, valid_hw: tuple[int, int] | None = None
) -> torch.Tensor:
    """Normalise resized, not yet padded images.

    Args:
        image: ``[..., 3, H, W]`` float pixels on the 0-255 scale (any range for ``"minmax"``).
        normalization: ``"sam"`` (mean/std) or ``"minmax"`` (per image to [0, 1]).
        valid_hw: when the image is already padded, the (h, w) of its content; min/max are taken there and
            the padding outside it is zero in the result (as when padding after normalising).

    Returns:
        ``[..., 3, H, W]`` float32.
    """
    image = image.float()
    if normalization == "sam":
        mean = torch.tensor(PIXEL_MEAN, device=image.device).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=image.device).view(3, 1, 1)
        out = (image - mean) / std
    elif normalization == "minmax":
        content = image if valid_hw is None else image[..., : valid_hw[0], : valid_hw[1]]
        flat = content.flatten(-3)
        lo = flat.amin(-1)[..., None, None, None]
        hi = flat.amax(-1)[..., None, None, None]
        out = (image - lo) / (hi - lo).clamp_min(1e-8)
    else:
        raise ValueError(f"normalization must be 'sam' or 'minmax', got {normalization!r}")
    if valid_hw is not None:
        out[..., valid_hw[0] :, :] = 0
        out[..., :, valid_hw[1] :] = 0
    return out


def to_rgb_uint8_range(image: np.ndarray) -> np.ndarray:
    """Turn an ``[H, W]`` or ``[H, W, C]`` array into ``[H, W, 3]``: grey is repeated, extra bands dropped.

    The dtype is kept; intensity scaling is the data layer's business (see ``samtune.data``).
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape [H, W] or [H, W, C], got {tuple(image.shape)}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.shape[2] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {image.shape[2]}; select bands first")
    return image


def resize_longest_side(image: np.ndarray, long_side: int, interpolation: Interpolation = "bilinear") -> np.ndarray:
    """Resize an ``[H, W, C]`` image so that its longest side is ``long_side``.

    Args:
        image: uint8 for ``"bilinear"`` (PIL, as the official predictor); any numeric dtype for ``"area"``
            (OpenCV ``INTER_AREA``: uint8 images are resized as uint8, as LiteMedSAM's reference does, so the
            result is rounded to uint8; other dtypes in float32).
        long_side: target length of the longest side.
        interpolation: ``"bilinear"`` or ``"area"``.

    Returns:
        ``[h, w, C]``: uint8 for ``"bilinear"``; for ``"area"`` uint8 from a uint8 image, else float32.
    """
    return resize_image_to(image, get_preprocess_shape(image.shape[0], image.shape[1], long_side), interpolation)


def resize_image_to(image: np.ndarray, size: tuple[int, int], interpolation: Interpolation) -> np.ndarray:
    """Resize an ``[H, W, C]`` image to ``size`` = (h, w) with a model's filter (see :func:`resize_longest_side`).

    Returns:
        ``[h, w, C]``: uint8 for ``"bilinear"``; for ``"area"`` uint8 from a uint8 image, else float32.
    """
    h, w = size
    if interpolation == "bilinear":
        from PIL import Image

        if image.dtype != np.uint8:
            raise ValueError(f"bilinear (PIL) resizing expects a uint8 image, got {image.dtype}")
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if interpolation == "area":
        import cv2

        # LiteMedSAM's reference resizes its uint8 images as uint8: OpenCV rounds (and, enlarging, interpolates in
        # fixed point), which a float32 resize does not reproduce
        source = image if image.dtype == np.uint8 else image.astype(np.float32)
        out = cv2.resize(source, (w, h), interpolation=cv2.INTER_AREA)
        return out[:, :, None] if out.ndim == 2 else out
    raise ValueError(f"interpolation must be 'bilinear' or 'area', got {interpolation!r}")
