"""merge_adaptation / export_merged: merged LoRA equals the unmerged model, the official key layout (strict load
into the official segment_anything Sam), and the documented refusal for bottleneck adapters."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from samtune.adapt import (
    AdapterMergeError,
    adaptation_of,
    apply_adaptation,
    export_merged,
    is_adapted,
    merge_adaptation,
)
from samtune.build import build_sam
from tests.adapt.helpers import eval_outputs, make_inputs, train_steps

TOL = 1e-5


def trained_lora(name: str, steps: int = 2, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = dict(method="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_include_decoder=True,
                  freeze_policy="frozen") | overrides
    model = apply_adaptation(build_sam(name), config)
    train_steps(model, steps=steps, lr=2e-2)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 1e-3 for p in lora_b)  # trained away from the zero init
    return model


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["sam_tiny", "sam_tiny_vit_t"])
def test_merged_lora_equals_unmerged_and_has_official_keys(name, tmp_path):
    model = trained_lora(name, steps=2 if name == "sam_tiny" else 1)  # TinyViT at 256 px: one step is enough
    inputs = make_inputs(model)
    adapted = eval_outputs(model, inputs)
    merged = merge_adaptation(model)
    assert merged is not model and is_adapted(model) and not is_adapted(merged)  # a copy by default
    assert adaptation_of(merged) is None
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert list(merged.state_dict()) == list(build_sam(name).state_dict())  # exact official layout and order
    assert max_diff(adapted, eval_outputs(merged, inputs)) <= TOL
    # exported and rebuilt through the registry (strict load), the merged weights reproduce the adapted model
    path = export_merged(model, tmp_path / f"{name}_merged.pth")
    assert max_diff(adapted, eval_outputs(build_sam(name, path), inputs)) <= TOL
    # in place: the same object comes back, merged
    same = merge_adaptation(model, inplace=True)
    assert same is model and not is_adapted(model)
    assert max_diff(adapted, eval_outputs(model, inputs)) <= TOL


def test_export_merged_loads_strictly_into_the_official_sam(tmp_path):
    reference = pytest.importorskip("tests.modeling.reference")
    model = trained_lora("sam_tiny", blocks=[1, 3], lora_targets=["qkv"])
    inputs = make_inputs(model)
    expected = eval_outputs(model, inputs)
    path = export_merged(model, tmp_path / "merged.pth")
    assert is_adapted(model)  # export merges a copy
    state = torch.load(path, map_location="cpu", weights_only=True)
    official = reference.build_reference("sam_tiny")
    official.load_state_dict(state, strict=True)
    with torch.no_grad():
        official_embeddings = official.image_encoder(inputs["images"])
    assert float((official_embeddings - expected[0]).abs().max()) <= 1e-4  # float noise across implementations
    # safetensors: samtune's registry loads it strictly and reproduces the adapted outputs
    st = export_merged(model, tmp_path / "merged.safetensors", format="safetensors")
    assert max_diff(expected, eval_outputs(build_sam("sam_tiny", st), inputs)) <= TOL


def test_plain_and_policy_only_models_merge_unchanged():
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny"), dict(method="none", freeze_policy="prompt_decoder"))
    merged = merge_adaptation(model)
    assert list(merged.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), model.state_dict().values()))


def test_adapters_cannot_be_merged(tmp_path):
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny"), dict(method="adapter"))
    with pytest.raises(AdapterMergeError, match="cannot be folded into the linear weights.*save_adapter_checkpoint"):
        merge_adaptation(model)
    with pytest.raises(AdapterMergeError):
        export_merged(model, tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()
    assert is_adapted(model)


def test_export_format_must_fit_the_suffix(tmp_path):
    model = build_sam("sam_tiny")
    with pytest.raises(ValueError, match="does not fit format 'safetensors'"):
        export_merged(model, tmp_path / "m.pth", format="safetensors")
    with pytest.raises(ValueError, match="does not fit format 'pth'"):
        export_merged(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="format must be 'pth' or 'safetensors'"):
        export_merged(model, tmp_path / "m.onnx", format="onnx")


@pytest.mark.slow
def test_merged_vit_b_loads_in_the_official_registry(tmp_path):
    """Full size: a LoRA-adapted sam_vit_b, merged and exported, loads with sam_model_registry['vit_b']."""
    segment_anything = pytest.importorskip("segment_anything")
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_vit_b"), dict(method="lora", lora_rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    path = export_merged(model, tmp_path / "sam_vit_b_lora_merged.pth")
    official = segment_anything.sam_model_registry["vit_b"](checkpoint=str(path))  # strict inside
    merged = merge_adaptation(model)
    for key, value in official.state_dict().items():
        assert torch.equal(value, merged.state_dict()[key]), key


def test_unmergeable_export_error_names_a_loader_that_reads_the_advised_file(tmp_path):
    """Exporting bottleneck adapters to pth fails and advises a safetensors export; that file holds base + adapters
    with export metadata (no adapter-checkpoint metadata), so the message must send the reader to load_sam /
    Predictor.from_checkpoint, not to load_adapter_checkpoint, which refuses it."""
    from samtune.adapt import load_adapter_checkpoint, save_adapter_checkpoint
    from samtune.checkpoints import CheckpointError, save_checkpoint
    from samtune.export import load_sam
    from samtune.export.writer import export_checkpoint

    torch.manual_seed(0)
    base = save_checkpoint(build_sam("sam_tiny"), tmp_path / "base.pth")
    model = apply_adaptation(build_sam("sam_tiny", base), dict(method="adapter", adapter_dim=8))
    source = save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=base)
    with pytest.raises(ValueError, match="--format safetensors") as info:
        export_checkpoint(source, tmp_path / "x.pth", "pth")
    advised = export_checkpoint(source, tmp_path / "x.safetensors", "safetensors").output
    with pytest.raises(CheckpointError):
        load_adapter_checkpoint(advised)
    assert "load_adapter_checkpoint" not in str(info.value)
    assert "samtune.export.load_sam(path, merge_adapters='auto')" in str(info.value)
    loaded = load_sam(advised, merge_adapters="auto")
    assert not loaded.merged
    inputs = make_inputs(model)
    assert max_diff(eval_outputs(model, inputs), eval_outputs(loaded.model, inputs)) <= TOL


def test_export_merged_removes_the_replaced_files_export_metadata(tmp_path):
    """Writing merged weights over a ``samtune export`` output removes its ``OUT.json``: that sidecar named the
    model and preprocessing of the replaced weights, and loaders would read it for the new ones."""
    from samtune.export.metadata import read_export_metadata, sidecar_path

    path = tmp_path / "model.pth"
    export_merged(build_sam("sam_tiny"), path)
    sidecar_path(path).write_text('{"format": "samtune-export", "model": "lite_medsam"}')
    with pytest.warns(UserWarning, match=r"removed .*model\.pth\.json"):
        export_merged(apply_adaptation(build_sam("sam_tiny"), dict(method="lora", lora_rank=2)), path)
    assert not sidecar_path(path).exists() and read_export_metadata(path) is None


LORA_ALL = dict(method="lora", lora_rank=4, lora_include_decoder=True, freeze_policy="frozen")


def test_merge_on_the_meta_device_gives_the_official_layout_without_data(tmp_path):
    """A model on the meta device (built under ``torch.device("meta")`` or moved there) holds shapes only: merging
    it is a shape-only merge that gives the official layout (on the meta device), and writing it is a clear error
    (no data) that leaves no file."""
    from samtune.build import build_sam_from_config, get_config

    def built_again():
        with torch.device("meta"):
            return build_sam_from_config(get_config("sam_tiny"))

    reference = build_sam("sam_tiny").state_dict()
    built = built_again()
    moved = apply_adaptation(build_sam("sam_tiny"), LORA_ALL).to("meta")
    for model in (apply_adaptation(built, LORA_ALL), moved):
        assert any(isinstance(m, BaseTunerLayer) for m in model.modules())
        merged = merge_adaptation(model)
        assert not is_adapted(merged) and is_adapted(model)
        state = merged.state_dict()
        assert list(state) == list(reference)
        assert all(v.is_meta and v.shape == reference[k].shape for k, v in state.items())
        assert merge_adaptation(model, inplace=True) is model and not is_adapted(model)
        for path in (tmp_path / "m.pth", tmp_path / "m.safetensors"):
            with pytest.raises(ValueError, match=r"meta device.*no data.*image_encoder\."):
                export_merged(merged, path, format="safetensors" if path.suffix == ".safetensors" else "pth")
        assert not any(tmp_path.iterdir())
    from samtune.adapt import save_adapter_checkpoint

    with pytest.raises(ValueError, match=r"adapter checkpoint: \d+ of \d+ tensors are on the meta device.*no data"):
        save_adapter_checkpoint(apply_adaptation(built_again(), LORA_ALL), tmp_path / "a.pt", model_name="sam_tiny",
                                base_checkpoint=None)
    assert not any(tmp_path.iterdir())


def test_merge_of_a_lora_layer_split_over_devices_names_the_layer():
    """A LoRA layer whose weights lie on different devices (here the meta device, on a GPU machine cuda + cpu) is
    a clear error naming the layer and the devices, raised before anything is merged (in place too)."""
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny"), LORA_ALL)
    layer = model.get_submodule("image_encoder.blocks.2.attn.qkv")
    layer.lora_A["default"].to("meta")
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(ValueError, match=r"image_encoder\.blocks\.2\.attn\.qkv .*on several devices.*cpu.*meta"):
        merge_adaptation(model, inplace=True)
    assert is_adapted(model) and sum(isinstance(m, BaseTunerLayer) for m in model.modules()) > 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not v.is_meta)


def test_failed_in_place_merge_leaves_the_model_adapted_and_unchanged():
    """Non-finite LoRA weights in one layer: merging in place fails naming that layer, before any other layer is
    merged (the model stays a consistent adapted model instead of half merged)."""
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny"), LORA_ALL)
    layers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    broken = layers[-1]
    with torch.no_grad():
        model.get_submodule(broken).lora_B["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{broken}.*non-finite"):
        merge_adaptation(model, inplace=True)
    assert [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)] == layers
    state = model.state_dict()
    assert list(state) == list(before)
    assert all(torch.allclose(state[k], v, rtol=0, atol=0, equal_nan=True) for k, v in before.items())
