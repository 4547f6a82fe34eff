"""Multi-process training on CPU (gloo): DDP matches one process with the same global batch; no unused
parameters (DDP with find_unused_parameters=False); metrics and loss normalisation across processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from samtune.cli import run_lightning
from tests.conftest import REPO_ROOT
from tests.test_cli import quick_args, run_cli

# One deterministic prompt round (the exact GT box): the loss is a fixed function of weights and data, so the
# 2-process and 1-process runs can agree exactly (random prompts are drawn per rank).
DETERMINISTIC = [
    "--model.init_args.simulation.num_iterations", "1",
    "--model.init_args.simulation.num_point_iterations", "0",
    "--model.init_args.simulation.random_mask_only_iteration", "false",
    "--model.init_args.simulation.final_mask_only_iteration", "false",
    "--model.init_args.simulation.box_probability", "1.0",
    "--model.init_args.simulation.box_noise_std_fraction", "0.0",
    "--data.init_args.max_masks_per_image", "64",
]

STEPS = 3


class RecordRank(Callback):
    """Per rank and optimizer step: the batch's image ids, the logged (global) loss and the synchronised gradient
    norm, appended to ``<prefix><rank>.jsonl``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._record: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._record = {"image_ids": [str(i) for i in batch["image_id"]]}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.detach().flatten() for p in pl_module.parameters() if p.grad is not None]
        self._record["grad_norm"] = float(torch.cat(grads).norm())
        self._record["params_without_grad"] = sum(
            1 for p in pl_module.parameters() if p.requires_grad and p.grad is None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._record.update(step=trainer.global_step, loss=float(trainer.callback_metrics["train/loss"]),
                            num_masks=float(trainer.callback_metrics["train/num_masks"]))
        with open(f"{self.prefix}{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(self._record) + "\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        with open(f"{self.prefix}{trainer.global_rank}.val.json", "w") as handle:
            json.dump(metrics, handle)


def _read(path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def _args(batch_size: int, *extra: str) -> list[str]:
    recorder = {"class_path": "tests.test_distributed.RecordRank", "init_args": {"prefix": "rank"}}
    # 11 images: 8 train (4 steps of 2), 3 validate, an odd number: each rank's validation share is its own
    # (Lightning's DistributedSampler would pad one rank's with a repeat, which the summed metrics counted twice).
    return quick_args(*DETERMINISTIC, "--synthetic_data.num_images", "11", "--data.init_args.val_fraction", "0.27",
                      "--data.init_args.batch_size", str(batch_size),
                      "--trainer.callbacks", json.dumps([recorder]), "--trainer.logger", "false",
                      "--model.init_args.val_num_clicks", "2", *extra, steps=STEPS)


def test_ddp_two_processes_match_one_process(tmp_path, monkeypatch):
    """2 processes x batch 1 (strategy ddp, gloo, find_unused_parameters=False) == 1 process x batch 2: the same
    images per step, the same global loss and the same (all-reduced) gradient, so the same training."""
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    ddp_args = _args(1, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    result = subprocess.run([sys.executable, "-m", "samtune", *ddp_args], cwd=ddp_dir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    monkeypatch.chdir(single_dir)
    assert run_cli(_args(2)) == 0

    single = _read(single_dir / "rank0.jsonl")
    rank0, rank1 = _read(ddp_dir / "rank0.jsonl"), _read(ddp_dir / "rank1.jsonl")
    assert sorted(single) == sorted(rank0) == sorted(rank1) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        # data sharded: the two ranks split the single process's batch
        assert sorted(rank0[step]["image_ids"] + rank1[step]["image_ids"]) == sorted(single[step]["image_ids"])
        assert rank0[step]["image_ids"] != rank1[step]["image_ids"]
        # loss normalised by the global mask count: identical on both ranks and equal to the single process
        assert rank0[step]["num_masks"] == rank1[step]["num_masks"] == single[step]["num_masks"]
        assert rank0[step]["loss"] == pytest.approx(rank1[step]["loss"], rel=1e-6)
        assert rank0[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4)
        # DDP's averaged gradient equals the single-process gradient (a wrong normalisation scales it)
        assert rank0[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-3)
        assert rank0[step]["params_without_grad"] == 0
    # validation metrics synchronised over the processes: every rank reports the single-process values
    val_single = json.loads((single_dir / "rank0.val.json").read_text())
    for rank in (0, 1):
        val = json.loads((ddp_dir / f"rank{rank}.val.json").read_text())
        assert val["val/iou_click_1"] == pytest.approx(val_single["val/iou_click_1"], abs=1e-4)
        assert val["val/iou_box"] == pytest.approx(val_single["val/iou_box"], abs=1e-4)


class NaNOnRankOne(Callback):
    """Fills rank 1's images with NaN at optimizer step ``step``; per rank and step, a checksum of the trainable
    weights after the step and the skip count, appended to ``nan<rank>.jsonl``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 1:
            batch["images"].fill_(float("nan"))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        weights = [p.detach().double() for p in pl_module.parameters() if p.requires_grad]
        record = {"step": trainer.global_step, "checksum": float(sum((w * w).sum() for w in weights)),
                  "skipped": pl_module.skipped_nonfinite_steps}
        with open(f"nan{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def test_ddp_nonfinite_loss_on_one_process_is_skipped_by_all(tmp_path):
    """A NaN loss on one of 2 DDP processes skips that step on both (Lightning refuses a None loss under DDP, which
    ended the run): the run finishes, no weight moves at the skipped step (no weight decay or momentum either), and
    the processes' weights stay identical."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    inject = {"class_path": "tests.test_distributed.NaNOnRankOne", "init_args": {"step": 1}}
    args = quick_args(*DETERMINISTIC, "--data.init_args.batch_size", "1", "--trainer.callbacks", json.dumps([inject]),
                      "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.strategy", "ddp",
                      "--trainer.devices", "2", "--trainer.accelerator", "cpu", steps=STEPS)
    result = subprocess.run([sys.executable, "-m", "samtune", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "non-finite loss at step 1" in result.stderr
    rank0, rank1 = _read(tmp_path / "nan0.jsonl"), _read(tmp_path / "nan1.jsonl")
    assert sorted(rank0) == sorted(rank1) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert rank0[step]["checksum"] == rank1[step]["checksum"], step
    assert rank0[2]["checksum"] == rank0[1]["checksum"]  # the skipped step (the second) changed nothing
    assert rank0[3]["checksum"] != rank0[2]["checksum"]  # and training went on
    assert rank0[STEPS]["skipped"] == rank1[STEPS]["skipped"] == 1


@pytest.mark.parametrize("prompts", ["mixed", "box_only"])
def test_every_trainable_parameter_gets_a_gradient(prompts, tmp_path, monkeypatch):
    """What DDP with find_unused_parameters=False needs: a gradient for every trainable parameter every step,
    with the paper's mixed prompts (11 rounds) and with box-only prompts (no click embeddings in the graph)."""
    monkeypatch.chdir(tmp_path)
    extra = DETERMINISTIC if prompts == "box_only" else ["--model.init_args.simulation.num_iterations", "11",
                                                        "--model.init_args.simulation.num_point_iterations", "8",
                                                        "--model.init_args.simulation.random_mask_only_iteration",
                                                        "true", "--data.init_args.max_masks_per_image", "4"]
    recorder = {"class_path": "tests.test_distributed.RecordRank", "init_args": {"prefix": "rank"}}
    cli = run_lightning(quick_args(*extra, "--trainer.callbacks", json.dumps([recorder]), "--trainer.logger",
                                   "false", "--trainer.limit_val_batches", "0", steps=2), run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    records = _read(tmp_path / "rank0.jsonl")
    assert [r["params_without_grad"] for r in records.values()] == [0, 0]
