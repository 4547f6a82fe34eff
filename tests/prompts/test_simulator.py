"""The interactive training simulation: schedule, token layout, feedback, sampling law, no grad, no host sync."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from samtune.losses import SamLoss
from samtune.prompts import (
    InteractiveSimulator,
    SimulationConfig,
    make_schedule,
    resize_masks,
    select_feedback,
)


def _masks(size: int = 64) -> torch.Tensor:
    """Five masks of two images: blob, border-touching, one pixel, empty, large."""
    gt = torch.zeros(5, size, size, dtype=torch.bool)
    gt[0, 10:30, 20:44] = True
    gt[1, 0:12, 50:64] = True
    gt[2, 33, 33] = True
    gt[4, 4:60, 2:58] = True
    gt[4, 20:30, 20:30] = False
    return gt


IMAGE_INDEX = torch.tensor([0, 0, 1, 1, 1])


def test_config_validation() -> None:
    assert SimulationConfig().num_prompt_tokens == 10
    with pytest.raises(ValueError, match="num_iterations=10 does not match"):
        SimulationConfig(num_iterations=10)
    with pytest.raises(ValueError, match="box_probability"):
        SimulationConfig(box_probability=1.5)
    with pytest.raises(ValueError, match="sample_resolution"):
        SimulationConfig(sample_resolution="high")  # type: ignore[arg-type]
    for noise in ({"box_noise_std_fraction": -0.1}, {"box_noise_std_fraction": float("nan")},
                  {"box_noise_max": float("nan")}):
        with pytest.raises(ValueError, match="box_noise_std_fraction and box_noise_max must be >= 0"):
            SimulationConfig(**noise)
    short = SimulationConfig(num_iterations=5, num_point_iterations=3, random_mask_only_iteration=False)
    assert short.num_prompt_tokens == 5


def test_schedule_positions() -> None:
    cfg = SimulationConfig()
    seen = set()
    for seed in range(300):
        sched = make_schedule(cfg, torch.Generator().manual_seed(seed))
        assert len(sched) == 11 and sched[0] == "first" and sched[-1] == "mask"
        assert sched.count("point") == 8 and sched.count("mask") == 2
        seen.add(sched.index("mask"))
    assert seen == set(range(1, 10))  # anywhere after the first round, before the final one
    fixed = make_schedule(SimulationConfig(num_iterations=10, random_mask_only_iteration=False), torch.Generator())
    assert fixed == ["first"] + ["point"] * 8 + ["mask"]


def test_rounds_tokens_and_feedback(fake_sam, embeddings) -> None:
    gt = _masks()
    sim = InteractiveSimulator()
    schedule = make_schedule(sim.config, torch.Generator().manual_seed(3))
    steps = list(sim.iterate(fake_sam, embeddings, IMAGE_INDEX, gt, torch.Generator().manual_seed(1), schedule))
    calls = fake_sam.calls
    assert [s.kind for s in steps] == schedule and len(calls) == 11

    # Round 0: one decoder call serving single and multimask outputs, no mask prompt.
    first = calls[0]
    assert first["return_all_tokens"] and first["mask_inputs"] is None
    labels0 = first["point_labels"]
    assert labels0.shape == (5, 2) and steps[0].low_res_logits.shape == (5, 4, 16, 16)
    for i in range(5):
        assert labels0[i].tolist() in ([1, -1], [2, 3], [-1, -1])
    assert labels0[3].tolist() == [-1, -1]  # the empty mask only gets padding
    multimask = steps[0].multimask
    assert isinstance(multimask, torch.Tensor)
    found = labels0[:, 0] != -1
    assert torch.equal(multimask[found], labels0[found, 0] == 1)
    boxes = first["point_coords"][labels0[:, 0] == 2]
    assert boxes.min() >= 0 and boxes.max() <= 63

    # Token counts: +1 per point round, unchanged by mask-only rounds; earlier tokens never change.
    expected_p = 2
    for it, (step, call) in enumerate(zip(steps, calls)):
        expected_p += step.kind == "point"
        assert call["point_labels"].shape == (5, expected_p) and call["point_coords"].shape == (5, expected_p, 2)
        assert torch.equal(call["point_labels"][:, :2], labels0)
        assert not call["coords_requires_grad"] and not call["mask_requires_grad"]
        if it > 0:
            assert not call["multimask_output"] and not call["return_all_tokens"]
            assert step.multimask is False and step.low_res_logits.shape == (5, 1, 16, 16)
            assert torch.equal(call["mask_inputs"], steps[it - 1].selected_logits)
            assert torch.equal(step.mask_inputs, steps[it - 1].selected_logits)
    assert expected_p == 10

    # The fed-back mask of round 0: highest predicted IoU among tokens 1..3 (multimask) or token 0.
    logits0, iou0 = steps[0].low_res_logits.detach(), steps[0].iou_pred.detach()
    for i in range(5):
        t = int(iou0[i, 1:].argmax()) + 1 if multimask[i] else 0
        assert torch.equal(steps[0].selected_logits[i, 0], logits0[i, t])
    assert not steps[0].selected_logits.requires_grad

    # Each new point lies in the error region of the previous fed-back mask (at the low-res grid).
    low_gt = resize_masks(gt, 16)
    for it in range(1, 11):
        if steps[it].kind != "point":
            continue
        prev = steps[it - 1].selected_logits[:, 0] > 0
        xy, lab = calls[it]["point_coords"][:, -1], calls[it]["point_labels"][:, -1]
        cols = ((xy[:, 0] + 0.5) / 4 - 0.5).round().long()
        rows = ((xy[:, 1] + 0.5) / 4 - 0.5).round().long()
        for i in range(5):
            err = prev[i] ^ low_gt[i]
            if lab[i] == -1:
                assert not err.any() and xy[i].tolist() == [0.0, 0.0]
            else:
                assert err[rows[i], cols[i]] and lab[i] == int(low_gt[i, rows[i], cols[i]])


def test_loss_is_sum_over_rounds_and_gradients_reach_the_model(fake_sam, embeddings) -> None:
    gt, valid = _masks(), torch.tensor([True, True, True, False, True])
    sim, loss_fn = InteractiveSimulator(), SamLoss()
    schedule = make_schedule(sim.config, torch.Generator().manual_seed(0))
    total = sim.loss(fake_sam, embeddings, IMAGE_INDEX, gt, valid, loss_fn, torch.Generator().manual_seed(5), schedule)
    manual = torch.zeros(())
    for step in sim.iterate(fake_sam, embeddings, IMAGE_INDEX, gt, torch.Generator().manual_seed(5), schedule):
        manual = manual + loss_fn(step.low_res_logits, step.iou_pred, gt, valid, step.multimask)["loss"]
    assert total["loss"].item() == pytest.approx(manual.item(), rel=1e-6)
    assert total["num_masks"].item() == 4
    assert torch.isfinite(total["loss"])
    total["loss"].backward()
    for name, p in fake_sam.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert fake_sam.mask_gain.grad.abs() > 0  # the fed-back mask is used, but as a constant input


def test_select_feedback_is_detached_highest_iou() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    iou = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.1]], requires_grad=True)
    out = select_feedback(logits, iou, True)
    assert not out.requires_grad
    assert torch.equal(out[0, 0], logits[0, 1].detach()) and torch.equal(out[1, 0], logits[1, 0].detach())


@pytest.mark.parametrize(("box_probability", "channels"), [(0.0, 3), (1.0, 1)])
def test_all_point_or_all_box_first_rounds(fake_sam, embeddings, box_probability: float, channels: int) -> None:
    sim = InteractiveSimulator(SimulationConfig(box_probability=box_probability))
    steps = list(sim.iterate(fake_sam, embeddings, IMAGE_INDEX, _masks(), torch.Generator().manual_seed(0)))
    assert steps[0].low_res_logits.shape[1] == channels
    labels0 = fake_sam.calls[0]["point_labels"]
    # Mask 3 is empty (padding). Mask 2 is one pixel, less than half of a cell of the 16x16 sampling grid: it keeps
    # that cell, so it gets a positive first click too.
    expected = [2, 2, 2, -1, 2] if box_probability else [1, 1, 1, -1, 1]
    assert labels0[:, 0].tolist() == expected
    out = SamLoss()(steps[0].low_res_logits, steps[0].iou_pred, _masks(), torch.ones(5, dtype=torch.bool),
                    steps[0].multimask)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("sample_resolution", ["low", "gt"])
def test_error_points_stay_in_the_unpadded_image(fake_sam, embeddings, sample_resolution: str) -> None:
    # The prediction covers the whole canvas: every pixel outside the mask is a false positive, most of them in the
    # padding, which the postprocessed mask (cropped to the image) never shows. Clicks belong in the image.
    fake_sam.background.data.fill_(20.0)
    gt = _masks()
    sizes = torch.tensor([[24, 40], [24, 40], [40, 24], [40, 24], [64, 64]])  # (h, w) model-input pixels
    gt[:4, 24:] = False
    gt[:2, :, 40:] = False
    gt[2:4, 40:] = False
    gt[2:4, :, 24:] = False
    sim = InteractiveSimulator(SimulationConfig(sample_resolution=sample_resolution, box_probability=0.0))
    for seed in range(3):
        list(sim.iterate(fake_sam, embeddings, IMAGE_INDEX, gt, torch.Generator().manual_seed(seed),
                         image_sizes=sizes))
        last = fake_sam.calls[-1]
        xy, labels = last["point_coords"][:, 2:], last["point_labels"][:, 2:]  # the error points
        real = labels != -1
        assert real[[0, 2, 3, 4]].all()  # false positives everywhere in the image: always a click
        assert (xy[..., 0][real] < sizes[:, 1, None].expand_as(real)[real]).all()
        assert (xy[..., 1][real] < sizes[:, 0, None].expand_as(real)[real]).all()
        fake_sam.calls.clear()


def test_gt_resolution_sampling_and_low_res_gt(fake_sam, embeddings) -> None:
    valid = torch.ones(5, dtype=torch.bool)
    sim = InteractiveSimulator(SimulationConfig(sample_resolution="gt"))
    out = sim.loss(fake_sam, embeddings, IMAGE_INDEX, _masks(), valid, SamLoss(), torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    # Masks given at the low-res size (16 for a 64 input): scale 4, same token layout.
    low = resize_masks(_masks(), 16)
    out = InteractiveSimulator().loss(fake_sam, embeddings, IMAGE_INDEX, low, valid, SamLoss(resolution="gt"),
                                      torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="must be square"):
        next(InteractiveSimulator().iterate(fake_sam, embeddings, IMAGE_INDEX, _masks()[:, :32], torch.Generator()))


def test_edge_cases_no_nan(fake_sam, embeddings) -> None:
    sim, loss_fn = InteractiveSimulator(), SamLoss()
    gt = torch.zeros(3, 64, 64, dtype=torch.bool)
    gt[0, 0, 0] = True  # one pixel in the corner (vanishes at low res: padding point)
    gt[1, :, 63] = True  # a border column
    # mask 2 empty and padding
    out = sim.loss(fake_sam, embeddings, torch.tensor([0, 1, 1]), gt, torch.tensor([True, True, False]), loss_fn,
                   torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in fake_sam.parameters())
    # An image with no valid masks at all, and a batch with no masks.
    none = sim.loss(fake_sam, embeddings, torch.tensor([0, 1, 1]), gt, torch.zeros(3, dtype=torch.bool), loss_fn,
                    torch.Generator().manual_seed(0))
    assert none["loss"].item() == 0 and none["num_masks"].item() == 0
    empty = sim.loss(fake_sam, embeddings, torch.zeros(0, dtype=torch.long), gt[:0], torch.zeros(0, dtype=torch.bool),
                     loss_fn, torch.Generator().manual_seed(0))
    assert empty["loss"].item() == 0


@contextlib.contextmanager
def _forbid_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every host-synchronising tensor operation raise while the block runs."""

    def boom(name: str):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host synchronisation: {name} called inside the simulation loop")

        return raiser

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "masked_select", "cpu", "numpy",
                 "__array__"):
        monkeypatch.setattr(torch.Tensor, name, boom(f"Tensor.{name}"))
    for name in ("nonzero", "masked_select", "argwhere", "unique"):
        monkeypatch.setattr(torch, name, boom(f"torch.{name}"))
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            raise AssertionError("host synchronisation: boolean-mask indexing inside the simulation loop")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)
    try:
        yield
    finally:
        monkeypatch.undo()


def test_forbid_host_sync_guard_catches_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.ones(3)
    with _forbid_host_sync(monkeypatch):
        with pytest.raises(AssertionError, match="Tensor.item"):
            x.sum().item()
        with pytest.raises(AssertionError, match="boolean-mask"):
            x[x > 0]
        with pytest.raises(AssertionError, match="__bool__"):
            bool(x.any())
    assert x.sum().item() == 3


def test_simulation_loop_and_loss_do_not_synchronise(monkeypatch, fake_sam, embeddings) -> None:
    sim, loss_fn, gt = InteractiveSimulator(), SamLoss(), _masks()
    valid = torch.tensor([True, True, True, False, True])
    schedule = make_schedule(sim.config, torch.Generator().manual_seed(0))  # the one host read, before the loop
    gen = torch.Generator().manual_seed(0)
    with _forbid_host_sync(monkeypatch):
        out = sim.loss(fake_sam, embeddings, IMAGE_INDEX, gt, valid, loss_fn, gen, schedule)
        out["loss"].backward()
    assert len(fake_sam.calls) == 11 and torch.isfinite(out["loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for torch.cuda.set_sync_debug_mode")
def test_no_cuda_sync_in_simulation_loop(fake_sam, embeddings) -> None:
    device = torch.device("cuda")
    model, emb, gt = fake_sam.to(device), embeddings.to(device), _masks().to(device)
    index, valid = IMAGE_INDEX.to(device), torch.tensor([True, True, True, False, True], device=device)
    sim, loss_fn = InteractiveSimulator(), SamLoss()
    gen = torch.Generator(device=device).manual_seed(0)
    schedule = make_schedule(sim.config, gen)  # the one host read, before the loop
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sim.loss(model, emb, index, gt, valid, loss_fn, gen, schedule)
        out["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).all().cpu()
