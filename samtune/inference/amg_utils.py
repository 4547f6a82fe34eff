"""Building blocks of automatic mask generation: point grids, crop boxes, mask geometry, upsampling and RLE.

Every function works on whole batches of masks. Conventions follow the official ``segment_anything`` generator,
so its outputs can be compared record by record:

* boxes are ``[x0, y0, x1, y1]`` with *inclusive* right/bottom pixel indices (an empty mask has ``[0, 0, 0, 0]``);
* uncompressed RLE is ``{"size": [h, w], "counts": [int, ...]}`` over the column-major (Fortran) pixel order,
  starting with the length of the first run of zeros (0 when the first pixel is set); COCO RLE is the same runs
  compressed by pycocotools, with ``counts`` as a ``str`` so that it serialises to JSON.
"""
from __future__ import annotations

import math
from itertools import product
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "build_point_grid",
    "build_point_grids",
    "generate_crop_boxes",
    "masks_to_boxes",
    "boxes_near_crop_edge",
    "stability_score",
    "MaskUpsampler",
    "masks_to_rle",
    "masks_to_coco_rle",
    "rle_to_mask",
    "coco_rle",
    "remove_small_regions",
    "xyxy_to_xywh",
]


# --------------------------------------------------------------------------- prompts and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """Centres of an ``n x n`` grid of cells over the unit square.

    Returns:
        ``[n * n, 2]`` (x, y) in [0, 1], row by row (x varies fastest).
    """
    if n_per_side < 1:
        raise ValueError(f"points per side must be >= 1, got {n_per_side}")
    centres = (np.arange(n_per_side, dtype=np.float64) + 0.5) / n_per_side
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def build_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per crop layer; layer ``i`` has ``int(n_per_side / downscale**i)`` points per side."""
    return [build_point_grid(int(n_per_side / downscale**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of every layer: the whole image, then ``(2**i)**2`` overlapping crops in layer ``i``.

    Layer ``i`` (1-based) tiles the image with ``2**i`` crops per side overlapping by
    ``int(overlap_ratio * short_side * 2 / 2**i)`` pixels.

    Args:
        image_size: (H, W).
        n_layers: number of crop layers after the whole image.
        overlap_ratio: overlap of neighbouring crops in layer 1 as a fraction of the image's short side.

    Returns:
        Boxes ``[x0, y0, x1, y1]`` (exclusive right/bottom) and the layer of each box; order: layer by layer,
        within a layer by x0 then y0. Where a layer has more crops per side than a thin image has pixels, the
        official tiling puts some crops past the image edge (empty or inverted boxes, 0-pixel crops on which the
        official generator crashes); those are left out.
    """
    h, w = image_size
    boxes: list[list[int]] = [[0, 0, w, h]]
    layers = [0]
    short = min(h, w)
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + h) / n))
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            box = [x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)]
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append(box)
                layers.append(layer)
    return boxes, layers


# --------------------------------------------------------------------------- mask geometry
def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of boolean masks.

    Args:
        masks: ``[N, H, W]`` bool.

    Returns:
        ``[N, 4]`` int64 ``[x0, y0, x1, y1]`` with inclusive x1/y1; ``[0, 0, 0, 0]`` for empty masks.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows = masks.any(dim=2)  # [N, H]
    cols = masks.any(dim=1)  # [N, W]
    empty = ~rows.any(dim=1)
    y0 = rows.to(torch.uint8).argmax(dim=1)
    y1 = h - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x0 = cols.to(torch.uint8).argmax(dim=1)
    x1 = w - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).long()
    return boxes.masked_fill(empty[:, None], 0)


def boxes_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], image_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Which boxes touch a crop edge that is not also an image edge (those masks are likely cut by the crop).

    Args:
        boxes: ``[N, 4]`` xyxy in the crop's frame.
        crop_box: ``[x0, y0, x1, y1]`` of the crop in the image.
        image_box: ``[0, 0, W, H]``.
        atol: distance in pixels that counts as touching.

    Returns:
        ``[N]`` bool.
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float32, device=boxes.device)
    offset = torch.tensor([crop_box[0], crop_box[1]] * 2, dtype=torch.float32, device=boxes.device)
    boxes = boxes.float() + offset
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``threshold + offset`` and ``threshold - offset``.

    The first is contained in the second, so the IoU is the ratio of their areas.

    Args:
        logits: ``[N, H, W]``.

    Returns:
        ``[N]`` float32 (NaN where both are empty).
    """
    inner = (logits > threshold + offset).sum(dim=-1, dtype=torch.int32).sum(dim=-1, dtype=torch.int32)
    outer = (logits > threshold - offset).sum(dim=-1, dtype=torch.int32).sum(dim=-1, dtype=torch.int32)
    return inner / outer


def xyxy_to_xywh(boxes: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """``[..., 4]`` ``[x0, y0, x1, y1]`` -> ``[x0, y0, x1 - x0, y1 - y0]``."""
    out = boxes.clone() if isinstance(boxes, torch.Tensor) else np.array(boxes, copy=True)
    out[..., 2:] = out[..., 2:] - out[..., :2]
    return out


# --------------------------------------------------------------------------- upsampling
def _linear_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """``[out, in]`` float64 weights of 1-D linear interpolation as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes them (source index and weights in float32, as PyTorch does)."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    src = (scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0)
    lo = src.long().clamp_max(in_size - 1)
    hi = torch.where(lo < in_size - 1, lo + 1, lo)
    frac = (src - lo).clamp(0, 1)
    rows = torch.arange(out_size)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    weights.index_put_((rows, lo), (1 - frac).double(), accumulate=True)
    weights.index_put_((rows, hi), frac.double(), accumulate=True)
    return weights


class MaskUpsampler:
    """Low-res logits -> logits at the original image size, as ``Sam.postprocess_masks`` but in one step.

    ``postprocess_masks`` upsamples to the square model input, crops the padding and resizes to the original
    size: two bilinear interpolations and a crop, all linear and separable. Here they are folded into one
    ``[H, L]`` and one ``[W, L]`` matrix, so ``A_h @ x @ A_w^T`` gives the same logits (to float rounding,
    ~1e-6) without materialising the ``S x S`` intermediate.

    Args:
        low_res: side L of the low-res logits (256 for SAM).
        image_size: side S of the square model input.
        input_size: (h, w) of the resized image inside the model input.
        original_size: (H, W) wanted.
        device: where the matrices live.
        max_pixels: memory bound of one call's intermediate results, in float32 elements.
    """

    def __init__(
        self,
        low_res: int,
        image_size: int,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        device: torch.device | str = "cpu",
        max_pixels: int = 1 << 24,
    ) -> None:
        up = _linear_resize_matrix(low_res, image_size)
        self.rows = (_linear_resize_matrix(input_size[0], original_size[0]) @ up[: input_size[0]]).float().to(device)
        self.cols_t = (_linear_resize_matrix(input_size[1], original_size[1]) @ up[: input_size[1]]).float().T.contiguous().to(device)
        self.size = (int(original_size[0]), int(original_size[1]))
        self.chunk = max(1, max_pixels // (self.size[0] * self.size[1] + low_res * self.size[1]))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``[N, L, L]`` -> ``[N, H, W]`` float32 (call in chunks of ``self.chunk`` to bound memory)."""
        return torch.matmul(self.rows, torch.matmul(logits.float(), self.cols_t))


# --------------------------------------------------------------------------- RLE
def masks_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Uncompressed RLE of a batch of masks (column-major runs, first run counts zeros).

    Args:
        masks: ``[N, H, W]`` bool.

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": [int, ...]}``.
    """
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.transpose(1, 2).reshape(n, h * w)
    mask_idx, pos = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)  # run ends, sorted by mask
    per_mask = torch.bincount(mask_idx, minlength=n)
    # Per mask the run boundaries are [0, ends + 1, H*W]; lay them out back to back and difference.
    seg_len = per_mask + 2
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    bounds = torch.empty(int(seg_len.sum()), dtype=torch.long, device=masks.device)
    bounds[seg_start] = 0
    bounds[seg_start + seg_len - 1] = h * w
    rank = torch.arange(mask_idx.numel(), device=masks.device) - (torch.cumsum(per_mask, 0) - per_mask)[mask_idx]
    bounds[seg_start[mask_idx] + 1 + rank] = pos + 1
    runs = (bounds[1:] - bounds[:-1]).tolist()
    starts = seg_start.tolist()
    lengths = (seg_len - 1).tolist()
    first = flat[:, 0].tolist()
    out = []
    for i in range(n):
        counts = runs[starts[i] : starts[i] + lengths[i]]
        out.append({"size": [h, w], "counts": [0] + counts if first[i] else counts})
    return out


def masks_to_coco_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """COCO (compressed) RLE of a batch of masks, ``counts`` decoded to ``str`` for JSON.

    Args:
        masks: ``[N, H, W]`` bool.

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}``.
    """
    from pycocotools import mask as mask_utils

    array = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if array.shape[0] == 0:
        return []
    encoded = mask_utils.encode(np.asfortranarray(array.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("utf-8")} for r in encoded]


def coco_rle(segmentation: Any, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Any mask form of a generator record (bool array, uncompressed or COCO RLE) as COCO RLE with ``str`` counts.

    Args:
        segmentation: ``[H, W]`` bool array, ``{"size", "counts": list}`` or ``{"size", "counts": str | bytes}``.
        size: (H, W) the mask must have, checked when given.

    Raises:
        ValueError: unknown form or wrong size.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, (np.ndarray, torch.Tensor)):
        array = segmentation.cpu().numpy() if isinstance(segmentation, torch.Tensor) else segmentation
        if array.ndim != 2:
            raise ValueError(f"a binary mask must be [H, W], got shape {array.shape}")
        rle = masks_to_coco_rle(array[None].astype(bool))[0]
    elif isinstance(segmentation, dict) and {"size", "counts"} <= segmentation.keys():
        h, w = (int(s) for s in segmentation["size"])
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != h * w:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {h} * {w} = {h * w}")
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            rle = {"size": [h, w], "counts": rle["counts"].decode("utf-8")}
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [h, w], "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}
        else:
            raise ValueError(f"RLE counts must be a list of ints or a string, got {type(counts).__name__}")
    else:
        raise ValueError(
            "segmentation must be a bool [H, W] array or an RLE dict with 'size' and 'counts', "
            f"got {type(segmentation).__name__}"
        )
    if size is not None and tuple(rle["size"]) != tuple(size):
        raise ValueError(f"mask size {tuple(rle['size'])} differs from the image size {tuple(size)}")
    return rle


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed or COCO RLE to an ``[H, W]`` bool array."""
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        values = np.zeros(len(counts), dtype=bool)
        values[1::2] = True
        flat = np.repeat(values, counts)
        if flat.size != h * w:
            raise ValueError(f"RLE counts sum to {flat.size}, expected {h} * {w} = {h * w}")
        return flat.reshape(w, h).T
    from pycocotools import mask as mask_utils

    return mask_utils.decode(coco_rle(rle)).astype(bool)


# --------------------------------------------------------------------------- clean-up
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: Literal["holes", "islands"]) -> tuple[np.ndarray, bool]:
    """Fill holes or drop islands smaller than ``area_thresh`` pixels (8-connected components, OpenCV).

    In ``"islands"`` mode a mask whose every component is small keeps its largest one.

    Args:
        mask: ``[H, W]`` bool.
        area_thresh: components with fewer pixels are changed.
        mode: ``"holes"`` (components of the background) or ``"islands"`` (components of the mask).

    Returns:
        The new mask and whether it changed.
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    work = (mask != holes).astype(np.uint8)  # holes: the background's components; islands: the mask's
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    keep = np.zeros(n_labels, dtype=bool)  # per label: is the pixel in the new mask
    if holes:
        keep[0] = True  # label 0 = the mask itself
        keep[1:] = small  # small background components (holes) are filled
    else:
        keep[1:] = ~small
        if not keep.any():
            keep[int(np.argmax(sizes)) + 1] = True
    return keep[labels], True
