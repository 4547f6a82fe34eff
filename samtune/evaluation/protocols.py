"""Prompting protocols of the SAM paper's evaluation, batched over all masks of a batch of images.

Protocols (each mask is prompted independently, prompts derived from its ground truth):

* ``"point"``: one click at the mask's centre, the pixel farthest from its boundary (maximum of the mask's
  interior distance transform, the image border counting as boundary; SAM paper Sec. 7.1 / App. D.1). The
  decoder's four outputs are produced in one call; reported: the output the ``first_click_multimask`` policy
  keeps (default: the highest predicted IoU of the three multimask outputs, the paper's "most confident mask"),
  the oracle (best of the three against the ground truth) and the single-mask output (token 0).
* ``"box"``: the exact tight ground-truth box, single-mask output. The box-as-mask baseline (IoU of the filled
  box, ``|mask| / |box|``, void pixels not counted in either) is reported with it.
* ``"box_jitter"``: the same box with the training recipe's noise: every coordinate moves by a Gaussian of
  standard deviation ``box_noise_std_fraction`` of the box side (width for x, height for y), at most
  ``box_noise_max`` model-input pixels; clipped to the image, seeded per sample (``seed``, sample index).
* ``"clicks"``: k clicks; click 1 as ``"point"``, every next click at the centre of the largest error region of
  the previous prediction (positive on a false negative, negative on a false positive; the standard protocol of
  interactive segmentation, App. D.1), never on a pixel clicked before (RITM's ``not_clicked_map``: a click the
  model did not follow is not repeated); the previous round's selected low-res logits are fed back as the mask
  prompt (``feed_back_mask``); click 1 uses the multimask policy, later clicks the single-mask output
  (``later_clicks_multimask`` to change it). A mask whose prediction is already exact (or whose every error
  pixel has been clicked) gets a padding token.

Void pixels (``ImageTarget.ignore``: labels that are neither object nor background, e.g. ``ignore_values``) are
left out of every IoU and of the error regions that place clicks, as in the RITM / f-BRS protocol.

Prompt tokens are those ``segment_anything.SamPredictor`` sends: clicks ``[c1, ..., ck, pad]``, a box as its two
corner tokens ``[tl, br]`` (no padding token); samtune's training simulation and validation use the same tokens.

Resolution (``iou_resolution``): ``"original"`` (default, as the paper and the official predictor) thresholds
the logits after ``Sam.postprocess_masks``' geometry (bilinear upsampling to the model input, padding cropped,
bilinear resize to the image's size) and computes clicks, boxes and IoUs on the ground truth at the image's own
resolution; ``"input"`` works on the ground truth resized to the model input (the validation setting; cheaper).

Coordinates (``coordinate_mapping``), with ``sx = w_input / W`` and ``sy = h_input / H``: ``"official"``
(default) maps ground-truth pixel indices as ``segment_anything``'s ``ResizeLongestSide.apply_coords`` does,
``x * sx`` (points and both box corners), so the numbers match a ``SamPredictor`` / :class:`samtune.Predictor`
run with boxes and clicks taken from the full-resolution masks (and the reference implementations that do so);
``"area"`` maps by pixel area (the convention of :mod:`samtune.prompts.geometry`): a point to
``(col + 0.5) * sx - 0.5``, a tight box ``[c0, c1]`` to ``[c0 * sx, (c1 + 1) * sx - 1]``. They coincide at
``iou_resolution="input"``; at 2x downsampling the box's right/bottom edge differs by half an input pixel
(LiteMedSAM on nuclei2d: box mIoU 0.670 official, 0.682 area).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from samtune.metrics import check_noc_thresholds
from samtune.prompts.deterministic import largest_error_points, mark_clicked, region_centers
from samtune.prompts.geometry import check_masks, mask_iou, resize_logits
from samtune.prompts.sampling import PAD_LABEL, jitter_boxes, mask_boxes
from samtune.prompts.simulator import PromptableModel

__all__ = [
    "PROTOCOLS",
    "ImageTarget",
    "CoordinateMapping",
    "IoUResolution",
    "ProtocolConfig",
    "ProtocolRunner",
    "boxes_to_input",
    "points_to_input",
    "sample_seed",
]

Protocol = Literal["point", "box", "box_jitter", "clicks"]
PROTOCOLS: tuple[str, ...] = ("point", "box", "box_jitter", "clicks")
IoUResolution = Literal["original", "input"]
CoordinateMapping = Literal["official", "area"]


@dataclass(frozen=True)
class ProtocolConfig:
    """Which protocols run, and how (see the module docstring).

    Attributes:
        protocols: subset of ``("point", "box", "box_jitter", "clicks")``.
        num_clicks: k, the click rounds of ``"clicks"`` (NoC is capped at k).
        first_click_multimask: click 1 produces the three multimask outputs and keeps the one with the highest
            predicted IoU (SAM paper); False keeps the single-mask output (token 0).
        later_clicks_multimask: clicks 2..k also select among the three multimask outputs (default: single).
        feed_back_mask: feed the previous round's selected low-res logits back as the mask prompt.
        box_noise_std_fraction: jitter standard deviation as a fraction of the box side.
        box_noise_max: cap of the jitter standard deviation, in model-input pixels (20 in the SAM recipe).
        seed: base seed of the box jitter, a non-negative integer.
        iou_resolution: ``"original"`` or ``"input"``.
        coordinate_mapping: ``"official"`` or ``"area"`` GT-pixel -> model-input coordinates.
        noc_thresholds: IoU thresholds of NoC / NoF.
        postprocess_chunk: masks upsampled at once (bounds the memory of full-resolution logits).
        max_masks_per_call: masks per decoder call; the masks of all images of a batch are decoded together in
            calls of at most this many (bounds the decoder's activation memory, ~10 MB per mask at 64x64).
    """

    protocols: tuple[str, ...] = PROTOCOLS
    num_clicks: int = 5
    first_click_multimask: bool = True
    later_clicks_multimask: bool = False
    feed_back_mask: bool = True
    box_noise_std_fraction: float = 0.1
    box_noise_max: float = 20.0
    seed: int = 0
    iou_resolution: IoUResolution = "original"
    coordinate_mapping: CoordinateMapping = "official"
    noc_thresholds: tuple[float, ...] = (0.85, 0.90)
    postprocess_chunk: int = 64
    max_masks_per_call: int = 128

    def __post_init__(self) -> None:
        protocols = tuple(self.protocols)
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise ValueError(f"protocols must be a non-empty subset of {list(PROTOCOLS)}, got {list(protocols)}")
        object.__setattr__(self, "protocols", tuple(p for p in PROTOCOLS if p in protocols))  # canonical order
        object.__setattr__(self, "noc_thresholds", check_noc_thresholds(self.noc_thresholds))
        if self.num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {self.num_clicks}")
        if self.iou_resolution not in ("original", "input"):
            raise ValueError(f"iou_resolution must be 'original' or 'input', got {self.iou_resolution!r}")
        if self.coordinate_mapping not in ("official", "area"):
            raise ValueError(f"coordinate_mapping must be 'official' or 'area', got {self.coordinate_mapping!r}")
        if not (self.box_noise_std_fraction >= 0 and self.box_noise_max >= 0):  # NaN too: it would jitter to NaN boxes
            raise ValueError(
                f"box noise must be >= 0, got std fraction {self.box_noise_std_fraction}, max {self.box_noise_max}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.postprocess_chunk < 1:
            raise ValueError(f"postprocess_chunk must be >= 1, got {self.postprocess_chunk}")
        if self.max_masks_per_call < 1:
            raise ValueError(f"max_masks_per_call must be >= 1, got {self.max_masks_per_call}")

    @property
    def click_rounds(self) -> int:
        """Decoder rounds of the click sequence: k with ``"clicks"``, 1 for ``"point"`` alone, else 0."""
        if "clicks" in self.protocols:
            return self.num_clicks
        return 1 if "point" in self.protocols else 0


@dataclass
class ImageTarget:
    """Ground truth of one image (or tile) for the protocols.

    Attributes:
        gt: ``[K, H, W]`` bool instance masks at the IoU resolution (the image's, or the model input's content).
        input_size: ``(h, w)`` of the image content in model-input pixels (before padding).
        key: sample index, seeds the box jitter (results do not depend on batching or order).
        ignore: ``[H, W]`` bool pixels that are neither object nor background (void), left out of every IoU and of
            the error regions that place clicks (RITM's ignore label); None for none.
    """

    gt: torch.Tensor
    input_size: tuple[int, int]
    key: int = 0
    ignore: torch.Tensor | None = None
    scale: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_masks(self.gt, "ImageTarget.gt")
        if self.ignore is not None and (self.ignore.dtype != torch.bool or self.ignore.shape != self.gt.shape[-2:]):
            raise ValueError(f"ImageTarget.ignore must be a bool tensor [H, W]={tuple(self.gt.shape[-2:])}, got "
                             f"{self.ignore.dtype} {tuple(self.ignore.shape)}")
        h, w = (int(v) for v in self.input_size)
        if h <= 0 or w <= 0:
            raise ValueError(f"ImageTarget.input_size must be positive (h, w), got {self.input_size}")
        self.input_size = (h, w)
        big_h, big_w = self.gt.shape[-2:]
        self.scale = torch.tensor([w / big_w, h / big_h], dtype=torch.float32)  # (sx, sy): input px per GT px


def sample_seed(seed: int, key: int) -> int:
    """A 63-bit seed for sample ``key`` under base ``seed`` (independent streams per sample)."""
    return int(np.random.SeedSequence([int(seed), int(key)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def points_to_input(
    xy: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, mapping: CoordinateMapping = "official"
) -> torch.Tensor:
    """GT pixel indices -> model-input pixel coordinates (see the module docstring).

    Args:
        xy: ``[K, 2]`` float ``(col, row)`` pixel indices at the GT resolution.
        labels: ``[K]`` point labels (padding points, label -1, come out as (0, 0)).
        scale: ``[2]`` ``(sx, sy)`` model-input pixels per GT pixel.
        mapping: ``"official"`` (``x * sx``) or ``"area"`` (``(x + 0.5) * sx - 0.5``).

    Returns:
        ``[K, 2]`` float.
    """
    s = scale.to(xy)
    mapped = xy * s if mapping == "official" else (xy + 0.5) * s - 0.5
    return torch.where((labels != PAD_LABEL)[:, None], mapped, torch.zeros_like(mapped))


def boxes_to_input(boxes: torch.Tensor, scale: torch.Tensor, mapping: CoordinateMapping = "official") -> torch.Tensor:
    """Inclusive GT-pixel boxes -> model-input pixels (see the module docstring).

    Args:
        boxes: ``[K, 4]`` ``(x0, y0, x1, y1)``, x1 / y1 the last column / row of the mask.
        scale: ``[2]`` ``(sx, sy)``.
        mapping: ``"official"`` (every corner times the scale) or ``"area"`` (the input pixels the box covers).

    Returns:
        ``[K, 4]`` float.
    """
    s = scale.to(boxes)
    lo = boxes[:, :2] * s
    if mapping == "official":
        return torch.cat((lo, boxes[:, 2:] * s), dim=1)
    hi = torch.maximum((boxes[:, 2:] + 1.0) * s - 1.0, lo)
    return torch.cat((lo, hi), dim=1)


def _pixels_in_boxes(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Number of True ``[H, W]`` pixels inside each inclusive ``[K, 4]`` ``(x0, y0, x1, y1)`` box (summed area
    table), float ``[K]``."""
    table = torch.nn.functional.pad(pixels.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    x0, y0, x1, y1 = boxes.long().unbind(1)
    return (table[y1 + 1, x1 + 1] - table[y0, x1 + 1] - table[y1 + 1, x0] + table[y0, x0]).to(boxes.dtype)


def _select(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[m, index[m]]`` for ``[M, C, ...]`` values, keeping a singleton channel: ``[M, 1, ...]``."""
    view = index.view(-1, 1, *([1] * (values.dim() - 2))).expand(-1, 1, *values.shape[2:])
    return values.gather(1, view)


def _decode(
    model: PromptableModel, embeddings: torch.Tensor, image_index: torch.Tensor, chunk: int, **prompts: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.decode`` over ``[M, ...]`` prompts in calls of at most ``chunk`` masks; outputs concatenated."""
    m = image_index.shape[0]
    if m <= chunk:
        return model.decode(embeddings, image_index, **prompts)
    flags = {k: v for k, v in prompts.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v for k, v in prompts.items() if isinstance(v, torch.Tensor)}
    logits, ious = [], []
    for s in range(0, m, chunk):
        part = {k: v[s : s + chunk] for k, v in tensors.items()}
        out_logits, out_iou = model.decode(embeddings, image_index[s : s + chunk], **part, **flags)
        logits.append(out_logits)
        ious.append(out_iou)
    return torch.cat(logits), torch.cat(ious)


class ProtocolRunner:
    """Runs the configured protocols on a batch of encoded images.

    Args:
        config: the :class:`ProtocolConfig`.
    """

    def __init__(self, config: ProtocolConfig = ProtocolConfig()) -> None:
        self.config = config

    # ------------------------------------------------------------------------------------------ geometry
    def _evaluate(
        self,
        model: PromptableModel,
        logits: torch.Tensor,
        targets: Sequence[ImageTarget],
        counts: list[int],
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """IoU of every output against its GT, at the GT resolution; optionally keep one output's masks.

        Args:
            model: gives ``image_size``.
            logits: ``[M, C, L, L]`` low-res logits of all masks of all targets (in target order).
            targets: the images.
            counts: masks per target.
            keep: ``[M]`` long, the output whose thresholded mask is returned per mask (None: none kept).

        Returns:
            ``[M, C]`` float IoUs (host) and, with ``keep``, one ``[K, H, W]`` bool tensor per target.
        """
        size = int(model.image_size)
        chunk = self.config.postprocess_chunk
        ious, kept = [], [] if keep is not None else None
        start = 0
        for target, count in zip(targets, counts):
            gt = target.gt
            h, w = target.input_size
            own = logits[start : start + count]
            own_keep = None if keep is None else keep[start : start + count]
            mine = None if keep is None else torch.empty(gt.shape, dtype=torch.bool, device=gt.device)
            parts = []
            for s in range(0, count, chunk):
                up = resize_logits(own[s : s + chunk].float(), size)[..., :h, :w]
                pred = resize_logits(up, tuple(gt.shape[-2:])) > 0  # [c, C, H, W]
                parts.append(mask_iou(pred, gt[s : s + chunk, None], target.ignore))
                if mine is not None and own_keep is not None:
                    mine[s : s + chunk] = _select(pred, own_keep[s : s + chunk])[:, 0]
            ious.append(torch.cat(parts) if parts else logits.new_zeros((0, logits.shape[1])))
            if kept is not None:
                kept.append(mine)
            start += count
        return torch.cat(ious).float().cpu(), kept

    # ------------------------------------------------------------------------------------------ protocols
    @torch.no_grad()
    def __call__(
        self, model: PromptableModel, image_embeddings: torch.Tensor, targets: Sequence[ImageTarget]
    ) -> dict[str, torch.Tensor]:
        """Evaluate every mask of every target.

        Args:
            model: ``decode`` (batched over images with ``image_index``) and ``image_size``.
            image_embeddings: ``[B, C, h, w]``, one per target.
            targets: B :class:`ImageTarget` (GT on the embeddings' device).

        Returns:
            Per-mask columns on the host, concatenated in target order (M masks), depending on the protocols:
            ``point_iou``, ``point_iou_pred``, ``point_iou_oracle``, ``point_iou_single`` ``[M]``;
            ``click_iou``, ``click_iou_pred`` ``[M, k]``; ``box_iou``, ``box_iou_pred``, ``box_as_mask_iou``
            ``[M]``; ``box_jitter_iou``, ``box_jitter_iou_pred`` ``[M]``; always ``area`` ``[M]`` (GT pixels).
        """
        if image_embeddings.shape[0] != len(targets):
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {len(targets)} targets")
        device = image_embeddings.device
        counts = [int(t.gt.shape[0]) for t in targets]
        image_index = torch.repeat_interleave(
            torch.arange(len(targets), device=device), torch.tensor(counts, device=device)
        )
        out: dict[str, torch.Tensor] = {
            "area": torch.cat([t.gt.flatten(1).sum(1).cpu() for t in targets]) if targets else torch.zeros(0)
        }
        if sum(counts) == 0:
            return out | self._empty_columns()
        if self.config.click_rounds:
            out.update(self._clicks(model, image_embeddings, image_index, targets, counts))
        if "box" in self.config.protocols or "box_jitter" in self.config.protocols:
            out.update(self._boxes(model, image_embeddings, image_index, targets, counts))
        return out

    def _empty_columns(self) -> dict[str, torch.Tensor]:
        cfg, out = self.config, {}
        if "point" in cfg.protocols:
            keys = ("point_iou", "point_iou_pred", "point_iou_oracle", "point_iou_single")
            out.update({k: torch.zeros(0) for k in keys})
        if "clicks" in cfg.protocols:
            out.update({k: torch.zeros(0, cfg.num_clicks) for k in ("click_iou", "click_iou_pred")})
        if "box" in cfg.protocols:
            out.update({k: torch.zeros(0) for k in ("box_iou", "box_iou_pred", "box_as_mask_iou")})
        if "box_jitter" in cfg.protocols:
            out.update({k: torch.zeros(0) for k in ("box_jitter_iou", "box_jitter_iou_pred")})
        return out

    def _click_tokens(
        self, per_target: list[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[ImageTarget]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target ``(GT-pixel xy, labels)`` -> ``[M, 2]`` model-input coordinates and ``[M]`` labels."""
        mapping = self.config.coordinate_mapping
        coords = [
            points_to_input(xy.float(), lab, t.scale.to(xy.device), mapping)
            for (xy, lab), t in zip(per_target, targets)
        ]
        return torch.cat(coords), torch.cat([lab for _, lab in per_target])

    def _clicks(
        self,
        model: PromptableModel,
        embeddings: torch.Tensor,
        image_index: torch.Tensor,
        targets: Sequence[ImageTarget],
        counts: list[int],
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        firsts = [region_centers(t.gt) for t in targets]  # GT-pixel (col, row) and labels, per target
        clicked = None  # per target [K, H, W]: pixels clicked so far, never clicked again (RITM's not_clicked_map)
        if cfg.click_rounds > 1:
            clicked = [mark_clicked(torch.zeros_like(t.gt), *first) for t, first in zip(targets, firsts)]
        xy, label = self._click_tokens(firsts, targets)
        coords, labels = xy[:, None], label[:, None]
        out: dict[str, torch.Tensor] = {}
        ious, preds = [], []
        selected: torch.Tensor | None = None
        masks: list[torch.Tensor] | None = None
        for click in range(cfg.click_rounds):
            if click == 0:
                logits, iou_pred = _decode(
                    model, embeddings, image_index, cfg.max_masks_per_call, point_coords=coords, point_labels=labels,
                    multimask_output=True, return_all_tokens=True,
                )  # [M, 4, L, L]: token 0 single-mask, 1..3 multimask
                if cfg.first_click_multimask:
                    best = iou_pred[:, 1:].argmax(dim=1) + 1
                else:
                    best = torch.zeros(iou_pred.shape[0], dtype=torch.long, device=iou_pred.device)
                if "point" in cfg.protocols:
                    all_ious, masks = self._evaluate(model, logits, targets, counts, keep=best)
                    round_iou = all_ious.gather(1, best.cpu()[:, None])[:, 0]
                    out["point_iou"] = round_iou
                    out["point_iou_oracle"] = all_ious[:, 1:].max(dim=1).values
                    out["point_iou_single"] = all_ious[:, 0]
                    out["point_iou_pred"] = _select(iou_pred, best)[:, 0].float().cpu()
                    selected = _select(logits, best)
                else:
                    selected = _select(logits, best)
                    sel_ious, masks = self._evaluate(model, selected, targets, counts, keep=torch.zeros_like(best))
                    round_iou = sel_ious[:, 0]
            else:
                assert masks is not None and selected is not None and clicked is not None
                points = [
                    largest_error_points(pred, t.gt, clicked=done, ignore=t.ignore)
                    for pred, t, done in zip(masks, targets, clicked)
                ]
                for done, point in zip(clicked, points):
                    mark_clicked(done, *point)
                xy, label = self._click_tokens(points, targets)
                coords = torch.cat((coords, xy[:, None]), dim=1)
                labels = torch.cat((labels, label[:, None]), dim=1)
                feedback = {"mask_inputs": selected} if cfg.feed_back_mask else {}
                logits, iou_pred = _decode(
                    model, embeddings, image_index, cfg.max_masks_per_call, point_coords=coords, point_labels=labels,
                    multimask_output=cfg.later_clicks_multimask, **feedback,
                )
                best = iou_pred.argmax(dim=1)
                selected = _select(logits, best)
                sel_ious, masks = self._evaluate(model, selected, targets, counts, keep=torch.zeros_like(best))
                round_iou = sel_ious[:, 0]
            ious.append(round_iou)
            preds.append(_select(iou_pred, best)[:, 0].float().cpu())
        if "clicks" in cfg.protocols:
            out["click_iou"] = torch.stack(ious, dim=1)
            out["click_iou_pred"] = torch.stack(preds, dim=1)
        return out

    def _boxes(
        self,
        model: PromptableModel,
        embeddings: torch.Tensor,
        image_index: torch.Tensor,
        targets: Sequence[ImageTarget],
        counts: list[int],
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        exact, found, box_area = [], [], []
        for t in targets:
            boxes, ok = mask_boxes(t.gt)  # inclusive GT-pixel boxes
            area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
            if t.ignore is not None:  # the filled box scored like a prediction: its void pixels do not count
                area = area - _pixels_in_boxes(t.ignore, boxes)
            box_area.append(area.cpu())
            exact.append(boxes_to_input(boxes, t.scale.to(boxes.device), cfg.coordinate_mapping))
            found.append(ok)
        boxes, found_all = torch.cat(exact), torch.cat(found)
        out: dict[str, torch.Tensor] = {}
        if "box" in cfg.protocols:
            iou, pred = self._box_round(model, embeddings, image_index, boxes, found_all, targets, counts)
            # the GT's void pixels do not count either (as in mask_iou): else the ratio may exceed 1
            area = torch.cat([(t.gt if t.ignore is None else t.gt & ~t.ignore).flatten(1).sum(1).cpu()
                              for t in targets]).float()
            baseline = torch.where(found_all.cpu(), area / torch.cat(box_area).clamp_min(1.0), torch.ones_like(area))
            out.update(box_iou=iou, box_iou_pred=pred, box_as_mask_iou=baseline)
        if "box_jitter" in cfg.protocols:
            noisy = []
            for b, t in zip(exact, targets):
                generator = torch.Generator().manual_seed(sample_seed(cfg.seed, t.key))
                sizes = torch.tensor([t.input_size], dtype=torch.float32).expand(b.shape[0], 2)
                noisy.append(
                    jitter_boxes(b.cpu(), generator, sizes, cfg.box_noise_std_fraction, cfg.box_noise_max).to(b.device)
                )
            iou, pred = self._box_round(model, embeddings, image_index, torch.cat(noisy), found_all, targets, counts)
            out.update(box_jitter_iou=iou, box_jitter_iou_pred=pred)
        return out

    def _box_round(
        self,
        model: PromptableModel,
        embeddings: torch.Tensor,
        image_index: torch.Tensor,
        boxes: torch.Tensor,
        found: torch.Tensor,
        targets: Sequence[ImageTarget],
        counts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One single-mask decoder call for ``[M, 4]`` boxes; IoUs ``[M]`` and predicted IoUs ``[M]``."""
        boxes = torch.where(found[:, None], boxes, torch.zeros_like(boxes))
        chunk = self.config.max_masks_per_call
        logits, iou_pred = _decode(model, embeddings, image_index, chunk, boxes=boxes, multimask_output=False)
        ious, _ = self._evaluate(model, logits[:, :1], targets, counts)
        return ious[:, 0], iou_pred[:, 0].float().cpu()
