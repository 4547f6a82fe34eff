import numpy as np
import pytest
import torch
import torchvision
from pycocotools import mask as mask_utils

from samtune.data.errors import SampleError
from samtune.data.masks import (
    DenseMaskSource,
    RLEMaskSource,
    WindowMaskSource,
    label_map_to_source,
    masks_to_boxes,
    parse_compressed_counts,
    polygons_to_rle,
    resize_masks,
    rle_areas,
    segmentation_to_rle,
    validate_rle,
)
from tests.data.conftest import encode_rle, uncompressed_rle


def test_parse_compressed_counts_matches_pycocotools_decoding():
    rng = np.random.default_rng(0)
    for trial in range(50):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.random()
        runs = parse_compressed_counts(encode_rle(mask)["counts"])
        assert runs.sum() == h * w
        flat = np.repeat(np.arange(runs.size) % 2, runs).astype(bool)
        np.testing.assert_array_equal(flat.reshape(w, h).T, mask)


def test_every_source_decodes_windows_like_the_whole_masks_cut():
    """decode_window / window_areas (crops, tiles and regions of large rasters) equal the whole masks cut to the
    window, for RLE, dense, label-map and region sources, windows overlapping the image's edges included."""
    rng = np.random.default_rng(0)
    h, w = 37, 53
    labels = np.zeros((h, w), np.int32)
    for k, (y, x) in enumerate(rng.integers(0, (h, w), (12, 2)), start=1):
        labels[y : y + rng.integers(1, 15), x : x + rng.integers(1, 15)] = k * 7  # overlapping, non-consecutive
    label_source = label_map_to_source(labels, "instance")
    masks = label_source.decode(np.arange(len(label_source)))
    rle_source = RLEMaskSource([encode_rle(m.astype(bool)) for m in masks], label_source.ids, h, w)
    rle_source.rles.append(encode_rle(np.zeros((h, w), bool)))  # an empty mask: no box at all
    rle_source.ids = np.append(rle_source.ids, 999)
    masks = np.concatenate([masks, np.zeros((1, h, w), np.uint8)])
    sources = [rle_source, DenseMaskSource(masks.astype(bool), rle_source.ids)]
    region = (5, 9, 25, 40)  # top, left, height, width
    keep = np.flatnonzero(masks[:, 5:30, 9:49].any((1, 2)))
    region_masks = masks[keep, 5:30, 9:49]
    region_source = WindowMaskSource(rle_source, keep, region, region_masks.sum((1, 2)))
    for trial in range(40):
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        height, width = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        expected = masks[:, top : top + height, left : left + width]
        for source, whole in ((label_source, masks[:-1]), *((s, masks) for s in sources)):
            chosen = np.sort(rng.choice(len(whole), rng.integers(1, len(whole) + 1), replace=False))
            np.testing.assert_array_equal(source.decode_window(chosen, top, left, height, width),
                                          expected[chosen], err_msg=type(source).__name__)
            np.testing.assert_array_equal(source.window_areas(chosen, top, left, height, width),
                                          expected[chosen].sum((1, 2)), err_msg=type(source).__name__)
        if top < 25 and left < 40:
            inner = region_masks[:, top : top + height, left : left + width]
            all_kept = np.arange(len(keep))
            np.testing.assert_array_equal(region_source.decode_window(all_kept, top, left, height, width), inner)
            np.testing.assert_array_equal(region_source.window_areas(all_kept, top, left, height, width),
                                          inner.sum((1, 2)))
    np.testing.assert_array_equal(region_source.decode(np.arange(len(keep))), region_masks)
    np.testing.assert_array_equal(region_source.ids, rle_source.ids[keep])


def test_an_image_with_hundreds_of_rle_masks_loads():
    """pycocotools.mask.area raises OverflowError for a list of 256 or more RLEs (pycocotools 2.0.11, NumPy 2):
    SA-1B images hold up to several hundred masks."""
    rng = np.random.default_rng(0)
    masks = rng.random((300, 9, 7)) < 0.3
    rles = [encode_rle(m) for m in masks]
    expected = masks.reshape(300, -1).sum(1)
    np.testing.assert_array_equal(rle_areas(rles), expected)
    assert rle_areas([]).shape == (0,)
    np.testing.assert_array_equal(RLEMaskSource(rles, np.arange(300), 9, 7).areas(), expected)


def test_validate_rle_accepts_both_forms_and_decodes_like_pycocotools():
    mask = np.zeros((20, 30), bool)
    mask[3:9, 4:25] = True
    mask[12:, :5] = True
    for rle in (encode_rle(mask), uncompressed_rle(mask)):
        out = validate_rle(rle, 20, 30, "f.json")
        np.testing.assert_array_equal(mask_utils.decode(out).astype(bool), mask)


@pytest.mark.parametrize(
    "rle, problem",
    [
        ({"size": [20, 30], "counts": "0;1"}, "run lengths sum"),
        ({"size": [20, 30], "counts": "\x7f\x7f"}, "invalid compressed RLE"),
        ({"size": [20, 30], "counts": [100, -5, 505]}, "negative run"),
        ({"size": [20, 31], "counts": [620]}, "differs from the image size"),
        ({"size": [20, 30]}, "'size' and 'counts'"),
        ({"size": [20, 30], "counts": 5}, "string or a list"),
    ],
)
def test_invalid_rle_raises_naming_file(rle, problem):
    with pytest.raises(SampleError, match=problem) as info:
        validate_rle(rle, 20, 30, "ann.json [annotation 7]")
    assert "ann.json [annotation 7]" in str(info.value)


def test_flat_and_nested_polygons_are_equal():
    nested = polygons_to_rle([[2, 2, 20, 2, 20, 15, 2, 15]], 20, 30, "f")
    flat = polygons_to_rle([2, 2, 20, 2, 20, 15, 2, 15], 20, 30, "f")
    reference = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[2, 2, 20, 2, 20, 15, 2, 15]], 20, 30)))
    np.testing.assert_array_equal(mask_utils.decode(nested), reference)
    np.testing.assert_array_equal(mask_utils.decode(flat), reference)
    with pytest.raises(SampleError, match="even number"):
        segmentation_to_rle([[1, 2, 3, 4, 5]], 20, 30, "f")


def test_polygon_parts_under_three_points_enclose_nothing():
    """COCO-style files hold parts of 1-2 points (zero area): they are left out, not read as boxes by pycocotools,
    and an annotation made only of them is an empty mask, not an error that costs the image its other masks."""
    square = [2, 2, 20, 2, 20, 15, 2, 15]
    reference = mask_utils.decode(polygons_to_rle([square], 20, 30, "f"))
    for degenerate in ([5, 5, 25, 18], [7, 7]):
        mixed = polygons_to_rle([degenerate, square], 20, 30, "f")  # a 2-point part first: pycocotools' bbox case
        np.testing.assert_array_equal(mask_utils.decode(mixed), reference)
        assert mask_utils.area(polygons_to_rle([degenerate], 20, 30, "f")) == 0
    assert mask_utils.area(segmentation_to_rle([], 20, 30, "f")) == 0


def test_label_map_kinds():
    labels = np.zeros((20, 20), np.uint16)
    labels[1:5, 1:5] = 7
    labels[10:15, 10:15] = 7  # same class, second component
    labels[1:4, 12:18] = 3
    labels[18:20, 0:2] = 255  # ignored
    inst = label_map_to_source(labels, "instance", ignore_values=[255])
    assert sorted(inst.ids.tolist()) == [3, 7]
    sem = label_map_to_source(labels, "semantic", ignore_values=[255])
    assert len(sem) == 3 and sorted(sem.areas().tolist()) == [16, 18, 25]
    comp = label_map_to_source(labels, "components", ignore_values=[255])
    assert len(comp) == 3
    binary = label_map_to_source(labels, "binary", ignore_values=[255])
    assert len(binary) == 1 and binary.areas()[0] == 16 + 25 + 18
    np.testing.assert_array_equal(binary.decode(np.array([0]))[0].astype(bool), (labels > 0) & (labels != 255))
    big = label_map_to_source(labels, "semantic", ignore_values=[255], min_area=20)
    assert big.areas().tolist() == [25]
    decoded = sem.decode(np.arange(len(sem))).astype(bool)
    assert decoded.sum() == 16 + 25 + 18 and decoded.sum(0).max() == 1
    for kind in ("instance", "semantic", "components", "binary"):  # the void pixels travel with the masks
        np.testing.assert_array_equal(label_map_to_source(labels, kind, ignore_values=[255]).ignore, labels == 255)
    assert label_map_to_source(labels, "instance").ignore is None  # no ignore values: nothing to carry
    assert label_map_to_source(labels, "instance", ignore_values=[9]).ignore is None  # none in this image


def test_masks_to_boxes_matches_torchvision_inclusive_convention():
    masks = torch.zeros(3, 16, 20, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 0, 0] = True
    masks[2, 10:16, 15:20] = True
    boxes = masks_to_boxes(masks)
    torch.testing.assert_close(boxes, torchvision.ops.masks_to_boxes(masks))
    assert boxes[0].tolist() == [3, 2, 8, 4]


def test_resize_masks_fortran_and_c_layouts_agree():
    rng = np.random.default_rng(0)
    masks = (rng.random((4, 30, 50)) < 0.5).astype(np.uint8)
    fortran = np.asfortranarray(masks.transpose(1, 2, 0)).transpose(2, 0, 1)
    np.testing.assert_array_equal(resize_masks(masks, (12, 20)), resize_masks(fortran, (12, 20)))
