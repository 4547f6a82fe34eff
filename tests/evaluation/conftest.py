"""Fixtures of the evaluation tests: a square-painting stand-in model and tiny datasets in every format."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn

from samtune.modeling.preprocessing import default_interpolation


class PaintSam(nn.Module):
    """A model whose outputs are hand-predictable, with the ``decode`` contract of ``samtune.modeling.Sam``.

    Its low-res grid is the model input (``low_res_size == image_size``), so no resampling happens at the input
    resolution. Output token t paints logits +8 on the union of squares of half-side ``radii[t]`` around the
    positive points, carves the same squares around negative points, and -8 elsewhere; a box (``boxes=`` or the
    corner tokens labelled 2 / 3) paints its inclusive rectangle on every token. Predicted IoUs are ``iou[t]``.
    Every call is recorded in ``calls``.
    """

    def __init__(self, image_size: int = 12, radii: tuple[int, ...] = (1, 0, 1, 2),
                 iou: tuple[float, ...] = (0.5, 0.2, 0.9, 0.3), normalization: str = "minmax") -> None:
        super().__init__()
        self.image_size = image_size
        self.low_res_size = image_size
        self.normalization = normalization
        self.resize_interpolation = default_interpolation(normalization)
        self.radii = radii
        self.iou = iou
        self.calls: list[dict[str, Any]] = []
        self.register_buffer("anchor", torch.zeros(()))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images.new_zeros(images.shape[0], 1, 1, 1)

    def decode(self, image_embeddings, image_index, point_coords=None, point_labels=None, boxes=None,
               mask_inputs=None, multimask_output=True, return_all_tokens=False, pad_points=None):
        # pad_points: Sam.decode's padding token switch; the callers here send their own padding (label -1)
        self.calls.append({
            "coords": None if point_coords is None else point_coords.clone(),
            "labels": None if point_labels is None else point_labels.clone(),
            "boxes": None if boxes is None else boxes.clone(),
            "mask_inputs": None if mask_inputs is None else mask_inputs.clone(),
            "multimask_output": multimask_output, "return_all_tokens": return_all_tokens,
            "image_index": image_index.clone(),
        })
        m, s = image_index.shape[0], self.image_size
        grid = torch.arange(s, dtype=torch.float32)
        xs, ys = grid.view(1, 1, s), grid.view(1, s, 1)
        if boxes is None and point_labels is not None and (point_labels == 2).any():
            corners = point_coords[:, :2]
            boxes = torch.cat((corners[:, 0], corners[:, 1]), dim=1)
        outputs = []
        for radius in self.radii:
            if boxes is not None:
                b = boxes.view(m, 4, 1, 1)
                inside = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])
            else:
                px = point_coords[..., 0].view(m, -1, 1, 1)
                py = point_coords[..., 1].view(m, -1, 1, 1)
                square = ((xs[:, None] - px).abs() <= radius) & ((ys[:, None] - py).abs() <= radius)
                pos = (square & (point_labels == 1).view(m, -1, 1, 1)).any(1)
                neg = (square & (point_labels == 0).view(m, -1, 1, 1)).any(1)
                inside = pos & ~neg
            outputs.append(torch.where(inside, 8.0, -8.0))
        logits = torch.stack(outputs, dim=1)
        iou = torch.tensor(self.iou).expand(m, -1).clone()
        if return_all_tokens:
            return logits, iou
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return logits[:, sel], iou[:, sel]


def write_label_folder(root: Path, labels: list[np.ndarray]) -> tuple[Path, Path]:
    """An image folder and a mask folder: ``img<i>.png`` grey images and uint16 label maps ``img<i>.png``."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        grey = np.where(label > 0, 60 + 40 * (label % 5), 10).astype(np.uint8)
        cv2.imwrite(str(images / f"img{i}.png"), grey)
        cv2.imwrite(str(masks / f"img{i}.png"), label.astype(np.uint16))
    return images, masks


def rectangles(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A label map with rectangle k+1 at ``(row0, col0, row1, col1)`` (inclusive)."""
    label = np.zeros(shape, np.uint16)
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        label[r0:r1 + 1, c0:c1 + 1] = k + 1
    return label


@pytest.fixture
def label_folder(tmp_path: Path) -> tuple[Path, Path]:
    """Two non-square images (40 x 56, 48 x 32) with 3 and 2 rectangles."""
    return write_label_folder(tmp_path / "rects", [
        rectangles((40, 56), [(2, 3, 12, 20), (20, 30, 35, 50), (25, 2, 38, 12)]),
        rectangles((48, 32), [(4, 4, 20, 25), (30, 10, 44, 28)]),
    ])


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """A COCO file with one image (40 x 56): a polygon and an RLE annotation."""
    root = tmp_path / "coco"
    root.mkdir()
    cv2.imwrite(str(root / "a.png"), np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    blob = np.zeros((40, 56), bool)
    blob[20:36, 30:50] = True
    rle = mask_utils.encode(np.asfortranarray(blob.astype(np.uint8)))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 56}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [[3, 2, 20, 2, 20, 12, 3, 12]]},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "instances.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Random ``sam_tiny`` weights in the official file layout."""
    from samtune.build import build_sam
    from samtune.checkpoints import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(build_sam("sam_tiny"), tmp_path_factory.mktemp("weights") / "sam_tiny.pth")
