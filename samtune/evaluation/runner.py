"""Evaluate a model on a dataset: load batches, encode images, run the protocols, summarise.

The dataset must be built for evaluation at the model's input convention (:func:`dataset_options` gives the
keyword arguments for any :class:`samtune.data.SegmentationDataset`): validation mode (deterministic, no
augmentation), the model's ``image_size`` and ``normalization``, every mask of each image, and the masks at the
image's resolution when IoUs are computed there.

Masks that the resize to the model input erases (tiny instances) are evaluated at the original resolution, where
their prompts are computed; at the input resolution they cannot be prompted and are dropped. The report counts
both (``info["masks_empty_at_input"]``, ``info["dropped_masks"]``) and a warning says how many were dropped.
A dataset built with ``on_error="skip"`` hands the next valid sample in place of a bad one; such a repeat is
evaluated once only (``info["skipped_samples"]``, ``info["repeated_samples"]``). Void pixels that samples carry
(``"ignore_mask"``, e.g. a mask folder's ``ignore_values``) are left out of every IoU and never receive a click.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from samtune.evaluation.protocols import ImageTarget, ProtocolConfig, ProtocolRunner
from samtune.evaluation.report import EvaluationReport, safe_name, summarize
from samtune.modeling.precision import Precision, autocast, resolve_precision

__all__ = ["ALL_MASKS", "dataset_options", "evaluate", "check_dataset"]

ALL_MASKS = 2**31 - 1  # max_masks_per_image meaning "every mask"


def dataset_options(model: Any, config: ProtocolConfig, max_masks_per_image: int | None = None) -> dict[str, Any]:
    """Keyword arguments that make any samtune dataset an evaluation dataset for ``model``.

    Args:
        model: the model (``image_size``, ``normalization``, ``resize_interpolation``).
        config: the protocols (``iou_resolution`` decides whether original-resolution masks are returned).
        max_masks_per_image: evaluate a seeded subset of at most this many masks per image (None: all).

    Returns:
        ``image_size``, ``normalization``, ``resize_interpolation``, ``train=False``, ``max_masks_per_image``,
        ``return_original_masks``.
    """
    if max_masks_per_image is not None and max_masks_per_image <= 0:
        raise ValueError(f"max_masks_per_image must be positive, got {max_masks_per_image}")
    return {
        "image_size": int(model.image_size),
        "normalization": str(model.normalization),
        "resize_interpolation": str(model.resize_interpolation),
        "train": False,
        "max_masks_per_image": ALL_MASKS if max_masks_per_image is None else int(max_masks_per_image),
        "return_original_masks": config.iou_resolution == "original",
    }


def check_dataset(dataset: Any, model: Any, config: ProtocolConfig) -> None:
    """Raise a clear error when ``dataset`` was not built for evaluating ``model`` (see :func:`dataset_options`)."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    name = type(base).__name__
    problems = []
    if getattr(base, "train", False):
        problems.append("train=True (evaluation needs the deterministic validation mode, train=False)")
    for key in ("image_size", "normalization", "resize_interpolation"):
        have, want = getattr(base, key, None), getattr(model, key)
        if have is not None and have != want:
            problems.append(f"{key}={have!r} but the model expects {want!r}")
    if config.iou_resolution == "original" and not getattr(base, "return_original_masks", True):
        problems.append("return_original_masks=False but iou_resolution='original' needs the original masks")
    if problems:
        raise ValueError(f"{name} is not set up for evaluation: {'; '.join(problems)} "
                         "(build it with samtune.evaluation.dataset_options(model, config))")


def _collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    return torch.stack([s["image"] for s in samples]), samples


class _Indexed(Dataset):
    """Yields ``(index, sample)`` so each sample keeps its dataset index (the jitter seed)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["_index"] = index
        return sample


def _sample_key(sample: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a sample's content: image id, instance ids, mask areas, input size and image sum (the tiles
    of one image, or the parts of a crowded tile, differ in these; a repeated sample does not)."""
    ids = torch.as_tensor(sample["instance_ids"]).flatten().tolist()
    ids += torch.as_tensor(sample.get("vanished_instance_ids", ())).flatten().tolist()
    areas = sample["masks"].flatten(1).sum(1).tolist()
    size = torch.as_tensor(sample["input_size"]).tolist()
    return str(sample["image_id"]), tuple(ids), tuple(areas), tuple(size), float(sample["image"].double().sum())


def _first_visits(samples: list[dict[str, Any]], seen: set[tuple[Any, ...]]) -> list[int]:
    """Positions of the samples not evaluated before; ``seen`` is updated.

    A dataset with ``on_error="skip"`` returns the next valid sample in place of a bad one, which is then loaded
    again under its own index: scored twice, its masks would weigh double in every mean.
    """
    fresh = []
    for j, s in enumerate(samples):
        key = _sample_key(s)
        if key not in seen:
            seen.add(key)
            fresh.append(j)
    return fresh


def _target(sample: dict[str, Any], config: ProtocolConfig, device: torch.device) -> tuple[ImageTarget, torch.Tensor]:
    """The sample's :class:`ImageTarget` and the instance ids of its masks, in target order."""
    h, w = (int(v) for v in sample["input_size"])
    ids = torch.as_tensor(sample["instance_ids"]).long()
    if config.iou_resolution == "original":
        if "original_masks" not in sample:
            raise KeyError("sample has no 'original_masks': build the dataset with return_original_masks=True")
        gt = sample["original_masks"]
        if "original_vanished_masks" in sample:  # empty at the model input, prompted and scored at this resolution
            gt = torch.cat((gt, sample["original_vanished_masks"]))
            ids = torch.cat((ids, torch.as_tensor(sample["vanished_instance_ids"]).long()))
        ignore = sample.get("original_ignore_mask")
    else:
        gt = sample["masks"][:, :h, :w]
        ignore = sample["ignore_mask"][:h, :w] if "ignore_mask" in sample else None
    if ignore is not None:
        ignore = ignore.to(device=device, dtype=torch.bool)
    target = ImageTarget(gt.to(device=device, dtype=torch.bool), (h, w), key=int(sample["_index"]), ignore=ignore)
    return target, ids


def evaluate(
    model: Any,
    dataset: Dataset,
    config: ProtocolConfig = ProtocolConfig(),
    *,
    name: str = "dataset",
    batch_size: int = 1,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: Precision = "fp32",
    max_images: int | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> EvaluationReport:
    """Run the protocols over a dataset and summarise them.

    Args:
        model: a :class:`samtune.modeling.Sam` (or anything with ``encode_image``, ``decode``, ``image_size``,
            ``normalization``); moved to ``device`` and put in eval mode.
        dataset: a samtune dataset built with :func:`dataset_options`.
        config: the protocols.
        name: the dataset's name in the report; it must keep a character usable in a file name (checked first,
            so that a name :func:`write_report` cannot use fails before the run, not after it).
        batch_size: images encoded per encoder call (all their masks are decoded together).
        num_workers: DataLoader worker processes.
        device: where the model runs (default: CUDA when available, else CPU).
        precision: ``"fp32"`` (default, reproducible), ``"bf16"`` or ``"auto"`` (autocast on encoder and decoder).
        max_images: evaluate only the first N samples (images, or tiles when the dataset has ``crop_size``).
        progress: show a progress bar on stderr.
        metadata: extra entries for the report (model name, checkpoint path, ...).

    Returns:
        The :class:`EvaluationReport`.
    """
    check_dataset(dataset, model, config)
    safe_name(name)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_images is not None:
        if max_images <= 0:
            raise ValueError(f"max_images must be positive, got {max_images}")
        dataset = Subset(dataset, range(min(max_images, len(dataset))))  # type: ignore[arg-type]
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"dataset {name!r} has no samples to evaluate")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(precision, device)
    model = model.to(device).eval()
    runner = ProtocolRunner(config)
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    columns: dict[str, list[torch.Tensor]] = {}
    image_ids: list[str] = []
    instance_ids: list[torch.Tensor] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dataset), unit="img", desc=f"evaluate {name}", file=sys.stderr,  # type: ignore[arg-type]
                   dynamic_ncols=True)
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    # Only a dataset that skips bad samples hands in substitutes (samtune datasets with on_error="raise" never do):
    # the content keys, a pass over every image, are computed only then.
    may_repeat = getattr(base, "on_error", "skip") != "raise"
    start = time.perf_counter()
    num_images = vanished = repeated = 0
    seen: set[tuple[Any, ...]] = set()
    try:
        with torch.inference_mode():
            for images, samples in loader:
                fresh = _first_visits(samples, seen) if may_repeat else range(len(samples))
                if len(fresh) < len(samples):  # on_error="skip" gave the next sample in place of a bad one
                    repeated += len(samples) - len(fresh)
                    if bar is not None:
                        bar.update(len(samples) - len(fresh))
                    if not fresh:
                        continue
                    images, samples = images[fresh], [samples[j] for j in fresh]
                targets, ids = zip(*(_target(s, config, device) for s in samples))
                vanished += sum(len(s.get("vanished_instance_ids", ())) for s in samples)
                with autocast(device, precision):
                    embeddings = model.encode_image(images.to(device, non_blocking=True))
                    result = runner(model, embeddings, targets)
                for key, value in result.items():
                    columns.setdefault(key, []).append(value.float().cpu())
                for s, t, i in zip(samples, targets, ids):
                    image_ids.extend([str(s["image_id"])] * t.gt.shape[0])
                    instance_ids.append(i)
                num_images += len(samples)
                if bar is not None:
                    bar.set_postfix(masks=len(image_ids), refresh=False)
                    bar.update(len(samples))
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    per_mask: dict[str, Any] = {"image_id": image_ids, "instance_id": torch.cat(instance_ids)}
    per_mask.update({k: torch.cat(v) for k, v in columns.items()})
    if vanished and config.iou_resolution == "input":
        warnings.warn(
            f"{vanished} mask{'s' if vanished != 1 else ''} of {name!r} {'are' if vanished != 1 else 'is'} empty at "
            f"the model input ({int(model.image_size)} px) and {'were' if vanished != 1 else 'was'} not evaluated "
            "(iou_resolution='input' has no pixel to prompt them at; 'original' scores them)",
            stacklevel=2,
        )
    info = {
        "device": str(device),
        "precision": precision,
        "batch_size": batch_size,
        "image_size": int(model.image_size),
        "skipped_samples": int(getattr(base, "num_skipped", 0)),
        "repeated_samples": repeated,  # substitutes for skipped ones, evaluated once only
        "masks_empty_at_input": vanished,  # non-empty masks erased by the resize to the model input
        "dropped_masks": 0 if config.iou_resolution == "original" else vanished,  # of them, not evaluated
        **({"crop_size": int(base.crop_size)} if getattr(base, "crop_size", None) else {}),  # samples are tiles
        **(metadata or {}),
    }
    return EvaluationReport(
        name=name,
        config=config,
        num_images=num_images,
        num_masks=len(image_ids),
        wall_time_s=wall,
        metrics=summarize(per_mask, config),
        per_mask=per_mask,
        info=info,
    )
