"""Deterministic clicks for evaluation: the point of a region farthest from its boundary.

The first click of an evaluation is the centre of the ground-truth mask; every next click is the centre of
the largest error region (false negatives or false positives, whichever reaches farther from its boundary),
as in the interactive-segmentation literature. "Centre" is the pixel with the largest Euclidean distance to
the nearest pixel outside the region, the image border counting as outside; ties go to the first pixel in
raster order. As in the RITM / f-BRS ``Clicker`` (its ``not_clicked_map``), pixels already clicked are never
chosen again: their distance is set to 0 after the distance transform (they still belong to the region), so a
click the model did not follow is not repeated; the next click goes to the next-farthest pixel. Ignored pixels
(void labels, RITM's ignore label) belong to neither error region: they bound the regions like the outside does.

These run on the host (OpenCV's exact distance transform) since they are evaluation-only. All masks are
processed in ONE ``cv2.distanceTransform`` call: the masks, each framed by a one-pixel zero border, are stacked
into one tall image; the frame guarantees that no distance crosses from one mask into another.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from samtune.prompts.geometry import check_masks, flat_index_to_coords
from samtune.prompts.sampling import NEGATIVE_LABEL, PAD_LABEL, POSITIVE_LABEL


def distance_to_boundary(regions: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of every region pixel to the nearest non-region pixel (or the image border).

    Args:
        regions: ``[M, H, W]`` bool (any device).

    Returns:
        ``[M, H, W]`` float32 on the host; 0 outside the regions, 1 on a region pixel that touches the outside.
    """
    check_masks(regions, "regions")
    m, h, w = regions.shape
    if m == 0:
        return torch.zeros((0, h, w), dtype=torch.float32)
    framed = np.zeros((m, h + 2, w + 2), dtype=np.uint8)
    framed[:, 1:-1, 1:-1] = regions.detach().cpu().numpy()
    dist = cv2.distanceTransform(framed.reshape(m * (h + 2), w + 2), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return torch.from_numpy(dist.reshape(m, h + 2, w + 2)[:, 1:-1, 1:-1].copy())


def region_centers(regions: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The point of each region farthest from its boundary.

    Args:
        regions: ``[M, H, W]`` bool.
        scale: model-input pixels per mask pixel.

    Returns:
        ``(coords, labels)`` on ``regions.device``: ``[M, 2]`` float ``(x, y)`` in model-input pixels and
        ``[M]`` long (1, or -1 with (0, 0) for an empty region).
    """
    dist = distance_to_boundary(regions).flatten(1)
    best, index = dist.max(dim=1)
    found = best > 0
    coords = torch.where(found[:, None], flat_index_to_coords(index, regions.shape[-1], scale), 0.0)
    labels = torch.where(found, POSITIVE_LABEL, PAD_LABEL).long()
    return coords.to(regions.device), labels.to(regions.device)


def largest_error_points(
    pred: torch.Tensor,
    gt: torch.Tensor,
    scale: float = 1.0,
    clicked: torch.Tensor | None = None,
    ignore: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next deterministic click: the centre of the largest error region.

    False negatives and false positives are separate regions; the click goes to the one whose centre is
    farther from its boundary (false positives win ties, as in RITM's ``Clicker``: ``fn_max_dist > fp_max_dist``)
    and is positive on a false negative, negative on a false positive.

    Args:
        pred: ``[M, H, W]`` bool predicted masks.
        gt: ``[M, H, W]`` bool ground truth.
        scale: model-input pixels per mask pixel.
        clicked: ``[M, H, W]`` bool pixels clicked before (see :func:`mark_clicked`), never chosen again; None
            for none.
        ignore: ``[M, H, W]`` (or ``[H, W]``, shared) bool pixels that are neither object nor background, left
            out of both error regions; None for none.

    Returns:
        ``(coords, labels)`` on ``gt.device``: ``[M, 2]`` float and ``[M]`` long (1, 0, or -1 with (0, 0) when
        the prediction is exact, or every error pixel has been clicked already).
    """
    check_masks(pred, "pred")
    check_masks(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape")
    m = gt.shape[0]
    fn, fp = gt & ~pred, pred & ~gt
    if ignore is not None:
        if ignore.dtype != torch.bool or ignore.shape not in (gt.shape, gt.shape[1:]):
            raise ValueError(f"ignore must be a bool tensor [M, H, W] or [H, W] for gt {tuple(gt.shape)}, "
                             f"got {ignore.dtype} {tuple(ignore.shape)}")
        fn, fp = fn & ~ignore, fp & ~ignore
    dist = distance_to_boundary(torch.cat((fn, fp))).flatten(1)  # [2M, HW]
    if clicked is not None:
        check_masks(clicked, "clicked")
        if clicked.shape != gt.shape:
            raise ValueError(f"clicked {tuple(clicked.shape)} and gt {tuple(gt.shape)} must have the same shape")
        dist.masked_fill_(clicked.flatten(1).cpu().repeat(2, 1), 0.0)
    best, index = dist.max(dim=1)
    positive = best[:m] > best[m:]
    index = torch.where(positive, index[:m], index[m:])
    found = torch.maximum(best[:m], best[m:]) > 0
    coords = torch.where(found[:, None], flat_index_to_coords(index, gt.shape[-1], scale), 0.0)
    labels = torch.where(found, torch.where(positive, POSITIVE_LABEL, NEGATIVE_LABEL), PAD_LABEL).long()
    return coords.to(gt.device), labels.to(gt.device)


def mark_clicked(
    clicked: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Record clicks in the map of clicked pixels that :func:`largest_error_points` excludes.

    Args:
        clicked: ``[M, H, W]`` bool, updated in place.
        coords: ``[M, 2]`` ``(x, y)`` clicks as :func:`region_centers` / :func:`largest_error_points` give them
            with the same ``scale`` (model-input pixels: ``(col + 0.5) * scale - 0.5``).
        labels: ``[M]`` click labels; padding clicks (-1) mark nothing.
        scale: model-input pixels per mask pixel.

    Returns:
        ``clicked``.
    """
    check_masks(clicked, "clicked")
    m, h, w = clicked.shape
    if coords.shape != (m, 2) or labels.shape != (m,):
        raise ValueError(f"coords must be [M, 2] and labels [M] for M={m}, got {tuple(coords.shape)}, "
                         f"{tuple(labels.shape)}")
    pixel = torch.round((coords.float() + 0.5) / scale - 0.5).long()  # (col, row)
    real = (labels != PAD_LABEL).to(clicked.device)
    cols = pixel[:, 0].clamp(0, w - 1).to(clicked.device)
    rows = pixel[:, 1].clamp(0, h - 1).to(clicked.device)
    index = torch.arange(m, device=clicked.device)
    clicked[index[real], rows[real], cols[real]] = True
    return clicked
