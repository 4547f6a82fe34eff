"""ProtocolRunner on hand-checkable cases (PaintSam paints squares around clicks and fills boxes)."""
from __future__ import annotations

import pytest
import torch

from samtune.evaluation import ImageTarget, ProtocolConfig, ProtocolRunner, summarize
from samtune.evaluation.protocols import boxes_to_input, points_to_input
from tests.evaluation.conftest import PaintSam

EMB = torch.zeros(1, 1, 1, 1)


def _gt(shape: tuple[int, int], *blocks: tuple[int, int, int, int]) -> torch.Tensor:
    """``[1, H, W]`` bool with the inclusive ``(row0, col0, row1, col1)`` blocks set."""
    gt = torch.zeros(1, *shape, dtype=torch.bool)
    for r0, c0, r1, c1 in blocks:
        gt[0, r0:r1 + 1, c0:c1 + 1] = True
    return gt


def test_point_protocol_outputs() -> None:
    # 5 x 5 square, centre (row 4, col 4); tokens paint squares of half-side 1, 0, 1, 2.
    gt = _gt((12, 12), (2, 2, 6, 6))
    model = PaintSam(iou=(0.5, 0.9, 0.6, 0.1))
    out = ProtocolRunner(ProtocolConfig(protocols=("point",)))(model, EMB, [ImageTarget(gt, (12, 12))])
    assert model.calls[0]["coords"].tolist() == [[[4.0, 4.0]]] and model.calls[0]["labels"].tolist() == [[1]]
    assert model.calls[0]["return_all_tokens"] and len(model.calls) == 1
    assert out["point_iou"].tolist() == [pytest.approx(1 / 25)]  # most confident multimask output: token 1
    assert out["point_iou_pred"].tolist() == [pytest.approx(0.9)]
    assert out["point_iou_oracle"].tolist() == [1.0]  # token 3: the 5 x 5 square
    assert out["point_iou_single"].tolist() == [pytest.approx(9 / 25)]  # token 0
    assert "click_iou" not in out
    metrics = summarize(out, ProtocolConfig(protocols=("point",)))["point"]
    assert metrics["miou"] == pytest.approx(1 / 25) and metrics["iou_pred_mae"] == pytest.approx(0.9 - 1 / 25)


def test_click_sequence_hand_values() -> None:
    # 3 x 9 bar (rows 2..4, cols 1..9); the selected output (token 2) paints 3 x 3 squares. Centre: the first
    # pixel at distance 2 is (row 3, col 2) -> 9/27; then the false negatives cols 4..9 -> (3, 5) -> 18/27;
    # then cols 7..9 -> (3, 8) -> exact.
    gt = _gt((12, 12), (2, 1, 4, 9))
    model = PaintSam()
    config = ProtocolConfig(protocols=("point", "clicks"), num_clicks=3)
    out = ProtocolRunner(config)(model, EMB, [ImageTarget(gt, (12, 12))])
    assert out["click_iou"].tolist() == [[pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]]
    assert out["point_iou"].tolist() == [pytest.approx(1 / 3)]  # click 1 of the sequence
    assert out["point_iou_oracle"].tolist() == [pytest.approx(1 / 3)]  # max(1/27, 9/27, 12/40)
    assert out["click_iou_pred"].tolist() == [[pytest.approx(0.9), pytest.approx(0.5), pytest.approx(0.5)]]
    assert out["area"].tolist() == [27]
    calls = model.calls
    assert len(calls) == 3 and calls[0]["return_all_tokens"] and calls[0]["mask_inputs"] is None
    assert calls[0]["coords"].tolist() == [[[2.0, 3.0]]] and calls[0]["labels"].tolist() == [[1]]
    assert calls[1]["coords"].tolist() == [[[2.0, 3.0], [5.0, 3.0]]] and calls[1]["labels"].tolist() == [[1, 1]]
    assert calls[2]["coords"][0, -1].tolist() == [8.0, 3.0]
    assert not calls[1]["multimask_output"] and not calls[1]["return_all_tokens"]
    # The previous round's selected logits come back as the mask prompt (round 1: token 2, the 3 x 3 square).
    assert torch.equal(calls[1]["mask_inputs"][0, 0] > 0, _gt((12, 12), (2, 1, 4, 3))[0])
    metrics = summarize(out, config)
    assert metrics["clicks"]["noc"] == {"85": 3.0, "90": 3.0} and metrics["clicks"]["nof"] == {"85": 0.0, "90": 0.0}
    assert metrics["clicks"]["miou"] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    capped = summarize({"click_iou": out["click_iou"][:, :2], "click_iou_pred": out["click_iou_pred"][:, :2]},
                       ProtocolConfig(protocols=("clicks",), num_clicks=2))
    assert capped["clicks"]["noc"]["85"] == 2.0 and capped["clicks"]["nof"]["90"] == 1.0  # never reached: k


def test_negative_click_on_a_false_positive() -> None:
    # 3 x 3 GT, every output paints 5 x 5: the error is a false-positive ring; its first pixel (3, 3) gets a
    # negative click that carves a 5 x 5 square: prediction 16 px, 5 of them on the GT -> IoU 5 / 20.
    gt = _gt((12, 12), (4, 4, 6, 6))
    model = PaintSam(radii=(2, 2, 2, 2))
    out = ProtocolRunner(ProtocolConfig(protocols=("clicks",), num_clicks=2))(model, EMB, [ImageTarget(gt, (12, 12))])
    assert out["click_iou"].tolist() == [[pytest.approx(9 / 25), pytest.approx(5 / 20)]]
    assert model.calls[1]["labels"].tolist() == [[1, 0]] and model.calls[1]["coords"][0, 1].tolist() == [3.0, 3.0]
    assert "point_iou" not in out


def test_exact_prediction_gets_a_padding_click_and_policies_are_configurable() -> None:
    gt = _gt((12, 12), (4, 4, 6, 6))
    model = PaintSam(radii=(1, 2, 2, 2), iou=(0.1, 0.9, 0.8, 0.7))
    config = ProtocolConfig(protocols=("clicks",), num_clicks=3, first_click_multimask=False,
                            later_clicks_multimask=True, feed_back_mask=False)
    out = ProtocolRunner(config)(model, EMB, [ImageTarget(gt, (12, 12))])
    # Token 0 (radius 1) is exact at click 1; later rounds select among the multimask outputs (radius 2).
    assert out["click_iou"][0, 0] == 1.0 and out["click_iou_pred"][0].tolist()[0] == pytest.approx(0.1)
    calls = model.calls
    assert calls[1]["labels"].tolist() == [[1, -1]] and calls[1]["coords"][0, -1].tolist() == [0.0, 0.0]
    assert calls[1]["multimask_output"] and calls[1]["mask_inputs"] is None
    assert out["click_iou"][0, 1] == pytest.approx(9 / 25)  # the 5 x 5 of token 1 (highest predicted IoU)
    assert calls[2]["labels"].tolist() == [[1, -1, 0]]  # one token per click (the decoder appends the padding)


class StuckSam(PaintSam):
    """PaintSam that only ever listens to the first click: later clicks never change the prediction."""

    def decode(self, image_embeddings, image_index, point_coords=None, point_labels=None, **kwargs):
        logits, iou = super().decode(image_embeddings, image_index, point_coords, point_labels, **kwargs)
        self.calls[-1]["coords"], self.calls[-1]["labels"] = point_coords.clone(), point_labels.clone()
        first = super().decode(image_embeddings, image_index, point_coords[:, :1], point_labels[:, :1], **kwargs)
        self.calls.pop()
        return first


def test_a_click_that_does_not_flip_its_pixel_is_not_repeated() -> None:
    # 5 x 5 GT; the model paints only the centre pixel whatever comes next. Of the false negatives (the block
    # minus its centre), the four diagonal neighbours of the centre are the farthest from a boundary (sqrt 2):
    # clicks 2, 3, 4 go to the first three of them in raster order, never twice to one.
    gt = _gt((12, 12), (2, 2, 6, 6))
    model = StuckSam(radii=(0, 0, 0, 0))
    out = ProtocolRunner(ProtocolConfig(protocols=("clicks",), num_clicks=4))(model, EMB, [ImageTarget(gt, (12, 12))])
    assert model.calls[-1]["coords"][0].tolist() == [[4.0, 4.0], [3.0, 3.0], [5.0, 3.0], [3.0, 5.0]]
    assert model.calls[-1]["labels"].tolist() == [[1, 1, 1, 1]]
    assert out["click_iou"].tolist() == [[pytest.approx(1 / 25)] * 4]


def test_ignored_pixels_are_left_out_of_ious_and_clicks() -> None:
    # A 3 x 3 object in a void band (rows/cols 2..8); every output paints 5 x 5 around the click: without the
    # band that is IoU 9 / 25 and a negative click on the band; with it, exact, and click 2 is a padding token.
    gt = _gt((12, 12), (4, 4, 6, 6))
    void = _gt((12, 12), (2, 2, 8, 8))[0] & ~gt[0]
    config = ProtocolConfig(protocols=("point", "box", "clicks"), num_clicks=2, box_noise_std_fraction=0.0)
    model = PaintSam(radii=(2, 2, 2, 2))
    plain = ProtocolRunner(config)(model, EMB, [ImageTarget(gt, (12, 12))])
    assert plain["click_iou"].tolist() == [[pytest.approx(9 / 25), pytest.approx(5 / 20)]]
    assert model.calls[1]["labels"].tolist() == [[1, 0]]
    model = PaintSam(radii=(2, 2, 2, 2))
    out = ProtocolRunner(config)(model, EMB, [ImageTarget(gt, (12, 12), ignore=void)])
    assert out["click_iou"].tolist() == [[1.0, 1.0]] and out["point_iou"].tolist() == [1.0]
    assert model.calls[1]["labels"].tolist() == [[1, -1]]
    # The filled box covers no void pixel here, a wider one does: box as mask = |mask| / |box minus void|.
    assert out["box_iou"].tolist() == [1.0] and out["box_as_mask_iou"].tolist() == [1.0]
    l_shape = _gt((12, 12), (2, 2, 7, 4), (6, 5, 7, 9))  # 28 px in a 6 x 8 box
    void = _gt((12, 12), (2, 5, 5, 9))[0]  # 20 px of the box's 48 are void
    out = ProtocolRunner(ProtocolConfig(protocols=("box",)))(
        PaintSam(), EMB, [ImageTarget(l_shape, (12, 12), ignore=void)])
    assert out["box_as_mask_iou"].tolist() == [1.0] and out["box_iou"].tolist() == [1.0]
    # Void pixels inside the mask count in neither term (as in the IoUs): 18 of 28 px left, the box 48 - 20 - 10.
    void = _gt((12, 12), (6, 5, 7, 9))[0] | _gt((12, 12), (2, 5, 5, 9))[0]
    out = ProtocolRunner(ProtocolConfig(protocols=("box",)))(
        PaintSam(), EMB, [ImageTarget(l_shape, (12, 12), ignore=void)])
    assert out["box_as_mask_iou"].tolist() == [1.0] and out["box_iou"].tolist() == [1.0]  # was 28 / 18
    with pytest.raises(ValueError, match="ImageTarget.ignore"):
        ImageTarget(gt, (12, 12), ignore=void[:6])


def test_box_protocol_box_as_mask_and_layouts() -> None:
    l_shape = _gt((12, 12), (2, 2, 7, 4), (6, 5, 7, 9))  # 18 + 10 = 28 px in a 6 x 8 box
    rect = _gt((12, 12), (8, 1, 10, 3))
    targets = [ImageTarget(torch.cat((l_shape, rect)), (12, 12))]
    model = PaintSam()
    out = ProtocolRunner(ProtocolConfig(protocols=("box",)))(model, EMB, targets)
    assert out["box_iou"].tolist() == [pytest.approx(28 / 48), 1.0]
    assert out["box_as_mask_iou"].tolist() == [pytest.approx(28 / 48), 1.0]
    assert out["box_iou_pred"].tolist() == [pytest.approx(0.5)] * 2  # single-mask output
    assert model.calls[0]["boxes"].tolist() == [[2.0, 2.0, 9.0, 7.0], [1.0, 8.0, 3.0, 10.0]]
    assert model.calls[0]["coords"] is None and not model.calls[0]["multimask_output"]


def test_box_jitter_is_seeded_per_sample_and_capped() -> None:
    big = _gt((64, 64), (10, 10, 49, 39))
    other = _gt((64, 64), (2, 2, 5, 5))
    config = ProtocolConfig(protocols=("box_jitter",), box_noise_max=2.0, seed=3)
    boxes = {}
    for name, targets, emb in (
        ("alone", [ImageTarget(big, (64, 64), key=7)], EMB),
        ("batched", [ImageTarget(other, (64, 64), key=1), ImageTarget(big, (64, 64), key=7)],
         EMB.expand(2, -1, -1, -1)),
    ):
        model = PaintSam(image_size=64)
        out = ProtocolRunner(config)(model, emb, targets)
        boxes[name] = model.calls[0]["boxes"][-1]
        assert out["box_jitter_iou"][-1] < 1.0
    assert torch.equal(boxes["alone"], boxes["batched"])  # same (seed, sample) -> same noise, whatever the batch
    exact = torch.tensor([10.0, 10.0, 39.0, 49.0])
    assert not torch.equal(boxes["alone"], exact) and (boxes["alone"] - exact).abs().max() < 2.0 * 6  # 6 sigma
    model = PaintSam(image_size=64)
    ProtocolRunner(ProtocolConfig(protocols=("box_jitter",), box_noise_max=2.0, seed=4))(
        model, EMB, [ImageTarget(big, (64, 64), key=7)])
    assert not torch.equal(model.calls[0]["boxes"][0], boxes["alone"])  # another seed, other noise
    model = PaintSam(image_size=64)
    out = ProtocolRunner(ProtocolConfig(protocols=("box", "box_jitter"), box_noise_std_fraction=0.0))(
        model, EMB, [ImageTarget(big, (64, 64))])
    assert out["box_jitter_iou"].tolist() == out["box_iou"].tolist() == [1.0]  # no noise: the exact box


def test_original_resolution_coordinates_and_ious() -> None:
    # GT at 24 x 24 for a 12 x 12 model input (scale 0.5): rows 4..9, cols 2..13 = input rows 2..4, cols 1..6.
    gt = _gt((24, 24), (4, 2, 9, 13))
    cases = (("official", [1.0, 2.0, 6.5, 4.5], [2.0, 3.0], 36), ("area", [1.0, 2.0, 6.0, 4.0], [1.75, 2.75], 16))
    for mapping, box, click, painted in cases:
        model = PaintSam(radii=(1, 1, 1, 1))
        config = ProtocolConfig(protocols=("box", "point"), coordinate_mapping=mapping)
        out = ProtocolRunner(config)(model, EMB, [ImageTarget(gt, (12, 12))])
        assert model.calls[0]["coords"][0, 0].tolist() == click  # GT centre: first pixel at distance 3, (row 6, col 4)
        assert model.calls[1]["boxes"][0].tolist() == box
        assert out["box_iou"].tolist() == [1.0]  # the painted box, pixel-doubled by the bilinear upsampling
        # Input pixels within 1 of the click (3 x 3 at (2, 3); 2 x 2 at (1.75, 2.75)), 4 GT pixels each, of 72.
        assert out["point_iou"].tolist() == [pytest.approx(painted / 72)]
        assert out["area"].tolist() == [72]
    half = torch.tensor([0.5, 0.5])
    assert points_to_input(torch.tensor([[3.0, 1.0]]), torch.tensor([-1]), half).tolist() == [[0, 0]]  # padding
    # A one-pixel mask at 2x downsampling: the area mapping never inverts the box.
    assert boxes_to_input(torch.tensor([[4.0, 4.0, 4.0, 4.0]]), half, "area").tolist() == [[2, 2, 2, 2]]


def test_several_images_in_one_decoder_call() -> None:
    gts = [_gt((12, 12), (1, 1, 3, 3)), torch.cat((_gt((12, 12), (6, 6, 8, 8)), _gt((12, 12), (0, 8, 2, 10))))]
    model = PaintSam(radii=(1, 1, 1, 1))
    out = ProtocolRunner(ProtocolConfig(num_clicks=2))(
        model, EMB.expand(2, -1, -1, -1), [ImageTarget(g, (12, 12)) for g in gts])
    assert out["click_iou"].shape == (3, 2) and out["box_iou"].tolist() == [1.0, 1.0, 1.0]
    assert out["point_iou"].tolist() == [1.0, 1.0, 1.0]
    # point/click rounds (2), box, jittered box: 4 decoder calls for the 3 masks of the 2 images.
    assert len(model.calls) == 4 and all(c["image_index"].tolist() == [0, 1, 1] for c in model.calls)
    model = PaintSam(radii=(1, 1, 1, 1))
    chunked = ProtocolRunner(ProtocolConfig(num_clicks=2, postprocess_chunk=1, max_masks_per_call=2))(
        model, EMB.expand(2, -1, -1, -1), [ImageTarget(g, (12, 12)) for g in gts])
    assert chunked.keys() == out.keys() and all(torch.equal(chunked[k], out[k]) for k in out)
    assert [c["image_index"].tolist() for c in model.calls[:2]] == [[0, 1], [1]]  # at most 2 masks per call


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="protocols must be"):
        ProtocolConfig(protocols=("boxes",))
    with pytest.raises(ValueError, match="num_clicks"):
        ProtocolConfig(num_clicks=0)
    with pytest.raises(ValueError, match="iou_resolution"):
        ProtocolConfig(iou_resolution="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noc_thresholds"):
        ProtocolConfig(noc_thresholds=(85,))
    with pytest.raises(ValueError, match="noc_thresholds must be distinct"):
        ProtocolConfig(noc_thresholds=(0.9, 0.9))
    for noise in ({"box_noise_std_fraction": -0.1}, {"box_noise_max": -1.0}, {"box_noise_std_fraction": float("nan")},
                  {"box_noise_max": float("nan")}):  # NaN jittered every box to NaN: box_jitter mIoU 0, no error
        with pytest.raises(ValueError, match="box noise must be >= 0"):
            ProtocolConfig(**noise)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            ProtocolConfig(seed=seed)  # type: ignore[arg-type]
    assert ProtocolConfig(protocols=("clicks", "box")).protocols == ("box", "clicks")
    with pytest.raises(ValueError, match="ImageTarget.gt"):
        ImageTarget(torch.zeros(1, 4, 4), (4, 4))
