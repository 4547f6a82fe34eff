"""LightningModules for training SAM: :class:`PromptableSegmentationTask` and its config groups."""
from samtune.tasks.config import LossConfig, OptimizerConfig
from samtune.tasks.optim import WarmupLR, WarmupSchedule, encoder_lr_scales, no_weight_decay_names, param_groups
from samtune.tasks.segmentation import PromptableSegmentationTask

__all__ = [
    "LossConfig",
    "OptimizerConfig",
    "PromptableSegmentationTask",
    "WarmupLR",
    "WarmupSchedule",
    "encoder_lr_scales",
    "no_weight_decay_names",
    "param_groups",
]
