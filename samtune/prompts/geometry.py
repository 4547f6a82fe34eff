"""Resolution and coordinate conventions shared by the prompt samplers, the simulator and the losses.

Coordinates follow the official SAM prompt encoder: a point ``(x, y)`` is a *pixel index* in model-input
pixels (the encoder adds 0.5 to reach the pixel centre). A mask pixel ``(row, col)`` given at a resolution
``scale`` times coarser than the model input covers the input pixels ``col * scale .. (col + 1) * scale - 1``;
its centre, in that convention, is ``(col + 0.5) * scale - 0.5`` (``col`` itself when ``scale == 1``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_masks(masks: torch.Tensor, name: str) -> None:
    """Raise a clear error unless ``masks`` is a bool ``[M, H, W]`` tensor with H, W > 0."""
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.ndim != 3:
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"{name} must be a bool tensor [M, H, W], got {got}")
    if masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"{name} must have a non-empty spatial size, got {tuple(masks.shape)}")


def resize_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize bool masks by area interpolation, keeping pixels that are at least half covered.

    This is the rule used wherever ground truth meets the 256x256 low-res logits ("low" resolution). A non-empty
    mask never comes out empty: where no pixel is half covered (a structure thinner than the grid, e.g. a 1-2 px
    membrane or vessel at 1024 for the 4x coarser grid), the pixels at least half as covered as the mask's most
    covered pixel are kept, so that the mask still gets a first click and a non-empty loss target.

    Args:
        masks: ``[M, H, W]`` bool.
        size: target ``(h, w)`` (or one int for a square).

    Returns:
        ``[M, h, w]`` bool; ``masks`` itself when the size already matches.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(masks.shape[-2:]) == hw:
        return masks
    coverage = F.interpolate(masks[:, None].float(), size=hw, mode="area")[:, 0]
    resized = coverage >= 0.5
    peak = coverage.flatten(1).amax(dim=1)  # [M]
    thin = (peak > 0) & (peak < 0.5)  # non-empty masks that the half-coverage rule would erase
    return torch.where(thin[:, None, None], coverage >= 0.5 * peak[:, None, None], resized)


def resize_logits(logits: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize mask logits (``align_corners=False``, as the official postprocessing).

    Args:
        logits: ``[M, C, h, w]`` float.
        size: target ``(H, W)`` (or one int for a square).

    Returns:
        ``[M, C, H, W]``; ``logits`` itself when the size already matches.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(logits.shape[-2:]) == hw:
        return logits
    return F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)


def mask_scale(masks: torch.Tensor, image_size: int, name: str = "masks") -> float:
    """Model-input pixels per mask pixel for square masks covering the (square, padded) model input.

    Args:
        masks: ``[M, S, S]``.
        image_size: model-input side (e.g. 1024).
        name: argument name used in the error message.
    """
    h, w = masks.shape[-2:]
    if h != w:
        raise ValueError(
            f"{name} must be square and cover the padded model input ({image_size}x{image_size}), "
            f"got spatial size {h}x{w}"
        )
    return float(image_size) / float(w)


def content_region(
    image_sizes: torch.Tensor | None, m: int, size: tuple[int, int] | torch.Size, scale: float, device: torch.device
) -> torch.Tensor:
    """The pixels of each mask's unpadded image on a (padded) mask grid.

    A grid pixel belongs to the image when any part of it does (``ceil(h / scale)`` rows, ``ceil(w / scale)``
    columns).

    Args:
        image_sizes: ``[M, 2]`` ``(h, w)`` of each mask's unpadded image in model-input pixels, or None.
        m: M, the number of masks.
        size: the grid's ``(H, W)``.
        scale: model-input pixels per grid pixel.
        device: device of the result.

    Returns:
        ``[M, H, W]`` bool (``[1, 1, 1]`` True without ``image_sizes``; broadcastable either way).
    """
    if image_sizes is None:
        return torch.ones((1, 1, 1), dtype=torch.bool, device=device)
    if image_sizes.shape != (m, 2):
        raise ValueError(f"image_sizes must be [M, 2]=({m}, 2) (h, w), got {tuple(image_sizes.shape)}")
    hw = torch.ceil(image_sizes.to(device=device, dtype=torch.float32) / scale)  # model-input px -> grid px
    rows = torch.arange(size[0], device=device)[None, :, None] < hw[:, 0, None, None]
    cols = torch.arange(size[1], device=device)[None, None, :] < hw[:, 1, None, None]
    return rows & cols


def flat_index_to_coords(index: torch.Tensor, width: int, scale: float) -> torch.Tensor:
    """Convert flat pixel indices of a ``[*, H, W]`` grid to model-input ``(x, y)`` coordinates.

    Args:
        index: ``[M]`` long flat indices ``row * width + col``.
        width: grid width W.
        scale: model-input pixels per grid pixel.

    Returns:
        ``[M, 2]`` float ``(x, y)`` = ``(col + 0.5) * scale - 0.5``, ``(row + 0.5) * scale - 0.5``.
    """
    rows = torch.div(index, width, rounding_mode="floor")
    cols = index - rows * width
    xy = torch.stack((cols, rows), dim=-1).float()
    return (xy + 0.5) * scale - 0.5


def mask_iou(pred: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of bool masks per mask; 1 where both are empty.

    Args:
        pred: ``[..., h, w]`` bool.
        targets: ``[..., h, w]`` bool (broadcastable to ``pred``).
        ignore: ``[..., h, w]`` bool (broadcastable) pixels left out of both the intersection and the union (void
            labels, RITM's ``get_iou`` with an ignore label); None for none.

    Returns:
        ``[...]`` float.
    """
    inter, union = pred & targets, pred | targets
    if ignore is not None:
        inter, union = inter & ~ignore, union & ~ignore
    inter, union = inter.sum(dim=(-2, -1)).float(), union.sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))
