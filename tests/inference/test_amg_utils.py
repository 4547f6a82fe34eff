"""amg_utils against the official ``segment_anything.utils.amg`` helpers (same conventions, exact results)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from samtune.inference.amg_utils import (
    MaskUpsampler,
    boxes_near_crop_edge,
    build_point_grids,
    coco_rle,
    generate_crop_boxes,
    masks_to_boxes,
    masks_to_coco_rle,
    masks_to_rle,
    remove_small_regions,
    rle_to_mask,
    stability_score,
    xyxy_to_xywh,
)

amg = pytest.importorskip("segment_anything.utils.amg", reason="the official segment-anything package is the reference")


def _blobs(n: int = 12, h: int = 37, w: int = 53, seed: int = 0) -> torch.Tensor:
    """Random blobby masks with holes and islands, plus an empty and a full mask and edge cases."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, 6, 8, generator=gen)
    masks = F.interpolate(low, (h, w), mode="bilinear", align_corners=False)[:, 0] > 0.6
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 0, 0] = True  # first pixel set: RLE starts with a zero-length run
    masks[3] = False
    masks[3, -1, -1] = True
    return masks


@pytest.mark.parametrize("size, layers, ratio", [((480, 640), 0, 512 / 1500), ((480, 640), 2, 512 / 1500), ((333, 250), 1, 0.2), ((100, 701), 3, 0.5)])
def test_crop_boxes_and_point_grids(size, layers, ratio):
    assert generate_crop_boxes(size, layers, ratio) == amg.generate_crop_boxes(size, layers, ratio)
    for ours, ref in zip(build_point_grids(32, layers, 2), amg.build_all_layer_point_grids(32, layers, 2)):
        np.testing.assert_array_equal(ours, ref)
    with pytest.raises(ValueError, match=">= 1"):
        build_point_grids(1, 1, 2)


@pytest.mark.parametrize("size, layers", [((300, 1), 1), ((1, 300), 1), ((3, 200), 2), ((200, 5), 3)])
def test_crop_boxes_of_thin_images_are_not_empty(size, layers):
    """Layers with more crops per side than a thin image has pixels: no empty (or inverted) crop boxes, whose
    crops would be 0-pixel images; the boxes kept are the official ones, in their order."""
    h, w = size
    boxes, layer_of = generate_crop_boxes(size, layers, 512 / 1500)
    assert len(boxes) == len(layer_of) and set(layer_of) <= set(range(layers + 1)) and layer_of[0] == 0
    assert all(0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h for x0, y0, x1, y1 in boxes), boxes
    ref_boxes, ref_layers = amg.generate_crop_boxes(size, layers, 512 / 1500)
    kept = [(b, layer) for b, layer in zip(ref_boxes, ref_layers) if b[2] > b[0] and b[3] > b[1]]
    assert list(zip(boxes, layer_of)) == kept


def test_boxes_rle_and_coco_rle():
    masks = _blobs()
    assert torch.equal(masks_to_boxes(masks), amg.batched_mask_to_box(masks))
    assert masks_to_boxes(masks[:0]).shape == (0, 4)
    rle = masks_to_rle(masks)
    assert rle == amg.mask_to_rle_pytorch(masks)
    assert masks_to_rle(masks[:0]) == []
    assert masks_to_coco_rle(masks) == [amg.coco_encode_rle(r) for r in rle]
    for r, m in zip(rle, masks.numpy()):
        np.testing.assert_array_equal(rle_to_mask(r), m)
        np.testing.assert_array_equal(rle_to_mask(coco_rle(r)), m)
        assert coco_rle(m) == coco_rle(r) == amg.coco_encode_rle(r)
        assert sum(r["counts"][1::2]) == amg.area_from_rle(r) == m.sum()
    np.testing.assert_array_equal(xyxy_to_xywh(np.array([[2, 3, 10, 20]])), [[2, 3, 8, 17]])


def test_coco_rle_errors():
    with pytest.raises(ValueError, match="sum to 5"):
        coco_rle({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match="image size"):
        coco_rle(np.zeros((4, 4), bool), size=(4, 5))
    with pytest.raises(ValueError, match="RLE dict"):
        coco_rle([1, 2, 3])
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        coco_rle(np.zeros((1, 4, 4), bool))


def test_stability_and_crop_edges():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, 30, generator=gen) * 3
    logits[0] = -5  # empty at both thresholds: NaN, as the reference
    ours = stability_score(logits, 0.0, 1.0)
    ref = amg.calculate_stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    boxes = torch.tensor([[0, 0, 30, 30], [5, 5, 99, 50], [100, 0, 110, 10], [0, 0, 199, 99], [40, 40, 60, 60]])
    for crop, image in [([100, 50, 300, 150], [0, 0, 300, 200]), ([0, 0, 200, 100], [0, 0, 200, 100])]:
        assert torch.equal(boxes_near_crop_edge(boxes, crop, image), amg.is_box_near_crop_edge(boxes, crop, image))


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 40, 100000])
def test_remove_small_regions(mode, area):
    for mask in _blobs(seed=3).numpy():
        ours, changed = remove_small_regions(mask, area, mode)
        ref, ref_changed = amg.remove_small_regions(mask, area, mode)
        assert changed == ref_changed
        np.testing.assert_array_equal(ours, ref)
    with pytest.raises(ValueError, match="mode"):
        remove_small_regions(mask, 10, "edges")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "low, size, input_size, original",
    [(256, 1024, (683, 1024), (427, 640)), (64, 256, (256, 188), (300, 220)), (256, 256, (256, 256), (512, 512)), (64, 256, (200, 256), (150, 192))],
)
def test_upsampler_matches_postprocess(low, size, input_size, original):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, low, low, generator=gen) * 8
    ref = F.interpolate(logits[:, None], (size, size), mode="bilinear", align_corners=False)
    ref = F.interpolate(ref[..., : input_size[0], : input_size[1]], original, mode="bilinear", align_corners=False)[:, 0]
    up = MaskUpsampler(low, size, input_size, original)
    ours = up(logits)
    assert ours.shape == (3, *original) and up.size == original and up.chunk >= 1
    # float32 rounding of logits up to ~30 in magnitude (the order of the GEMMs differs from two interpolations)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)
    assert ((ours > 0) != (ref > 0)).float().mean() < 1e-4
