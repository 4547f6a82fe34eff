"""Random prompt samplers of the SAM training recipe, vectorised over masks and free of host synchronisation.

Every function takes bool masks ``[M, H, W]`` (all masks of all images of a batch), works on the masks'
device with a seeded ``torch.Generator`` on that device, and returns fixed-shape tensors: no ``.item()``, no
``nonzero()``, no boolean indexing, no Python branching on tensor values. A uniform pixel of a region is drawn
by giving every pixel an independent uniform score, setting the pixels outside the region to -1 and taking the
argmax (the maximum of i.i.d. uniforms is equally likely to be at any region pixel).

A mask whose region is empty yields a padding point: label -1, coordinates (0, 0).

Coordinates are ``(x, y)`` in model-input pixels (see :mod:`samtune.prompts.geometry`); ``scale`` is the
number of model-input pixels per mask pixel (4 for 256x256 masks and a 1024 input).
"""
from __future__ import annotations

import torch

from samtune.prompts.geometry import check_masks, flat_index_to_coords

PAD_LABEL = -1
NEGATIVE_LABEL = 0
POSITIVE_LABEL = 1
BOX_TOP_LEFT_LABEL = 2
BOX_BOTTOM_RIGHT_LABEL = 3


def _check_generator(generator: torch.Generator, device: torch.device) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device.type!r} but the masks are on {device.type!r}: "
            f"create it with torch.Generator(device=masks.device)"
        )


def uniform_pixel(region: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one pixel uniformly from each region.

    Args:
        region: ``[M, H, W]`` bool.
        generator: random generator on ``region.device``.

    Returns:
        ``(index, found)``: ``[M]`` long flat indices ``row * W + col`` (arbitrary where the region is empty)
        and ``[M]`` bool, False where the region is empty.
    """
    check_masks(region, "region")
    _check_generator(generator, region.device)
    flat = region.flatten(1)
    scores = torch.rand(flat.shape, generator=generator, device=flat.device)
    scores = torch.where(flat, scores, torch.full_like(scores, -1.0))
    return scores.argmax(dim=1), flat.any(dim=1)


def sample_points_in_masks(
    masks: torch.Tensor, generator: torch.Generator, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive point drawn uniformly inside each mask.

    Args:
        masks: ``[M, H, W]`` bool.
        generator: random generator on ``masks.device``.
        scale: model-input pixels per mask pixel.

    Returns:
        ``(coords, labels)``: ``[M, 2]`` float ``(x, y)`` in model-input pixels and ``[M]`` long labels
        (1, or -1 with coordinates (0, 0) for an empty mask).
    """
    index, found = uniform_pixel(masks, generator)
    coords = flat_index_to_coords(index, masks.shape[-1], scale)
    coords = torch.where(found[:, None], coords, torch.zeros_like(coords))
    labels = torch.where(found, POSITIVE_LABEL, PAD_LABEL).long()
    return coords, labels


def sample_error_points(
    pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective point drawn uniformly from each error region (false negatives and false positives).

    The point is drawn uniformly over the union of both; its label follows from where it lands: 1 on a
    false negative (inside the ground truth), 0 on a false positive.

    Args:
        pred: ``[M, H, W]`` bool predicted masks.
        gt: ``[M, H, W]`` bool ground truth.
        generator: random generator on the masks' device.
        scale: model-input pixels per mask pixel.

    Returns:
        ``(coords, labels)``: ``[M, 2]`` float and ``[M]`` long (1, 0, or -1 with (0, 0) where the prediction
        is exact).
    """
    check_masks(pred, "pred")
    check_masks(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape")
    index, found = uniform_pixel(pred ^ gt, generator)
    on_gt = gt.flatten(1).gather(1, index[:, None])[:, 0]
    labels = torch.where(found, torch.where(on_gt, POSITIVE_LABEL, NEGATIVE_LABEL), PAD_LABEL).long()
    coords = flat_index_to_coords(index, gt.shape[-1], scale)
    coords = torch.where(found[:, None], coords, torch.zeros_like(coords))
    return coords, labels


def mask_boxes(masks: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of masks in model-input pixels.

    The box spans the model-input pixels covered by the mask: ``x0 = min_col * scale`` and
    ``x1 = (max_col + 1) * scale - 1`` (pixel-index convention, inclusive corners; ``x0 = min_col`` and
    ``x1 = max_col`` at ``scale == 1``).

    Args:
        masks: ``[M, H, W]`` bool.
        scale: model-input pixels per mask pixel.

    Returns:
        ``(boxes, found)``: ``[M, 4]`` float ``(x0, y0, x1, y1)`` (zeros for an empty mask) and ``[M]`` bool.
    """
    check_masks(masks, "masks")
    _, h, w = masks.shape
    cols_any = masks.any(dim=1)  # [M, W]
    rows_any = masks.any(dim=2)  # [M, H]
    cols = torch.arange(w, device=masks.device)
    rows = torch.arange(h, device=masks.device)
    x0 = torch.where(cols_any, cols, w).amin(dim=1)
    x1 = torch.where(cols_any, cols, -1).amax(dim=1)
    y0 = torch.where(rows_any, rows, h).amin(dim=1)
    y1 = torch.where(rows_any, rows, -1).amax(dim=1)
    boxes = torch.stack((x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1), dim=1).float()
    found = cols_any.any(dim=1)
    return torch.where(found[:, None], boxes, torch.zeros_like(boxes)), found


def jitter_boxes(
    boxes: torch.Tensor,
    generator: torch.Generator,
    image_size: int | torch.Tensor,
    std_fraction: float = 0.1,
    max_std: float = 20.0,
) -> torch.Tensor:
    """Add Gaussian noise to each box coordinate, as in the SAM training recipe.

    Each x coordinate gets noise of standard deviation ``min(std_fraction * width, max_std)`` and each y
    coordinate ``min(std_fraction * height, max_std)``, where width and height are the box sides in pixels
    (``x1 - x0 + 1``). The result is clipped to the image (``[0, size - 1]``) and the corners are re-ordered
    so that ``x0 <= x1`` and ``y0 <= y1``.

    Args:
        boxes: ``[M, 4]`` float ``(x0, y0, x1, y1)`` in model-input pixels.
        generator: random generator on ``boxes.device``.
        image_size: the clipping extent: one int for the square model input, or ``[M, 2]`` ``(h, w)`` per box
            (e.g. the unpadded image size).
        std_fraction: noise standard deviation as a fraction of the box side.
        max_std: cap of the noise standard deviation, in pixels.

    Returns:
        ``[M, 4]`` float.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [M, 4] (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if std_fraction < 0 or max_std < 0:
        raise ValueError(f"std_fraction and max_std must be >= 0, got {std_fraction}, {max_std}")
    _check_generator(generator, boxes.device)
    sides = torch.stack((boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]), dim=1) + 1.0  # [M, 2] (w, h)
    std = (sides * std_fraction).clamp(max=max_std).repeat(1, 2)  # [M, 4]: w, h, w, h
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device) * std
    noisy = boxes + noise
    if isinstance(image_size, torch.Tensor):
        if image_size.shape != (boxes.shape[0], 2):
            raise ValueError(f"image_size must be an int or [M, 2] (h, w), got {tuple(image_size.shape)}")
        hi = image_size.flip(-1).to(noisy).repeat(1, 2) - 1.0  # [M, 4]: w, h, w, h
    else:
        hi = torch.full_like(noisy, float(image_size) - 1.0)
    noisy = torch.minimum(noisy.clamp_min(0.0), hi)
    lo_xy = torch.minimum(noisy[:, :2], noisy[:, 2:])
    hi_xy = torch.maximum(noisy[:, :2], noisy[:, 2:])
    return torch.cat((lo_xy, hi_xy), dim=1)


def sample_noisy_boxes(
    masks: torch.Tensor,
    generator: torch.Generator,
    scale: float = 1.0,
    std_fraction: float = 0.1,
    max_std: float = 20.0,
    image_size: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground-truth box of each mask with coordinate noise (:func:`mask_boxes` then :func:`jitter_boxes`).

    Args:
        masks: ``[M, H, W]`` bool.
        generator: random generator on ``masks.device``.
        scale: model-input pixels per mask pixel.
        std_fraction: noise standard deviation as a fraction of the box side.
        max_std: cap of the noise standard deviation, in pixels.
        image_size: clipping extent (int or ``[M, 2]`` ``(h, w)``); default: the mask canvas ``W * scale``.

    Returns:
        ``(boxes, found)``: ``[M, 4]`` float (zeros for an empty mask) and ``[M]`` bool.
    """
    boxes, found = mask_boxes(masks, scale)
    extent = round(masks.shape[-1] * scale) if image_size is None else image_size
    noisy = jitter_boxes(boxes, generator, extent, std_fraction, max_std)
    return torch.where(found[:, None], noisy, torch.zeros_like(noisy)), found
