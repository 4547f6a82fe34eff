"""Helpers of the ONNX tests: the official ONNX export (segment_anything) from samtune weights, sessions."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from samtune import Sam
from samtune.build import get_config

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (dev extra) runs the exported graphs")
pytest.importorskip("segment_anything", reason="the official segment-anything package (dev extra) is the reference")

from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer  # noqa: E402
from segment_anything.modeling import Sam as OfficialSam  # noqa: E402
from segment_anything.utils.onnx import SamOnnxModel  # noqa: E402

from ..modeling.reference import build_reference  # noqa: E402

OFFICIAL_OUTPUT_NAMES = ["masks", "iou_predictions", "low_res_masks"]


class _EncoderStub(nn.Module):
    """Stands in for the image encoder of official models whose encoder segment_anything lacks (TinyViT):
    the official ONNX decoder only reads ``image_encoder.img_size``."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size


def official_sam_like(model: Sam, name: str) -> OfficialSam:
    """The official ``Sam`` with ``model``'s prompt encoder and mask decoder weights.

    ViT models are the complete official model (``build_reference``); for TinyViT models the official
    prompt encoder and decoder are built with the registry's dimensions and the encoder is a stub.
    """
    cfg = get_config(name)
    if cfg.encoder_type == "vit":
        official = build_reference(name)
        official.load_state_dict(model.state_dict(), strict=True)
        return official
    grid = cfg.embedding_grid
    official = OfficialSam(
        image_encoder=_EncoderStub(cfg.image_size),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth, embedding_dim=cfg.prompt_embed_dim, mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
    ).eval()
    parts = {k: v for k, v in model.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    official.load_state_dict(parts, strict=True)
    return official


def export_official(official: OfficialSam, path: Path, orig_hw: tuple[int, int], **options: bool) -> Path:
    """Export with segment_anything's ``SamOnnxModel`` exactly as its ``scripts/export_onnx_model.py`` does.

    ``orig_hw`` is the dummy ``orig_im_size``: the PyPI release 1.0 of segment-anything bakes the aspect ratio
    of that dummy into the graph (``int()`` of a traced tensor, its issue #56, fixed in the repository after
    the release), so the official graph is only exact for images of that aspect ratio.
    """
    onnx_model = SamOnnxModel(official, return_single_mask=options.pop("return_single_mask", False), **options)
    pe = official.prompt_encoder
    dummy = {
        "image_embeddings": torch.randn(1, pe.embed_dim, *pe.image_embedding_size),
        "point_coords": torch.randint(0, 1024, (1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *pe.mask_input_size),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor(orig_hw, dtype=torch.float),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            onnx_model, tuple(dummy.values()), str(path), dynamo=False, export_params=True, opset_version=17,
            do_constant_folding=True, input_names=list(dummy), output_names=OFFICIAL_OUTPUT_NAMES,
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        )
    return path


def session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, feed: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return sess.run(None, {k: v.numpy() for k, v in feed.items()})
