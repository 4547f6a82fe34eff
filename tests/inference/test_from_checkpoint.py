"""Predictor.from_checkpoint (samtune.export.load_sam): every checkpoint kind, model inference, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import samtune.adapt
from samtune import Predictor, Sam, build_sam
from samtune.build import MODEL_REGISTRY, build_sam_from_config, get_config, register_model
from samtune.checkpoints import CheckpointError, infer_model_name, save_checkpoint
from samtune.export import export_checkpoint, load_sam, sidecar_path

from ..export import fake_adapt as _fake_adapt_module
from ..export.fake_adapt import lightning_like_checkpoint

fake_adapt = _fake_adapt_module.fake_adapt  # a fixture: bound here so pytest finds it (pyflakes flagged the import)
from ..modeling.reference import randomize_


@pytest.fixture(scope="module")
def tiny() -> Sam:
    return randomize_(build_sam("sam_tiny"), seed=11).eval()


@pytest.fixture(scope="module")
def tiny_pth(tiny, tmp_path_factory) -> Path:
    return save_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def lightning_ckpt(tiny, tmp_path_factory) -> Path:
    """A real Lightning checkpoint of a PromptableSegmentationTask (sam_tiny with ``tiny``'s weights)."""
    import lightning as L

    from samtune.tasks import PromptableSegmentationTask

    task = PromptableSegmentationTask("sam_tiny", optimizer={"lr": 1e-4, "warmup_steps": 3})
    task.model.load_state_dict(tiny.state_dict())
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(task)
    path = tmp_path_factory.mktemp("lightning") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


# --------------------------------------------------------------------------------------------- kinds
def test_official_layout_pth(tiny, tiny_pth) -> None:
    """A plain state dict in the official key layout: the model is inferred from the shapes."""
    loaded = load_sam(tiny_pth)
    assert (loaded.name, loaded.kind, loaded.metadata, loaded.training_config) == ("sam_tiny", "state_dict", None, None)
    predictor = Predictor.from_checkpoint(tiny_pth, precision="fp32")
    assert isinstance(predictor, Predictor) and predictor.precision == "fp32"
    assert _same_weights(predictor.model, tiny) and not predictor.model.training


def test_safetensors(tiny, tmp_path) -> None:
    path = save_checkpoint(tiny, tmp_path / "w.safetensors")
    loaded = load_sam(path)
    assert (loaded.name, loaded.kind) == ("sam_tiny", "safetensors")
    assert _same_weights(loaded.model, tiny)


@pytest.mark.parametrize("name", ["sam_vit_b", "sam_vit_l", "sam_vit_h"])
def test_official_vit_variants_from_shapes(name: str) -> None:
    """vit_b / vit_l / vit_h differ in embed dim and depth (state dicts built on the meta device: no memory)."""
    with torch.device("meta"):
        state = build_sam_from_config(get_config(name)).state_dict()
    assert infer_model_name(state) == name
    assert infer_model_name({f"module.{k}": v for k, v in state.items()}) == name  # DDP-wrapped save


def test_mobile_sam_vit_t(tmp_path) -> None:
    """MobileSAM's file layout (TinyViT with a 3x3 stride-4 stem and the unused classification head)."""
    path = save_checkpoint(build_sam("sam_vit_t"), tmp_path / "mobile_sam.pt")
    assert torch.load(path, weights_only=True)["image_encoder.head.weight"].shape == (1000, 320)
    loaded = load_sam(path)
    assert loaded.name == "sam_vit_t" and loaded.model.image_size == 1024


def test_lite_medsam_real_weights(lite_medsam_file: Path) -> None:
    """LiteMedSAM (stride-1 stem of 1x1 convs, 256 input, min-max) is told apart from MobileSAM."""
    predictor = Predictor.from_checkpoint(lite_medsam_file, precision="fp32")
    model = predictor.model
    assert (model.image_size, model.normalization, model.resize_interpolation) == (256, "minmax", "area")
    raw = torch.load(lite_medsam_file, weights_only=True)
    assert raw.keys() == model.state_dict().keys()
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    assert load_sam(lite_medsam_file).name == "lite_medsam"


@pytest.fixture
def lite_medsam_file(assets: Path) -> Path:
    return assets / "weights/lite_medsam/lite_medsam.pth"


def test_lightning_checkpoint(tiny, lightning_ckpt) -> None:
    """Model name from the task's hyper-parameters, ``model.`` prefix stripped, training config kept."""
    raw = torch.load(lightning_ckpt, weights_only=True)
    assert all(k.startswith("model.") for k in raw["state_dict"]) and raw["hyper_parameters"]["model"] == "sam_tiny"
    loaded = load_sam(lightning_ckpt)
    assert (loaded.name, loaded.kind) == ("sam_tiny", "lightning")
    assert loaded.training_config["optimizer"]["lr"] == 1e-4 and loaded.adaptation is None
    assert _same_weights(loaded.model, tiny)
    assert _same_weights(Predictor.from_checkpoint(lightning_ckpt, precision="fp32").model, tiny)


@pytest.fixture
def twin():
    """A second registered name with sam_tiny's architecture: shapes alone cannot tell the two apart."""
    register_model("sam_tiny_twin", get_config("sam_tiny"))
    yield "sam_tiny_twin"
    del MODEL_REGISTRY["sam_tiny_twin"]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_samtune_export_metadata_names_the_model(tiny_pth, twin, tmp_path, fmt) -> None:
    """Ambiguous shapes: the export's metadata (sidecar JSON, or the safetensors header) decides."""
    with pytest.raises(CheckpointError, match="several registered models"):
        load_sam(tiny_pth)
    out = tmp_path / f"twin.{fmt}"
    export_checkpoint(tiny_pth, out, fmt, model=twin)
    if fmt == "safetensors":
        sidecar_path(out).unlink()  # the embedded copy is enough
    loaded = load_sam(out)
    assert (loaded.name, loaded.kind) == (twin, "samtune_export")
    assert loaded.metadata["source_checkpoint"]["path"] == str(tiny_pth.resolve())
    assert load_sam(out, model="sam_tiny").name == "sam_tiny"  # an explicit name wins


# --------------------------------------------------------------------------------------------- errors
def test_explicit_model_that_does_not_fit(tiny_pth) -> None:
    with pytest.raises(CheckpointError, match="does not fit") as info:
        Predictor.from_checkpoint(tiny_pth, model="sam_tiny_vit_t")
    assert str(tiny_pth) in str(info.value)


def test_missing_file_and_unknown_name(tmp_path, tiny_pth) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        Predictor.from_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not registered.*available: .*sam_vit_b"):
        Predictor.from_checkpoint(tiny_pth, model="sam_vit_x")


def test_model_not_inferable(tiny, tmp_path) -> None:
    """The error says what was recognised and which model came closest."""
    state = {k: v for k, v in tiny.state_dict().items() if not k.startswith("image_encoder.blocks.3.")}
    path = tmp_path / "pruned.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        Predictor.from_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "cannot infer the model" in msg
    assert "ViT encoder (embed dim 96, depth 3" in msg and "closest registered model: sam_tiny" in msg
    assert "image_encoder.blocks.3." in msg and "sam_vit_b" in msg  # the missing keys and the known names
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="no SAM keys"):
        load_sam(path)


def test_bad_metadata(tiny_pth, tmp_path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(tiny_pth.read_bytes())
    sidecar_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"w\.pth\.json.*not valid JSON"):
        load_sam(path)
    sidecar_path(path).write_text(json.dumps({"format": "samtune-export", "model": "sam_giant"}))
    with pytest.raises(CheckpointError, match="export metadata names model 'sam_giant'"):
        load_sam(path)


def test_unregistered_model_argument(tiny_pth) -> None:
    """A mistyped model name lists the registered ones, without telling the user to pass the name they passed."""
    with pytest.raises(CheckpointError, match="the model argument names model 'sam_vit_z'") as info:
        load_sam(tiny_pth, "sam_vit_z")
    assert "sam_vit_b" in str(info.value) and "pass the model name explicitly" not in str(info.value)


# --------------------------------------------------------------------------------------------- adaptation
def test_adaptation_none_loads_plainly(tiny, tmp_path) -> None:
    loaded = load_sam(lightning_like_checkpoint(tiny, tmp_path / "a.ckpt", {"method": "none"}))
    assert loaded.adaptation is None and _same_weights(loaded.model, tiny)


def test_adapted_checkpoint_without_adapt_support(tiny, tmp_path, monkeypatch) -> None:
    """An adapted checkpoint needs samtune.adapt.apply_adaptation; without it the error says so."""
    monkeypatch.delattr(samtune.adapt, "apply_adaptation", raising=False)
    path = lightning_like_checkpoint(tiny, tmp_path / "lora.ckpt", {"method": "lora", "rank": 4})
    with pytest.raises(CheckpointError, match=r"adapted \(lora\).*samtune\.adapt\.apply_adaptation\(\)") as info:
        Predictor.from_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("merge", [True, False])
def test_adapted_checkpoint_goes_through_samtune_adapt(tiny, tmp_path, fake_adapt, merge) -> None:
    """The adaptation is applied before the weights load (strictly), then merged unless merge_adapters=False."""
    config = {"method": "lora", "rank": 4}
    delta = torch.full_like(tiny.mask_decoder.iou_token.weight, 0.5)
    path = lightning_like_checkpoint(tiny, tmp_path / "lora.ckpt", config, {"mask_decoder.lora_delta": delta})
    loaded = load_sam(path, merge_adapters=merge)
    assert fake_adapt.calls[0] == ("apply", config)
    assert loaded.adaptation == config and loaded.merged is merge and loaded.name == "sam_tiny"
    keys = set(loaded.model.state_dict())
    if merge:
        assert fake_adapt.calls[-1] == ("merge",) and "mask_decoder.lora_delta" not in keys
        torch.testing.assert_close(loaded.model.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight + 0.5)
    else:
        assert "mask_decoder.lora_delta" in keys and len(fake_adapt.calls) == 1


def test_adapter_only_checkpoint(tiny, tiny_pth, tmp_path, fake_adapt) -> None:
    """is_adapter_checkpoint -> load_adapter_checkpoint(path, base_checkpoint) -> merge; the model is identified."""
    path = tmp_path / "run.adapter"
    path.write_bytes(b"adapter weights (read by samtune.adapt)")
    predictor = Predictor.from_checkpoint(path, base_checkpoint=tiny_pth, precision="fp32")
    assert fake_adapt.calls[0] == ("load_adapter", path, tiny_pth) and fake_adapt.calls[-1] == ("merge",)
    torch.testing.assert_close(predictor.model.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight + 0.25)
    loaded = load_sam(path, base_checkpoint=tiny_pth)
    assert (loaded.kind, loaded.name, loaded.merged) == ("adapter", "sam_tiny", True)
    with pytest.raises(CheckpointError, match="base_checkpoint is only used with adapter-only checkpoints"):
        load_sam(tiny_pth, base_checkpoint=tiny_pth)
