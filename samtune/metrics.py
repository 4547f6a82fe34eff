"""Interactive-segmentation metrics (torchmetrics): IoU per click round, IoU after the box, NoC, IoU-head error.

* ``iou_click_{i}``: mean IoU after i clicks (i = 1..k).
* ``iou_box``: mean IoU after the ground-truth box alone (when box IoUs were given).
* ``dice_click_{i}``, ``dice_box``: the same rounds' mean Dice coefficient (DSC, the usual medical metric),
  per mask ``2 |A & B| / (|A| + |B|)``, which equals ``2 IoU / (1 + IoU)`` of the same mask.
* ``noc_{t}``: mean number of clicks to reach IoU >= t/100 (e.g. ``noc_85``, ``noc_90``, ``noc_87.5``: ``t`` is the
  threshold in percent, see :func:`noc_tag`); a mask that never reaches it within the k clicks counts k (the cap),
  as in the interactive-segmentation literature.
* ``nof_{t}``: fraction of masks that never reach IoU >= t/100 within the k clicks.
* ``iou_pred_mae``: mean absolute error between the IoU head's prediction and the actual IoU, over every
  round given (clicks and box).

States are sums with ``dist_reduce_fx="sum"``, so the metric is exact under DDP and works on any device.
Feed it the :class:`samtune.prompts.EvaluationResult` of :class:`samtune.prompts.InteractiveEvaluator`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from samtune.prompts.evaluator import EvaluationResult

__all__ = ["ClickIoU", "dice_from_iou", "noc_tag", "number_of_clicks"]


def dice_from_iou(iou: torch.Tensor) -> torch.Tensor:
    """Per-mask Dice coefficient from the same mask's IoU: ``2 IoU / (1 + IoU)`` (0 where IoU is 0)."""
    iou = iou.float()
    return 2.0 * iou / (1.0 + iou)


def noc_tag(threshold: float) -> str:
    """The name of a NoC / NoF threshold in metric keys: the threshold in percent, without trailing zeros
    (0.85 -> ``"85"``, 0.875 -> ``"87.5"``), so that distinct thresholds never share a key."""
    return f"{round(float(threshold) * 100, 6):g}"


def check_noc_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """``thresholds`` as floats; raises ``ValueError`` unless each is in (0, 1] and their tags are distinct."""
    values = tuple(float(t) for t in thresholds)
    if any(not 0.0 < t <= 1.0 for t in values):
        raise ValueError(f"noc_thresholds must be in (0, 1], got {list(thresholds)}")
    tags = [noc_tag(t) for t in values]
    if len(set(tags)) != len(tags):
        raise ValueError(f"noc_thresholds must be distinct, got {list(thresholds)}")
    return values


def number_of_clicks(click_ious: torch.Tensor, threshold: float) -> torch.Tensor:
    """Clicks needed to reach an IoU threshold, capped at the number of rounds.

    Args:
        click_ious: ``[M, k]`` IoU after clicks 1..k.
        threshold: IoU to reach (inclusive).

    Returns:
        ``[M]`` long in 1..k (k also when never reached).
    """
    reached = click_ious >= threshold
    first = reached.long().argmax(dim=1) + 1
    return torch.where(reached.any(dim=1), first, torch.full_like(first, click_ious.shape[1]))


class ClickIoU(Metric):
    """IoU per click round, IoU after the box, NoC@thresholds and the IoU head's mean absolute error.

    Args:
        num_clicks: k, the number of click rounds of every update.
        noc_thresholds: IoU thresholds of the NoC / NoF metrics.
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_clicks: int, noc_thresholds: Sequence[float] = (0.85, 0.90), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        self.noc_thresholds = check_noc_thresholds(noc_thresholds)
        self.num_clicks = num_clicks
        n_thr = len(self.noc_thresholds)
        self.add_state("click_iou_sum", torch.zeros(num_clicks), dist_reduce_fx="sum")
        self.add_state("click_dice_sum", torch.zeros(num_clicks), dist_reduce_fx="sum")
        self.add_state("box_dice_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("num_masks", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("noc_sum", torch.zeros(n_thr), dist_reduce_fx="sum")
        self.add_state("failures", torch.zeros(n_thr), dist_reduce_fx="sum")
        self.add_state("box_iou_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("num_box", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("iou_abs_err_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("num_iou_pred", torch.zeros(()), dist_reduce_fx="sum")

    def _apply(self, fn: Any, exclude_state: Sequence[str] = "") -> "ClickIoU":
        """Move the states with the module, but never below float32.

        ``module.to(dtype=torch.bfloat16)`` (Lightning's ``bf16-true`` / ``16-true``) would cast the sums too: a
        bf16 count stops growing at 256 masks and every mean would be off by percents.
        """
        this = super()._apply(fn, exclude_state)
        for key, default in this._defaults.items():
            if default.is_floating_point() and torch.finfo(default.dtype).bits < 32:
                this._defaults[key] = default.float()
            value = getattr(this, key)
            if value.is_floating_point() and torch.finfo(value.dtype).bits < 32:
                setattr(this, key, value.float())
        return this

    def update(
        self,
        click_ious: torch.Tensor,
        valid: torch.Tensor | None = None,
        click_iou_pred: torch.Tensor | None = None,
        box_ious: torch.Tensor | None = None,
        box_iou_pred: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one batch.

        Args:
            click_ious: ``[M, k]`` IoU after clicks 1..k.
            valid: ``[M]`` bool, False for padding masks (ignored whatever they hold, NaN and inf included); default
                all valid.
            click_iou_pred: ``[M, k]`` predicted IoUs of the click rounds.
            box_ious: ``[M]`` IoU after the box round.
            box_iou_pred: ``[M]`` predicted IoU of the box round.
        """
        if click_ious.ndim != 2 or click_ious.shape[1] != self.num_clicks:
            raise ValueError(f"click_ious must be [M, num_clicks={self.num_clicks}], got {tuple(click_ious.shape)}")
        m = click_ious.shape[0]
        if valid is None:
            valid = torch.ones(m, dtype=torch.bool, device=click_ious.device)
        if valid.shape != (m,):
            raise ValueError(f"valid must be [M]={m}, got {tuple(valid.shape)}")
        for name, value, shape in (
            ("click_iou_pred", click_iou_pred, (m, self.num_clicks)),
            ("box_ious", box_ious, (m,)),
            ("box_iou_pred", box_iou_pred, (m,)),
        ):
            if value is not None and value.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if (box_iou_pred is not None) and box_ious is None:
            raise ValueError("box_iou_pred needs box_ious")
        # Padding rows are selected out (torch.where), not multiplied by 0: a NaN / inf there must not reach the sums.
        keep = valid.to(device=click_ious.device, dtype=torch.bool)
        w = keep.float()
        ious = click_ious.float()

        def total(values: torch.Tensor) -> torch.Tensor:
            mask = keep.view(-1, *([1] * (values.dim() - 1)))
            return torch.where(mask, values.float(), torch.zeros((), device=values.device)).sum(dim=0)

        self.click_iou_sum += total(ious)
        self.click_dice_sum += total(dice_from_iou(ious))
        self.num_masks += w.sum()
        for i, threshold in enumerate(self.noc_thresholds):
            self.noc_sum[i] += total(number_of_clicks(ious, threshold).float())
            self.failures[i] += total((~(ious >= threshold).any(dim=1)).float())
        if box_ious is not None:
            self.box_iou_sum += total(box_ious)
            self.box_dice_sum += total(dice_from_iou(box_ious))
            self.num_box += w.sum()
        if click_iou_pred is not None:
            self.iou_abs_err_sum += total((click_iou_pred.float() - ious).abs()).sum()
            self.num_iou_pred += w.sum() * self.num_clicks
        if box_iou_pred is not None:
            self.iou_abs_err_sum += total((box_iou_pred.float() - box_ious.float()).abs())
            self.num_iou_pred += w.sum()

    def update_from_result(self, result: EvaluationResult, valid: torch.Tensor | None = None) -> None:
        """Accumulate an :class:`~samtune.prompts.EvaluationResult`.

        Args:
            result: the evaluator's output.
            valid: ``[M]`` bool, False for padding masks.
        """
        self.update(result.click_ious, valid, result.click_iou_pred, result.box_ious, result.box_iou_pred)

    def compute(self) -> dict[str, torch.Tensor]:
        """The metrics (see the module docstring); box and IoU-head entries only when such data was given.

        Without any mask the click entries are NaN, not 0: a NoC of 0 would read as a perfect score.
        """
        n = torch.where(self.num_masks > 0, self.num_masks, torch.full_like(self.num_masks, float("nan")))
        out: dict[str, torch.Tensor] = {}
        per_click, dice_per_click = self.click_iou_sum / n, self.click_dice_sum / n
        for i in range(self.num_clicks):
            out[f"iou_click_{i + 1}"] = per_click[i]
            out[f"dice_click_{i + 1}"] = dice_per_click[i]
        for i, threshold in enumerate(self.noc_thresholds):
            tag = noc_tag(threshold)
            out[f"noc_{tag}"] = self.noc_sum[i] / n
            out[f"nof_{tag}"] = self.failures[i] / n
        if self.num_box > 0:
            out["iou_box"] = self.box_iou_sum / self.num_box
            out["dice_box"] = self.box_dice_sum / self.num_box
        if self.num_iou_pred > 0:
            out["iou_pred_mae"] = self.iou_abs_err_sum / self.num_iou_pred
        return out
