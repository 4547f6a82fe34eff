"""The adaptation settings: one YAML-able dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["AdaptationConfig", "Method", "FreezePolicy", "ENCODER_LORA_TARGETS", "DECODER_LORA_TARGETS"]

Method = Literal["none", "lora", "adapter"]
FreezePolicy = Literal["frozen", "decoder_only", "prompt_decoder", "last_k", "full"]
EncoderLoraTarget = Literal["qkv", "proj"]
DecoderLoraTarget = Literal["q_proj", "k_proj", "v_proj", "out_proj"]
AdapterPosition = Literal["attn", "mlp"]

ENCODER_LORA_TARGETS: tuple[str, ...] = ("qkv", "proj")
DECODER_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER_POSITIONS: tuple[str, ...] = ("attn", "mlp")
_METHODS = ("none", "lora", "adapter")
_POLICIES = ("frozen", "decoder_only", "prompt_decoder", "last_k", "full")


def _names(value: Any, field: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        names = tuple(str(v) for v in value)
    except TypeError:
        raise TypeError(f"AdaptationConfig.{field} must be a list of {list(allowed)}, got {value!r}") from None
    unknown = [n for n in names if n not in allowed]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"AdaptationConfig.{field} must be a non-empty list without repeats of {list(allowed)}, got {list(names)}"
        )
    return names


def _ignored_settings(
    method: Any, blocks: Any, lora_include_decoder: Any, adapter_dim: Any
) -> list[tuple[str, Any, str]]:
    """``[(field, value, why)]`` of the settings that are off by default, set, and never read by ``method``.

    Such a setting would be silently ignored (e.g. ``blocks`` with method ``"none"`` does not choose which blocks
    train: ``last_k`` does).
    """
    ignored = []
    if blocks is not None and method == "none":
        ignored.append(("blocks", blocks, "chooses the blocks that get LoRA / adapters"))
    if lora_include_decoder and method != "lora":
        ignored.append(("lora_include_decoder", lora_include_decoder, "only applies to method 'lora'"))
    if adapter_dim is not None and method != "adapter":
        ignored.append(("adapter_dim", adapter_dim, "only applies to method 'adapter'"))
    return ignored


def _means_all_blocks(blocks: Any) -> bool:
    """``blocks`` given as "all", or as null on the command line, which jsonargparse can hand over as the string
    "None"."""
    return isinstance(blocks, str) and blocks.strip() in ("all", "None", "null")


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class AdaptationConfig:
    """How a :class:`samtune.modeling.Sam` is adapted: the method, where it goes and what else trains.

    The image encoder's *attention blocks* are the units ``blocks`` and ``last_k`` count: the ViT's
    ``blocks.{i}`` (12 for ViT-B), and TinyViT's transformer blocks ``layers.{s}.blocks.{j}`` of stages 1..
    in forward order (10 for LiteMedSAM / MobileSAM: the convolutional stage 0 has no attention).

    A setting that is off by default and read by one method only (``blocks``, ``lora_include_decoder``,
    ``adapter_dim``) is an error with another method, like ``last_k`` with another freeze policy.

    Attributes:
        method: ``"none"`` (only the freeze policy), ``"lora"`` (low-rank updates of the encoder attention's
            ``qkv`` and ``proj`` linears via peft; optionally the decoder's attention projections) or
            ``"adapter"`` (Medical-SAM-Adapter bottleneck adapters in the encoder blocks).
        freeze_policy: which *base* weights train besides the LoRA / adapter weights:
            ``"frozen"`` none (only LoRA / adapters train; needs a method),
            ``"decoder_only"`` the mask decoder,
            ``"prompt_decoder"`` the prompt encoder and the mask decoder,
            ``"last_k"`` the encoder from its ``last_k``-th last attention block on (those blocks, the layers after
            them and the neck) plus the prompt encoder and the mask decoder,
            ``"full"`` everything. The weights a LoRA layer wraps always stay frozen (that is LoRA); MobileSAM's
            unused classification head never trains.
        last_k: number of trailing encoder attention blocks for ``freeze_policy="last_k"`` (only then).
        blocks: encoder attention blocks that get LoRA / adapters: None (or ``"all"``) for all, a list of indices (negative
            counts from the end), or a regular expression matched (``re.fullmatch``) against the block names
            inside the image encoder, e.g. ``"blocks\\.(2|5|8|11)"`` or ``"layers\\.3\\.blocks\\.\\d+"``.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha; the update is scaled by ``lora_alpha / lora_rank``.
        lora_dropout: dropout on the input of the LoRA branch (training only).
        lora_targets: encoder attention linears that get LoRA (``"qkv"``, ``"proj"``).
        lora_include_decoder: also put LoRA on the mask decoder's attention projections (all 7 attention layers
            of the two-way transformer).
        lora_decoder_targets: which decoder projections (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
        adapter_dim: bottleneck width of every adapter; None derives it from ``adapter_ratio``.
        adapter_ratio: bottleneck width as a fraction of the block width (Medical SAM Adapter: 0.25), used when
            ``adapter_dim`` is None; at least 1 channel.
        adapter_mlp_scale: scale of the MLP-parallel adapter's output (Medical SAM Adapter: 0.5).
        adapter_positions: ``"attn"`` (after the attention, residual inside the adapter) and/or ``"mlp"``
            (parallel to the MLP, on the MLP's normalised input).
        checkpoint_weights: what the Lightning checkpoints of an adapted training run hold: ``"trainable"``
            only the trainable weights (MBs; resuming rebuilds the base from the task's ``checkpoint`` file and
            checks it against a fingerprint), ``"full"`` every weight. Runs whose base is randomly initialised
            (no ``checkpoint``) always save every weight.
    """

    method: Method = "none"
    freeze_policy: FreezePolicy = "decoder_only"
    last_k: int | None = None
    blocks: tuple[int, ...] | str | None = None
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[EncoderLoraTarget, ...] = ("qkv", "proj")
    lora_include_decoder: bool = False
    lora_decoder_targets: tuple[DecoderLoraTarget, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    adapter_dim: int | None = None
    adapter_ratio: float = 0.25
    adapter_mlp_scale: float = 0.5
    adapter_positions: tuple[AdapterPosition, ...] = ("attn", "mlp")
    checkpoint_weights: Literal["trainable", "full"] = "trainable"

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(f"AdaptationConfig.method must be one of {list(_METHODS)}, got {self.method!r}")
        if self.freeze_policy not in _POLICIES:
            raise ValueError(
                f"AdaptationConfig.freeze_policy must be one of {list(_POLICIES)}, got {self.freeze_policy!r}"
            )
        if self.freeze_policy == "frozen" and self.method == "none":
            raise ValueError(
                "AdaptationConfig: freeze_policy 'frozen' with method 'none' leaves nothing to train; choose "
                "method 'lora' or 'adapter', or another freeze_policy"
            )
        if self.freeze_policy == "last_k":
            last_k = self.last_k
            if not _is_real(last_k) or int(last_k) != last_k or last_k < 1:
                raise ValueError(
                    f"AdaptationConfig.last_k must be a positive integer with freeze_policy 'last_k', got {self.last_k!r}"
                )
            object.__setattr__(self, "last_k", int(last_k))  # 2.0 (YAML / JSON) counts blocks like 2
        elif self.last_k is not None:
            raise ValueError(
                f"AdaptationConfig.last_k={self.last_k} only applies to freeze_policy 'last_k' "
                f"(freeze_policy is {self.freeze_policy!r}); remove it"
            )
        blocks = self.blocks
        if _means_all_blocks(blocks):
            blocks = None
            object.__setattr__(self, "blocks", None)
        if isinstance(blocks, str):
            if not blocks:
                raise ValueError("AdaptationConfig.blocks: an empty pattern; use null for all blocks")
            try:
                re.compile(blocks)
            except re.error as err:
                raise ValueError(f"AdaptationConfig.blocks: {blocks!r} is not a valid regular expression ({err})") from None
        elif blocks is not None:
            try:
                indices = tuple(blocks)
            except TypeError:
                raise TypeError(
                    f"AdaptationConfig.blocks must be null, a list of block indices or a regex string, got {blocks!r}"
                ) from None
            if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
                raise ValueError(f"AdaptationConfig.blocks must be a non-empty list of integers, got {list(indices)}")
            if len(set(indices)) != len(indices):
                raise ValueError(f"AdaptationConfig.blocks has repeated indices: {list(indices)}")
            object.__setattr__(self, "blocks", indices)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"AdaptationConfig.lora_rank must be a positive integer, got {self.lora_rank!r}")
        if not _is_real(self.lora_alpha) or not self.lora_alpha > 0:
            raise ValueError(f"AdaptationConfig.lora_alpha must be > 0 (a finite number), got {self.lora_alpha!r}")
        if not _is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"AdaptationConfig.lora_dropout must be in [0, 1) (a number), got {self.lora_dropout!r}"
            )
        object.__setattr__(self, "lora_targets", _names(self.lora_targets, "lora_targets", ENCODER_LORA_TARGETS))
        object.__setattr__(
            self, "lora_decoder_targets", _names(self.lora_decoder_targets, "lora_decoder_targets", DECODER_LORA_TARGETS)
        )
        if self.adapter_dim is not None and (
            isinstance(self.adapter_dim, bool) or not isinstance(self.adapter_dim, int) or self.adapter_dim < 1
        ):
            raise ValueError(f"AdaptationConfig.adapter_dim must be a positive integer or null, got {self.adapter_dim!r}")
        if not _is_real(self.adapter_ratio) or not self.adapter_ratio > 0:
            raise ValueError(
                f"AdaptationConfig.adapter_ratio must be > 0 (a finite number), got {self.adapter_ratio!r}"
            )
        if not _is_real(self.adapter_mlp_scale) or not self.adapter_mlp_scale > 0:
            raise ValueError(
                f"AdaptationConfig.adapter_mlp_scale must be > 0 (a finite number; 0 would switch the MLP "
                f"adapter off), got {self.adapter_mlp_scale!r}"
            )
        object.__setattr__(
            self, "adapter_positions", _names(self.adapter_positions, "adapter_positions", ADAPTER_POSITIONS)
        )
        ignored = _ignored_settings(self.method, self.blocks, self.lora_include_decoder, self.adapter_dim)
        if ignored:
            field, value, why = ignored[0]
            raise ValueError(f"AdaptationConfig.{field}={value!r} is ignored with method {self.method!r} ({why}); "
                             f"remove it or choose the method it belongs to")
        if self.checkpoint_weights not in ("trainable", "full"):
            raise ValueError(
                f"AdaptationConfig.checkpoint_weights must be 'trainable' or 'full', got {self.checkpoint_weights!r}"
            )

    @classmethod
    def coerce(cls, value: "AdaptationConfig | dict[str, Any]", name: str = "adaptation") -> "AdaptationConfig":
        """The config itself, or one built from its dict form (YAML, checkpoints); unknown keys are an error.

        Settings the dict's method ignores (``blocks`` with ``"none"``, ``lora_include_decoder`` without LoRA,
        ``adapter_dim`` without adapters) are dropped with a warning instead of refused: checkpoints saved before
        they were refused still load, as the same model.

        Args:
            value: an :class:`AdaptationConfig` or a dict of its fields.
            name: what to call the value in error messages.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"{name}: unknown keys {unknown} for AdaptationConfig; expected some of {known}")
            blocks = None if _means_all_blocks(value.get("blocks")) else value.get("blocks")
            ignored = _ignored_settings(value.get("method", "none"), blocks, value.get("lora_include_decoder", False),
                                        value.get("adapter_dim"))
            if ignored:
                # Stored before such settings were refused (checkpoints): they never had an effect, so the model is
                # rebuilt the same without them.
                warnings.warn(f"{name}: dropping settings that method {value.get('method')!r} ignores: "
                              + ", ".join(f"{field}={v!r}" for field, v, _ in ignored), stacklevel=2)
                value = {k: v for k, v in value.items() if k not in {field for field, _, _ in ignored}}
            return cls(**value)
        raise TypeError(f"{name} must be an AdaptationConfig or a dict of its fields, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain form (lists, strings, numbers, None): YAML, JSON and ``torch.load(weights_only=True)`` accept it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
