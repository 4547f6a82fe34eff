"""Batching samples with different mask counts, and DataLoader worker seeding."""
from __future__ import annotations

import functools
import os
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch


def collate_samples(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, padding the mask dimension to the largest count in the batch.

    Args:
        samples: dicts from a ``SegmentationDataset`` (see ``samtune.data.base``).

    Returns:
        ``"images"`` ``[B, 3, S, S]`` float32 and the targets of :func:`collate_targets`.
    """
    if not samples:
        raise ValueError("collate_samples needs at least one sample")
    return {"images": torch.stack([s["image"] for s in samples]), **collate_targets(samples)}


def collate_targets(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The targets of a batch (all but the images), for :func:`collate_samples` and the cached-embedding batches.

    Returns:
        ``"masks"`` ``[B, Kmax, S, S]`` bool, ``"boxes"`` ``[B, Kmax, 4]`` float32, ``"mask_valid"`` ``[B, Kmax]``
        bool, ``"instance_ids"`` ``[B, Kmax]`` int64 (-1 in padding), ``"original_size"`` / ``"input_size"``
        ``[B, 2]`` int64, ``"image_id"`` list of B str, when the samples carry them ``"original_masks"`` as a list
        of B ``[K_b, H_b, W_b]`` bool tensors, and when some validation sample carries void pixels (``"ignore_mask"``,
        e.g. a mask folder's ``ignore_values``) ``"ignore_mask"`` ``[B, S, S]`` bool, all False for the others.
        ``Kmax >= 1`` always (an all-padding slot when every sample has no mask).
    """
    batch = len(samples)
    size = samples[0]["masks"].shape[-1]
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
    if any("ignore_mask" in s for s in samples):
        ignore = torch.zeros(batch, size, size, dtype=torch.bool)
        for b, sample in enumerate(samples):
            if "ignore_mask" in sample:
                ignore[b] = sample["ignore_mask"]
        out["ignore_mask"] = ignore
    return out


# The rank a DataLoader worker's loader was built for (set in the worker by seed_worker; None elsewhere).
_worker_rank: int | None = None


def global_rank() -> int:
    """This process's global rank in distributed training, 0 outside it.

    In a DataLoader worker, the rank its loader was built for (:func:`worker_init`): a worker's
    ``torch.distributed`` is not initialised, forked or spawned, and launchers such as Lightning's DDP do not set
    ``RANK``. Elsewhere ``torch.distributed``'s rank when it is initialised, else the ``RANK`` environment variable
    (set by ``torchrun`` and other launchers), else 0.
    """
    if _worker_rank is not None:
        return _worker_rank
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    try:
        return int(os.environ.get("RANK", 0))
    except ValueError:
        return 0


def seed_worker(worker_id: int, rank: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's global generators from the worker's torch seed.

    Datasets draw from their own generators (see ``samtune.data.base``); this covers user code that uses the
    global ones (e.g. custom albumentations transforms). Like Lightning's own worker init, which this replaces,
    it mixes in the distributed :func:`global_rank`, so DDP processes seeded alike do not draw alike: on ranks
    other than 0 the worker's torch generator is re-seeded with the rank folded in (rank 0 keeps DataLoader's
    seed, as without DDP).

    Args:
        worker_id: DataLoader's worker index.
        rank: the global rank of the process that built the loader; from then on :func:`global_rank` returns it
            in this worker. Bind it with :func:`worker_init` (the worker cannot find it itself).
    """
    global _worker_rank
    if rank is not None:
        _worker_rank = int(rank)
    seed = torch.initial_seed()
    rank = global_rank()
    if rank:
        seed = int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, np.uint64)[0])
        torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed % 2**32)


def worker_init() -> Callable[[int], None]:
    """The ``worker_init_fn`` for a DataLoader built now: :func:`seed_worker` bound to this process's
    :func:`global_rank`, which its workers then report (picklable, for spawned workers too)."""
    return functools.partial(seed_worker, rank=global_rank())
