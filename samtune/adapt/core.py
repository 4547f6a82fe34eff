"""Applying an adaptation (method + freeze policy), the trainable weights, merging and merged export."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from samtune.adapt.adapters import AdaptedAttention, ParallelAdapterMLP, add_adapters
from samtune.adapt.blocks import encoder_tail_prefixes, select_blocks, unused_encoder_prefixes
from samtune.adapt.config import AdaptationConfig
from samtune.adapt.lora import inject_lora, lora_layers, lora_target_names, merge_lora
from samtune.modeling.sam import Sam

__all__ = [
    "ADAPTATION_ATTRIBUTE",
    "AdapterMergeError",
    "apply_adaptation",
    "adaptation_of",
    "is_adapted",
    "trainable_state_dict",
    "frozen_keys",
    "base_fingerprint",
    "compare_fingerprints",
    "eval_frozen_batchnorm",
    "merge_adaptation",
    "export_merged",
    "OFFICIAL_PREFIXES",
]

# The applied AdaptationConfig is kept on the model under this attribute (a plain Python attribute).
ADAPTATION_ATTRIBUTE = "samtune_adaptation"
OFFICIAL_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


class AdapterMergeError(ValueError):
    """Bottleneck adapters cannot be folded into the linear weights of the official layout."""


def adaptation_of(model: nn.Module) -> AdaptationConfig | None:
    """The :class:`AdaptationConfig` applied to ``model`` by :func:`apply_adaptation`, or None."""
    return getattr(model, ADAPTATION_ATTRIBUTE, None)


def _has_adapter_modules(model: nn.Module) -> bool:
    return any(isinstance(m, (AdaptedAttention, ParallelAdapterMLP)) for m in model.modules())


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` carries an adaptation (a recorded config, LoRA layers or adapters)."""
    return adaptation_of(model) is not None or bool(lora_layers(model)) or _has_adapter_modules(model)


def _trainable_base_prefixes(model: Sam, config: AdaptationConfig) -> tuple[str, ...]:
    """Parameter-name prefixes (from the ``Sam`` root) of the base weights the freeze policy trains."""
    policy = config.freeze_policy
    if policy == "frozen":
        return ()
    if policy == "decoder_only":
        return ("mask_decoder.",)
    if policy == "prompt_decoder":
        return ("prompt_encoder.", "mask_decoder.")
    if policy == "last_k":
        assert config.last_k is not None  # validated by AdaptationConfig
        tail = encoder_tail_prefixes(model.image_encoder, config.last_k)
        return tuple(f"image_encoder.{p}" for p in tail) + ("prompt_encoder.", "mask_decoder.")
    return ("",)  # full


def apply_adaptation(model: Sam, config: AdaptationConfig | dict) -> Sam:
    """Adapt ``model`` in place: insert LoRA / adapters, then set which weights train.

    After this call exactly these parameters have ``requires_grad=True``: the LoRA / adapter weights and the
    base weights the freeze policy selects (see :class:`AdaptationConfig`), minus the base weights wrapped by
    LoRA layers and MobileSAM's unused classification head. Load the base weights *before* adapting (key names
    of LoRA-wrapped and adapter-wrapped modules change: ``qkv`` -> ``qkv.base_layer``, ``attn`` ->
    ``attn.base_layer``).

    Train mode is left to the caller; frozen BatchNorm layers (TinyViT) should keep their statistics: call
    :func:`eval_frozen_batchnorm` after every ``model.train()`` (the Lightning task does).

    Args:
        model: a :class:`Sam` with a ViT or TinyViT image encoder, not yet adapted.
        config: the adaptation (or its dict form).

    Returns:
        ``model``.

    Raises:
        ValueError: an already adapted model, blocks / last_k that do not fit the encoder.
        TypeError: an unsupported encoder or a ``config`` of the wrong type.
    """
    config = AdaptationConfig.coerce(config)
    if not isinstance(model, Sam):
        raise TypeError(f"apply_adaptation expects a samtune Sam, got {type(model).__name__}")
    if is_adapted(model):
        raise ValueError("apply_adaptation: the model is already adapted (LoRA layers or adapters present); "
                         "build a fresh model (or merge_adaptation first)")
    blocks = select_blocks(model.image_encoder, config.blocks)
    trainable_prefixes = _trainable_base_prefixes(model, config)  # validates last_k before touching the model
    added: list[nn.Parameter] = []
    if config.method == "lora":
        targets = lora_target_names(model, blocks, config.lora_targets, config.lora_include_decoder,
                                    config.lora_decoder_targets)
        inject_lora(model, targets, config.lora_rank, config.lora_alpha, config.lora_dropout)
        for _, layer in lora_layers(model):
            added += [p for n, p in layer.named_parameters() if n.startswith(("lora_A.", "lora_B."))]
    elif config.method == "adapter":
        modules = add_adapters(
            [(f"image_encoder.{name}", block) for name, block in blocks],
            adapter_dim=config.adapter_dim, adapter_ratio=config.adapter_ratio,
            mlp_scale=config.adapter_mlp_scale, positions=config.adapter_positions,
        )
        added += [p for m in modules for p in m.parameters()]

    model.requires_grad_(False)
    unused = tuple(f"image_encoder.{p}" for p in unused_encoder_prefixes(model.image_encoder))
    for name, param in model.named_parameters():
        if name.startswith(trainable_prefixes) and not name.startswith(unused):
            param.requires_grad_(True)
    for _, layer in lora_layers(model):  # LoRA: the wrapped weights stay fixed
        layer.get_base_layer().requires_grad_(False)
    for param in added:
        param.requires_grad_(True)
    setattr(model, ADAPTATION_ATTRIBUTE, config)
    return model


# Attributes under which module wrappers keep the wrapped module: they add a level to module names but not to
# state-dict keys (activation checkpointing and FSDP units, e.g. Lightning's FSDP strategy on the encoder blocks).
_WRAPPER_ATTRIBUTES = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def _state_dict_prefix(module_name: str) -> str:
    """The state-dict key prefix of the tensors of the module named ``module_name`` (wrapper levels removed)."""
    return "".join(f"{part}." for part in module_name.split(".") if part and part not in _WRAPPER_ATTRIBUTES)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of ``model`` (detached, on their device), keyed as in ``model.state_dict()``.

    Besides every parameter with ``requires_grad=True``, it holds the persistent buffers of modules that own a
    trainable parameter directly (the running statistics of a trainable BatchNorm), because training changes
    them too. Everything else is the frozen base. Modules wrapped for activation checkpointing or FSDP count as
    the modules they wrap.
    """
    state = model.state_dict(keep_vars=True)
    keys: set[str] = set()
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = _state_dict_prefix(module_name)
        keys.update(prefix + n for n, p in own if p.requires_grad)
        keys.update(prefix + n for n, b in module.named_buffers(recurse=False) if prefix + n in state)
    return {k: state[k].detach() for k in state if k in keys}


def frozen_keys(model: nn.Module) -> list[str]:
    """Keys of ``model.state_dict()`` that are not in :func:`trainable_state_dict` (the frozen base), sorted."""
    trainable = set(trainable_state_dict(model))
    return sorted(k for k in model.state_dict() if k not in trainable)


@torch.no_grad()
def base_fingerprint(model: nn.Module, like: dict[str, list] | None = None) -> dict[str, list]:
    """A cheap fingerprint of the frozen base: per frozen key, the float64 sum and sum of absolute values.

    Used to check that a base rebuilt from a checkpoint file is the one an adapter was trained on.

    Args:
        model: the (adapted) model.
        like: a fingerprint to compare with: each tensor is first cast to the dtype it had there (a model saved in
            bf16 / fp16 held its base rounded to that dtype; a base rebuilt from its float32 file must be rounded
            alike to match).

    Returns:
        ``{"keys": [K names], "sums": [[sum, abs_sum]] * K, "dtypes": [K dtype names]}`` (plain lists: JSON- and
        weights_only-safe).
    """
    state = model.state_dict()
    keys = frozen_keys(model)
    recorded = dict(zip(like.get("keys", []), like.get("dtypes", []))) if like is not None else {}
    sums: list[list[float]] = []
    if keys:
        rows = []
        for k in keys:
            t = state[k].detach()
            dtype = getattr(torch, str(recorded.get(k)), None)
            if isinstance(dtype, torch.dtype):
                t = t.to(dtype)
            t = t.double()
            rows.append(torch.stack((t.sum(), t.abs().sum())))
        sums = torch.stack(rows).cpu().tolist()
    return {"keys": keys, "sums": sums, "dtypes": [str(state[k].dtype).removeprefix("torch.") for k in keys]}


def compare_fingerprints(expected: dict[str, list], actual: dict[str, list], rtol: float = 1e-6) -> list[str]:
    """Keys whose fingerprints differ (or that one side lacks); empty when the bases match."""
    exp = dict(zip(expected.get("keys", []), expected.get("sums", [])))
    act = dict(zip(actual.get("keys", []), actual.get("sums", [])))
    bad = sorted(set(exp) ^ set(act))
    for key in sorted(set(exp) & set(act)):
        (s0, a0), (s1, a1) = exp[key], act[key]
        scale = max(abs(a0), abs(a1), 1e-12)
        if abs(s0 - s1) > rtol * scale or abs(a0 - a1) > rtol * scale:
            bad.append(key)
    return bad


def eval_frozen_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm whose parameters are all frozen in eval mode (fixed running statistics).

    Call after ``model.train()``: a frozen TinyViT encoder under LoRA / adapters must keep normalising with its
    pretrained statistics, and those buffers must not change.

    Returns:
        The number of BatchNorm layers set to eval.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()
                count += 1
    return count


def merge_adaptation(model: Sam, *, inplace: bool = False) -> Sam:
    """A plain :class:`Sam` whose ``state_dict`` has exactly the official key layout.

    LoRA updates are folded into the base weights (``W + B @ A * alpha / r``) and the LoRA layers removed; a
    model without adaptation comes back as is. ``requires_grad`` flags are left as they were.

    Bottleneck adapters cannot be merged: they contain a GELU between two projections, so no linear weight of the
    official architecture can express them. Adapted models are used and shipped as base checkpoint + adapter
    checkpoint (:func:`samtune.adapt.save_adapter_checkpoint` / :func:`samtune.adapt.load_adapter_checkpoint`).

    Args:
        model: an adapted (or plain) model.
        inplace: merge ``model`` itself (saves the memory of a copy; the model is no longer adapted afterwards).
            By default a deep copy is merged and ``model`` is untouched.

    Returns:
        The merged model (``model`` itself when ``inplace``).

    A model on the meta device (shapes only) merges by shape: the result has the official layout, still on the meta
    device (writing it is an error until its weights are loaded).

    Raises:
        AdapterMergeError: the model has bottleneck adapters.
        ValueError: a LoRA layer with its weights on several devices (move the model to one first), or non-finite
            merged weights.
    """
    if _has_adapter_modules(model):
        raise AdapterMergeError(
            "merge_adaptation: the model has bottleneck adapters (method 'adapter'); an adapter has a GELU between "
            "its projections, so it cannot be folded into the linear weights of the official SAM layout. Keep the "
            "base checkpoint and save the adapter with samtune.adapt.save_adapter_checkpoint (load both with "
            "samtune.adapt.load_adapter_checkpoint), or train with method 'lora' for a mergeable result"
        )
    merged = model if inplace else copy.deepcopy(model)
    merge_lora(merged)
    if ADAPTATION_ATTRIBUTE in vars(merged):
        delattr(merged, ADAPTATION_ATTRIBUTE)
    return merged


def _check_official_layout(model: nn.Module) -> None:
    keys = list(model.state_dict())
    odd = [k for k in keys if not k.startswith(OFFICIAL_PREFIXES)
           or any(part in k.split(".") for part in ("base_layer", "lora_A", "lora_B", "adapter"))]
    if odd:
        raise ValueError(f"merged model does not have the official key layout: {odd[:8]}")


def export_merged(model: Sam, path: str | Path, format: Literal["pth", "safetensors"] = "pth") -> Path:
    """Merge the adaptation (on a copy) and write official-layout weights.

    The file loads with ``segment_anything.sam_model_registry[...](checkpoint=path)`` (ViT models), with
    ``samtune.build_sam(name, path)`` and with the apps that read official SAM / MobileSAM / LiteMedSAM files.

    Args:
        model: an adapted (LoRA) or plain model; ``model`` itself is not changed.
        path: destination; its suffix must fit ``format`` (``.safetensors`` for safetensors, anything else for
            ``pth``).
        format: ``"pth"`` (``torch.save`` of a plain state dict) or ``"safetensors"``.

    Returns:
        The path written (atomically, via :func:`samtune.checkpoints.save_checkpoint`).

    Raises:
        AdapterMergeError: a model with bottleneck adapters (see :func:`merge_adaptation`).
        ValueError: an unknown format or a suffix that does not fit it.
    """
    from samtune.checkpoints import save_checkpoint
    from samtune.export.metadata import sidecar_path

    path = Path(path)
    if format not in ("pth", "safetensors"):
        raise ValueError(f"export_merged: format must be 'pth' or 'safetensors', got {format!r}")
    if (format == "safetensors") != (path.suffix == ".safetensors"):
        raise ValueError(f"export_merged: path {path} does not fit format {format!r} "
                         "(use a .safetensors suffix exactly for format 'safetensors')")
    merged = merge_adaptation(model)
    _check_official_layout(merged)
    written = save_checkpoint(merged, path)
    stale = sidecar_path(written)
    if stale.is_file():  # a `samtune export` of what this file held before: its model name and preprocessing
        stale.unlink()   # would be read for these weights (samtune.export.read_export_metadata)
        warnings.warn(f"export_merged: removed {stale}, the export metadata of the file {written} replaced",
                      stacklevel=2)
    return written
