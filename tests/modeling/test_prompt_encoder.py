"""Point-label semantics of the prompt encoder (the official ONNX decoder's: labels are compared with -1..3)."""
from __future__ import annotations

import torch

from samtune import build_sam

from .reference import randomize_


def test_labels_are_compared_not_clamped() -> None:
    """-1: not_a_point only; 0..3: positional encoding + that table row; anything else (4, -2, 0.5): the positional
    encoding only; boolean labels are positive / negative clicks."""
    pe_mod = randomize_(build_sam("sam_tiny"), seed=4).prompt_encoder
    coords = torch.rand(1, 7, 2, generator=torch.Generator().manual_seed(0)) * 256
    labels = torch.tensor([[-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 0.5]])
    with torch.no_grad():
        got = pe_mod.embed_points(coords, labels)[0]
        pos = pe_mod.pe_layer.forward_with_coords(coords + 0.5, pe_mod.input_image_size)[0]
        rows = [e.weight[0] for e in pe_mod.point_embeddings]
        torch.testing.assert_close(got[0], pe_mod.not_a_point_embed.weight[0])
        for i in range(4):
            torch.testing.assert_close(got[1 + i], pos[1 + i] + rows[i])
        torch.testing.assert_close(got[5:], pos[5:])
        flags = torch.tensor([[True, False, True]])
        torch.testing.assert_close(pe_mod.embed_points(coords[:, :3], flags), pe_mod.embed_points(coords[:, :3], flags.long()))
