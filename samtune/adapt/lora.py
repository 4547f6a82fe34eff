"""LoRA through peft: injection into the encoder attention (and optionally the decoder attention), and merging.

peft's ``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` in place by a ``peft.tuners.lora.Linear``
that keeps the original as ``base_layer`` and adds ``lora_B(lora_A(dropout(x))) * lora_alpha / r``
(``lora_A`` Kaiming-initialised, ``lora_B`` zero: the model is unchanged until trained). State-dict keys become
``...attn.qkv.base_layer.weight``, ``...attn.qkv.lora_A.default.weight``, ``...attn.qkv.lora_B.default.weight``.
:func:`merge_lora` folds ``B @ A * scale`` into the base weights and puts the plain ``nn.Linear`` back, which
restores the official key layout.

peft is imported on first use (it pulls in transformers: seconds of start-up that runs without LoRA should not
pay); until then no model can hold a peft layer.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from samtune.modeling.mask_decoder import Attention as DecoderAttention
from samtune.modeling.sam import Sam

__all__ = ["lora_target_names", "inject_lora", "lora_layers", "merge_lora"]

ADAPTER_NAME = "default"


def lora_target_names(
    model: Sam,
    blocks: list[tuple[str, nn.Module]],
    encoder_targets: tuple[str, ...],
    include_decoder: bool,
    decoder_targets: tuple[str, ...],
) -> list[str]:
    """Full module names (from the ``Sam`` root) of the linears that get LoRA.

    Args:
        model: the model.
        blocks: chosen encoder attention blocks ``[(name inside the encoder, block)]``.
        encoder_targets: ``"qkv"`` and/or ``"proj"`` of each block's ``attn``.
        include_decoder: add the decoder attention projections.
        decoder_targets: which of ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.
    """
    names = [f"image_encoder.{name}.attn.{t}" for name, _ in blocks for t in encoder_targets]
    if include_decoder:
        attentions = [n for n, m in model.mask_decoder.named_modules() if isinstance(m, DecoderAttention)]
        names += [f"mask_decoder.{n}.{t}" for n in attentions for t in decoder_targets]
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"LoRA target {name} is a {type(module).__name__}, expected nn.Linear")
    return names


def inject_lora(model: Sam, targets: list[str], rank: int, alpha: float, dropout: float) -> None:
    """Replace every target linear by a peft LoRA linear (in place).

    peft marks every other parameter of ``model`` as frozen; :func:`samtune.adapt.apply_adaptation` then applies
    the freeze policy.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # peft leaves its config dict on the model; the adaptation is recorded by samtune.adapt instead.
    if "peft_config" in vars(model):
        del model.peft_config


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """``[(name, layer)]`` of the peft layers (``peft.tuners.tuners_utils.BaseTunerLayer``) in ``model``."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:  # peft never imported: no peft layer exists
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, tuners.BaseTunerLayer)]


def _devices(layer: nn.Module) -> list[str]:
    """The devices of a layer's tensors (base weights and LoRA weights), sorted."""
    return sorted({str(t.device) for t in (*layer.parameters(), *layer.buffers())})


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain base module back (in place).

    A layer on the meta device (no data: a model built under ``torch.device("meta")`` or moved there) is merged
    by shape only. Every layer is checked before any is merged.

    Returns:
        The number of merged layers.

    Raises:
        ValueError: a LoRA layer whose tensors lie on several devices (``cpu += meta`` or ``cuda += cpu`` would
            give garbage or fail half-way); non-finite merged weights.
    """
    layers = lora_layers(model)
    for name, layer in layers:
        devices = _devices(layer)
        if len(devices) > 1:
            raise ValueError(
                f"merge_adaptation: the LoRA layer {name} has its weights on several devices ({', '.join(devices)}); "
                "move the whole model to one device first (e.g. model.cpu()), after loading any weights left on the "
                "meta device"
            )
    with torch.no_grad():  # every merged weight is finite before any layer changes (an in-place merge stays whole)
        for name, layer in layers:
            base = layer.get_base_layer()
            if base.weight.is_meta:
                continue
            weight = base.weight.detach().clone()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    weight += layer.get_delta_weight(adapter).to(weight.dtype)
            if not torch.isfinite(weight).all():
                raise ValueError(f"merge_adaptation: merging the LoRA layer {name} gives non-finite weights (NaN or "
                                 "inf in its trained LoRA weights?); nothing was merged")
    for name, layer in layers:
        layer.merge(safe_merge=False)  # checked above (peft's own check calls .item(), which meta tensors lack)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return len(layers)
