"""Batching samples with different mask counts, and DataLoader worker seeding."""
from __future__ import annotations

import random
from typing import Any, Sequence

import numpy as np
import torch


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, padding the mask dimension to the largest count in the batch.

    Args:
        samples: dicts from a ``SegmentationDataset`` (see ``samtune.data.base``).

    Returns:
        ``"images"`` ``[B, 3, S, S]`` float32, ``"masks"`` ``[B, Kmax, S, S]`` bool, ``"boxes"`` ``[B, Kmax, 4]``
        float32, ``"mask_valid"`` ``[B, Kmax]`` bool, ``"instance_ids"`` ``[B, Kmax]`` int64 (-1 in padding),
        ``"original_size"`` / ``"input_size"`` ``[B, 2]`` int64, ``"image_id"`` list of B str, and, when the
        samples carry them, ``"original_masks"`` as a list of B ``[K_b, H_b, W_b]`` bool tensors.
        ``Kmax >= 1`` always (an all-padding slot when every sample has no mask).
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    batch = len(samples)
    size = samples[0]["image"].shape[-1]
    counts = [int(s["masks"].shape[0]) for s in samples]
    kmax = max(1, max(counts))
    masks = torch.zeros(batch, kmax, size, size, dtype=torch.bool)
    boxes = torch.zeros(batch, kmax, 4, dtype=torch.float32)
    valid = torch.zeros(batch, kmax, dtype=torch.bool)
    ids = torch.full((batch, kmax), -1, dtype=torch.int64)
    for b, (sample, count) in enumerate(zip(samples, counts)):  # one slice copy per sample
        masks[b, :count] = sample["masks"]
        boxes[b, :count] = sample["boxes"]
        valid[b, :count] = True
        ids[b, :count] = sample["instance_ids"]
    out: dict[str, Any] = {
        "images": torch.stack([s["image"] for s in samples]),
        "masks": masks,
        "boxes": boxes,
        "mask_valid": valid,
        "instance_ids": ids,
        "original_size": torch.stack([s["original_size"] for s in samples]),
        "input_size": torch.stack([s["input_size"] for s in samples]),
        "image_id": [s["image_id"] for s in samples],
    }
    if all("original_masks" in s for s in samples):
        out["original_masks"] = [s["original_masks"] for s in samples]
    return out


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's global generators from the worker's torch seed.

    Datasets draw from their own generators (see ``samtune.data.base``); this covers user code that uses the
    global ones (e.g. custom albumentations transforms).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
