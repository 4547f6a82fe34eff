"""Reliability through the CLI: atomic checkpoints, exact resume after a kill, non-finite losses."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from samtune.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from samtune.cli import run_lightning
from tests.conftest import REPO_ROOT
from tests.test_cli import quick_args, run_cli

# The full 11-iteration simulation with random boxes and clicks: resuming must reproduce its prompts too.
ALL_MASKS = ["--data.init_args.max_masks_per_image", "64"]


class RecordSteps(Callback):
    """Appends ``{"step", "image_ids", "loss", "lr"}`` per optimizer step to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids: list[Any] = []
        self._drawn: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._ids = [str(i) for i in batch["image_id"]]
        self._drawn = {"instance_ids": batch["instance_ids"].tolist(),  # the random mask subset
                       "pixels": float(batch["images"].double().sum())}  # the augmentation

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        record = {"step": trainer.global_step, "image_ids": self._ids, **self._drawn,
                  "loss": None if loss is None else float(loss),
                  "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class KillAtStep(Callback):
    """SIGKILLs its own process at the start of the batch after ``step`` optimizer steps (a hard crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveAt(Callback):
    """Saves ``path`` once, after ``step`` optimizer steps: at the start of the next batch (``when="start"``: the
    batch is in flight, as when Lightning's SLURM handler saves ``hpc_ckpt_*.ckpt`` on the pre-emption signal) or
    at the end of the step's batch (``when="end"``: where ModelCheckpoint saves)."""

    def __init__(self, step: int, path: str, when: str = "start") -> None:
        self.step, self.path, self.when = step, path, when
        self.done = False

    def _save(self, trainer: L.Trainer, when: str) -> None:
        if trainer.global_step == self.step and when == self.when and not self.done:
            trainer.save_checkpoint(self.path)
            self.done = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._save(trainer, "start")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._save(trainer, "end")


class InjectNaN(Callback):
    """Fills the images of the batch at optimizer step ``step`` with NaN, once."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.done = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.done:
            batch["images"].fill_(float("nan"))
            self.done = True


def _callbacks_arg(*callbacks: dict) -> list[str]:
    """``--trainer.callbacks`` replacing the recipe's list: a fixed-folder checkpoint every step + ``callbacks``."""
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpts", "every_n_train_steps": 1, "save_last": True, "save_top_k": 0}}
    return ["--trainer.callbacks", json.dumps([checkpoint, *callbacks])]


def _records(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


# ------------------------------------------------------------------------------------------- atomic writes
def test_atomic_save_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(4)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04partial")  # some bytes of a zip archive, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    atomic_torch_save({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_checkpoint_io_loads_weights_only_even_when_torch_is_told_otherwise(tmp_path, monkeypatch):
    """Resuming (``ckpt_path``) reads through the CheckpointIO with ``weights_only=None``; torch's default for None
    can be switched off by an environment variable, so the CheckpointIO asks for weights_only itself: a checkpoint
    holding an arbitrary Python object is refused, a plain one loads, and an explicit False is still honoured."""
    import argparse
    import pickle

    path = tmp_path / "x.ckpt"
    torch.save({"step": 1, "hook": argparse.Namespace(code="anything")}, path)
    plain = tmp_path / "plain.ckpt"
    torch.save({"step": 1, "w": torch.arange(3)}, plain)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    io = AtomicCheckpointIO()
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        io.load_checkpoint(path)
    assert torch.equal(io.load_checkpoint(plain)["w"], torch.arange(3))
    assert io.load_checkpoint(path, weights_only=False)["hook"].code == "anything"  # the caller's explicit choice


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def test_atomic_save_gives_the_mode_torch_save_gives(tmp_path, umask):
    """Not mkstemp's private 0o600: on a shared cluster others read and resume from the checkpoint."""
    old = os.umask(umask)
    try:
        torch.save({"step": 0}, tmp_path / "plain.ckpt")
        atomic_torch_save({"step": 1}, tmp_path / "atomic.ckpt")
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "io.ckpt")
        atomic_torch_save({"step": 3}, tmp_path / "atomic.ckpt")  # over an existing file
    finally:
        os.umask(old)
    expected = (tmp_path / "plain.ckpt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("atomic.ckpt", "io.ckpt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, (name, oct((tmp_path / name).stat().st_mode))
    assert torch.load(tmp_path / "atomic.ckpt", weights_only=True)["step"] == 3


def test_cli_trainer_writes_checkpoints_atomically(tmp_path, monkeypatch):
    """A crash while the CLI's Trainer saves over last.ckpt leaves the previous last.ckpt loadable."""
    monkeypatch.chdir(tmp_path)
    cli = run_lightning(quick_args(steps=2, *_callbacks_arg()), run=False)
    trainer = cli.trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.fit(cli.model, cli.datamodule)
    last = tmp_path / "ckpts" / "last.ckpt"
    before = torch.load(last, weights_only=False, map_location="cpu")
    assert before["global_step"] == 2

    def crashing_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04partial")
        raise RuntimeError("killed during save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="killed during save"):
        trainer.save_checkpoint(last)
    monkeypatch.undo()
    after = torch.load(last, weights_only=False, map_location="cpu")
    assert after["global_step"] == 2
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    assert not [p for p in last.parent.iterdir() if p.suffix == ".tmp"]


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_checkpoint_holds_the_final_step(tmp_path, monkeypatch, save_last):
    """Training goes on after the last validation (5 steps, validated at step 3): last.ckpt still holds step 5, a
    file (not a link to the best), and the best checkpoint keeps step 3."""
    monkeypatch.chdir(tmp_path)
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpts", "monitor": "val/iou_click_1", "mode": "max", "save_top_k": 1,
                                "save_last": save_last, "filename": "best"}}
    args = quick_args(steps=5, *["--trainer.callbacks", json.dumps([checkpoint])])
    assert run_cli([*args, "--trainer.val_check_interval", "3"]) == 0
    last, best = tmp_path / "ckpts" / "last.ckpt", tmp_path / "ckpts" / "best.ckpt"
    assert not last.is_symlink()
    final = torch.load(last, weights_only=True, map_location="cpu")
    earlier = torch.load(best, weights_only=True, map_location="cpu")
    assert (final["global_step"], earlier["global_step"]) == (5, 3)
    assert any(not torch.equal(earlier["state_dict"][k], v) for k, v in final["state_dict"].items())


def test_a_second_run_in_the_same_folder_says_where_its_last_checkpoint_is(tmp_path, monkeypatch, caplog):
    """The recipes' fixed checkpoint folder: a second (not resumed) run writes last-v1.ckpt, Lightning's versioned
    name, and last.ckpt stays the first run's; the documented `samtune evaluate / export --checkpoint
    .../last.ckpt` then silently used the earlier model. The run now says which file holds its final step."""
    monkeypatch.chdir(tmp_path)
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpts", "monitor": "val/iou_click_1", "mode": "max", "save_top_k": 1,
                                "save_last": True, "filename": "best"}}
    args = quick_args(steps=2, *["--trainer.callbacks", json.dumps([checkpoint])])
    with caplog.at_level(logging.WARNING, logger="samtune"):
        assert run_cli(args) == 0
        assert "earlier run" not in caplog.text
        assert run_cli(args) == 0
    second = tmp_path / "ckpts" / "last-v1.ckpt"
    assert torch.load(second, weights_only=True, map_location="cpu")["global_step"] == 2
    assert f"{second.name}" in caplog.text and "last.ckpt is an earlier run's" in caplog.text


def test_final_checkpoint_turns_itself_off_on_a_lightning_without_its_hooks(tmp_path, monkeypatch, caplog):
    """If a Lightning release renames the private ModelCheckpoint members FinalCheckpoint uses, the run warns when
    it starts and finishes normally (before, it would fail at the very end, after training)."""
    from samtune.callbacks import FinalCheckpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(FinalCheckpoint, "_NEEDED", (*FinalCheckpoint._NEEDED, "_renamed_in_a_later_release"))
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpts", "monitor": "val/iou_click_1", "mode": "max", "save_top_k": 1,
                                "filename": "best"}}
    with caplog.at_level(logging.WARNING, logger="samtune"):
        assert run_cli(quick_args(steps=2, *["--trainer.callbacks", json.dumps([checkpoint])])) == 0
    assert "FinalCheckpoint is off" in caplog.text and "ModelCheckpoint._renamed_in_a_later_release" in caplog.text


# ------------------------------------------------------------------------------------------------- resume
def test_resume_after_kill_continues_exactly(tmp_path, monkeypatch):
    """Killed (SIGKILL) after step 4 of 8, restarted with --ckpt_path last: steps 5..8 see the same images,
    learning rates and losses as an uninterrupted run (same weights, optimiser, schedule, data order and simulated
    prompts)."""
    steps, kill_at = 8, 4
    common = [*ALL_MASKS, "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "100"]
    # The interrupted run, in a subprocess that kills itself.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    record = {"class_path": "tests.test_reliability.RecordSteps", "init_args": {"path": "steps.jsonl"}}
    kill = {"class_path": "tests.test_reliability.KillAtStep", "init_args": {"step": kill_at}}
    args = quick_args(*common, *_callbacks_arg(record, kill), steps=steps)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "samtune", *args], cwd=interrupted, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert max(_records(interrupted / "steps.jsonl")) == kill_at
    ckpt = torch.load(interrupted / "ckpts" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == kill_at
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["batches"] == kill_at - 3  # 6 training images, batch 2: 3 steps per epoch

    # Restart in the same folder.
    monkeypatch.chdir(interrupted)
    assert run_cli([*args[:-len(_callbacks_arg(record, kill))], *_callbacks_arg(record), "--ckpt_path", "last"]) == 0
    resumed = _records(interrupted / "steps.jsonl")

    # The uninterrupted reference.
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    assert run_cli(quick_args(*common, *_callbacks_arg(record), steps=steps)) == 0
    reference = _records(reference_dir / "steps.jsonl")

    assert sorted(resumed) == sorted(reference) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed[step]["image_ids"] == reference[step]["image_ids"], step
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9), step
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4, abs=1e-6), step
    # every training image once per epoch, in a different order each epoch
    epochs = [sum((reference[s]["image_ids"] for s in range(e * 3 + 1, e * 3 + 4)), []) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 6 and epochs[0] != epochs[1]


def _resume_from_a_save(tmp_path: Path, monkeypatch, *extra: str, step: int, when: str, steps: int = 6
                        ) -> tuple[dict[int, dict], dict[int, dict], dict]:
    """One run of ``steps`` steps that saves ``mid.ckpt`` after ``step`` steps (:class:`SaveAt`) and goes on, then a
    run resumed from ``mid.ckpt``. Returns (the first run's records, the resumed run's records, the checkpoint)."""
    common = [*extra, "--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "100"]
    record = {"class_path": "tests.test_reliability.RecordSteps", "init_args": {"path": "steps.jsonl"}}
    save = {"class_path": "tests.test_reliability.SaveAt",
            "init_args": {"step": step, "path": str(tmp_path / "mid.ckpt"), "when": when}}
    for name in ("reference", "resumed"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "reference")
    assert run_cli(quick_args(*common, *_callbacks_arg(record, save), steps=steps)) == 0
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=True, map_location="cpu")
    monkeypatch.chdir(tmp_path / "resumed")
    assert run_cli([*quick_args(*common, *_callbacks_arg(record), steps=steps),
                    "--ckpt_path", str(tmp_path / "mid.ckpt")]) == 0
    return _records(tmp_path / "reference" / "steps.jsonl"), _records(tmp_path / "resumed" / "steps.jsonl"), ckpt


@pytest.mark.parametrize("accumulate, step, steps, in_flight", [(1, 4, 6, (1, 1)), (2, 3, 4, (1, 2))],
                         ids=["plain", "accumulate2"])
def test_checkpoint_saved_with_a_batch_in_flight_resumes_at_that_batch(tmp_path, monkeypatch, accumulate, step, steps,
                                                                       in_flight):
    """A checkpoint written while a batch is in flight (Lightning's SLURM pre-emption save, here at the start of
    the batch after step ``step``) records that batch as not trained: the resumed run trains it, then goes on as
    the uninterrupted run did. 3 batches per epoch; with 2 micro-batches per step, epoch 1's batches 0-1 make step
    3 and its last batch alone step 4."""
    reference, resumed, ckpt = _resume_from_a_save(
        tmp_path, monkeypatch, *ALL_MASKS, "--trainer.accumulate_grad_batches", str(accumulate), step=step,
        when="start", steps=steps)
    assert ckpt["global_step"] == step
    loader_state = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches"]) == in_flight  # (epoch, batch in flight)
    assert sorted(resumed) == list(range(step + 1, steps + 1))
    for k in resumed:
        assert resumed[k]["image_ids"] == reference[k]["image_ids"], k
        assert resumed[k]["loss"] == pytest.approx(reference[k]["loss"], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_draws_the_masks_and_augmentation_of_the_uninterrupted_run(tmp_path, monkeypatch, workers):
    """Random mask subsets (2 of each image's masks) and random augmentation, loaded in the main process or by 2
    workers: a run resumed mid-epoch (checkpoint with a batch in flight) trains on exactly the masks and augmented
    pixels the uninterrupted run drew, so its losses match too. Before, the main process drew each sample's seed
    from the global generator (reset by seed_everything on restart) and the workers' seeds from it as well."""
    reference, resumed, _ = _resume_from_a_save(
        tmp_path, monkeypatch, "--data.init_args.max_masks_per_image", "2",
        "--data.init_args.augmentation", "overhead", "--data.init_args.num_workers", str(workers),
        step=4, when="start")
    assert sorted(resumed) == [5, 6]
    for k in resumed:
        for key in ("image_ids", "instance_ids"):
            assert resumed[k][key] == reference[k][key], (k, key)
        assert resumed[k]["pixels"] == pytest.approx(reference[k]["pixels"], rel=1e-9), k
        assert resumed[k]["loss"] == pytest.approx(reference[k]["loss"], rel=1e-4, abs=1e-6), k
    assert len({str(reference[k]["instance_ids"]) for k in reference}) > 1


@pytest.mark.parametrize("when", ["start", "end"])
def test_resume_continues_the_random_streams_of_dropout_and_drop_path(tmp_path, monkeypatch, when):
    """With drop path and decoder dropout (the pretraining recipe's), the resumed steps draw the same dropout masks
    as the uninterrupted run: the checkpoint holds the global torch / numpy / python generators' states, restored
    when training starts. Before, the restarted process's generators were where seed_everything left them, so
    every resumed loss differed."""
    reference, resumed, ckpt = _resume_from_a_save(
        tmp_path, monkeypatch, *ALL_MASKS, "--model.init_args.drop_path_rate", "0.3",
        "--model.init_args.decoder_dropout", "0.3", step=4, when=when)
    assert {"torch", "numpy", "python"} <= set(ckpt["rng_states"])
    assert sorted(resumed) == [5, 6]
    for k in resumed:
        assert resumed[k]["image_ids"] == reference[k]["image_ids"], k
        assert resumed[k]["loss"] == pytest.approx(reference[k]["loss"], rel=1e-4, abs=1e-6), k


def test_resume_at_the_end_of_a_limited_epoch_starts_the_next_epoch_whole(tmp_path, monkeypatch):
    """With --trainer.limit_train_batches 2 (of 3), a checkpoint from the end of epoch 1 (step 4) resumes at the
    first batch of epoch 2, not after the 2 batches that epoch 1 trained."""
    reference, resumed, ckpt = _resume_from_a_save(tmp_path, monkeypatch, *ALL_MASKS,
                                                   "--trainer.limit_train_batches", "2", step=4, when="end")
    assert ckpt["global_step"] == 4
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step]["image_ids"] == reference[step]["image_ids"], step
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4, abs=1e-6), step


def test_resume_with_more_steps_follows_the_longer_schedule(tmp_path, monkeypatch, caplog):
    """A finished 4-step run resumed with --trainer.max_steps 8 continues on the cosine schedule of an 8-step run
    (the checkpoint's 4-step schedule sat at its floor), and the log says that the schedule changed."""
    monkeypatch.chdir(tmp_path)
    common = ["--model.init_args.optimizer.warmup_steps", "1", "--trainer.val_check_interval", "null",
              "--trainer.check_val_every_n_epoch", "100"]
    record = {"class_path": "tests.test_reliability.RecordSteps", "init_args": {"path": "steps.jsonl"}}
    assert run_cli(quick_args(*common, *_callbacks_arg(record), steps=4)) == 0
    with caplog.at_level(logging.WARNING, logger="samtune"):
        assert run_cli([*quick_args(*common, *_callbacks_arg(record), steps=8), "--ckpt_path", "last"]) == 0
    assert "total_steps 4 -> 8" in caplog.text
    resumed = _records(tmp_path / "steps.jsonl")
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    monkeypatch.chdir(reference_dir)
    assert run_cli(quick_args(*common, *_callbacks_arg(record), steps=8)) == 0
    reference = _records(reference_dir / "steps.jsonl")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):  # the lr each resumed step used: that of the 8-step run
        assert resumed[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9), step
    assert resumed[5]["lr"] > 5 * resumed[4]["lr"]  # the 4-step schedule had reached its floor (5% of the lr)


# ------------------------------------------------------------------------------------------ non-finite loss
def test_nan_loss_is_skipped_and_training_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    cli = run_lightning(quick_args(steps=4), run=False)
    cli.trainer.callbacks.append(InjectNaN(step=2))
    with caplog.at_level(logging.WARNING, logger="samtune"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 4  # the skipped batch updated nothing but counts as a step (as AMP's skips)
    assert cli.model.skipped_nonfinite_steps == 1
    assert any("non-finite loss at step 2" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    assert float(cli.trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0


def test_nan_policy_raise_stops_with_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    inject = {"class_path": "tests.test_reliability.InjectNaN", "init_args": {"step": 1}}
    code = run_cli(quick_args("--model.init_args.nan_policy", "raise", *_callbacks_arg(inject), steps=3))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-2].startswith("samtune: error: FloatingPointError: non-finite loss at step 1"), err
    assert "Traceback" not in "\n".join(err)


def test_resumable_sampler_shards_like_one_process_and_skips():
    from samtune.resumable import ResumableSampler

    data = list(range(10))
    single = list(ResumableSampler(data, 1, 0, seed=3))
    ranks = [list(ResumableSampler(data, 2, r, seed=3)) for r in range(2)]
    # step k of batch 2 per rank == step k of batch 4 in one process
    for k in range(2):
        assert sorted(ranks[0][2 * k:2 * k + 2] + ranks[1][2 * k:2 * k + 2]) == sorted(single[4 * k:4 * k + 4])
    sampler = ResumableSampler(data, 1, 0, seed=3)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != single and sorted(epoch1) == data
    sampler.start_index = 4
    assert list(sampler) == epoch1[4:]
    assert list(sampler) == epoch1  # the skip applies once


def test_ckpt_path_last_takes_a_newer_preemption_checkpoint(tmp_path, monkeypatch, caplog):
    """On SLURM's pre-emption signal Lightning saves <default_root_dir>/hpc_ckpt_<n>.ckpt, not last.ckpt: the
    documented restart (--ckpt_path last) continues from it when it is newer (it trained the steps since the last
    periodic save again), and from last.ckpt when that is newer (an old pre-emption save)."""
    monkeypatch.chdir(tmp_path)
    common = ["--trainer.val_check_interval", "null", "--trainer.check_val_every_n_epoch", "100"]
    record = {"class_path": "tests.test_reliability.RecordSteps", "init_args": {"path": "steps.jsonl"}}
    assert run_cli(quick_args(*common, *_callbacks_arg(), steps=2)) == 0
    early = (tmp_path / "ckpts" / "last.ckpt").read_bytes()  # the periodic save, at step 2
    assert run_cli([*quick_args(*common, *_callbacks_arg(), steps=4), "--ckpt_path", "last"]) == 0
    os.replace(tmp_path / "ckpts" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt")  # the pre-emption save, step 4
    (tmp_path / "ckpts" / "last.ckpt").write_bytes(early)
    os.utime(tmp_path / "ckpts" / "last.ckpt", (1e9, 1e9))  # older than the pre-emption save
    with caplog.at_level(logging.INFO, logger="samtune"):
        assert run_cli([*quick_args(*common, *_callbacks_arg(record), steps=5), "--ckpt_path", "last"]) == 0
    assert "resuming from the pre-emption checkpoint" in caplog.text and "hpc_ckpt_1.ckpt" in caplog.text
    assert sorted(_records(tmp_path / "steps.jsonl")) == [5]  # continued after step 4, not after step 2
    # Now last.ckpt (step 5) is the newest: the old pre-emption save is ignored.
    os.utime(tmp_path / "hpc_ckpt_1.ckpt", (1e9, 1e9))
    assert run_cli([*quick_args(*common, *_callbacks_arg(record), steps=6), "--ckpt_path", "last"]) == 0
    assert sorted(_records(tmp_path / "steps.jsonl")) == [5, 6]


def _batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def test_resumable_loader_counts_the_batches_trained_not_handed_out():
    """The saved position is what ``trained_batches`` reports (Lightning's count of completed training steps),
    never more than was handed out; before a pass of the sampler's epoch begins, where that pass will start."""
    from samtune.resumable import make_resumable

    loader = make_resumable(DataLoader(list(range(10)), batch_size=2, shuffle=True), seed=3)
    iterator = iter(loader)
    next(iterator), next(iterator)  # batch 1 is in flight
    assert loader.state_dict()["batches"] == 2  # on its own, the loader knows only what it handed out
    trained = [1]
    loader.trained_batches = lambda: trained[0]
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches"]) == (0, 1)
    trained[0] = 7  # a count that ran ahead of the loader (never happens in Lightning) is capped
    assert loader.state_dict()["batches"] == 2
    loader.sampler.set_epoch(1)  # the next epoch, not begun: its start, whatever the count says
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches"]) == (1, 0)
    loader.load_state_dict({"epoch": 0, "batches": 3, "seed": 3, "num_replicas": 1})
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches"]) == (0, 3)  # restored, not begun


def test_resumable_loader_restored_at_the_end_of_a_limited_epoch_starts_the_next_epoch_whole():
    """``limit_train_batches=2`` of 3: the checkpoint says epoch 0, 2 batches; Lightning, for which epoch 0 is
    complete, then sets epoch 1, which must start at its first batch."""
    from samtune.resumable import make_resumable

    def build():
        return make_resumable(DataLoader(list(range(6)), batch_size=2, shuffle=True), seed=3)

    reference = build()
    reference.sampler.set_epoch(1)
    epoch1 = _batches(reference)
    loader = build()
    loader.load_state_dict({"epoch": 0, "batches": 2, "seed": 3, "num_replicas": 1})
    loader.sampler.set_epoch(0)  # mid-epoch resume: Lightning sets the restored epoch, the skip stays
    assert _batches(loader) == _batches(build())[2:]
    loader.load_state_dict({"epoch": 0, "batches": 2, "seed": 3, "num_replicas": 1})
    loader.sampler.set_epoch(1)
    assert _batches(loader) == epoch1


def test_resumable_loader_resumes_the_checkpoints_order_under_another_seed(caplog):
    """A run resumed with another ``seed_everything`` (``seed_everything: true`` draws a new one every start)
    continues the interrupted run's permutation and sample seeds from the checkpoint's seed: with the new seed the
    skip applied to another order, and images of the epoch were trained twice while others were never seen."""
    from samtune.resumable import make_resumable

    def build(seed: int):
        return make_resumable(DataLoader(list(range(12)), batch_size=2, shuffle=True), seed=seed)

    interrupted = build(3)
    state = (next(iter(interrupted)), interrupted.state_dict())[1]
    resumed = build(11)
    with caplog.at_level(logging.WARNING, logger="samtune"):
        resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0)
    rest = list(resumed)
    assert [b.tolist() for b in rest] == _batches(build(3))[1:]
    assert {i.sample_key for i in resumed.sampler} == {(3, 0)}
    assert resumed.state_dict()["seed"] == 3 and "seed 3" in caplog.text


def _sample_draws(loader) -> list[tuple]:
    return [(tuple(b["image_id"]), b["instance_ids"].tolist(), b["boxes"].tolist()) for b in loader]


def test_resumable_loader_with_workers_resumes_the_samples_exactly(tmp_path, monkeypatch):
    """Random mask choice and augmentation, loaded by 2 persistent workers: a loader restored mid-epoch 1 gives the
    rest of the epoch exactly as the uninterrupted loader did (its workers start elsewhere in the epoch), and a
    loader without workers gives the same samples."""
    from samtune.data import MaskFolderDataset, collate_samples, worker_init
    from samtune.resumable import make_resumable
    from tests.data.conftest import write_mask_folder

    monkeypatch.delenv("RANK", raising=False)
    images, masks = write_mask_folder(tmp_path, n=3, size=(48, 64))
    dataset = MaskFolderDataset(images, masks, image_size=32, train=True, augmentation="overhead",
                                max_masks_per_image=1, repeats=4)

    def build(workers: int):
        return make_resumable(DataLoader(dataset, batch_size=2, shuffle=True, num_workers=workers,
                                         collate_fn=collate_samples, worker_init_fn=worker_init(),
                                         persistent_workers=workers > 0), seed=5)

    uninterrupted = build(2)
    epochs = []
    for epoch in range(2):
        uninterrupted.sampler.set_epoch(epoch)
        epochs.append(_sample_draws(uninterrupted))
    assert epochs[0] != epochs[1] and len({str(d[1:]) for d in epochs[1]}) > 2
    torch.manual_seed(99)  # the resumed process's global generator is elsewhere
    resumed = build(2)
    resumed.load_state_dict({"epoch": 1, "batches": 1, "seed": 5, "num_replicas": 1})
    resumed.sampler.set_epoch(1)
    assert _sample_draws(resumed) == epochs[1][1:]
    single = build(0)
    single.sampler.set_epoch(1)
    assert _sample_draws(single) == epochs[1]


def test_resumable_loader_resumed_with_another_batch_size_continues_at_the_same_sample():
    """The checkpoint's position is in samples: a run resumed with another batch size (e.g. smaller after an
    out-of-memory error) skips the images the interrupted run trained, not ``batches * new batch size`` of them;
    and a position saved by the resumed run (Lightning's count includes the restored batches) stays in samples."""
    from samtune.resumable import make_resumable

    def build(batch_size: int):
        return make_resumable(DataLoader(list(range(24)), batch_size=batch_size, shuffle=True), seed=3)

    order = [i for b in _batches(build(4)) for i in b]
    interrupted = build(4)
    iterator = iter(interrupted)
    for _ in range(3):
        next(iterator)
    state = interrupted.state_dict()  # 12 samples trained
    resumed = build(3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0)
    iterator = iter(resumed)
    first = next(iterator).tolist()
    assert first == order[12:15]
    resumed.trained_batches = lambda: state["batches"] + 1  # Lightning: the 3 restored batches and 1 new one
    again = build(2)
    again.load_state_dict(resumed.state_dict())  # 15 samples trained
    again.sampler.set_epoch(0)
    assert [i for b in _batches(again) for i in b] == order[15:]
