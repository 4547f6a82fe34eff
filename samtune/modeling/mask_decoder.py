"""SAM's mask decoder: a two-way transformer between prompt tokens and image tokens, 4 mask tokens, IoU head.

Differences from the official implementation, none of which changes the numbers beyond float rounding:

* Batched over images *and* prompts: ``image_index`` ``[M]`` says which of the ``B`` image embeddings each of
  the ``M`` prompts belongs to, so one call decodes every mask of every image in a training batch. The image
  positional encoding is broadcast, never copied per prompt.
* Attention runs through ``scaled_dot_product_attention``.
* The output upscaling (two stride-2 2x2 transposed convolutions with LayerNorm2d and GELU) is computed as two
  matrix products on the token-major transformer output followed by one pixel-shuffle of the final logits.
  A 2x2/stride-2 transposed convolution maps every input pixel to its own 2x2 output block, which is exactly a
  linear layer to ``4 * C_out`` features; this avoids NCHW transposes and the slow NCHW LayerNorm.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from samtune.modeling.common import MLP, LayerNorm2d, MLPBlock

__all__ = ["MaskDecoder", "TwoWayTransformer", "TwoWayAttentionBlock", "Attention"]


class Attention(nn.Module):
    """Multi-head attention whose q/k/v are projected to ``embedding_dim // downsample_rate``.

    Parameters ``q_proj, k_proj, v_proj, out_proj`` as in the official checkpoints.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the internal dim ({self.internal_dim})")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        self.dropout = dropout

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: torch.Tensor | None = None,
        per_image: Literal["q", "kv"] = "kv",
    ) -> torch.Tensor:
        """Attend from ``q`` to ``k``/``v``.

        Args:
            q: ``[Mq, Nq, C]``.
            k: ``[Mk, Nk, C]``.
            v: ``[Mk, Nk, C]``.
            index: ``[M]`` rows of the per-image side (one row per image) used by each of the ``M`` prompts, so
                that per-image projections are computed once and shared. None: batches match (or one of them is 1
                and broadcasts).
            per_image: which side ``index`` applies to.

        Returns:
            ``[M, Nq, C]``.
        """
        q = self.q_proj(q).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k = self.k_proj(k).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v_proj(v).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        if index is not None:
            if per_image == "kv":
                k, v = k.index_select(0, index), v.index_select(0, index)
            else:
                q = q.index_select(0, index)
        q, k, v = _match_batch(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def _match_batch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand a batch of 1 (one image shared by all prompts) to the other side's batch (a view, no copy)."""
    if q.shape[0] == k.shape[0]:
        return q, k, v
    if k.shape[0] == 1:
        return q, k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    if q.shape[0] == 1:
        return q.expand(k.shape[0], -1, -1, -1), k, v
    raise ValueError(f"cannot match a batch of {q.shape[0]} queries with {k.shape[0]} keys without an index")


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        key_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block.

        Args:
            queries: ``[M, T, C]`` prompt tokens.
            keys: ``[M, HW, C]`` image tokens, or ``[B, HW, C]`` shared by the prompts of each image.
            query_pe: ``[M, T, C]``.
            key_pe: ``[1, HW, C]``.
            key_index: ``[M]`` image of each prompt when ``keys`` is per image (B < M, B > 1).

        Returns:
            Queries ``[M, T, C]`` and keys ``[M, HW, C]``.
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        keys_pe = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys_pe, keys, key_index))
        queries = self.norm3(queries + self.mlp(queries))
        attn = self.cross_attn_image_to_token(keys_pe, queries + query_pe, queries, key_index, per_image="q")
        # Per-image keys become per-prompt here.
        if key_index is not None:
            keys = keys.index_select(0, key_index)
        elif keys.shape[0] != attn.shape[0]:
            keys = keys.expand(attn.shape[0], -1, -1)
        return queries, self.norm4(keys + attn)


class TwoWayTransformer(nn.Module):
    """The decoder transformer (depth 2, width 256, 8 heads, MLP 2048, cross-attention at 128-d)."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, i == 0, dropout
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate, dropout)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        key_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the transformer.

        Args:
            image_embedding: ``[M, C, h, w]``, or ``[M, h*w, C]`` token-major; or per image (``[B, ...]``, with
                ``key_index`` ``[M]`` when ``1 < B < M``), in which case the first layer's image-side
                projections are computed once per image.
            image_pe: ``[1, C, h, w]`` or ``[1, h*w, C]`` (broadcast over prompts).
            point_embedding: ``[M, T, C]`` tokens.
            key_index: ``[M]`` image of each prompt for per-image ``image_embedding``.

        Returns:
            Tokens ``[M, T, C]`` and image tokens ``[M, h * w, C]``.
        """
        keys = image_embedding if image_embedding.dim() == 3 else image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe if image_pe.dim() == 3 else image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe, key_index)
            key_index = None  # keys are per prompt after the first layer
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` masks and their IoU from image and prompt embeddings.

    Token 0 is the single-mask output, tokens ``1..num_multimask_outputs`` the ambiguity-aware outputs.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_index: torch.Tensor | None = None,
        return_all_tokens: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for ``M`` prompts over ``B`` images.

        Args:
            image_embeddings: ``[B, C, h, w]``.
            image_pe: ``[1, C, h, w]``.
            sparse_prompt_embeddings: ``[M, T, C]``.
            dense_prompt_embeddings: ``[M, C, h, w]`` (may be an expanded view).
            multimask_output: return tokens 1..3 (``C_out = 3``) instead of token 0 (``C_out = 1``).
            image_index: ``[M]`` image of each prompt. None: every prompt uses image 0 when ``B == 1``
                (the official behaviour), else ``B`` must equal ``M``.
            return_all_tokens: return all 4 outputs, token 0 first (overrides ``multimask_output``).

        Returns:
            Low-resolution mask logits ``[M, C_out, 4h, 4w]`` and IoU predictions ``[M, C_out]``.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_index
        )
        if return_all_tokens:
            return masks, iou_pred
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 4 outputs: logits ``[M, 4, 4h, 4w]`` and IoU ``[M, 4]``. See :meth:`forward`."""
        m = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(m, -1, -1).to(sparse_prompt_embeddings.dtype), sparse_prompt_embeddings], 1)
        b, c, h, w = image_embeddings.shape
        if image_index is None and b not in (1, m):
            raise ValueError(
                f"{b} image embeddings for {m} prompts: pass image_index to say which image each prompt belongs to"
            )
        # Token-major image features [B, h*w, C], contiguous, so every projection below is one plain GEMM.
        image_tokens = image_embeddings.flatten(2).transpose(1, 2)
        dense = dense_prompt_embeddings
        key_index = image_index
        if dense.dim() == 4 and dense.stride(0) == 0 and dense.stride(2) == 0 and dense.stride(3) == 0:
            # The "no mask" embedding: one vector for every prompt and position. Keep one copy of the image
            # tokens per image; the transformer's first layer then projects them once per image, not per prompt.
            src = (image_tokens + dense[:1, :, 0, 0].unsqueeze(1)).contiguous()
        else:
            per_prompt = image_tokens.index_select(0, image_index) if image_index is not None else image_tokens
            src = (per_prompt + dense.flatten(2).transpose(1, 2)).contiguous()
            if src.shape[0] != m:
                src = src.expand(m, -1, -1)
            key_index = None
        pos = image_pe.flatten(2).transpose(1, 2)
        hs, keys = self.transformer(src, pos, tokens, key_index)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # [M, T, C/8]
        features = self._upscale(keys, h, w)  # [M, h*w*16, C/8], sub-pixel order (y, x, i1, j1, i2, j2)
        logits = features @ hyper_in.transpose(1, 2)  # [M, h*w*16, T]
        logits = logits.view(m, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        masks = logits.reshape(m, -1, 4 * h, 4 * w)
        return masks, self.iou_prediction_head(iou_token_out)

    def _upscale(self, keys: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Apply ``output_upscaling`` to token-major features ``[M, h*w, C]`` -> ``[M, h*w*16, C/8]``."""
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        c1, c2 = conv1.out_channels, conv2.out_channels
        # ConvTranspose2d weight [C_in, C_out, 2, 2] -> linear weight [(i, j, C_out), C_in].
        w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, -1)
        x = F.linear(keys, w1, conv1.bias.repeat(4)).unflatten(-1, (4, c1))  # [M, hw, 4, c1]
        x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
        w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, -1)
        x = act2(F.linear(x, w2, conv2.bias.repeat(4)))  # [M, hw, 4, 4 * c2]
        return x.reshape(keys.shape[0], h * w * 16, c2)
