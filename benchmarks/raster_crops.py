"""Training crops and validation tiles of a large raster: memory and time, windowed decoding vs full-size decoding.

A COCO file describes one ``--size`` x ``--size`` grey raster with ``--masks`` small rectangular buildings
(15-55 px, compressed RLE), the remote-sensing case of the satellite recipe at a real raster's scale.
``COCODataset`` with ``crop_size`` 128 then draws ``--crops`` random training crops (up to 16 masks each) and plans
the validation tiles (128 px, overlapping by 64).

* reference: a sample's candidate masks decoded once at full image size, then cut to each window (what samtune
  did for every sample before windowed decoding, and the straightforward way): memory grows with masks x image
  area;
* samtune: ``RLEMaskSource.decode_window`` / ``window_areas`` decode only the window's columns of the masks whose
  box meets the window.

Both draw the same crops and masks (the script checks it). Each side runs in its own spawned process, so its peak
resident memory (``ru_maxrss``) is its own; a side killed for memory is reported as such.

    python benchmarks/raster_crops.py                          # 2000 x 2000, 200 buildings
    python benchmarks/raster_crops.py --size 4000 --masks 800  # the reference needs more than 24 GB
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def write_raster(root: Path, size: int, masks: int, seed: int = 0) -> Path:
    """The raster (PNG) and its COCO file (RLE buildings); returns the annotation file."""
    import cv2
    import numpy as np
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    cv2.imwrite(str(root / "raster.png"), rng.integers(0, 255, (size, size), dtype=np.uint8))
    annotations = []
    canvas = np.zeros((size, size), dtype=np.uint8, order="F")
    for k in range(masks):
        h, w = (int(v) for v in rng.integers(15, 56, 2))
        y, x = (int(v) for v in rng.integers(0, size - 56, 2))
        canvas[:] = 0
        canvas[y : y + h, x : x + w] = 1
        rle = mask_utils.encode(canvas)
        annotations.append({"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": h * w,
                            "bbox": [x, y, w, h], "segmentation": {"size": [size, size],
                                                                  "counts": rle["counts"].decode()}})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "raster.png", "height": size, "width": size}],
                                "annotations": annotations, "categories": [{"id": 1, "name": "building"}]}))
    return path


def _side(side: str, annotations: str, crops: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from samtune.data.coco import COCODataset
    from samtune.data.masks import RLEMaskSource

    if side == "reference":
        def cut(self: RLEMaskSource, indices: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
            """Windows cut from the masks decoded at full size, decoded once per sample (the sample's first request
            names all its candidates, later ones a subset), as samtune did before windowed decoding."""
            indices = np.asarray(indices, dtype=np.int64)
            cached = getattr(self, "_full", None)
            if cached is None or not np.isin(indices, cached[0]).all():
                cached = self._full = (indices, self.decode(indices))  # [N, H, W]
            rows = [int(np.flatnonzero(cached[0] == i)[0]) for i in indices]
            return np.ascontiguousarray(cached[1][rows, top : top + height, left : left + width])

        def areas(self: RLEMaskSource, indices: np.ndarray, *window: int) -> np.ndarray:
            return cut(self, indices, *window).reshape(len(indices), -1).sum(1, dtype=np.int64)

        RLEMaskSource.decode_window = cut  # type: ignore[method-assign]
        RLEMaskSource.window_areas = areas  # type: ignore[method-assign]
    settings = dict(image_size=256, crop_size=128, max_masks_per_image=16)
    start = time.perf_counter()
    train = COCODataset(annotations, train=True, repeats=crops, **settings)
    torch.manual_seed(0)
    samples = [train[i] for i in range(crops)]
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    val = COCODataset(annotations, train=False, tile_overlap=64, **settings)
    val_s = time.perf_counter() - start
    digest = [(s["instance_ids"].tolist(), int(s["masks"].sum())) for s in samples]
    return {"train_s": train_s, "val_s": val_s, "tiles": len(val), "digest": digest,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "masks_per_crop": float(np.mean([len(s["instance_ids"]) for s in samples]))}


def _child(queue: Any, *args: Any) -> None:
    queue.put(_side(*args))


def _run(side: str, annotations: Path, crops: int) -> dict[str, Any] | None:
    """One side in a fresh spawned process; None when it died (killed for memory: exit code -9)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_child, args=(queue, side, str(annotations), crops))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        print(f"  {side}: the process exited with code {proc.exitcode} (-9: killed, usually out of memory)")
        return None
    return queue.get()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2000, help="raster side in pixels")
    parser.add_argument("--masks", type=int, default=200, help="buildings in the raster")
    parser.add_argument("--crops", type=int, default=20, help="training crops drawn")
    parser.add_argument("--skip-reference", action="store_true", help="samtune only (the reference may not fit)")
    args = parser.parse_args(argv)
    if args.size < 200 or args.masks < 1 or args.crops < 1:
        parser.error("--size must be >= 200, --masks and --crops >= 1")

    from benchmarks.common import machine

    with tempfile.TemporaryDirectory() as tmp:
        annotations = write_raster(Path(tmp), args.size, args.masks)
        results = {side: _run(side, annotations, args.crops)
                   for side in ("reference", "samtune") if side == "samtune" or not args.skip_reference}
    ours, ref = results["samtune"], results.get("reference")
    if ours is None:
        raise SystemExit("the samtune side failed")
    if ref is not None and ref["digest"] != ours["digest"]:
        raise SystemExit("the two sides drew different samples")
    print(f"\n{machine()}")
    print(f"{args.size} x {args.size} raster, {args.masks} RLE buildings; {args.crops} training crops of 128 px "
          f"({ours['masks_per_crop']:.1f} masks each on average); validation tiles 128 px / overlap 64 "
          f"({ours['tiles']} samples)\n")
    print("| side | training crops s | validation tiling s | peak GB (max RSS) |")
    print("|---|---|---|---|")
    if "reference" in results:
        row = "killed (out of memory) | | |" if ref is None else \
            f"{ref['train_s']:.1f} | {ref['val_s']:.1f} | {ref['peak_gb']:.2f} |"
        print(f"| reference (full-size decoding, then cut) | {row}")
    print(f"| samtune (windowed decoding) | {ours['train_s']:.1f} | {ours['val_s']:.1f} | {ours['peak_gb']:.2f} |")
    if ref is not None:
        print(f"| ratio | {ref['train_s'] / ours['train_s']:.1f}x faster | {ref['val_s'] / ours['val_s']:.1f}x faster "
              f"| {ours['peak_gb'] / ref['peak_gb']:.0%} of the reference's memory |")


if __name__ == "__main__":
    main()
