"""samtune.Predictor: the documented behaviours of the drop-in SamPredictor (errors included)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from samtune import Predictor, Sam, build_sam
from samtune.checkpoints import read_state_dict, save_checkpoint

from ..modeling.reference import make_image

H, W = 300, 220  # non-square image, so resizing and cropping matter


@pytest.fixture(scope="module")
def model() -> Sam:
    """sam_tiny with non-trivial weights everywhere (fresh init zero-fills the position tables)."""
    sam = build_sam("sam_tiny")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return sam.eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_image(H, W)


@pytest.fixture(scope="module")
def predictor(model, image) -> Predictor:
    pred = Predictor(model, precision="fp32")
    pred.set_image(image)
    return pred


def test_predict_before_set_image(model):
    pred = Predictor(model, precision="fp32")
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match="set_image"):
        pred.get_image_embedding()


def test_set_torch_image_takes_one_image(model):
    pred = Predictor(model, precision="fp32")
    size = model.image_size
    with pytest.raises(ValueError, match=r"expects \[1, 3, h, w\] .* got \(2, 3, .*one image at a time"):
        pred.set_torch_image(torch.zeros(2, 3, size, size), (size, size))
    assert not pred.is_image_set
    pred.set_torch_image(torch.zeros(1, 3, size, size // 2), (2 * size, size))
    assert pred.features.shape[0] == 1 and pred.input_size == (size, size // 2)


def test_no_prompt_is_an_error(predictor):
    with pytest.raises(ValueError, match="no prompt"):
        predictor.predict()
    with pytest.raises(ValueError, match="no prompt"):
        predictor.predict_torch(None, None)


def test_points_and_boxes_outside_the_image(predictor):
    # (y, x) swapped by mistake: x=290 is beyond the width 220.
    with pytest.raises(ValueError, match=r"point_coords outside the 220x300 .*\[\[290\.0, 40\.0\]\]"):
        predictor.predict(point_coords=np.array([[50.0, 60.0], [290.0, 40.0]]), point_labels=np.array([1, 1]))
    with pytest.raises(ValueError, match=r"point_coords outside .*\[\[-3\.0, 10\.0\]\]"):
        predictor.predict(point_coords=np.array([[-3.0, 10.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match=r"box outside the 220x300 .*\[\[200\.0, 350\.0\]\]"):
        predictor.predict(box=np.array([10.0, 20.0, 200.0, 350.0]))  # bottom-right corner below the image
    with pytest.raises(ValueError, match=r"boxes outside the model input frame \[0, 256\]"):
        predictor.predict_torch(None, None, boxes=torch.tensor([[0.0, 0.0, 300.0, 100.0]]))


def test_box_outside_names_the_corner(predictor):
    with pytest.raises(ValueError) as info:
        predictor.predict(box=np.array([10.0, 20.0, 230.0, 100.0]))
    assert "230.0" in str(info.value) and "(x, y)" in str(info.value)


def test_points_and_labels_must_match(predictor):
    with pytest.raises(ValueError, match="point_labels must be supplied"):
        predictor.predict(point_coords=np.array([[10.0, 10.0]]))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        predictor.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1, 0]))


def test_labels_without_points_are_an_error(predictor, model):
    """point_labels without point_coords used to be dropped silently: the box alone was decoded."""
    box = np.array([20.0, 30.0, 150.0, 200.0])
    with pytest.raises(ValueError, match="point_coords must be supplied with point_labels"):
        predictor.predict(point_labels=np.array([1]), box=box)
    boxes = torch.as_tensor(predictor.transform.apply_boxes(box, predictor.original_size), dtype=torch.float)
    with pytest.raises(ValueError, match="point_coords must be supplied with point_labels"):
        predictor.predict_torch(None, torch.ones(1, 1, dtype=torch.int), boxes)


def test_prompts_the_model_cannot_take_are_named(predictor):
    """Bad shapes, batch sizes, labels, NaN and mask inputs: a ValueError naming the argument (they used to fail
    deep inside torch, or to give NaN IoUs or another prompt silently)."""
    point, label = np.array([[50.0, 60.0]]), np.array([1])
    low = predictor.model.low_res_size
    for bad in (np.zeros((low, low)), np.zeros((3, low, low)), np.zeros((1, 1, low, low)), np.zeros((1, 256, 256))):
        with pytest.raises(ValueError, match=rf"mask_input must be \[1, {low}, {low}\].*got {re.escape(str(bad.shape))}"):
            predictor.predict(point_coords=point, point_labels=label, mask_input=bad)
    with pytest.raises(ValueError, match=r"point_coords must be finite, got \[\[nan, 60.0\]\]"):
        predictor.predict(point_coords=np.array([[np.nan, 60.0]]), point_labels=label)
    with pytest.raises(ValueError, match="box must be finite"):
        predictor.predict(box=np.array([np.nan, 0.0, 10.0, 10.0]))
    with pytest.raises(ValueError, match=r"point_labels must be -1 .* got \[5\]"):
        predictor.predict(point_coords=point, point_labels=np.array([5]))
    coords = torch.full((2, 1, 2), 30.0)
    with pytest.raises(ValueError, match=r"same batch size B, got \{'point_coords': 2, 'boxes': 3\}"):
        predictor.predict_torch(coords, torch.ones(2, 1), boxes=torch.tensor([[0.0, 0.0, 50.0, 50.0]] * 3))
    with pytest.raises(ValueError, match=r"point_labels must be \[B, N\] = \(2, 1\) like point_coords, got \(2, 3\)"):
        predictor.predict_torch(coords, torch.ones(2, 3))
    with pytest.raises(ValueError, match=rf"mask_input must be \[B, 1, {low}, {low}\]"):
        predictor.predict_torch(coords, torch.ones(2, 1), mask_input=torch.zeros(2, low, low))
    with pytest.raises(ValueError, match=r"boxes must be \[B, 4\] xyxy \(or \[B, 1, 4\]\), got \(2, 2, 4\)"):
        predictor.predict_torch(None, None, boxes=torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="boxes must be finite"):
        predictor.predict_torch(None, None, boxes=torch.tensor([[0.0, float("inf"), 5.0, 5.0]]))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((H, W, 3), dtype=np.float32), "uint8"),
        (np.zeros((H, W, 3), dtype=np.uint16), "uint8"),
        (np.zeros((H, W, 4), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((3, H, W), dtype=np.uint8), r"\[H, W, 3\]"),
        (np.zeros((1, H, W, 3), dtype=np.uint8), r"\[H, W, 3\]"),
    ],
    ids=["float32", "uint16", "rgba", "channels_first", "batched"],
)
def test_bad_images(model, bad, match):
    pred = Predictor(model, precision="fp32")
    with pytest.raises(ValueError, match=match) as info:
        pred.set_image(bad)
    assert str(bad.shape) in str(info.value) or str(bad.dtype) in str(info.value)
    assert not pred.is_image_set
    with pytest.raises(ValueError, match="image_format"):
        pred.set_image(np.zeros((H, W, 3), dtype=np.uint8), image_format="RGBA")


def test_greyscale_image(model, image):
    grey = image[..., 1].copy()
    pred = Predictor(model, precision="fp32")
    pred.set_image(grey)
    assert pred.original_size == (H, W)
    ref = Predictor(model, precision="fp32")
    ref.set_image(np.repeat(grey[:, :, None], 3, axis=2))
    assert torch.equal(pred.get_image_embedding(), ref.get_image_embedding())
    masks, iou, low = pred.predict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, H, W) and masks.dtype == np.bool_ and iou.shape == (3,)


def test_bgr_input_equals_rgb(model, image, predictor):
    pred = Predictor(model, precision="fp32")
    pred.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    assert torch.equal(pred.get_image_embedding(), predictor.get_image_embedding())
    # ... and the flip matters: the BGR array read as RGB is another image.
    other = Predictor(model, precision="fp32")
    other.set_image(np.ascontiguousarray(image[..., ::-1]))
    assert not torch.allclose(other.get_image_embedding(), predictor.get_image_embedding())


def test_reset_image(model, image):
    pred = Predictor(model, precision="fp32")
    pred.set_image(image)
    assert pred.is_image_set and pred.features is not None
    pred.reset_image()
    assert not pred.is_image_set
    assert pred.features is None and pred.original_size is None and pred.input_size is None
    with pytest.raises(RuntimeError):
        pred.predict(box=np.array([10.0, 10.0, 50.0, 50.0]))


def test_image_embedding_and_sizes(model, predictor):
    emb = predictor.get_image_embedding()
    grid = model.prompt_encoder.image_embedding_size
    assert emb.shape == (1, model.prompt_encoder.embed_dim, *grid) == (1, 64, 16, 16)
    assert not emb.requires_grad
    assert predictor.original_size == (H, W)
    assert predictor.input_size == (256, round(W * 256 / H))  # longest side resized to the model input


def test_predict_outputs(model, predictor):
    masks, iou, low = predictor.predict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, H, W) and masks.dtype == np.bool_
    assert iou.shape == (3,) and low.shape == (3, model.low_res_size, model.low_res_size)
    logits, _, _ = predictor.predict(
        point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]), return_logits=True
    )
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(masks, logits > model.mask_threshold)
    # Single-mask output, and the previous low-res logits fed back as the mask prompt (alone).
    single, single_iou, _ = predictor.predict(box=np.array([40.0, 50.0, 180.0, 200.0]), multimask_output=False)
    assert single.shape == (1, H, W) and single_iou.shape == (1,)
    fed, _, _ = predictor.predict(mask_input=low[np.argmax(iou)][None], multimask_output=False)
    assert fed.shape == (1, H, W)


def test_batched_predict_torch_equals_single_calls(predictor):
    boxes = np.array([[10.0, 20.0, 100.0, 120.0], [50.0, 50.0, 210.0, 290.0], [0.0, 0.0, 219.0, 299.0], [70.0, 80.0, 90.0, 95.0]])
    boxes_t = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), predictor.original_size)
    masks, iou, low = predictor.predict_torch(None, None, boxes=boxes_t, multimask_output=True, return_logits=True)
    assert masks.shape == (4, 3, H, W) and iou.shape == (4, 3) and low.shape[:2] == (4, 3)
    for i, box in enumerate(boxes):
        m, q, lo = predictor.predict(box=box, multimask_output=True, return_logits=True)
        np.testing.assert_allclose(masks[i].numpy(), m, atol=1e-5)
        np.testing.assert_allclose(iou[i].numpy(), q, atol=1e-5)
        np.testing.assert_allclose(low[i].numpy(), lo, atol=1e-5)
    # The boxes give different masks (the batch is not one prompt repeated).
    assert (masks[0] - masks[1]).abs().max() > 1e-3
    bool_masks, _, _ = predictor.predict_torch(None, None, boxes=boxes_t)
    assert bool_masks.dtype == torch.bool and torch.equal(bool_masks, masks > 0)
    # [B, 1, 4] boxes, as the official predict() passes them: the same as [B, 4].
    masks3, iou3, _ = predictor.predict_torch(None, None, boxes=boxes_t[:, None], return_logits=True)
    assert torch.equal(masks3, masks) and torch.equal(iou3, iou)


def test_from_pretrained(model, image, tmp_path):
    pred = Predictor.from_pretrained("sam_tiny")
    assert isinstance(pred.model, Sam) and not pred.model.training
    assert pred.transform.target_length == 256 and not pred.is_image_set
    pred.set_image(image)
    masks, _, _ = pred.predict(box=np.array([40.0, 50.0, 180.0, 200.0]), multimask_output=False)
    assert masks.shape == (1, H, W)
    # With a checkpoint: the same weights, hence the same embedding as the source model.
    path = save_checkpoint(model, tmp_path / "tiny.pth")
    loaded = Predictor.from_pretrained("sam_tiny", checkpoint=path, precision="fp32")
    loaded.set_image(image)
    ref = Predictor(model, precision="fp32")
    ref.set_image(image)
    assert torch.equal(loaded.get_image_embedding(), ref.get_image_embedding())
    with pytest.raises(ValueError, match="unknown model 'sam_nope'"):
        Predictor.from_pretrained("sam_nope")


def test_lite_medsam_loads_strictly(assets):
    """The real LiteMedSAM weights load into the registered ``lite_medsam`` model with every key matching."""
    pytest.importorskip(
        "samtune.modeling.tiny_vit", reason="the TinyViT encoder (samtune/modeling/tiny_vit.py) is not available yet"
    )
    path = assets / "weights" / "lite_medsam" / "lite_medsam.pth"
    if not path.is_file():
        pytest.skip(f"{path} not found in the assets folder")
    model = build_sam("lite_medsam", checkpoint=path)  # strict=True by default
    state = read_state_dict(path)
    ours = model.state_dict()
    assert set(ours) == set(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key
    assert model.image_size == 256 and model.normalization == "minmax"
    pred = Predictor(model, precision="fp32")
    pred.set_image(make_image(180, 240))
    assert pred.get_image_embedding().shape == (1, 256, 64, 64)
    masks, iou, _ = pred.predict(box=np.array([60.0, 40.0, 160.0, 120.0]), multimask_output=False)
    assert masks.shape == (1, 180, 240) and np.isfinite(iou).all()


def test_bf16_fast_path_matches_fp32():
    """precision="bf16": embeddings within cosine 0.999 of fp32, masks nearly identical; weight changes are seen."""
    from tests.modeling.reference import make_image, randomize_

    model = randomize_(build_sam("sam_tiny"))
    image = make_image(180, 240)
    exact, fast = Predictor(model, precision="fp32"), Predictor(model, precision="bf16")
    assert fast.precision == "bf16"
    exact.set_image(image)
    fast.set_image(image)
    a, b = exact.get_image_embedding(), fast.get_image_embedding()
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.999
    box = np.array([40.0, 30.0, 200.0, 150.0])
    m_exact, iou_exact, _ = exact.predict(box=box, multimask_output=False)
    m_fast, iou_fast, _ = fast.predict(box=box, multimask_output=False)
    agreement = (m_exact == m_fast).mean()
    assert agreement >= 0.98, agreement
    assert np.abs(iou_exact - iou_fast).max() < 0.05
    # The bf16 copy of the encoder follows in-place weight updates (e.g. an optimiser step).
    with torch.no_grad():
        model.image_encoder.neck[0].weight.mul_(2.0)
    fast.set_image(image)
    assert not torch.allclose(fast.get_image_embedding(), b)


def test_precision_argument_is_checked():
    with pytest.raises(ValueError, match="precision"):
        Predictor(build_sam("sam_tiny"), precision="fp16")


@pytest.mark.parametrize("hw", [(512, 512), (300, 220), (90, 140)], ids=["halved", "shrunk", "enlarged"])
def test_min_max_model_input_is_lite_medsams_reference_preprocessing(hw):
    """A uint8 image reaches a min-max model (LiteMedSAM) exactly as in LiteMedSAM's reference inference
    (CVPR24_LiteMedSAM_infer.py): OpenCV INTER_AREA on the uint8 image (its output rounded to uint8), min-max of
    the resized image, zero padding. Resizing a float copy instead moved every input value by up to 0.003."""
    import cv2

    model = build_sam("sam_tiny_vit_t").eval()
    size = model.image_size
    image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8), (5, 5), 1.5)
    h, w = (int(s * size / max(hw) + 0.5) for s in hw)
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    scaled = (resized - resized.min()) / np.clip(resized.max() - resized.min(), 1e-8, None)
    padded = np.pad(scaled, ((0, size - h), (0, size - w), (0, 0)))
    seen = []
    model.image_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    pred = Predictor(model, precision="fp32")
    pred.set_image(image)
    assert pred.input_size == (h, w)
    torch.testing.assert_close(seen[0], torch.tensor(padded).float().permute(2, 0, 1)[None], atol=1e-6, rtol=0)


def test_predict_torch_names_prompts_that_are_not_tensors(predictor):
    """numpy prompts passed to predict_torch (which takes tensors in model-input pixels) failed deep inside with
    "'numpy.ndarray' object has no attribute 'unique'"."""
    with pytest.raises(TypeError, match=r"point_coords must be a torch\.Tensor .* got ndarray; predict\(\)"):
        predictor.predict_torch(np.array([[[10.0, 20.0]]]), np.array([[1]]))
    with pytest.raises(TypeError, match=r"boxes must be a torch\.Tensor .* got list"):
        predictor.predict_torch(None, None, boxes=[[1.0, 2.0, 30.0, 40.0]])


@pytest.mark.parametrize("multimask_output, channels", [(True, 3), (False, 1)])
def test_predict_torch_with_no_prompts_in_the_batch(model, predictor, multimask_output, channels):
    """B = 0 (say, no detections on this image) gives empty outputs of the documented shapes; it used to fail
    inside the decoder with "cannot reshape tensor of 0 elements"."""
    low = model.low_res_size
    for return_logits, dtype in ((False, torch.bool), (True, torch.float32)):
        masks, iou, low_res = predictor.predict_torch(None, None, boxes=torch.zeros(0, 4),
                                                      multimask_output=multimask_output, return_logits=return_logits)
        assert masks.shape == (0, channels, H, W) and masks.dtype == dtype
        assert iou.shape == (0, channels) and low_res.shape == (0, channels, low, low)
    masks, iou, _ = predictor.predict_torch(torch.zeros(0, 2, 2), torch.zeros(0, 2, dtype=torch.int),
                                            multimask_output=multimask_output)
    assert masks.shape == (0, channels, H, W) and iou.shape == (0, channels)


def test_inverted_boxes_are_an_error(predictor):
    """A box with x1 < x0 or y1 < y0 (often XYWH passed as XYXY) used to be decoded silently as another box."""
    with pytest.raises(ValueError, match=r"box must be \[x0, y0, x1, y1\] with x0 <= x1 and y0 <= y1, got "
                                         r"\[\[150\.0, 60\.0, 40\.0, 100\.0\]\].*XYWH"):
        predictor.predict(box=np.array([150.0, 60.0, 40.0, 100.0]))
    with pytest.raises(ValueError, match=r"x0 <= x1 and y0 <= y1.*\[\[10\.0, 200\.0, 40\.0, 100\.0\]\]"):
        predictor.predict(box=np.array([10.0, 200.0, 40.0, 100.0]))
    good = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    with pytest.raises(ValueError, match=r"boxes must be \[x0, y0, x1, y1\] .* got \[\[100\.0, 10\.0, 20\.0, 50\.0\]\]"):
        predictor.predict_torch(None, None, boxes=torch.cat([good, torch.tensor([[100.0, 10.0, 20.0, 50.0]])]))
    # A degenerate (zero-width) box is still a box.
    masks, _, _ = predictor.predict(box=np.array([40.0, 50.0, 40.0, 120.0]), multimask_output=False)
    assert masks.shape == (1, H, W)


def test_empty_points_fractional_labels_and_nan_mask_input(predictor, model):
    """Zero points and nothing else is no prompt; labels such as 0.5 were truncated to 0 (a background click)
    silently; a non-finite mask_input gave NaN IoUs. All three now raise ValueError naming the argument."""
    with pytest.raises(ValueError, match="no prompt"):
        predictor.predict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="no prompt"):
        predictor.predict_torch(torch.zeros(2, 0, 2), torch.zeros(2, 0, dtype=torch.int))
    # Zero points beside a box are the box alone.
    box = np.array([40.0, 50.0, 180.0, 200.0])
    alone = predictor.predict(box=box, multimask_output=False, return_logits=True)
    with_none = predictor.predict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0, dtype=int), box=box,
                                  multimask_output=False, return_logits=True)
    for a, b in zip(alone, with_none):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match=r"point_labels must be whole numbers.*got \[0\.5\]"):
        predictor.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([0.5]))
    with pytest.raises(ValueError, match=r"point_labels must be whole numbers.*got \[1\.5\]"):
        predictor.predict_torch(torch.tensor([[[10.0, 10.0]]]), torch.tensor([[1.5]]))
    # Whole-number float labels are fine (and the same as ints).
    ints = predictor.predict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1]), return_logits=True)
    floats = predictor.predict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1.0]), return_logits=True)
    np.testing.assert_array_equal(ints[0], floats[0])
    low = model.low_res_size
    with pytest.raises(ValueError, match="mask_input must be finite"):
        predictor.predict(box=box, mask_input=np.full((1, low, low), np.nan))
    with pytest.raises(ValueError, match="mask_input must be finite"):
        predictor.predict_torch(None, None, torch.tensor([[10.0, 10.0, 50.0, 50.0]]),
                                mask_input=torch.full((1, 1, low, low), float("inf")))


def test_set_torch_image_checks_the_original_size(model, image, predictor):
    """original_image_size given as (W, H), or of another image, used to be taken as is: masks came back at the
    wrong size and prompts were scaled wrongly. It must resize to the transformed image's (h, w)."""
    pred = Predictor(model, precision="fp32")
    tensor = torch.as_tensor(pred.transform.apply_image(image)).permute(2, 0, 1)[None]
    with pytest.raises(ValueError, match=r"original_image_size \(220, 300\) resized to a longest side of 256 would be "
                                         r"\(188, 256\), but the transformed image is \(256, 188\)"):
        pred.set_torch_image(tensor, (W, H))
    assert not pred.is_image_set
    with pytest.raises(ValueError, match=r"original_image_size must be \(H, W\)"):
        pred.set_torch_image(tensor, (H, W, 3))
    pred.set_torch_image(tensor, (H, W))
    assert torch.equal(pred.get_image_embedding(), predictor.get_image_embedding())
    assert pred.original_size == (H, W)


def test_min_max_model_rejects_non_finite_images():
    """A float image with NaN or inf reached a min-max model (LiteMedSAM) as an all-NaN input: a NaN embedding
    and empty masks, silently."""
    pred = Predictor(build_sam("sam_tiny_vit_t").eval(), precision="fp32")
    image = np.random.default_rng(0).random((40, 50), dtype=np.float32)
    for value in (np.nan, np.inf):
        bad = image.copy()
        bad[3, 4] = value
        with pytest.raises(ValueError, match=r"image must be finite, got 1 pixel with NaN or inf"):
            pred.set_image(bad)
        assert not pred.is_image_set
    pred.set_image(image)
    assert torch.isfinite(pred.get_image_embedding()).all()


def test_transform_matches_the_official_one():
    """ResizeLongestSide: the same shapes and coordinates as segment_anything's, float32 from torch inputs of any
    dtype; apply_image_torch sizes from H, W (the official one reads B, C: its output differs on purpose)."""
    official = pytest.importorskip("segment_anything.utils.transforms").ResizeLongestSide(256)
    from samtune.inference.transforms import ResizeLongestSide

    ours = ResizeLongestSide(256)
    rng = np.random.default_rng(0)
    for hw in [(300, 220), (480, 640), (255, 257), (90, 140), (5, 3)]:
        assert ours.get_preprocess_shape(*hw, 256) == official.get_preprocess_shape(*hw, 256)
        coords = rng.random((7, 2)) * hw[::-1]
        boxes = np.sort(rng.random((3, 2, 2)) * hw[::-1], axis=1).reshape(3, 4)
        np.testing.assert_array_equal(ours.apply_coords(coords, hw), official.apply_coords(coords, hw))
        np.testing.assert_array_equal(ours.apply_boxes(boxes, hw), official.apply_boxes(boxes, hw))
        for dtype in (torch.float32, torch.float64, torch.int64):
            c, b = torch.as_tensor(coords).to(dtype), torch.as_tensor(boxes).to(dtype)
            got = ours.apply_coords_torch(c, hw)
            assert got.dtype == torch.float32 and torch.equal(got, official.apply_coords_torch(c, hw))
            assert torch.equal(ours.apply_boxes_torch(b, hw), official.apply_boxes_torch(b, hw))
        image = (rng.random((*hw, 3)) * 255).astype(np.uint8)
        np.testing.assert_array_equal(ours.apply_image(image), official.apply_image(image))
        resized = ours.apply_image_torch(torch.rand(2, 3, *hw))
        assert resized.shape == (2, 3, *ours.get_preprocess_shape(*hw, 256))


def test_predict_torch_prompts_in_the_padding_are_outside_the_image(predictor):
    """The 300x220 image fills 188 of the model input's 256 columns; the rest is padding. A point or box there is
    outside the image (predict() says so in original pixels) but predict_torch used to decode it silently."""
    h_in, w_in = predictor.input_size
    assert (h_in, w_in) == (256, 188)
    with pytest.raises(ValueError, match=r"point_coords outside the image: x must be in \[0, 188\] and y in "
                                         r"\[0, 256\] .*got \[\[200\.0, 100\.0\]\]"):
        predictor.predict_torch(torch.tensor([[[200.0, 100.0]]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"boxes outside the image: .*got \[\[10\.0, 10\.0, 230\.0, 50\.0\]\]"):
        predictor.predict_torch(None, None, boxes=torch.tensor([[10.0, 10.0, 30.0, 40.0], [10.0, 10.0, 230.0, 50.0]]))
    # The image's own corners, transformed, are inside (to float rounding).
    corners = predictor.transform.apply_coords_torch(torch.tensor([[[0.0, 0.0], [W, H]]]), predictor.original_size)
    masks, _, _ = predictor.predict_torch(corners, torch.tensor([[2, 3]]))
    assert masks.shape == (1, 3, H, W)
