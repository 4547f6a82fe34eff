"""apply_adaptation: where LoRA / adapters go, exact trainable-parameter counts, freeze policies, identity at
init, and frozen weights that stay bit-identical through training."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from samtune.adapt import (
    AdaptationConfig,
    AdaptedAttention,
    ParallelAdapterMLP,
    adaptation_of,
    apply_adaptation,
    attention_blocks,
    trainable_state_dict,
)
from samtune.adapt.core import frozen_keys
from samtune.build import build_sam, build_sam_from_config, get_config
from tests.adapt.helpers import count_trainable, eval_outputs, make_inputs, train_steps


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- counts from shapes
def vit_lora(embed: int, depth: int, rank: int, targets: tuple[str, ...] = ("qkv", "proj")) -> int:
    """LoRA on qkv (C -> 3C: r * 4C) and proj (C -> C: r * 2C) of ``depth`` blocks."""
    per = {"qkv": rank * (embed + 3 * embed), "proj": rank * (embed + embed)}
    return depth * sum(per[t] for t in targets)


def decoder_lora(dim: int, depth: int, rank: int) -> int:
    """LoRA on q/k/v/out of the two-way transformer: per layer one self-attention (internal dim D) and two
    cross-attentions (internal D/2), plus the final token-to-image attention."""
    self_attn = 4 * rank * (dim + dim)
    cross = 4 * rank * (dim + dim // 2)
    return depth * (self_attn + 2 * cross) + cross


def adapter(dim: int, hidden: int) -> int:
    """down (C x h + h) and up (h x C + C)."""
    return dim * hidden + hidden + hidden * dim + dim


TINY = get_config("sam_tiny")  # ViT: embed 96, depth 4; tokens 64
TINY_C, TINY_DEPTH, TINY_D = TINY.encoder.embed_dim, TINY.encoder.depth, TINY.prompt_embed_dim


@pytest.fixture(scope="module")
def tiny_base() -> nn.Module:
    torch.manual_seed(0)
    return build_sam("sam_tiny")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (dict(method="lora", lora_rank=4, freeze_policy="frozen"), vit_lora(TINY_C, TINY_DEPTH, 4)),
        (dict(method="lora", lora_rank=8, lora_targets=["qkv"], blocks=[0, 2], freeze_policy="frozen"),
         vit_lora(TINY_C, 2, 8, ("qkv",))),
        (dict(method="lora", lora_rank=4, lora_include_decoder=True, freeze_policy="frozen"),
         vit_lora(TINY_C, TINY_DEPTH, 4) + decoder_lora(TINY_D, 2, 4)),
        (dict(method="adapter", freeze_policy="frozen"), TINY_DEPTH * 2 * adapter(TINY_C, TINY_C // 4)),
        (dict(method="adapter", adapter_dim=8, adapter_positions=["mlp"], blocks=r"blocks\.(1|3)",
              freeze_policy="frozen"), 2 * adapter(TINY_C, 8)),
    ],
    ids=["lora_r4", "lora_r8_qkv_two_blocks", "lora_r4_decoder", "adapter_quarter", "adapter_dim8_mlp_global"],
)
def test_trainable_counts_tiny_vit(tiny_base, config, expected):
    model = apply_adaptation(copy.deepcopy(tiny_base), config)
    assert count_trainable(model) == expected
    assert sum(v.numel() for v in trainable_state_dict(model).values()) == expected  # no buffers here


def test_policy_counts_tiny(tiny_base):
    decoder, prompt = numel(tiny_base.mask_decoder), numel(tiny_base.prompt_encoder)
    assert (decoder, prompt) == (191292, 1804)
    lora = vit_lora(TINY_C, TINY_DEPTH, 4)
    cases = {
        ("none", "decoder_only", None): decoder,
        ("none", "prompt_decoder", None): decoder + prompt,
        ("none", "full", None): numel(tiny_base),
        ("none", "last_k", 1): numel(tiny_base.image_encoder.blocks[3]) + numel(tiny_base.image_encoder.neck)
        + prompt + decoder,
        ("lora", "decoder_only", None): lora + decoder,
        # LoRA-wrapped weights stay frozen even under "full": everything else trains
        ("lora", "full", None): numel(tiny_base) + lora - TINY_DEPTH * (4 * TINY_C * TINY_C + 4 * TINY_C),
    }
    for (method, policy, k), expected in cases.items():
        model = apply_adaptation(copy.deepcopy(tiny_base),
                                 AdaptationConfig(method=method, lora_rank=4, freeze_policy=policy, last_k=k))
        assert count_trainable(model) == expected, (method, policy, k)


def test_counts_sam_vit_b():
    """The numbers in the report: LoRA r=4 / r=8 on all 12 blocks, adapters (ratio 0.25) on all blocks.

    Built on the meta device: shapes only, no 90M-parameter initialisation."""
    with torch.device("meta"):
        base = build_sam("sam_vit_b")
    decoder = numel(base.mask_decoder)
    assert decoder == 4058340
    expected = {
        ("lora", 4): 221184, ("lora", 8): 442368, ("adapter", 0): 7100928,
    }
    assert expected[("lora", 4)] == vit_lora(768, 12, 4) and expected[("lora", 8)] == vit_lora(768, 12, 8)
    assert expected[("adapter", 0)] == 12 * 2 * adapter(768, 192)
    for (method, rank), count in expected.items():
        model = apply_adaptation(copy.deepcopy(base), dict(method=method, lora_rank=max(rank, 1), freeze_policy="frozen"))
        assert count_trainable(model) == count
    model = apply_adaptation(copy.deepcopy(base), dict(method="lora", lora_rank=4, freeze_policy="decoder_only"))
    assert count_trainable(model) == 221184 + 4058340  # the common recipe: LoRA on the encoder + the decoder
    # with decoder LoRA too, the decoder's attention projections become LoRA-wrapped (frozen) weights
    wrapped = 2 * 4 * (256 * 256 + 256) + 5 * (3 * (256 * 128 + 128) + 128 * 256 + 256)
    model = apply_adaptation(base, dict(method="lora", lora_rank=4, freeze_policy="decoder_only",
                                        lora_include_decoder=True))
    assert decoder_lora(256, 2, 4) == 47104
    assert count_trainable(model) == 221184 + 47104 + 4058340 - wrapped == 3141732


def test_counts_lite_medsam_architecture():
    """TinyViT (LiteMedSAM): attention blocks of widths 128 (x2), 160 (x6), 320 (x2)."""
    torch.manual_seed(0)
    base = build_sam("lite_medsam")
    widths = [b.attn.qkv.in_features for _, b in attention_blocks(base.image_encoder)]
    assert widths == [128] * 2 + [160] * 6 + [320] * 2
    expected = {("lora", 4): 44544, ("lora", 8): 89088, ("adapter", 0): 395808}
    for rank in (4, 8):
        assert expected[("lora", rank)] == sum(6 * rank * c for c in widths)
    assert expected[("adapter", 0)] == sum(2 * adapter(c, c // 4) for c in widths)
    for (method, rank), count in expected.items():
        model = apply_adaptation(copy.deepcopy(base), dict(method=method, lora_rank=max(rank, 1), freeze_policy="frozen"))
        assert count_trainable(model) == count
    # last_k=2: layers.3 (the last 2 blocks, width 320) and the neck train, except the LoRA-wrapped qkv / proj
    tail = numel(base.image_encoder.layers[3]) + numel(base.image_encoder.neck)
    wrapped = 2 * (4 * 320 * 320 + 4 * 320)
    others = numel(base.prompt_encoder) + numel(base.mask_decoder)
    model = apply_adaptation(base, dict(method="lora", lora_rank=4, freeze_policy="last_k", last_k=2))
    assert count_trainable(model) == 44544 + tail - wrapped + others


# --------------------------------------------------------------------------------------------- placement
def test_lora_goes_where_asked(tiny_base):
    model = apply_adaptation(copy.deepcopy(tiny_base), dict(method="lora", blocks=[0, -1], lora_targets=["qkv"]))
    kinds = [(type(b.attn.qkv) is LoraLinear, type(b.attn.proj) is LoraLinear) for b in model.image_encoder.blocks]
    assert kinds == [(True, False), (False, False), (False, False), (True, False)]
    assert adaptation_of(model).blocks == (0, -1)
    assert not hasattr(model, "peft_config")
    keys = model.state_dict().keys()
    assert "image_encoder.blocks.0.attn.qkv.base_layer.weight" in keys
    assert "image_encoder.blocks.0.attn.qkv.lora_A.default.weight" in keys
    model = apply_adaptation(copy.deepcopy(tiny_base), dict(method="lora", lora_include_decoder=True,
                                                            lora_decoder_targets=["q_proj", "v_proj"]))
    decoder_lora_modules = sorted(n for n, m in model.mask_decoder.named_modules() if type(m) is LoraLinear)
    assert len(decoder_lora_modules) == 2 * 7 and all(n.endswith(("q_proj", "v_proj")) for n in decoder_lora_modules)


def test_tiny_vit_blocks_and_regex():
    torch.manual_seed(0)
    model = build_sam("sam_tiny_vit_t")
    names = [n for n, _ in attention_blocks(model.image_encoder)]
    assert names == ["layers.1.blocks.0", "layers.2.blocks.0", "layers.3.blocks.0"]
    apply_adaptation(model, dict(method="adapter", blocks=r"layers\.3\.blocks\.\d+"))
    assert isinstance(model.image_encoder.layers[3].blocks[0].attn, AdaptedAttention)
    assert isinstance(model.image_encoder.layers[3].blocks[0].mlp, ParallelAdapterMLP)
    assert model.image_encoder.layers[3].blocks[0].mlp.norm_input  # TinyViT's MLP normalises internally
    assert not isinstance(model.image_encoder.layers[1].blocks[0].attn, AdaptedAttention)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(method="lora", blocks=[4]), r"indices \[4\] out of range for the 4 attention blocks .*valid: -4\.\.3"),
        (dict(method="lora", blocks=[1, -3]), "names some blocks twice"),
        (dict(method="adapter", blocks=r"layers\.\d+"), r"matches no attention block .*blocks\.0, blocks\.1"),
        (dict(freeze_policy="last_k", last_k=5), r"last_k=5 but ImageEncoderViT has 4 attention blocks"),
    ],
)
def test_selection_errors(tiny_base, config, message):
    with pytest.raises(ValueError, match=message):
        apply_adaptation(copy.deepcopy(tiny_base), config)


def test_apply_twice_and_wrong_type_are_errors(tiny_base):
    model = apply_adaptation(copy.deepcopy(tiny_base), dict(method="lora"))
    with pytest.raises(ValueError, match="already adapted"):
        apply_adaptation(model, dict(method="adapter"))
    with pytest.raises(TypeError, match="expects a samtune Sam"):
        apply_adaptation(nn.Linear(2, 2), dict(method="lora"))


def test_unused_mobilesam_head_never_trains():
    cfg = get_config("sam_tiny_vit_t")
    model = build_sam_from_config(replace(cfg, encoder=replace(cfg.encoder, num_classes=10)))
    apply_adaptation(model, dict(method="none", freeze_policy="full"))
    assert not any(p.requires_grad for p in model.image_encoder.head.parameters())
    assert not any(p.requires_grad for p in model.image_encoder.norm_head.parameters())
    assert all(p.requires_grad for p in model.image_encoder.neck.parameters())


def test_last_k_on_tiny_vit_trains_the_tail_in_forward_order():
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny_vit_t"), dict(freeze_policy="last_k", last_k=2))
    encoder = model.image_encoder
    trains = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("layers") else "")
              for n, p in encoder.named_parameters() if p.requires_grad}
    # last 2 attention blocks: layers.2.blocks.0 and layers.3.blocks.0, the merging between them, the neck
    assert trains == {"layers.2", "layers.3", "neck"}
    assert not any(p.requires_grad for p in encoder.layers[1].parameters())


# -------------------------------------------------------------------------------------- identity, training
@pytest.mark.parametrize("name", ["sam_tiny", "sam_tiny_vit_t"])
@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_untrained_adaptation_is_the_identity(name, method):
    torch.manual_seed(0)
    model = build_sam(name)
    inputs = make_inputs(model)
    before = eval_outputs(model, inputs)
    apply_adaptation(model, dict(method=method, lora_include_decoder=method == "lora"))
    after = eval_outputs(model, inputs)
    # Equal to float rounding: LoRA-wrapped decoder projections take the plain attention path, the bare ones
    # the factorised one (mask_decoder.Attention), which sums the same terms in another order.
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "method"),
                         [("sam_tiny", "lora"), ("sam_tiny", "adapter"), ("sam_tiny_vit_t", "lora")])
def test_frozen_weights_bit_identical_after_training(name, method):
    """(TinyViT once: its BatchNorm statistics are the extra case; adapters there share the mechanism.)"""
    torch.manual_seed(0)
    model = apply_adaptation(build_sam(name), dict(method=method, freeze_policy="decoder_only"))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k in set(frozen_keys(model))}
    trained = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    assert any("running_mean" in k for k in frozen) == (name == "sam_tiny_vit_t")  # TinyViT BatchNorm stats
    train_steps(model, steps=2 if name == "sam_tiny" else 1)  # TinyViT at 256 px is slower: one step suffices
    state = model.state_dict()
    changed_frozen = [k for k, v in frozen.items() if not torch.equal(v, state[k])]
    assert changed_frozen == []
    new = trainable_state_dict(model)
    assert set(new) == set(trained)
    marker = "lora_B" if method == "lora" else "adapter.up"
    moved = [k for k in trained if marker in k and not torch.equal(trained[k], new[k])]
    assert moved and all(new[k].abs().sum() > 0 for k in moved)
    assert any(k.startswith("mask_decoder.") and not torch.equal(trained[k], new[k]) for k in trained)
