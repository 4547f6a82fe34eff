"""Automatic mask generation: segment everything in an image from a grid of point prompts.

:class:`AutomaticMaskGenerator` takes the official ``SamAutomaticMaskGenerator``'s arguments, defaults and
output records, and follows its semantics step by step (so the two agree mask for mask on the same weights):

1. optional crop layers: the image, then ``(2**i)**2`` overlapping crops per layer ``i``, each embedded anew;
2. per crop a grid of single positive clicks, 3 masks each (multimask output);
3. keep masks with predicted IoU ``> pred_iou_thresh`` and stability score ``>= stability_score_thresh``, the
   stability computed on the logits upsampled to the crop's size (``stability_score_offset`` around 0);
4. drop masks whose box touches a crop edge (20 px) that is not an image edge; box NMS (``box_nms_thresh``,
   scored by predicted IoU) within each crop, then across crops (``crop_nms_thresh``, smaller crops first);
5. optionally fill holes and remove islands smaller than ``min_mask_region_area`` pixels, then NMS again
   (unchanged masks first);
6. records with the mask as a bool array, uncompressed RLE or COCO RLE.

Where the time goes and what is done differently (same results, to float rounding):

* the decoder runs in two stages: the transformer and IoU head for every click, then the output upscaling and
  mask products only for clicks with at least one mask above ``pred_iou_thresh`` (the official decoder computes
  all masks, and the official generator then upsamples *all* of them to the crop size before looking at IoU);
* only masks that pass the IoU filter are upsampled, in one step folded into two matrix products
  (:class:`~samtune.inference.amg_utils.MaskUpsampler`), to compute stability and boxes; survivors are kept as
  packed bits and RLE-encoded in one batch at the end, only for the masks that survive NMS (the official code
  encodes every survivor of the filters, with a loop that is quadratic in the number of masks);
* the decoder runs on a few clicks at a time (see :class:`_TwoStageDecoder`), whatever ``points_per_batch``;
* the image encoder and the decoder run at the :class:`~samtune.inference.Predictor`'s precision (bf16 by
  default where the hardware supports it natively; pass ``precision="fp32"`` for the official numbers).

Writers: :func:`to_sa1b_json` (one SA-1B annotation file per image) and :func:`to_coco_results` (COCO
results list for ``pycocotools.cocoeval``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torchvision.ops import batched_nms

from samtune.argtypes import in_range, range_text
from samtune.inference.amg_utils import (
    MaskUpsampler,
    boxes_near_crop_edge,
    build_point_grids,
    coco_rle,
    generate_crop_boxes,
    masks_to_boxes,
    masks_to_coco_rle,
    masks_to_rle,
    remove_small_regions,
    rle_to_mask,
    stability_score,
    xyxy_to_xywh,
)
from samtune.inference.predictor import Predictor
from samtune.modeling.precision import Precision, autocast
from samtune.modeling.sam import Sam

__all__ = ["AutomaticMaskGenerator", "OutputMode", "to_sa1b_json", "to_coco_results"]

_CHUNK_BYTES = 8 << 20  # bound on one decoder call's per-click intermediates (see _TwoStageDecoder)

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]
_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _show(value: Any) -> str:
    return str(value) if isinstance(value, numbers.Real) else repr(value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {_show(value)}")


def _check_number(name: str, value: Any, low: float, high: float | None = None, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in ``[low, high]`` (``[low, high)``
    with ``high_open``; no upper bound when ``high`` is None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not in_range(value, low, high, high_open):
        raise ValueError(f"{name} must be a number {range_text(low, high, high_open)}, got {_show(value)}")


@dataclass
class _Masks:
    """Masks kept so far, as parallel arrays (``N`` masks).

    Attributes:
        bits: ``[N, h, ceil(w / 8)]`` uint8 packed masks in their crop's frame (all from one crop), or the
            per-crop arrays concatenated as a list when several crops are merged.
        boxes: ``[N, 4]`` int64 xyxy (inclusive) in the image frame.
        iou: ``[N]`` float32 predicted IoU.
        stability: ``[N]`` float32.
        points: ``[N, 2]`` float64 (x, y) click in the image frame.
        crop: ``[N]`` int64 index into the crop boxes.
    """

    bits: list[np.ndarray] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    iou: list[torch.Tensor] = field(default_factory=list)
    stability: list[torch.Tensor] = field(default_factory=list)
    points: list[torch.Tensor] = field(default_factory=list)
    crop: list[torch.Tensor] = field(default_factory=list)

    def cat(self) -> "_Masks":
        """Concatenate the pieces gathered batch by batch (``bits`` stays a list of per-mask arrays)."""
        if not self.boxes:
            return _Masks(
                bits=[],
                boxes=torch.zeros(0, 4, dtype=torch.long),
                iou=torch.zeros(0),
                stability=torch.zeros(0),
                points=torch.zeros(0, 2, dtype=torch.float64),
                crop=torch.zeros(0, dtype=torch.long),
            )
        return _Masks(
            bits=[b for chunk in self.bits for b in chunk],
            boxes=torch.cat(self.boxes),
            iou=torch.cat(self.iou),
            stability=torch.cat(self.stability),
            points=torch.cat(self.points),
            crop=torch.cat(self.crop),
        )

    def select(self, keep: torch.Tensor) -> "_Masks":
        """The masks at indices ``keep`` (``[K]`` long), in that order."""
        idx = keep.tolist()
        return _Masks(
            bits=[self.bits[i] for i in idx],
            boxes=self.boxes[keep],
            iou=self.iou[keep],
            stability=self.stability[keep],
            points=self.points[keep],
            crop=self.crop[keep],
        )

    def __len__(self) -> int:
        return len(self.bits)


class AutomaticMaskGenerator:
    """Generate masks for everything in an image (drop-in for ``segment_anything.SamAutomaticMaskGenerator``).

    Args:
        model_or_predictor: a :class:`~samtune.modeling.Sam` (wrapped in a :class:`Predictor` at ``precision``)
            or a :class:`Predictor` (its precision is used; :meth:`generate` embeds its crops in it and then
            restores the image the predictor had, so its user can go on prompting that image).
        points_per_side: clicks per side of the grid (``points_per_side**2`` in all); None when ``point_grids``
            is given.
        points_per_batch: clicks whose masks are filtered together; bounds the memory of the low-res logits
            held at once (the decoder itself runs on a few clicks at a time).
        pred_iou_thresh: keep masks with predicted IoU above this, in [0, 1] (0 disables the filter).
        stability_score_thresh: keep masks with stability score at least this, in [0, 1] (0 disables the filter).
        stability_score_offset: logit offset (>= 0) around the mask threshold for the stability score.
        box_nms_thresh: box IoU of the NMS between masks of one crop, in [0, 1].
        crop_n_layers: number of crop layers (layer ``i`` has ``(2**i)**2`` crops), >= 0.
        crop_nms_thresh: box IoU of the NMS between masks of different crops, in [0, 1].
        crop_overlap_ratio: overlap of neighbouring crops in layer 1, as a fraction of the short side, in [0, 1).
        crop_n_points_downscale_factor: layer ``i`` uses ``points_per_side / factor**i`` points per side.
        point_grids: explicit grids ``[N_i, 2]`` in [0, 1] (x, y), one per layer (``crop_n_layers + 1``).
        min_mask_region_area: if > 0, fill holes and remove islands smaller than this many pixels (>= 0).
        output_mode: ``"binary_mask"`` (``[H, W]`` bool array), ``"uncompressed_rle"`` or ``"coco_rle"``.
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"`` for a model (ignored when a Predictor is passed).

    Raises:
        ValueError: an argument out of its range (named in the message).
    """

    def __init__(
        self,
        model_or_predictor: Sam | Predictor,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: OutputMode = "binary_mask",
        precision: Precision = "auto",
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if points_per_side is not None:
            _check_int("points_per_side", points_per_side, 1)
        _check_int("points_per_batch", points_per_batch, 1)
        _check_int("crop_n_layers", crop_n_layers, 0)
        _check_int("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        for name, value in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh),
                            ("box_nms_thresh", box_nms_thresh), ("crop_nms_thresh", crop_nms_thresh)):
            _check_number(name, value, 0.0, 1.0)
        _check_number("stability_score_offset", stability_score_offset, 0.0)
        _check_number("crop_overlap_ratio", crop_overlap_ratio, 0.0, 1.0, high_open=True)
        _check_number("min_mask_region_area", min_mask_region_area, 0.0)
        if points_per_side is not None:
            if int(points_per_side / crop_n_points_downscale_factor**crop_n_layers) < 1:
                raise ValueError(
                    f"points_per_side={points_per_side} / crop_n_points_downscale_factor="
                    f"{crop_n_points_downscale_factor}**layer leaves no points in some crop layer"
                )
            grids = build_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(grids) != crop_n_layers + 1:
                raise ValueError(f"point_grids has {len(grids)} grids, expected crop_n_layers + 1 = {crop_n_layers + 1}")
            for i, g in enumerate(grids):
                if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 or not ((g >= 0) & (g <= 1)).all():  # NaN fails
                    raise ValueError(f"point_grids[{i}] must be a non-empty [N, 2] array of (x, y) in [0, 1], got shape {g.shape}")
        if output_mode not in _OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {_OUTPUT_MODES}, got {output_mode!r}")
        if isinstance(model_or_predictor, Predictor):
            self.predictor = model_or_predictor
        elif isinstance(model_or_predictor, Sam):
            self.predictor = Predictor(model_or_predictor, precision=precision)
        else:
            raise TypeError(f"model_or_predictor must be a samtune Sam or Predictor, got {type(model_or_predictor).__name__}")
        self.point_grids = grids
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @property
    def model(self) -> Sam:
        return self.predictor.model

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for everything in ``image``.

        Args:
            image: ``[H, W, 3]`` uint8 RGB (``[H, W]`` greyscale is repeated; min-max models such as LiteMedSAM
                also take other numeric dtypes).

        Returns:
            One record per mask, ordered as the official generator orders them: ``segmentation`` (per
            ``output_mode``), ``area`` (pixels), ``bbox`` (XYWH, ints), ``predicted_iou``, ``point_coords``
            (``[[x, y]]``), ``stability_score``, ``crop_box`` (XYWH of the crop the mask came from).
        """
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must have shape [H, W, 3] (or [H, W]), got {image.shape}")
        if image.dtype != np.uint8 and not (self.model.normalization == "minmax" and np.issubdtype(image.dtype, np.number)):
            raise ValueError(f"image must be uint8 with values 0-255, got {image.dtype}")
        h, w = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        parts = _Masks()
        # The crops are embedded in the predictor, which may be the caller's with an image of its own: give it
        # back as it was (embedding and sizes), also when generation fails.
        saved = self.predictor._image_state()
        try:
            for index, (box, layer) in enumerate(zip(crop_boxes, layers)):
                crop = self._process_crop(image, box, layer, index, (h, w))
                parts.bits.append(crop.bits)
                parts.boxes.append(crop.boxes)
                parts.iou.append(crop.iou)
                parts.stability.append(crop.stability)
                parts.points.append(crop.points)
                parts.crop.append(crop.crop)
        finally:
            self.predictor._restore_image_state(saved)
        data = parts.cat()
        if len(crop_boxes) > 1 and len(data):
            areas = torch.tensor([(b[2] - b[0]) * (b[3] - b[1]) for b in crop_boxes], dtype=torch.float32)
            keep = batched_nms(
                data.boxes.float(), 1 / areas[data.crop], torch.zeros(len(data), dtype=torch.long), self.crop_nms_thresh
            )
            data = data.select(keep)
        masks = self._unpack(data, crop_boxes, (h, w))
        if self.min_mask_region_area > 0 and len(data):
            data, masks = self._clean_small_regions(data, masks)
        return self._records(data, masks, crop_boxes)

    # ------------------------------------------------------------------ per crop
    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, crop_index: int, image_size: tuple[int, int]
    ) -> _Masks:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        crop_size = crop.shape[:2]
        predictor = self.predictor
        predictor.set_image(crop)
        model = self.model
        upsampler = MaskUpsampler(
            model.low_res_size, model.image_size, predictor.input_size, crop_size, device=predictor.device,
            max_pixels=_CHUNK_BYTES // 4,
        )
        decoder = _TwoStageDecoder(model, predictor.features, predictor.precision)
        points = self.point_grids[layer] * np.array(crop_size[::-1], dtype=np.float64)[None]  # (x, y) crop pixels
        coords = torch.as_tensor(predictor.transform.apply_coords(points, crop_size), dtype=torch.float32, device=predictor.device)
        out = _Masks()
        for start in range(0, len(points), self.points_per_batch):
            batch = self._process_batch(
                decoder, coords[start : start + self.points_per_batch], upsampler, crop_box, image_size
            )
            if batch is None:
                continue
            bits, boxes, iou, stability, point_idx = batch
            out.bits.append(bits)
            out.boxes.append(boxes)
            out.iou.append(iou)
            out.stability.append(stability)
            out.points.append(torch.as_tensor(points[start + point_idx.numpy()]))
            out.crop.append(torch.full((len(bits),), crop_index, dtype=torch.long))
        predictor.reset_image()
        data = out.cat()
        if len(data):
            keep = batched_nms(data.boxes.float(), data.iou, torch.zeros(len(data), dtype=torch.long), self.box_nms_thresh)
            data = data.select(keep)
        offset = torch.tensor([x0, y0, x0, y0])
        data.boxes = data.boxes + offset
        data.points = data.points + torch.tensor([x0, y0], dtype=torch.float64)
        return data

    def _process_batch(
        self, decoder: "_TwoStageDecoder", coords: torch.Tensor, upsampler: MaskUpsampler, crop_box: list[int], image_size: tuple[int, int]
    ) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Decode ``[B, 2]`` clicks (model-input pixels) and filter their masks.

        Returns:
            Packed masks, boxes ``[K, 4]`` (crop frame), IoU ``[K]``, stability ``[K]`` and the index of each
            mask's click in the batch ``[K]`` (CPU tensors), or None when no mask survives.
        """
        threshold = self.model.mask_threshold
        ious, low_res_parts, click_parts = [], [], []
        for chunk in decoder.chunks(coords.shape[0], decoder.transformer_chunk):
            iou, tokens, image_tokens = decoder.run_transformer(coords[chunk])  # [c, 3]
            keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            prompts = keep.any(dim=1).nonzero().squeeze(1)  # clicks with at least one mask to look at
            if len(prompts):
                low_res = decoder.masks(tokens[prompts], image_tokens[prompts])  # [p, 3, L, L]
                sel = keep[prompts]
                low_res_parts.append(low_res[sel])
                click_parts.append(prompts[:, None].expand_as(sel)[sel] + chunk.start)
                ious.append(iou[prompts][sel])
        if not low_res_parts:
            return None
        low_res = torch.cat(low_res_parts)  # [K, L, L]
        point_idx = torch.cat(click_parts)
        iou = torch.cat(ious)
        stability_parts, bits, boxes, kept = [], [], [], []
        h, w = upsampler.size
        for start in range(0, low_res.shape[0], upsampler.chunk):
            logits = upsampler(low_res[start : start + upsampler.chunk])
            stab = stability_score(logits, threshold, self.stability_score_offset)
            ok = stab >= self.stability_score_thresh if self.stability_score_thresh > 0.0 else torch.ones_like(stab, dtype=torch.bool)
            if not ok.any():
                continue
            masks = logits[ok] > threshold
            chunk_boxes = masks_to_boxes(masks)
            edge = boxes_near_crop_edge(chunk_boxes, crop_box, [0, 0, image_size[1], image_size[0]])
            good = ~edge
            idx = ok.nonzero().squeeze(1)[good] + start
            masks = masks[good].cpu().numpy()
            bits.extend(np.packbits(masks, axis=-1))
            boxes.append(chunk_boxes[good].cpu())
            stability_parts.append(stab[ok][good].cpu())
            kept.append(idx)
        if not kept:
            return None
        kept_idx = torch.cat(kept)
        return (
            bits,
            torch.cat(boxes),
            iou[kept_idx].float().cpu(),
            torch.cat(stability_parts),
            point_idx[kept_idx].cpu(),
        )

    # ------------------------------------------------------------------ outputs
    def _unpack(self, data: _Masks, crop_boxes: list[list[int]], image_size: tuple[int, int]) -> torch.Tensor:
        """Full-image bool masks ``[N, H, W]`` of the kept masks."""
        h, w = image_size
        masks = torch.zeros(len(data), h, w, dtype=torch.bool)
        for i, (bits, crop_index) in enumerate(zip(data.bits, data.crop.tolist())):
            x0, y0, x1, y1 = crop_boxes[crop_index]
            crop = np.unpackbits(bits, axis=-1, count=x1 - x0).view(bool)
            masks[i, y0:y1, x0:x1] = torch.from_numpy(crop)
        return masks

    def _clean_small_regions(self, data: _Masks, masks: torch.Tensor) -> tuple[_Masks, torch.Tensor]:
        """Fill small holes, remove small islands, re-run NMS preferring unchanged masks."""
        area = self.min_mask_region_area
        cleaned = np.empty(tuple(masks.shape), dtype=bool)
        unchanged = torch.empty(len(data))
        for i, mask in enumerate(masks.numpy()):
            mask, holes = remove_small_regions(mask, area, "holes")
            mask, islands = remove_small_regions(mask, area, "islands")
            cleaned[i] = mask
            unchanged[i] = float(not (holes or islands))
        cleaned_t = torch.from_numpy(cleaned)
        boxes = masks_to_boxes(cleaned_t)
        keep = batched_nms(
            boxes.float(), unchanged, torch.zeros(len(data), dtype=torch.long), max(self.box_nms_thresh, self.crop_nms_thresh)
        )
        changed = unchanged == 0
        data.boxes = torch.where(changed[:, None], boxes, data.boxes)
        return data.select(keep), cleaned_t[keep]

    def _records(self, data: _Masks, masks: torch.Tensor, crop_boxes: list[list[int]]) -> list[dict[str, Any]]:
        if self.output_mode == "binary_mask":
            segmentations: list[Any] = list(masks.numpy())
        elif self.output_mode == "uncompressed_rle":
            segmentations = masks_to_rle(masks)
        else:
            segmentations = masks_to_coco_rle(masks)
        areas = masks.sum(dim=(1, 2)).tolist()
        bboxes = xyxy_to_xywh(data.boxes).tolist()
        ious = data.iou.tolist()
        stabs = data.stability.tolist()
        points = data.points.tolist()
        crops = [xyxy_to_xywh(torch.tensor(crop_boxes[c])).tolist() for c in data.crop.tolist()]
        return [
            {
                "segmentation": segmentations[i],
                "area": int(areas[i]),
                "bbox": bboxes[i],
                "predicted_iou": ious[i],
                "point_coords": [points[i]],
                "stability_score": stabs[i],
                "crop_box": crops[i],
            }
            for i in range(len(segmentations))
        ]


class _TwoStageDecoder:
    """SAM's mask decoder for single positive clicks, split where the IoU prediction is known.

    Stage 1 (:meth:`run_transformer`) runs the prompt encoder, the two-way transformer and the IoU head;
    stage 2 (:meth:`masks`) runs the output upscaling and the hypernetwork products, called only for clicks with
    a mask worth looking at. Together they compute what ``Sam.decode(..., multimask_output=True)`` computes.

    Both stages run on a few clicks at a time (:attr:`transformer_chunk`, :attr:`masks_chunk`), sized so that
    one call's per-click intermediates stay under ``_CHUNK_BYTES``. On the CPU this is much of the speed: an
    intermediate of more than 32 MB is a fresh ``mmap`` for glibc's allocator on every call, and faulting its
    pages in can cost more than the arithmetic (ViT-B's decoder on 64 clicks at once spent about half its time
    so, see BENCHMARKS.md). Small chunks stay in reused heap memory and in cache.

    Args:
        model: the SAM model.
        features: ``[1, C, h, w]`` image embedding.
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the decoder, as the Predictor's).
    """

    def __init__(self, model: Sam, features: torch.Tensor, precision: str) -> None:
        self.model = model
        self.features = features
        self.precision = precision
        c, h, w = features.shape[1:]
        itemsize = 2 if precision == "bf16" else 4
        per_click = h * w * c * itemsize  # one click's image tokens
        self.transformer_chunk = max(1, _CHUNK_BYTES // per_click)
        self.masks_chunk = max(1, _CHUNK_BYTES // (2 * per_click))  # the upscaled features are twice as large
        dec, prompt_encoder = model.mask_decoder, model.prompt_encoder
        self._output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        # No mask prompt: the dense embedding is one vector for all clicks, so the image tokens are shared.
        self._src = (features.flatten(2).transpose(1, 2) + prompt_encoder.no_mask_embed.weight[None]).contiguous()
        self._pos = prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)

    @staticmethod
    def chunks(n: int, size: int) -> list[slice]:
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def run_transformer(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, 2]`` clicks (model-input pixels) -> IoU predictions ``[B, 3]`` of the multimask outputs, and the
        transformer's output tokens ``[B, T, C]`` and image tokens ``[B, h*w, C]`` for :meth:`masks`."""
        model, dec = self.model, self.model.mask_decoder
        device = self.features.device
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=device)
        with autocast(device, self.precision):
            sparse, _ = model.prompt_encoder((coords[:, None, :], labels), None, None)
            tokens = torch.cat([self._output_tokens.expand(sparse.shape[0], -1, -1).to(sparse.dtype), sparse], dim=1)
            hs, keys = dec.transformer(self._src, self._pos, tokens, None)
            iou = dec.iou_prediction_head(hs[:, 0])
        return iou[:, 1:].float(), hs, keys

    def masks(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Low-res logits ``[P, 3, L, L]`` of the multimask outputs from :meth:`run_transformer`'s outputs."""
        dec = self.model.mask_decoder
        h, w = self.features.shape[-2:]
        out = []
        with autocast(self.features.device, self.precision):
            for chunk in self.chunks(tokens.shape[0], self.masks_chunk):
                # Multimask outputs only: mask tokens 1..3 (the single-mask token 0 is not computed).
                multimask = range(1, dec.num_mask_tokens)
                out.append(dec.mask_logits(tokens[chunk], image_tokens[chunk], h, w, multimask).float())
        return torch.cat(out)


# ---------------------------------------------------------------------------- writers
def to_sa1b_json(
    records: list[dict[str, Any]],
    image_info: dict[str, Any],
    segmentation: Literal["coco_rle", "uncompressed_rle"] = "coco_rle",
) -> dict[str, Any]:
    """An SA-1B annotation file for one image from generator records.

    Args:
        records: output of :meth:`AutomaticMaskGenerator.generate` (any ``output_mode``).
        image_info: the ``"image"`` entry; must hold ``width`` and ``height`` (checked against the masks),
            usually also ``image_id`` and ``file_name``.
        segmentation: mask form in the file: COCO RLE with ``str`` counts (SA-1B's) or uncompressed RLE.

    Returns:
        ``{"image": image_info, "annotations": [{"id", "segmentation" (COCO RLE, str counts), "bbox", "area",
        "predicted_iou", "stability_score", "point_coords", "crop_box"}, ...]}``, ready for ``json.dump`` and
        readable by :class:`samtune.data.SA1BDataset`.
    """
    if segmentation not in ("coco_rle", "uncompressed_rle"):
        raise ValueError(f"segmentation must be 'coco_rle' or 'uncompressed_rle', got {segmentation!r}")
    missing = [k for k in ("width", "height") if k not in image_info]
    if missing:
        raise ValueError(f"image_info lacks {missing}; it needs at least 'width' and 'height'")
    size = (int(image_info["height"]), int(image_info["width"]))
    annotations = []
    for i, rec in enumerate(records):
        seg = rec["segmentation"]
        if segmentation == "coco_rle":
            rle = coco_rle(seg, size)
        elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
            rle = {"size": [int(v) for v in seg["size"]], "counts": [int(v) for v in seg["counts"]]}
            if tuple(rle["size"]) != size or sum(rle["counts"]) != size[0] * size[1]:
                raise ValueError(f"mask of record {i}: RLE of size {tuple(rle['size'])} differs from the image size {size}")
        else:
            rle = masks_to_rle(torch.from_numpy(rle_to_mask(coco_rle(seg, size)))[None])[0]
        annotations.append(
            {
                "id": i,
                "segmentation": rle,
                "bbox": [float(v) for v in rec["bbox"]],
                "area": int(rec["area"]),
                "predicted_iou": float(rec["predicted_iou"]),
                "stability_score": float(rec["stability_score"]),
                "point_coords": [[float(v) for v in p] for p in rec["point_coords"]],
                "crop_box": [float(v) for v in rec["crop_box"]],
            }
        )
    return {"image": dict(image_info), "annotations": annotations}


def to_coco_results(
    records: list[dict[str, Any]],
    image_id: int,
    category_id: int = 1,
    score: Literal["predicted_iou", "stability_score", "product"] = "predicted_iou",
) -> list[dict[str, Any]]:
    """COCO results entries (``loadRes`` / ``COCOeval`` format, segm and bbox) for one image's records.

    Args:
        records: generator records (any ``output_mode``).
        image_id: the COCO image id.
        category_id: category given to every (class-agnostic) mask.
        score: detection score: predicted IoU, stability score, or their product.

    Returns:
        ``[{"image_id", "category_id", "segmentation", "bbox", "score", "area"}, ...]``.
    """
    if score not in ("predicted_iou", "stability_score", "product"):
        raise ValueError(f"score must be 'predicted_iou', 'stability_score' or 'product', got {score!r}")
    out = []
    for rec in records:
        value = rec["predicted_iou"] * rec["stability_score"] if score == "product" else rec[score]
        out.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": coco_rle(rec["segmentation"]),
                "bbox": [float(v) for v in rec["bbox"]],
                "score": float(value),
                "area": int(rec["area"]),
            }
        )
    return out
