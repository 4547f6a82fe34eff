"""Datasets (SA-1B, COCO, mask folders, synthetic), transforms and collate for SAM training.

Datasets never import Lightning; the LightningDataModules live in :mod:`samtune.data.datamodules`.
See :mod:`samtune.data.base` for the sample contract.
"""
from samtune.data.base import RawSample, SegmentationDataset
from samtune.data.coco import COCODataset
from samtune.data.collate import collate_samples, seed_worker, worker_init
from samtune.data.errors import SampleError, SkipCounter
from samtune.data.mask_folder import MaskFolderDataset
from samtune.data.masks import masks_to_boxes
from samtune.data.sa1b import SA1BDataset

__all__ = [
    "COCODataset",
    "MaskFolderDataset",
    "RawSample",
    "SA1BDataset",
    "SampleError",
    "SegmentationDataset",
    "SkipCounter",
    "collate_samples",
    "masks_to_boxes",
    "seed_worker",
    "worker_init",
]
