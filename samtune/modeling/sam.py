"""The Segment Anything Model: image encoder + prompt encoder + mask decoder.

Unlike the official ``Sam``, every method keeps gradients (training runs through the same code as inference)
and :meth:`Sam.decode` takes prompts for several images at once.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from samtune.modeling.mask_decoder import MaskDecoder
from samtune.modeling.preprocessing import PIXEL_MEAN, PIXEL_STD, Interpolation, Normalization, normalize_image
from samtune.modeling.prompt_encoder import PromptEncoder

__all__ = ["Sam"]


class Sam(nn.Module):
    """SAM.

    Args:
        image_encoder: ``[B, 3, S, S] -> [B, C, h, w]`` with an ``img_size`` attribute (S).
        prompt_encoder: the prompt encoder.
        mask_decoder: the mask decoder.
        normalization: ``"sam"`` (mean/std on 0-255) or ``"minmax"`` (LiteMedSAM).
        image_format: channel order the model was trained on, for :class:`samtune.Predictor`.
        resize_interpolation: resize filter of the model's input convention (``"bilinear"``: PIL, official SAM;
            ``"area"``: OpenCV INTER_AREA, LiteMedSAM).
    """

    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        normalization: Normalization = "sam",
        image_format: str = "RGB",
        resize_interpolation: Interpolation = "bilinear",
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.normalization = normalization
        self.image_format = image_format
        self.resize_interpolation = resize_interpolation
        # Not persistent: official checkpoints do not store them.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        """Side S of the square model input (1024 for SAM, 256 for LiteMedSAM)."""
        return int(self.image_encoder.img_size)

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution logits and of mask prompts (4x the embedding grid, 256)."""
        return int(self.prompt_encoder.mask_input_size[0])

    # ------------------------------------------------------------------ pre/postprocessing
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and pad resized images, as the official ``Sam.preprocess`` (or LiteMedSAM's min-max).

        Args:
            x: ``[B, 3, h, w]`` (or ``[3, h, w]``) pixels with longest side ``image_size``, 0-255 scale.

        Returns:
            ``[B, 3, S, S]`` float32.
        """
        x = normalize_image(x, self.normalization)  # the same function the data pipelines use
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Upsample low-res logits to the input frame, crop the padding, resize to the original size.

        Args:
            masks: ``[B, C, 256, 256]`` logits.
            input_size: (h, w) of the resized image before padding.
            original_size: (H, W) of the original image.

        Returns:
            ``[B, C, H, W]`` logits.
        """
        size = self.image_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ model
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` preprocessed images -> embeddings ``[B, 256, S/16, S/16]``."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor | None = None,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_all_tokens: bool = False,
        pad_points: bool | None = None,
        extra_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for ``M`` prompts over ``B`` images in one call.

        Prompts are either flat (``M`` prompts with ``image_index``) or per image (leading dims ``[B, N]``,
        flattened here and unflattened in the outputs).

        Args:
            image_embeddings: ``[B, C, h, w]``.
            image_index: ``[M]`` long, which image each prompt belongs to (flat form). None: all prompts on
                image 0 when ``B == 1``, or one prompt per image when ``M == B``.
            point_coords: ``[M, P, 2]`` (or ``[B, N, P, 2]``) (x, y) in model-input pixels.
            point_labels: ``[M, P]``: 1 positive, 0 negative, 2 / 3 box corners, -1 padding.
            boxes: ``[M, 4]`` (or ``[B, N, 4]``) xyxy in model-input pixels.
            mask_inputs: ``[M, 1, 256, 256]`` (or ``[B, N, 1, 256, 256]``) mask logits.
            multimask_output: 3 outputs (tokens 1..3) or 1 (token 0).
            return_all_tokens: all 4 outputs, token 0 first.
            pad_points: append a not-a-point token to the points; default: when ``boxes`` is None.
            extra_tokens: ``[M, T, 256]`` extra sparse tokens (e.g. projected text embeddings).

        Returns:
            Low-res logits ``[M, C_out, 256, 256]`` and IoU predictions ``[M, C_out]`` (with ``[B, N]``
            leading dims for per-image prompts).
        """
        lead: tuple[int, int] | None = None
        if point_coords is not None and point_coords.dim() == 4:
            lead = tuple(point_coords.shape[:2])
        elif boxes is not None and boxes.dim() == 3:
            lead = tuple(boxes.shape[:2])
        elif mask_inputs is not None and mask_inputs.dim() == 5:
            lead = tuple(mask_inputs.shape[:2])
        if lead is not None:
            if image_index is not None:
                raise ValueError("image_index is implied by [B, N] prompts; pass flat [M] prompts to give it")
            b, n = lead
            if b != image_embeddings.shape[0]:
                raise ValueError(f"prompts for {b} images but {image_embeddings.shape[0]} image embeddings")
            image_index = torch.arange(b, device=image_embeddings.device).repeat_interleave(n)
            point_coords = point_coords.flatten(0, 1) if point_coords is not None else None
            point_labels = point_labels.flatten(0, 1) if point_labels is not None else None
            boxes = boxes.flatten(0, 1) if boxes is not None else None
            mask_inputs = mask_inputs.flatten(0, 1) if mask_inputs is not None else None
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs, pad_points=pad_points, extra_tokens=extra_tokens)
        if image_index is None and image_embeddings.shape[0] not in (1, sparse.shape[0]):
            raise ValueError(
                f"{sparse.shape[0]} prompts for {image_embeddings.shape[0]} images: pass image_index or [B, N] prompts"
            )
        low_res, iou = self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output=multimask_output,
            image_index=image_index,
            return_all_tokens=return_all_tokens,
        )
        if lead is not None:
            low_res = low_res.unflatten(0, lead)
            iou = iou.unflatten(0, lead)
        return low_res, iou

    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """The official ``Sam.forward`` interface, with gradients.

        Args:
            batched_input: one dict per image with ``image`` ``[3, h, w]`` (resized, 0-255), ``original_size``
                and optionally ``point_coords`` ``[N, P, 2]``, ``point_labels`` ``[N, P]``, ``boxes``
                ``[N, 4]``, ``mask_inputs`` ``[N, 1, 256, 256]``.
            multimask_output: as in :meth:`decode`.

        Returns:
            One dict per image: ``masks`` ``[N, C, H, W]`` bool, ``iou_predictions`` ``[N, C]``,
            ``low_res_logits`` ``[N, C, 256, 256]``.
        """
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        embeddings = self.encode_image(images)
        outputs = []
        for i, record in enumerate(batched_input):
            low_res, iou = self.decode(
                embeddings[i : i + 1],
                point_coords=record.get("point_coords"),
                point_labels=record.get("point_labels"),
                boxes=record.get("boxes"),
                mask_inputs=record.get("mask_inputs"),
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res}
            )
        return outputs
