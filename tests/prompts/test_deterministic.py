"""Deterministic evaluation clicks: distance to the boundary, region centres, largest error region."""
from __future__ import annotations

import math

import pytest
import torch

from samtune.prompts import distance_to_boundary, largest_error_points, mark_clicked, mask_iou, region_centers


def test_distance_to_boundary_hand_values_and_border() -> None:
    regions = torch.zeros(2, 7, 7, dtype=torch.bool)
    regions[0, 1:6, 1:6] = True  # 5x5 square: centre (3, 3) is 3 from the nearest outside pixel
    regions[1] = True  # whole image: the border counts as outside
    dist = distance_to_boundary(regions)
    assert dist[0, 3, 3].item() == pytest.approx(3.0)
    assert dist[0, 1, 1].item() == pytest.approx(1.0)
    assert dist[0, 0, 0].item() == 0.0
    assert dist[1, 3, 3].item() == pytest.approx(4.0)  # frame at index -1 / 7
    assert dist[1, 0, 0].item() == pytest.approx(1.0)
    assert dist[0, 2, 2].item() == pytest.approx(2.0)


def test_masks_do_not_leak_into_each_other() -> None:
    regions = torch.rand(5, 9, 11) > 0.3
    regions[2] = True
    batched = distance_to_boundary(regions)
    for i in range(5):
        assert torch.equal(batched[i], distance_to_boundary(regions[i : i + 1])[0])
    assert distance_to_boundary(regions[:0]).shape == (0, 9, 11)


def test_region_centres_with_scale_and_empty() -> None:
    regions = torch.zeros(3, 8, 8, dtype=torch.bool)
    regions[0, 1:6, 2:7] = True  # centre pixel (row 3, col 4)
    regions[1, 7, 0] = True  # one pixel in a corner
    coords, labels = region_centers(regions, scale=4.0)
    assert coords[0].tolist() == [4.5 * 4 - 0.5, 3.5 * 4 - 0.5]
    assert coords[1].tolist() == [0.5 * 4 - 0.5, 7.5 * 4 - 0.5]
    assert coords[2].tolist() == [0.0, 0.0]
    assert labels.tolist() == [1, 1, -1]


def test_largest_error_region_sign_and_position() -> None:
    gt = torch.zeros(3, 10, 10, dtype=torch.bool)
    pred = torch.zeros(3, 10, 10, dtype=torch.bool)
    # Mask 0: a large miss (FN block) and a small false positive.
    gt[0, 0:5, 0:5] = True
    pred[0, 9, 9] = True
    # Mask 1: the prediction overflows widely (FP) while missing one pixel.
    gt[1, 0, 0] = True
    pred[1, 3:10, 3:10] = True
    # Mask 2: exact.
    gt[2, 4:6, 4:6] = True
    pred[2] = gt[2]
    coords, labels = largest_error_points(pred, gt)
    assert labels.tolist() == [1, 0, -1]
    assert coords[0].tolist() == [2.0, 2.0]  # centre of the 5x5 FN block at rows/cols 0..4
    assert coords[1].tolist() == [6.0, 6.0]  # centre of the 7x7 FP block at 3..9
    assert coords[2].tolist() == [0.0, 0.0]


def test_equally_deep_error_regions_give_a_negative_click_as_in_ritm() -> None:
    """RITM's Clicker clicks positive only when ``fn_max_dist > fp_max_dist``: a tie goes to the false positive."""
    gt = torch.zeros(1, 8, 10, dtype=torch.bool)
    gt[0, 2:6, 2:5] = True
    pred = gt.clone()
    pred[0, 2:6, 4] = False  # a 1 px wide false-negative strip (column 4) ...
    pred[0, 2:6, 6] = True  # ... and a 1 px wide false-positive strip (column 6): both 1 from their boundary
    coords, labels = largest_error_points(pred, gt)
    assert labels.tolist() == [0] and coords[0].tolist() == [6.0, 2.0]


def test_deterministic_and_device_preserved() -> None:
    gt = torch.rand(4, 16, 16) > 0.4
    pred = torch.rand(4, 16, 16) > 0.4
    a = largest_error_points(pred, gt, scale=2.0)
    b = largest_error_points(pred, gt, scale=2.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].device == gt.device and a[1].dtype == torch.long
    for i in range(4):  # the click sits on a pixel with the maximum distance of its error kind
        col = int(round((a[0][i, 0].item() + 0.5) / 2 - 0.5))
        row = int(round((a[0][i, 1].item() + 0.5) / 2 - 0.5))
        assert (gt[i, row, col] != pred[i, row, col]) and (gt[i, row, col] == bool(a[1][i]))
        kind = (gt[i] & ~pred[i]) if a[1][i] == 1 else (pred[i] & ~gt[i])
        kind_dist = distance_to_boundary(kind[None])[0]
        assert math.isclose(kind_dist.max().item(), kind_dist[row, col].item())


def test_clicked_pixels_are_never_chosen_again() -> None:
    """RITM's not_clicked_map: the distance map is zeroed on pixels already clicked before the argmax, so a click
    that did not flip its pixel is not repeated; with every error pixel clicked the click is padding."""
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[:, 2:7, 2:7] = True
    pred = gt.clone()
    pred[:, 2:7, 4] = False  # a false-negative column: all five pixels at distance 1
    pred[1, 2:7, 4] = True
    pred[1, 3, 4] = False  # mask 1: one false-negative pixel
    clicked = torch.zeros_like(gt)
    coords, labels = largest_error_points(pred, gt, clicked=clicked)
    assert coords.tolist() == [[4.0, 2.0], [4.0, 3.0]] and labels.tolist() == [1, 1]
    assert mark_clicked(clicked, coords, labels) is clicked
    assert clicked.nonzero().tolist() == [[0, 2, 4], [1, 3, 4]]
    coords, labels = largest_error_points(pred, gt, clicked=clicked)
    assert coords[0].tolist() == [4.0, 3.0] and labels.tolist() == [1, -1]  # next pixel; nothing left to click
    assert coords[1].tolist() == [0.0, 0.0]
    # The distances are those of the error region (a clicked pixel is not a boundary): the centre stays put.
    block = torch.zeros(1, 9, 9, dtype=torch.bool)
    block[0, 1:8, 1:8] = True
    done = mark_clicked(torch.zeros_like(block), torch.tensor([[4.0, 4.0]]), torch.tensor([1]))
    coords, _ = largest_error_points(torch.zeros_like(block), block, clicked=done)
    # The centre (distance 4) is taken; the next is the first pixel at distance 3, (row 3, col 3), which would
    # be only sqrt(2) from the boundary if the clicked pixel were cut out of the region.
    assert coords.tolist() == [[3.0, 3.0]]


def test_ignored_pixels_are_neither_scored_nor_clicked() -> None:
    """RITM's ignore label: void pixels count in neither the IoU nor the error regions that place clicks."""
    gt = torch.zeros(1, 10, 10, dtype=torch.bool)
    gt[0, 3:7, 3:7] = True
    void = torch.zeros(10, 10, dtype=torch.bool)
    void[1:9, 1:9] = True
    void[3:7, 3:7] = False  # a void band around the object
    pred = torch.zeros_like(gt)
    pred[0, 1:9, 1:9] = True  # the object plus the whole band
    assert mask_iou(pred, gt).item() == pytest.approx(16 / 64)
    assert mask_iou(pred, gt, ignore=void).item() == 1.0
    coords, labels = largest_error_points(pred, gt, ignore=void)
    assert labels.tolist() == [-1] and coords.tolist() == [[0.0, 0.0]]  # nothing left to correct
    assert largest_error_points(pred, gt)[1].tolist() == [0]  # without: a negative click on the void band
    pred[0, 0, :] = True  # a real false positive outside the band gets the click
    coords, labels = largest_error_points(pred, gt, ignore=void[None])
    assert labels.tolist() == [0] and coords[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="ignore"):
        largest_error_points(pred, gt, ignore=void[:5])
