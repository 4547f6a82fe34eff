"""The SAM paper's mask losses: focal + dice at 20:1 and IoU regression, with the min over multimask outputs.

Per output mask (``[..., h, w]`` logits against a ``{0, 1}`` target):

* focal: the sigmoid focal loss (Lin et al.) ``-alpha_t (1 - p_t)^gamma log(p_t)``, MEAN over the mask's pixels;
  ``alpha_t = alpha`` on foreground and ``1 - alpha`` on background (``alpha=None`` disables the weighting).
* dice: the standard soft dice with smoothing 1, ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``, where
  ``p = sigmoid(logits)``; sums over the mask's pixels.
* IoU regression: squared error between the predicted IoU and the actual IoU of the output mask, the latter
  computed from the thresholded prediction (logits > 0) and detached. An empty prediction of an empty target
  has IoU 1.

Resolution (``SamLoss(resolution=...)``): ``"low"`` (default, fast) compares at the logits' resolution
(256x256), the ground truth being downsampled by area interpolation and kept where at least half covered;
``"gt"`` compares at the ground truth's resolution, the logits being bilinearly upsampled
(``align_corners=False``).

The losses return SUMS over the valid masks; dividing by the number of valid masks across all devices is the
caller's job. :class:`SamLoss` computes in fp32 whatever the dtype of the model's outputs. Nothing here calls
``torch.distributed`` or synchronises with the host.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from samtune.prompts.geometry import check_masks, mask_iou, resize_logits, resize_masks

Resolution = Literal["low", "gt"]

__all__ = [
    "Resolution",
    "SamLoss",
    "dice_loss",
    "iou_regression_loss",
    "mask_iou",
    "sigmoid_focal_loss",
]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss averaged over the last two (pixel) dimensions.

    Args:
        logits: ``[..., h, w]`` float.
        targets: ``[..., h, w]`` float in {0, 1} (broadcastable to ``logits``).
        alpha: weight of the foreground pixels (background: ``1 - alpha``); None for no weighting.
        gamma: focusing exponent.

    Returns:
        ``[...]`` per-mask mean focal loss.
    """
    targets = targets.to(logits.dtype)
    # With z = logits for foreground pixels and -logits for background: p_t = sigmoid(z),
    # -log(p_t) = softplus(-z) and 1 - p_t = sigmoid(-z). Fewer passes over the pixels than the textbook form.
    z = logits * (2 * targets - 1)
    one_minus_pt = torch.sigmoid(-z)
    modulator = one_minus_pt * one_minus_pt if gamma == 2.0 else one_minus_pt.pow(gamma)
    loss = F.softplus(-z) * modulator
    if alpha is not None:
        loss = loss * ((1 - alpha) + (2 * alpha - 1) * targets)
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` per mask.

    Args:
        logits: ``[..., h, w]`` float.
        targets: ``[..., h, w]`` float in {0, 1} (broadcastable to ``logits``).
        smooth: additive smoothing of numerator and denominator.

    Returns:
        ``[...]``.
    """
    targets = targets.to(logits.dtype).expand_as(logits)
    prob = torch.sigmoid(logits)
    inter = (prob * targets).sum(dim=(-2, -1))
    total = prob.sum(dim=(-2, -1)) + targets.sum(dim=(-2, -1))
    return 1 - (2 * inter + smooth) / (total + smooth)


def iou_regression_loss(iou_pred: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error between predicted IoUs and the (detached) actual IoUs of the thresholded masks.

    Args:
        iou_pred: ``[...]`` predicted IoU.
        logits: ``[..., h, w]`` mask logits (thresholded at 0).
        targets: ``[..., h, w]`` bool ground truth (broadcastable).

    Returns:
        ``[...]``.
    """
    with torch.no_grad():
        actual = mask_iou(logits.detach() > 0, targets)
    return (iou_pred - actual.to(iou_pred.dtype)) ** 2


class SamLoss(nn.Module):
    """SAM's training loss for one round of prompts: ``focal_weight * focal + dice_weight * dice + iou_weight * iou``.

    Ambiguity-aware: where several outputs are candidates (multimask, 3 outputs for one point), all are
    scored with ``focal_weight * focal + dice_weight * dice`` and only the lowest is back-propagated through
    the mask losses; the IoU loss covers every candidate (mean over the mask's candidates).

    Args:
        focal_weight: weight of the focal loss (20 in the paper).
        dice_weight: weight of the dice loss (1).
        iou_weight: weight of the IoU regression loss (1).
        focal_alpha: focal foreground weight; None disables it.
        focal_gamma: focal focusing exponent.
        dice_smooth: dice smoothing.
        resolution: ``"low"``: compare at the logits' resolution (GT area-downsampled, >= 0.5);
            ``"gt"``: compare at the GT resolution (logits bilinearly upsampled).
    """

    def __init__(
        self,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float | None = 0.25,
        focal_gamma: float = 2.0,
        dice_smooth: float = 1.0,
        resolution: Resolution = "low",
    ) -> None:
        super().__init__()
        if resolution not in ("low", "gt"):
            raise ValueError(f"resolution must be 'low' or 'gt', got {resolution!r}")
        if focal_alpha is not None and not 0.0 <= focal_alpha <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1] or None, got {focal_alpha}")
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.iou_weight = iou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.dice_smooth = dice_smooth
        self.resolution: Resolution = resolution

    @staticmethod
    def candidates(
        num_outputs: int, multimask: bool | torch.Tensor, num_masks: int, device: torch.device
    ) -> torch.Tensor:
        """Which outputs of each mask compete in the min.

        Args:
            num_outputs: C, the number of outputs per mask: 1 (single), 3 (multimask) or 4 (all tokens: token 0
                single-mask output, then tokens 1..3).
            multimask: bool for C in {1, 3}; a ``[M]`` bool tensor for C == 4 (True: tokens 1..3, False: token 0).
            num_masks: M.
            device: device of the result.

        Returns:
            ``[M, C]`` bool.
        """
        if isinstance(multimask, torch.Tensor):
            if num_outputs != 4 or multimask.dtype != torch.bool or multimask.shape != (num_masks,):
                raise ValueError(
                    "a per-mask multimask tensor needs 4 outputs (token 0 then tokens 1..3) and shape "
                    f"[M]={num_masks} bool; got C={num_outputs}, multimask {multimask.dtype} {tuple(multimask.shape)}"
                )
            multi = multimask.to(device)[:, None]
            is_single_token = torch.arange(4, device=device)[None] == 0
            return torch.where(multi, ~is_single_token, is_single_token)
        expected = 3 if multimask else 1
        if num_outputs != expected:
            raise ValueError(
                f"multimask={multimask} expects {expected} output(s) per mask, got C={num_outputs} "
                "(pass a per-mask bool tensor with 4 outputs)"
            )
        return torch.ones((num_masks, num_outputs), dtype=torch.bool, device=device)

    def forward(
        self,
        low_res_logits: torch.Tensor,
        iou_pred: torch.Tensor,
        gt_masks: torch.Tensor,
        valid: torch.Tensor,
        multimask: bool | torch.Tensor = False,
    ) -> dict[str, torch.Tensor]:
        """Loss sums over the valid masks.

        Args:
            low_res_logits: ``[M, C, h, w]`` mask logits.
            iou_pred: ``[M, C]`` predicted IoUs.
            gt_masks: ``[M, H, W]`` bool ground truth.
            valid: ``[M]`` bool; False for padding masks, which contribute exactly nothing.
            multimask: see :meth:`candidates`.

        Returns:
            ``focal``, ``dice``, ``iou`` (unweighted sums over valid masks of the selected output's losses),
            ``loss`` (the weighted sum) and ``num_masks`` (number of valid masks, a tensor); all 0-d tensors, fp32
            (computed in fp32 for fp16 / bf16 inputs too).
        """
        if low_res_logits.ndim != 4:
            raise ValueError(f"low_res_logits must be [M, C, h, w], got {tuple(low_res_logits.shape)}")
        m, c = low_res_logits.shape[:2]
        if iou_pred.shape != (m, c):
            raise ValueError(f"iou_pred must be [M, C]=({m}, {c}), got {tuple(iou_pred.shape)}")
        check_masks(gt_masks, "gt_masks")
        if gt_masks.shape[0] != m:
            raise ValueError(f"gt_masks has {gt_masks.shape[0]} masks but low_res_logits has {m}")
        if valid.dtype != torch.bool or valid.shape != (m,):
            raise ValueError(f"valid must be a bool tensor [M]={m}, got {valid.dtype} {tuple(valid.shape)}")
        cand = self.candidates(c, multimask, m, low_res_logits.device)
        # In fp32 whatever the model's dtype: fp16 sums of a 256x256 mask pass 65504 (inf / inf in the dice), bf16
        # ones keep 8 bits. The cast is differentiable: gradients reach the half-precision outputs.
        low_res_logits, iou_pred = low_res_logits.float(), iou_pred.float()

        if self.resolution == "low":
            logits = low_res_logits
            targets = resize_masks(gt_masks, low_res_logits.shape[-2:])
        else:
            logits = resize_logits(low_res_logits, gt_masks.shape[-2:])
            targets = gt_masks
        targets = targets[:, None]  # [M, 1, h, w]
        target_f = targets.to(logits.dtype)

        focal = sigmoid_focal_loss(logits, target_f, self.focal_alpha, self.focal_gamma)  # [M, C]
        dice = dice_loss(logits, target_f, self.dice_smooth)  # [M, C]
        iou_err = iou_regression_loss(iou_pred, logits, targets)  # [M, C]

        score = (self.focal_weight * focal + self.dice_weight * dice).detach()
        best = torch.where(cand, score, torch.full_like(score, float("inf"))).argmin(dim=1, keepdim=True)
        focal_m = focal.gather(1, best)[:, 0]
        dice_m = dice.gather(1, best)[:, 0]
        iou_m = torch.where(cand, iou_err, torch.zeros_like(iou_err)).sum(dim=1) / cand.sum(dim=1)

        zero = torch.zeros_like(focal_m)
        focal_s = torch.where(valid, focal_m, zero).sum()
        dice_s = torch.where(valid, dice_m, zero).sum()
        iou_s = torch.where(valid, iou_m, zero).sum()
        loss = self.focal_weight * focal_s + self.dice_weight * dice_s + self.iou_weight * iou_s
        return {"loss": loss, "focal": focal_s, "dice": dice_s, "iou": iou_s, "num_masks": valid.sum()}
