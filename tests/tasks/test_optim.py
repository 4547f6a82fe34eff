"""Optimiser parameter groups (weight decay, layer-wise lr decay, encoder lr scale, freezing) and lr schedules."""
from __future__ import annotations

import math

import pytest
import torch

from samtune.build import build_sam
from samtune.tasks import OptimizerConfig, PromptableSegmentationTask, WarmupSchedule, no_weight_decay_names
from samtune.tasks.optim import encoder_lr_scales, param_groups


def _group_of(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["param_names"]}


def test_no_weight_decay_on_norms_biases_embeddings_and_position_tables() -> None:
    model = build_sam("sam_tiny")
    groups = param_groups(model, OptimizerConfig(weight_decay=0.1))
    by_name = _group_of(groups)
    no_decay = [
        "image_encoder.pos_embed", "image_encoder.blocks.0.attn.rel_pos_h", "image_encoder.blocks.3.attn.rel_pos_w",
        "image_encoder.blocks.0.norm1.weight", "image_encoder.blocks.0.attn.qkv.bias", "image_encoder.neck.1.weight",
        "prompt_encoder.point_embeddings.0.weight", "prompt_encoder.not_a_point_embed.weight",
        "prompt_encoder.no_mask_embed.weight", "mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight",
        "mask_decoder.transformer.norm_final_attn.weight", "mask_decoder.output_upscaling.0.bias",
    ]
    decay = [
        "image_encoder.patch_embed.proj.weight", "image_encoder.blocks.0.attn.qkv.weight", "image_encoder.neck.0.weight",
        "prompt_encoder.mask_downscaling.0.weight", "mask_decoder.iou_prediction_head.layers.0.weight",
    ]
    for name in no_decay:
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in decay:
        assert by_name[name]["weight_decay"] == 0.1, name
    # every trainable parameter is in exactly one group
    listed = [n for g in groups for n in g["param_names"]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    tiny_vit = build_sam("sam_tiny_vit_t")
    assert "image_encoder.layers.1.blocks.0.attn.attention_biases" in no_weight_decay_names(tiny_vit)
    assert "image_encoder.layers.1.blocks.0.attn.qkv.weight" not in no_weight_decay_names(tiny_vit)


def test_layer_decay_per_vit_block_and_encoder_lr_scale() -> None:
    model = build_sam("sam_tiny")  # depth 4
    cfg = OptimizerConfig(lr=1e-3, layer_decay=0.5, encoder_lr_scale=0.1)
    by_name = _group_of(param_groups(model, cfg))
    depth = 4
    for i in range(depth):
        expected = 1e-3 * 0.1 * 0.5 ** (depth - i)
        assert by_name[f"image_encoder.blocks.{i}.attn.qkv.weight"]["lr"] == pytest.approx(expected)
        assert by_name[f"image_encoder.blocks.{i}.norm1.bias"]["lr"] == pytest.approx(expected)
    deepest = 1e-3 * 0.1 * 0.5 ** (depth + 1)
    assert by_name["image_encoder.patch_embed.proj.weight"]["lr"] == pytest.approx(deepest)
    assert by_name["image_encoder.pos_embed"]["lr"] == pytest.approx(deepest)
    assert by_name["image_encoder.neck.0.weight"]["lr"] == pytest.approx(1e-3 * 0.1)
    assert by_name["mask_decoder.iou_token.weight"]["lr"] == pytest.approx(1e-3)
    assert by_name["prompt_encoder.mask_downscaling.0.weight"]["lr"] == pytest.approx(1e-3)


def test_tiny_vit_layer_decay_uses_its_layer_lr_scales() -> None:
    model = build_sam("sam_tiny_vit_t")
    scales = model.image_encoder.layer_lr_scales(0.5)
    assert encoder_lr_scales(model.image_encoder, 0.5) == scales
    by_name = _group_of(param_groups(model, OptimizerConfig(lr=1.0, layer_decay=0.5, encoder_lr_scale=2.0)))
    for name, scale in scales.items():
        assert by_name[f"image_encoder.{name}"]["lr"] == pytest.approx(2.0 * scale), name
    assert len({round(s, 8) for s in scales.values()}) > 2  # the decay really varies over blocks


def test_frozen_parts_are_absent_from_the_optimizer() -> None:
    task = PromptableSegmentationTask(
        "sam_tiny", freeze_image_encoder=True, freeze_prompt_encoder=True,
        optimizer=OptimizerConfig(schedule="constant"),  # no trainer attached: no total step count
    )
    optimizer = task.configure_optimizers()["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in task.model.named_parameters():
        trainable = name.startswith("mask_decoder.")
        assert p.requires_grad == trainable, name
        assert (id(p) in in_optimizer) == trainable, name
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="frozen"):
        PromptableSegmentationTask(
            "sam_tiny", freeze_image_encoder=True, freeze_prompt_encoder=True, freeze_mask_decoder=True
        )


def test_step_schedule_warmup_and_milestones() -> None:
    cfg = OptimizerConfig(warmup_steps=10, schedule="step", step_milestones=(0.5, 0.9), step_gamma=0.1)
    schedule = WarmupSchedule.from_config(cfg, 100)
    assert schedule.milestones == [50, 90]
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(4) == pytest.approx(0.5)
    assert schedule(9) == pytest.approx(1.0)  # warmup end
    assert schedule(49) == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(0.1)
    assert schedule(89) == pytest.approx(0.1)
    assert schedule(90) == pytest.approx(0.01)
    assert schedule(99) == pytest.approx(0.01)


def test_paper_milestones_on_90k_steps() -> None:
    schedule = WarmupSchedule.from_config(OptimizerConfig(), 90_000)
    assert schedule(249) == pytest.approx(1.0)
    assert schedule.milestones == [60_000, 86_666]  # the paper's steps, by default
    assert schedule(59_999) == pytest.approx(1.0) and schedule(60_000) == pytest.approx(0.1)
    assert schedule(86_665) == pytest.approx(0.1) and schedule(86_666) == pytest.approx(0.01)


def test_cosine_and_constant_schedules() -> None:
    cosine = WarmupSchedule.from_config(OptimizerConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    assert cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert cosine(110) == pytest.approx(0.1)  # end
    assert cosine(500) == pytest.approx(0.1)
    constant = WarmupSchedule.from_config(OptimizerConfig(warmup_steps=0, schedule="constant"), float("inf"))
    assert constant(0) == 1.0 and constant(10**6) == 1.0
    with pytest.raises(ValueError, match="max_steps"):
        WarmupSchedule.from_config(OptimizerConfig(schedule="cosine"), math.inf)


def test_lambda_lr_drives_group_lrs_per_step() -> None:
    """The task's scheduler multiplies each group's own lr (layer decay kept) by the schedule, per step."""
    import lightning as L

    task = PromptableSegmentationTask(
        "sam_tiny", optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2, schedule="step", step_milestones=(0.5,),
                                              layer_decay=0.5)
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False)
    task.trainer = trainer
    conf = task.configure_optimizers()
    assert conf["lr_scheduler"]["interval"] == "step"
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    base = [g["lr"] for g in optimizer.param_groups]
    assert [g["lr"] for g in optimizer.param_groups] != []
    seen = []
    for _ in range(7):
        seen.append([g["lr"] / b for g, b in zip(optimizer.param_groups, [g["initial_lr"] for g in optimizer.param_groups])])
        optimizer.step()
        scheduler.step()
    assert [round(s[0], 6) for s in seen] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1]
    assert len({round(b, 12) for b in base}) > 2


def _task_scheduler(max_steps: int, **optimizer: object):
    import lightning as L

    task = PromptableSegmentationTask("sam_tiny", optimizer=OptimizerConfig(**optimizer))
    task.trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False)
    conf = task.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def _resume(state: tuple[dict, dict], max_steps: int, **optimizer: object):
    """A fresh optimizer and scheduler for ``max_steps``, restored as Lightning does (optimizer first)."""
    new_optimizer, new_scheduler = _task_scheduler(max_steps, **optimizer)
    new_optimizer.load_state_dict(state[0])
    new_scheduler.load_state_dict(state[1])
    return new_optimizer, new_scheduler


def test_resume_follows_the_current_schedule(caplog) -> None:
    """A run resumed with a longer max_steps or another lr follows the new cosine schedule from the restored step
    (plain LambdaLR kept the checkpoint's total, so the rate sat at the floor for every added step), and says so;
    resumed with the same settings it continues exactly."""
    import logging

    settings = {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.0}
    optimizer, scheduler = _task_scheduler(10, **settings)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    state = (optimizer.state_dict(), scheduler.state_dict())
    _, reference = _task_scheduler(20, **settings)

    with caplog.at_level(logging.WARNING, logger="samtune"):
        same_optimizer, same = _resume(state, 10, **settings)
    assert not [r for r in caplog.records if r.name.startswith("samtune")]
    assert [g["lr"] for g in same_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    same_optimizer.step()
    same.step()
    optimizer.step()
    scheduler.step()
    assert same.get_last_lr() == scheduler.get_last_lr()

    with caplog.at_level(logging.WARNING, logger="samtune"):
        longer_optimizer, longer = _resume(state, 20, **settings)
    assert longer.last_epoch == 6 and longer.schedule.total_steps == 20
    assert "total_steps 10 -> 20" in caplog.text and "optimizer step 6" in caplog.text
    expected = 1e-3 * reference.schedule(6)
    assert longer_optimizer.param_groups[0]["lr"] == pytest.approx(expected)  # already for the first resumed step
    longer_optimizer.step()
    longer.step()
    assert longer.get_last_lr()[0] == pytest.approx(1e-3 * reference.schedule(7))
    assert longer.get_last_lr()[0] > 1e-3 * scheduler.lr_lambdas[0](7) * 2  # the old total would have decayed

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samtune"):
        faster_optimizer, _ = _resume(state, 10, **{**settings, "lr": 2e-3})
    assert "base learning rates [0.001, 0.001] -> [0.002, 0.002]" in caplog.text  # decay and no-decay groups
    assert faster_optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * scheduler.schedule(6))


def test_config_validation_errors() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        OptimizerConfig(layer_decay=0.0)
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step_milestones"):
        OptimizerConfig(step_milestones=(0.9, 0.5))
    assert OptimizerConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["lr", "weight_decay", "encoder_lr_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_optimizer_config_rejects_non_finite_values(field, value) -> None:
    """NaN passes ``lr <= 0`` style checks: the run would train with NaN weights after its first step."""
    with pytest.raises(ValueError, match=f"OptimizerConfig.{field} must be a finite"):
        OptimizerConfig(**{field: value})


@pytest.mark.parametrize("field", ["focal_weight", "dice_weight", "iou_weight", "focal_gamma"])
def test_loss_config_rejects_non_finite_values(field) -> None:
    from samtune.tasks.config import LossConfig

    with pytest.raises(ValueError, match=f"LossConfig.{field} must be a finite"):
        LossConfig(**{field: float("nan")})


def test_a_warmup_longer_than_the_run_is_reported(caplog) -> None:
    """warmup_steps >= the run's optimizer steps: the base learning rate is never reached (the default warmup of
    250 with trainer.max_steps 100 trains at most at 40% of optimizer.lr); a warning names both settings."""
    import logging

    with caplog.at_level(logging.WARNING, logger="samtune.tasks.optim"):
        WarmupSchedule.from_config(OptimizerConfig(warmup_steps=250, schedule="cosine"), 100)
    assert "optimizer.warmup_steps (250)" in caplog.text and "100 optimizer steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samtune.tasks.optim"):
        WarmupSchedule.from_config(OptimizerConfig(warmup_steps=10, schedule="cosine"), 100)
    assert "warmup_steps" not in caplog.text
