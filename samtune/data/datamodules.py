"""LightningDataModules, one per format, sharing :class:`SegmentationDataModule`.

Splits come from explicit lists (files of names / ids) or from a seeded ratio of everything available.
Every ``__init__`` argument is explicit and typed so LightningCLI/jsonargparse can validate YAML recipes.
"""
from __future__ import annotations

import logging
from abc import abstractmethod
from pathlib import Path
from typing import Any, Sequence, Sized

import lightning as L
import numpy as np
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from samtune.data.base import SegmentationDataset, read_name_list
from samtune.data.coco import COCODataset, filters_text, index_coco
from samtune.data.collate import collate_samples, worker_init
from samtune.data.errors import OnError
from samtune.data.io import Intensity
from samtune.data.mask_folder import MaskFolderDataset, image_files
from samtune.data.masks import Connectivity, MaskType
from samtune.data.sa1b import SA1BDataset
from samtune.data.transforms import AugmentationPreset
from samtune.modeling.preprocessing import Interpolation, Normalization

logger = logging.getLogger("samtune.data")


def split_by_ratio(names: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded split of ``names`` into (train, val) with ``round(len * val_fraction)`` (>= 1) for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    names = list(names)
    if len(names) < 2:
        raise ValueError(f"need at least 2 images to split, got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(max(1, int(round(len(names) * val_fraction))), len(names) - 1)
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [names[i] for i in train], [names[i] for i in val]


def exact_eval_sampler(dataset: Sized, trainer: L.Trainer | None) -> Sampler | None:
    """The sampler of a validation loader under DDP: each sample on exactly one process, or None (Lightning's).

    Lightning's own ``DistributedSampler`` pads the processes' shares to equal length with repeated samples, so
    validation metrics (summed over processes by torchmetrics) would count those samples twice. Unrepeated shares
    may differ by one batch; validation has no per-batch collective but DDP's first forward (buffer sync), which
    every process makes as long as each has a sample: with fewer samples than processes, or one process, or
    ``use_distributed_sampler=False``, this returns None and Lightning's choice stands.
    """
    if trainer is None:
        return None
    world = int(trainer.world_size)
    connector = getattr(trainer, "_accelerator_connector", None)
    if world <= 1 or len(dataset) < world or not getattr(connector, "use_distributed_sampler", True):
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=int(trainer.global_rank), shuffle=False)


def keeps_full_batches(num_samples: int, batch_size: int, trainer: L.Trainer | None) -> bool:
    """Whether a training loader may drop its last partial batch: only when each process's shard of the samples
    (``1 / world_size`` of them; one process without a trainer) still holds a full batch, so that a small training
    set never leaves a process with no batch at all."""
    world_size = int(trainer.world_size) if trainer is not None else 1
    return num_samples >= batch_size * world_size


class SegmentationDataModule(L.LightningDataModule):
    """Common loading options of every format.

    Args:
        image_size: model input size S (1024 SAM, 256 LiteMedSAM).
        normalization: ``"sam"`` (mean/std) or ``"minmax"`` (LiteMedSAM).
        resize_interpolation: resize filter, ``"bilinear"`` (SAM) or ``"area"`` (LiteMedSAM); None: the one that
            goes with ``normalization`` (what the model's predictor uses).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches for fast host-to-GPU copies.
        max_masks_per_image: masks sampled per image per step.
        max_mask_area_fraction: masks covering more than this fraction are dropped.
        augmentation: training preset (none, natural, overhead, natural_lsj, overhead_lsj).
        augmentation_pipeline: extra albumentations pipeline, a YAML/JSON file or ``A.to_dict`` mapping.
        bands: 1 or 3 band indices for multi-band images.
        intensity: intensity preset (auto, none, minmax, percentile, window).
        percentiles: (low, high) percentiles for ``intensity: percentile``.
        window: (low, high) raw values for ``intensity: window``.
        crop_size: random crops (train) / tiles (val) of this size before resizing, for large rasters.
        tile_overlap: pixels shared by neighbouring validation tiles (each instance is validated once, whole
            where a tile holds it whole; see :class:`samtune.data.base.SegmentationDataset`).
        train_region, val_region: ``[x0, y0, x1, y1]`` windows (image pixels, end exclusive) that the training /
            validation samples are taken from: a spatial split of large rasters (see
            :class:`samtune.data.base.SegmentationDataset`).
        region_min_fraction: a mask cut by a region's edge keeps if this fraction of it lies inside.
        train_repeats: each training image appears this many times per epoch (new random crop, masks and
            augmentation each time).
        val_fraction: fraction of images held out for validation when no explicit validation split is given.
        split_seed: seed of the ratio split.
        seed: seed of mask sampling and augmentation.
        on_error: ``"raise"`` or ``"skip"`` bad samples.
        return_original_masks: validation samples also carry masks at the original resolution.
    """

    def __init__(
        self,
        image_size: int = 1024,
        normalization: Normalization = "sam",
        resize_interpolation: Interpolation | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        max_masks_per_image: int = 64,
        max_mask_area_fraction: float = 1.0,
        augmentation: AugmentationPreset = "none",
        augmentation_pipeline: str | dict[str, Any] | None = None,
        bands: list[int] | None = None,
        intensity: Intensity = "auto",
        percentiles: tuple[float, float] = (0.5, 99.5),
        window: tuple[float, float] | None = None,
        crop_size: int | None = None,
        tile_overlap: int = 0,
        train_region: list[int] | None = None,
        val_region: list[int] | None = None,
        region_min_fraction: float = 0.5,
        train_repeats: int = 1,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        on_error: OnError = "raise",
        return_original_masks: bool = False,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.return_original_masks = return_original_masks
        self._common: dict[str, Any] = dict(
            image_size=image_size, normalization=normalization, resize_interpolation=resize_interpolation,
            max_masks_per_image=max_masks_per_image,
            max_mask_area_fraction=max_mask_area_fraction, bands=bands, intensity=intensity,
            percentiles=percentiles, window=window, crop_size=crop_size, on_error=on_error, seed=seed,
            region_min_fraction=region_min_fraction, tile_overlap=tile_overlap,
        )
        self._regions = {True: train_region, False: val_region}
        self.train_repeats = train_repeats
        self._augmentation = dict(augmentation=augmentation, augmentation_pipeline=augmentation_pipeline)
        self.train_dataset: SegmentationDataset | None = None
        self.val_dataset: SegmentationDataset | None = None

    @property
    def input_mapping(self) -> dict[str, Any]:
        """How an image file becomes the model's 8-bit RGB input: the keyword arguments of
        :func:`samtune.data.io.prepare_image` (``bands``, ``intensity``, ``percentiles``, ``window``).

        The task records it in its checkpoints and ``samtune export`` in the export metadata, so that inference
        (``samtune amg``) and other apps map 16-bit or multi-band images as training did.
        """
        common = self._common
        return {
            "bands": None if common["bands"] is None else [int(b) for b in common["bands"]],
            "intensity": str(common["intensity"]),
            "percentiles": [float(v) for v in common["percentiles"]],
            "window": None if common["window"] is None else [float(v) for v in common["window"]],
        }

    def dataset_options(self, train: bool) -> dict[str, Any]:
        """Keyword options for a dataset of the given role."""
        options = dict(self._common, train=train, region=self._regions[train])
        if train:
            options.update(self._augmentation, repeats=self.train_repeats)
        else:
            options["return_original_masks"] = self.return_original_masks
        return options

    @abstractmethod
    def build_datasets(self) -> tuple[SegmentationDataset, SegmentationDataset]:
        """Create the (train, val) datasets."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None or self.val_dataset is None:
            self.train_dataset, self.val_dataset = self.build_datasets()
            logger.info("%s: %d training and %d validation samples", type(self).__name__,
                        len(self.train_dataset), len(self.val_dataset))

    @property
    def num_skipped(self) -> int:
        """Bad samples skipped so far (train + val, all workers)."""
        return sum(d.num_skipped for d in (self.train_dataset, self.val_dataset) if d is not None)

    def _loader(self, dataset: SegmentationDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=None if shuffle else exact_eval_sampler(dataset, self.trainer),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_samples,
            worker_init_fn=worker_init(),
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and keeps_full_batches(len(dataset), self.batch_size, self.trainer),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_dataset, shuffle=False)

    def _split(self, names: list[Any], train_list: list[Any] | None, val_list: list[Any] | None
               ) -> tuple[list[Any], list[Any]]:
        if train_list is not None and val_list is not None:
            return train_list, val_list
        if val_list is not None:
            held = set(val_list)
            return [n for n in names if n not in held], val_list
        if train_list is not None:
            kept = set(train_list)
            return train_list, [n for n in names if n not in kept]
        return split_by_ratio(names, self.val_fraction, self.split_seed)


def _split_lists(module: Any) -> tuple[list[str] | None, list[str] | None]:
    """The names listed in a datamodule's ``train_split`` / ``val_split`` files (None where unset); a missing file's
    error names the setting."""
    def names(setting: str) -> list[str] | None:
        path = getattr(module, setting)
        return read_name_list(path, f"{type(module).__name__}.{setting}") if path else None

    return names("train_split"), names("val_split")


class SA1BDataModule(SegmentationDataModule):
    """SA-1B folders.

    Args:
        root: folder of ``<id>.jpg`` + ``<id>.json``.
        val_root: separate validation folder (all of it); otherwise a split of ``root``.
        train_split, val_split: files listing ids (file stems) of each split.
        max_mask_area_fraction: 0.9, as in the SAM paper.
        (other arguments: see :class:`SegmentationDataModule`)
    """

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        train_split: str | None = None,
        val_split: str | None = None,
        image_size: int = 1024,
        normalization: Normalization = "sam",
        resize_interpolation: Interpolation | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        max_masks_per_image: int = 64,
        max_mask_area_fraction: float = 0.9,
        augmentation: AugmentationPreset = "none",
        augmentation_pipeline: str | dict[str, Any] | None = None,
        crop_size: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        on_error: OnError = "raise",
        return_original_masks: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size, normalization=normalization, resize_interpolation=resize_interpolation,
            batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory, max_masks_per_image=max_masks_per_image,
            max_mask_area_fraction=max_mask_area_fraction, augmentation=augmentation,
            augmentation_pipeline=augmentation_pipeline, crop_size=crop_size, val_fraction=val_fraction,
            split_seed=split_seed, seed=seed, on_error=on_error, return_original_masks=return_original_masks,
        )
        self.root, self.val_root = Path(root), Path(val_root) if val_root else None
        self.train_split, self.val_split = train_split, val_split

    def build_datasets(self) -> tuple[SA1BDataset, SA1BDataset]:
        if not self.root.is_dir():
            raise ValueError(f"SA1BDataModule.root is not a folder: {self.root}")
        train_list, val_list = _split_lists(self)
        if self.val_root is not None:
            train = SA1BDataset(self.root, names=train_list, **self.dataset_options(True))
            val = SA1BDataset(self.val_root, names=val_list, **self.dataset_options(False))
            return train, val
        names = sorted(p.stem for p in self.root.glob("*.json"))
        train_names, val_names = self._split(names, train_list, val_list)
        return (SA1BDataset(self.root, names=train_names, **self.dataset_options(True)),
                SA1BDataset(self.root, names=val_names, **self.dataset_options(False)))


class COCODataModule(SegmentationDataModule):
    """COCO instances JSON(s).

    Args:
        train_annotations: COCO JSON of the training images.
        train_image_dir: folder of ``file_name`` paths (default: the JSON's folder).
        val_annotations: COCO JSON of validation images; otherwise a seeded split of the training file's images
            that have annotations left by ``category_ids`` / ``include_crowd``.
        val_image_dir: image folder of ``val_annotations``.
        category_ids: keep only these categories.
        include_crowd: use ``iscrowd`` annotations as instances too.
        (other arguments: see :class:`SegmentationDataModule`)
    """

    def __init__(
        self,
        train_annotations: str,
        train_image_dir: str | None = None,
        val_annotations: str | None = None,
        val_image_dir: str | None = None,
        category_ids: list[int] | None = None,
        include_crowd: bool = False,
        image_size: int = 1024,
        normalization: Normalization = "sam",
        resize_interpolation: Interpolation | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        max_masks_per_image: int = 64,
        max_mask_area_fraction: float = 1.0,
        augmentation: AugmentationPreset = "none",
        augmentation_pipeline: str | dict[str, Any] | None = None,
        bands: list[int] | None = None,
        intensity: Intensity = "auto",
        percentiles: tuple[float, float] = (0.5, 99.5),
        window: tuple[float, float] | None = None,
        crop_size: int | None = None,
        tile_overlap: int = 0,
        train_region: list[int] | None = None,
        val_region: list[int] | None = None,
        region_min_fraction: float = 0.5,
        train_repeats: int = 1,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        on_error: OnError = "raise",
        return_original_masks: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size, normalization=normalization, resize_interpolation=resize_interpolation,
            batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory, max_masks_per_image=max_masks_per_image,
            max_mask_area_fraction=max_mask_area_fraction, augmentation=augmentation,
            augmentation_pipeline=augmentation_pipeline, bands=bands, intensity=intensity,
            percentiles=percentiles, window=window, crop_size=crop_size, tile_overlap=tile_overlap,
            train_region=train_region,
            val_region=val_region, region_min_fraction=region_min_fraction, train_repeats=train_repeats,
            val_fraction=val_fraction,
            split_seed=split_seed, seed=seed, on_error=on_error, return_original_masks=return_original_masks,
        )
        self.train_annotations, self.train_image_dir = train_annotations, train_image_dir
        self.val_annotations, self.val_image_dir = val_annotations, val_image_dir
        self.coco_options = dict(category_ids=category_ids, include_crowd=include_crowd)

    def build_datasets(self) -> tuple[COCODataset, COCODataset]:
        """The two splits: the two files, or a seeded ratio split of the training file's images that keep an
        annotation under ``category_ids`` / ``include_crowd``.

        Raises:
            ValueError: a split would hold no image (named with the file and the filters).
        """
        filters = filters_text(**self.coco_options)
        if self.val_annotations is not None:
            train = COCODataset(self.train_annotations, self.train_image_dir, **self.coco_options,
                                **self.dataset_options(True))
            val = COCODataset(self.val_annotations, self.val_image_dir, **self.coco_options,
                              **self.dataset_options(False))
            for role, dataset in (("training", train), ("validation", val)):
                if not dataset.image_ids:
                    raise ValueError(
                        f"COCODataModule: the {role} split is empty: none of the {dataset.num_unannotated} image(s) "
                        f"of {dataset.annotation_file} has annotations left by {filters}"
                    )
            return train, val
        images, annotations = index_coco(self.train_annotations, **self.coco_options)
        ids = sorted(i for i in images if annotations.get(i))
        if len(ids) < 2:
            raise ValueError(
                f"{self.train_annotations}: {len(ids)} of its {len(images)} image(s) have annotations left by "
                f"{filters}; a ratio split (val_fraction) needs at least 2 images: give val_annotations, or keep "
                "more categories"
            )
        train_ids, val_ids = split_by_ratio(ids, self.val_fraction, self.split_seed)
        return (
            COCODataset(self.train_annotations, self.train_image_dir, image_ids=train_ids, **self.coco_options,
                        **self.dataset_options(True)),
            COCODataset(self.train_annotations, self.train_image_dir, image_ids=val_ids, **self.coco_options,
                        **self.dataset_options(False)),
        )


class MaskFolderDataModule(SegmentationDataModule):
    """Image folder + mask folder.

    Args:
        image_dir, mask_dir: the paired folders (may be one folder, with ``mask_suffix``).
        train_split, val_split: files listing image stems of each split (otherwise a seeded ratio split).
        mask_suffix: appended to the image stem to name its mask.
        mask_type: binary, components, instance or semantic (see ``samtune.data.mask_folder``).
        background: background label.
        ignore_values: labels that are neither background nor object.
        min_area: smallest instance kept, in original pixels.
        connectivity: 4 or 8 for connected components.
        (other arguments: see :class:`SegmentationDataModule`)
    """

    def __init__(
        self,
        image_dir: str,
        mask_dir: str,
        train_split: str | None = None,
        val_split: str | None = None,
        mask_suffix: str = "",
        mask_type: MaskType = "instance",
        background: int = 0,
        ignore_values: list[int] | None = None,
        min_area: int = 0,
        connectivity: Connectivity = 8,
        image_size: int = 1024,
        normalization: Normalization = "sam",
        resize_interpolation: Interpolation | None = None,
        batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        max_masks_per_image: int = 64,
        max_mask_area_fraction: float = 1.0,
        augmentation: AugmentationPreset = "none",
        augmentation_pipeline: str | dict[str, Any] | None = None,
        bands: list[int] | None = None,
        intensity: Intensity = "auto",
        percentiles: tuple[float, float] = (0.5, 99.5),
        window: tuple[float, float] | None = None,
        crop_size: int | None = None,
        tile_overlap: int = 0,
        train_region: list[int] | None = None,
        val_region: list[int] | None = None,
        region_min_fraction: float = 0.5,
        train_repeats: int = 1,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        on_error: OnError = "raise",
        return_original_masks: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size, normalization=normalization, resize_interpolation=resize_interpolation,
            batch_size=batch_size, num_workers=num_workers,
            pin_memory=pin_memory, max_masks_per_image=max_masks_per_image,
            max_mask_area_fraction=max_mask_area_fraction, augmentation=augmentation,
            augmentation_pipeline=augmentation_pipeline, bands=bands, intensity=intensity,
            percentiles=percentiles, window=window, crop_size=crop_size, tile_overlap=tile_overlap,
            train_region=train_region,
            val_region=val_region, region_min_fraction=region_min_fraction, train_repeats=train_repeats,
            val_fraction=val_fraction,
            split_seed=split_seed, seed=seed, on_error=on_error, return_original_masks=return_original_masks,
        )
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.train_split, self.val_split = train_split, val_split
        self.folder_options = dict(
            mask_suffix=mask_suffix, mask_type=mask_type, background=background,
            ignore_values=tuple(ignore_values or ()), min_area=min_area, connectivity=connectivity,
        )

    def build_datasets(self) -> tuple[MaskFolderDataset, MaskFolderDataset]:
        if not self.image_dir.is_dir():
            raise ValueError(f"MaskFolderDataModule.image_dir is not a folder: {self.image_dir}")
        names = sorted(image_files(self.image_dir, self.mask_dir, self.folder_options["mask_suffix"]))
        train_list, val_list = _split_lists(self)
        train_names, val_names = self._split(names, train_list, val_list)
        return (
            MaskFolderDataset(self.image_dir, self.mask_dir, names=train_names, **self.folder_options,
                              **self.dataset_options(True)),
            MaskFolderDataset(self.image_dir, self.mask_dir, names=val_names, **self.folder_options,
                              **self.dataset_options(False)),
        )
