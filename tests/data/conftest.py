"""Small generated fixtures for every data format (no binary data is committed)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from samtune.data.synth import synthesize_sa1b


def encode_rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of ``[H, W]`` bool, counts as str (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (the ``iscrowd`` form) of ``[H, W]`` bool."""
    flat = mask.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(mask.shape), "counts": [int(c) for c in counts[: len(counts)]]}


@pytest.fixture
def sa1b_dir(tmp_path: Path) -> Path:
    """Six synthetic SA-1B images, 96 x 128."""
    synthesize_sa1b(tmp_path / "sa1b", 6, image_size=(96, 128), seed=1)
    return tmp_path / "sa1b"


def write_coco(root: Path) -> Path:
    """A COCO file with polygons (nested and flat), compressed and uncompressed RLE, a crowd and two categories.

    Image 1 (60 x 80): ann 10 nested polygon (cat 1), ann 11 flat polygon (cat 2), ann 12 compressed RLE (cat 1),
    ann 13 crowd uncompressed RLE (cat 1). Image 2 (50 x 50): ann 20 uncompressed RLE (cat 2), non-crowd.
    Image 3 (40 x 40): no annotations.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (60, 80), "b.png": (50, 50), "c.png": (40, 40)}.items():
        cv2.imwrite(str(root / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    rle_mask = np.zeros((60, 80), bool)
    rle_mask[30:50, 50:75] = True
    crowd = np.zeros((60, 80), bool)
    crowd[2:8, 2:30] = True
    second = np.zeros((50, 50), bool)
    second[10:40, 5:20] = True
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 60, "width": 80},
            {"id": 2, "file_name": "b.png", "height": 50, "width": 50},
            {"id": 3, "file_name": "c.png", "height": 40, "width": 40},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": [[5, 10, 30, 10, 30, 40, 5, 40]]},
            {"id": 11, "image_id": 1, "category_id": 2, "iscrowd": 0,
             "segmentation": [40.5, 5, 70, 5, 55, 25]},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": encode_rle(rle_mask)},
            {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(crowd)},
            {"id": 20, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": uncompressed_rle(second)},
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco")


def write_mask_folder(root: Path, n: int = 4, size: tuple[int, int] = (48, 64)) -> tuple[Path, Path]:
    """Images whose intensity encodes their uint16 instance label map (label k -> grey 40 * k + 20)."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        labels = np.zeros(size, np.uint16)
        for k in range(1, 4):
            y, x = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
            labels[y:y + 12, x:x + 12] = k
        cv2.imwrite(str(images / f"img{i}.png"), np.where(labels > 0, 40 * labels + 20, 0).astype(np.uint8))
        cv2.imwrite(str(masks / f"img{i}.png"), labels)
    return images, masks
