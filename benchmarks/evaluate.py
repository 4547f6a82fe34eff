"""LiteMedSAM on the real assets with every protocol of ``samtune evaluate``: click curves, NoC, box IoUs.

Datasets (``../shared/assets`` or ``SAMTUNE_ASSETS``): ``data/nuclei2d`` (1 image 512 x 512 uint16, 118 nuclei of
>= 100 px, min-max intensity) and ``data/em_membrane`` (20 images 512 x 512, 2116 cells = 4-connected components
of label 255 of >= 100 px). Model: ``weights/lite_medsam/lite_medsam.pth``. Protocols: one centre click (most
confident of 3 outputs), exact and jittered GT box, k clicks with mask feedback; IoU at the images' resolution,
official coordinate mapping, fp32. Both datasets go to one output folder, so ``summary.csv`` and
``iou_vs_clicks.png`` hold both. The box mIoUs reproduce the reference implementation (nuclei 0.676, EM 0.590,
see the assets' README and tests/modeling/test_lite_medsam.py).

Usage: ``python benchmarks/evaluate.py [--clicks 5] [--datasets nuclei2d,em_membrane] [--output bench_eval]
[--max-images N] [--batch-size 4] [--device auto]``
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import machine  # noqa: E402
from samtune.build import build_sam  # noqa: E402
from samtune.data import MaskFolderDataset  # noqa: E402
from samtune.evaluation import ProtocolConfig, dataset_options, evaluate, format_table, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def assets_dir() -> Path:
    path = Path(os.environ.get("SAMTUNE_ASSETS", REPO.parent / "shared" / "assets"))
    if not path.is_dir():
        raise SystemExit(f"real assets not found at {path}: set SAMTUNE_ASSETS")
    return path


def datasets(assets: Path, tmp: Path, options: dict) -> dict[str, MaskFolderDataset]:
    """The two datasets with the reference protocol's instance definitions."""
    nuclei = assets / "data" / "nuclei2d"
    (tmp / "img").mkdir()
    (tmp / "msk").mkdir()
    (tmp / "img" / "nuclei.tif").symlink_to(nuclei / "img2d.tif")  # image and labels share one folder
    (tmp / "msk" / "nuclei.tif").symlink_to(nuclei / "mask2d.tif")
    em = assets / "data" / "em_membrane"
    return {
        "nuclei2d": MaskFolderDataset(tmp / "img", tmp / "msk", mask_type="instance", min_area=100, intensity="minmax",
                                      **options),
        "em_membrane": MaskFolderDataset(em / "image", em / "label", mask_type="components", connectivity=4,
                                         min_area=100, **options),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--protocols", default="point,box,box_jitter,clicks")
    parser.add_argument("--datasets", default="nuclei2d,em_membrane")
    parser.add_argument("--output", default="bench_eval")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    assets = assets_dir()
    device = None if args.device == "auto" else args.device
    model = build_sam("lite_medsam", assets / "weights" / "lite_medsam" / "lite_medsam.pth")
    config = ProtocolConfig(protocols=tuple(args.protocols.split(",")), num_clicks=args.clicks)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        found = datasets(assets, Path(tmp), dataset_options(model, config))
        for name in args.datasets.split(","):
            report = evaluate(model, found[name], config, name=name, batch_size=args.batch_size, device=device,
                              max_images=args.max_images, progress=True,
                              metadata={"model": "lite_medsam", "checkpoint": "lite_medsam.pth"})
            paths, warnings = write_report(report, args.output)
            print(format_table(report))
            print(json.dumps({"name": name, "wall_time_s": round(report.wall_time_s, 1),
                              "masks_per_s": round(report.num_masks / report.wall_time_s, 2), **report.summary}))
            for warning in warnings:
                print("warning:", warning, file=sys.stderr)
    print("reports in", Path(args.output).resolve())


if __name__ == "__main__":
    main()
