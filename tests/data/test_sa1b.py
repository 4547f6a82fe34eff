import json
import logging

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from samtune.data import SA1BDataset, SampleError, collate_samples
from samtune.data.synth import main as synth_main
from samtune.data.synth import synthesize_sa1b
from samtune.modeling.preprocessing import PIXEL_MEAN, PIXEL_STD, get_preprocess_shape


def test_sample_contract(sa1b_dir):
    ds = SA1BDataset(sa1b_dir, image_size=64, return_original_masks=True)
    sample = ds[0]
    k = sample["masks"].shape[0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert sample["masks"].dtype == torch.bool and sample["masks"].shape == (k, 64, 64) and k >= 1
    assert sample["boxes"].shape == (k, 4) and sample["boxes"].dtype == torch.float32
    assert sample["instance_ids"].dtype == torch.int64 and sample["instance_ids"].shape == (k,)
    assert sample["original_size"].tolist() == [96, 128]
    h, w = get_preprocess_shape(96, 128, 64)
    assert sample["input_size"].tolist() == [h, w]
    assert sample["image_id"] == "sa_1"
    assert not sample["masks"][:, h:, :].any() and not sample["masks"][:, :, w:].any()
    assert (sample["image"][:, h:, :] == 0).all()
    # the image is (x - mean) / std of the RGB pixels resized as the official predictor does
    raw = cv2.cvtColor(cv2.imread(str(sa1b_dir / "sa_1.jpg")), cv2.COLOR_BGR2RGB)
    resized = np.asarray(Image.fromarray(raw).resize((w, h), Image.BILINEAR), np.float32)  # SAM's filter (PIL)
    expected = (resized - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
    torch.testing.assert_close(sample["image"][:, :h, :w], torch.from_numpy(expected).permute(2, 0, 1))
    # original masks equal pycocotools' own decoding of the annotation file
    record = json.loads((sa1b_dir / "sa_1.json").read_text())
    by_id = {a["id"]: mask_utils.decode(a["segmentation"]).astype(bool) for a in record["annotations"]}
    for mask, ident in zip(sample["original_masks"], sample["instance_ids"].tolist()):
        np.testing.assert_array_equal(mask.numpy(), by_id[ident])
    # boxes are the tight inclusive boxes of the model-input masks
    for mask, box in zip(sample["masks"], sample["boxes"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]


def test_minmax_normalization_and_size(sa1b_dir):
    sample = SA1BDataset(sa1b_dir, image_size=32, normalization="minmax")[2]
    h, w = sample["input_size"].tolist()
    content = sample["image"][:, :h, :w]
    assert content.min().item() == pytest.approx(0.0) and content.max().item() == pytest.approx(1.0)


def test_mask_sampling_cap_and_determinism(sa1b_dir):
    val = SA1BDataset(sa1b_dir, image_size=32, max_masks_per_image=2)
    a, b = val[0], val[0]
    assert a["masks"].shape[0] <= 2
    assert torch.equal(a["instance_ids"], b["instance_ids"])
    train = SA1BDataset(sa1b_dir, image_size=32, max_masks_per_image=2, train=True)
    drawn = {tuple(train[0]["instance_ids"].tolist()) for _ in range(12)}
    assert len(drawn) > 1  # random per step in training


def test_masks_over_90_percent_dropped(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    cv2.imwrite(str(root / "x.jpg"), np.full((20, 20, 3), 128, np.uint8))
    big = np.ones((20, 20), np.uint8)
    big[0, 0] = 0
    small = np.zeros((20, 20), np.uint8)
    small[5:10, 5:10] = 1
    anns = [{"id": i, "segmentation": {"size": [20, 20], "counts": mask_utils.encode(np.asfortranarray(m))[
        "counts"].decode()}} for i, m in enumerate([big, small])]
    (root / "x.json").write_text(json.dumps({"image": {"height": 20, "width": 20}, "annotations": anns}))
    sample = SA1BDataset(root, image_size=20)[0]
    assert sample["instance_ids"].tolist() == [1]


def _break(sa1b_dir, kind):
    if kind == "corrupt_image":
        (sa1b_dir / "sa_2.jpg").write_bytes(b"not a jpeg")
        return "sa_2.jpg", "cannot decode"
    if kind == "missing_image":
        (sa1b_dir / "sa_2.jpg").unlink()
        return "sa_2.jpg", "not found"
    record = json.loads((sa1b_dir / "sa_2.json").read_text())
    if kind == "invalid_rle":
        record["annotations"][0]["segmentation"]["counts"] = "PPP0"
        problem = "invalid"
    elif kind == "size_mismatch":
        record["annotations"][0]["segmentation"]["size"] = [90, 128]
        problem = "differs from the image size"
    else:
        record["annotations"] = []
        problem = "no masks"
    (sa1b_dir / "sa_2.json").write_text(json.dumps(record))
    return "sa_2.json", problem


@pytest.mark.parametrize("kind", ["corrupt_image", "missing_image", "invalid_rle", "size_mismatch", "no_masks"])
def test_on_error_raise_and_skip(sa1b_dir, kind, caplog):
    name, problem = _break(sa1b_dir, kind)
    strict = SA1BDataset(sa1b_dir, image_size=32)
    with pytest.raises(SampleError, match=problem) as info:
        strict[1]
    assert name in str(info.value)
    lenient = SA1BDataset(sa1b_dir, image_size=32, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="samtune.data"):
        sample = lenient[1]
    assert sample["image_id"] == "sa_3" and lenient.num_skipped == 1
    assert name in caplog.text and "1 skipped" in caplog.text


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["annotations"].__setitem__(0, "oops"),
     r" \[annotations\[0\]\]: an annotation must be a JSON object \(SA-1B format\), got str"),
    (lambda r: r.__setitem__("image", [1]), r": 'image' must be a JSON object \(SA-1B format\), got list"),
    (lambda r: r["image"].__setitem__("height", "abc"), r": image 'height' must be a positive integer, got 'abc'"),
    (lambda r: r["annotations"][0].__setitem__("id", "a1"),
     r" \[annotations\[0\]\]: 'id' must be an integer, got 'a1'"),
    (lambda r: r["annotations"][0]["segmentation"].__setitem__("size", ["a", "b"]),
     r" \[annotation \d+\]: RLE 'size' must be \[height, width\] \(integers\), got \['a', 'b'\]"),
])
def test_malformed_annotation_fields_name_the_json_file(sa1b_dir, mutate, message):
    """They were reported as an unexpected AttributeError / ValueError of the image file, or not at all (a list
    as 'image')."""
    record = json.loads((sa1b_dir / "sa_2.json").read_text())
    mutate(record)
    (sa1b_dir / "sa_2.json").write_text(json.dumps(record))
    for options in ({}, {"crop_size": 64}):  # the sample, and planning validation tiles from the JSON alone
        with pytest.raises(SampleError, match=rf"sa_2\.json{message}"):
            SA1BDataset(sa1b_dir, image_size=32, **options)[1]


def test_skip_counter_across_workers(sa1b_dir):
    _break(sa1b_dir, "corrupt_image")
    ds = SA1BDataset(sa1b_dir, image_size=32, on_error="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_samples)
    ids = [i for batch in loader for i in batch["image_id"]]
    assert len(ids) == 6 and "sa_2" not in ids
    assert ds.num_skipped == 1


def test_worker_error_is_sample_error_with_path(sa1b_dir):
    _break(sa1b_dir, "invalid_rle")
    ds = SA1BDataset(sa1b_dir, image_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=1, collate_fn=collate_samples)
    with pytest.raises(SampleError, match="sa_2.json"):
        next(iter(loader))


def test_synth_is_seeded_fast_and_cli(tmp_path):
    a = synthesize_sa1b(tmp_path / "a", 3, image_size=64, seed=5)
    synthesize_sa1b(tmp_path / "b", 3, image_size=64, seed=5)
    assert [p.name for p in a] == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg"]
    assert (tmp_path / "a" / "sa_2.json").read_text() == (tmp_path / "b" / "sa_2.json").read_text()
    paths = synth_main(["--out", str(tmp_path / "c"), "--num-images", "2", "--image-size", "48"])
    assert len(paths) == 2 and cv2.imread(str(paths[0])).shape == (48, 48, 3)
    record = json.loads((tmp_path / "c" / "sa_1.json").read_text())
    masks = np.stack([mask_utils.decode(a["segmentation"]) for a in record["annotations"]])
    assert masks.shape[1:] == (48, 48) and masks.reshape(len(masks), -1).sum(1).min() >= 16


def test_synth_objects_differ_from_background(tmp_path):
    synthesize_sa1b(tmp_path, 4, image_size=64, seed=0)
    for n in range(1, 5):
        image = cv2.imread(str(tmp_path / f"sa_{n}.jpg")).astype(np.float32)
        record = json.loads((tmp_path / f"sa_{n}.json").read_text())
        union = np.zeros((64, 64), bool)
        for ann in record["annotations"]:
            union |= mask_utils.decode(ann["segmentation"]).astype(bool)
        assert np.abs(image[union].mean(0) - image[~union].mean(0)).max() > 20


def test_validation_tiles_assign_each_annotation_once(sa1b_dir):
    """Tiles of a 96x128 SA-1B image, planned from the JSON alone: every usable annotation lands in one tile,
    with its pixels inside that tile."""
    record = json.loads((sa1b_dir / "sa_1.json").read_text())
    by_id = {a["id"]: mask_utils.decode(a["segmentation"]).astype(bool) for a in record["annotations"]}
    ds = SA1BDataset(sa1b_dir, image_size=64, crop_size=48, tile_overlap=16, return_original_masks=True,
                     max_masks_per_image=1000)
    seen = []
    for i, (image_index, (top, left)) in enumerate(ds._index):
        if image_index != 0:
            continue
        sample = ds[i]
        assert sample["image_id"] == f"sa_1@{top},{left}"
        for mask, ident in zip(sample["original_masks"], sample["instance_ids"].tolist()):
            np.testing.assert_array_equal(mask.numpy(), by_id[ident][top : top + 48, left : left + 48])
            seen.append(ident)
    usable = [i for i, m in by_id.items() if 0 < m.sum() <= 0.9 * m.size]
    assert sorted(seen) == sorted(usable)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["image"].__setitem__("height", 96.5), r": image 'height' must be a positive integer, got 96\.5"),
    (lambda r: r["image"].__setitem__("width", True), r": image 'width' must be a positive integer, got True"),
    (lambda r: r["annotations"][0].__setitem__("id", 7.25),
     r" \[annotations\[0\]\]: 'id' must be an integer, got 7\.25"),
])
def test_fractional_and_boolean_numbers_are_not_integers(sa1b_dir, mutate, message):
    """int() truncated them (height 96.5 passed as 96, True as 1, id 7.25 became instance 7)."""
    record = json.loads((sa1b_dir / "sa_2.json").read_text())
    mutate(record)
    (sa1b_dir / "sa_2.json").write_text(json.dumps(record))
    with pytest.raises(SampleError, match=rf"sa_2\.json{message}$"):
        SA1BDataset(sa1b_dir, image_size=32)[1]
