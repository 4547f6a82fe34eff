"""Laws of the random prompt samplers: support, uniformity, labels, box noise statistics, edge cases."""
from __future__ import annotations

import pytest
import torch

from samtune.prompts import (
    flat_index_to_coords,
    jitter_boxes,
    mask_boxes,
    resize_masks,
    sample_error_points,
    sample_noisy_boxes,
    sample_points_in_masks,
    uniform_pixel,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _to_pixel(coords: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``(col + 0.5) * scale - 0.5`` to (row, col)."""
    cols = ((coords[:, 0] + 0.5) / scale - 0.5).round().long()
    rows = ((coords[:, 1] + 0.5) / scale - 0.5).round().long()
    return rows, cols


def test_coordinate_convention() -> None:
    index = torch.tensor([2 * 5 + 3])  # row 2, col 3 of a 5-wide grid
    assert flat_index_to_coords(index, 5, 1.0).tolist() == [[3.0, 2.0]]
    assert flat_index_to_coords(index, 5, 4.0).tolist() == [[13.5, 9.5]]  # (3 + 0.5) * 4 - 0.5


def test_points_always_inside_masks() -> None:
    masks = torch.rand(500, 12, 12, generator=_gen(1)) > 0.7
    masks[0] = False  # empty
    coords, labels = sample_points_in_masks(masks, _gen(2), scale=4.0)
    assert coords.shape == (500, 2) and labels.shape == (500,)
    rows, cols = _to_pixel(coords, 4.0)
    found = labels == 1
    assert torch.all(masks[torch.arange(500)[found], rows[found], cols[found]])
    assert labels[0] == -1 and coords[0].tolist() == [0.0, 0.0]
    assert torch.all(labels[1:] == 1)


def test_points_are_uniform_over_the_mask() -> None:
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[[0, 1, 5, 3], [0, 4, 5, 2]] = True  # four scattered pixels
    n = 8000
    index, found = uniform_pixel(mask.expand(n, 6, 6), _gen(3))
    assert found.all()
    counts = torch.bincount(index, minlength=36)
    assert torch.all(counts[~mask.flatten()] == 0)
    expected = n / 4
    chi2 = (((counts[mask.flatten()] - expected) ** 2) / expected).sum()
    assert chi2 < 16.3  # chi-square, 3 dof, p = 0.001


def test_error_points_lie_in_error_region_with_correct_label() -> None:
    gen = _gen(4)
    gt = torch.rand(400, 10, 10, generator=gen) > 0.5
    pred = torch.rand(400, 10, 10, generator=gen) > 0.5
    pred[0] = gt[0]  # exact prediction -> padding point
    coords, labels = sample_error_points(pred, gt, _gen(5), scale=2.0)
    rows, cols = _to_pixel(coords, 2.0)
    idx = torch.arange(400)
    err = pred ^ gt
    sampled = labels >= 0
    assert torch.all(err[idx[sampled], rows[sampled], cols[sampled]])
    assert torch.all(labels[sampled] == gt[idx[sampled], rows[sampled], cols[sampled]].long())
    assert labels[0] == -1 and coords[0].tolist() == [0.0, 0.0]
    assert sampled[1:].all()


def test_error_points_uniform_over_union_of_fn_and_fp() -> None:
    gt = torch.zeros(4, 4, dtype=torch.bool)
    pred = torch.zeros(4, 4, dtype=torch.bool)
    gt[0, :3] = True  # three false negatives
    pred[3, 3] = True  # one false positive
    n = 8000
    _, labels = sample_error_points(pred.expand(n, 4, 4), gt.expand(n, 4, 4), _gen(6))
    frac_pos = (labels == 1).float().mean().item()
    assert abs(frac_pos - 0.75) < 0.03


def test_mask_boxes_hand_values_border_and_empty() -> None:
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 1:7] = True  # rows 2..4, cols 1..6
    masks[1, 7, 7] = True  # one pixel in the corner
    boxes, found = mask_boxes(masks, scale=1.0)
    assert boxes[0].tolist() == [1.0, 2.0, 6.0, 4.0]
    assert boxes[1].tolist() == [7.0, 7.0, 7.0, 7.0]
    assert boxes[2].tolist() == [0.0, 0.0, 0.0, 0.0] and found.tolist() == [True, True, False]
    boxes4, _ = mask_boxes(masks, scale=4.0)
    assert boxes4[0].tolist() == [4.0, 8.0, 27.0, 19.0]  # covers input pixels 4..27 x 8..19
    assert boxes4[1].tolist() == [28.0, 28.0, 31.0, 31.0]


@pytest.mark.parametrize(("width", "height", "std_x", "std_y"), [(100, 60, 10.0, 6.0), (400, 1000, 20.0, 20.0)])
def test_box_noise_statistics(width: int, height: int, std_x: float, std_y: float) -> None:
    n = 4000
    box = torch.tensor([[500.0, 500.0, 500.0 + width - 1, 500.0 + height - 1]]).expand(n, 4)
    noisy = jitter_boxes(box, _gen(7), image_size=4000)
    delta = noisy - box
    assert delta.mean(0).abs().max() < 1.5
    std = delta.std(0)
    for got, want in zip(std.tolist(), [std_x, std_y, std_x, std_y]):
        assert got == pytest.approx(want, rel=0.06)


def test_noisy_boxes_are_clipped_ordered_and_reproducible() -> None:
    masks = torch.zeros(300, 16, 16, dtype=torch.bool)
    masks[:, 0:3, 13:16] = True  # touches the top-right border
    masks[0] = False
    boxes, found = sample_noisy_boxes(masks, _gen(8), scale=4.0)
    assert boxes.shape == (300, 4) and not found[0] and found[1:].all()
    assert boxes[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert boxes.min() >= 0 and boxes.max() <= 63
    assert torch.all(boxes[:, 0] <= boxes[:, 2]) and torch.all(boxes[:, 1] <= boxes[:, 3])
    again, _ = sample_noisy_boxes(masks, _gen(8), scale=4.0)
    assert torch.equal(boxes, again)
    sizes = torch.tensor([[30, 50]]).expand(300, 2)  # unpadded image of h=30, w=50 input pixels
    clipped, _ = sample_noisy_boxes(masks, _gen(9), scale=4.0, image_size=sizes)
    assert clipped[:, [0, 2]].max() <= 49 and clipped[:, [1, 3]].max() <= 29


def test_one_pixel_and_full_masks() -> None:
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[0, 4, 0] = True
    masks[1] = True
    coords, labels = sample_points_in_masks(masks, _gen(10))
    assert coords[0].tolist() == [0.0, 4.0] and labels.tolist() == [1, 1]
    _, labels = sample_error_points(masks, masks, _gen(11))
    assert labels.tolist() == [-1, -1]
    empty_in = torch.zeros(0, 5, 5, dtype=torch.bool)
    coords, labels = sample_points_in_masks(empty_in, _gen(12))
    assert coords.shape == (0, 2) and labels.shape == (0,)


def test_resize_masks_area_rule() -> None:
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, 0, 0:2] = True
    m[0, 3, 3] = True
    assert resize_masks(m, 2)[0].tolist() == [[True, False], [False, False]]
    assert resize_masks(m, 4) is m


def test_resize_masks_keeps_structures_thinner_than_the_grid() -> None:
    """A 1 px line or a single pixel would vanish at 4x coarser resolution; it keeps its most covered cells."""
    m = torch.zeros(3, 16, 16, dtype=torch.bool)
    m[0, 5, 2:14] = True  # 1 px horizontal line: every coarse cell it crosses is 1/4 covered
    m[1, 9, 9] = True  # one pixel: 1/16 of one cell
    m[2, 4:12, 4:12] = True  # a large mask keeps the half-coverage rule
    low = resize_masks(m, 4)
    assert low[0].tolist() == [[False] * 4, [True] * 4, [False] * 4, [False] * 4]
    assert low[1].nonzero().tolist() == [[2, 2]]
    assert low[2].tolist() == resize_masks(m[2:], 4)[0].tolist() and low[2].sum() == 4
    assert not resize_masks(torch.zeros(1, 16, 16, dtype=torch.bool), 4).any()  # empty stays empty


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="region must be a bool tensor"):
        uniform_pixel(torch.zeros(2, 3, 3), _gen())
    with pytest.raises(ValueError, match="generator is on"):
        uniform_pixel(torch.zeros(2, 3, 3, dtype=torch.bool).to("meta"), _gen())
    with pytest.raises(ValueError, match="same shape"):
        sample_error_points(torch.zeros(2, 3, 3, dtype=torch.bool), torch.zeros(2, 4, 4, dtype=torch.bool), _gen())
    with pytest.raises(ValueError, match="boxes must be"):
        jitter_boxes(torch.zeros(3, 2), _gen(), image_size=10)
