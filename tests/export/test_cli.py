"""``samtune export``: official .pth that segment_anything loads strictly, safetensors, merged adapters, ONNX,
metadata beside the weights, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import samtune
from samtune import Sam, build_sam
from samtune.checkpoints import save_checkpoint, sha256sum
from samtune.export import export_pth, read_export_metadata, sidecar_path
from samtune.export.cli import main

from ..modeling.reference import build_reference
from .fake_adapt import fake_adapt, lightning_like_checkpoint  # noqa: F401  (fake_adapt: a fixture)


@pytest.fixture(scope="module")
def tiny_pth(tiny_sam: Sam, tmp_path_factory) -> Path:
    return save_checkpoint(tiny_sam, tmp_path_factory.mktemp("in") / "sam_tiny.pth")


def _same(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> bool:
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_pth_is_the_official_format(tiny_sam, tiny_pth, tmp_path, capsys) -> None:
    """A plain state dict that the official Sam loads strictly; metadata in OUT.json."""
    out = tmp_path / "exported.pth"
    assert main(["--checkpoint", str(tiny_pth), "--format", "pth", "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    official = build_reference("sam_tiny")
    official.load_state_dict(state, strict=True)
    assert _same(official.state_dict(), tiny_sam.state_dict())

    meta = json.loads(sidecar_path(out).read_text())
    assert sidecar_path(out) == tmp_path / "exported.pth.json"
    assert meta["format"] == "samtune-export" and meta["model"] == "sam_tiny" and meta["weights_format"] == "pth"
    pre = meta["preprocessing"]
    assert pre["image_size"] == 256 and pre["normalization"] == "sam" and pre["resize_interpolation"] == "bilinear"
    assert pre["pixel_mean"] == [123.675, 116.28, 103.53] and pre["pixel_std"] == [58.395, 57.12, 57.375]
    assert meta["samtune_version"] == samtune.__version__
    assert meta["source_checkpoint"] == {"path": str(tiny_pth.resolve()), "kind": "state_dict", "sha256": sha256sum(tiny_pth)}
    assert meta["training_config"] is None and meta["adaptation"] is None


def test_vit_b_pth_loads_in_segment_anything(tmp_path) -> None:
    """Full-size check: sam_model_registry['vit_b'] builds the official ViT-B and loads the file strictly."""
    from segment_anything import sam_model_registry

    model = build_sam("sam_vit_b")
    with torch.no_grad():
        model.image_encoder.pos_embed.normal_()  # not the zero init: the load must carry it
    path = export_pth(model, tmp_path / "vit_b.pth")
    official = sam_model_registry["vit_b"](checkpoint=str(path))
    assert len(official.state_dict()) == 314
    for key in ("image_encoder.pos_embed", "image_encoder.blocks.11.attn.rel_pos_h", "mask_decoder.iou_token.weight"):
        assert torch.equal(official.state_dict()[key], model.state_dict()[key])


def test_safetensors_from_a_training_checkpoint(tiny_sam, tmp_path) -> None:
    """The training config of a .ckpt goes into the metadata, embedded in the safetensors header as well."""
    ckpt = lightning_like_checkpoint(tiny_sam, tmp_path / "last.ckpt", None)
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(out)]) == 0
    from safetensors.torch import load_file

    assert _same(load_file(str(out)), tiny_sam.state_dict())
    sidecar = json.loads(sidecar_path(out).read_text())
    sidecar_path(out).unlink()
    assert read_export_metadata(out) == sidecar  # the header holds the same JSON
    assert sidecar["source_checkpoint"]["kind"] == "lightning"
    assert sidecar["training_config"] == {"model": "sam_tiny", "adaptation": None}


def test_onnx_decoder_and_encoder(tiny_pth, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime (dev extra) runs the exported graphs")
    dec = tmp_path / "decoder.onnx"
    assert main(["--checkpoint", str(tiny_pth), "--format", "onnx", "--output", str(dec), "--return-single-mask"]) == 0
    assert "onnxruntime reproduces PyTorch" in capsys.readouterr().out
    meta = read_export_metadata(dec)
    assert meta["onnx"]["part"] == "prompt_encoder+mask_decoder" and meta["onnx"]["return_single_mask"] is True
    assert meta["onnx"]["outputs"] == ["masks", "iou_predictions", "low_res_masks"] and meta["onnx"]["opset"] == 17

    enc = tmp_path / "encoder.onnx"
    args = ["--checkpoint", str(tiny_pth), "--format", "onnx-encoder", "--output", str(enc), "--include-preprocessing",
            "--no-verify"]
    assert main(args) == 0
    assert "not verified" in capsys.readouterr().out
    import onnx

    graph = onnx.load(str(enc)).graph
    assert [i.name for i in graph.input] == ["input_image"] and [o.name for o in graph.output] == ["image_embeddings"]
    assert read_export_metadata(enc)["onnx"]["include_preprocessing"] is True


def test_adapted_checkpoint_needs_merge(tiny_sam, tmp_path, capsys, fake_adapt) -> None:
    """pth/ONNX hold plain SAM weights: an adapted checkpoint needs --merge, then exports official weights."""
    delta = torch.full_like(tiny_sam.mask_decoder.iou_token.weight, 0.5)
    ckpt = lightning_like_checkpoint(tiny_sam, tmp_path / "lora.ckpt", {"method": "lora", "rank": 2},
                                     {"mask_decoder.lora_delta": delta})
    out = tmp_path / "merged.pth"
    assert main(["--checkpoint", str(ckpt), "--format", "pth", "--output", str(out)]) == 1
    assert "pass --merge" in capsys.readouterr().err and not out.exists()

    assert main(["--checkpoint", str(ckpt), "--format", "pth", "--output", str(out), "--merge"]) == 0
    assert "adapters merged" in capsys.readouterr().out
    official = build_reference("sam_tiny")
    official.load_state_dict(torch.load(out, weights_only=True), strict=True)
    torch.testing.assert_close(official.mask_decoder.iou_token.weight, tiny_sam.mask_decoder.iou_token.weight + 0.5)
    assert read_export_metadata(out)["adaptation"] == {"config": {"method": "lora", "rank": 2}, "merged": True}

    unmerged = tmp_path / "adapted.safetensors"  # safetensors may keep the adapter tensors, with their config
    assert main(["--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(unmerged)]) == 0
    assert read_export_metadata(unmerged)["adaptation"]["merged"] is False
    from samtune.export import load_sam

    reloaded = load_sam(unmerged)
    assert reloaded.merged and "mask_decoder.lora_delta" not in reloaded.model.state_dict()


def test_errors(tiny_sam, tiny_pth, tmp_path, capsys) -> None:
    missing = tmp_path / "nope.pth"
    assert main(["--checkpoint", str(missing), "--format", "pth", "--output", str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("samtune export: error:") and str(missing) in err and "file not found" in err

    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tiny_pth), "--format", "tflite", "--output", str(tmp_path / "o")])
    assert info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err

    odd = tmp_path / "odd.pth"
    torch.save({k: v for k, v in tiny_sam.state_dict().items() if not k.startswith("mask_decoder.output_hyper")}, odd)
    assert main(["--checkpoint", str(odd), "--format", "pth", "--output", str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    assert "cannot infer the model" in err and "--model NAME" in err and "closest registered model: sam_tiny" in err

    assert main(["--checkpoint", str(tiny_pth), "--format", "pth", "--output", str(tmp_path / "o.safetensors")]) == 1
    assert "use --format safetensors" in capsys.readouterr().err


def test_samtune_export_command(tiny_pth, tmp_path, capsys) -> None:
    """`samtune export` reaches this module through samtune.cli's dispatch."""
    from samtune.cli import main as samtune_main

    with pytest.raises(SystemExit) as info:
        samtune_main(["export", "--help"])
    assert info.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    out = tmp_path / "via_cli.pth"
    samtune_main(["export", "--checkpoint", str(tiny_pth), "--format", "pth", "--output", str(out)])
    assert out.is_file() and sidecar_path(out).is_file()
