"""``samtune export``: official .pth that segment_anything loads strictly, safetensors, merged adapters, ONNX,
metadata beside the weights, clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import samtune
from samtune import Sam, build_sam
from samtune.checkpoints import CheckpointError, save_checkpoint, sha256sum
from samtune.export import export_checkpoint, export_pth, read_export_metadata, sidecar_path
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
    with pytest.raises(ValueError, match="pass --merge"):
        main(["--checkpoint", str(ckpt), "--format", "pth", "--output", str(out)])
    assert not out.exists()

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
    """Errors are raised (samtune's entry point prints them on one line, see test_errors_one_line_or_traceback)."""
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"checkpoint {missing}: file not found"):
        main(["--checkpoint", str(missing), "--format", "pth", "--output", str(tmp_path / "o.pth")])

    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tiny_pth), "--format", "tflite", "--output", str(tmp_path / "o")])
    assert info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err

    odd = tmp_path / "odd.pth"
    torch.save({k: v for k, v in tiny_sam.state_dict().items() if not k.startswith("mask_decoder.output_hyper")}, odd)
    with pytest.raises(CheckpointError) as info:
        main(["--checkpoint", str(odd), "--format", "pth", "--output", str(tmp_path / "o.pth")])
    err = str(info.value)
    assert "cannot infer the model" in err and "--model NAME" in err and "closest registered model: sam_tiny" in err

    with pytest.raises(ValueError, match="use --format safetensors"):
        main(["--checkpoint", str(tiny_pth), "--format", "pth", "--output", str(tmp_path / "o.safetensors")])

    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(ValueError, match=f"output {folder} is a directory; give the path of the file to write"):
        main(["--checkpoint", str(tiny_pth), "--format", "onnx", "--output", str(folder)])


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "pth", "--return-single-mask", "--opset", "3"],
     "--opset applies to --format onnx / onnx-encoder, not pth; --return-single-mask applies to --format onnx, not pth"),
    (["--format", "onnx", "--include-preprocessing"], "--include-preprocessing applies to --format onnx-encoder, not onnx"),
    (["--format", "onnx-encoder", "--gelu-approximate"], "--gelu-approximate applies to --format onnx, not onnx-encoder"),
])
def test_options_of_other_formats_are_usage_errors(tiny_pth, tmp_path, capsys, args, message) -> None:
    """An option the format does not take was silently dropped (an ONNX decoder written without the asked-for
    preprocessing); now it is a usage error, and nothing is written."""
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tiny_pth), "--output", str(tmp_path / "o"), *args])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"format 'pth' does not take include_preprocessing \(only onnx-encoder\)"):
        export_checkpoint(tiny_pth, tmp_path / "o.pth", "pth", include_preprocessing=True)


def test_samtune_export_command(tiny_pth, tmp_path, capsys) -> None:
    """`samtune export` reaches this module through samtune.cli's dispatch."""
    from samtune.cli import main as samtune_main

    with pytest.raises(SystemExit) as info:
        samtune_main(["export", "--help"])
    assert info.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    out = tmp_path / "via_cli.pth"
    samtune_main(["export", "--checkpoint", str(tiny_pth), "--format", "pth", "--output", str(out)])
    assert out.is_file() and sidecar_path(out).is_file()


# ------------------------------------------------------------------------- adapter checkpoints (real samtune.adapt)
LORA = {"method": "lora", "lora_rank": 2, "freeze_policy": "decoder_only"}


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_sam: Sam, tmp_path_factory) -> tuple[Path, Sam, dict]:
    """A Lightning checkpoint of a LoRA-adapted task as samtune writes it: ``samtune_adapter`` metadata, only the
    trainable weights (``model.``-prefixed), the task's hyper-parameters. LoRA updates are non-zero.

    Returns:
        (checkpoint, the merged adapted model, its hyper-parameters).
    """
    from samtune.adapt import AdaptationConfig, apply_adaptation, merge_adaptation, trainable_state_dict
    from samtune.adapt.checkpoint import METADATA_KEY, adapter_metadata

    root = tmp_path_factory.mktemp("lora")
    base = save_checkpoint(tiny_sam, root / "base.pth")
    model = apply_adaptation(build_sam("sam_tiny", base), LORA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(generator=gen)
    config = AdaptationConfig.coerce(LORA).to_dict()
    hparams = {"model": "sam_tiny", "checkpoint": str(base), "adaptation": config}
    meta = {**adapter_metadata(model, model_name="sam_tiny", base_checkpoint=base), "lightning": True}
    path = root / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in trainable_state_dict(model).items()},
                "pytorch-lightning_version": "2.5.0", "hyper_parameters": hparams, METADATA_KEY: meta}, path)
    return path, merge_adaptation(model).eval(), hparams


def _close(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> None:
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["pth", "onnx", "onnx-encoder"])
def test_adapter_checkpoint_needs_merge_for_plain_formats(lora_checkpoint, tmp_path, fmt) -> None:
    """Unmerged LoRA weights (``qkv.base_layer``, ``lora_A``) fit neither segment_anything nor samtune: refused."""
    ckpt, _, _ = lora_checkpoint
    out = tmp_path / f"out.{fmt}"
    with pytest.raises(ValueError, match=r"is adapted \(lora\).*pass --merge") as info:
        main(["--checkpoint", str(ckpt), "--format", fmt, "--output", str(out), "--no-verify"])
    assert str(ckpt) in str(info.value) and not out.exists() and not sidecar_path(out).exists()


def test_adapter_checkpoint_merged_export(lora_checkpoint, tmp_path) -> None:
    """--merge: the official layout (strict load in the official Sam and Predictor.from_checkpoint), the merged
    weights, and a sidecar with the model, the adaptation and the training config."""
    from samtune import Predictor

    ckpt, merged, hparams = lora_checkpoint
    out = tmp_path / "merged.pth"
    assert main(["--checkpoint", str(ckpt), "--format", "pth", "--output", str(out), "--merge"]) == 0
    state = torch.load(out, weights_only=True)
    official = build_reference("sam_tiny")
    official.load_state_dict(state, strict=True)
    _close(state, merged.state_dict())
    _close(Predictor.from_checkpoint(out, precision="fp32").model.state_dict(), merged.state_dict())
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["model"] == "sam_tiny" and meta["source_checkpoint"]["kind"] == "adapter"
    assert meta["adaptation"] == {"config": hparams["adaptation"], "merged": True}
    assert meta["training_config"] == hparams


def test_adapter_checkpoint_unmerged_safetensors_round_trip(lora_checkpoint, tmp_path) -> None:
    """Without --merge safetensors keeps the LoRA tensors and records the adaptation; samtune loads it back (from
    the header alone) and merges it."""
    from safetensors.torch import load_file

    from samtune import Predictor
    from samtune.export import load_sam

    ckpt, merged, hparams = lora_checkpoint
    out = tmp_path / "adapted.safetensors"
    assert main(["--checkpoint", str(ckpt), "--format", "safetensors", "--output", str(out)]) == 0
    assert any(".lora_A." in k for k in load_file(str(out)))
    meta = read_export_metadata(out)
    assert meta["model"] == "sam_tiny" and meta["adaptation"] == {"config": hparams["adaptation"], "merged": False}
    sidecar_path(out).unlink()  # the safetensors header carries the same metadata
    loaded = load_sam(out)
    assert (loaded.name, loaded.merged, loaded.adaptation) == ("sam_tiny", True, hparams["adaptation"])
    _close(loaded.model.state_dict(), merged.state_dict())
    _close(Predictor.from_checkpoint(out, precision="fp32").model.state_dict(), merged.state_dict())


def test_adapter_checkpoint_rejects_another_model(lora_checkpoint, tmp_path) -> None:
    """--model can only confirm the recorded model: an adapter is always rebuilt on the model it records."""
    from samtune.export import load_sam

    ckpt, _, _ = lora_checkpoint
    out = tmp_path / "o.pth"
    with pytest.raises(CheckpointError, match=r"model 'sam_tiny'.*the model argument is 'sam_vit_b'.*--model") as info:
        main(["--checkpoint", str(ckpt), "--format", "pth", "--output", str(out), "--merge", "--model", "sam_vit_b"])
    assert str(ckpt) in str(info.value) and not out.exists()
    assert load_sam(ckpt, "sam_tiny").name == "sam_tiny"


@pytest.mark.parametrize("fmt", ["onnx", "onnx-encoder"])
def test_onnx_opset_below_14_is_refused(tiny_pth, tmp_path, fmt) -> None:
    """Both graphs need opset 14 (scaled_dot_product_attention, unflatten): a clear error naming --opset."""
    out = tmp_path / "m.onnx"
    for opset in ("13", "7"):
        with pytest.raises(ValueError, match=rf"--opset\) {opset} is too old.*>= 14.*pass --opset 14"):
            main(["--checkpoint", str(tiny_pth), "--format", fmt, "--output", str(out), "--opset", opset])
    assert not out.exists()


def test_errors_one_line_or_traceback(tiny_pth, tmp_path, capsys, monkeypatch) -> None:
    """Through `samtune`: one line naming the file (exit 1); --traceback or SAMTUNE_TRACEBACK=1 raise instead."""
    from samtune.cli import main as samtune_main

    monkeypatch.delenv("SAMTUNE_TRACEBACK", raising=False)
    missing = tmp_path / "nope.pth"
    args = ["export", "--checkpoint", str(missing), "--format", "pth", "--output", str(tmp_path / "o.pth")]
    with pytest.raises(SystemExit) as info:
        samtune_main(args)
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback" not in err
    assert err.splitlines()[0] == f"samtune: error: CheckpointError: checkpoint {missing}: file not found"
    with pytest.raises(CheckpointError, match="file not found"):
        samtune_main([*args, "--traceback"])
    monkeypatch.setenv("SAMTUNE_TRACEBACK", "1")
    with pytest.raises(CheckpointError, match="file not found"):
        samtune_main(args)

    # an error chained from torch's: the one line names the file (samtune's error, not the cause); the traceback
    # keeps the cause
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_pth.read_bytes()[:50_000])
    args = ["export", "--checkpoint", str(truncated), "--format", "pth", "--output", str(tmp_path / "o.pth")]
    with pytest.raises(CheckpointError, match=f"checkpoint {truncated}") as raised:
        samtune_main(args)
    assert raised.value.__cause__ is not None or raised.value.__context__ is not None
    monkeypatch.delenv("SAMTUNE_TRACEBACK")
    with pytest.raises(SystemExit):
        samtune_main(args)
    assert capsys.readouterr().err.startswith(f"samtune: error: CheckpointError: checkpoint {truncated}:")


def test_exported_files_are_readable_like_torch_save(tiny_pth, tmp_path) -> None:
    """safetensors' save_file creates 0o600 files: an export gets the mode torch.save gives (0o666 & ~umask)."""
    for umask in (0o022, 0o002):
        old = os.umask(umask)
        try:
            for fmt in ("pth", "safetensors"):
                out = tmp_path / f"{umask:o}.{fmt}"
                assert main(["--checkpoint", str(tiny_pth), "--format", fmt, "--output", str(out)]) == 0
                assert out.stat().st_mode & 0o777 == 0o666 & ~umask, (fmt, oct(out.stat().st_mode))
        finally:
            os.umask(old)
