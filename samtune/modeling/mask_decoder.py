"""SAM's mask decoder: a two-way transformer between prompt tokens and image tokens, 4 mask tokens, IoU head.

Differences from the official implementation, none of which changes the numbers beyond float rounding:

* Batched over images *and* prompts: ``image_index`` ``[M]`` says which of the ``B`` image embeddings each of
  the ``M`` prompts belongs to, so one call decodes every mask of every image in a training batch. The image
  positional encoding is broadcast, never copied per prompt.
* Attention runs through ``scaled_dot_product_attention``; between a few prompt tokens and per-prompt image
  tokens it is factorised so that the image tokens are never projected (:meth:`Attention.forward`): for SAM's
  decoder with one click this cuts the transformer's multiply-adds per prompt from ~0.94 G to ~0.41 G.
* The output upscaling (two stride-2 2x2 transposed convolutions with LayerNorm2d and GELU) is computed as two
  matrix products on the token-major transformer output followed by one pixel-shuffle of the final logits.
  A 2x2/stride-2 transposed convolution maps every input pixel to its own 2x2 output block, which is exactly a
  linear layer to ``4 * C_out`` features; this avoids NCHW transposes and the slow NCHW LayerNorm.
* On CPU, many prompts are decoded a few at a time inside the one call (:meth:`MaskDecoder.predict_masks`), so
  that per-prompt image-sized tensors stay below glibc's mmap threshold and are reused instead of being fresh,
  zero-filled pages on every call (16 ViT-B masks x 11 training rounds: 2/3 of the decoder's time was page faults).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from samtune.modeling.common import MLP, LayerNorm2d, MLPBlock
from samtune.modeling.precision import in_autocast

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
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend from ``q`` to ``k``/``v`` (plus ``residual``).

        Args:
            q: ``[Mq, Nq, C]``.
            k: ``[Mk, Nk, C]``.
            v: ``[Mk, Nk, C]``.
            index: ``[M]`` rows of the per-image side (one row per image) used by each of the ``M`` prompts, so
                that per-image projections are computed once and shared. None: batches match (or one of them is 1
                and broadcasts).
            per_image: which side ``index`` applies to.
            residual: added to the output (broadcast to ``[M, Nq, C]``); fused into the last product where the
                attention is factorised.

        Returns:
            ``[M, Nq, C]``.

        Between a few prompt tokens and thousands of image tokens, when the image side is per prompt, the
        projections of the image side are the bulk of the work. With ``heads * N_tokens`` below the internal
        width, no dropout and plain ``nn.Linear`` projections (LoRA-wrapped ones take the plain path, as do
        traces and exports, where the token count is dynamic), they are folded into the token side instead (same
        result to float rounding):

        * few keys (image -> tokens): each output row is a mix of the ``heads * Nk`` rows ``v_h W_out,h``, and
          the scores are ``q_in (k_h W_q,h)^T`` plus a per-key constant: ``[Nq, heads * Nk]`` products with no
          query projection and no output projection of ``Nq`` rows;
        * few queries (tokens -> image): the scores are ``(q_h W_k,h) k_in^T`` plus a per-query constant and the
          values ``(A_h v_in) W_v,h^T + b_v`` (attention rows sum to 1): no ``Nk``-row projection of keys or
          values.
        """
        dropout = self.dropout if self.training else 0.0
        shared_q = (index is not None and per_image == "q") or (index is None and q.shape[0] == 1 < k.shape[0])
        shared_kv = (index is not None and per_image == "kv") or (index is None and k.shape[0] == 1 < q.shape[0])
        if dropout == 0.0 and not shared_kv and self._plain_projections() and not _exporting():
            nq, nk = q.shape[1], k.shape[1]
            if self.num_heads * nk < self.internal_dim < nq:
                return self._few_keys(q, k, v, index if shared_q else None, shared_q, residual)
            if self.num_heads * nq < self.internal_dim < nk and not shared_q:
                return _add(self._few_queries(q, k, v), residual)
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        if index is not None:
            if per_image == "kv":
                k, v = k.index_select(0, index), v.index_select(0, index)
            else:
                q = q.index_select(0, index)
        q, k, v = _match_batch(q, k, v)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return _add(self.out_proj(out.transpose(1, 2).flatten(2)), residual)

    def _plain_projections(self) -> bool:
        """True when the four projections are plain linears (not wrapped, e.g. by LoRA): the factorised paths
        read their weights directly."""
        return all(type(p) is nn.Linear for p in (self.q_proj, self.k_proj, self.v_proj, self.out_proj))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, N, internal_dim]`` -> ``[M, heads, N, head_dim]`` (a view)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _head_weight(self, linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
        """A projection's weight ``[internal_dim, C]`` split per head: ``[heads, head_dim, C]``."""
        return linear.weight.unflatten(0, (self.num_heads, -1)).to(dtype)

    def _few_keys(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: torch.Tensor | None,
        shared_q: bool,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        """Many queries, ``heads * Nk < internal_dim`` keys (see :meth:`forward`)."""
        d = self.internal_dim // self.num_heads
        kp = self._heads(self.k_proj(k)) * d**-0.5  # [M, heads, Nk, d]
        vp = self._heads(self.v_proj(v))
        m, heads, nk, _ = kp.shape
        if shared_q:
            # The queries are one image's tokens shared by its prompts: project them once, then score.
            qp = self._heads(self.q_proj(q))
            if index is not None:
                qp = qp.index_select(0, index)
            scores = torch.matmul(kp, qp.transpose(-1, -2))  # [M, heads, Nk, Nq]
        else:
            # Scores key-major, [M, heads * Nk, Nq]: the softmax below then runs over a short non-innermost dim
            # (vectorised along the queries) and the mixing product reads the weights as a transposed view.
            k_in = torch.matmul(kp, self._head_weight(self.q_proj, kp.dtype)).flatten(1, 2)  # [M, heads*Nk, C]
            k_bias = (kp * self.q_proj.bias.to(kp.dtype).view(heads, 1, d)).sum(-1).flatten(1)  # [M, heads*Nk]
            scores = torch.baddbmm(k_bias.unsqueeze(-1), k_in, q.transpose(1, 2).to(k_in.dtype))
            scores = scores.view(m, heads, nk, -1)
        weights = torch.softmax(scores, dim=-2).flatten(1, 2).transpose(1, 2)  # [M, Nq, heads * Nk]
        w_out = self.out_proj.weight.t().unflatten(0, (heads, d)).to(vp.dtype)  # [heads, d, C]
        # Each head's weights sum to 1, so the output bias enters as bias / heads on every mixed row; the
        # residual (or nothing) is the product's input: one [M, Nq, C] result, no separate bias or residual pass.
        mixed = torch.matmul(vp, w_out) + self.out_proj.bias.to(vp.dtype) / heads  # [M, heads, Nk, C]
        mixed = mixed.flatten(1, 2)  # [M, heads * Nk, C], the same (head, key) order as the weights
        base = residual.to(mixed.dtype) if residual is not None else mixed.new_zeros(1, 1, 1)
        return torch.baddbmm(base.expand(m, -1, -1), weights.to(mixed.dtype), mixed)

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``heads * Nq < internal_dim`` queries, many per-prompt keys (see :meth:`forward`)."""
        d = self.internal_dim // self.num_heads
        qp = self._heads(self.q_proj(q)) * d**-0.5  # [M, heads, Nq, d]
        m, heads, nq, _ = qp.shape
        q_in = torch.matmul(qp, self._head_weight(self.k_proj, qp.dtype)).flatten(1, 2)  # [M, heads * Nq, C]
        # The key bias adds one constant per query: the softmax cancels it, it is kept so that the bias gets its
        # (zero) gradient as in the plain path (DDP expects every parameter to take part).
        q_bias = (qp * self.k_proj.bias.to(qp.dtype).view(heads, 1, d)).sum(-1).flatten(1)  # [M, heads * Nq]
        scores = torch.baddbmm(q_bias.unsqueeze(-1), q_in, k.transpose(1, 2).to(q_in.dtype))  # [M, heads*Nq, Nk]
        weights = torch.softmax(scores, dim=-1)
        context = torch.matmul(weights, v.to(weights.dtype)).unflatten(1, (heads, nq))  # [M, heads, Nq, C]
        w_v = self._head_weight(self.v_proj, context.dtype)  # [heads, d, C]
        out = torch.matmul(context, w_v.transpose(-1, -2)) + self.v_proj.bias.to(context.dtype).view(heads, 1, d)
        return self.out_proj(out.transpose(1, 2).flatten(2))


# Largest per-chunk image-sized tensor of the CPU decoder (below glibc's 32 MB mmap threshold).
_CPU_CHUNK_BYTES = 16 << 20


def _exporting() -> bool:
    """Inside a trace or an ONNX export, where token counts are dynamic: the plain path is taken there, since
    the choice of path depends on the number of tokens."""
    torch_export = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.3
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or bool(torch_export and torch_export())


def _add(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else residual + x


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
        # Per-image keys become per-prompt here (the residual broadcasts over the prompts of one image).
        if key_index is not None:
            keys = keys.index_select(0, key_index)
        keys = self.cross_attn_image_to_token(
            keys_pe, queries + query_pe, queries, key_index, per_image="q", residual=keys
        )
        return queries, self.norm4(keys)


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
        """All 4 outputs: logits ``[M, 4, 4h, 4w]`` and IoU ``[M, 4]``. See :meth:`forward`.

        On CPU the prompts go through in chunks whose per-prompt image tensors (``[chunk, h*w, C]`` in fp32)
        stay under ``_CPU_CHUNK_BYTES``. A larger tensor is a fresh ``mmap`` from glibc, zero-filled by the
        kernel page by page on first touch and unmapped when freed, which costs about as much as the arithmetic;
        smaller ones come from the heap and reuse memory. The result is the same (prompts are independent);
        traces and exports take one chunk (their prompt count is dynamic).

        Outside autocast the inputs are cast to the decoder's weight dtype: a model cast whole to bf16 (Lightning's
        ``bf16-true``) receives the prompt encoder's positional encodings in fp32 (computed so for accuracy).
        """
        dtype = self.iou_token.weight.dtype
        if not in_autocast(image_embeddings.device.type):
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings = (
                t.to(dtype) for t in (image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
            )
        m = sparse_prompt_embeddings.shape[0]
        b, c, h, w = image_embeddings.shape
        if m == 0 and not _exporting():  # no prompts (e.g. an image without detections): empty outputs
            logits = image_embeddings.new_zeros(0, self.num_mask_tokens, 4 * h, 4 * w)
            return logits, image_embeddings.new_zeros(0, self.num_mask_tokens)
        if image_index is None and b not in (1, m):
            raise ValueError(
                f"{b} image embeddings for {m} prompts: pass image_index to say which image each prompt belongs to"
            )
        chunk = max(1, _CPU_CHUNK_BYTES // (h * w * c * 4))
        if image_embeddings.device.type != "cpu" or m <= chunk or _exporting() or torch.compiler.is_compiling():
            return self._predict_masks(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_index
            )
        if image_index is None and b == m:  # one prompt per image: a chunk's prompts need their images named
            image_index = torch.arange(m, device=image_embeddings.device)
        dense = dense_prompt_embeddings
        outs = [
            self._predict_masks(
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings[i : i + chunk],
                dense[i : i + chunk] if dense.shape[0] == m else dense,
                None if image_index is None else image_index[i : i + chunk],
            )
            for i in range(0, m, chunk)
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def _predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        m = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(m, -1, -1).to(sparse_prompt_embeddings.dtype), sparse_prompt_embeddings], 1)
        h, w = image_embeddings.shape[-2:]
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
        return self.mask_logits(hs, keys, h, w), self.iou_prediction_head(hs[:, 0])

    def mask_logits(
        self, hs: torch.Tensor, keys: torch.Tensor, h: int, w: int, outputs: range | None = None
    ) -> torch.Tensor:
        """Logits ``[M, len(outputs), 4h, 4w]`` from the transformer's output tokens ``hs`` ``[M, T, C]`` (IoU
        token first) and image tokens ``keys`` ``[M, h*w, C]``; ``outputs``: the mask tokens wanted (all)."""
        outputs = range(self.num_mask_tokens) if outputs is None else outputs
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in outputs], dim=1
        )  # [M, T, C/8]
        features = self._upscale(keys, h, w)  # [M, h*w*16, C/8], sub-pixel order (y, x, i1, j1, i2, j2)
        logits = features @ hyper_in.transpose(1, 2)  # [M, h*w*16, T]
        m = logits.shape[0]
        logits = logits.view(m, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return logits.reshape(m, -1, 4 * h, 4 * w)

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
