"""AdamW parameter groups (no decay on norms/biases/embeddings, layer-wise lr decay) and lr schedules."""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from samtune.modeling.sam import Sam
from samtune.tasks.config import OptimizerConfig

__all__ = ["no_weight_decay_names", "encoder_lr_scales", "param_groups", "WarmupSchedule", "WarmupLR"]

logger = logging.getLogger(__name__)

# Parameters that are position tables or learned tokens, by name (besides nn.Embedding weights and 0/1-d tensors).
_NO_DECAY_NAME_PARTS = ("pos_embed", "rel_pos_h", "rel_pos_w", "attention_biases")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters exempt from weight decay.

    Norm weights and all biases (every parameter with fewer than 2 dimensions), ``nn.Embedding`` weights (the
    prompt encoder's point / not-a-point / no-mask tokens, the decoder's IoU and mask tokens), absolute
    position embeddings, relative-position tables of the ViT and TinyViT's attention-bias tables.

    Args:
        model: any module.

    Returns:
        Full parameter names (as in ``model.named_parameters()``).
    """
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            names.add(f"{module_name}.weight" if module_name else "weight")
    for name, param in model.named_parameters():
        if param.ndim < 2 or any(part in name.split(".")[-1] for part in _NO_DECAY_NAME_PARTS):
            names.add(name)
    return names


def encoder_lr_scales(encoder: nn.Module, layer_decay: float) -> dict[str, float]:
    """Layer-wise lr multiplier of every image-encoder parameter.

    ViT (``blocks``): block ``i`` of ``depth`` gets ``layer_decay ** (depth - i)``; ``patch_embed`` and
    ``pos_embed`` the deepest decay ``layer_decay ** (depth + 1)``; the neck 1. TinyViT: its own
    ``layer_lr_scales(layer_decay)``.

    Args:
        encoder: the image encoder (``ImageEncoderViT`` or ``TinyViT``).
        layer_decay: per-block decay in (0, 1].

    Returns:
        ``{parameter name within the encoder: scale}``.

    Raises:
        TypeError: an encoder that is neither a ViT with ``blocks`` nor has ``layer_lr_scales``.
    """
    if hasattr(encoder, "layer_lr_scales"):
        return dict(encoder.layer_lr_scales(layer_decay))
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise TypeError(
            f"layer-wise lr decay needs a ViT encoder with .blocks or an encoder with layer_lr_scales(); "
            f"got {type(encoder).__name__}"
        )
    depth = len(blocks)
    scales: dict[str, float] = {}
    for name, _ in encoder.named_parameters():
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("patch_embed", "pos_embed", "cls_token")):
            layer = 0
        else:  # neck and anything after the blocks
            layer = depth + 1
        scales[name] = layer_decay ** (depth + 1 - layer)
    return scales


def param_groups(model: Sam, config: OptimizerConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters of a :class:`Sam`.

    Parameters with ``requires_grad=False`` are left out. Groups share (lr scale, weight decay); each carries
    ``lr`` (``config.lr * scale``), ``weight_decay``, ``lr_scale`` and a readable ``name``.

    Args:
        model: the model.
        config: optimiser settings (``lr``, ``weight_decay``, ``layer_decay``, ``encoder_lr_scale``).

    Returns:
        Groups for ``torch.optim.AdamW``; empty when nothing is trainable.
    """
    no_decay = no_weight_decay_names(model)
    encoder_scales = encoder_lr_scales(model.image_encoder, config.layer_decay) if config.layer_decay != 1.0 else {}
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = defaultdict(list)
    names: dict[tuple[float, bool], list[str]] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("image_encoder."):
            scale = config.encoder_lr_scale * encoder_scales.get(name[len("image_encoder."):], 1.0)
        else:
            scale = 1.0
        decay = name not in no_decay and config.weight_decay > 0
        grouped[(scale, decay)].append(param)
        names[(scale, decay)].append(name)
    groups = []
    for (scale, decay), params in sorted(grouped.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        groups.append({
            "params": params,
            "lr": config.lr * scale,
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr_scale": scale,
            "name": f"lr_x{scale:.4g}{'' if decay else '_no_decay'}",
            "param_names": names[(scale, decay)],
        })
    return groups


@dataclass
class WarmupSchedule:
    """Learning-rate multiplier per optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    ``step`` is the number of optimizer steps already taken (0 for the first). Warmup: ``(step + 1) /
    warmup_steps`` while ``step < warmup_steps``, so the full rate is reached at step ``warmup_steps - 1``.
    After it:

    * ``"step"``: ``step_gamma ** n`` where ``n`` counts the milestones ``round(f * total_steps)`` already
      reached (``step >= milestone``);
    * ``"cosine"``: from 1 at the end of the warmup to ``min_lr_ratio`` at ``total_steps``;
    * ``"constant"``: 1.

    The multiplier never goes below ``min_lr_ratio`` after the warmup.

    Attributes:
        total_steps: total optimizer steps of the run (Lightning's ``estimated_stepping_batches``).
        warmup_steps, schedule, step_milestones, step_gamma, min_lr_ratio: see :class:`OptimizerConfig`.
    """

    total_steps: int
    warmup_steps: int = 0
    schedule: str = "constant"
    step_milestones: tuple[float, ...] = ()
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.0

    @classmethod
    def from_config(cls, config: OptimizerConfig, total_steps: int | float) -> "WarmupSchedule":
        """Schedule of an :class:`OptimizerConfig` for a run of ``total_steps`` optimizer steps."""
        if config.schedule != "constant" and not math.isfinite(total_steps):
            raise ValueError(
                f"schedule {config.schedule!r} needs a finite number of training steps; set trainer.max_steps or "
                "trainer.max_epochs (or use optimizer.schedule: constant)"
            )
        total = int(total_steps) if math.isfinite(total_steps) else 0
        if config.warmup_steps >= total > 0:  # total is 0 for an open-ended run
            logger.warning(
                "optimizer.warmup_steps (%d) is not below the run's %d optimizer steps: the learning rate never "
                "reaches optimizer.lr (at most %.0f%% of it); lower optimizer.warmup_steps or raise trainer.max_steps",
                config.warmup_steps, total, 100.0 * total / config.warmup_steps,
            )
        return cls(total, config.warmup_steps, config.schedule, tuple(config.step_milestones), config.step_gamma,
                   config.min_lr_ratio)

    @property
    def milestones(self) -> list[int]:
        """Optimizer steps where the step schedule decays."""
        return [int(round(f * self.total_steps)) for f in self.step_milestones]

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "step":
            factor = self.step_gamma ** sum(step >= m for m in self.milestones)
        elif self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            factor = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.schedule == "constant":
            factor = 1.0
        else:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'step', 'cosine' or 'constant'")
        return max(factor, self.min_lr_ratio)


class WarmupLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over one :class:`WarmupSchedule` that, on resume, keeps the schedule of the current run.

    The schedule is a function of the configuration (``optimizer.*``) and of the trainer (``max_steps``), so a
    resumed run rebuilds it. Plain ``LambdaLR`` would overwrite it with the one saved in the checkpoint, and a run
    resumed with a longer ``trainer.max_steps``, another ``optimizer.lr`` or another warmup would silently keep the
    old ones (a cosine schedule would sit at its floor for every added step). Here the checkpoint restores the
    position (the optimizer steps taken) and the current schedule and base rates apply from the first resumed step
    on; when they differ from the checkpoint's, a warning names each change. With an unchanged configuration the
    resumed rates are exactly those of an uninterrupted run.

    Construct it as ``WarmupLR(optimizer, schedule)``.
    """

    @property
    def schedule(self) -> WarmupSchedule:
        return self.lr_lambdas[0]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved_lambdas = state.pop("lr_lambdas", None) or [None]
        saved_base = state.pop("base_lrs", None)
        changes = []
        if isinstance(saved_lambdas[0], dict):
            current = dataclasses.asdict(self.schedule)
            for key, value in current.items():
                old = saved_lambdas[0].get(key, value)
                if (tuple(old) if isinstance(old, (list, tuple)) else old) != value:
                    changes.append(f"{key} {old} -> {value}")
        if saved_base is not None and [float(v) for v in saved_base] != [float(v) for v in self.base_lrs]:
            changes.append(f"base learning rates {list(saved_base)} -> {list(self.base_lrs)}")
        super().load_state_dict({**state, "lr_lambdas": [None] * len(self.lr_lambdas)})
        if changes:
            # The optimizer's state (restored before the scheduler's, as Lightning does) holds the old rates.
            rates = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
            for group, base, rate in zip(self.optimizer.param_groups, self.base_lrs, rates):
                group["lr"], group["initial_lr"] = rate, base
            self._last_lr = rates
            logger.warning(
                "resuming at optimizer step %d with a learning-rate schedule other than the checkpoint's (%s): "
                "the current configuration applies from this step on", self.last_epoch, "; ".join(changes),
            )
