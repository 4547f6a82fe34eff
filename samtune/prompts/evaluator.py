"""Deterministic interactive evaluation: k click rounds (and a box round) through the batched decoder.

Click 1 is the centre of the ground-truth mask (the pixel farthest from its boundary); every next click is the
centre of the largest error region of the previous prediction, positive on a false negative and negative on a
false positive, never on a pixel clicked before. The previous round's logits are fed back as the mask prompt. The
token layout matches training: ``[click 1, padding]`` then one more token per click. At click 1 the three
multimask outputs are produced and the one with the highest predicted IoU is kept (``multimask_first_click=True``);
later rounds use the single-mask output. IoUs are computed at the resolution of the ground-truth masks given (the
logits are bilinearly resized to it and thresholded at 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from samtune.prompts.deterministic import largest_error_points, mark_clicked, region_centers
from samtune.prompts.geometry import check_masks, content_region, mask_iou, mask_scale, resize_logits
from samtune.prompts.sampling import BOX_BOTTOM_RIGHT_LABEL, BOX_TOP_LEFT_LABEL, PAD_LABEL, mask_boxes
from samtune.prompts.simulator import PromptableModel


@dataclass
class EvaluationResult:
    """IoUs of one evaluation batch.

    Attributes:
        click_ious: ``[M, k]`` IoU with the ground truth after clicks 1..k.
        click_iou_pred: ``[M, k]`` the model's predicted IoU of those masks.
        box_ious: ``[M]`` IoU after the exact ground-truth box alone, or None when not evaluated.
        box_iou_pred: ``[M]`` predicted IoU of the box round, or None.
    """

    click_ious: torch.Tensor
    click_iou_pred: torch.Tensor
    box_ious: torch.Tensor | None = None
    box_iou_pred: torch.Tensor | None = None


def _select(logits: torch.Tensor, iou_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest-predicted-IoU output: ``[M, 1, h, w]`` logits and ``[M]`` predicted IoU."""
    best = iou_pred.argmax(dim=1)
    chosen = logits.gather(1, best[:, None, None, None].expand(-1, 1, *logits.shape[-2:]))
    return chosen, iou_pred.gather(1, best[:, None])[:, 0]


class InteractiveEvaluator:
    """Runs deterministic click rounds (and optionally one box round) and reports IoU per round.

    Args:
        num_clicks: k, the number of click rounds.
        evaluate_box: also run one round prompted by the exact ground-truth box.
        multimask_first_click: produce three masks at click 1 and keep the highest predicted IoU.
        feed_back_mask: feed the previous round's logits back as the mask prompt.
    """

    def __init__(
        self,
        num_clicks: int = 10,
        evaluate_box: bool = True,
        multimask_first_click: bool = True,
        feed_back_mask: bool = True,
    ) -> None:
        if num_clicks < 1:
            raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
        self.num_clicks = num_clicks
        self.evaluate_box = evaluate_box
        self.multimask_first_click = multimask_first_click
        self.feed_back_mask = feed_back_mask

    @torch.no_grad()
    def __call__(
        self,
        model: PromptableModel,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        gt_masks: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        ignore_masks: torch.Tensor | None = None,
    ) -> EvaluationResult:
        """Evaluate all masks of all images in batched decoder calls.

        Args:
            model: the model (``decode``, ``image_size``).
            image_embeddings: ``[B, C, h, w]``.
            image_index: ``[M]`` long, the image of each mask.
            gt_masks: ``[M, S, S]`` bool masks on the padded model-input canvas; IoUs are computed at S x S.
            image_sizes: optional ``[M, 2]`` ``(h, w)`` of each mask's unpadded image in model-input pixels;
                predictions are cut to it, so the padding counts neither in the IoUs nor as an error region
                (default: the whole canvas).
            ignore_masks: optional ``[M, S, S]`` bool void pixels of each mask's image (neither object nor
                background, e.g. ``ignore_values``): left out of the IoUs and of the error regions that place clicks,
                as in ``samtune evaluate``.

        Returns:
            The :class:`EvaluationResult`.
        """
        check_masks(gt_masks, "gt_masks")
        m = gt_masks.shape[0]
        if image_index.shape != (m,) or image_index.dtype != torch.long:
            raise ValueError(
                f"image_index must be a long tensor [M]={m}, got {image_index.dtype} {tuple(image_index.shape)}"
            )
        size = gt_masks.shape[-2:]
        scale = mask_scale(gt_masks, int(model.image_size), "gt_masks")
        region = content_region(image_sizes, m, size, scale, gt_masks.device)
        if ignore_masks is not None:
            if ignore_masks.shape != gt_masks.shape or ignore_masks.dtype != torch.bool:
                raise ValueError(f"ignore_masks must be bool {tuple(gt_masks.shape)} like gt_masks, got "
                                 f"{ignore_masks.dtype} {tuple(ignore_masks.shape)}")

        xy, label = region_centers(gt_masks, scale)
        clicked = mark_clicked(torch.zeros_like(gt_masks), xy, label, scale)  # never clicked twice (RITM)
        coords = torch.stack((xy, torch.zeros_like(xy)), dim=1)  # [M, 2, 2]: click 1, padding
        labels = torch.stack((label, torch.full_like(label, PAD_LABEL)), dim=1)
        mask_inputs: torch.Tensor | None = None
        ious, preds = [], []
        for click in range(self.num_clicks):
            if click > 0:
                pred = (resize_logits(selected, size)[:, 0] > 0) & region
                xy, label = largest_error_points(pred, gt_masks, scale, clicked=clicked, ignore=ignore_masks)
                mark_clicked(clicked, xy, label, scale)
                coords = torch.cat((coords, xy[:, None]), dim=1)
                labels = torch.cat((labels, label[:, None]), dim=1)
                mask_inputs = selected if self.feed_back_mask else None
            multimask = click == 0 and self.multimask_first_click
            logits, iou_pred = model.decode(
                image_embeddings, image_index, point_coords=coords, point_labels=labels,
                mask_inputs=mask_inputs, multimask_output=multimask, pad_points=False,
            )
            selected, predicted = _select(logits, iou_pred)
            ious.append(mask_iou((resize_logits(selected, size)[:, 0] > 0) & region, gt_masks, ignore_masks))
            preds.append(predicted.float())
        result = EvaluationResult(torch.stack(ious, dim=1), torch.stack(preds, dim=1))

        if self.evaluate_box:
            boxes, found = mask_boxes(gt_masks, scale)
            box_labels = torch.where(
                found[:, None], torch.tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], device=gt_masks.device),
                PAD_LABEL,
            ).long()
            logits, iou_pred = model.decode(
                image_embeddings, image_index, point_coords=boxes.view(m, 2, 2), point_labels=box_labels,
                multimask_output=False, pad_points=False,
            )
            result.box_ious = mask_iou((resize_logits(logits[:, :1], size)[:, 0] > 0) & region, gt_masks,
                                       ignore_masks)
            result.box_iou_pred = iou_pred[:, 0].float()
        return result
