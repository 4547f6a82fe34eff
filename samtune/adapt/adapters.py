"""Bottleneck adapters in the image-encoder blocks, as in Medical SAM Adapter (Wu et al., arXiv 2304.12620).

Each chosen block gets (``AdaptationConfig.adapter_positions``):

* ``"attn"``: ``block.attn`` is wrapped in :class:`AdaptedAttention`; the adapter acts on the attention output
  with its own residual, ``y = a + up(gelu(down(a)))`` where ``a = attn(x)``; the block then adds ``y`` to its
  shortcut as before.
* ``"mlp"``: ``block.mlp`` is wrapped in :class:`ParallelAdapterMLP`; the adapter runs parallel to the MLP on
  the MLP's normalised input ``h``: ``mlp(h) + scale * up(gelu(down(h)))`` (scale 0.5 by default). In the ViT
  block the MLP receives ``norm2(x)``; TinyViT's MLP normalises internally, so the wrapper applies that same
  LayerNorm to the adapter's input.

The up-projections start at zero (weight and bias), so an untrained adapter leaves every output unchanged.
The blocks themselves are not edited: only their ``attn`` / ``mlp`` children are replaced by wrappers that keep
the original module as ``base_layer`` (state-dict keys ``...attn.base_layer.qkv.weight``,
``...attn.adapter.down.weight``). Adapters contain a nonlinearity and cannot be merged into the linear weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samtune.modeling.tiny_vit import Mlp as TinyViTMlp

__all__ = ["BottleneckAdapter", "AdaptedAttention", "ParallelAdapterMLP", "add_adapters", "adapter_width"]


class BottleneckAdapter(nn.Module):
    """``down`` (C -> hidden), GELU, ``up`` (hidden -> C, zero-initialised): ``[..., C] -> [..., C]``.

    Args:
        dim: channels C.
        hidden: bottleneck width.
        residual: return ``x + up(gelu(down(x)))`` instead of the branch alone.
    """

    def __init__(self, dim: int, hidden: int, residual: bool) -> None:
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"BottleneckAdapter: dim and hidden must be positive, got {dim}, {hidden}")
        self.residual = residual
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., C] -> [..., C]``."""
        branch = self.up(self.act(self.down(x)))
        return x + branch if self.residual else branch


class AdaptedAttention(nn.Module):
    """``adapter(base_layer(...))``: an attention module followed by a residual bottleneck adapter.

    Args:
        base_layer: the block's attention (its output ``[..., C]``).
        adapter: a :class:`BottleneckAdapter` with ``residual=True``.
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Same inputs as the wrapped attention; output ``[..., C]`` like it."""
        return self.adapter(self.base_layer(*args, **kwargs))


class ParallelAdapterMLP(nn.Module):
    """``base_layer(h) + scale * adapter(h)``: an MLP with a bottleneck adapter beside it.

    Args:
        base_layer: the block's MLP, ``[..., C] -> [..., C]``.
        adapter: a :class:`BottleneckAdapter` with ``residual=False``.
        scale: multiplier of the adapter branch.
        norm_input: feed the adapter ``base_layer.norm(h)`` (TinyViT's MLP normalises its input internally).
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter, scale: float, norm_input: bool) -> None:
        super().__init__()
        if norm_input and not isinstance(getattr(base_layer, "norm", None), nn.Module):
            raise TypeError(f"ParallelAdapterMLP: norm_input needs an MLP with a .norm, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.adapter = adapter
        self.scale = float(scale)
        self.norm_input = norm_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., C] -> [..., C]``."""
        h = self.base_layer.norm(x) if self.norm_input else x
        return self.base_layer(x) + self.scale * self.adapter(h)


def adapter_width(dim: int, adapter_dim: int | None, adapter_ratio: float) -> int:
    """Bottleneck width for a block of ``dim`` channels: ``adapter_dim``, or ``round(dim * ratio)`` (at least 1)."""
    return int(adapter_dim) if adapter_dim is not None else max(1, int(round(dim * adapter_ratio)))


def add_adapters(
    blocks: list[tuple[str, nn.Module]],
    *,
    adapter_dim: int | None,
    adapter_ratio: float,
    mlp_scale: float,
    positions: tuple[str, ...],
) -> list[nn.Module]:
    """Wrap ``attn`` and/or ``mlp`` of every block (in place).

    Args:
        blocks: ``[(name, block)]`` from :func:`samtune.adapt.blocks.select_blocks`.
        adapter_dim, adapter_ratio: bottleneck width (see :func:`adapter_width`).
        mlp_scale: output scale of the MLP-parallel adapter.
        positions: ``"attn"`` and/or ``"mlp"``.

    Returns:
        The new adapter modules (their parameters are the trainable ones).

    Raises:
        ValueError: a block that already has adapters.
    """
    created: list[nn.Module] = []
    for name, block in blocks:
        if isinstance(block.attn, AdaptedAttention) or isinstance(block.mlp, ParallelAdapterMLP):
            raise ValueError(f"encoder block {name} already has adapters")
        dim = block.attn.qkv.in_features
        hidden = adapter_width(dim, adapter_dim, adapter_ratio)
        device, dtype = block.attn.qkv.weight.device, block.attn.qkv.weight.dtype
        if "attn" in positions:
            adapter = BottleneckAdapter(dim, hidden, residual=True).to(device=device, dtype=dtype)
            block.attn = AdaptedAttention(block.attn, adapter)
            created.append(adapter)
        if "mlp" in positions:
            adapter = BottleneckAdapter(dim, hidden, residual=False).to(device=device, dtype=dtype)
            block.mlp = ParallelAdapterMLP(block.mlp, adapter, mlp_scale, norm_input=isinstance(block.mlp, TinyViTMlp))
            created.append(adapter)
    return created
