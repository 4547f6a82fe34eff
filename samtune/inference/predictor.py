"""Embed an image once, then predict masks for many prompts: a drop-in for ``segment_anything.SamPredictor``.

Same methods, arguments and return types (``set_image``, ``set_torch_image``, ``predict``, ``predict_torch``,
``get_image_embedding``, ``reset_image``, the ``transform`` attribute), so code written for segment_anything
works by changing the import. Differences, all of them errors where the official code silently computes
something meaningless:

* ``predict`` / ``predict_torch`` with no prompt at all raise ``ValueError`` (the official predictor returns a
  mask decoded from the output tokens alone).
* Points or boxes outside the image, or not finite, raise ``ValueError`` naming them (usually swapped x/y; for
  ``predict_torch`` the image is the resized ``input_size`` part of the model input, not its padding); so do
  boxes with ``x1 < x0`` or ``y1 < y0`` (usually XYWH passed as XYXY),
  ``point_labels`` without ``point_coords`` (the official predictor ignores them), prompts of the wrong shape,
  batch sizes that differ between prompts, labels outside {-1, 0, 1, 2, 3} (or not whole numbers) and a
  ``mask_input`` that is not one finite low-res logit map per prompt. Zero points and nothing else is no prompt.
* ``predict_torch`` also takes boxes as ``[B, 1, 4]`` (what ``predict`` passes internally in the official code),
  returns empty outputs for ``B = 0`` prompts (the official one fails inside the decoder) and raises
  ``TypeError`` for prompts that are not tensors.
* Point labels 2 and 3 are box corners (top-left, bottom-right) and get the box-corner embeddings, as in SAM's
  ONNX decoder and box prompts; the official ``SamPredictor`` gives such points their position encoding alone.
* ``precision="auto"`` (the default) runs in bf16 where the hardware does so natively (CUDA GPUs with bf16,
  CPUs with AVX512-BF16/AMX): about 2-3x faster, image embeddings within cosine 0.9999 of fp32. Pass
  ``precision="fp32"`` to reproduce the official predictor's numbers (parity-tested to 1e-4).
* Images must be ``uint8`` ``[H, W, 3]`` (``[H, W]`` greyscale is repeated to 3 channels). Models with the
  min-max convention (LiteMedSAM) also take 16-bit and float images: the whole image is min-max scaled first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import copy

import numpy as np
import torch
from torch import nn

from samtune.inference.transforms import ResizeLongestSide
from samtune.modeling.preprocessing import get_preprocess_shape
from samtune.modeling.precision import Precision, autocast, resolve_precision
from samtune.modeling.sam import Sam

__all__ = ["Predictor"]


def _require_point_pair(point_coords: Any, point_labels: Any) -> None:
    """Points need their labels and labels their points (the official predictor drops labels given alone)."""
    if point_coords is not None and point_labels is None:
        raise ValueError("point_labels must be supplied with point_coords")
    if point_coords is None and point_labels is not None:
        raise ValueError("point_coords must be supplied with point_labels")


def _check_whole(labels: np.ndarray) -> None:
    """Float point labels must be whole numbers (they are class ids; 0.5 used to be truncated to 0 silently)."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)))]
    if bad.size:
        raise ValueError(f"point_labels must be whole numbers (-1, 0, 1, 2 or 3), got {bad[:5].tolist()}")


def _check_box_order(boxes: np.ndarray, what: str) -> None:
    """Boxes ``[..., 4]`` must be xyxy with ``x0 <= x1`` and ``y0 <= y1`` (an inverted box is usually XYWH)."""
    boxes = boxes.reshape(-1, 4)
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        raise ValueError(
            f"{what} must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {boxes[bad][:5].tolist()}; "
            "convert XYWH boxes to XYXY first (x1 = x0 + w, y1 = y0 + h)"
        )


class Predictor:
    """Predict masks for prompts on one image at a time.

    Args:
        sam_model: the model (put it on the device you want first).
        precision: ``"auto"`` (bf16 where native, else fp32), ``"fp32"`` or ``"bf16"``. In bf16 the image encoder
            runs from a bf16 copy of its weights (half the encoder's fp32 size, re-made whenever the model's
            weights change) and the prompt encoder and decoder under bf16 autocast; outputs are float32.
        compile: ``torch.compile`` the image encoder (a one-off compilation of about a minute on CPU, then
            10-20% faster).

    Attributes:
        input_mapping: how the model's training data turned image files into its 8-bit RGB input (band selection
            and intensity preset, :func:`samtune.data.io.prepare_image` keyword arguments), when
            :meth:`from_checkpoint` found it recorded; else None. Apply it to raw 16-bit / multi-band images
            before :meth:`set_image` (``samtune amg`` does).
    """

    def __init__(self, sam_model: Sam, precision: Precision = "auto", compile: bool = False) -> None:
        self.model = sam_model
        self.transform = ResizeLongestSide(sam_model.image_size, sam_model.resize_interpolation)
        self.precision = resolve_precision(precision, sam_model.device)
        self.compile = compile
        self.input_mapping: dict[str, Any] | None = None
        self._encoder: nn.Module | None = None
        self._encoder_key: tuple | None = None
        self.reset_image()

    def _weights_key(self) -> tuple:
        """Identity and in-place version of every encoder parameter: changes when the weights change."""
        return tuple((id(p), p._version, p.device, p.dtype) for p in self.model.image_encoder.parameters())

    def _image_encoder(self) -> nn.Module:
        """The module that embeds images at the predictor's precision (cached bf16/compiled copy if needed)."""
        encoder = self.model.image_encoder
        if self.precision == "fp32" and not self.compile:
            return encoder
        key = self._weights_key()
        if self._encoder is None or key != self._encoder_key:
            fast = encoder
            if self.precision == "bf16" and next(encoder.parameters()).dtype != torch.bfloat16:
                fast = copy.deepcopy(encoder).to(torch.bfloat16)
            self._encoder = torch.compile(fast) if self.compile else fast
            self._encoder_key = key
        return self._encoder

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        precision: Precision = "auto",
    ) -> "Predictor":
        """Build a registered model (``samtune.build_sam``) and wrap it."""
        from samtune.build import build_sam

        return cls(build_sam(name, checkpoint).to(device), precision=precision)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        model: str | None = None,
        device: str | torch.device = "cpu",
        *,
        base_checkpoint: str | Path | None = None,
        merge_adapters: bool | Literal["auto"] = "auto",
        precision: Precision = "auto",
        compile: bool = False,
    ) -> "Predictor":
        """A predictor for any supported weights file, working out which model it is.

        Reads official SAM ``.pth`` (vit_b/l/h), MobileSAM (vit_t), LiteMedSAM, safetensors, ``samtune export``
        outputs (model from their metadata) and samtune training checkpoints (Lightning ``.ckpt``: model from
        the hyper-parameters). Without metadata the model is inferred from the tensor shapes
        (:func:`samtune.checkpoints.infer_model_name`). Adapted checkpoints (LoRA/adapters) go through
        ``samtune.adapt``; LoRA is merged into plain weights, bottleneck adapters (which cannot be merged) run as
        modules. Files are read with ``weights_only=True``.

        Args:
            path: the weights file.
            model: registry name overriding inference (e.g. ``"lite_medsam"``).
            device: where the model runs.
            base_checkpoint: base weights for an adapter-only checkpoint.
            merge_adapters: ``"auto"`` merges what can be merged (LoRA), True also requires it of adapters (an
                error for bottleneck adapters), False keeps the adapted modules.
            precision: see :class:`Predictor`.
            compile: see :class:`Predictor`.

        Raises:
            samtune.checkpoints.CheckpointError: missing or unreadable file, a model that cannot be inferred
                (the message says what was recognised), or weights that do not fit ``model``.
        """
        from samtune.export.loading import load_sam

        loaded = load_sam(path, model, base_checkpoint=base_checkpoint, merge_adapters=merge_adapters)
        predictor = cls(loaded.model.to(device), precision=precision, compile=compile)
        predictor.input_mapping = loaded.input_mapping
        return predictor

    # ----------------------------------------------------------------- image
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute the embedding of an ``[H, W, 3]`` uint8 image (``image_format`` ``"RGB"`` or ``"BGR"``).

        For min-max models (LiteMedSAM) any numeric dtype is accepted (e.g. uint16 microscopy).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must have shape [H, W, 3] (or [H, W]), got {image.shape}")
        if self.model.normalization == "minmax" and image.dtype != np.uint8:
            if not np.issubdtype(image.dtype, np.number):
                raise ValueError(f"image must be numeric, got {image.dtype}")
            image = image.astype(np.float32)
            bad = int(np.count_nonzero(~np.isfinite(image).all(axis=-1)))
            if bad:
                raise ValueError(f"image must be finite, got {bad} pixel{'s' if bad > 1 else ''} with NaN or inf")
            lo, hi = float(image.min()), float(image.max())
            image = (image - lo) * (255.0 / max(hi - lo, 1e-8))
        elif image.dtype != np.uint8:
            raise ValueError(
                f"image must be uint8 with values 0-255, got {image.dtype}; scale 16-bit or float data first "
                "(samtune.data has normalisation presets)"
            )
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        input_image = self.transform.apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(tensor, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Compute the embedding of an already resized ``[1, 3, h, w]`` image (longest side = model input).

        ``original_image_size`` is the (H, W) of the image before resizing; it must resize to (h, w).
        """
        size = self.model.image_size
        if (transformed_image.dim() != 4 or transformed_image.shape[:2] != (1, 3)
                or max(transformed_image.shape[2:]) != size):
            raise ValueError(
                f"set_torch_image expects [1, 3, h, w] with longest side {size}, got {tuple(transformed_image.shape)} "
                "(one image at a time; Sam.encode_image / Sam.decode take batches)"
            )
        original = tuple(int(s) for s in original_image_size)
        input_size = tuple(int(s) for s in transformed_image.shape[-2:])
        if len(original) != 2:
            raise ValueError(f"original_image_size must be (H, W) of the image before the transform, got {original}")
        expected = get_preprocess_shape(*original, size)
        if expected != input_size:
            raise ValueError(
                f"original_image_size {original} resized to a longest side of {size} would be {expected}, but the "
                f"transformed image is {input_size}: pass the (H, W) of the image given to transform.apply_image"
            )
        self.reset_image()
        self.original_size = original
        self.input_size = input_size
        images = self.model.preprocess(transformed_image.float())
        encoder = self._image_encoder()
        if self.precision == "bf16":
            images = images.to(torch.bfloat16)
        self.features = encoder(images).float()
        self.is_image_set = True

    # ----------------------------------------------------------------- prompts
    def _check_inside(self, coords: np.ndarray, what: str) -> None:
        h, w = self.original_size
        coords = coords.reshape(-1, 2)
        if not np.isfinite(coords).all():
            raise ValueError(f"{what} must be finite, got {coords[~np.isfinite(coords).all(axis=1)][:5].tolist()}")
        bad = (coords[:, 0] < 0) | (coords[:, 0] > w) | (coords[:, 1] < 0) | (coords[:, 1] > h)
        if bad.any():
            raise ValueError(
                f"{what} outside the {w}x{h} (width x height) image: {coords[bad][:5].tolist()}; "
                "coordinates are (x, y) in pixels of the original image"
            )

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for prompts in original-image pixels.

        Args:
            point_coords: ``[N, 2]`` (x, y).
            point_labels: ``[N]``, 1 foreground, 0 background.
            box: ``[4]`` xyxy.
            mask_input: ``[1, 256, 256]`` low-res logits from a previous call.
            multimask_output: 3 masks (for ambiguous prompts) instead of 1.
            return_logits: return logits instead of boolean masks.

        Returns:
            masks ``[C, H, W]``, IoU predictions ``[C]``, low-res logits ``[C, 256, 256]``.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords_t = labels_t = box_t = mask_t = None
        _require_point_pair(point_coords, point_labels)
        if point_coords is not None:
            point_coords = np.asarray(point_coords, dtype=float)
            point_labels = np.asarray(point_labels)
            if point_coords.ndim != 2 or point_coords.shape[1] != 2 or point_labels.shape != (point_coords.shape[0],):
                raise ValueError(
                    f"point_coords must be [N, 2] and point_labels [N], got {point_coords.shape} and {point_labels.shape}"
                )
            self._check_inside(point_coords, "point_coords")
            if np.issubdtype(point_labels.dtype, np.number) and not np.issubdtype(point_labels.dtype, np.integer):
                _check_whole(point_labels)
            coords_t = torch.as_tensor(self.transform.apply_coords(point_coords, self.original_size), dtype=torch.float, device=self.device)[None]
            labels_t = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = np.asarray(box, dtype=float)
            if box.size != 4:
                raise ValueError(f"box must be [4] xyxy, got shape {box.shape}")
            self._check_inside(box, "box")
            _check_box_order(box, "box")
            box_t = torch.as_tensor(self.transform.apply_boxes(box, self.original_size), dtype=torch.float, device=self.device)
        if mask_input is not None:
            low = self.model.low_res_size
            mask_input = np.asarray(mask_input)
            if mask_input.shape != (1, low, low):
                raise ValueError(
                    f"mask_input must be [1, {low}, {low}], one low-res logit map from a previous call (e.g. "
                    f"low_res[np.argmax(scores)][None]), got {mask_input.shape}"
                )
            mask_t = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        masks, iou, low_res = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output, return_logits)
        return masks[0].cpu().numpy(), iou[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for ``B`` prompts already in model-input pixels (see ``transform``).

        Args:
            point_coords: ``[B, N, 2]``.
            point_labels: ``[B, N]``.
            boxes: ``[B, 4]``.
            mask_input: ``[B, 1, 256, 256]``.
            multimask_output: 3 masks per prompt instead of 1.
            return_logits: logits instead of boolean masks.

        Returns:
            masks ``[B, C, H, W]``, IoU predictions ``[B, C]``, low-res logits ``[B, C, 256, 256]``.
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        _require_point_pair(point_coords, point_labels)
        boxes = self._check_prompts(point_coords, point_labels, boxes, mask_input)
        # [B, 0, 2] points are no points (B = 0 is an empty batch of prompts, answered with empty outputs).
        no_points = point_coords is None or (point_coords.shape[1] == 0 and point_coords.shape[0] > 0)
        if no_points and boxes is None and mask_input is None:
            raise ValueError("no prompt given: pass point_coords/point_labels (at least one point), a box or a "
                             "mask_input")
        with autocast(self.device, self.precision):
            low_res, iou = self.model.decode(
                self.features,
                point_coords=point_coords,
                point_labels=point_labels,
                boxes=boxes,
                mask_inputs=mask_input,
                multimask_output=multimask_output,
            )
        low_res, iou = low_res.float(), iou.float()
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res

    def _check_prompts(self, point_coords: torch.Tensor | None, point_labels: torch.Tensor | None,
                       boxes: torch.Tensor | None, mask_input: torch.Tensor | None) -> torch.Tensor | None:
        """Raise ``TypeError`` / ``ValueError`` naming the argument for prompts the model cannot take; returns
        ``boxes`` as ``[B, 4]`` (``[B, 1, 4]`` is flattened)."""
        prompts = {"point_coords": point_coords, "point_labels": point_labels, "boxes": boxes, "mask_input": mask_input}
        for what, value in prompts.items():
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"{what} must be a torch.Tensor in model-input pixels, got {type(value).__name__}; "
                                "predict() takes numpy arrays in original-image pixels")
        if boxes is not None and boxes.ndim == 3 and boxes.shape[1:] == (1, 4):
            boxes = boxes[:, 0]
        batch: dict[str, int] = {}
        if point_coords is not None:
            if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
                raise ValueError(f"point_coords must be [B, N, 2] (x, y), got {tuple(point_coords.shape)}")
            if point_labels is None or tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
                got = None if point_labels is None else tuple(point_labels.shape)
                raise ValueError(f"point_labels must be [B, N] = {tuple(point_coords.shape[:2])} like point_coords, "
                                 f"got {got}")
            if point_labels.is_floating_point():
                _check_whole(point_labels.detach().cpu().numpy())
            bad = sorted({int(v) for v in point_labels.unique().tolist()} - {-1, 0, 1, 2, 3})
            if bad:
                raise ValueError(f"point_labels must be -1 (padding), 0 (background), 1 (foreground) or 2 / 3 (box "
                                 f"corners), got {bad}")
            batch["point_coords"] = point_coords.shape[0]
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes must be [B, 4] xyxy (or [B, 1, 4]), got {tuple(boxes.shape)}")
            batch["boxes"] = boxes.shape[0]
        if mask_input is not None:
            low = self.model.low_res_size
            if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, low, low):
                raise ValueError(f"mask_input must be [B, 1, {low}, {low}] (low-res logits of earlier predictions), "
                                 f"got {tuple(mask_input.shape)}")
            if not torch.isfinite(mask_input).all():
                raise ValueError("mask_input must be finite (low-res logits), got NaN or inf")
            batch["mask_input"] = mask_input.shape[0]
        if len(set(batch.values())) > 1:
            raise ValueError(f"prompts must have the same batch size B, got {batch}")
        size = self.model.image_size
        h_in, w_in = self.input_size
        tol = 1e-3  # an original image corner, scaled in float32, may land a hair beyond
        for value, what in ((point_coords, "point_coords"), (boxes, "boxes")):
            if value is None:
                continue
            if not torch.isfinite(value).all():
                raise ValueError(f"{what} must be finite, got NaN or inf")
            if ((value < 0) | (value > size)).any():
                raise ValueError(f"{what} outside the model input frame [0, {size}]; transform them with predictor.transform first")
            xy = value if what == "point_coords" else value.reshape(-1, 2, 2)  # [B, N, 2] points or corners
            bad = (xy[..., 0] > w_in + tol) | (xy[..., 1] > h_in + tol)
            if what == "boxes":
                bad = bad.any(dim=1)  # the boxes with a corner outside
            if bad.any():
                raise ValueError(
                    f"{what} outside the image: x must be in [0, {w_in}] and y in [0, {h_in}] (model-input pixels; "
                    f"the rest of the {size}x{size} input is padding), got {value[bad][:5].tolist()}"
                )
        if boxes is not None:
            _check_box_order(boxes.detach().float().cpu().numpy(), "boxes")
        return boxes

    # ----------------------------------------------------------------- state
    def get_image_embedding(self) -> torch.Tensor:
        """The embedding ``[1, 256, 64, 64]`` of the current image."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    _IMAGE_STATE = ("is_image_set", "features", "original_size", "input_size", "orig_h", "orig_w", "input_h", "input_w")

    def _image_state(self) -> dict[str, Any]:
        """The current image's state (embedding and sizes), for :meth:`_restore_image_state`."""
        return {name: getattr(self, name) for name in self._IMAGE_STATE}

    def _restore_image_state(self, state: dict[str, Any]) -> None:
        """Bring back a state from :meth:`_image_state` (e.g. after the mask generator embedded its crops)."""
        for name in self._IMAGE_STATE:
            setattr(self, name, state[name])

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features = None
        self.original_size = None
        self.input_size = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
