"""PromptableSegmentationTask with ``adaptation``: applied before the optimiser, freeze flags vs the policy, frozen
BatchNorm statistics, small Lightning checkpoints that resume and load as adapter checkpoints."""
from __future__ import annotations

import io
import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from samtune.adapt import (
    AdaptationConfig,
    apply_adaptation,
    extract_adapter_checkpoint,
    is_adapter_checkpoint,
    load_adapter_checkpoint,
    trainable_state_dict,
)
from samtune.adapt.core import frozen_keys
from samtune.build import build_sam
from samtune.checkpoints import CheckpointError, save_checkpoint
from samtune.tasks import OptimizerConfig, PromptableSegmentationTask
from tests.tasks.test_task import SHORT, loader, make_batch, quick_trainer

CONSTANT = OptimizerConfig(schedule="constant", warmup_steps=0, weight_decay=0.05)
LORA = {"method": "lora", "lora_rank": 4, "freeze_policy": "decoder_only"}


def optimizer_of(task: PromptableSegmentationTask) -> torch.optim.Optimizer:
    return task.configure_optimizers()["optimizer"]


def test_adaptation_is_applied_before_the_optimiser_with_the_usual_groups():
    task = PromptableSegmentationTask("sam_tiny", simulation=SHORT, optimizer=CONSTANT, adaptation=LORA)
    assert task.hparams["adaptation"] == AdaptationConfig(**LORA).to_dict()  # plain dict, like the other groups
    assert isinstance(task.adaptation, AdaptationConfig)
    groups = optimizer_of(task).param_groups
    in_optimizer = {name for g in groups for name in g["param_names"]}
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert any("lora_A" in n for n in trainable) and not any(n.startswith("image_encoder.") and "lora_" not in n
                                                            for n in trainable)
    decay_of = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    assert all(decay_of[n] == 0.05 for n in trainable if "lora_" in n)  # LoRA matrices: normal weight decay
    assert task.frozen == {"image_encoder": False, "prompt_encoder": True, "mask_decoder": False}

    adapters = PromptableSegmentationTask("sam_tiny", simulation=SHORT, optimizer=CONSTANT,
                                          adaptation={"method": "adapter", "freeze_policy": "frozen"})
    decay_of = {name: g["weight_decay"] for g in optimizer_of(adapters).param_groups for name in g["param_names"]}
    assert set(decay_of) == {n for n, p in adapters.model.named_parameters() if p.requires_grad}
    assert all(("adapter." in n) for n in decay_of)
    assert all(decay_of[n] == (0.0 if n.endswith("bias") else 0.05) for n in decay_of)  # no decay on biases
    # gradients reach the LoRA / adapter weights through the training step
    loss = adapters.training_step(make_batch([2]), 0)
    loss.backward()
    assert all(p.grad is not None for n, p in adapters.model.named_parameters() if p.requires_grad)


def test_freeze_flags_may_only_restate_the_policy():
    with pytest.raises(ValueError, match=r"freeze_image_encoder=True contradicts the adaptation \(method 'lora'"):
        PromptableSegmentationTask("sam_tiny", freeze_image_encoder=True, adaptation=LORA)
    with pytest.raises(ValueError, match=r"freeze_mask_decoder=True contradicts .*'decoder_only'"):
        PromptableSegmentationTask("sam_tiny", freeze_mask_decoder=True,
                                   adaptation={"method": "none", "freeze_policy": "decoder_only"})
    task = PromptableSegmentationTask("sam_tiny", freeze_image_encoder=True, freeze_prompt_encoder=True,
                                      adaptation={"method": "none", "freeze_policy": "decoder_only"})
    assert task.frozen == {"image_encoder": True, "prompt_encoder": True, "mask_decoder": False}
    with pytest.raises(ValueError, match="adaptation: unknown keys"):
        PromptableSegmentationTask("sam_tiny", adaptation={"method": "lora", "rank": 4})


def test_adapted_tiny_vit_keeps_frozen_batchnorm_statistics():
    task = PromptableSegmentationTask("sam_tiny_vit_t", simulation=SHORT, adaptation=LORA)
    task.train()
    assert not task.frozen["image_encoder"] and task.model.image_encoder.training  # LoRA trains in the encoder
    bns = [m for m in task.model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert task.model.mask_decoder.training


def _fit(task, tmp_path, steps: int, ckpt_path: str | None = None):
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = quick_trainer(tmp_path, max_steps=steps, limit_val_batches=0, enable_checkpointing=True,
                            callbacks=[callback])
    trainer.fit(task, loader([2, 1], batches=2), ckpt_path=ckpt_path)
    return trainer, tmp_path / "ckpt" / "last.ckpt"


def test_checkpoints_are_small_resume_and_load_as_adapter_checkpoints(tmp_path):
    torch.manual_seed(0)
    base = save_checkpoint(build_sam("sam_tiny"), tmp_path / "base.pth")
    kwargs = dict(model="sam_tiny", checkpoint=str(base), simulation=SHORT, optimizer=CONSTANT, adaptation=LORA)
    task = PromptableSegmentationTask(**kwargs)
    trainer, last = _fit(task, tmp_path, steps=1)
    assert trainer.global_step == 1

    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    meta = ckpt["samtune_adapter"]
    assert (meta["model_name"], meta["base_checkpoint"], meta["complete"], meta["lightning"]) == \
        ("sam_tiny", str(base), False, True)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in trainable_state_dict(task.model)}
    trainable_bytes = sum(v.numel() * v.element_size() for v in trainable_state_dict(task.model).values())
    buffer = io.BytesIO()
    torch.save(ckpt["state_dict"], buffer)
    assert len(buffer.getvalue()) < trainable_bytes + 100_000 < 0.5 * os.path.getsize(base)
    # every frozen weight (LoRA-wrapped ones included) is bit-identical to the base file after training
    reference = apply_adaptation(build_sam("sam_tiny", base), LORA).state_dict()
    state = task.model.state_dict()
    frozen = frozen_keys(task.model)
    assert any(k.endswith("qkv.base_layer.weight") for k in frozen)
    assert [k for k in frozen if not torch.equal(reference[k], state[k])] == []

    # the .ckpt is an adapter checkpoint: the model rebuilt from it and the base matches the trained one
    assert is_adapter_checkpoint(last)
    rebuilt = load_adapter_checkpoint(last)
    task.model.eval()
    for key, value in task.model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    # standalone adapter files: from the task and extracted from the .ckpt (no optimiser state)
    for path in (task.save_adapter_checkpoint(tmp_path / "adapter.safetensors"),
                 extract_adapter_checkpoint(last, tmp_path / "extracted.pt")):
        assert set(load_adapter_checkpoint(path).state_dict()) == set(state)
    assert os.path.getsize(tmp_path / "extracted.pt") < os.path.getsize(last)

    # load_from_checkpoint restores the frozen base from the checkpoint file and the trained weights from the ckpt
    reloaded = PromptableSegmentationTask.load_from_checkpoint(last, map_location="cpu", weights_only=True)
    assert reloaded.adaptation == task.adaptation
    assert all(torch.equal(reloaded.model.state_dict()[k], v) for k, v in state.items())

    # resume: one more step from last.ckpt
    trainer, _ = _fit(PromptableSegmentationTask(**kwargs), tmp_path, steps=2, ckpt_path=str(last))
    assert trainer.global_step == 2

    # another adaptation, or a base file replaced by other weights of the same shapes: a clear error, not garbage
    with pytest.raises(CheckpointError, match="trained with adaptation .* use the same adaptation settings"):
        PromptableSegmentationTask.load_from_checkpoint(last, map_location="cpu", weights_only=True,
                                                        adaptation=LORA | {"lora_rank": 2})
    torch.manual_seed(1)
    save_checkpoint(build_sam("sam_tiny"), base)
    with pytest.raises(CheckpointError, match="not the ones the adapter was trained on"):
        PromptableSegmentationTask.load_from_checkpoint(last, map_location="cpu", weights_only=True)


def test_random_base_keeps_every_weight_in_the_checkpoint(tmp_path):
    task = PromptableSegmentationTask("sam_tiny", simulation=SHORT, optimizer=CONSTANT,
                                      adaptation={"method": "adapter", "freeze_policy": "frozen"})
    _, last = _fit(task, tmp_path, steps=1)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["samtune_adapter"]["complete"] is True
    assert set(ckpt["state_dict"]) >= {f"model.{k}" for k in task.model.state_dict()}
    rebuilt = load_adapter_checkpoint(last)  # no base needed: the checkpoint holds everything
    for key, value in task.model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    # its trainable weights alone could never be rebuilt on the random base: refused, nothing written
    with pytest.raises(CheckpointError, match="started from random weights"):
        extract_adapter_checkpoint(last, tmp_path / "extracted.pt")
    assert not (tmp_path / "extracted.pt").exists()
    with pytest.raises(ValueError, match="this task has no adaptation"):
        PromptableSegmentationTask("sam_tiny").save_adapter_checkpoint(tmp_path / "x.pt")
