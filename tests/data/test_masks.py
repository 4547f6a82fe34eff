import numpy as np
import pytest
import torch
import torchvision
from pycocotools import mask as mask_utils

from samtune.data.errors import SampleError
from samtune.data.masks import (
    label_map_to_source,
    masks_to_boxes,
    parse_compressed_counts,
    polygons_to_rle,
    resize_masks,
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
