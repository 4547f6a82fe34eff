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
    with torch.no_grad():  # outside inference mode (e.g. a frozen encoder after validation): its own buffer
        torch.testing.assert_close(encoder(x1), a1, rtol=0, atol=0)
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


def test_training_attention_equals_official_values_and_gradients(monkeypatch) -> None:
    """CPU training path (bias that needs a gradient, computed a few query rows at a time) vs the official
    ``Attention``: outputs and the gradients of the input, the projections and both relative-position tables."""
    from segment_anything.modeling.image_encoder import Attention as OfficialAttention

    torch.manual_seed(0)
    dim, heads, grid = 64, 4, (12, 10)
    ours = image_encoder.RelPosAttention(dim, heads, use_rel_pos=True, input_size=grid)
    ref = OfficialAttention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=grid)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref.load_state_dict(ours.state_dict())
    taken = []
    original = image_encoder.RelPosAttention._attention_for_backward
    monkeypatch.setattr(image_encoder.RelPosAttention, "_attention_for_backward",
                        lambda self, *a: taken.append(1) or original(self, *a))
    # fp32 too (it keeps PyTorch's kernel in use): the arithmetic compared exactly with the official module
    monkeypatch.setattr(image_encoder, "_TRAIN_PATH_DTYPES", (torch.float32, torch.bfloat16))
    # 3 query rows per chunk: 4 chunks over the 12 rows, the last one partial when the row count does not divide
    monkeypatch.setattr(image_encoder, "_TRAIN_CHUNK_BYTES", 3 * 2 * heads * grid[1] * grid[0] * grid[1] * 4)

    x = torch.randn(2, *grid, dim)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ours, out_ref = ours(xa), ref(xb)
    weight = torch.randn_like(out_ref)
    (out_ours * weight).sum().backward()
    (out_ref * weight).sum().backward()
    assert taken, "the CPU training path was not taken"
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)  # |grad| up to ~10
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-4, atol=1e-4, msg=name)

    # bf16 autocast (the training precision on CPUs with bf16): as close to the fp32 result as the official
    # module under the same autocast (scores, bias and softmax in bf16 there too)
    def bf16_error(module: torch.nn.Module) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x.clone().requires_grad_(True))
        assert out.dtype == torch.bfloat16
        return (out.float() - out_ref).abs().mean().item()

    error, official_error = bf16_error(ours), bf16_error(ref)
    assert 0 < error <= 1.1 * official_error, (error, official_error)

    # without gradients the fused kernel runs as before; by default fp32 with gradients keeps PyTorch's kernel
    taken.clear()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), out_ref.detach(), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(image_encoder, "_TRAIN_PATH_DTYPES", (torch.bfloat16, torch.float16))
    torch.testing.assert_close(ours(x.clone().requires_grad_(True)), out_ref, rtol=1e-5, atol=1e-5)
    assert not taken
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x.clone().requires_grad_(True))
    assert taken
