"""evaluate(): datasets at the model's input convention, batching independence, parity with validation."""
from __future__ import annotations

import pytest
import torch

from samtune.build import build_sam
from samtune.data import MaskFolderDataset, collate_samples
from samtune.evaluation import ProtocolConfig, dataset_options, evaluate
from samtune.prompts import InteractiveEvaluator
from tests.evaluation.conftest import PaintSam


def test_evaluate_mask_folder_columns_and_batching(label_folder) -> None:
    images, masks = label_folder
    model = PaintSam(image_size=56, radii=(2, 2, 2, 2))
    config = ProtocolConfig(num_clicks=3)
    dataset = MaskFolderDataset(images, masks, **dataset_options(model, config))
    report = evaluate(model, dataset, config, name="rects", batch_size=2, progress=False)
    assert (report.num_images, report.num_masks) == (2, 5)
    cols = report.per_mask
    assert cols["image_id"] == ["img0"] * 3 + ["img1"] * 2
    assert cols["instance_id"].tolist() == [1, 2, 3, 1, 2]
    # GT areas at the images' own resolution (rectangles of the fixture).
    assert cols["area"].tolist() == [11 * 18, 16 * 21, 14 * 11, 17 * 22, 15 * 19]
    # Image 0 (40 x 56) is the model input itself: the painted GT box is exact.
    assert cols["box_iou"][:3].tolist() == [1.0, 1.0, 1.0] and cols["box_as_mask_iou"].tolist() == [1.0] * 5
    # Image 1 (48 x 32 -> 56 x 37): boxes mapped to the input and back lose a little at the edges.
    assert (cols["box_iou"][3:] > 0.85).all() and (cols["box_iou"][3:] < 1.0).all()
    assert cols["click_iou"].shape == (5, 3) and cols["box_jitter_iou"].shape == (5,)
    assert report.metrics["box"]["miou"] == pytest.approx(cols["box_iou"].double().mean().item())
    assert report.info["image_size"] == 56 and report.info["precision"] == "fp32"
    one_by_one = evaluate(model, dataset, config, batch_size=1, progress=False)
    for key, value in report.per_mask.items():
        other = one_by_one.per_mask[key]
        assert (value == other) if isinstance(value, list) else torch.equal(value, other), key
    first = evaluate(model, dataset, config, max_images=1, progress=False)
    assert (first.num_images, first.num_masks) == (1, 3)


def test_input_resolution_equals_validation(label_folder) -> None:
    """The validation evaluator of the task and `evaluate` agree mask for mask on a real (tiny) SAM."""
    images, masks = label_folder
    torch.manual_seed(0)
    model = build_sam("sam_tiny")
    config = ProtocolConfig(protocols=("box", "clicks"), num_clicks=3, iou_resolution="input")
    dataset = MaskFolderDataset(images, masks, **dataset_options(model, config))
    report = evaluate(model, dataset, config, batch_size=2, progress=False)
    batch = collate_samples([dataset[0], dataset[1]])
    valid = batch["mask_valid"].flatten()
    gt = batch["masks"].flatten(0, 1)[valid]
    image_index = torch.arange(2).repeat_interleave(batch["mask_valid"].shape[1])[valid]
    sizes = batch["input_size"][image_index]
    with torch.no_grad():
        embeddings = model.encode_image(batch["images"])
        expected = InteractiveEvaluator(num_clicks=3)(model, embeddings, image_index, gt, sizes)
    torch.testing.assert_close(report.per_mask["click_iou"], expected.click_ious, atol=1e-5, rtol=0)
    torch.testing.assert_close(report.per_mask["click_iou_pred"], expected.click_iou_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(report.per_mask["box_iou"], expected.box_ious, atol=1e-5, rtol=0)


def test_dataset_must_be_built_for_the_model(label_folder) -> None:
    images, masks = label_folder
    model = PaintSam(image_size=56)
    config = ProtocolConfig(protocols=("box",))
    options = dataset_options(model, config)
    with pytest.raises(ValueError, match="image_size=64 but the model expects 56"):
        evaluate(model, MaskFolderDataset(images, masks, **{**options, "image_size": 64}), config, progress=False)
    with pytest.raises(ValueError, match="train=True"):
        evaluate(model, MaskFolderDataset(images, masks, **{**options, "train": True}), config, progress=False)
    with pytest.raises(ValueError, match="return_original_masks=False"):
        evaluate(model, MaskFolderDataset(images, masks, **{**options, "return_original_masks": False}), config,
                 progress=False)
    unnamed = PaintSam(image_size=56)
    with pytest.raises(ValueError, match="dataset name '/..' has no usable characters"):
        evaluate(unnamed, MaskFolderDataset(images, masks, **options), config, name="/..", progress=False)
    assert unnamed.calls == []  # refused before any image is evaluated (the report could not be written)
    with pytest.raises(ValueError, match="max_images must be positive"):
        evaluate(model, MaskFolderDataset(images, masks, **options), config, max_images=0, progress=False)
    assert options["max_masks_per_image"] > 10**6 and options["train"] is False
    assert dataset_options(model, config, max_masks_per_image=4)["max_masks_per_image"] == 4


def test_original_resolution_matches_the_predictor_pipeline(label_folder) -> None:
    """Point and box rounds at the images' resolution equal the official predictor's recipe on the same
    embedding: prompts through ``ResizeLongestSide.apply_coords`` / ``apply_boxes``, ``Sam.postprocess_masks``,
    threshold 0, the most confident of the 3 outputs for a point."""
    from samtune.inference import ResizeLongestSide
    from samtune.prompts import mask_boxes, mask_iou, region_centers

    images, masks = label_folder
    torch.manual_seed(1)
    model = build_sam("sam_tiny")
    config = ProtocolConfig(protocols=("point", "box"))
    dataset = MaskFolderDataset(images, masks, **dataset_options(model, config))
    report = evaluate(model, dataset, config, batch_size=2, progress=False)
    transform = ResizeLongestSide(model.image_size)
    point_ious, box_ious = [], []
    with torch.no_grad():
        for sample in (dataset[0], dataset[1]):
            gt = sample["original_masks"]
            size = tuple(gt.shape[-2:])
            input_size = tuple(sample["input_size"].tolist())
            embedding = model.encode_image(sample["image"][None])
            xy, _ = region_centers(gt)
            coords = transform.apply_coords_torch(xy[:, None], size)
            logits, iou = model.decode(embedding, point_coords=coords, point_labels=torch.ones(len(gt), 1).long())
            best = logits[torch.arange(len(gt)), iou.argmax(1)][:, None]
            pred = model.postprocess_masks(best, input_size, size)[:, 0] > 0
            point_ious.append(mask_iou(pred, gt))
            boxes = transform.apply_boxes_torch(mask_boxes(gt)[0], size)
            logits, _ = model.decode(embedding, boxes=boxes, multimask_output=False)
            box_ious.append(mask_iou(model.postprocess_masks(logits, input_size, size)[:, 0] > 0, gt))
    torch.testing.assert_close(report.per_mask["point_iou"], torch.cat(point_ious), atol=1e-6, rtol=0)
    torch.testing.assert_close(report.per_mask["box_iou"], torch.cat(box_ious), atol=1e-6, rtol=0)


def test_bf16_autocast_runs(label_folder) -> None:
    images, masks = label_folder
    torch.manual_seed(0)
    model = build_sam("sam_tiny")
    config = ProtocolConfig(protocols=("box", "clicks"), num_clicks=2)
    dataset = MaskFolderDataset(images, masks, **dataset_options(model, config))
    report = evaluate(model, dataset, config, precision="bf16", max_images=1, progress=False)
    assert report.info["precision"] == "bf16" and report.per_mask["click_iou"].dtype == torch.float32
    ious = torch.cat((report.per_mask["click_iou"].flatten(), report.per_mask["box_iou"]))
    assert ((ious >= 0) & (ious <= 1)).all()


def test_evaluation_imports_without_lightning() -> None:
    import subprocess
    import sys

    from tests.test_layering import BLOCKER

    code = BLOCKER + "import samtune.evaluation, samtune.evaluation.cli\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_tiles_are_counted_as_tiles(label_folder) -> None:
    """With crop_size every sample is a tile: max_images and the table count tiles, and say so."""
    from samtune.evaluation import format_table

    images, masks = label_folder
    model = PaintSam(image_size=24, radii=(2, 2, 2, 2))
    config = ProtocolConfig(protocols=("box",))
    dataset = MaskFolderDataset(images, masks, crop_size=24, **dataset_options(model, config))
    report = evaluate(model, dataset, config, name="rects", progress=False)
    assert report.num_images == len(dataset) > 2 and report.num_masks == 5 and report.info["crop_size"] == 24
    assert format_table(report).startswith(f"rects: {len(dataset)} tiles of 2 images, 5 masks |")
    first = evaluate(model, dataset, config, name="rects", max_images=1, progress=False)
    assert first.num_images == 1 and format_table(first).startswith("rects: 1 tiles of 1 images, ")
    whole = evaluate(model, MaskFolderDataset(images, masks, **dataset_options(model, config)), config,
                     name="rects", progress=False)
    assert "crop_size" not in whole.info and format_table(whole).startswith("rects: 2 images, 5 masks |")


def test_ignore_values_are_left_out_of_the_evaluation(tmp_path) -> None:
    """--ignore-values pixels (VOC's 255 void band) are neither scored nor clicked (RITM / f-BRS protocol)."""
    import numpy as np

    from tests.evaluation.conftest import write_label_folder

    label = np.zeros((40, 40), np.uint16)
    label[10:30, 10:30] = 255  # void band around the object
    label[14:26, 14:26] = 1  # the 12 x 12 object
    images, masks = write_label_folder(tmp_path / "void", [label])
    for resolution in ("original", "input"):
        model = PaintSam(image_size=40, radii=(9, 9, 9, 9))  # paints 19 x 19 around a click: object + void
        config = ProtocolConfig(protocols=("clicks",), num_clicks=2, iou_resolution=resolution)
        dataset = MaskFolderDataset(images, masks, ignore_values=(255,), **dataset_options(model, config))
        sample = dataset[0]
        assert torch.equal(sample["ignore_mask"][:40, :40], torch.from_numpy(label == 255))
        assert ("original_ignore_mask" in sample) == (resolution == "original")
        report = evaluate(model, dataset, config, name="void", progress=False)
        assert report.per_mask["click_iou"].tolist() == [[1.0, 1.0]], resolution
        assert model.calls[1]["labels"][0, 1].item() == -1  # exact: no click on the void band
    options = dataset_options(model, ProtocolConfig(protocols=("box",)))
    for window, extra in (((slice(5, 35), slice(5, 35)), {"region": (5, 5, 35, 35)}),
                          ((slice(0, 32), slice(0, 32)), {"crop_size": 32})):  # the void pixels are cut alike
        cut = MaskFolderDataset(images, masks, ignore_values=(255,), **extra, **options)[0]
        assert torch.equal(cut["original_ignore_mask"], torch.from_numpy(label[window] == 255)), extra
    plain = MaskFolderDataset(images, masks, ignore_values=(255,), **{**dataset_options(model, config), "train": True})
    assert "ignore_mask" not in plain[0]  # training samples are unchanged
    assert "ignore_mask" not in MaskFolderDataset(images, masks, **dataset_options(model, config))[0]


def test_validation_during_fit_leaves_void_pixels_out_like_evaluate(tmp_path) -> None:
    """The task's validation step scores void pixels as ``samtune evaluate`` does (previous test: [1.0, 1.0] on
    this image): neither in the IoUs nor as a click target. The batching functions dropped the samples'
    ``ignore_mask``, so validation during ``fit`` counted the void band as false positives (click 1: 144 / 361)."""
    import numpy as np

    from samtune.tasks import PromptableSegmentationTask
    from tests.evaluation.conftest import write_label_folder

    label = np.zeros((40, 40), np.uint16)
    label[10:30, 10:30] = 255  # void band around the object
    label[14:26, 14:26] = 1  # the 12 x 12 object
    images, masks = write_label_folder(tmp_path / "void", [label, np.where(label == 255, 0, label)])
    dataset = MaskFolderDataset(images, masks, ignore_values=(255,), image_size=40, normalization="minmax")
    both = collate_samples([dataset[0], dataset[1]])  # the second image has no void pixel
    assert both["ignore_mask"].shape == (2, 40, 40) and not both["ignore_mask"][1].any()
    assert torch.equal(both["ignore_mask"][0], torch.from_numpy(label == 255))
    assert "ignore_mask" not in collate_samples([dataset[1]])
    task = PromptableSegmentationTask("sam_tiny", val_num_clicks=2)
    task.model = PaintSam(image_size=40, radii=(9, 9, 9, 9))  # paints 19 x 19 around a click: object + void
    task.validation_step(collate_samples([dataset[0]]), 0)
    values = task.val_metrics.compute()
    assert (values["iou_click_1"].item(), values["iou_click_2"].item()) == (pytest.approx(1.0), pytest.approx(1.0))
    assert task.model.calls[1]["labels"][0, 1].item() == -1  # exact: no click on the void band


def test_masks_empty_at_the_model_input_are_counted_and_scored_at_the_original_resolution(tmp_path) -> None:
    """A mask that vanishes in the resize to the model input is still a mask of the image: at the original
    resolution (where its prompts are computed) it is evaluated; at the input resolution it cannot be prompted, so
    it is dropped, and the report and a warning say how many."""
    import json
    import warnings

    import numpy as np

    from samtune.evaluation import format_table, write_report
    from tests.evaluation.conftest import write_label_folder

    label = np.zeros((64, 64), np.uint16)
    label[8:40, 8:40] = 1
    label[51, 51] = 2  # odd pixel: kept by the 2x nearest resize (it samples the odd rows and columns)
    label[50, 56] = 3  # even row: vanishes at the 32 x 32 model input
    images, masks = write_label_folder(tmp_path / "tiny", [label])
    model = PaintSam(image_size=32, radii=(0, 0, 0, 0))
    config = ProtocolConfig(protocols=("point", "box"))
    dataset = MaskFolderDataset(images, masks, **dataset_options(model, config))
    sample = dataset[0]
    assert sample["instance_ids"].tolist() == [1, 2] and sample["vanished_instance_ids"].tolist() == [3]
    assert torch.equal(sample["original_vanished_masks"][0], torch.from_numpy(label == 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped: no warning
        report = evaluate(model, dataset, config, name="tiny", progress=False)
    assert report.num_masks == 3 and report.per_mask["instance_id"].tolist() == [1, 2, 3]
    assert report.per_mask["area"].tolist() == [32 * 32, 1, 1]
    assert report.per_mask["box_iou"][2] > 0  # prompted at its own pixel: (56, 50) -> (28, 25) at the input
    assert report.info["masks_empty_at_input"] == 1 and report.info["dropped_masks"] == 0
    assert "1 mask empty at the model input, evaluated at the original resolution" in format_table(report)

    config = ProtocolConfig(protocols=("point", "box"), iou_resolution="input")
    dataset = MaskFolderDataset(images, masks, **dataset_options(model, config))
    assert "original_vanished_masks" not in dataset[0] and dataset[0]["vanished_instance_ids"].tolist() == [3]
    with pytest.warns(UserWarning, match=r"1 mask of 'tiny' .* empty at the model input .* not evaluated"):
        report = evaluate(model, dataset, config, name="tiny", progress=False)
    assert report.num_masks == 2 and report.info["dropped_masks"] == report.info["masks_empty_at_input"] == 1
    assert "1 mask empty at the model input, not evaluated" in format_table(report)
    paths, _ = write_report(report, tmp_path / "out", plot=False)
    assert json.loads(paths["json"].read_text())["info"]["dropped_masks"] == 1
    train = MaskFolderDataset(images, masks, **{**dataset_options(model, config), "train": True})
    assert "vanished_instance_ids" not in train[0]  # training samples are unchanged


def test_a_skipped_sample_does_not_count_its_substitute_twice(tmp_path) -> None:
    """``on_error="skip"`` hands the next image in place of a bad one: it is evaluated once, not twice (twice, its
    masks weighed double in every mean and num_images counted a bad file as an image)."""
    from tests.evaluation.conftest import rectangles, write_label_folder

    images, masks = write_label_folder(tmp_path / "bad", [
        rectangles((12, 12), [(2, 2, 6, 6)]), rectangles((12, 12), [(1, 1, 9, 4)]), rectangles((12, 12), [(3, 3, 8, 8)]),
    ])
    (images / "img0.png").write_bytes(b"not a png")
    model = PaintSam()
    config = ProtocolConfig(protocols=("clicks",), num_clicks=2)
    dataset = MaskFolderDataset(images, masks, on_error="skip", **dataset_options(model, config))
    for batch_size in (1, 2):
        report = evaluate(model, dataset, config, batch_size=batch_size, progress=False)
        assert (report.num_images, report.num_masks) == (2, 2), batch_size
        assert report.per_mask["image_id"] == ["img1", "img2"]
        assert report.info["repeated_samples"] == 1
