"""Real weights: a short LiteMedSAM fine-tune on EM cells lowers the training loss and keeps the box IoU."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from samtune.data import MaskFolderDataset, collate_samples
from samtune.prompts import SimulationConfig
from samtune.tasks import OptimizerConfig, PromptableSegmentationTask


def _dataset(root, names, train: bool) -> MaskFolderDataset:
    return MaskFolderDataset(root / "image", root / "label", names=names, mask_type="components", connectivity=4,
                             min_area=20, image_size=256, normalization="minmax", train=train,
                             max_masks_per_image=16, seed=0)


@torch.no_grad()
def _fixed_loss(task: PromptableSegmentationTask, batches: list[dict]) -> float:
    """Mean training loss over fixed batches with fixed simulated prompts (eval mode, same seed each time)."""
    task._trainer = None  # detached from the validation Trainer: training_step logs nowhere
    task.eval()
    task.simulation_seed, task._train_step_counter = 123, 0  # the same simulated prompts each call
    losses = [task.training_step(b, 0).item() for b in batches]
    task.train()
    return sum(losses) / len(losses)


@pytest.mark.real_train
def test_lite_medsam_finetune_on_em(assets, tmp_path) -> None:
    root = assets / "data" / "em_membrane"
    weights = assets / "weights" / "lite_medsam" / "lite_medsam.pth"
    train = _dataset(root, [str(i) for i in range(15)], train=True)
    fixed = [collate_samples([_dataset(root, [str(i)], train=False)[0] for i in range(j, j + 3)]) for j in (0, 3)]
    val_loader = DataLoader(_dataset(root, [str(i) for i in range(15, 20)], train=False), batch_size=5,
                            collate_fn=collate_samples)
    L.seed_everything(0)
    task = PromptableSegmentationTask(
        "lite_medsam", checkpoint=str(weights),
        simulation=SimulationConfig(num_iterations=3, num_point_iterations=1, random_mask_only_iteration=False),
        optimizer=OptimizerConfig(lr=5e-5, warmup_steps=2, schedule="constant"), val_num_clicks=1,
    )
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path)
    box_before = L.Trainer(**options).validate(task, val_loader, verbose=False)[0]["val/iou_box"]
    loss_before = _fixed_loss(task, fixed)
    trainer = L.Trainer(max_epochs=3, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                        **options)
    trainer.fit(task, DataLoader(train, batch_size=3, shuffle=True, collate_fn=collate_samples))
    loss_after = _fixed_loss(task, fixed)
    box_after = L.Trainer(**options).validate(task, val_loader, verbose=False)[0]["val/iou_box"]
    print(f"LiteMedSAM on EM: loss {loss_before:.4f} -> {loss_after:.4f}; val box IoU {box_before:.4f} -> {box_after:.4f}")
    assert loss_after < loss_before
    assert box_after >= box_before - 0.005
