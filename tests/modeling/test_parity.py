"""Parity with the official segment_anything implementation, through the full predictor path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune import Predictor, build_sam
from samtune.checkpoints import save_checkpoint

from .reference import build_reference, randomize_, make_image

TOL = 1e-4


def _pair(name: str, tmp_path):
    """Official model with random weights, and samtune's model loaded from the official-format file."""
    from segment_anything import SamPredictor

    ref = randomize_(build_reference(name))
    path = tmp_path / "official.pth"
    torch.save(ref.state_dict(), path)
    ours = build_sam(name, checkpoint=path)
    return SamPredictor(ref), Predictor(ours, precision="fp32")


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


PROMPTS = {
    "one_point": dict(point_coords=np.array([[110.0, 100.0]]), point_labels=np.array([1]), multimask_output=True),
    "points": dict(
        point_coords=np.array([[110.0, 100.0], [30.0, 250.0], [200.0, 40.0], [150.0, 150.0]]),
        point_labels=np.array([1, 0, 0, 1]),
        multimask_output=False,
    ),
    "box": dict(box=np.array([60.0, 70.0, 160.0, 160.0]), multimask_output=False),
    "box_point": dict(
        point_coords=np.array([[100.0, 110.0]]), point_labels=np.array([0]), box=np.array([60.0, 70.0, 160.0, 160.0]),
        multimask_output=True,
    ),
}


def _check_predictor_parity(ref_pred, our_pred, image) -> None:
    ref_pred.set_image(image)
    our_pred.set_image(image)
    assert our_pred.input_size == ref_pred.input_size and our_pred.original_size == ref_pred.original_size
    emb_diff = _max_diff(ref_pred.get_image_embedding(), our_pred.get_image_embedding())
    assert emb_diff <= TOL, f"image embeddings differ by {emb_diff}"
    for name, kwargs in PROMPTS.items():
        ref_logits, ref_iou, ref_low = ref_pred.predict(**kwargs, return_logits=True)
        our_logits, our_iou, our_low = our_pred.predict(**kwargs, return_logits=True)
        assert our_logits.shape == ref_logits.shape, name
        for what, a, b in (("masks", ref_logits, our_logits), ("iou", ref_iou, our_iou), ("low_res", ref_low, our_low)):
            diff = _max_diff(a, b)
            assert diff <= TOL, f"{name}: {what} differ by {diff}"
        ref_masks, _, _ = ref_pred.predict(**kwargs)
        our_masks, _, _ = our_pred.predict(**kwargs)
        assert our_masks.dtype == ref_masks.dtype == np.bool_
        # Boolean masks agree except where the logit is within float noise of the threshold.
        flips = ref_masks != our_masks
        assert np.all(np.abs(ref_logits[flips]) <= TOL), name
    # Fed-back mask input (the previous round's best low-res logits) plus a new point.
    _, iou, low = ref_pred.predict(**PROMPTS["one_point"])
    mask_input = low[np.argmax(iou)][None]
    kwargs = dict(
        point_coords=np.array([[110.0, 100.0], [40.0, 60.0]]), point_labels=np.array([1, 0]),
        mask_input=mask_input, multimask_output=False, return_logits=True,
    )
    for a, b in zip(ref_pred.predict(**kwargs), our_pred.predict(**kwargs)):
        assert _max_diff(a, b) <= TOL, "mask input"


def test_predictor_parity_tiny(tmp_path):
    ref_pred, our_pred = _pair("sam_tiny", tmp_path)
    _check_predictor_parity(ref_pred, our_pred, make_image())


def test_predict_torch_batched_parity(tmp_path):
    """Batched prompts through predict_torch (the official batch-of-boxes path)."""
    ref_pred, our_pred = _pair("sam_tiny", tmp_path)
    image = make_image(200, 320)
    ref_pred.set_image(image)
    our_pred.set_image(image)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 50.0, 300.0, 190.0], [0.0, 0.0, 319.0, 199.0]])
    boxes = ref_pred.transform.apply_boxes_torch(boxes, image.shape[:2])
    for a, b in zip(
        ref_pred.predict_torch(None, None, boxes=boxes, multimask_output=True, return_logits=True),
        our_pred.predict_torch(None, None, boxes=boxes, multimask_output=True, return_logits=True),
    ):
        assert (a - b).abs().max() <= TOL


@pytest.mark.slow
def test_predictor_parity_vit_b(tmp_path):
    """Full-size ViT-B at 1024 (about a minute on 2 CPU cores)."""
    ref_pred, our_pred = _pair("sam_vit_b", tmp_path)
    _check_predictor_parity(ref_pred, our_pred, make_image(480, 640))


def test_round_trip_official_samtune_official(tmp_path):
    ref = randomize_(build_reference("sam_tiny"))
    src = tmp_path / "official.pth"
    torch.save(ref.state_dict(), src)
    ours = build_sam("sam_tiny", checkpoint=src)
    out = save_checkpoint(ours, tmp_path / "samtune.pth")
    back = build_reference("sam_tiny")
    back.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert ref_sd.keys() == back_sd.keys()
    for key in ref_sd:
        assert torch.equal(ref_sd[key], back_sd[key]), key


def test_official_registry_loads_samtune_vit_b(tmp_path):
    """segment_anything.sam_model_registry['vit_b'] strictly loads a samtune-written ViT-B file."""
    from segment_anything import sam_model_registry

    ours = build_sam("sam_vit_b")
    path = save_checkpoint(ours, tmp_path / "sam_vit_b_samtune.pth")
    official = sam_model_registry["vit_b"](checkpoint=str(path))  # load_state_dict(strict=True) inside
    assert len(official.state_dict()) == len(ours.state_dict()) == 314  # as DESIGN.md states for vit_b (PE buffer included)
    for key, value in official.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
