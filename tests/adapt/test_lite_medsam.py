"""LoRA on the real LiteMedSAM weights (TinyViT encoder): apply, merge, export in the original key layout, compare."""
from __future__ import annotations

import torch

from samtune.adapt import apply_adaptation, export_merged, merge_adaptation
from samtune.build import build_sam
from samtune.checkpoints import read_state_dict


@torch.no_grad()
def outputs(model, images: torch.Tensor, embeddings: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Encoder output ``[1, 256, h, w]`` and decoder logits / IoU for the given embeddings ``[1, 256, 64, 64]``.

    The encoder runs on a 128 px image (TinyViT takes any size; 4x cheaper than 256 px on CPU), the decoder on a
    fixed embedding, so both halves of the model are compared.
    """
    model.eval()
    logits, iou = model.decode(embeddings, torch.zeros(len(boxes), dtype=torch.long), boxes=boxes, multimask_output=True)
    return model.image_encoder(images), logits, iou


def test_lite_medsam_lora_merges_into_the_original_layout(assets, tmp_path):
    weights = assets / "weights" / "lite_medsam" / "lite_medsam.pth"
    model = build_sam("lite_medsam", weights)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 128, 128, generator=g)  # min-max scaled input, as LiteMedSAM expects
    embeddings = torch.randn(1, 256, 64, 64, generator=g)
    boxes = torch.tensor([[40.0, 50.0, 120.0, 140.0], [100.0, 30.0, 230.0, 200.0]])
    base = outputs(model, images, embeddings, boxes)
    apply_adaptation(model, dict(method="lora", lora_rank=4, lora_include_decoder=True, freeze_policy="frozen"))
    with torch.no_grad():  # what training does to the zero-initialised B matrices, deterministically
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=g))
    adapted = outputs(model, images, embeddings, boxes)
    assert all(float((a - b).abs().max()) > 1e-3 for a, b in zip(adapted, base))  # the LoRA weights matter
    merged = merge_adaptation(model)
    for a, b in zip(adapted, outputs(merged, images, embeddings, boxes)):
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, scale), (scale, float((a - b).abs().max()))
    # the exported file has exactly the original LiteMedSAM keys and holds the merged weights
    path = export_merged(model, tmp_path / "lite_medsam_lora.pth")
    exported = torch.load(path, weights_only=True)
    assert sorted(exported) == sorted(read_state_dict(weights))
    assert all(torch.equal(exported[k], v) for k, v in merged.state_dict().items())
