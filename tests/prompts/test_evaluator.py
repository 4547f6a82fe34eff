"""InteractiveEvaluator: deterministic clicks, feedback, IoU per round at the GT resolution."""
from __future__ import annotations

import pytest
import torch

from samtune.prompts import InteractiveEvaluator


class ScriptedSam(torch.nn.Module):
    """Returns pre-scripted outputs call after call and records the prompts it received."""

    def __init__(self, outputs: list[tuple[torch.Tensor, torch.Tensor]], image_size: int, low_res_size: int) -> None:
        super().__init__()
        self.outputs = list(outputs)
        self.image_size = image_size
        self.low_res_size = low_res_size
        self.calls: list[dict] = []

    def decode(self, image_embeddings, image_index, point_coords=None, point_labels=None, boxes=None,
               mask_inputs=None, multimask_output=True, return_all_tokens=False, pad_points=None):
        assert pad_points is False, "the evaluator sends its own padding token"
        self.calls.append({"coords": point_coords.clone(), "labels": point_labels.clone(),
                           "mask_inputs": mask_inputs, "multimask_output": multimask_output})
        logits, iou = self.outputs.pop(0)
        assert logits.shape[1] == (3 if multimask_output else 1)
        return logits, iou


def _logits(region: torch.Tensor) -> torch.Tensor:
    return torch.where(region, 5.0, -5.0)


def test_scripted_rounds_hand_values() -> None:
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, 2:6, 2:6] = True
    half = torch.zeros(8, 8, dtype=torch.bool)
    half[2:6, 2:4] = True
    perfect = _logits(gt[0])
    outputs = [
        (torch.stack((_logits(half), perfect, -perfect))[None], torch.tensor([[0.9, 0.1, 0.2]])),  # keeps token 0
        (perfect[None, None], torch.tensor([[0.8]])),
        (perfect[None, None], torch.tensor([[0.95]])),
        (_logits(half)[None, None], torch.tensor([[0.7]])),  # box round
    ]
    model = ScriptedSam(outputs, image_size=8, low_res_size=8)
    result = InteractiveEvaluator(num_clicks=3)(model, torch.zeros(1, 4, 2, 2), torch.tensor([0]), gt)
    assert result.click_ious.tolist() == [[0.5, 1.0, 1.0]]
    assert result.click_iou_pred.tolist() == [[pytest.approx(0.9), pytest.approx(0.8), pytest.approx(0.95)]]
    assert result.box_ious.tolist() == [0.5] and result.box_iou_pred.tolist() == [pytest.approx(0.7)]
    c = model.calls
    # Click 1: centre of the 4x4 block (first of the four pixels at distance 2), plus a padding token.
    assert c[0]["coords"].tolist() == [[[3.0, 3.0], [0.0, 0.0]]] and c[0]["labels"].tolist() == [[1, -1]]
    assert c[0]["multimask_output"] and c[0]["mask_inputs"] is None
    # Click 2: the false-negative columns 4..5 -> first pixel of maximal distance (row 2, col 4), positive.
    assert c[1]["coords"][0, -1].tolist() == [4.0, 2.0] and c[1]["labels"].tolist() == [[1, -1, 1]]
    assert not c[1]["multimask_output"] and torch.equal(c[1]["mask_inputs"][0, 0], _logits(half))
    # Click 3: the prediction is exact -> padding click.
    assert c[2]["labels"].tolist() == [[1, -1, 1, -1]] and c[2]["coords"][0, -1].tolist() == [0.0, 0.0]
    assert torch.equal(c[2]["mask_inputs"][0, 0], perfect)
    # Box round: the exact GT box as two corner tokens.
    assert c[3]["coords"].tolist() == [[[2.0, 2.0], [5.0, 5.0]]] and c[3]["labels"].tolist() == [[2, 3]]
    assert not c[3]["multimask_output"] and c[3]["mask_inputs"] is None


def test_iou_at_gt_resolution_with_upsampled_logits() -> None:
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[0, :, :10] = True
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True  # upsampled bilinearly: exactly columns 0..7 of 16
    out = [(_logits(left)[None, None], torch.tensor([[0.5]]))]
    model = ScriptedSam(out, image_size=32, low_res_size=8)
    result = InteractiveEvaluator(num_clicks=1, evaluate_box=False, multimask_first_click=False)(
        model, torch.zeros(1, 4, 2, 2), torch.tensor([0]), gt
    )
    assert result.click_ious.tolist() == [[pytest.approx(8 / 10)]]
    assert result.box_ious is None
    # The first click is in model-input pixels (scale 2): centre of the 16x10 block.
    x, y = model.calls[0]["coords"][0, 0].tolist()
    assert gt[0, int((y + 0.5) / 2), int((x + 0.5) / 2)]


def test_with_fake_model_shapes_and_no_grad(fake_sam, embeddings) -> None:
    gt = torch.zeros(4, 64, 64, dtype=torch.bool)
    gt[0, 5:40, 10:30] = True
    gt[1, 50:64, 0:64] = True
    gt[2, 30, 30] = True  # one pixel; mask 3 empty
    result = InteractiveEvaluator(num_clicks=4)(fake_sam, embeddings, torch.tensor([0, 0, 1, 1]), gt)
    assert result.click_ious.shape == (4, 4) and result.click_iou_pred.shape == (4, 4)
    assert torch.isfinite(result.click_ious).all() and (result.click_ious >= 0).all() and (result.click_ious <= 1).all()
    assert not result.click_ious.requires_grad and not result.click_iou_pred.requires_grad
    assert result.box_ious.shape == (4,)
    assert [c["point_labels"].shape[1] for c in fake_sam.calls] == [2, 3, 4, 5, 2]
    empty = InteractiveEvaluator(num_clicks=2)(fake_sam, embeddings, torch.zeros(0, dtype=torch.long), gt[:0])
    assert empty.click_ious.shape == (0, 2)
    with pytest.raises(ValueError, match="num_clicks"):
        InteractiveEvaluator(num_clicks=0)


def test_image_sizes_exclude_the_padding() -> None:
    """A prediction spilling into the padding (right of column 6) neither lowers the IoU nor draws a click there."""
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, 2:6, 2:6] = True
    spill = gt[0].clone()
    spill[2:6, 6:8] = True  # columns 6..7 are padding for an image of width 6
    outputs = [(_logits(spill)[None, None], torch.tensor([[0.9]])), (_logits(spill)[None, None], torch.tensor([[0.9]]))]
    model = ScriptedSam(list(outputs), image_size=8, low_res_size=8)
    result = InteractiveEvaluator(num_clicks=2, evaluate_box=False, multimask_first_click=False)(
        model, torch.zeros(1, 4, 2, 2), torch.tensor([0]), gt, image_sizes=torch.tensor([[8, 6]])
    )
    assert result.click_ious.tolist() == [[1.0, 1.0]]
    assert model.calls[1]["labels"].tolist() == [[1, -1, -1]]  # no error left inside the image: padding click
    plain = ScriptedSam(list(outputs), image_size=8, low_res_size=8)
    without = InteractiveEvaluator(num_clicks=2, evaluate_box=False, multimask_first_click=False)(
        plain, torch.zeros(1, 4, 2, 2), torch.tensor([0]), gt
    )
    assert without.click_ious[0, 0].item() == pytest.approx(16 / 24)
    with pytest.raises(ValueError, match="image_sizes"):
        InteractiveEvaluator(num_clicks=1)(model, torch.zeros(1, 4, 2, 2), torch.tensor([0]), gt,
                                           image_sizes=torch.tensor([8, 6]))


def test_prompts_reach_the_decoder_in_the_official_token_layout() -> None:
    """A box is ``[tl, br]`` and a first click ``[p, pad]``, as segment_anything's predictor sends them: the
    evaluator's outputs equal decoding the same prompts through the official-style ``boxes=`` / padded points."""
    from samtune.build import build_sam

    torch.manual_seed(0)
    model = build_sam("sam_tiny").eval()
    gt = torch.zeros(2, 64, 64, dtype=torch.bool)
    gt[0, 10:30, 12:40] = True
    gt[1, 35:60, 5:20] = True
    embeddings = torch.randn(1, model.prompt_encoder.embed_dim, *model.prompt_encoder.image_embedding_size)
    index = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        result = InteractiveEvaluator(num_clicks=1, evaluate_box=True)(model, embeddings, index, gt)
        scale = model.image_size / 64
        from samtune.prompts import mask_boxes, mask_iou, region_centers, resize_logits

        boxes, _ = mask_boxes(gt, scale)
        logits, _ = model.decode(embeddings, index, boxes=boxes, multimask_output=False)  # official: no padding
        expected_box = mask_iou(resize_logits(logits[:, :1], (64, 64))[:, 0] > 0, gt)
        xy, label = region_centers(gt, scale)
        logits, iou = model.decode(embeddings, index, point_coords=xy[:, None], point_labels=label[:, None])
        best = logits.gather(1, iou.argmax(1)[:, None, None, None].expand(-1, 1, *logits.shape[-2:]))
        expected_click = mask_iou(resize_logits(best, (64, 64))[:, 0] > 0, gt)
    torch.testing.assert_close(result.box_ious, expected_box)
    torch.testing.assert_close(result.click_ious[:, 0], expected_click)


def test_a_click_that_does_not_flip_its_pixel_is_not_repeated() -> None:
    """The model ignores click 2 (same output): click 3 goes to another pixel of the same error region."""
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, 2:6, 2:6] = True
    half = torch.zeros(8, 8, dtype=torch.bool)
    half[2:6, 2:4] = True
    stuck = (_logits(half)[None, None], torch.tensor([[0.5]]))
    outputs = [(_logits(half)[None, None].expand(-1, 3, -1, -1), torch.tensor([[0.9, 0.1, 0.2]])), stuck, stuck]
    model = ScriptedSam(outputs, image_size=16, low_res_size=8)  # 2 model-input pixels per mask pixel
    InteractiveEvaluator(num_clicks=3, evaluate_box=False)(model, torch.zeros(1, 4, 2, 2), torch.tensor([0]), gt)
    clicks = model.calls[-1]["coords"][0, 2:].tolist()
    # The false negatives (columns 4..5) are all at distance 1: the first two in raster order, (2, 4) and (2, 5).
    assert clicks == [[4.5 * 2 - 0.5, 2.5 * 2 - 0.5], [5.5 * 2 - 0.5, 2.5 * 2 - 0.5]]
