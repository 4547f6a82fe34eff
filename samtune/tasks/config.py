"""Plain configuration groups of the training tasks (YAML-able dataclasses)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LossConfig", "OptimizerConfig", "to_plain"]

Schedule = Literal["step", "cosine", "constant"]


@dataclass(frozen=True)
class LossConfig:
    """Weights and options of :class:`samtune.losses.SamLoss` (the SAM paper: focal 20, dice 1, IoU 1).

    Attributes:
        focal_weight: weight of the focal loss.
        dice_weight: weight of the dice loss.
        iou_weight: weight of the IoU-regression loss.
        focal_alpha: focal foreground weight (background: ``1 - focal_alpha``); None weights both classes equally.
            The default 0.25 weights background pixels 3:1, which biases ambiguous pixels (occluded or blurred
            edges) towards background.
        focal_gamma: focal focusing exponent.
        resolution: ``"low"`` compares at the 256x256 logits, ``"gt"`` at the ground-truth resolution.
    """

    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float | None = 0.25
    focal_gamma: float = 2.0
    resolution: Literal["low", "gt"] = "low"

    def __post_init__(self) -> None:
        for name in ("focal_weight", "dice_weight", "iou_weight", "focal_gamma"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"LossConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"LossConfig.focal_alpha must be in [0, 1] or null, got {self.focal_alpha}")
        if self.resolution not in ("low", "gt"):
            raise ValueError(f"LossConfig.resolution must be 'low' or 'gt', got {self.resolution!r}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and learning-rate schedule (defaults: the SAM paper's recipe).

    Attributes:
        lr: base learning rate (of the prompt encoder and decoder; the image encoder's is scaled).
        weight_decay: AdamW weight decay of weight matrices (none on norms, biases, embeddings, position tables).
        betas: AdamW betas.
        layer_decay: layer-wise lr decay over the image-encoder blocks (1.0: none; paper: 0.8 ViT-H, 0.6 ViT-B).
        encoder_lr_scale: multiplier of every image-encoder learning rate.
        warmup_steps: linear warmup over this many optimizer steps (0: none).
        schedule: ``"step"`` (x ``step_gamma`` at each milestone), ``"cosine"`` (to ``min_lr_ratio``) or
            ``"constant"``, after the warmup.
        step_milestones: fractions of the total optimizer steps where the step schedule decays
            (paper: 60k and 86,666 of 90k iterations).
        step_gamma: decay factor of the step schedule.
        min_lr_ratio: floor of the lr multiplier after the warmup (cosine end value; floor of the step schedule).
    """

    lr: float = 8e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 1.0
    encoder_lr_scale: float = 1.0
    warmup_steps: int = 250
    schedule: Schedule = "step"
    step_milestones: tuple[float, ...] = (60000 / 90000, 86666 / 90000)
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        # YAML / checkpoints give lists: store tuples.
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "step_milestones", tuple(float(m) for m in self.step_milestones))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"OptimizerConfig.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"OptimizerConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas must be two values in [0, 1), got {self.betas}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"OptimizerConfig.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not (math.isfinite(self.encoder_lr_scale) and self.encoder_lr_scale >= 0):
            raise ValueError(
                f"OptimizerConfig.encoder_lr_scale must be a finite number >= 0, got {self.encoder_lr_scale}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"OptimizerConfig.schedule must be 'step', 'cosine' or 'constant', got {self.schedule!r}")
        if any(not 0.0 < m <= 1.0 for m in self.step_milestones) or list(self.step_milestones) != sorted(
            self.step_milestones
        ):
            raise ValueError(
                f"OptimizerConfig.step_milestones must be increasing fractions in (0, 1], got {self.step_milestones}"
            )
        if not 0.0 < self.step_gamma <= 1.0:
            raise ValueError(f"OptimizerConfig.step_gamma must be in (0, 1], got {self.step_gamma}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively: values ``yaml.safe_dump`` and
    ``torch.load(weights_only=True)`` accept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
