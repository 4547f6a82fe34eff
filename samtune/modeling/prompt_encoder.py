"""SAM's prompt encoder: points, boxes and mask logits -> sparse tokens and a dense embedding.

Points and boxes share one code path: a box is two points labelled 2 (top-left) and 3 (bottom-right), the
convention of SAM's ONNX decoder. Labels are looked up in one table ``[not-a-point, negative, positive,
box top-left, box bottom-right]`` indexed by ``label + 1``, so embedding a batch never uses data-dependent
boolean indexing (no host synchronisation on GPU) and mixed prompt types batch together; a label outside -1..3
gets only its positional encoding, as in the official ONNX decoder.

Text prompts: the paper feeds CLIP text embeddings as sparse tokens. :meth:`PromptEncoder.forward` accepts
``extra_tokens`` ``[M, T, embed_dim]`` (e.g. projected CLIP features) that are appended to the sparse tokens;
samtune ships no text model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from samtune.modeling.common import LayerNorm2d
from samtune.modeling.precision import in_autocast

__all__ = ["PromptEncoder", "PositionEmbeddingRandom", "LABEL_PAD", "LABEL_NEG", "LABEL_POS", "LABEL_BOX_TL", "LABEL_BOX_BR"]

LABEL_PAD = -1
LABEL_NEG = 0
LABEL_POS = 1
LABEL_BOX_TL = 2
LABEL_BOX_BR = 3


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates.

    The Gaussian matrix ``[2, num_pos_feats]`` is a persistent buffer (it is stored in SAM checkpoints).
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``[..., 2]`` coordinates in [0, 1] -> ``[..., 2 * num_pos_feats]``, in at least fp32 also under autocast:
        the features are sines of 2 pi x (up to ~tens of radians), and in bf16 a point or box corner would move by
        several pixels at 1024."""
        matrix = self.positional_encoding_gaussian_matrix
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        with torch.autocast(device_type=coords.device.type, enabled=False):
            proj = (2 * coords.to(dtype) - 1) @ matrix.to(dtype)
            proj = 2 * math.pi * proj
            return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of pixel centres of an ``(h, w)`` grid: ``[2 * num_pos_feats, h, w]``."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        dtype = torch.promote_types(self.positional_encoding_gaussian_matrix.dtype, torch.float32)
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode un-normalised (x, y) pixel coordinates ``[..., 2]`` of an ``image_size`` (h, w) frame."""
        coords = coords.to(torch.promote_types(self.positional_encoding_gaussian_matrix.dtype, torch.float32))
        scale = coords.new_tensor([1.0 / image_size[1], 1.0 / image_size[0]])
        return self._encode(coords * scale)


class PromptEncoder(nn.Module):
    """Encodes prompts for the mask decoder.

    Args:
        embed_dim: token width (256).
        image_embedding_size: (h, w) of the image embedding (64, 64).
        input_image_size: (H, W) of the padded model input (1024, 1024).
        mask_in_chans: hidden channels of the mask-downscaling convs (16).
        activation: activation of the mask-downscaling convs.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # negative, positive, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: ``[1, embed_dim, h, w]``.

        A function of the Gaussian matrix only, so it is cached per matrix (device, storage and in-place version:
        loading weights or moving the module recomputes it) instead of being rebuilt for every prompt.
        """
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        key = (matrix.device, matrix.data_ptr(), matrix._version, tuple(self.image_embedding_size),
               torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_dense_pe_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.pe_layer(self.image_embedding_size).unsqueeze(0))
            self.__dict__["_dense_pe_cache"] = cached
        return cached[1]

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Embed labelled points.

        Args:
            coords: ``[M, P, 2]`` (x, y) in model-input pixels.
            labels: ``[M, P]`` in {-1 pad, 0 negative, 1 positive, 2 box top-left, 3 box bottom-right}; any
                other value adds no learned embedding (the official ONNX decoder's behaviour).

        Returns:
            ``[M, P, embed_dim]``.
        """
        pe = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)
        table = torch.cat([self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings], dim=0)
        if labels.dtype == torch.bool:  # True / False: positive / negative clicks
            labels = labels.long()
        # A label outside {-1, 0, 1, 2, 3} (or a fractional one: ONNX labels are float) gets no learned embedding,
        # only its positional encoding, as in the official ONNX decoder, which compares each label with -1..3.
        # The valid labels are looked up by index (the rows and their gradients are exactly those of an embedding
        # lookup), and the others' rows multiplied by 0: no data-dependent indexing, one code path for all.
        values = torch.arange(LABEL_PAD, LABEL_PAD + 1 + self.num_point_embeddings, device=labels.device)
        known = (labels[..., None] == values.to(labels.dtype)).any(-1)  # [M, P]
        rows = table[(labels.long() - LABEL_PAD).clamp(0, self.num_point_embeddings)]
        pe = torch.where((labels == LABEL_PAD)[..., None], torch.zeros_like(pe), pe)
        return pe + rows * known[..., None].to(rows.dtype)

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``[M, 1, 4h, 4w]`` mask logits -> ``[M, embed_dim, h, w]`` (outside autocast, in the weights' dtype)."""
        if not in_autocast(masks.device.type):
            masks = masks.to(self.mask_downscaling[0].weight.dtype)
        return self.mask_downscaling(masks)

    def no_mask_dense(self, batch: int) -> torch.Tensor:
        """The learned "no mask" dense embedding, broadcast to ``[batch, embed_dim, h, w]`` (a view)."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        pad_points: bool | None = None,
        extra_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts (same call and result as the official ``PromptEncoder.forward``).

        Args:
            points: ``([M, P, 2] coords, [M, P] labels)`` or None.
            boxes: ``[M, 4]`` xyxy or None.
            masks: ``[M, 1, 4h, 4w]`` logits or None.
            pad_points: append a not-a-point token to ``points``; default (None): when ``boxes`` is None,
                as the official encoder does.
            extra_tokens: ``[M, T, embed_dim]`` additional sparse tokens (text embeddings), or None.

        Returns:
            Sparse ``[M, T_total, embed_dim]`` and dense ``[M, embed_dim, h, w]`` embeddings.
        """
        batch = 1
        for value in (points[0] if points is not None else None, boxes, masks, extra_tokens):
            if value is not None:
                batch = value.shape[0]
                break
        device = self.no_mask_embed.weight.device
        parts: list[torch.Tensor] = []
        if points is not None:
            coords, labels = points
            if pad_points is None:
                pad_points = boxes is None
            if pad_points:
                coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
                labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), LABEL_PAD)], dim=1)
            parts.append(self.embed_points(coords, labels))
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([LABEL_BOX_TL, LABEL_BOX_BR], device=boxes.device).expand(corners.shape[0], 2)
            parts.append(self.embed_points(corners, corner_labels))
        if extra_tokens is not None:
            parts.append(extra_tokens)
        sparse = torch.cat(parts, dim=1) if parts else torch.empty((batch, 0, self.embed_dim), device=device)
        dense = self.embed_masks(masks) if masks is not None else self.no_mask_dense(batch)
        return sparse, dense
