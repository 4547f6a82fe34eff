"""Proof: `samtune evaluate` with the real LiteMedSAM weights reproduces the reference box IoUs.

Same instances and tolerance as tests/modeling/test_lite_medsam.py (the Predictor path): every instance of
>= 100 px, the tight GT box, single-mask output, IoU at the images' resolution. Reference implementation:
0.676 on data/nuclei2d (118 nuclei), 0.590 on data/em_membrane (2116 cells, 4-connected components of 255);
samtune must be within +-0.01. Measured with `samtune evaluate`: 0.670 and 0.595 (the Predictor path: 0.669, 0.595).

The nuclei image (one decoder call of 118 boxes) runs in the default suite; the 20 EM images take minutes on
CPU and are marked slow.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from samtune.evaluation.cli import main


def _evaluate(assets: Path, out: Path, data: list[str]) -> dict:
    weights = assets / "weights" / "lite_medsam" / "lite_medsam.pth"
    code = main(["--checkpoint", str(weights), "--model", "lite_medsam", "--data", "mask_folder", *data,
                 "--min-area", "100", "--protocols", "box", "--name", "run", "--output", str(out), "--quiet",
                 "--num-workers", "0"])
    assert code == 0
    return json.loads((out / "run.json").read_text())


def test_nuclei_box_iou_matches_reference(assets: Path, tmp_path: Path) -> None:
    root = assets / "data" / "nuclei2d"
    for folder, name in (("img", "img2d.tif"), ("msk", "mask2d.tif")):  # image and labels share one folder
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "n.tif").symlink_to(root / name)
    report = _evaluate(assets, tmp_path / "out", ["--images", str(tmp_path / "img"), "--masks", str(tmp_path / "msk"),
                                                  "--mask-type", "instance", "--intensity", "minmax"])
    assert report["num_masks"] == 118
    box = report["metrics"]["box"]
    assert abs(box["miou"] - 0.676) <= 0.01, box
    import numpy as np
    import tifffile

    labels = tifffile.imread(root / "mask2d.tif")
    fills = []
    for i in np.unique(labels)[1:]:
        ys, xs = np.nonzero(labels == i)
        if len(ys) >= 100:
            fills.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    assert box["box_as_mask_miou"] == pytest.approx(np.mean(fills), abs=1e-6)  # the filled-box baseline


@pytest.mark.slow
def test_em_box_iou_matches_reference(assets: Path, tmp_path: Path) -> None:
    root = assets / "data" / "em_membrane"
    report = _evaluate(assets, tmp_path, ["--images", str(root / "image"), "--masks", str(root / "label"),
                                          "--mask-type", "components", "--connectivity", "4"])
    assert report["num_images"] == 20 and report["num_masks"] == 2116
    assert abs(report["metrics"]["box"]["miou"] - 0.590) <= 0.01, report["metrics"]
