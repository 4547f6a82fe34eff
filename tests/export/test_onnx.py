"""ONNX export: onnxruntime reproduces PyTorch, and the decoder's interface and outputs are the official export's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime (dev extra) runs the exported graphs")

from samtune import Sam, build_sam  # noqa: E402
from samtune.export.onnx import (  # noqa: E402
    DECODER_INPUT_NAMES,
    MIN_OPSET,
    SamOnnxDecoder,
    export_onnx_decoder,
    export_onnx_encoder,
)
from samtune.modeling.preprocessing import get_preprocess_shape  # noqa: E402

from ..modeling.reference import make_image, randomize_  # noqa: E402
from .official import export_official, official_sam_like, run, session  # noqa: E402

ORIG_HW = (300, 220)  # a non-square original image: padding crop and resize matter
ATOL = 1e-3


# ----------------------------------------------------------------------------------------------- prompts
def _prompt(kind: str, size: int) -> dict[str, torch.Tensor | None]:
    """Points / box in the model-input frame of a ``size`` model for an ORIG_HW image (longest side = size)."""
    h, w = get_preprocess_shape(*ORIG_HW, size)
    clicks = torch.tensor([[[0.45 * w, 0.4 * h], [0.7 * w, 0.75 * h]]])
    box = torch.tensor([[0.2 * w, 0.25 * h, 0.8 * w, 0.7 * h]])
    if kind == "points":
        return {"coords": clicks, "labels": torch.tensor([[1, 0]]), "box": None}
    if kind == "box":
        return {"coords": None, "labels": None, "box": box}
    if kind == "box+points":
        return {"coords": clicks[:, :1], "labels": torch.tensor([[1]]), "box": box}
    raise ValueError(kind)


def _onnx_points(prompt: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What an app feeds the ONNX decoder: clicks, then box corners labelled 2/3, else a (0, 0) point labelled -1."""
    coords = [prompt["coords"]] if prompt["coords"] is not None else []
    labels = [prompt["labels"].float()] if prompt["labels"] is not None else []
    if prompt["box"] is not None:
        coords.append(prompt["box"].reshape(1, 2, 2))
        labels.append(torch.tensor([[2.0, 3.0]]))
    else:
        coords.append(torch.zeros(1, 1, 2))
        labels.append(torch.tensor([[-1.0]]))
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1)


def _feed(embeddings: torch.Tensor, prompt: dict, mask: torch.Tensor | None, low_res: int) -> dict[str, torch.Tensor]:
    coords, labels = _onnx_points(prompt)
    return {
        "image_embeddings": embeddings,
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": mask if mask is not None else torch.zeros(1, 1, low_res, low_res),
        "has_mask_input": torch.tensor([1.0 if mask is not None else 0.0]),
        "orig_im_size": torch.tensor(ORIG_HW, dtype=torch.float),
    }


@torch.no_grad()
def _pytorch(model: Sam, embeddings: torch.Tensor, prompt: dict, mask: torch.Tensor | None):
    """samtune's own decode + postprocess (what the Predictor runs): all 4 tokens, logits at ORIG_HW."""
    low, iou = model.decode(
        embeddings, point_coords=prompt["coords"], point_labels=prompt["labels"], boxes=prompt["box"],
        mask_inputs=mask, return_all_tokens=True,
    )
    masks = model.postprocess_masks(low, get_preprocess_shape(*ORIG_HW, model.image_size), ORIG_HW)
    return masks, iou, low


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# ----------------------------------------------------------------------------------------------- fixtures
class Case:
    """One model with its exported decoder (ours and the official), an image embedding and a mask prompt."""

    def __init__(self, name: str, model: Sam, embeddings: torch.Tensor, tmp: Path) -> None:
        self.name, self.model, self.embeddings = name, model, embeddings
        self.ours = session(export_onnx_decoder(model, tmp / f"{name}.onnx"))
        self.official = session(export_official(official_sam_like(model, name), tmp / f"{name}_official.onnx", ORIG_HW))
        with torch.no_grad():  # a realistic mask prompt: the previous round's best low-res logits
            low, iou = model.decode(embeddings, boxes=_prompt("box", model.image_size)["box"], multimask_output=True)
        self.mask = low[:, iou.argmax(1)]


@pytest.fixture(scope="module")
def tiny_case(tiny_sam, tmp_path_factory) -> Case:
    image = torch.as_tensor(make_image(*get_preprocess_shape(*ORIG_HW, tiny_sam.image_size))).permute(2, 0, 1)
    with torch.no_grad():
        embeddings = tiny_sam.encode_image(tiny_sam.preprocess(image[None].float()))
    return Case("sam_tiny", tiny_sam, embeddings, tmp_path_factory.mktemp("onnx_tiny"))


@pytest.fixture(scope="module")
def lite_case(tmp_path_factory) -> Case:
    import cv2

    from samtune import Predictor
    from tests.conftest import assets_dir

    root = assets_dir()
    if root is None:
        pytest.skip("real assets not found: set SAMTUNE_ASSETS or place them at ../shared/assets")
    model = build_sam("lite_medsam", root / "weights/lite_medsam/lite_medsam.pth")
    em = cv2.imread(str(root / "data/em_membrane/image/0.png"), cv2.IMREAD_GRAYSCALE)[: ORIG_HW[0], : ORIG_HW[1]]
    predictor = Predictor(model, precision="fp32")
    predictor.set_image(em)
    return Case("lite_medsam", model, predictor.get_image_embedding(), tmp_path_factory.mktemp("onnx_lite"))


@pytest.fixture(params=["sam_tiny", "lite_medsam"])
def case(request) -> Case:
    return request.getfixturevalue("tiny_case" if request.param == "sam_tiny" else "lite_case")


# ----------------------------------------------------------------------------------------------- decoder
def check_matches_pytorch(case: Case, kind: str, with_mask: bool) -> None:
    prompt = _prompt(kind, case.model.image_size)
    mask = case.mask if with_mask else None
    masks, iou, low = run(case.ours, _feed(case.embeddings, prompt, mask, case.model.low_res_size))
    ref_masks, ref_iou, ref_low = _pytorch(case.model, case.embeddings, prompt, mask)
    assert masks.shape == (1, 4, *ORIG_HW) and iou.shape == (1, 4) and low.shape == tuple(ref_low.shape)
    np.testing.assert_allclose(low, ref_low.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(iou, ref_iou.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(masks, ref_masks.numpy(), atol=ATOL, rtol=0)
    for k in range(4):
        assert _mask_iou(masks[0, k] > 0, ref_masks[0, k].numpy() > 0) >= 0.99
    assert (ref_masks > 0).any(), "degenerate test: every mask is empty"


def check_interface(case: Case) -> None:
    def signature(sess):
        inputs = [(i.name, i.type, len(i.shape)) for i in sess.get_inputs()]
        outputs = [(o.name, o.type, len(o.shape)) for o in sess.get_outputs()]
        return inputs, outputs

    assert signature(case.ours) == signature(case.official)
    assert [i.name for i in case.ours.get_inputs()] == list(DECODER_INPUT_NAMES)
    shapes = {i.name: i.shape for i in case.ours.get_inputs()}
    assert shapes == {i.name: i.shape for i in case.official.get_inputs()}  # incl. the dynamic "num_points" axis
    assert shapes["point_coords"] == [1, "num_points", 2] and shapes["point_labels"] == [1, "num_points"]


def check_matches_official(case: Case, kind: str, with_mask: bool) -> None:
    feed = _feed(case.embeddings, _prompt(kind, case.model.image_size), case.mask if with_mask else None,
                 case.model.low_res_size)
    for ours, official in zip(run(case.ours, feed), run(case.official, feed)):
        assert ours.shape == official.shape and ours.dtype == official.dtype
        np.testing.assert_allclose(ours, official, atol=ATOL, rtol=0)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kind", ["points", "box", "box+points"])
def test_decoder_matches_pytorch_and_official(case: Case, kind: str, with_mask: bool) -> None:
    """onnxruntime == samtune's PyTorch decode + postprocess (logits within 1e-3, binary masks IoU >= 0.99), and
    == the official ONNX graph on the same inputs (<= 1e-3)."""
    check_matches_pytorch(case, kind, with_mask)
    check_matches_official(case, kind, with_mask)


def test_decoder_interface_is_the_official_one(case: Case) -> None:
    """Same input/output names, element types, ranks and fixed dims as segment_anything's export."""
    check_interface(case)


def test_number_of_points_is_dynamic(tiny_case: Case) -> None:
    """One graph serves 1 to 9 clicks (plus padding), each equal to PyTorch."""
    size = tiny_case.model.image_size
    gen = torch.Generator().manual_seed(0)
    for n in (1, 4, 9):
        prompt = {"coords": torch.rand(1, n, 2, generator=gen) * size * 0.7,
                  "labels": torch.randint(0, 2, (1, n), generator=gen), "box": None}
        _, iou, low = run(tiny_case.ours, _feed(tiny_case.embeddings, prompt, None, tiny_case.model.low_res_size))
        _, ref_iou, ref_low = _pytorch(tiny_case.model, tiny_case.embeddings, prompt, None)
        np.testing.assert_allclose(low, ref_low.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(iou, ref_iou.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("labels", [[4.0, 1.0, -1.0], [1.0, -2.0, 2.0, 3.0], [0.5, 1.0, -1.0], [-1.0, 1.0, 0.0, -1.0]],
                         ids=["label_4", "label_-2", "fractional", "padding_first_and_last"])
def test_unusual_labels_match_official(tiny_case: Case, labels: list[float]) -> None:
    """Labels are compared as in the official graph: one outside {-1, 0, 1, 2, 3} (or fractional) gets only its
    positional encoding (it was cast and clamped to the nearest table row: label 4 became a box corner, -2 a
    padding point that kept its position, 0.5 a negative click); padding points anywhere add not_a_point only."""
    size = tiny_case.model.image_size
    gen = torch.Generator().manual_seed(1)
    feed = _feed(tiny_case.embeddings, _prompt("points", size), None, tiny_case.model.low_res_size)
    feed["point_coords"] = torch.rand(1, len(labels), 2, generator=gen) * size * 0.7
    feed["point_labels"] = torch.tensor([labels])
    got, want = run(tiny_case.ours, feed), run(tiny_case.official, feed)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("orig_hw", [(220, 300), (256, 256), (999, 401)])
def test_any_image_size_is_cropped_exactly(tiny_case: Case, orig_hw: tuple[int, int]) -> None:
    """The padding crop follows orig_im_size at run time (the official 1.0 export bakes one aspect ratio)."""
    feed = _feed(tiny_case.embeddings, _prompt("box", tiny_case.model.image_size), None, tiny_case.model.low_res_size)
    feed["orig_im_size"] = torch.tensor(orig_hw, dtype=torch.float)
    masks, _, low = run(tiny_case.ours, feed)
    expected = tiny_case.model.postprocess_masks(
        torch.from_numpy(low), get_preprocess_shape(*orig_hw, tiny_case.model.image_size), orig_hw
    )
    np.testing.assert_allclose(masks, expected.numpy(), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tiny_options(tiny_sam, tmp_path_factory):
    """Our and the official export with every official option on: return_single_mask, use_stability_score,
    return_extra_metrics."""
    tmp = tmp_path_factory.mktemp("onnx_options")
    options = {"return_single_mask": True, "use_stability_score": True, "return_extra_metrics": True}
    ours = session(export_onnx_decoder(tiny_sam, tmp / "options.onnx", **options))
    official = session(export_official(official_sam_like(tiny_sam, "sam_tiny"), tmp / "options_official.onnx",
                                       ORIG_HW, **options))
    return ours, official


def _stability(logits: np.ndarray) -> np.ndarray:
    return (logits > 1).sum((-1, -2)) / (logits > -1).sum((-1, -2))


@pytest.mark.parametrize("kind", ["points", "box", "box+points"])
def test_official_options(tiny_case: Case, tiny_options, kind: str) -> None:
    """Five outputs in the official order, all named, equal to the official graph's. One mask: token 0 for
    more than 2 points, else the multimask output with the best score (here the stability score)."""
    ours, official = tiny_options
    assert [o.name for o in ours.get_outputs()] == ["masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]
    prompt = _prompt(kind, tiny_case.model.image_size)
    feed = _feed(tiny_case.embeddings, prompt, None, tiny_case.model.low_res_size)
    got, want = run(ours, feed), run(official, feed)
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    masks, scores, stability, areas, low = got
    assert masks.shape == (1, 1, *ORIG_HW) and scores.shape == (1, 1) and low.shape[1] == 1
    _, _, ref_low = _pytorch(tiny_case.model, tiny_case.embeddings, prompt, None)
    ref_scores = _stability(ref_low.numpy())[0]
    token = 0 if feed["point_coords"].shape[1] > 2 else 1 + int(ref_scores[1:].argmax())
    np.testing.assert_allclose(low[0, 0], ref_low[0, token].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores, _stability(low), atol=1e-6)  # the stability score replaces the IoU
    np.testing.assert_allclose(stability, _stability(masks), atol=1e-6)
    np.testing.assert_array_equal(areas, (masks > 0).sum((-1, -2)))


def test_boolean_masks_gelu_approximate_and_model_untouched(tiny_case: Case, tmp_path: Path) -> None:
    """return_logits=False gives masks = logits > 0; gelu_approximate switches the copies' GELUs only; exporting
    (with onnxruntime verification) leaves the model's weights and training mode as they were."""
    model = tiny_case.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        path = export_onnx_decoder(model, tmp_path / "b.onnx", return_logits=False, gelu_approximate=True, verify=True)
        assert model.training
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert all(m.approximate == "none" for m in model.modules() if isinstance(m, torch.nn.GELU))
    finally:
        model.eval()
    feed = _feed(tiny_case.embeddings, _prompt("box", model.image_size), None, model.low_res_size)
    binary = run(session(path), feed)[0]
    assert binary.dtype == np.bool_
    assert _mask_iou(binary, run(tiny_case.ours, feed)[0] > 0) >= 0.99
    wrapper = SamOnnxDecoder(model, gelu_approximate=True)
    assert all(m.approximate == "tanh" for m in wrapper.modules() if isinstance(m, torch.nn.GELU))


def test_bad_opset(tiny_sam: Sam, tmp_path: Path) -> None:
    """Both graphs need opset 14 (scaled_dot_product_attention, unflatten): below, a clear error before the
    exporter runs; at 14 both export and reproduce PyTorch."""
    for export in (export_onnx_decoder, export_onnx_encoder):
        for opset in (7, 9, 13):
            with pytest.raises(ValueError, match=rf"opset \(--opset\) {opset} is too old.*>= 14"):
                export(tiny_sam, tmp_path / "m.onnx", opset=opset)
        with pytest.raises(ValueError, match="opset"):
            export(tiny_sam, tmp_path / "m.onnx", opset="17")
        assert not (tmp_path / "m.onnx").exists()
        export(tiny_sam, tmp_path / f"{export.__name__}.onnx", opset=MIN_OPSET, verify=True)
    assert MIN_OPSET == 14


# ----------------------------------------------------------------------------------------------- encoder
def _encoder_checks(model: Sam, tmp: Path, plain_input: bool = True) -> None:
    gen = torch.Generator().manual_seed(0)
    if plain_input:
        _plain_encoder_check(model, tmp, gen)
    _folded_encoder_check(model, tmp, gen)


def _plain_encoder_check(model: Sam, tmp: Path, gen: torch.Generator) -> None:
    size = model.image_size
    plain = session(export_onnx_encoder(model, tmp / "enc.onnx"))
    assert [i.name for i in plain.get_inputs()] == ["x"] and [o.name for o in plain.get_outputs()] == ["image_embeddings"]
    x = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        expected = model.encode_image(x)
    np.testing.assert_allclose(plain.run(None, {"x": x.numpy()})[0], expected.numpy(), atol=ATOL, rtol=0)


def _folded_encoder_check(model: Sam, tmp: Path, gen: torch.Generator) -> None:
    size = model.image_size
    folded = session(export_onnx_encoder(model, tmp / "enc_pre.onnx", include_preprocessing=True))
    assert [i.name for i in folded.get_inputs()] == ["input_image"]
    for hw in ((size, size * 5 // 8), (size * 3 // 4, size)):
        image = torch.rand(1, 3, *hw, generator=gen) * 255
        with torch.no_grad():
            expected = model.encode_image(model.preprocess(image))
        np.testing.assert_allclose(folded.run(None, {"input_image": image.numpy()})[0], expected.numpy(), atol=ATOL, rtol=0)


def test_encoder_vit(tiny_sam: Sam, tmp_path: Path) -> None:
    """ViT encoder (SAM normalisation): batch axis dynamic; folded preprocessing == Sam.preprocess."""
    _encoder_checks(tiny_sam, tmp_path)


def test_encoder_tiny_vit_minmax(tmp_path: Path) -> None:
    """TinyViT encoder (BatchNorm, channels-last) with the min-max convention folded in, at toy size
    (sam_tiny_vit_t); the plain-input TinyViT export is checked on the real LiteMedSAM (slow)."""
    _encoder_checks(randomize_(build_sam("sam_tiny_vit_t"), seed=2).eval(), tmp_path, plain_input=False)


@pytest.mark.slow
def test_encoder_lite_medsam(lite_medsam_file: Path, tmp_path: Path) -> None:
    """The real LiteMedSAM encoder (about 20 s of export on 2 cores)."""
    _encoder_checks(build_sam("lite_medsam", lite_medsam_file), tmp_path)


@pytest.mark.slow
def test_decoder_vit_b_matches_official(tmp_path: Path) -> None:
    """Full-size official model (random weights): same interface and outputs as segment_anything's export."""
    model = randomize_(build_sam("sam_vit_b"), seed=5).eval()
    case = Case("sam_vit_b", model, torch.randn(1, 256, 64, 64), tmp_path)
    check_interface(case)
    for kind in ("points", "box", "box+points"):
        for with_mask in (False, True):
            check_matches_official(case, kind, with_mask)
            check_matches_pytorch(case, kind, with_mask)


def test_verification_catches_a_mismatch(tiny_case: Case, tmp_path: Path) -> None:
    """verify compares the graph with PyTorch: a graph of other weights is reported, naming file and output."""
    from samtune.export.onnx import OnnxExportError, _check_with_onnxruntime, decoder_dummy_inputs

    path = export_onnx_decoder(tiny_case.model, tmp_path / "d.onnx")
    inputs = decoder_dummy_inputs(tiny_case.model)
    assert _check_with_onnxruntime(path, SamOnnxDecoder(tiny_case.model), inputs, ATOL) <= ATOL
    other = randomize_(build_sam("sam_tiny"), seed=99).eval()
    with pytest.raises(OnnxExportError, match=r"d\.onnx: output masks differs from PyTorch"):
        _check_with_onnxruntime(path, SamOnnxDecoder(other), inputs, ATOL)


# ----------------------------------------------------------------------------------------------- over 2 GB
def _export_like_a_large_model(monkeypatch) -> None:
    """Make torch.onnx.export behave as it does for graphs over protobuf's 2 GB: every weight in its own file
    beside the model, named after the tensor."""
    import onnx

    real = torch.onnx.export

    def export(module, args, f, **kwargs):
        real(module, args, f, **kwargs)
        onnx.save_model(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", export)


def test_weights_over_2gb_go_to_one_data_file(tiny_case: Case, tmp_path: Path, monkeypatch) -> None:
    """A graph whose weights are external data is written as <name> + <name>.data (not one file per tensor,
    which a second export into the folder would overwrite); it runs as the single-file export does; a later
    small export to the name removes the stale .data."""
    pytest.importorskip("onnx")
    from samtune.export.onnx import decoder_dummy_inputs, external_data_name

    single = export_onnx_decoder(tiny_case.model, tmp_path / "single" / "d.onnx")
    with monkeypatch.context() as patch:
        _export_like_a_large_model(patch)
        path = export_onnx_decoder(tiny_case.model, tmp_path / "d.onnx", verify=True)
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["d.onnx", "d.onnx.data"]
        assert external_data_name(path) == "d.onnx.data"
        assert (tmp_path / "d.onnx").stat().st_size < single.stat().st_size / 2 < (tmp_path / "d.onnx.data").stat().st_size
    inputs = decoder_dummy_inputs(tiny_case.model)
    for got, expected in zip(run(session(path), inputs), run(session(single), inputs)):
        np.testing.assert_array_equal(got, expected)
    export_onnx_decoder(tiny_case.model, path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["d.onnx"]


@pytest.mark.slow
def test_encoder_vit_h_over_2gb(tmp_path: Path) -> None:
    """The real case: the ViT-H encoder (2.5 GB of float32 weights) exports as encoder.onnx + encoder.onnx.data
    and onnxruntime reproduces PyTorch (about 5 minutes and 9 GB of memory on 2 CPU cores)."""
    model = build_sam("sam_vit_h").eval()
    path = export_onnx_encoder(model, tmp_path / "encoder.onnx", verify=True, atol=2e-3)
    assert path == tmp_path / "encoder.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", "encoder.onnx.data"]
    assert (tmp_path / "encoder.onnx.data").stat().st_size > 2**31
