"""The image encoder's attention blocks (what ``blocks`` and ``last_k`` count) for the ViT and TinyViT encoders."""
from __future__ import annotations

import re

from torch import nn

from samtune.modeling.image_encoder import EncoderBlock, ImageEncoderViT
from samtune.modeling.tiny_vit import TinyViT, TinyViTBlock

__all__ = ["attention_blocks", "select_blocks", "encoder_tail_prefixes", "unused_encoder_prefixes"]


def attention_blocks(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """The encoder's transformer blocks in forward order, with their names inside the encoder.

    Args:
        encoder: an :class:`ImageEncoderViT` (``blocks.{i}``) or a :class:`TinyViT` (``layers.{s}.blocks.{j}``
            of the attention stages; the MBConv blocks of stage 0 have no attention and are not listed).

    Returns:
        ``[(name, block)]``; every block has ``attn.qkv``, ``attn.proj`` (linears) and ``mlp``.

    Raises:
        TypeError: another encoder type.
    """
    if isinstance(encoder, ImageEncoderViT):
        blocks = [(f"blocks.{i}", b) for i, b in enumerate(encoder.blocks)]
        kind: type[nn.Module] = EncoderBlock
    elif isinstance(encoder, TinyViT):
        blocks = [
            (f"layers.{s}.blocks.{j}", b)
            for s, layer in enumerate(encoder.layers)
            for j, b in enumerate(layer.blocks)
            if isinstance(b, TinyViTBlock)
        ]
        kind = TinyViTBlock
    else:
        raise TypeError(
            f"samtune.adapt supports the ViT (ImageEncoderViT) and TinyViT image encoders, got {type(encoder).__name__}"
        )
    if not blocks or not all(isinstance(b, kind) for _, b in blocks):
        raise TypeError(f"{type(encoder).__name__} has no attention blocks of type {kind.__name__}")
    return blocks


def select_blocks(encoder: nn.Module, blocks: tuple[int, ...] | str | None) -> list[tuple[str, nn.Module]]:
    """The attention blocks chosen by ``AdaptationConfig.blocks``.

    Args:
        encoder: the image encoder.
        blocks: None (all), indices into :func:`attention_blocks` (negative from the end), or a regular
            expression that must match a block name entirely (``re.fullmatch``).

    Returns:
        ``[(name, block)]`` in forward order.

    Raises:
        ValueError: an index out of range, or a pattern that matches no block (the message lists the names).
    """
    available = attention_blocks(encoder)
    n = len(available)
    if blocks is None:
        return available
    if isinstance(blocks, str):
        pattern = re.compile(blocks)
        chosen = [(name, b) for name, b in available if pattern.fullmatch(name)]
        if not chosen:
            names = ", ".join(name for name, _ in available)
            raise ValueError(f"AdaptationConfig.blocks: pattern {blocks!r} matches no attention block of "
                             f"{type(encoder).__name__} (blocks: {names})")
        return chosen
    bad = [i for i in blocks if not -n <= i < n]
    if bad:
        raise ValueError(f"AdaptationConfig.blocks: indices {bad} out of range for the {n} attention blocks of "
                         f"{type(encoder).__name__} (valid: {-n}..{n - 1})")
    picked = sorted({i % n for i in blocks})
    if len(picked) != len(blocks):
        raise ValueError(f"AdaptationConfig.blocks: {list(blocks)} names some blocks twice (the encoder has {n})")
    return [available[i] for i in picked]


def unused_encoder_prefixes(encoder: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of encoder parts that ``forward`` never uses (MobileSAM's classification head)."""
    if isinstance(encoder, TinyViT):
        return tuple(f"{name}." for name in ("norm_head", "head") if hasattr(encoder, name))
    return ()


def encoder_tail_prefixes(encoder: nn.Module, last_k: int) -> tuple[str, ...]:
    """Parameter-name prefixes of the encoder from its ``last_k``-th last attention block to the output.

    ViT: ``blocks.{depth-k}`` .. ``blocks.{depth-1}`` and ``neck``. TinyViT: the first of the last k attention
    blocks, every later block of its stage, that stage's patch merging, all later stages and the neck.

    Raises:
        ValueError: ``last_k`` larger than the number of attention blocks.
    """
    available = attention_blocks(encoder)
    if not 1 <= last_k <= len(available):
        raise ValueError(f"AdaptationConfig.last_k={last_k} but {type(encoder).__name__} has {len(available)} "
                         f"attention blocks (valid: 1..{len(available)})")
    if isinstance(encoder, ImageEncoderViT):
        depth = len(encoder.blocks)
        return tuple(f"blocks.{i}." for i in range(depth - last_k, depth)) + ("neck.",)
    first = available[len(available) - last_k][0]  # layers.{s}.blocks.{j}
    _, stage, _, start = first.split(".")
    s, j = int(stage), int(start)
    prefixes = [f"layers.{s}.blocks.{b}." for b in range(j, len(encoder.layers[s].blocks))]
    prefixes.append(f"layers.{s}.downsample.")
    prefixes += [f"layers.{t}." for t in range(s + 1, len(encoder.layers))]
    prefixes.append("neck.")
    return tuple(prefixes)
