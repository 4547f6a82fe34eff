"""A tiny SAM trained from scratch on generated shapes learns to segment from one click."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from samtune.build import SamConfig, ViTConfig, register_model
from samtune.data import SA1BDataset, collate_samples
from samtune.data.synth import synthesize_sa1b
from samtune.prompts import SimulationConfig
from samtune.tasks import LossConfig, OptimizerConfig, PromptableSegmentationTask

SIZE = 128
MICRO = SamConfig(  # 128 px, patch 8 -> 16x16 embedding grid, 64x64 low-res masks, 32-d decoder of depth 1
    ViTConfig(embed_dim=48, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=8, patch_size=8),
    image_size=SIZE, prompt_embed_dim=32, embedding_grid=16, mask_in_chans=8, decoder_depth=1, decoder_heads=2,
    decoder_mlp_dim=64, iou_head_hidden_dim=32,
)


def test_tiny_sam_from_scratch_learns_one_click_segmentation(tmp_path) -> None:
    """300 steps (batch 4, <= 16 masks, first-prompt round only) on 64 synthetic images, focal 1 : dice 1.

    The paper's 20 : 1 weighting makes this micro model, from scratch, collapse to empty masks in 300 steps for most
    seeds (2026-12-07, seeds 0-3: 0.136, 0.054, 0.046, 0.057 from 0.042-0.057; 600 steps: 0.207, 0.050; focal
    alpha None or lr 1e-3 / 4e-3 did no better): the focal term rewards an empty mask on objects this small until the
    features localise them. With 1 : 1 all seeds tried learn: 0.156-0.299 from 0.018-0.057 (seeds 0-7), ~30 s each on
    one core. The paper's weights and 11-round schedule are tested in test_task.py.
    """
    register_model("sam_micro_test", MICRO, overwrite=True)
    synthesize_sa1b(tmp_path / "train", 64, SIZE, seed=0)
    synthesize_sa1b(tmp_path / "val", 8, SIZE, seed=1)
    train = SA1BDataset(tmp_path / "train", image_size=SIZE, train=True, max_masks_per_image=16)
    val = SA1BDataset(tmp_path / "val", image_size=SIZE, train=False, max_masks_per_image=8)
    L.seed_everything(0)
    task = PromptableSegmentationTask(
        "sam_micro_test",
        simulation=SimulationConfig(num_iterations=1, num_point_iterations=0, random_mask_only_iteration=False,
                                    final_mask_only_iteration=False),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=10, schedule="constant"),
        loss=LossConfig(focal_weight=1.0),
        val_num_clicks=1,
    )
    train_loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate_samples)
    val_loader = DataLoader(val, batch_size=8, collate_fn=collate_samples)
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path)
    before = L.Trainer(**options).validate(task, val_loader, verbose=False)[0]["val/iou_click_1"]
    trainer = L.Trainer(max_steps=300, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                        **options)
    trainer.fit(task, train_loader)
    after = L.Trainer(**options).validate(task, val_loader, verbose=False)[0]["val/iou_click_1"]
    assert before < 0.08, before
    assert after > before + 0.08 and after > 2.5 * before, (before, after)
