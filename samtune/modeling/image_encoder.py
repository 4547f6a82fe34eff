"""SAM's ViT image encoder on top of timm's ``VisionTransformerSAM``.

timm brings the outer model: patch embedding, absolute position embedding (resampled when the input size
changes), drop-path rates, gradient checkpointing (``set_grad_checkpointing``), the layer grouping used for
layer-wise lr decay (``group_matcher``) and the neck. samtune supplies the transformer block, whose parameter
names are the official ones (``blocks.{i}.attn.qkv``, ``attn.rel_pos_h``, ``mlp.lin1``...), so official
checkpoints load without any key mapping, and whose attention is faster than the official one:

The official attention materialises ``q @ k^T`` (``[B * heads, 4096, 4096]`` in the global blocks), adds the
decomposed relative-position terms as a broadcast 5-d sum, and runs softmax and the value product as separate
kernels. Here the relative-position bias is built directly as one ``[B, heads, N, N]`` tensor and handed to
``scaled_dot_product_attention`` as an additive mask, so the score matrix itself is never written to memory,
softmax and value product are fused, and the same code takes the fused (memory-efficient / flash-style) kernels
on GPU and CPU. The bias is built in query chunks so that its peak size stays bounded. In training on CPU the
bias needs a gradient, which PyTorch's CPU kernels only give through their slow fp32 reference path; in bf16 the
attention is computed here instead, a few query rows at a time (see ``RelPosAttention._attention_for_backward``).
"""
from __future__ import annotations

import threading
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn
from torch.nn import functional as F

from samtune.modeling.common import MLPBlock

__all__ = ["ImageEncoderViT", "RelPosAttention", "EncoderBlock", "get_rel_pos"]


class _BiasWorkspace(threading.local):
    """Per-thread scratch memory for the relative-position bias of gradient-free CPU forwards.

    The bias of a global block is ~100 MB per query chunk (ViT-B, bf16). A fresh tensor of that size is a new
    ``mmap`` on glibc (above its 32 MB threshold), and the kernel then zero-fills every page on first touch, which
    makes building the bias 3-4x slower than writing into memory that is already mapped. Without autograd
    nothing keeps the bias after ``scaled_dot_product_attention`` returns, so all blocks of a thread can reuse
    one buffer. Never used when gradients flow (autograd saves the mask) or on CUDA (its caching allocator
    already reuses memory).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype, bool], torch.Tensor] = {}

    def get(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # inference-mode tensors cannot be written outside inference mode (and vice versa): one buffer each
        key = (device, dtype, torch.is_inference_mode_enabled())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, device=device, dtype=dtype)
            self.buffers[key] = buf
        return buf[:numel]


_BIAS_WORKSPACE = _BiasWorkspace()
# Largest score-sized intermediate of the CPU training attention (below glibc's 32 MB mmap threshold).
_TRAIN_CHUNK_BYTES = 16 << 20
# dtypes that take it (fp32 keeps PyTorch's kernel: see RelPosAttention._attention_for_backward)
_TRAIN_PATH_DTYPES = (torch.bfloat16, torch.float16)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings gathered for every (query, key) pair along one axis.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: table ``[L, head_dim]``; linearly resized when ``L != 2 * max(q_size, k_size) - 1``
            (a checkpoint trained at another resolution).

    Returns:
        ``[q_size, k_size, head_dim]``.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(rel_pos.t()[None], size=max_rel_dist, mode="linear")[0].t()
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    index = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[index.long()]


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a ``[B, H, W, C]`` grid with SAM's decomposed relative positions.

    Args:
        dim: channel width C.
        num_heads: number of heads.
        qkv_bias: bias in the qkv projection.
        use_rel_pos: add the decomposed relative-position bias.
        input_size: (H, W) of the grid this block sees (window size for windowed blocks).
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection.
        bias_chunk: number of query rows whose bias is built at once (bounds the bias memory).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        bias_chunk: int = 1024,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.use_rel_pos = use_rel_pos
        self.bias_chunk = bias_chunk
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))

    def _rel_pos_terms(self, q: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decomposed terms from the unscaled queries ``q`` ``[B, heads, h*w, d]``.

        Returns:
            ``rel_h`` ``[B, heads, h, w, h]`` (query row/col x key row) and ``rel_w`` ``[B, heads, h, w, w]``.
        """
        h, w = hw
        rh = get_rel_pos(h, h, self.rel_pos_h).to(q.dtype)  # [h, h, d]
        rw = get_rel_pos(w, w, self.rel_pos_w).to(q.dtype)  # [w, w, d]
        r_q = q.unflatten(2, (h, w))  # [B, nH, h, w, d]
        rel_h = torch.einsum("bnijd,ikd->bnijk", r_q, rh)
        rel_w = torch.einsum("bnijd,jkd->bnijk", r_q, rw)
        return rel_h, rel_w

    @staticmethod
    def _bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
        """``[B, nH, r, w, h] + [B, nH, r, w, w]`` -> bias ``[B, nH, r*w, h*w]`` without an extra copy.

        ``einsum`` returns permuted layouts; a broadcast add of permuted inputs inherits their layout and the
        flatten then copies the whole (large) bias once more. Making the two small terms contiguous first makes
        the add write the bias directly in its final layout. Gradient-free CPU forwards write it into the
        thread's reusable workspace (see :class:`_BiasWorkspace`).
        """
        b, n, r, w, kh = rel_h.shape
        kw = rel_w.shape[-1]
        rel_h, rel_w = rel_h.contiguous().unsqueeze(-1), rel_w.contiguous().unsqueeze(-2)
        reuse = (
            rel_h.device.type == "cpu"
            and not (torch.is_grad_enabled() and (rel_h.requires_grad or rel_w.requires_grad))
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
        )
        if reuse:
            out = _BIAS_WORKSPACE.get(b * n * r * w * kh * kw, rel_h.device, rel_h.dtype).view(b, n, r, w, kh, kw)
            bias = torch.add(rel_h, rel_w, out=out)
        else:
            bias = rel_h + rel_w
        return bias.reshape(b, n, r * w, kh * kw)

    def _attention_for_backward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
        dropout_p: float,
    ) -> torch.Tensor:
        """Attention with a bias that needs a gradient, on CPU in bf16 / fp16: ``[B, nH, N, d]``.

        The bias depends on the queries, so in training its gradient (the score gradient, ``N x N`` per head) is
        needed, and PyTorch's CPU ``scaled_dot_product_attention`` then takes its reference ("math") kernel,
        which copies bf16 inputs to fp32 and writes several fp32 score-sized tensors per call (about 1 GB per
        1024 queries of a ViT-B global block). Here scores, softmax and value product run in the inputs' dtype
        (bf16 under autocast, as the official module computes them under autocast), a few query rows at a time,
        so that no intermediate exceeds ``_TRAIN_CHUNK_BYTES``: glibc then serves them from its heap and reuses
        the memory, where larger blocks would each be a fresh ``mmap`` whose pages the kernel zero-fills on
        first touch. fp32 keeps the reference kernel, which copies nothing there: chunked in fp32, this path was
        faster (ViT-B encoder forward + backward 22.6 vs 28.4 s) but fragmented glibc's heap (peak RSS 6-11 GB
        instead of 3.6 GB, varying between runs).
        """
        b, n_heads, n, d = q.shape
        h, w = rel_h.shape[2], rel_h.shape[3]
        keys = k.shape[2]
        row_bytes = b * n_heads * w * keys * q.element_size()
        rows = max(1, min(h, _TRAIN_CHUNK_BYTES // row_bytes))
        kt = k.reshape(b * n_heads, keys, d).transpose(1, 2)
        v3 = v.reshape(b * n_heads, keys, d)
        outs = []
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            bias = self._bias(rel_h[:, :, r0:r1], rel_w[:, :, r0:r1]).reshape(b * n_heads, (r1 - r0) * w, keys)
            q3 = q[:, :, r0 * w : r1 * w].reshape(b * n_heads, (r1 - r0) * w, d)
            attn = torch.baddbmm(bias, q3, kt, alpha=self.scale).softmax(dim=-1)
            if dropout_p > 0:
                attn = F.dropout(attn, p=dropout_p)
            outs.append(torch.bmm(attn, v3))
        return torch.cat(outs, dim=1).view(b, n_heads, n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        b, h, w, c = x.shape
        n = h * w
        qkv = self.qkv(x.reshape(b, n, c)).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, nH, N, d]
        dropout_p = self.attn_drop if self.training else 0.0
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            rel_h, rel_w = self._rel_pos_terms(q, (h, w))
            rows = max(1, self.bias_chunk // w)
            if rel_h.requires_grad and q.device.type == "cpu" and q.dtype in _TRAIN_PATH_DTYPES:
                out = self._attention_for_backward(q, k, v, rel_h, rel_w, dropout_p)
            elif rows >= h:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(rel_h, rel_w), dropout_p=dropout_p)
            else:
                # Large grids (the global blocks): whole rows of queries at a time keep the bias cache-sized.
                outs = []
                for r0 in range(0, h, rows):
                    r1 = min(h, r0 + rows)
                    bias = self._bias(rel_h[:, :, r0:r1], rel_w[:, :, r0:r1])
                    outs.append(
                        F.scaled_dot_product_attention(q[:, :, r0 * w : r1 * w], k, v, attn_mask=bias, dropout_p=dropout_p)
                    )
                out = torch.cat(outs, dim=2)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj_drop(self.proj(out))


def _window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, H, W, C] -> [B * nW, window, window, C]`` with zero padding to a multiple of ``window``."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def _window_unpartition(x: torch.Tensor, window: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_window_partition`: ``[B * nW, window, window, C] -> [B, H, W, C]``."""
    hp, wp = padded
    h, w = hw
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.view(b, hp // window, wp // window, window, window, -1).transpose(2, 3).reshape(b, hp, wp, -1)
    return x[:, :h, :w] if (hp, wp) != (h, w) else x


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with windowed or global attention (official parameter names).

    Takes the keyword arguments timm's ``VisionTransformerSAM`` passes to its ``block_fn``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused.get("rope") is not None or unused.get("init_values") or unused.get("qk_norm"):
            raise ValueError("samtune's SAM block supports neither rope, layer scale nor qk-norm")
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = RelPosAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            x, padded = _window_partition(x, self.window_size)
            x = _window_unpartition(self.attn(x), self.window_size, padded, hw)
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ImageEncoderViT(VisionTransformerSAM):
    """SAM's ViT image encoder: ``[B, 3, S, S]`` normalised pixels -> ``[B, out_chans, S/16, S/16]``.

    The state dict has exactly the official ``image_encoder.*`` keys (without the prefix).

    Args:
        img_size: input side S.
        patch_size: patch side (16).
        embed_dim: transformer width (768 / 1024 / 1280 for B / L / H).
        depth: number of blocks.
        num_heads: attention heads.
        global_attn_indexes: blocks with global attention; the others use windows of ``window_size``.
        window_size: window side in tokens (14).
        out_chans: neck output channels (256).
        mlp_ratio: MLP hidden width / embed_dim.
        drop_path_rate: stochastic depth, linearly increasing over blocks (0.4 for ViT-H in the paper).
        attn_drop_rate: attention dropout.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        window_size: int = 14,
        out_chans: int = 256,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=3,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            attn_drop_rate=attn_drop_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            block_fn=EncoderBlock,
            use_abs_pos=True,
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
            neck_chans=out_chans,
        )
        self.img_size = img_size
        self.out_chans = out_chans
        self.global_attn_indexes = tuple(global_attn_indexes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - documented on the class
        return self.forward_features(x)
