import json
import logging

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from samtune.data import COCODataset, SampleError
from tests.data.conftest import encode_rle


def _reference(coco_file, ann_ids):
    coco = COCO(str(coco_file))
    out = {}
    for ann in coco.loadAnns(ann_ids):
        segmentation = ann["segmentation"]
        if isinstance(segmentation, list) and not isinstance(segmentation[0], list):
            ann = dict(ann, segmentation=[segmentation])  # pycocotools itself only takes nested polygons
        out[ann["id"]] = coco.annToMask(ann).astype(bool)
    return out


def test_all_segmentation_forms_equal_pycocotools(coco_file):
    ds = COCODataset(coco_file, image_size=80, return_original_masks=True, include_crowd=True)
    assert len(ds) == 2 and ds.num_unannotated == 1  # image 3 has no annotations
    reference = _reference(coco_file, [10, 11, 12, 13, 20])
    seen = set()
    for i in range(len(ds)):
        sample = ds[i]
        for mask, ident in zip(sample["original_masks"], sample["instance_ids"].tolist()):
            np.testing.assert_array_equal(mask.numpy(), reference[ident])
            seen.add(ident)
    assert seen == {10, 11, 12, 13, 20}
    # 80 px input: image 1 (60 x 80) is not resized, so model-input masks equal the originals
    first = ds[0]
    assert first["input_size"].tolist() == [60, 80]
    np.testing.assert_array_equal(first["masks"][:, :60, :80].numpy(), first["original_masks"].numpy())


def test_crowd_and_category_filters(coco_file):
    assert sorted(COCODataset(coco_file, image_size=32)[0]["instance_ids"].tolist()) == [10, 11, 12]
    only_two = COCODataset(coco_file, image_size=32, category_ids=[2])
    assert [only_two[i]["instance_ids"].tolist() for i in range(len(only_two))] == [[11], [20]]
    split = COCODataset(coco_file, image_size=32, image_ids=[2])
    assert len(split) == 1 and split[0]["image_id"] == "2"
    with pytest.raises(ValueError, match="not in the file"):
        COCODataset(coco_file, image_ids=[99])


def test_annotated_size_mismatch_is_an_error(coco_file):
    data = json.loads(coco_file.read_text())
    data["images"][1]["height"] = 51
    coco_file.write_text(json.dumps(data))
    with pytest.raises(SampleError, match="annotated size 51x50 differs"):
        COCODataset(coco_file, image_size=32)[1]
    assert COCODataset(coco_file, image_size=32, on_error="skip")[1]["image_id"] == "1"


@pytest.mark.parametrize(("section", "position", "key", "message"), [
    ("images", 1, "file_name", r"images\[1\] \(id 2\) has no 'file_name'"),
    ("images", 2, "id", r"images\[2\] has no 'id'"),
    ("annotations", 3, "image_id", r"annotations\[3\] \(id 13\) has no 'image_id'"),
])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_missing_required_keys_are_named_at_construction(coco_file, section, position, key, message, on_error):
    """They used to be bare KeyErrors (file_name: at the sample, and again in the on_error='skip' handler)."""
    data = json.loads(coco_file.read_text())
    del data[section][position][key]
    coco_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"annotations\.json: {message}"):
        COCODataset(coco_file, image_size=32, on_error=on_error)


def test_non_integer_ids_are_named(coco_file):
    data = json.loads(coco_file.read_text())
    data["annotations"][1]["image_id"] = "one"
    coco_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[1\] \(id 11\): 'image_id' must be an integer, got 'one'"):
        COCODataset(coco_file, image_size=32)


@pytest.mark.parametrize(("section", "position", "key", "value", "message"), [
    ("annotations", 0, "iscrowd", "no", r"annotations\[0\] \(id 10\): 'iscrowd' must be 0 or 1, got 'no'"),
    ("annotations", 0, "category_id", None, r"annotations\[0\] \(id 10\): 'category_id' must be an integer, got None"),
    ("annotations", 0, "id", "a1", r"annotations\[0\]: 'id' must be an integer, got 'a1'"),
    ("images", 0, "height", "abc", r"images\[0\] \(id 1\): 'height' must be an integer, got 'abc'"),
    ("images", 1, "width", 0, r"images\[1\] \(id 2\): 'width' must be a positive integer, got 0"),
])
def test_malformed_fields_are_named_at_construction(coco_file, section, position, key, value, message):
    """They were a bare ValueError / TypeError, or an unexpected error blamed on the image file at the sample."""
    data = json.loads(coco_file.read_text())
    data[section][position][key] = value
    coco_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"annotations\.json: {message}"):
        COCODataset(coco_file, image_size=32, category_ids=[1, 2])


def test_repeated_image_ids_are_named(coco_file):
    """Two image entries with one id (two files merged naively): the annotations of both were drawn on the second
    image, and the first image was gone from the dataset."""
    data = json.loads(coco_file.read_text())
    data["images"][2]["id"] = 1
    coco_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations.json: images\[2\] repeats the id 1 of images\[0\]"):
        COCODataset(coco_file, image_size=32)


def test_skip_handler_survives_an_unusable_image_path(coco_file):
    """Turning an unexpected error into a SampleError must not fail itself on the entry whose path is broken."""
    ds = COCODataset(coco_file, image_size=32, on_error="skip")
    del ds.images[1]["file_name"]  # what a file without file_name used to give at the sample
    assert ds[0]["image_id"] == "2" and ds.num_skipped == 1
    del ds.images[2]["file_name"]
    with pytest.raises(SampleError, match=r"COCODataset image 0 \(no path: KeyError.*no valid sample"):
        ds[0]


def test_bad_polygon_raises_with_annotation_id(coco_file):
    data = json.loads(coco_file.read_text())
    data["annotations"][0]["segmentation"] = [[1, 2, 3]]
    coco_file.write_text(json.dumps(data))
    with pytest.raises(SampleError, match=r"annotation 10 of image 1.*even number"):
        COCODataset(coco_file, image_size=32)[0]


def test_degenerate_polygon_leaves_the_images_other_masks(coco_file):
    """An annotation whose only polygon has 2 points is an empty mask: the image keeps its other annotations."""
    data = json.loads(coco_file.read_text())
    data["annotations"][0]["segmentation"] = [[1, 2, 30, 40]]
    coco_file.write_text(json.dumps(data))
    ds = COCODataset(coco_file, image_size=32, max_masks_per_image=16)
    sample = ds[0]
    assert sample["image_id"] == "1" and len(sample["masks"]) >= 1 and ds.num_skipped == 0


@pytest.mark.parametrize(
    "json_name, image_dir, count",
    [
        ("coco_panoptic_sample/panoptic_coco_detection_format.json", "coco_panoptic_sample/input_images", 50),
        ("labelme_voc_coco/annotations.json", "labelme_voc_coco", 12),
    ],
)
def test_real_coco_files_equal_pycocotools(assets, json_name, image_dir, count):
    path = assets / "data" / json_name
    ds = COCODataset(path, assets / "data" / image_dir, image_size=256, include_crowd=True,
                     return_original_masks=True, max_masks_per_image=1000)
    coco = COCO(str(path))
    total = 0
    for i in range(len(ds)):
        sample = ds[i]
        anns = coco.loadAnns(sample["instance_ids"].tolist())
        reference = np.stack([coco.annToMask(a).astype(bool) for a in anns])
        np.testing.assert_array_equal(sample["original_masks"].numpy(), reference)
        assert sample["masks"].shape[0] == len(anns) and sample["masks"].any((1, 2)).all()
        total += len(anns)
    assert total == count


def test_spacenet_uint16_with_rle_annotations(assets):
    root = assets / "data" / "spacenet_buildings"
    ds = COCODataset(root / "annotations.json", root, image_size=900, intensity="percentile",
                     return_original_masks=True, max_masks_per_image=1000)
    sample = ds[0]
    coco = COCO(str(root / "annotations.json"))
    anns = coco.loadAnns(sample["instance_ids"].tolist())
    assert len(anns) == 33
    reference = np.stack([coco.annToMask(a).astype(bool) for a in anns])
    np.testing.assert_array_equal(sample["original_masks"].numpy(), reference)
    assert sample["original_size"].tolist() == [600, 900] and sample["input_size"].tolist() == [600, 900]
    assert sample["image"].shape == (3, 900, 900)


def test_spatial_regions_split_one_raster(assets):
    """train_region / val_region: disjoint windows of the SpaceNet chip; cut masks keep if >= half inside."""
    root = assets / "data" / "spacenet_buildings"
    coco = COCO(str(root / "annotations.json"))
    full = {a["id"]: coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds())}
    seen = []
    for region in ((0, 0, 450, 600), (450, 0, 900, 600)):
        ds = COCODataset(root / "annotations.json", root, image_size=450, intensity="percentile", region=region,
                         return_original_masks=True, max_masks_per_image=1000)
        sample = ds[0]
        x0, y0, x1, y1 = region
        assert sample["original_size"].tolist() == [600, 450] and sample["input_size"].tolist() == [450, 338]
        ids = sample["instance_ids"].tolist()
        for k, ann_id in enumerate(ids):
            window = full[ann_id][y0:y1, x0:x1]
            np.testing.assert_array_equal(sample["original_masks"][k].numpy(), window)
            assert window.sum() >= 0.5 * full[ann_id].sum()
        dropped = [i for i, m in full.items() if i not in ids and m[y0:y1, x0:x1].any()]
        assert all(full[i][y0:y1, x0:x1].sum() < 0.5 * full[i].sum() for i in dropped)
        seen.append(set(ids))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 33  # every building lands in exactly one part


def _spacenet_masks(root):
    coco = COCO(str(root / "annotations.json"))
    return {a["id"]: coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds())}


def test_validation_tiles_evaluate_each_instance_once(assets):
    """128 px tiles of the right half of the chip: every building in exactly one tile (whole if a tile holds it
    whole, else where most of it is); tiles without an assigned building are left out."""
    root = assets / "data" / "spacenet_buildings"
    full = _spacenet_masks(root)
    region = dict(region=(450, 0, 900, 600), region_min_fraction=1e-9)
    half = {i: m[:, 450:] for i, m in full.items() if m[:, 450:].any()}
    ds = COCODataset(root / "annotations.json", root, image_size=256, intensity="percentile", crop_size=128,
                     return_original_masks=True, max_masks_per_image=1000, **region)
    assert 0 < len(ds) < 20  # 5 x 4 tiles, some with no building
    seen = []
    for i in range(len(ds)):
        top, left = ds._index[i][1]
        sample = ds[i]
        assert sample["masks"].shape[0] > 0 and sample["original_size"].tolist() == [128, 128]
        for ann_id, mask in zip(sample["instance_ids"].tolist(), sample["original_masks"]):
            np.testing.assert_array_equal(mask.numpy(), half[ann_id][top : top + 128, left : left + 128])
            seen.append(ann_id)
    assert sorted(seen) == sorted(half)  # each once

    # with 64 px of overlap every building (at most 56 px) lies whole in one tile
    ds = COCODataset(root / "annotations.json", root, image_size=256, intensity="percentile", crop_size=128,
                     tile_overlap=64, return_original_masks=True, max_masks_per_image=1000, **region)
    seen = []
    for i in range(len(ds)):
        sample = ds[i]
        for ann_id, mask in zip(sample["instance_ids"].tolist(), sample["original_masks"]):
            assert mask.sum() == half[ann_id].sum()  # whole
            seen.append(ann_id)
    assert sorted(seen) == sorted(half)
    with pytest.raises(ValueError, match="tile_overlap"):
        COCODataset(root / "annotations.json", root, crop_size=128, tile_overlap=128)
    with pytest.raises(ValueError, match="needs crop_size"):
        COCODataset(root / "annotations.json", root, tile_overlap=64)


def test_planning_validation_tiles_reads_no_pixels(assets, monkeypatch):
    """Tiles are planned from the annotations alone; the raster is read when a tile is loaded."""
    import samtune.data.coco as coco_module

    root = assets / "data" / "spacenet_buildings"
    reads = []
    real_read = coco_module.read_image
    monkeypatch.setattr(coco_module, "read_image", lambda path: reads.append(path) or real_read(path))
    ds = COCODataset(root / "annotations.json", root, image_size=256, intensity="percentile", crop_size=128)
    assert len(ds) > 1 and reads == []
    ds[0]
    assert len(reads) == 1


def test_region_errors(assets, tmp_path):
    root = assets / "data" / "spacenet_buildings"
    with pytest.raises(ValueError, match="region must be"):
        COCODataset(root / "annotations.json", root, region=(10, 0, 5, 100))
    ds = COCODataset(root / "annotations.json", root, region=(1000, 0, 1200, 100))
    with pytest.raises(SampleError, match="outside the image"):
        ds[0]


def test_train_repeats_give_new_random_crops(assets):
    root = assets / "data" / "spacenet_buildings"
    ds = COCODataset(root / "annotations.json", root, image_size=128, intensity="percentile", crop_size=128,
                     train=True, repeats=4, max_masks_per_image=1000)
    assert len(ds) == 4
    crops = [ds[i]["image"] for i in range(4)]
    assert all(not torch.equal(crops[0], c) for c in crops[1:])
    tiles = len(COCODataset(root / "annotations.json", root, crop_size=128))
    assert tiles > 1 and len(COCODataset(root / "annotations.json", root, crop_size=128, repeats=4)) == tiles
    with pytest.raises(ValueError, match="repeats"):
        COCODataset(root / "annotations.json", root, repeats=0)


def test_random_crops_find_sparse_objects(tmp_path):
    """A crop far smaller than the image still finds the one small object (uniform crops would miss it ~99%)."""
    cv2.imwrite(str(tmp_path / "big.png"), np.full((400, 400, 3), 90, np.uint8))
    mask = np.zeros((400, 400), bool)
    mask[301:305, 52:57] = True
    data = {"images": [{"id": 1, "file_name": "big.png", "height": 400, "width": 400}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": encode_rle(mask),
                             "area": int(mask.sum()), "bbox": [52, 301, 5, 4]}],
            "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = COCODataset(tmp_path / "a.json", tmp_path, image_size=32, crop_size=16, train=True, repeats=40,
                     return_original_masks=True)
    windows = set()
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["instance_ids"].tolist() == [7] and sample["original_masks"][0].any()
        windows.add(sample["image"].numpy().tobytes() + sample["original_masks"][0].numpy().tobytes())
    assert len(windows) > 5  # still random crops, not one fixed window


@pytest.mark.parametrize(("section", "position", "key", "value", "message"), [
    ("annotations", 0, "image_id", 2.7, r"annotations\[0\] \(id 10\): 'image_id' must be an integer, got 2\.7"),
    ("annotations", 1, "id", 11.5, r"annotations\[1\]: 'id' must be an integer, got 11\.5"),
    ("images", 0, "height", 60.9, r"images\[0\] \(id 1\): 'height' must be an integer, got 60\.9"),
    ("images", 0, "width", True, r"images\[0\] \(id 1\): 'width' must be an integer, got True"),
    ("images", 2, "id", False, r"images\[2\]: 'id' must be an integer, got False"),
])
def test_fractional_and_boolean_numbers_are_not_integers(coco_file, section, position, key, value, message):
    """int() truncated them: an annotation with image_id 2.7 was drawn on image 2, id 11.5 became 11, height 60.9
    passed as 60 and True as 1."""
    data = json.loads(coco_file.read_text())
    data[section][position][key] = value
    coco_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"annotations\.json: {message}$"):
        COCODataset(coco_file, image_size=32)


def test_integral_floats_and_digit_strings_are_integers(coco_file):
    """Exporters that write ids as 1.0 or "2" keep working."""
    data = json.loads(coco_file.read_text())
    data["annotations"][0]["image_id"], data["annotations"][4]["image_id"] = 1.0, "2"
    data["annotations"][1]["id"] = 11.0
    data["images"][0]["height"] = 60.0
    coco_file.write_text(json.dumps(data))
    ds = COCODataset(coco_file, image_size=32)
    assert [ds[i]["instance_ids"].tolist() for i in range(len(ds))] == [[10, 11, 12], [20]]


@pytest.mark.parametrize("polygon", [[["a", "b", "c", "d", "e", "f"]], [[[1, 2], [3, 4, 5], [6, 7]]],
                                     [[1, 2, {"x": 3}, 4, 5, 6]]])
def test_non_numeric_polygons_name_the_annotation(coco_file, polygon):
    """They were an 'unexpected ValueError while loading the sample' blamed on the image file."""
    data = json.loads(coco_file.read_text())
    data["annotations"][0]["segmentation"] = polygon
    coco_file.write_text(json.dumps(data))
    with pytest.raises(SampleError, match=r"annotations\.json \[annotation 10 of image 1\]: a polygon must be a list "
                                          r"of numbers \[x1, y1, x2, y2, \.\.\.\], got "):
        COCODataset(coco_file, image_size=32)[0]


def test_annotations_of_unknown_images_are_reported(coco_file, caplog):
    """Annotations whose image_id no image entry has (e.g. two files merged with renumbered images) were dropped
    without a word."""
    data = json.loads(coco_file.read_text())
    data["annotations"][4]["image_id"] = 7
    data["annotations"].append(dict(data["annotations"][0], id=30, image_id=8))
    coco_file.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="samtune.data"):
        ds = COCODataset(coco_file, image_size=32)
    assert len(ds) == 1
    assert "annotations.json: 2 annotation(s) name image ids that no entry of 'images' has (7, 8)" in caplog.text
