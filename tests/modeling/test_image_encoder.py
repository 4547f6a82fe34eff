"""Caches of gradient-free forwards (rel-pos bias workspace, dense positional encoding) change no result."""
from __future__ import annotations

import torch

from samtune.build import build_sam
from samtune.modeling import image_encoder


def test_bias_workspace_matches_fresh_bias_and_keeps_autograd_correct(monkeypatch) -> None:
    torch.manual_seed(0)
    encoder = build_sam("sam_tiny").image_encoder.eval()
    for block in encoder.blocks:  # non-zero relative-position tables, so the bias matters
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.5)
    x1, x2 = torch.randn(2, 1, 3, 256, 256)

    with torch.inference_mode():
        a1, a2 = encoder(x1), encoder(x2)  # the second call overwrites the workspace of the first
    assert _BUFFERS_IN_USE(), "gradient-free CPU forward did not use the workspace"
    with monkeypatch.context() as m:  # the same kernels on freshly allocated bias tensors: bit-identical
        m.setattr(image_encoder._BIAS_WORKSPACE, "get", lambda numel, device, dtype: torch.empty(numel, dtype=dtype))
        with torch.inference_mode():
            assert torch.equal(a1, encoder(x1)) and torch.equal(a2, encoder(x2))
    image_encoder._BIAS_WORKSPACE.buffers.clear()

    x1.requires_grad_(True)
    b1 = encoder(x1)  # autograd path: fresh bias tensors, saved for backward
    b1.square().sum().backward()
    assert not _BUFFERS_IN_USE(), "the workspace must not be used when gradients flow"
    torch.testing.assert_close(b1.detach(), a1, rtol=0, atol=1e-5)  # SDPA may take another kernel with grad
    grad = x1.grad.clone()

    # the same gradient when a gradient-free forward ran in between (it must not touch saved tensors)
    x1.grad = None
    out = encoder(x1)
    with torch.no_grad():
        encoder(x2)
    out.square().sum().backward()
    assert torch.equal(grad, x1.grad)


def _BUFFERS_IN_USE() -> bool:
    return bool(image_encoder._BIAS_WORKSPACE.buffers)


def test_dense_pe_cache_follows_the_gaussian_matrix() -> None:
    """get_dense_pe is cached, and recomputed when the matrix changes in place or the module moves."""
    pe = build_sam("sam_tiny").prompt_encoder
    first = pe.get_dense_pe()
    assert pe.get_dense_pe() is first
    with torch.no_grad():
        pe.pe_layer.positional_encoding_gaussian_matrix.mul_(2.0)
    second = pe.get_dense_pe()
    assert second is not first
    torch.testing.assert_close(second, pe.pe_layer(pe.image_embedding_size).unsqueeze(0), rtol=0, atol=0)
    pe.to(torch.float64)
    assert pe.get_dense_pe().dtype == torch.float64
