"""ClickIoU on hand-made cases: per-click IoU, NoC@85/90 with the cap, box IoU, IoU-head error, DDP reduction."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from samtune.metrics import ClickIoU, noc_tag, number_of_clicks
from samtune.prompts import EvaluationResult

IOUS = torch.tensor(
    [
        [0.50, 0.86, 0.95],  # NoC@85 = 2, NoC@90 = 3
        [0.90, 0.92, 0.93],  # 1, 1
        [0.10, 0.20, 0.30],  # never: capped at 3, 3
    ]
)


def test_number_of_clicks() -> None:
    assert number_of_clicks(IOUS, 0.85).tolist() == [2, 1, 3]
    assert number_of_clicks(IOUS, 0.90).tolist() == [3, 1, 3]
    assert number_of_clicks(torch.tensor([[0.9, 0.1]]), 0.85).tolist() == [1]  # first time reached counts


def test_click_iou_hand_values() -> None:
    metric = ClickIoU(num_clicks=3)
    pred = IOUS + torch.tensor([[0.1, -0.1, 0.0], [0.0, 0.0, 0.2], [0.0, 0.3, 0.0]])
    metric.update(IOUS, click_iou_pred=pred, box_ious=torch.tensor([0.8, 0.7, 0.6]),
                  box_iou_pred=torch.tensor([0.8, 0.9, 0.6]))
    out = metric.compute()
    assert out["iou_click_1"].item() == pytest.approx(0.5)
    assert out["iou_click_2"].item() == pytest.approx((0.86 + 0.92 + 0.2) / 3)
    assert out["iou_click_3"].item() == pytest.approx((0.95 + 0.93 + 0.3) / 3)
    assert out["noc_85"].item() == pytest.approx(2.0)
    assert out["noc_90"].item() == pytest.approx(7 / 3)
    assert out["nof_85"].item() == pytest.approx(1 / 3) and out["nof_90"].item() == pytest.approx(1 / 3)
    assert out["iou_box"].item() == pytest.approx(0.7)
    assert out["iou_pred_mae"].item() == pytest.approx((0.1 + 0.1 + 0.2 + 0.3 + 0.2) / 12)


def test_padding_masks_are_ignored_and_batches_accumulate() -> None:
    metric = ClickIoU(num_clicks=3)
    padded = torch.cat((IOUS, torch.zeros(2, 3)))
    metric.update(padded[:2], valid=torch.tensor([True, True]))
    metric.update(padded[2:], valid=torch.tensor([True, False, False]))
    out = metric.compute()
    assert out["noc_85"].item() == pytest.approx(2.0)
    assert "iou_box" not in out and "iou_pred_mae" not in out  # never given
    metric.reset()
    metric.update_from_result(EvaluationResult(IOUS[:1], IOUS[:1]))
    assert metric.compute()["iou_pred_mae"].item() == 0.0


def test_non_finite_values_in_padding_rows_are_ignored() -> None:
    """A padding row (valid=False) holding NaN / inf leaves every metric as if it were absent."""
    rows = torch.tensor([[0.5, 0.9], [float("nan"), float("inf")]])
    pred = torch.tensor([[0.6, 0.8], [float("inf"), float("nan")]])
    box = torch.tensor([0.7, float("nan")])
    padded, alone = ClickIoU(num_clicks=2), ClickIoU(num_clicks=2)
    padded.update(rows, torch.tensor([True, False]), click_iou_pred=pred, box_ious=box, box_iou_pred=box)
    alone.update(rows[:1], click_iou_pred=pred[:1], box_ious=box[:1], box_iou_pred=box[:1])
    expected = alone.compute()
    out = padded.compute()
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.isfinite(out[key]) and out[key].item() == pytest.approx(value.item()), key


def test_no_masks_gives_nan_not_a_perfect_score() -> None:
    metric = ClickIoU(num_clicks=2)
    metric.update(torch.zeros(0, 2))
    out = metric.compute()
    assert all(torch.isnan(out[k]) for k in ("iou_click_1", "iou_click_2", "noc_85", "nof_90", "dice_click_1"))


def test_states_merge_like_one_big_batch() -> None:
    a, b, whole = ClickIoU(num_clicks=3), ClickIoU(num_clicks=3), ClickIoU(num_clicks=3)
    a.update(IOUS[:1], box_ious=torch.tensor([0.3]))
    b.update(IOUS[1:], box_ious=torch.tensor([0.5, 0.7]))
    whole.update(IOUS, box_ious=torch.tensor([0.3, 0.5, 0.7]))
    a.merge_state(b)
    for key, value in whole.compute().items():
        assert a.compute()[key].item() == pytest.approx(value.item()), key


def test_bad_shapes_raise() -> None:
    metric = ClickIoU(num_clicks=3)
    with pytest.raises(ValueError, match="num_clicks=3"):
        metric.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="box_ious"):
        metric.update(torch.zeros(2, 3), box_ious=torch.zeros(3))
    with pytest.raises(ValueError, match="noc_thresholds"):
        ClickIoU(num_clicks=3, noc_thresholds=(85,))
    with pytest.raises(ValueError, match="must be distinct"):
        ClickIoU(num_clicks=3, noc_thresholds=(0.85, 0.85))


def test_noc_keys_name_each_threshold_exactly() -> None:
    """Thresholds that round to the same whole percent keep their own keys (0.85 and 0.851 used to share
    ``noc_85``, the second silently overwriting the first)."""
    assert [noc_tag(t) for t in (0.85, 0.9, 0.875, 0.851, 1.0)] == ["85", "90", "87.5", "85.1", "100"]
    metric = ClickIoU(num_clicks=3, noc_thresholds=(0.85, 0.851, 0.875))
    metric.update(IOUS)
    out = metric.compute()
    assert out["noc_85"].item() == pytest.approx(2.0)  # (2 + 1 + 3) / 3
    assert out["noc_85.1"].item() == pytest.approx(2.0)
    assert out["noc_87.5"].item() == pytest.approx(7 / 3)  # (3 + 1 + 3) / 3


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = ClickIoU(num_clicks=3)
        metric.update(IOUS[rank::world])
        out = metric.compute()  # syncs the sum states across both processes
        if rank == 0:
            queue.put({k: v.item() for k, v in out.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~15 s on 2 cores
def test_ddp_sync_with_two_processes() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    got = queue.get(timeout=10)
    whole = ClickIoU(num_clicks=3)
    whole.update(IOUS)
    for key, value in whole.compute().items():
        assert got[key] == pytest.approx(value.item()), key


def test_dice_equals_the_dice_of_the_masks() -> None:
    """dice_click_i / dice_box: the mean over masks of 2|A&B|/(|A|+|B|), computed here from the masks directly."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(6, 32, 32, generator=g) > 0.5
    preds = [torch.rand(6, 32, 32, generator=g) > 0.4 for _ in range(3)]
    preds[0][0] = False  # an empty prediction: IoU 0, Dice 0

    def iou(p: torch.Tensor) -> torch.Tensor:
        return (p & gt).sum((1, 2)) / (p | gt).sum((1, 2))

    def dice(p: torch.Tensor) -> torch.Tensor:
        return 2 * (p & gt).sum((1, 2)) / (p.sum((1, 2)) + gt.sum((1, 2)))

    metric = ClickIoU(num_clicks=2)
    metric.update(torch.stack([iou(preds[0]), iou(preds[1])], dim=1), box_ious=iou(preds[2]))
    out = metric.compute()
    assert out["dice_click_1"].item() == pytest.approx(dice(preds[0]).mean().item(), abs=1e-6)
    assert out["dice_click_2"].item() == pytest.approx(dice(preds[1]).mean().item(), abs=1e-6)
    assert out["dice_box"].item() == pytest.approx(dice(preds[2]).mean().item(), abs=1e-6)


def test_states_stay_float32_when_the_module_is_cast_to_bf16() -> None:
    """Lightning's ``bf16-true`` casts the whole LightningModule (``module.to(dtype=torch.bfloat16)``), the metric
    included: the sums must stay float32 (a bf16 mask count stops at 256, shifting every mean)."""
    holder = torch.nn.Module()
    holder.metric = ClickIoU(num_clicks=2)
    holder.to(dtype=torch.bfloat16)
    metric, reference = holder.metric, ClickIoU(num_clicks=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        ious = torch.rand(17, 2, generator=g)
        metric.update(ious)
        reference.update(ious)
    assert metric.num_masks.dtype == torch.float32 and metric.num_masks.item() == 510
    expected = reference.compute()
    for key, value in metric.compute().items():
        assert value.item() == pytest.approx(expected[key].item(), rel=1e-6), key
    metric.reset()
    assert metric.click_iou_sum.dtype == torch.float32
    assert metric.set_dtype(torch.float64).click_iou_sum.dtype == torch.float64  # an explicit upcast still works
