"""Training on cached image embeddings: decoder-only fine-tuning without running the frozen image encoder.

:class:`CachedEmbeddingDataModule` wraps a format datamodule (:class:`~samtune.data.datamodules.MaskFolderDataModule`,
``COCODataModule``, ``SA1BDataModule``). In ``setup`` it runs the frozen image encoder once over every image and
stores the embeddings (:class:`samtune.adapt.cache.EmbeddingCache`); its batches then carry
``"image_embeddings"`` ``[B, C, h, w]`` and the task decodes from them instead of encoding ``"images"``.

Augmentation: the embedding is that of one fixed input image, so the datamodule's random augmentation (flips,
colour, large-scale jitter, user pipelines) and random crops cannot be applied and are rejected. Two options:

* no augmentation (``views: [identity]``, the default): exact; every epoch sees the same images (masks and
  prompts are still sampled anew);
* ``views``: a fixed set of dihedral transforms (flips, 90-degree rotations, transposes) of the resized image,
  each encoded once (disk and fill time grow with the number of views); each training sample draws one view
  at random, and its masks, boxes and sizes are transformed identically. Validation always uses ``identity``.

Training batches hold no ``"images"`` (``keep_images: true`` keeps them); validation batches keep them (for the
overlay callbacks). Embeddings are computed in float32 on the trainer's device (or ``device``); cached
training then matches training with the live frozen encoder up to batching round-off (tested: loss within
1e-5). The task checks at every step that the cache was computed by its own encoder weights
(:func:`samtune.adapt.cache.check_cached_embeddings`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from samtune.adapt.cache import (
    CacheConfig,
    CacheError,
    EmbeddingCache,
    FileIdentity,
    StorageDtype,
    Verify,
    encoder_fingerprint,
    file_identity,
    memoized_encoder_fingerprint,
    require_frozen_encoder,
)
from samtune.data.base import SegmentationDataset
from samtune.data.collate import collate_targets, worker_init
from samtune.data.datamodules import SegmentationDataModule, exact_eval_sampler, keeps_full_batches
from samtune.data.errors import SampleError
from samtune.data.masks import masks_to_boxes
from samtune.data.transforms import resize_longest, to_model_input

__all__ = [
    "CachedEmbeddingDataModule",
    "CachedEmbeddingDataset",
    "VIEWS",
    "View",
    "apply_view",
    "collate_cached",
    "fill_cache",
    "preprocessing_spec",
    "view_sample",
]

logger = logging.getLogger("samtune.data")

# Bump when samtune.data's image reading, band selection or intensity code changes what a file turns into
# (the resize filter and normalisation are covered by a probe hash, see ``preprocessing_spec``).
PIPELINE_VERSION = 3  # 2: EXIF orientation applied; 3: also from a PNG eXIf chunk after the pixel data

View = Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"]
VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose")
_SWAPS_AXES = frozenset({"rot90", "rot270", "transpose", "antitranspose"})


# --------------------------------------------------------------------------------------------------- views
def apply_view(x: torch.Tensor, view: str) -> torch.Tensor:
    """One of the 8 symmetries of the square on the last two axes.

    Args:
        x: ``[..., h, w]``.
        view: ``identity``, ``hflip`` (left-right), ``vflip`` (up-down), ``rot90`` / ``rot180`` / ``rot270``
            (counter-clockwise, as ``np.rot90``), ``transpose`` (swap rows and columns), ``antitranspose``.

    Returns:
        ``[..., h, w]``, or ``[..., w, h]`` for the axis-swapping views (contiguous).
    """
    if view == "identity":
        return x
    if view == "hflip":
        out = x.flip(-1)
    elif view == "vflip":
        out = x.flip(-2)
    elif view in ("rot90", "rot180", "rot270"):
        out = torch.rot90(x, {"rot90": 1, "rot180": 2, "rot270": 3}[view], dims=(-2, -1))
    elif view == "transpose":
        out = x.transpose(-2, -1)
    elif view == "antitranspose":
        out = torch.rot90(x, 2, dims=(-2, -1)).transpose(-2, -1)
    else:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    return out.contiguous()


def view_sample(sample: dict[str, Any], view: str, image_size: int) -> dict[str, Any]:
    """A sample seen through ``view``: image content, masks, boxes and sizes transformed together.

    The view acts on the resized, un-padded content (``input_size``), which is then padded bottom/right again,
    exactly as the datasets' augmentation does before normalising and padding (per-channel normalisation and
    min-max scaling commute with these pixel permutations).

    Args:
        sample: a :class:`~samtune.data.base.SegmentationDataset` sample (``"image"`` ``[3, S, S]`` optional,
            ``"masks"`` ``[K, S, S]``, ``"input_size"``, ``"original_size"``, ...).
        view: see :func:`apply_view`.
        image_size: S.

    Returns:
        A new sample dict (``"original_masks"``, a validation-only key, is not transformed and is rejected).
    """
    if view == "identity":
        return sample
    if "original_masks" in sample:
        raise ValueError("views apply to training samples only (this sample carries original_masks)")
    h, w = (int(v) for v in sample["input_size"])
    out = dict(sample)
    masks = apply_view(sample["masks"][:, :h, :w], view)
    nh, nw = masks.shape[-2:]
    padded = torch.zeros(masks.shape[0], image_size, image_size, dtype=torch.bool)
    padded[:, :nh, :nw] = masks
    out["masks"] = padded
    out["boxes"] = masks_to_boxes(masks)
    out["input_size"] = torch.tensor([nh, nw], dtype=torch.int64)
    if view in _SWAPS_AXES:
        out["original_size"] = sample["original_size"].flip(0).clone()
    if "ignore_mask" in sample:
        ignore = torch.zeros(image_size, image_size, dtype=torch.bool)
        ignore[:nh, :nw] = apply_view(sample["ignore_mask"][:h, :w], view)
        out["ignore_mask"] = ignore
    if "image" in sample:
        content = apply_view(sample["image"][:, :h, :w], view)
        image = torch.zeros(content.shape[0], image_size, image_size, dtype=content.dtype)
        image[:, :nh, :nw] = content
        out["image"] = image
    return out


# --------------------------------------------------------------------------------------------------- keys
def _probe_hash(image_size: int, normalization: str, interpolation: str) -> str:
    """SHA-256 of the resize + normalise + pad stage on two fixed probe images (one enlarged, one shrunk).

    Any change of the resize filter or of the normalisation code changes it, and with it the cache keys.
    """
    rng = np.random.default_rng(0)
    digest = hashlib.sha256()
    for shape in ((13, 21), (image_size + 7, image_size // 2 + 3)):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        ones = np.ones((1, *shape), np.uint8)
        resized, masks = resize_longest(image, ones, image_size, interpolation)  # type: ignore[arg-type]
        tensor, _ = to_model_input(resized, masks, image_size, normalization)  # type: ignore[arg-type]
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:32]


def preprocessing_spec(dataset: SegmentationDataset) -> dict[str, Any]:
    """What the data layer does to an image file before the encoder sees it (part of every cache key).

    Shared by the training and validation datasets of one cache; their ``region`` goes into each entry's key
    instead (see :meth:`CachedEmbeddingDataset.keys`).

    Args:
        dataset: the dataset whose samples are cached.

    Returns:
        A JSON-able dict: input size, normalisation, a probe hash of the resize filter + normalisation code,
        band selection, intensity preset with its percentiles / window, and :data:`PIPELINE_VERSION`.

    Raises:
        ValueError: the dataset augments or crops at random (a cached embedding cannot follow).
    """
    augmenter = getattr(dataset, "augmenter", None)
    if augmenter is not None and augmenter.active:
        raise ValueError(
            "cached embeddings need un-augmented images: the training dataset has random augmentation "
            "(augmentation / augmentation_pipeline); set `augmentation: none` on the wrapped datamodule and use "
            "the cached datamodule's `views` (precomputed flips / rotations) instead"
        )
    if dataset.crop_size is not None:
        raise ValueError(
            f"cached embeddings need whole images: crop_size={dataset.crop_size} takes random crops (training) or "
            "tiles (validation); leave crop_size unset on the wrapped datamodule, or tile the images on disk"
        )
    return {
        "pipeline_version": PIPELINE_VERSION,
        "image_size": int(dataset.image_size),
        "normalization": dataset.normalization,
        "resize_interpolation": dataset.resize_interpolation,
        "resize_normalize_probe": _probe_hash(dataset.image_size, dataset.normalization, dataset.resize_interpolation),
        "bands": list(dataset.bands) if dataset.bands is not None else None,
        "intensity": dataset.intensity,
        "percentiles": [float(v) for v in dataset.percentiles],
        "window": [float(v) for v in dataset.window] if dataset.window is not None else None,
    }


# --------------------------------------------------------------------------------------------------- dataset
class CachedEmbeddingDataset(Dataset):
    """A :class:`SegmentationDataset` whose samples carry the cached embedding of their image.

    Samples: those of ``dataset`` (masks, boxes, sizes, ids; through the chosen view) plus ``"image_embedding"``
    ``[C, h, w]`` float32 and ``"embedding_fingerprint"`` (the encoder's hash); ``"image"`` only with
    ``keep_images``. Bad samples follow ``dataset.on_error``; cache problems (a missing or damaged file) always
    raise :class:`samtune.adapt.cache.CacheError` naming the file.

    Args:
        dataset: the wrapped dataset (no random augmentation or crops).
        cache: the embedding cache (its preprocessing must be ``dataset``'s).
        views: views cached per image; a training sample draws one at random, validation uses the first.
        keep_images: keep ``"image"`` ``[3, S, S]`` in the samples.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        cache: EmbeddingCache,
        views: Sequence[str] = ("identity",),
        keep_images: bool = False,
    ) -> None:
        spec = preprocessing_spec(dataset)
        if dict(cache.config.preprocessing) != spec:
            raise ValueError(
                f"the cache {cache.directory} was configured for preprocessing {dict(cache.config.preprocessing)} "
                f"but the dataset does {spec}"
            )
        self.views = _check_views(views)
        self.dataset = dataset
        self.cache = cache
        self.keep_images = keep_images
        self.fingerprint = cache.config.encoder_fingerprint

    def __len__(self) -> int:
        return len(self.dataset)

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index``."""
        return self.dataset._image_path(self.dataset._index[index][0])

    def keys(self, index: int) -> dict[str, str]:
        """Cache key of sample ``index`` for each view.

        The key names the image file and the dataset's ``region``: the train and validation regions of one
        raster are different encoder inputs, and the preprocessing spec (which the two datasets share) does not
        hold the region. Crops and tiles never reach the cache (``preprocessing_spec`` rejects ``crop_size``).
        Keys of whole images (no region) are those of the file identity alone.
        """
        identity = file_identity(self.image_path(index), self.cache.config.file_identity)
        if self.dataset.region is not None:
            identity += "|region=" + ",".join(str(int(v)) for v in self.dataset.region)
        return {view: self.cache.key(identity, view) for view in self.views}

    def _pick_view(self, index: int) -> str:
        if len(self.views) == 1 or not self.dataset.train:
            return self.views[0]
        return self.views[int(self.dataset._rng(index).integers(len(self.views)))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ds = self.dataset
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        current = index
        for _ in range(len(self)):  # the base class's skip loop, keeping track of which image was used
            try:
                sample = ds._get(current)
                view = self._pick_view(current)
                key = self.keys(current)[view]
                break
            except Exception as exc:  # noqa: BLE001 - bad samples follow on_error, as in the base class
                ds._handle(ds._as_sample_error(exc, current))
            current = (current + 1) % len(self)
        else:
            raise SampleError(self.image_path(index).parent, "no valid sample in the whole dataset")
        embedding = self.cache.load(key, source=f"{self.image_path(current)} (view {view})")
        sample = view_sample(sample, view, ds.image_size)
        if not self.keep_images:
            sample.pop("image", None)
        sample["image_embedding"] = embedding
        sample["embedding_fingerprint"] = self.fingerprint
        return sample


def _check_views(views: Sequence[str]) -> tuple[str, ...]:
    views = tuple(views)
    if not views:
        raise ValueError("views must name at least one view (e.g. [identity])")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; expected some of {VIEWS}")
    if len(set(views)) != len(views):
        raise ValueError(f"views must not repeat, got {list(views)}")
    return views


def collate_cached(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`CachedEmbeddingDataset` samples.

    Returns:
        The targets of :func:`samtune.data.collate.collate_targets`, ``"images"`` when every sample has one, plus
        ``"image_embeddings"`` ``[B, C, h, w]`` float32 and ``"embedding_fingerprint"`` (one str).
    """
    if not samples:
        raise ValueError("collate_cached needs at least one sample")
    fingerprints = {s["embedding_fingerprint"] for s in samples}
    if len(fingerprints) != 1:
        raise ValueError(f"samples of one batch come from caches of different encoders: {sorted(fingerprints)}")
    out: dict[str, Any] = {
        "image_embeddings": torch.stack([s["image_embedding"] for s in samples]),
        "embedding_fingerprint": fingerprints.pop(),
        **collate_targets(samples),
    }
    if all("image" in s for s in samples):
        out["images"] = torch.stack([s["image"] for s in samples])
    return out


# --------------------------------------------------------------------------------------------------- filling
class _FillItems(Dataset):
    """For image ``order[j]``: ``(key, view image [3, S, S], metadata)`` of each view not yet (validly) cached."""

    def __init__(self, cached: CachedEmbeddingDataset, order: Sequence[int], verify: Verify) -> None:
        self.cached = cached
        self.order = list(order)
        self.verify = verify

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> list[tuple[str, torch.Tensor, dict[str, str]]]:
        cached, index = self.cached, self.order[j]
        ds = cached.dataset
        try:
            keys = cached.keys(index)
            missing = [view for view, key in keys.items() if not cached.cache.contains(key, self.verify)]
            if not missing:
                return []
            sample = _image_sample(ds, index)
        except CacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bad image follows on_error, as when training
            ds._handle(ds._as_sample_error(exc, index))
            return []
        path = str(cached.image_path(index))
        return [
            (keys[view], view_sample(sample, view, ds.image_size)["image"],
             {"image": path, "image_id": str(sample["image_id"]), "view": view})
            for view in missing
        ]


def _image_sample(ds: SegmentationDataset, index: int) -> dict[str, Any]:
    """Sample ``index`` of ``ds``, for its image. A training sample draws its masks at random and fails when all the
    drawn masks vanish at the input size, although another draw of the same image (in training) succeeds and then
    needs the embedding; the image does not depend on the draw, so such an image is read again with every mask."""
    try:
        return ds._get(index)
    except SampleError:
        if not ds.train:
            raise
    every_mask = copy.copy(ds)
    every_mask.max_masks_per_image = sys.maxsize
    return every_mask._get(index)


@contextlib.contextmanager
def _global_random_state_kept(device: torch.device) -> Iterator[None]:
    """Run a block, then restore torch's CPU generator (and ``device``'s when it is a GPU), NumPy's global
    generator and Python's ``random`` to their state before it."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def fill_cache(
    cached: CachedEmbeddingDataset,
    encoder: torch.nn.Module,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    verify: Verify = "header",
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """Compute and store every missing embedding of a dataset (all its views).

    Safe to run in several processes at once on one cache (DDP ranks): each starts at a different offset
    (``rank / world_size`` of the way through), skips what is already on disk and writes atomically, so the
    processes share the work and each ends with a complete cache.

    Args:
        cached: the dataset and cache to fill.
        encoder: the frozen image encoder, in eval mode, on ``device``.
        batch_size: images per encoder call.
        device: where the encoder runs (default: its parameters' device).
        num_workers: DataLoader workers reading and preprocessing images.
        verify: how existing files are checked (``"header"`` or ``"full"``; damaged ones are recomputed with a
            warning).
        rank, world_size: this process and the number of processes filling at once.

    Returns:
        Number of embeddings computed by this call.

    The global random state (torch's CPU and fill-device generators, NumPy's and Python's) is left as it was:
    a run draws the same training samples whether its cache was cold (reading samples here draws from torch's
    generator, see :mod:`samtune.data.base`) or warm.
    """
    if not 0 <= rank < max(world_size, 1):
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    n = len(cached)
    start = (rank * n) // max(world_size, 1)
    order = list(range(start, n)) + list(range(start))
    if device is None:
        device = next(encoder.parameters()).device
    with _global_random_state_kept(torch.device(device)):
        loader = DataLoader(_FillItems(cached, order, verify), batch_size=None, shuffle=False,
                            num_workers=num_workers)
        items = (item for entries in loader for item in entries)
        computed = cached.cache.encode_and_store(encoder, items, batch_size=batch_size, device=device)
    logger.info("embedding cache %s: computed %d embeddings for %d images x %d views", cached.cache.directory,
                computed, n, len(cached.views))
    return computed


# --------------------------------------------------------------------------------------------------- datamodule
class CachedEmbeddingDataModule(L.LightningDataModule):
    """Batches of cached image embeddings for training with a frozen image encoder (decoder-only fine-tuning).

    In ``setup`` the image encoder runs once over every image of ``data`` (train: every view; validation:
    ``identity``) and the embeddings are stored under ``cache_dir`` (see :mod:`samtune.adapt.cache`: one
    safetensors file per image and view, keyed by the image file and the dataset's ``region``, the
    preprocessing and the encoder weights; later runs reuse them). Its loaders yield ``data``'s batches with
    ``"image_embeddings"`` ``[B, C, h, w]`` (and without ``"images"`` in training unless ``keep_images``); the
    task decodes from them and never runs the encoder, which must be frozen (checked here when a Trainer's task
    is attached, and by the task at every step, together with the encoder hash).

    No random augmentation (see the module docstring): ``data`` must have ``augmentation: none``, no
    ``augmentation_pipeline`` and no ``crop_size``; ``views`` gives flips / rotations instead.

    Args:
        data: the datamodule reading images and masks (MaskFolderDataModule, COCODataModule, SA1BDataModule);
            its batch size, workers and pinning are used. Its ``image_size``, ``normalization`` and
            ``resize_interpolation`` must be the model's (checked in ``setup``).
        cache_dir: folder of the cache (shared by runs and configurations; safe for concurrent processes).
        model: registry name of the model whose image encoder computes the embeddings, with ``checkpoint``.
            None (default): the attached task's own image encoder (the embeddings are then computed with
            exactly the task's weights; needs a Trainer).
        checkpoint: weights of ``model``.
        storage_dtype: ``float32`` (default, exact), ``float16`` or ``bfloat16`` (half the disk; see
            :mod:`samtune.adapt.cache` for the error).
        views: the views cached per training image (default ``[identity]``: no augmentation); see
            :func:`apply_view`.
        file_identity: ``content`` (hash of the file bytes, default) or ``stat`` (path + size + mtime).
        verify: check of existing files in ``setup``: ``header`` (cheap) or ``full`` (reads and hashes every
            file; damaged files are recomputed with a warning). Loading always checks fully.
        encode_batch_size: images per encoder call while filling.
        device: where the encoder runs while filling (default: the trainer's device, else CUDA when available).
        keep_images: also keep ``"images"`` in training batches (host memory and transfer).
    """

    def __init__(
        self,
        data: SegmentationDataModule,
        cache_dir: str,
        model: str | None = None,
        checkpoint: str | None = None,
        storage_dtype: StorageDtype = "float32",
        views: list[View] | None = None,
        file_identity: FileIdentity = "content",
        verify: Verify = "header",
        encode_batch_size: int = 8,
        device: str | None = None,
        keep_images: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(data, SegmentationDataModule):
            raise TypeError(
                f"data must be a samtune SegmentationDataModule (MaskFolderDataModule, COCODataModule, "
                f"SA1BDataModule), got {type(data).__name__}"
            )
        if checkpoint is not None and model is None:
            raise ValueError("checkpoint is given without model: name the registry model it belongs to")
        if encode_batch_size <= 0:
            raise ValueError(f"encode_batch_size must be positive, got {encode_batch_size}")
        if storage_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"storage_dtype must be float32, float16 or bfloat16, got {storage_dtype!r}")
        if file_identity not in ("content", "stat"):
            raise ValueError(f"file_identity must be 'content' or 'stat', got {file_identity!r}")
        if verify not in ("header", "full"):
            raise ValueError(f"verify must be 'header' or 'full', got {verify!r}")
        self.data = data
        self.cache_dir = Path(cache_dir)
        self.model_name = model
        self.checkpoint = checkpoint
        self.storage_dtype = storage_dtype
        self.views = _check_views(views or ("identity",))
        self.file_identity = file_identity
        self.verify = verify
        self.encode_batch_size = encode_batch_size
        self.device = device
        self.keep_images = keep_images
        self.cache: EmbeddingCache | None = None
        self.train_dataset: CachedEmbeddingDataset | None = None
        self.val_dataset: CachedEmbeddingDataset | None = None
        self._filled: set[str] = set()
        self._encoder: torch.nn.Module | None = None

    # ------------------------------------------------------------------------------ encoder
    def _task_model(self) -> torch.nn.Module | None:
        trainer = self.trainer
        task = trainer.lightning_module if trainer is not None else None
        return getattr(task, "model", None)

    def _source_encoder(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The encoder that computes the embeddings (on the CPU; copied to the fill device later) and the model it
        belongs to (whose ``image_size`` / ``normalization`` the data must match)."""
        task_model = self._task_model()
        task_encoder = getattr(task_model, "image_encoder", None)
        if self.model_name is None:
            if task_encoder is None:
                raise ValueError(
                    "CachedEmbeddingDataModule: `model` is unset, so the embeddings come from the task's image "
                    "encoder, but no Trainer with a PromptableSegmentationTask is attached; give `model` (and "
                    "`checkpoint`) to use it on its own"
                )
            require_frozen_encoder(task_encoder)
            return task_encoder, task_model
        from samtune.build import build_sam

        model = build_sam(self.model_name, self.checkpoint)
        encoder = model.image_encoder.requires_grad_(False).eval()
        if task_encoder is not None:
            require_frozen_encoder(task_encoder)
            if memoized_encoder_fingerprint(task_encoder) != encoder_fingerprint(encoder):
                raise ValueError(
                    f"CachedEmbeddingDataModule: the image encoder of model={self.model_name!r}, "
                    f"checkpoint={self.checkpoint!r} differs from the task's (different weights or architecture): "
                    "the cached embeddings would not be the task's. Give the task's model and checkpoint, or leave "
                    "`model` unset to use the task's own encoder"
                )
        return encoder, model

    def _check_model_input(self, spec: dict[str, Any], model: torch.nn.Module) -> None:
        """Raise ValueError unless the data is resized and normalised as ``model`` takes its input."""
        size, normalization = getattr(model, "image_size", None), getattr(model, "normalization", None)
        if size is None or normalization is None:
            return  # not a samtune Sam: nothing to compare with
        interpolation = getattr(model, "resize_interpolation", spec["resize_interpolation"])
        have = (spec["image_size"], spec["normalization"], spec["resize_interpolation"])
        if have != (int(size), normalization, interpolation):
            name = f"model {self.model_name!r}" if self.model_name is not None else "the task's model"
            raise ValueError(
                f"CachedEmbeddingDataModule: the data is prepared for image_size={spec['image_size']}, "
                f"normalization={spec['normalization']!r}, resize_interpolation={spec['resize_interpolation']!r}, "
                f"but the image encoder takes image_size={int(size)}, normalization={normalization!r}, "
                f"resize_interpolation={interpolation!r} ({name}); set image_size / normalization / "
                "resize_interpolation of the wrapped datamodule to the model's"
            )

    def _fill_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # ------------------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            self.data.setup(stage)
            train, val = self.data.train_dataset, self.data.val_dataset
            assert train is not None and val is not None
            spec = preprocessing_spec(train)
            if preprocessing_spec(val) != spec:
                raise ValueError("the training and validation datasets preprocess images differently")
            source, model = self._source_encoder()
            self._check_model_input(spec, model)
            config = CacheConfig(encoder_fingerprint(source), spec, self.storage_dtype, self.file_identity,
                                 model=self.model_name)
            self.cache = EmbeddingCache(self.cache_dir, config)
            self.train_dataset = CachedEmbeddingDataset(train, self.cache, self.views, self.keep_images)
            self.val_dataset = CachedEmbeddingDataset(val, self.cache, ("identity",), keep_images=True)
            self._encoder = source
        self._fill("val")
        if stage in (None, "fit"):
            self._fill("train")
        if self._filled == {"train", "val"}:
            self._encoder = None  # the source encoder (possibly the task's) is not needed any more

    def _fill(self, role: Literal["train", "val"]) -> None:
        if role in self._filled:
            return
        dataset = self.train_dataset if role == "train" else self.val_dataset
        assert dataset is not None and self._encoder is not None
        device = self._fill_device()
        encoder = copy.deepcopy(self._encoder).to(device).eval().requires_grad_(False)
        rank, world = self._rank()
        try:
            fill_cache(dataset, encoder, batch_size=self.encode_batch_size, device=device,
                       num_workers=self.data.num_workers, verify=self.verify, rank=rank, world_size=world)
        finally:
            del encoder
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self._filled.add(role)

    @property
    def num_skipped(self) -> int:
        """Bad samples skipped so far (see the wrapped datamodule)."""
        return self.data.num_skipped

    @property
    def input_mapping(self) -> dict[str, Any]:
        """The wrapped datamodule's :attr:`~samtune.data.datamodules.SegmentationDataModule.input_mapping`."""
        return self.data.input_mapping

    # ------------------------------------------------------------------------------ loaders
    def _loader(self, dataset: CachedEmbeddingDataset, shuffle: bool) -> DataLoader:
        data = self.data
        return DataLoader(
            dataset,
            batch_size=data.batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else exact_eval_sampler(dataset, self.trainer),
            num_workers=data.num_workers,
            pin_memory=data.pin_memory,
            collate_fn=collate_cached,
            worker_init_fn=worker_init(),
            persistent_workers=data.num_workers > 0,
            drop_last=shuffle and keeps_full_batches(len(dataset), data.batch_size, self.trainer),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.val_dataset is not None
        return self._loader(self.val_dataset, shuffle=False)
