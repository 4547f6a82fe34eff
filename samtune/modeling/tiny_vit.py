"""TinyViT image encoder of MobileSAM ("vit_t") and LiteMedSAM.

The module tree and parameter names follow MobileSAM's TinyViT, so the ``image_encoder.*`` entries of
the official MobileSAM and LiteMedSAM checkpoints load unchanged (strict) once the ``image_encoder.``
prefix is stripped.

Architecture (4 stages for both official models):

* stem ``patch_embed.seq``: two Conv+BN with a GELU between. MobileSAM: 3x3 convs of stride 2 (total
  stride 4); LiteMedSAM: 1x1 convs of stride 1 (no downsampling). Chosen by ``stem_stride``.
* stage 0 ``layers.0``: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU).
* stages 1.. ``layers.i``: TinyViT blocks: windowed attention with a learned bias per (|dy|, |dx|)
  offset inside the window (``attention_biases``), a 3x3 depthwise Conv+BN (``local_conv``, no
  residual) and an MLP; both attention and MLP have their own pre-LayerNorm and residual.
* every stage but the last ends with a patch merging (1x1 conv, 3x3 depthwise conv, 1x1 conv). Its
  stride is 2, except for the merging into the last stage, which keeps the resolution (stride 1): this is
  what MobileSAM does (there keyed on the last width being 320/448/576, i.e. on every official config).
* ``neck``: Conv1x1 (no bias) -> LayerNorm2d -> Conv3x3 (no bias) -> LayerNorm2d, ``out_chans`` channels.

Total stride: ``stem_stride * 2 ** (num_stages - 2)``: 16 for MobileSAM (1024 -> 64x64) and 4 for
LiteMedSAM (256 -> 64x64). Spatial sizes are taken from the input, so other sizes work too (windows are
zero-padded bottom/right like the reference).

MobileSAM's checkpoint also holds an unused ImageNet head (``norm_head``, ``head``): built when
``num_classes > 0`` so the strict load works, frozen and never used by ``forward``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "TinyViT",
    "ConvBN",
    "MBConv",
    "PatchMerging",
    "WindowAttention",
    "TinyViTBlock",
    "attend_matmul",
    "attend_sdpa",
]


class ConvBN(nn.Sequential):
    """Bias-free ``Conv2d`` (child ``c``) followed by ``BatchNorm2d`` (child ``bn``); 'same' padding.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        kernel_size: square kernel size (odd).
        stride: convolution stride.
        groups: convolution groups (``in_chans`` for depthwise).
        bn_weight_init: initial BatchNorm scale (0 makes a residual branch start as identity).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class PatchEmbed(nn.Module):
    """Stem: ``[B, in_chans, H, W] -> [B, dim, H / stride, W / stride]``.

    Args:
        in_chans: input image channels.
        dim: output channels (``dim // 2`` in between).
        stride: 4 (MobileSAM: two 3x3 convs of stride 2) or 1 (LiteMedSAM: two 1x1 convs).
    """

    def __init__(self, in_chans: int, dim: int, stride: Literal[1, 4]) -> None:
        super().__init__()
        kernel, step = (3, 2) if stride == 4 else (1, 1)
        self.seq = nn.Sequential(
            ConvBN(in_chans, dim // 2, kernel, step),
            nn.GELU(),
            ConvBN(dim // 2, dim, kernel, step),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: ``[B, C, H, W] -> [B, C, H, W]``.

    Args:
        dim: channels.
        expand_ratio: hidden channels / ``dim``.
        drop_path: stochastic depth probability of the residual branch.
    """

    def __init__(self, dim: int, expand_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.act(x + self.drop_path(self.conv3(y)))


class PatchMerging(nn.Module):
    """Downsampling between stages: ``[B, C, H, W] -> [B, out_dim, H / stride, W / stride]``.

    Args:
        dim: input channels.
        out_dim: output channels.
        stride: stride of the depthwise 3x3 conv (2, or 1 before the last stage).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def attend_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with explicit matmuls (faster than SDPA's masked CPU path).

    Args:
        q: ``[B, heads, N, d]`` queries; k, v the same shape.
        bias: ``[heads, N, N]`` additive attention bias.

    Returns:
        ``[B, heads, N, d]``.
    """
    return (torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1)) + bias).softmax(dim=-1) @ v


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Same as ``attend_matmul`` through ``F.scaled_dot_product_attention`` (fused kernels on GPU)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned bias per relative offset.

    The bias table ``attention_biases`` ``[num_heads, window_size ** 2]`` holds one value per head and
    per offset (|dy|, |dx|), offset index ``|dy| * window_size + |dx|`` (the order of MobileSAM's table).
    ``attention_bias_idxs`` ``[N, N]`` (N = window_size ** 2) maps token pairs to offsets; it is a
    non-persistent buffer, as in the official checkpoints. q, k and v are interleaved per head in the
    ``qkv`` output (``[..., heads, (q, k, v)]``), as in MobileSAM.

    Args:
        dim: token channels.
        num_heads: attention heads (``dim`` must divide evenly).
        window_size: window side in tokens.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        coords = torch.stack(
            torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ).flatten(1)  # [2, N]
        offsets = (coords[:, :, None] - coords[:, None, :]).abs()  # [2, N, N]
        self.register_buffer("attention_bias_idxs", offsets[0] * window_size + offsets[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: ``[B, N, C]`` tokens of ``B`` windows of ``N = window_size ** 2`` tokens (row-major).

        Returns:
            ``[B, N, C]``.
        """
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [B, heads, N, head_dim]
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # [heads, N, N]
        x = attend_sdpa(q, k, v, bias) if q.is_cuda else attend_matmul(q, k, v, bias)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Pre-norm MLP: ``[..., C] -> [..., C]`` (LayerNorm, Linear, GELU, Linear; dropout after both)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local conv, MLP: ``[B, H, W, C] -> [B, H, W, C]``.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: attention window side; the map is zero-padded bottom/right to a multiple of it
            before the attention's LayerNorm, like the reference (padded tokens act as keys).
        mlp_ratio: MLP hidden channels / ``dim``.
        drop: dropout in the MLP.
        drop_path: stochastic depth probability of both residual branches.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = -h % ws, -w % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(windows).view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return out[:, :h, :w] if (pad_b or pad_r) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._windowed_attention(x))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


@contextlib.contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged while a checkpointed block is recomputed.

    Recomputation in backward would otherwise apply the running-stat update of a training step twice.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    use_ckpt = grad_checkpointing and torch.is_grad_enabled()
    for blk in blocks:
        if use_ckpt:
            x = checkpoint(
                blk,
                x,
                use_reentrant=False,
                context_fn=lambda blk=blk: (contextlib.nullcontext(), _frozen_batchnorm_stats(blk)),
            )
        else:
            x = blk(x)
    return x


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks then optional merging; ``[B, C, H, W] -> [B, C', H', W']``."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run_blocks(self.blocks, x, self.grad_checkpointing)
        return x if self.downsample is None else self.downsample(x)


class TransformerStage(nn.Module):
    """Stages 1..: TinyViT blocks then optional merging; ``[B, C, H, W] -> [B, C', H', W']``.

    Blocks run channels-last (``[B, H, W, C]``); the stage takes and returns channels-first maps.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run_blocks(self.blocks, x.permute(0, 2, 3, 1), self.grad_checkpointing).permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM neck (MobileSAM "vit_t", LiteMedSAM).

    Args:
        img_size: nominal square input size (1024 MobileSAM, 256 LiteMedSAM); used for
            ``embedding_size``, any size is accepted by ``forward``.
        in_chans: input image channels.
        embed_dims: channels per stage (at least 2 stages).
        depths: blocks per stage.
        num_heads: attention heads per stage (entry 0 unused: stage 0 is convolutional).
        window_sizes: attention window side per stage (entry 0 unused).
        mlp_ratio: MLP hidden / channels in TinyViT blocks.
        drop_rate: dropout in the MLPs.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        use_checkpoint: start with gradient checkpointing on (see ``set_grad_checkpointing``).
        mbconv_expand_ratio: MBConv hidden / channels in stage 0.
        local_conv_size: kernel of the depthwise conv in TinyViT blocks.
        layer_lr_decay: default decay of ``layer_lr_scales``.
        stem_stride: 4 (MobileSAM: 3x3 stride-2 stem convs) or 1 (LiteMedSAM: 1x1 stem convs).
        num_classes: size of the unused ImageNet head kept in MobileSAM's checkpoint (1000 there);
            0 (LiteMedSAM) builds none.
        out_chans: neck output channels.

    Attributes:
        stride: input pixels per output pixel.
        embedding_size: ``img_size // stride`` (64 for both official models).
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        layer_lr_decay: float = 1.0,
        stem_stride: Literal[1, 4] = 4,
        num_classes: int = 0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        for name, seq in (("depths", depths), ("num_heads", num_heads), ("window_sizes", window_sizes)):
            if len(seq) != n:
                raise ValueError(f"TinyViT: {name} has {len(seq)} entries, expected {n} (one per embed_dims entry)")
        if n < 2:
            raise ValueError(f"TinyViT: embed_dims needs at least 2 stages, got {list(embed_dims)}")
        for i in range(1, n):
            if embed_dims[i] % num_heads[i]:
                raise ValueError(
                    f"TinyViT: embed_dims[{i}]={embed_dims[i]} is not divisible by num_heads[{i}]={num_heads[i]}"
                )
        if stem_stride not in (1, 4):
            raise ValueError(f"TinyViT: stem_stride must be 1 (LiteMedSAM) or 4 (MobileSAM), got {stem_stride}")
        if local_conv_size % 2 != 1:
            raise ValueError(f"TinyViT: local_conv_size must be odd, got {local_conv_size}")

        self.img_size = int(img_size)
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.out_chans = out_chans
        self.layer_lr_decay = layer_lr_decay
        self.stride = stem_stride * 2 ** (n - 2)
        self.embedding_size = self.img_size // self.stride

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], stem_stride)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            rates = dpr[sum(depths[:i]) : sum(depths[: i + 1])]
            downsample = None
            if i < n - 1:
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride=1 if i == n - 2 else 2)
            if i == 0:
                blocks = [MBConv(embed_dims[0], mbconv_expand_ratio, r) for r in rates]
                self.layers.append(ConvStage(blocks, downsample))
            else:
                blocks = [
                    TinyViTBlock(embed_dims[i], num_heads[i], window_sizes[i], mlp_ratio, drop_rate, r, local_conv_size)
                    for r in rates
                ]
                self.layers.append(TransformerStage(blocks, downsample))

        if num_classes > 0:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)
        self.apply(self._init_weights)
        if num_classes > 0:
            self.norm_head.requires_grad_(False)
            self.head.requires_grad_(False)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.set_grad_checkpointing(use_checkpoint)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them.

        Outputs and gradients are unchanged; BatchNorm running statistics are updated once per step.
        """
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @property
    def grad_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on."""
        return bool(self.layers[0].grad_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: ``[B, in_chans, H, W]`` normalised images (``H = W = img_size`` for the official models).

        Returns:
            ``[B, out_chans, H / stride, W / stride]`` image embeddings (``[B, 256, 64, 64]`` for both
            official models at their ``img_size``).
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"TinyViT.forward: expected images [B, {self.in_chans}, H, W], got {list(x.shape)}")
        # channels-last all the way: the NHWC token maps of the attention stages are then free views of
        # the NCHW conv inputs/outputs, and CPU convolutions run faster in this layout
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            x = layer(x)
        return self.neck(x).contiguous()

    def layer_lr_scales(self, decay: float | None = None) -> dict[str, float]:
        """Learning-rate multiplier per parameter name for layer-wise lr decay (MobileSAM's rule).

        Block ``i`` of ``D`` (counted over all stages, MBConv blocks included) gets ``decay ** (D - 1 - i)``;
        the stem gets block 0's, a stage's merging its last block's, the neck and the head 1.

        Args:
            decay: per-block decay; ``layer_lr_decay`` from the constructor when None.

        Returns:
            ``{parameter name: scale}`` for every parameter.
        """
        decay = self.layer_lr_decay if decay is None else decay
        depth = sum(self.depths)
        scales = {name: 1.0 for name, _ in self.named_parameters()}
        for name, _ in self.patch_embed.named_parameters():
            scales[f"patch_embed.{name}"] = decay ** (depth - 1)
        i = 0
        for li, layer in enumerate(self.layers):
            for bi, block in enumerate(layer.blocks):
                for name, _ in block.named_parameters():
                    scales[f"layers.{li}.blocks.{bi}.{name}"] = decay ** (depth - 1 - i)
                i += 1
            if layer.downsample is not None:
                for name, _ in layer.downsample.named_parameters():
                    scales[f"layers.{li}.downsample.{name}"] = decay ** (depth - i)
        return scales
