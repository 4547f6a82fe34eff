"""Prompt simulation for training (random, on device, no host sync) and evaluation (deterministic clicks).

Pure functions over bool masks ``[M, H, W]`` plus the interactive simulator and evaluator that drive a model's
batched ``decode``. Coordinates are ``(x, y)`` in model-input pixels (pixel-index convention of the official
prompt encoder, see :mod:`samtune.prompts.geometry`).
"""
from samtune.prompts.deterministic import distance_to_boundary, largest_error_points, mark_clicked, region_centers
from samtune.prompts.evaluator import EvaluationResult, InteractiveEvaluator
from samtune.prompts.geometry import flat_index_to_coords, mask_iou, mask_scale, resize_logits, resize_masks
from samtune.prompts.sampling import (
    BOX_BOTTOM_RIGHT_LABEL,
    BOX_TOP_LEFT_LABEL,
    NEGATIVE_LABEL,
    PAD_LABEL,
    POSITIVE_LABEL,
    jitter_boxes,
    mask_boxes,
    sample_error_points,
    sample_noisy_boxes,
    sample_points_in_masks,
    uniform_pixel,
)
from samtune.prompts.simulator import (
    InteractiveSimulator,
    IterationKind,
    PromptableModel,
    SimulationConfig,
    SimulationStep,
    make_schedule,
    select_feedback,
)

__all__ = [
    "BOX_BOTTOM_RIGHT_LABEL",
    "BOX_TOP_LEFT_LABEL",
    "NEGATIVE_LABEL",
    "PAD_LABEL",
    "POSITIVE_LABEL",
    "EvaluationResult",
    "InteractiveEvaluator",
    "InteractiveSimulator",
    "IterationKind",
    "PromptableModel",
    "SimulationConfig",
    "SimulationStep",
    "distance_to_boundary",
    "flat_index_to_coords",
    "jitter_boxes",
    "largest_error_points",
    "make_schedule",
    "mark_clicked",
    "mask_boxes",
    "mask_iou",
    "mask_scale",
    "region_centers",
    "resize_logits",
    "resize_masks",
    "sample_error_points",
    "sample_noisy_boxes",
    "sample_points_in_masks",
    "select_feedback",
    "uniform_pixel",
]
