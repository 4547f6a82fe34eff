"""The dataset base class shared by every format: sampling, cropping/tiling, transforms, errors, the sample dict.

Sample contract (``SegmentationDataset.__getitem__``), with ``S`` the model input size:

* ``"image"``: float32 ``[3, S, S]``; longest side resized to S (``get_preprocess_shape`` rounding), normalised
  per ``normalization`` on the un-padded content, then zero-padded bottom/right.
* ``"masks"``: bool ``[K, S, S]`` aligned with the image, False in the padding; K >= 1 (samples without a usable
  mask raise :class:`SampleError` or are skipped, see ``on_error``).
* ``"boxes"``: float32 ``[K, 4]`` tight ``(x1, y1, x2, y2)`` in model-input pixels, *inclusive* pixel indices
  (x2 = last column of the mask), the convention of ``segment_anything``'s ``batched_mask_to_box``.
* ``"instance_ids"``: int64 ``[K]``.
* ``"original_size"``: int64 ``[2]`` (H, W) of the image as read (of the crop/tile when cropping).
* ``"input_size"``: int64 ``[2]`` (h, w) of the content after resizing (and augmentation), before padding.
* ``"image_id"``: str (``"<id>@<top>,<left>"`` for a validation tile).
* ``"original_masks"`` (only with ``return_original_masks``): bool ``[K, H, W]``, the same instances at the
  image's own resolution (meaningful for evaluation; training augmentation is not applied to them).
* ``"ignore_mask"`` (validation samples whose image has void pixels, e.g. ``ignore_values`` of a label map): bool
  ``[S, S]``, the pixels that are neither object nor background, aligned with ``"masks"`` (False in the padding);
  with ``return_original_masks`` also ``"original_ignore_mask"`` ``[H, W]``. Evaluation (``samtune evaluate``
  and validation during ``fit``, through the batch's ``"ignore_mask"``) leaves them out of IoUs and click placement.
* ``"vanished_instance_ids"`` (validation samples where some mask, non-empty in the image, is empty after the
  resize to the model input, e.g. a 1-pixel instance at 2x downsampling): int64 ``[V]``, those masks, which are
  not in ``"masks"``; with ``return_original_masks`` also ``"original_vanished_masks"`` bool ``[V, H, W]``.
  Evaluation at the original resolution scores them (their prompts are computed there); at the input resolution
  it counts them as dropped. A sample whose masks all vanish is still a :class:`SampleError`.

Randomness: validation samples are a fixed function of ``(seed, index)``. Training samples draw from generators
seeded by ``seed``, the process's torch random state and the distributed global rank
(:func:`samtune.data.collate.global_rank`): in a DataLoader worker, one generator per worker seeded by
``(seed, torch.initial_seed())``, which DataLoader makes distinct per worker and per epoch; in the main process
(``num_workers=0``), one generator per sample seeded by a draw from torch's global generator, so that every
``seed_everything`` (a repeated one with the same seed included) restarts the sequence. Runs are reproducible
under ``seed_everything``, and DDP processes seeded alike draw different sequences. An index that names its pass
(a :class:`samtune.resumable.SampleIndex`, which the CLI's resumable training loader yields) instead seeds the
sample's generator from ``(seed, run seed, epoch, index, rank)``: the sample is then the same whichever process
loads it and in a run resumed mid-epoch.
"""
from __future__ import annotations

import logging
import os
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from samtune.data.collate import global_rank
from samtune.data.errors import OnError, SampleError, SkipCounter
from samtune.data.io import Intensity, check_intensity_options, prepare_image
from samtune.data.masks import MaskSource, WindowMaskSource, masks_to_boxes, resize_masks
from samtune.data.transforms import Augmenter, AugmentationPreset, resize_longest, to_model_input
from samtune.modeling.preprocessing import Interpolation, Normalization, default_interpolation

logger = logging.getLogger("samtune.data")

MAX_CROP_ATTEMPTS = 10
MAX_AUGMENT_ATTEMPTS = 3


@dataclass
class RawSample:
    """One image as loaded by a format, before any transform.

    Attributes:
        image: ``[H, W]`` or ``[H, W, C]`` array as stored.
        masks: its candidate instance masks.
        path: the image file (named in errors).
        mask_path: the file holding the masks (annotation JSON, label image), named in errors.
        image_id: identifier returned in the sample.
    """

    image: np.ndarray
    masks: MaskSource
    path: Path
    mask_path: Path
    image_id: str


class SegmentationDataset(Dataset):
    """Base class: a format implements ``_num_images``, ``_image_path``, ``_image_id`` and ``_load``.

    Args:
        image_size: S, the model's square input size (1024 for SAM, 256 for LiteMedSAM).
        normalization: ``"sam"`` or ``"minmax"`` (see ``samtune.modeling.preprocessing``).
        resize_interpolation: the resize filter, which must be the model's (``Sam.resize_interpolation``, what
            :class:`samtune.Predictor` uses at inference): ``"bilinear"`` (PIL, SAM) or ``"area"`` (OpenCV
            ``INTER_AREA``, LiteMedSAM). None: the filter of the models with this ``normalization`` (``"sam"``:
            bilinear, ``"minmax"``: area).
        train: training mode (random mask sampling, augmentation, random crops) vs deterministic validation.
        augmentation: preset applied in training (see ``samtune.data.transforms.preset_transforms``).
        augmentation_pipeline: extra albumentations pipeline (dict or YAML/JSON file) applied in training.
        max_masks_per_image: at most this many masks are sampled per image per step (per sample). Validation
            tiles (``crop_size``) do not sample: a tile holding more instances gives several samples.
        max_mask_area_fraction: masks covering more of the image than this are dropped (SAM: 0.9).
        bands: bands making the 3-channel input (1 or 3 indices), None for grey/RGB.
        intensity: intensity preset (see ``samtune.data.io``): auto, none, minmax, percentile or window.
        percentiles: (low, high) with ``0 <= low < high <= 100``, for ``intensity="percentile"`` (and ``"auto"``
            on images that are not uint8 / bool).
        window: (low, high) raw values with ``low < high``, for ``intensity="window"``.
        crop_size: when set, training takes a random ``crop_size`` square crop and validation tiles each image
            into ``crop_size`` squares before resizing (large rasters). Every validation instance is evaluated
            once, in one tile: the first tile (row-major) that holds it whole, else the tile holding most of it
            (cut at the tile's edge); tiles left with no instance are not validated, and a tile assigned more
            than ``max_masks_per_image`` instances is split into several samples (same tile, same ``image_id``).
        tile_overlap: pixels shared by neighbouring validation tiles. With an overlap of at least the largest
            object's side, every object lies whole in some tile and none is evaluated cut.
        region: ``(x0, y0, x1, y1)`` in image pixels (end exclusive, clipped to the image): use only this window of
            every image, before cropping and resizing. Splits one large raster spatially into train and validation
            parts. Masks are cut at the window's edge; a mask keeps only if at least ``region_min_fraction`` of its
            pixels lie inside.
        region_min_fraction: see ``region``.
        repeats: in training, each image appears this many times per epoch (each time with its own random crop,
            masks and augmentation): epochs of a useful length on a few large rasters.
        return_original_masks: also return ``"original_masks"`` at the image's resolution.
        on_error: ``"raise"`` a :class:`SampleError` naming the file, or ``"skip"`` to the next valid sample
            (counted in :attr:`num_skipped` and logged).
        seed: base seed of all sampling.
    """

    def __init__(
        self,
        *,
        image_size: int = 1024,
        normalization: Normalization = "sam",
        resize_interpolation: Interpolation | None = None,
        train: bool = False,
        augmentation: AugmentationPreset = "none",
        augmentation_pipeline: str | Path | dict[str, Any] | None = None,
        max_masks_per_image: int = 64,
        max_mask_area_fraction: float = 1.0,
        bands: Sequence[int] | None = None,
        intensity: Intensity = "auto",
        percentiles: tuple[float, float] = (0.5, 99.5),
        window: tuple[float, float] | None = None,
        crop_size: int | None = None,
        tile_overlap: int = 0,
        region: Sequence[int] | None = None,
        region_min_fraction: float = 0.5,
        repeats: int = 1,
        return_original_masks: bool = False,
        on_error: OnError = "raise",
        seed: int = 0,
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if normalization not in ("sam", "minmax"):
            raise ValueError(f"normalization must be 'sam' or 'minmax', got {normalization!r}")
        if resize_interpolation is None:
            resize_interpolation = default_interpolation(normalization)
        if resize_interpolation not in ("bilinear", "area"):
            raise ValueError(f"resize_interpolation must be 'bilinear' or 'area', got {resize_interpolation!r}")
        if max_masks_per_image <= 0:
            raise ValueError(f"max_masks_per_image must be positive, got {max_masks_per_image}")
        if not 0.0 < max_mask_area_fraction <= 1.0:
            raise ValueError(f"max_mask_area_fraction must be in (0, 1], got {max_mask_area_fraction}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if crop_size is not None and crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        if tile_overlap < 0 or (crop_size is not None and tile_overlap >= crop_size):
            raise ValueError(f"tile_overlap must be in [0, crop_size={crop_size}), got {tile_overlap}")
        if tile_overlap and crop_size is None:
            raise ValueError(f"tile_overlap={tile_overlap} needs crop_size (validation tiles)")
        if region is not None:
            region = tuple(int(v) for v in region)
            if len(region) != 4 or min(region) < 0 or region[2] <= region[0] or region[3] <= region[1]:
                raise ValueError(f"region must be (x0, y0, x1, y1) with 0 <= x0 < x1 and 0 <= y0 < y1, got {region}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if not 0.0 < region_min_fraction <= 1.0:
            raise ValueError(f"region_min_fraction must be in (0, 1], got {region_min_fraction}")
        check_intensity_options(intensity, percentiles, window)
        self.image_size = image_size
        self.normalization = normalization
        self.resize_interpolation: Interpolation = resize_interpolation
        self.train = train
        self.augmenter = Augmenter(augmentation, augmentation_pipeline, image_size, resize_interpolation) \
            if train else None
        self.max_masks_per_image = max_masks_per_image
        self.max_mask_area_fraction = max_mask_area_fraction
        self.bands = list(bands) if bands is not None else None
        self.intensity = intensity
        self.percentiles = tuple(percentiles)
        self.window = tuple(window) if window is not None else None
        self.crop_size = crop_size
        self.tile_overlap = tile_overlap
        self.region = region
        self.region_min_fraction = region_min_fraction
        self.repeats = repeats
        self.return_original_masks = return_original_masks
        self.on_error = on_error
        self.seed = seed
        self.skips = SkipCounter()
        self._index: list[tuple[int, tuple[int, int] | None]] = []
        self._tile_members: dict[int, np.ndarray] = {}  # validation tile sample index -> the masks it scores
        self._rng_state: tuple[tuple[int, int, int], np.random.Generator] | None = None

    # ---------------------------------------------------------------------------------------- format hooks
    @abstractmethod
    def _num_images(self) -> int:
        """Number of images in the dataset."""

    @abstractmethod
    def _image_path(self, i: int) -> Path:
        """Path of image ``i`` (named in errors)."""

    @abstractmethod
    def _image_id(self, i: int) -> str:
        """Identifier of image ``i``."""

    @abstractmethod
    def _load(self, i: int) -> RawSample:
        """Read image ``i`` and its candidate masks; raise :class:`SampleError` on bad input."""

    def _load_masks(self, i: int) -> tuple[MaskSource, Path]:
        """The candidate masks of image ``i`` and the image's path (for errors), for planning validation tiles.
        Formats override it to skip reading the image's pixels; the default loads the whole sample."""
        raw = self._load(i)
        return raw.masks, raw.path

    # ---------------------------------------------------------------------------------------- indexing
    def _build_index(self) -> None:
        """Index samples: one per image, or, when validating with ``crop_size``, one per tile that is assigned an
        instance, or more where it is assigned more than ``max_masks_per_image`` (each sample then scores an
        equal share of them; each validation image is read once here to assign them). Subclasses call it."""
        if self.train:
            self._index = [(i, None) for i in range(self._num_images())] * self.repeats
            return
        if self.crop_size is None:
            self._index = [(i, None) for i in range(self._num_images())]
            return
        index: list[tuple[int, tuple[int, int] | None]] = []
        self._tile_members = {}
        for i in range(self._num_images()):
            try:
                tiles = self._assign_tiles(i)
            except Exception as exc:  # noqa: BLE001 - reported as a SampleError naming the file
                self._handle(exc if isinstance(exc, SampleError) else SampleError(
                    self._error_path(i), f"unexpected {type(exc).__name__} while indexing tiles: {exc}"))
                continue
            for tile, members in tiles:  # more members than max_masks_per_image: several samples of one tile
                for part in np.array_split(members, -(-len(members) // self.max_masks_per_image)):
                    self._tile_members[len(index)] = part
                    index.append((i, tile))
        self._index = index

    def _assign_tiles(self, i: int) -> list[tuple[tuple[int, int], np.ndarray]]:
        """Validation tiles of image ``i`` (its ``region`` when set) with the usable masks each one evaluates.

        Each mask goes to the first tile (row-major) that holds all of its pixels, else to the tile holding
        most of them; tiles given no mask are dropped. Mask numbers index the image's (region's) mask source.
        """
        assert self.crop_size is not None
        source, path = self._load_masks(i)
        height, width = source.height, source.width
        if self.region is not None:
            (_, _, height, width), source = self._region_masks(source, path)
        areas = source.areas()
        usable = np.flatnonzero((areas > 0) & (areas <= self.max_mask_area_fraction * height * width))
        if usable.size == 0:
            return []
        size, stride = self.crop_size, self.crop_size - self.tile_overlap
        tops, lefts = _tile_starts(height, size, stride), _tile_starts(width, size, stride)
        tiles = [(top, left) for top in tops for left in lefts]
        inside = np.stack([source.window_areas(usable, t, l, size, size) for t, l in tiles], axis=1)  # [N, T]
        whole = inside >= areas[usable][:, None]
        home = np.where(whole.any(1), whole.argmax(1), inside.argmax(1))
        return [(tile, usable[home == k]) for k, tile in enumerate(tiles) if (home == k).any()]

    def __len__(self) -> int:
        return len(self._index)

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far because of bad input (all worker processes together)."""
        return self.skips.total

    # ---------------------------------------------------------------------------------------- access
    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        current = index
        for _ in range(len(self)):
            try:
                return self._get(current)
            except Exception as exc:  # noqa: BLE001 - every failure is turned into a SampleError naming the file
                self._handle(self._as_sample_error(exc, current))
            current = (current + 1) % len(self)
        path = self._error_path(self._index[index][0])
        raise SampleError(path.parent if isinstance(path, Path) else path, "no valid sample in the whole dataset")

    def _as_sample_error(self, exc: Exception, index: int) -> SampleError:
        if isinstance(exc, SampleError):
            return exc
        path = self._error_path(self._index[index][0])
        return SampleError(path, f"unexpected {type(exc).__name__} while loading the sample: {exc}")

    def _error_path(self, image_index: int) -> Path | str:
        """The path of image ``image_index`` for an error message; never raises (the error handler must not fail
        itself, e.g. on the entry whose path is what is broken)."""
        try:
            return self._image_path(image_index)
        except Exception as exc:  # noqa: BLE001
            return f"{type(self).__name__} image {image_index} (no path: {type(exc).__name__}: {exc})"

    def _handle(self, err: SampleError) -> None:
        if self.on_error == "raise":
            raise err
        total = self.skips.increment()
        logger.warning("skipping bad sample (%d skipped so far): %s", total, err)

    def _rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` (see the module's Randomness).

        An index that names its pass (``sample_key``, e.g. a :class:`samtune.resumable.SampleIndex` from the CLI's
        resumable training loader) gets a generator seeded by ``(seed, sample_key, index)`` and the rank: the
        sample is then the same in the main process and in any worker, whichever iterator loads it, so a run
        resumed mid-epoch draws exactly what the uninterrupted run drew. Asked again for the same index object
        (e.g. the cached dataset's view choice after the sample), it continues that generator.
        """
        if not self.train:
            return np.random.default_rng([self.seed, index])
        rank = global_rank()
        spawn_key = (rank,) if rank else ()  # rank 0 (and no DDP) keeps the streams of the rank-less seeding
        sample_key = getattr(index, "sample_key", None)
        if sample_key is not None:
            last = getattr(self, "_sample_rng", None)
            if last is None or last[0] is not index:
                sequence = np.random.SeedSequence([self.seed, *sample_key, int(index)], spawn_key=spawn_key)
                self._sample_rng = last = (index, np.random.default_rng(sequence))
            return last[1]
        if torch.utils.data.get_worker_info() is None:
            # main process: a draw from torch's generator per sample, so that seed_everything resets the sequence
            draw = int(torch.empty((), dtype=torch.int64).random_().item())
            return np.random.default_rng(np.random.SeedSequence([self.seed, draw], spawn_key=spawn_key))
        key = (os.getpid(), torch.initial_seed(), rank)
        if self._rng_state is None or self._rng_state[0] != key:
            sequence = np.random.SeedSequence([self.seed, torch.initial_seed()], spawn_key=spawn_key)
            self._rng_state = (key, np.random.default_rng(sequence))
        return self._rng_state[1]

    def _get(self, index: int) -> dict[str, Any]:
        image_index, tile = self._index[index]
        rng = self._rng(index)
        raw = self._load(image_index)
        image = prepare_image(raw.image, self.bands, self.intensity, self.percentiles, self.window, raw.path)
        height, width = image.shape[:2]
        source = raw.masks
        if (source.height, source.width) != (height, width):
            raise SampleError(
                raw.mask_path,
                f"mask size {source.height}x{source.width} differs from the image size {height}x{width} "
                f"of {raw.path}",
            )
        if self.region is not None:
            image, source = self._cut_region(image, source, raw)
            height, width = image.shape[:2]
        if len(source) == 0:
            raise SampleError(raw.mask_path, f"no masks for image {raw.path}")
        areas = source.areas()
        candidates = np.flatnonzero((areas > 0) & (areas <= self.max_mask_area_fraction * height * width))
        if candidates.size == 0:
            raise SampleError(
                raw.mask_path,
                f"no usable masks for {raw.path}: {len(source)} masks, all empty or covering more than "
                f"{self.max_mask_area_fraction:.0%} of the image",
            )
        image_id = raw.image_id
        top_left = (0, 0)
        if self.crop_size is not None:
            image, masks, ids, top_left = self._crop(image, source, candidates, index, tile, rng, raw)
            if tile is not None:
                image_id = f"{image_id}@{top_left[0]},{top_left[1]}"
        else:
            chosen = self._sample(candidates, rng)
            masks, ids = source.decode(chosen), source.ids[chosen]
        original_size = image.shape[:2]

        resized_image, resized_masks = resize_longest(image, masks, self.image_size, self.resize_interpolation)
        out_image, out_masks = resized_image, resized_masks
        keep = resized_masks.reshape(len(resized_masks), -1).any(1)
        if self.augmenter is not None and self.augmenter.active:
            for _ in range(MAX_AUGMENT_ATTEMPTS):
                aug_image, aug_masks = self.augmenter(resized_image, resized_masks, rng)
                aug_keep = aug_masks.reshape(len(aug_masks), -1).any(1)
                if aug_keep.any():  # otherwise retry; after the last failure keep the un-augmented sample
                    out_image, out_masks, keep = aug_image, aug_masks, aug_keep
                    break
        if not keep.any():
            raise SampleError(raw.mask_path, f"all masks of {raw.path} vanish at input size {self.image_size}")
        out_masks = out_masks[keep]
        input_size = out_image.shape[:2]
        boxes = masks_to_boxes(out_masks)
        image_tensor, mask_tensor = to_model_input(out_image, out_masks, self.image_size, self.normalization)
        sample: dict[str, Any] = {
            "image": image_tensor,
            "masks": mask_tensor,
            "boxes": boxes,
            "instance_ids": torch.from_numpy(np.asarray(ids, dtype=np.int64)[keep]),
            "original_size": torch.tensor(original_size, dtype=torch.int64),
            "input_size": torch.tensor(input_size, dtype=torch.int64),
            "image_id": image_id,
        }
        if self.return_original_masks:
            sample["original_masks"] = torch.from_numpy(np.ascontiguousarray(masks[keep])).bool()
        if not self.train and source.ignore is not None:
            sample.update(self._ignore_entries(source.ignore, top_left, original_size, input_size))
        if not self.train and not keep.all():
            sample.update(self._vanished_entries(masks[~keep], np.asarray(ids, dtype=np.int64)[~keep]))
        return sample

    def _vanished_entries(self, masks: np.ndarray, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """``"vanished_instance_ids"`` (and ``"original_vanished_masks"``) of a validation sample: the masks left
        out of ``"masks"`` because the resize to the model input erased them (see the module docstring)."""
        out = {"vanished_instance_ids": torch.from_numpy(ids)}
        if self.return_original_masks:
            out["original_vanished_masks"] = torch.from_numpy(np.ascontiguousarray(masks)).bool()
        return out

    def _ignore_entries(
        self, ignore: np.ndarray, top_left: tuple[int, int], size: tuple[int, int], input_size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """``"ignore_mask"`` (and ``"original_ignore_mask"``) of a validation sample: the void pixels of the
        ``size`` window at ``top_left`` (the crop / tile, or the whole image), resized like the masks; none when the
        window holds no void pixel."""
        top, left = top_left
        window = ignore[top : top + size[0], left : left + size[1]]
        if not window.any():
            return {}
        canvas = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
        resized = resize_masks(window[None].view(np.uint8), input_size)[0]  # as the masks (resize_longest)
        canvas[: input_size[0], : input_size[1]] = torch.from_numpy(resized).bool()
        out = {"ignore_mask": canvas}
        if self.return_original_masks:
            out["original_ignore_mask"] = torch.from_numpy(np.ascontiguousarray(window))
        return out

    def _cut_region(self, image: np.ndarray, source: MaskSource, raw: RawSample) -> tuple[np.ndarray, MaskSource]:
        """The ``region`` window of the image and the masks with enough of their area inside it."""
        (top, left, h, w), window_masks = self._region_masks(source, raw.path)
        return np.ascontiguousarray(image[top : top + h, left : left + w]), window_masks

    def _region_masks(self, source: MaskSource, path: Path) -> tuple[tuple[int, int, int, int], MaskSource]:
        """``(top, left, h, w)`` of the ``region`` window (of the image at ``path``) and the masks with enough
        of their area inside it."""
        assert self.region is not None
        window = top, left, h, w = _region_window(self.region, source.height, source.width, path)
        full_areas = source.areas()
        inside = source.window_areas(np.arange(len(source)), top, left, h, w)
        keep = np.flatnonzero((inside > 0) & (inside >= self.region_min_fraction * np.maximum(full_areas, 1)))
        cut = WindowMaskSource(source, keep, window, inside[keep])
        if source.ignore is not None:
            cut.ignore = np.ascontiguousarray(source.ignore[top : top + h, left : left + w])
        return window, cut

    def _sample(self, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if candidates.size <= self.max_masks_per_image:
            return candidates
        return np.sort(rng.choice(candidates, self.max_masks_per_image, replace=False))

    def _crop(
        self,
        image: np.ndarray,
        source: MaskSource,
        candidates: np.ndarray,
        index: int,
        tile: tuple[int, int] | None,
        rng: np.random.Generator,
        raw: RawSample,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
        """Cut a random training crop of sample ``index`` and sample its masks, or cut the validation tile and
        take every mask assigned to this sample of it (at most ``max_masks_per_image``, see ``_build_index``).

        Training crops are uniform over the image, retried until one holds a mask; where objects are sparse
        (small crops of a large raster) and ``MAX_CROP_ATTEMPTS`` uniform crops miss them all, the last crop is
        placed uniformly among the windows holding one random pixel of one random mask, so a random crop never
        fails on an image that has masks.
        """
        assert self.crop_size is not None
        height, width = image.shape[:2]
        size = self.crop_size
        members = self._tile_members[index] if tile is not None else None
        attempts = 1 if tile is not None else MAX_CROP_ATTEMPTS + 1
        for attempt in range(attempts):
            if tile is not None:
                top, left = tile
            elif attempt < MAX_CROP_ATTEMPTS:
                top = int(rng.integers(0, max(height - size, 0) + 1))
                left = int(rng.integers(0, max(width - size, 0) + 1))
            else:
                top, left = _window_holding_a_mask_pixel(source, candidates, size, rng)
            if tile is not None:  # the masks assigned to this tile (see _assign_tiles)
                present = np.flatnonzero(np.isin(candidates, members))
            else:
                present = np.flatnonzero(source.window_areas(candidates, top, left, size, size))
            if present.size:  # a tile scores all its members (already split to at most max_masks_per_image)
                chosen = present if tile is not None else self._sample(present, rng)
                masks = source.decode_window(candidates[chosen], top, left, size, size)
                window = (slice(top, top + size), slice(left, left + size))
                return np.ascontiguousarray(image[window]), masks, source.ids[candidates[chosen]], (top, left)
        where = f"tile at ({tile[0]}, {tile[1]})" if tile is not None else f"{attempts} random crops"
        raise SampleError(raw.mask_path, f"no mask of {raw.path} inside the {where} of size {size}")


def _window_holding_a_mask_pixel(
    source: MaskSource, candidates: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[int, int]:
    """``(top, left)`` of a ``size`` window, uniform among those inside the image that hold one pixel drawn at
    random from one mask drawn at random among ``candidates`` (positions into ``source``, all non-empty)."""
    height, width = source.height, source.width
    ys, xs = np.nonzero(source.decode(candidates[[rng.integers(len(candidates))]])[0])
    k = int(rng.integers(len(ys)))

    def start(pixel: int, length: int) -> int:
        low, high = max(0, pixel - size + 1), min(pixel, max(length - size, 0))
        return int(rng.integers(low, high + 1))

    return start(int(ys[k]), height), start(int(xs[k]), width)


def _region_window(region: tuple[int, ...], height: int, width: int, path: Path) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of ``region`` ``(x0, y0, x1, y1)`` clipped to an image of ``height x width``."""
    x0, y0, x1, y1 = region
    x1, y1 = min(x1, width), min(y1, height)
    if x0 >= x1 or y0 >= y1:
        raise SampleError(path, f"region {region} lies outside the image of {height}x{width} (HxW)")
    return y0, x0, y1 - y0, x1 - x0


def _tile_starts(length: int, size: int, stride: int | None = None) -> list[int]:
    """Start offsets of tiles of ``size`` every ``stride`` (default ``size``) covering ``length`` (the last one
    flush with the end)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size, stride or size))
    starts.append(length - size)
    return starts


def read_name_list(path: str | Path, key: str | None = None) -> list[str]:
    """Names (one per line; blank lines and ``#`` comments ignored) from a split file.

    Args:
        path: the split file.
        key: the setting that gave ``path`` (``MaskFolderDataModule.train_split``), named in the error.

    Raises:
        ValueError: the file is missing (a relative path's message names the working directory it was read from).
    """
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise ValueError(f"{key + ': ' if key else ''}split list not found: {path}{where}")
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names
