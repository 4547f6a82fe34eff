"""Shared helpers of the adaptation tests: fixed inputs, a forward pass through encoder + decoder, a few
optimiser steps on a synthetic loss."""
from __future__ import annotations

import torch

from samtune.adapt import eval_frozen_batchnorm
from samtune.modeling.sam import Sam


def make_inputs(model: Sam, num_images: int = 1, masks_per_image: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images ``[B, 3, S, S]``, boxes ``[M, 4]`` (x0, y0, x1, y1) and their image index ``[M]``."""
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(num_images, 3, size, size, generator=g)
    m = num_images * masks_per_image
    xy0 = torch.rand(m, 2, generator=g) * size * 0.5
    wh = 0.1 * size + torch.rand(m, 2, generator=g) * size * 0.4
    boxes = torch.cat([xy0, xy0 + wh], dim=1)
    index = torch.arange(num_images).repeat_interleave(masks_per_image)
    return {"images": images, "boxes": boxes, "index": index}


def run_model(model: Sam, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings ``[B, C, h, w]``, mask logits ``[M, 3, H, W]`` and IoU predictions ``[M, 3]``."""
    embeddings = model.encode_image(inputs["images"])
    logits, iou = model.decode(embeddings, inputs["index"], boxes=inputs["boxes"], multimask_output=True)
    return embeddings, logits, iou


@torch.no_grad()
def eval_outputs(model: Sam, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    out = run_model(model, inputs)
    model.train(was_training)
    return out


def train_steps(model: Sam, steps: int = 2, lr: float = 1e-2, seed: int = 1) -> None:
    """A few AdamW steps (weight decay 0.01) of a synthetic regression loss on the trainable parameters, in train
    mode with frozen BatchNorms kept in eval (as the Lightning task does); leaves the model in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    inputs = make_inputs(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    model.train()
    eval_frozen_batchnorm(model)
    for _ in range(steps):
        embeddings, logits, iou = run_model(model, inputs)
        target = torch.randn(logits.shape, generator=g)
        loss = (logits - target).pow(2).mean() + (iou - 0.5).pow(2).mean() + embeddings.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
