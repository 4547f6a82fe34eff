"""The training data's input mapping (bands, intensity) travels from the datamodule through the task's checkpoint
and ``samtune export`` to inference: ``samtune amg`` and ``samtune evaluate`` read raw 16-bit multi-band images
as training did, unless flags say otherwise."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import pytest
import tifffile

from samtune.checkpoints import INPUT_MAPPING_KEY, save_checkpoint
from samtune.build import build_sam
from samtune.data.datamodules import MaskFolderDataModule
from samtune.data.io import prepare_image, resolve_input_mapping
from samtune.export import export_checkpoint, load_sam, read_export_metadata
from samtune.inference import Predictor
from samtune.tasks import PromptableSegmentationTask

MAPPING = {"bands": [2], "intensity": "percentile", "percentiles": [1.0, 99.0], "window": None}


def test_resolve_input_mapping_takes_given_then_recorded_then_defaults():
    assert resolve_input_mapping() == {"bands": None, "intensity": "auto", "percentiles": (0.5, 99.5), "window": None}
    assert resolve_input_mapping(MAPPING) == {"bands": [2], "intensity": "percentile", "percentiles": (1.0, 99.0),
                                              "window": None}
    # each given setting replaces the recorded one; the others stay as recorded
    assert resolve_input_mapping(MAPPING, bands=[0, 1, 2], percentiles=None)["bands"] == [0, 1, 2]
    assert resolve_input_mapping(MAPPING, intensity="window", window=[0, 4000]) == {
        "bands": [2], "intensity": "window", "percentiles": (1.0, 99.0), "window": (0.0, 4000.0)}
    with pytest.raises(ValueError, match="window only acts with intensity 'window', but intensity is 'percentile'"):
        resolve_input_mapping(MAPPING, window=[0, 10])
    with pytest.raises(ValueError, match="percentiles only act with intensity 'percentile' or 'auto'"):
        resolve_input_mapping(MAPPING, intensity="minmax", percentiles=[2, 98])
    with pytest.raises(ValueError, match="intensity='window' needs window"):
        resolve_input_mapping(MAPPING, intensity="window")
    with pytest.raises(TypeError, match="unknown settings"):
        resolve_input_mapping(MAPPING, gamma=2.0)


def _multiband_folder(root: Path) -> tuple[Path, Path]:
    """Two 5-band uint16 TIFFs (band 2 shows the objects) with label maps: images no model reads without knowing
    which band to take."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        label = np.zeros((48, 64), np.uint16)
        label[5:20, 8:30] = 1
        label[26:44, 36 + i:60] = 2
        bands = rng.integers(0, 3000, (48, 64, 5)).astype(np.uint16)
        bands[..., 2] = np.where(label > 0, 40000 + 5000 * label, 1000)
        tifffile.imwrite(images / f"img{i}.tif", bands)
        cv2.imwrite(str(masks / f"img{i}.png"), label)
    return images, masks


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One training step of sam_tiny on the 5-band folder (band 2, percentiles 1 / 99), its checkpoint and an
    official-format export of it."""
    root = tmp_path_factory.mktemp("mapping")
    images, masks = _multiband_folder(root)
    data = MaskFolderDataModule(str(images), str(masks), mask_type="instance", image_size=256, num_workers=0,
                                val_fraction=0.5, bands=[2], intensity="percentile", percentiles=(1.0, 99.0),
                                pin_memory=False)
    assert data.input_mapping == MAPPING
    base = save_checkpoint(build_sam("sam_tiny"), root / "base.pth")
    task = PromptableSegmentationTask("sam_tiny", str(base))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    assert task.input_mapping == MAPPING
    checkpoint = root / "run.ckpt"
    trainer.save_checkpoint(checkpoint)
    exported = root / "exported.pth"
    export_checkpoint(checkpoint, exported, "pth")
    return {"images": images, "masks": masks, "checkpoint": checkpoint, "exported": exported, "base": base}


def test_checkpoint_and_export_record_the_mapping(trained):
    import torch

    raw = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)
    assert raw[INPUT_MAPPING_KEY] == MAPPING
    assert load_sam(trained["checkpoint"]).input_mapping == MAPPING
    assert read_export_metadata(trained["exported"])["input_mapping"] == MAPPING
    assert load_sam(trained["exported"]).input_mapping == MAPPING
    assert Predictor.from_checkpoint(trained["exported"]).input_mapping == MAPPING
    assert Predictor.from_checkpoint(trained["base"]).input_mapping is None  # official weights record nothing
    # a resumed / reloaded task keeps it
    task = PromptableSegmentationTask.load_from_checkpoint(trained["checkpoint"], map_location="cpu",
                                                           weights_only=True)
    assert task.input_mapping == MAPPING


def test_amg_reads_images_with_the_recorded_mapping(trained, tmp_path, capsys):
    from samtune.inference.amg_cli import main

    image = trained["images"] / "img0.tif"
    fast = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--precision",
            "fp32", "--input", str(image)]
    assert main(["--checkpoint", str(trained["exported"]), "--output", str(tmp_path / "a"), *fast]) == 0
    assert "image reading {'bands': [2], 'intensity': 'percentile', 'percentiles': (1.0, 99.0)" in \
        capsys.readouterr().err
    # the same weights without the record cannot choose among 5 bands; given as flags, they give the same masks
    assert main(["--checkpoint", str(trained["base"]), "--output", str(tmp_path / "b"), *fast, "--quiet"]) == 1
    assert "choose 1 or 3 of them with `bands`" in capsys.readouterr().err
    plain = tmp_path / "plain.pth"
    plain.write_bytes(trained["exported"].read_bytes())  # no OUT.json beside it
    assert main(["--checkpoint", str(plain), "--model", "sam_tiny", "--output", str(tmp_path / "c"), *fast,
                 "--quiet", "--bands", "2", "--intensity", "percentile", "--percentiles", "1,99"]) == 0
    first, third = (json.loads((tmp_path / d / "img0.json").read_text())["annotations"] for d in "ac")
    assert first == third and first
    # a flag that contradicts the recorded preset is refused, naming both
    assert main(["--checkpoint", str(trained["exported"]), "--output", str(tmp_path / "d"), *fast, "--quiet",
                 "--window", "0,10"]) == 1
    assert "window only acts with intensity 'window', but intensity is 'percentile'" in capsys.readouterr().err


def test_evaluate_reads_images_with_the_recorded_mapping(trained, tmp_path, capsys):
    from samtune.evaluation.cli import main

    common = ["--data", "mask_folder", "--images", str(trained["images"]), "--masks", str(trained["masks"]),
              "--mask-type", "instance", "--protocols", "box", "--clicks", "1", "--quiet", "--no-plot",
              "--precision", "fp32", "--name", "run"]
    assert main(["--checkpoint", str(trained["checkpoint"]), "--output", str(tmp_path / "a"), *common]) == 0
    report = json.loads((tmp_path / "a" / "run.json").read_text())
    assert report["info"]["input_mapping"] == {"bands": [2], "intensity": "percentile", "percentiles": [1.0, 99.0],
                                               "window": None}
    # the same as stating the mapping by flags on the same weights without the record
    plain = tmp_path / "plain.pth"
    plain.write_bytes(trained["exported"].read_bytes())
    assert main(["--checkpoint", str(plain), "--model", "sam_tiny", "--output", str(tmp_path / "c"), *common,
                 "--bands", "2", "--intensity", "percentile", "--percentiles", "1,99"]) == 0
    flags = json.loads((tmp_path / "c" / "run.json").read_text())
    assert "input_mapping" in flags["info"] and flags["summary"] == report["summary"]
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(trained["checkpoint"]), "--output", str(tmp_path / "b"), *common, "--window", "0,9"])
    assert "--window needs --intensity window (the checkpoint records intensity percentile)" in capsys.readouterr().err


def test_prepare_image_with_the_mapping_picks_the_band(trained):
    from samtune.data.io import read_image

    image = prepare_image(read_image(trained["images"] / "img0.tif"), **resolve_input_mapping(MAPPING))
    assert image.shape == (48, 64, 3) and image.dtype == np.uint8
    assert image[10, 10, 0] > 200 and image[0, 0, 0] < 10  # the object band, stretched between its percentiles


def test_cached_datamodule_passes_on_the_wrapped_mapping(tmp_path):
    from samtune.data.cached import CachedEmbeddingDataModule

    data = MaskFolderDataModule(str(tmp_path), str(tmp_path), image_size=256, bands=[0], intensity="window",
                                window=(-160, 240))
    cached = CachedEmbeddingDataModule(data, str(tmp_path / "cache"), model="sam_tiny")
    assert cached.input_mapping == {"bands": [0], "intensity": "window", "percentiles": [0.5, 99.5],
                                    "window": [-160.0, 240.0]}
