"""Helpers that build the official ``segment_anything`` model in the same (tiny) configurations as samtune."""
from __future__ import annotations

from functools import partial

import pytest
import torch

from samtune.build import SamConfig, ViTConfig, get_config

segment_anything = pytest.importorskip("segment_anything", reason="the official segment-anything package (dev extra) is the parity reference")
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)


def build_reference(name: str) -> Sam:
    """Official ``Sam`` with the architecture of samtune's registered ``name`` (ViT encoders only)."""
    cfg: SamConfig = get_config(name)
    enc = cfg.encoder
    assert isinstance(enc, ViTConfig)
    grid = cfg.embedding_grid
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            img_size=cfg.image_size,
            mlp_ratio=enc.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc.num_heads,
            patch_size=enc.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=enc.global_attn_indexes,
            window_size=enc.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every tensor non-trivial values, including position embeddings, rel-pos tables and norms.

    Official init zero-fills ``pos_embed`` and ``rel_pos_*``, which would hide errors in their use.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("weight") and p.dim() == 1:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def make_image(h: int = 300, w: int = 220, seed: int = 0):
    """A non-square uint8 RGB image with smooth structure (so resizing matters) and noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 17.0), np.cos(yy / 23.0), np.sin((xx + yy) / 31.0)], axis=-1)
    img = (base * 90 + 128 + rng.normal(0, 20, size=(h, w, 3))).clip(0, 255)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] = [240, 30, 30]
    return img.astype(np.uint8)
