"""samtune.losses against hand-computed values; min over multimask; padding; resolutions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samtune.losses import SamLoss, dice_loss, iou_regression_loss, mask_iou, sigmoid_focal_loss


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _focal_px(x: float, t: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = _sig(x)
    p_t = p if t else 1 - p
    a_t = alpha if t else 1 - alpha
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


LOGITS = [[0.0, 2.0], [-1.0, 3.0]]
TARGET = [[1, 0], [0, 1]]


def test_focal_matches_hand_computation() -> None:
    expected = np.mean([_focal_px(LOGITS[i][j], TARGET[i][j]) for i in range(2) for j in range(2)])
    got = sigmoid_focal_loss(torch.tensor(LOGITS), torch.tensor(TARGET).float())
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Pixel (0, 0): p = 0.5, t = 1 -> 0.25 * 0.25 * ln 2
    one = sigmoid_focal_loss(torch.zeros(1, 1), torch.ones(1, 1))
    assert one.item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-6)
    no_alpha = sigmoid_focal_loss(torch.zeros(1, 1), torch.zeros(1, 1), alpha=None, gamma=0.0)
    assert no_alpha.item() == pytest.approx(math.log(2), rel=1e-6)


def test_dice_matches_hand_computation() -> None:
    p = np.array([[_sig(v) for v in row] for row in LOGITS])
    t = np.array(TARGET, dtype=float)
    expected = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert dice_loss(torch.tensor(LOGITS), torch.tensor(t)).item() == pytest.approx(expected, rel=1e-6)
    # Perfect, confident prediction of an empty mask: (0 + 1) / (0 + 0 + 1) -> loss ~ 0, never NaN.
    empty = dice_loss(torch.full((3, 3), -50.0), torch.zeros(3, 3))
    assert empty.item() == pytest.approx(0.0, abs=1e-6)


def test_mask_iou_and_iou_regression() -> None:
    pred = torch.tensor([[True, True], [False, False]])
    gt = torch.tensor([[True, False], [True, False]])
    assert mask_iou(pred, gt).item() == pytest.approx(1 / 3)
    assert mask_iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)).item() == 1.0
    logits = torch.tensor([[1.0, 0.5], [-1.0, -0.1]], requires_grad=True)  # > 0 -> pred above
    iou_pred = torch.tensor(0.8, requires_grad=True)
    err = iou_regression_loss(iou_pred, logits, gt)
    assert err.item() == pytest.approx((0.8 - 1 / 3) ** 2, rel=1e-6)
    err.backward()
    assert logits.grad is None  # the actual IoU is detached
    assert iou_pred.grad.item() == pytest.approx(2 * (0.8 - 1 / 3), rel=1e-6)


def _hand_total(logits: list[list[float]], target: list[list[int]], iou_pred: float) -> dict[str, float]:
    flat = [(logits[i][j], target[i][j]) for i in range(len(logits)) for j in range(len(logits[0]))]
    focal = float(np.mean([_focal_px(x, t) for x, t in flat]))
    p = np.array([_sig(x) for x, _ in flat])
    t = np.array([t for _, t in flat], dtype=float)
    dice = float(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    pred = np.array([x > 0 for x, _ in flat])
    inter, union = (pred & (t > 0)).sum(), (pred | (t > 0)).sum()
    iou = (iou_pred - inter / union) ** 2
    return {"focal": focal, "dice": dice, "iou": iou, "loss": 20 * focal + dice + iou}


def test_sam_loss_single_output_hand_values_and_sums() -> None:
    logits = torch.tensor(LOGITS)[None, None].repeat(2, 1, 1, 1)
    iou_pred = torch.tensor([[0.7], [0.7]])
    gt = torch.tensor(TARGET, dtype=torch.bool)[None].repeat(2, 1, 1)
    out = SamLoss()(logits, iou_pred, gt, torch.tensor([True, True]), multimask=False)
    hand = _hand_total(LOGITS, TARGET, 0.7)
    for key in ("focal", "dice", "iou", "loss"):
        assert out[key].item() == pytest.approx(2 * hand[key], rel=1e-5), key  # sums, not means
    assert out["num_masks"].item() == 2


def test_min_over_multimask_picks_lowest_and_only_it_gets_mask_gradient() -> None:
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2] = True
    good = torch.where(gt[0], 4.0, -4.0)
    logits = torch.stack((-good, good * 0.5, torch.zeros(4, 4)))[None].clone().requires_grad_(True)  # [1, 3, 4, 4]
    iou_pred = torch.tensor([[0.2, 0.9, 0.5]], requires_grad=True)
    loss = SamLoss()
    out = loss(logits, iou_pred, gt, torch.tensor([True]), multimask=True)
    focal_each = sigmoid_focal_loss(logits.detach(), gt[:, None].float())[0]
    dice_each = dice_loss(logits.detach(), gt[:, None].float())[0]
    assert int(torch.argmin(20 * focal_each + dice_each)) == 1
    assert out["focal"].item() == pytest.approx(focal_each[1].item(), rel=1e-6)
    assert out["dice"].item() == pytest.approx(dice_each[1].item(), rel=1e-6)
    # IoU loss: mean over the three candidates; actual IoUs 0, 1 and 0 (zeros -> empty prediction).
    assert out["iou"].item() == pytest.approx(((0.2 - 0) ** 2 + (0.9 - 1) ** 2 + (0.5 - 0) ** 2) / 3, rel=1e-5)
    out["loss"].backward()
    assert torch.all(logits.grad[0, 0] == 0) and torch.all(logits.grad[0, 2] == 0)
    assert logits.grad[0, 1].abs().sum() > 0
    assert torch.all(iou_pred.grad != 0)  # the IoU loss covers all three


def test_per_mask_multimask_with_all_tokens() -> None:
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[:, 1:3, 1:3] = True
    logits = torch.randn(2, 4, 4, 4).requires_grad_(True)
    iou_pred = torch.rand(2, 4).requires_grad_(True)
    multimask = torch.tensor([True, False])
    out = SamLoss()(logits, iou_pred, gt, torch.tensor([True, True]), multimask=multimask)
    out["loss"].backward()
    # Mask 0 (multimask): token 0 never gets gradient; exactly one of tokens 1..3 does.
    assert torch.all(logits.grad[0, 0] == 0)
    assert sum(bool(logits.grad[0, t].abs().sum() > 0) for t in (1, 2, 3)) == 1
    assert torch.all(iou_pred.grad[0, 0] == 0) and torch.all(iou_pred.grad[0, 1:] != 0)
    # Mask 1 (single): only token 0.
    assert torch.all(logits.grad[1, 1:] == 0) and logits.grad[1, 0].abs().sum() > 0
    assert torch.all(iou_pred.grad[1, 1:] == 0) and iou_pred.grad[1, 0] != 0
    # Same value as scoring the two masks separately.
    a = SamLoss()(logits[:1, 1:], iou_pred[:1, 1:], gt[:1], torch.tensor([True]), multimask=True)
    b = SamLoss()(logits[1:, :1], iou_pred[1:, :1], gt[1:], torch.tensor([True]), multimask=False)
    assert out["loss"].item() == pytest.approx((a["loss"] + b["loss"]).item(), rel=1e-6)


def test_padding_masks_contribute_nothing() -> None:
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, 2:5, 2:6] = True  # masks 1 and 2 are padding with empty GT
    logits = torch.randn(3, 1, 8, 8)
    logits[1] = 1e4
    logits[2] = -1e4
    logits.requires_grad_(True)
    iou_pred = torch.tensor([[0.5], [3.0], [-7.0]], requires_grad=True)
    valid = torch.tensor([True, False, False])
    out = SamLoss()(logits, iou_pred, gt, valid)
    ref = SamLoss()(logits[:1], iou_pred[:1], gt[:1], valid[:1])
    for key in ("loss", "focal", "dice", "iou"):
        assert out[key].item() == ref[key].item()
    assert out["num_masks"].item() == 1
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[1:] == 0)
    assert torch.all(iou_pred.grad[1:] == 0)
    none = SamLoss()(logits, iou_pred, gt, torch.zeros(3, dtype=torch.bool))
    assert all(none[k].item() == 0 for k in ("loss", "focal", "dice", "iou", "num_masks"))
    empty = SamLoss()(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1), gt[:0], valid[:0])
    assert empty["loss"].item() == 0 and empty["num_masks"].item() == 0


def test_resolution_low_downsamples_gt_by_area() -> None:
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, 0, 0:2] = True  # block (0,0): 2/4 covered -> kept
    gt[0, 2, 2] = True  # block (1,1): 1/4 covered -> dropped
    gt[0, 0:2, 3] = True  # block (0,1): 2/4 covered -> kept
    logits = torch.randn(1, 1, 2, 2)
    expected_target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    out = SamLoss(resolution="low")(logits, torch.zeros(1, 1), gt, torch.tensor([True]))
    assert out["focal"].item() == pytest.approx(sigmoid_focal_loss(logits[0], expected_target).item(), rel=1e-6)
    assert out["dice"].item() == pytest.approx(dice_loss(logits[0], expected_target).item(), rel=1e-6)


def test_resolution_gt_upsamples_logits_bilinearly() -> None:
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, 1:6, 2:7] = True
    logits = torch.randn(1, 1, 4, 4)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    out = SamLoss(resolution="gt")(logits, torch.full((1, 1), 0.3), gt, torch.tensor([True]))
    tgt = gt[:, None].float()
    assert out["focal"].item() == pytest.approx(sigmoid_focal_loss(up, tgt).item(), rel=1e-6)
    assert out["dice"].item() == pytest.approx(dice_loss(up, tgt).item(), rel=1e-6)
    assert out["iou"].item() == pytest.approx((0.3 - mask_iou(up > 0, gt[:, None]).item()) ** 2, rel=1e-5)
    # Same sizes: both resolutions agree.
    same = torch.randn(1, 1, 8, 8)
    a = SamLoss(resolution="gt")(same, torch.zeros(1, 1), gt, torch.tensor([True]))
    b = SamLoss(resolution="low")(same, torch.zeros(1, 1), gt, torch.tensor([True]))
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)


def test_weights_are_configurable() -> None:
    gt = torch.rand(2, 6, 6) > 0.5
    logits, iou_pred, valid = torch.randn(2, 1, 6, 6), torch.rand(2, 1), torch.tensor([True, True])
    base = SamLoss()(logits, iou_pred, gt, valid)
    custom = SamLoss(focal_weight=1.0, dice_weight=2.0, iou_weight=0.0)(logits, iou_pred, gt, valid)
    assert custom["loss"].item() == pytest.approx((base["focal"] + 2 * base["dice"]).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("c", "multimask", "match"),
    [(3, False, "expects 1"), (1, True, "expects 3"), (3, torch.tensor([True]), "4 outputs"), (4, True, "expects 3")],
)
def test_bad_output_counts_raise(c: int, multimask: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamLoss()(torch.zeros(1, c, 4, 4), torch.zeros(1, c), torch.zeros(1, 4, 4, dtype=torch.bool),
                  torch.tensor([True]), multimask=multimask)


def test_bad_inputs_raise_named_errors() -> None:
    logits, iou, gt = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1), torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="valid"):
        SamLoss()(logits, iou, gt, torch.tensor([1]))
    with pytest.raises(ValueError, match="gt_masks"):
        SamLoss()(logits, iou, gt.float(), torch.tensor([True]))
    with pytest.raises(ValueError, match="iou_pred"):
        SamLoss()(logits, torch.zeros(1, 3), gt, torch.tensor([True]))
    with pytest.raises(ValueError, match="resolution"):
        SamLoss(resolution="full")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_give_the_fp32_loss(dtype: torch.dtype) -> None:
    # A 256x256 prediction of a mask covering half the image or more: the dice sums pass 65504, fp16's largest value
    # (inf / inf = NaN), and bf16 keeps 8 bits of them. The losses are computed in fp32 whatever the model's dtype.
    gt = torch.ones(2, 256, 256, dtype=torch.bool)
    gt[1, :128] = False
    logits = torch.full((2, 1, 256, 256), 3.0).to(dtype)  # exactly representable: same input for both
    iou = torch.tensor([[0.875], [0.5]]).to(dtype)
    valid = torch.ones(2, dtype=torch.bool)
    half = SamLoss()(logits.requires_grad_(), iou, gt, valid)
    full = SamLoss()(logits.float(), iou.float(), gt, valid)
    for key in ("loss", "focal", "dice", "iou"):
        assert half[key].item() == pytest.approx(full[key].item(), rel=1e-6), key
        assert half[key].dtype == torch.float32
    half["loss"].backward()
    assert logits.grad is not None and logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
