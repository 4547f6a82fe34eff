"""samtune.checkpoints: reading, writing and converting weights, and clear errors for files that do not fit."""
from __future__ import annotations

import os
import pickle
import re
import socket
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from samtune.build import MODEL_REGISTRY, ViTConfig, build_sam, build_sam_from_config, with_overrides
from samtune.checkpoints import (
    CheckpointError,
    init_encoder_from_mae,
    load_checkpoint,
    load_into,
    read_state_dict,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def tiny():
    """A sam_tiny model whose every tensor is distinct from a fresh init (position tables included)."""
    model = build_sam("sam_tiny")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    return save_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth")


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "content, problem",
    [
        (b"this is a text file, not weights\n", "not a PyTorch checkpoint"),
        (bytes(range(7, 256)) * 8, "not a PyTorch checkpoint"),
        (b"", "empty"),
    ],
    ids=["text", "random_bytes", "empty"],
)
def test_not_a_checkpoint(tmp_path, content, problem):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_file(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        build_sam("sam_tiny", checkpoint=path)
    assert str(path) in str(info.value)


def test_truncated_safetensors(tiny, tmp_path):
    full = save_checkpoint(tiny, tmp_path / "full.safetensors")
    data = full.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope" / "sam.pth"
    with pytest.raises(CheckpointError, match="file not found") as info:
        build_sam("sam_tiny", checkpoint=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(CheckpointError, match="not a file"):
        read_state_dict(tmp_path)


def test_no_tensors_inside(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="no state dict of tensors") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_other_architecture_lists_missing_unexpected_misshaped(tiny_file):
    """sam_tiny weights into a wider, shallower encoder with a deeper decoder: every kind of mismatch."""
    base = MODEL_REGISTRY["sam_tiny"]
    cfg = with_overrides(
        "sam_tiny",
        encoder=ViTConfig(embed_dim=48, depth=3, num_heads=3, global_attn_indexes=(1,), window_size=8),
        decoder_depth=base.decoder_depth + 1,
    )
    model = build_sam_from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tiny_file)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {tiny_file} does not fit Sam: ")
    assert re.search(r"\d+ missing keys: mask_decoder\.transformer\.layers\.2\.", msg), msg
    assert re.search(r"\d+ unexpected keys: image_encoder\.blocks\.3\.", msg), msg
    assert re.search(r"\d+ mis-shaped keys: .*image_encoder\.blocks\.0\.attn\.proj\.bias \(file \(96,\) vs model \(48,\)\)", msg), msg
    # Nothing was loaded: the model is unchanged.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_non_strict_loads_the_fitting_keys(tiny, tiny_file):
    cfg = with_overrides("sam_tiny", decoder_depth=3)
    model = build_sam_from_config(cfg)
    missing, unexpected = load_into(model, read_state_dict(tiny_file), strict=False, source=str(tiny_file))
    assert unexpected == []
    assert missing == sorted(set(model.state_dict()) - set(tiny.state_dict()))
    assert missing and all(k.startswith("mask_decoder.transformer.layers.2.") for k in missing)
    state = model.state_dict()
    for key, value in tiny.state_dict().items():
        assert torch.equal(state[key], value), key


class _WritesMarker:
    """Unpickling this object would create a directory at ``marker`` (if a loader executed pickled code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("how", ["torch_save", "pickle_protocol_2", "pickle_protocol_4"])
def test_arbitrary_python_objects_are_refused_without_running_code(tmp_path, how):
    marker = tmp_path / "code_was_executed"
    payload = {"evil": _WritesMarker(marker), "image_encoder.pos_embed": torch.zeros(1)}
    path = tmp_path / "evil.pth"
    if how == "torch_save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2 if how == "pickle_protocol_2" else 4)
    # Sanity: an unrestricted unpickler would indeed create the marker.
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        build_sam("sam_tiny", checkpoint=path)
    assert not marker.exists(), "loading executed code from the checkpoint"
    msg = str(info.value)
    assert str(path) in msg
    if how == "pickle_protocol_4":  # the weights-only unpickler stops at the protocol-4 framing opcode
        assert "unsupported pickle data" in msg
    else:  # the refused object is named
        assert "weights_only=True" in msg and "mkdir" in msg


def test_marker_payload_really_executes_when_unrestricted(tmp_path):
    """The payload used above is live: plain pickle.load creates the marker (so its absence above is meaningful)."""
    marker = tmp_path / "executed"
    data = pickle.dumps(_WritesMarker(marker), protocol=2)
    pickle.loads(data)  # noqa: S301 - deliberately unsafe, on our own bytes
    assert marker.exists()


# --------------------------------------------------------------------------------------------- formats
def test_safetensors_round_trip_bit_identical(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "out" / "tiny.safetensors")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    from safetensors.torch import load_file

    raw = load_file(str(path))
    assert set(raw) == set(tiny.state_dict())
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_saved_checkpoints_get_the_mode_of_a_new_file(tiny, tmp_path, suffix):
    """Readable by the group / others as the umask allows (safetensors itself creates 0o600 files)."""
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tiny, tmp_path / f"tiny{suffix}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_safetensors_content_under_pth_name(tiny, tmp_path):
    st = save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    renamed = tmp_path / "tiny_really_safetensors.pth"
    renamed.write_bytes(st.read_bytes())
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=renamed))


def test_pth_save_is_atomic_and_official_layout(tiny, tmp_path):
    path = tmp_path / "tiny.pth"
    path.write_bytes(b"old content")  # overwritten in one rename
    save_checkpoint(tiny, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(tiny.state_dict())
    assert {k.split(".")[0] for k in raw} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert "pixel_mean" not in raw and "pixel_std" not in raw
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=path))


def test_failed_save_leaves_no_temporary_file(tiny, tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny, tmp_path / "tiny.pth")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_saves_of_one_path_do_not_collide(tiny, tmp_path):
    """Two writers of one file (e.g. every DDP rank exporting) each use their own temporary file: with a shared
    ``<path>.tmp`` one writer's rename took the other's file away (FileNotFoundError)."""
    import threading

    path, errors = tmp_path / "tiny.pth", []

    def save() -> None:
        try:
            for _ in range(8):
                save_checkpoint(tiny, path)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=path))


def test_adapted_run_checkpoint_names_the_loader(tiny, tmp_path):
    """build_sam on a LoRA run's checkpoint (peft keys) points to load_adapter_checkpoint / Predictor.from_checkpoint
    instead of asking whether it is another model."""
    state = tiny.state_dict()
    weight = state.pop("image_encoder.blocks.0.attn.qkv.weight")
    state["image_encoder.blocks.0.attn.qkv.base_layer.weight"] = weight
    state["image_encoder.blocks.0.attn.qkv.lora_A.default.weight"] = torch.zeros(2, weight.shape[1])
    path = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(CheckpointError, match=r"a checkpoint of a LoRA/adapter run: load it with "
                                              r"samtune\.adapt\.load_adapter_checkpoint or Predictor\.from_checkpoint"):
        build_sam("sam_tiny", checkpoint=path)


def test_trainable_only_run_checkpoint_names_the_loader(tiny, tmp_path):
    """build_sam on the last.ckpt of a run that stores its trainable weights only (configs/adapt/decoder_only.yaml
    with a base checkpoint: no LoRA keys, just the decoder) listed 82 missing encoder keys and nothing else; it now
    says the file holds part of the model and names the loaders that rebuild the frozen base."""
    state = {f"model.{k}": v for k, v in tiny.state_dict().items() if k.startswith("mask_decoder.")}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "samtune_adapter": {"complete": False}, "global_step": 3}, path)
    with pytest.raises(CheckpointError, match=r"holds only part of the model.*samtune\.adapt\.load_adapter_checkpoint "
                                              r"or Predictor\.from_checkpoint") as info:
        build_sam("sam_tiny", checkpoint=path)
    assert str(path) in str(info.value) and "missing keys" in str(info.value)


def test_lightning_checkpoint_loads(tiny, tmp_path):
    state = {f"model.{k}": v for k, v in tiny.state_dict().items()}
    state["loss.focal_alpha"] = torch.tensor(0.25)  # another task submodule's buffer: not part of the model
    path = tmp_path / "epoch=3-step=100.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.4.0"}, path)
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=path))


@pytest.mark.parametrize("wrapper", ["model", "module", "model_state_dict"])
def test_container_formats_load(tiny, tmp_path, wrapper):
    path = tmp_path / f"{wrapper}.pth"
    torch.save({wrapper: tiny.state_dict(), "epoch": 7}, path)
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=path))


def test_the_container_holding_the_tensors_is_chosen(tiny, tmp_path):
    """A training script's ``{"model": <its config>, "state_dict": <weights>}``: the first container key that
    held any dict was taken, the config, and the file was refused as holding no tensors."""
    path = tmp_path / "trained.pth"
    torch.save({"model": {"name": "sam_tiny", "depth": 2}, "state_dict": tiny.state_dict()}, path)
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=path))


def test_ddp_and_compiled_prefixes_load(tiny, tmp_path):
    path = tmp_path / "compiled.pth"
    torch.save({f"module._orig_mod.{k}": v for k, v in tiny.state_dict().items()}, path)
    _assert_same_weights(tiny, build_sam("sam_tiny", checkpoint=path))


# --------------------------------------------------------------------------------------------- image size
def test_resize_positions_for_another_image_size(tiny, tiny_file):
    """sam_tiny (256 px, 16x16 grid) weights into a 320 px model (20x20 grid)."""
    cfg = with_overrides("sam_tiny", image_size=320, embedding_grid=20)
    model = build_sam_from_config(cfg)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tiny_file)
    msg = str(info.value)
    assert str(tiny_file) in msg and "mis-shaped" in msg and "image_encoder.pos_embed" in msg
    assert "resize_positions=True" in msg

    load_checkpoint(model, tiny_file, resize_positions=True)
    src, dst = tiny.state_dict(), model.state_dict()
    # pos_embed [1, 16, 16, C] -> [1, 20, 20, C], bicubic.
    expected = F.interpolate(src["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(20, 20), mode="bicubic")
    assert dst["image_encoder.pos_embed"].shape == (1, 20, 20, 96)
    torch.testing.assert_close(dst["image_encoder.pos_embed"], expected.permute(0, 2, 3, 1))
    # Global blocks (1, 3): rel-pos tables 2*16-1=31 -> 2*20-1=39 rows, linear; windowed blocks keep 2*8-1=15.
    for block in (1, 3):
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"
            table = src[key]
            assert table.shape[0] == 31 and dst[key].shape[0] == 39
            ref = F.interpolate(table.t()[None], size=39, mode="linear")[0].t()
            torch.testing.assert_close(dst[key], ref)
    assert dst["image_encoder.blocks.0.attn.rel_pos_h"].shape[0] == 15
    for key, value in src.items():
        if dst[key].shape == value.shape:
            assert torch.equal(dst[key], value), key
    # The resized model runs at its own size.
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 320, 320)).shape == (1, 64, 20, 20)


def test_resize_positions_refuses_another_attention_layout(tiny_file):
    """Window tables do not depend on the image size: weights of another global/windowed block layout (same
    image size, or another one) stay an error with resize_positions, and the strict error does not suggest it."""
    encoder = ViTConfig(embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(0, 2), window_size=8)
    for size in (256, 320):
        model = build_sam_from_config(with_overrides("sam_tiny", encoder=encoder, image_size=size,
                                                     embedding_grid=size // 16))
        with pytest.raises(CheckpointError, match="blocks.0.attn.rel_pos_h") as info:
            load_checkpoint(model, tiny_file)
        assert ("resize_positions=True" in str(info.value)) == (size != 256)  # the grid differs only at 320
        with pytest.raises(CheckpointError, match="blocks.0.attn.rel_pos_h"):
            load_checkpoint(model, tiny_file, resize_positions=True)


# --------------------------------------------------------------------------------------------- MAE init
def _mae_vit(embed_dim: int = 96, num_classes: int = 10, patch_size: int = 16) -> torch.nn.Module:
    """A timm ViT shaped like an MAE encoder at 224 px (a grid of 224 / patch_size + class token), random weights."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=224, patch_size=patch_size, embed_dim=embed_dim, depth=4, num_heads=3, global_pool="",
        class_token=True, num_classes=num_classes,
    )


def _check_mae_init(encoder: torch.nn.Module, mae_state: dict[str, torch.Tensor], before: dict[str, torch.Tensor], report) -> None:
    from timm.layers import resample_abs_pos_embed

    after = encoder.state_dict()
    depth = sum(1 for k in after if k.endswith(".attn.qkv.weight"))
    for i in range(depth):
        for ours, theirs in (
            ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("mlp.lin1", "mlp.fc1"), ("mlp.lin2", "mlp.fc2"),
            ("norm1", "norm1"), ("norm2", "norm2"),
        ):
            for p in ("weight", "bias"):
                assert torch.equal(after[f"blocks.{i}.{ours}.{p}"], mae_state[f"blocks.{i}.{theirs}.{p}"]), (i, ours, p)
        for axis in ("h", "w"):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            assert not after[key].any(), key
    for p in ("weight", "bias"):
        assert torch.equal(after[f"patch_embed.proj.{p}"], mae_state[f"patch_embed.proj.{p}"])
    # pos_embed: class token dropped, 14x14 grid resampled (bicubic, PyTorch's a=-0.75 kernel without
    # antialiasing) to the encoder grid; computed independently with timm's resampler.
    grid = after["pos_embed"].shape[1:3]
    expected = resample_abs_pos_embed(
        mae_state["pos_embed"], list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=False
    )
    assert expected.shape[1] == 1 + grid[0] * grid[1]  # timm keeps the class token in front
    torch.testing.assert_close(after["pos_embed"], expected[:, 1:].reshape(1, *grid, -1), atol=1e-6, rtol=1e-5)
    neck = [k for k in after if k.startswith("neck.")]
    assert neck
    for key in neck:
        assert torch.equal(after[key], before[key]), key
    # Report.
    assert sorted(report.new) == sorted(neck + [k for k in after if "rel_pos" in k])
    assert set(report.loaded) == set(after) - set(report.new)
    assert "cls_token" in report.ignored and "norm.weight" in report.ignored and "norm.bias" in report.ignored
    assert set(report.ignored) == {"cls_token", "norm.weight", "norm.bias"} | {k for k in mae_state if k.startswith("head.")}
    text = str(report)
    assert f"{len(report.loaded)} tensors loaded" in text and "rel_pos" in text


def test_mae_init_from_timm_state_dict():
    model = build_sam("sam_tiny")
    encoder = model.image_encoder
    with torch.no_grad():  # make the rel-pos tables non-zero so that zeroing them is observable
        for name, p in encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    mae = _mae_vit().state_dict()
    assert any(k.startswith("head.") for k in mae)
    report = init_encoder_from_mae(encoder, mae)
    _check_mae_init(encoder, mae, before, report)


def test_mae_init_from_mae_repository_file(tmp_path):
    encoder = build_sam("sam_tiny").image_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    mae = _mae_vit(num_classes=0).state_dict()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae}, path)  # the MAE repository's layout
    report = init_encoder_from_mae(encoder, path)
    _check_mae_init(encoder, mae, before, report)


def test_mae_init_from_patch14_mae_resamples_the_patch_embedding():
    """The public MAE ViT-H is ViT-H/14 (16x16 grid at 224 px); SAM's encoders use 16 px patches. The patch
    embedding is resampled by FlexiViT's pseudo-inverse resize: a 14 px patch and its bicubic upsampling to 16 px
    project to the same embedding; the 16x16 position grid is interpolated to the encoder's."""
    encoder = build_sam("sam_tiny").image_encoder
    mae = _mae_vit(patch_size=14).state_dict()
    assert mae["patch_embed.proj.weight"].shape[2:] == (14, 14) and mae["pos_embed"].shape[1] == 1 + 16 * 16
    report = init_encoder_from_mae(encoder, mae)
    assert report.resampled == ["patch_embed.proj.weight (14, 14) -> (16, 16)"] and "resampled" in str(report)
    resampled = encoder.state_dict()["patch_embed.proj.weight"]
    assert resampled.shape == mae["patch_embed.proj.weight"].shape[:2] + (16, 16)
    patches = torch.randn(5, 3, 14, 14, dtype=torch.float64)
    upsampled = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    original = torch.einsum("nchw,dchw->nd", patches, mae["patch_embed.proj.weight"].double())
    torch.testing.assert_close(torch.einsum("nchw,dchw->nd", upsampled, resampled.double()), original,
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(encoder.state_dict()["patch_embed.proj.bias"], mae["patch_embed.proj.bias"])
    assert "blocks.0.attn.qkv.weight" in report.loaded and "patch_embed.proj.weight" in report.loaded


def test_mae_init_wrong_width_is_a_clear_error():
    encoder = build_sam("sam_tiny").image_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"expects .*\(is it the right ViT size\?\)") as info:
        init_encoder_from_mae(encoder, _mae_vit(embed_dim=192).state_dict())
    assert "192" in str(info.value)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_mae_init_unrelated_weights_is_a_clear_error():
    encoder = build_sam("sam_tiny").image_encoder
    with pytest.raises(CheckpointError, match="no ViT tensor matched"):
        init_encoder_from_mae(encoder, {"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)})


def test_timm_mae_vit_b_builds_offline_and_inits_sam_vit_b(monkeypatch):
    """timm's real MAE architecture with pretrained=False never touches the network; it initialises ViT-B."""
    import timm

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    mae = timm.create_model("vit_base_patch16_224.mae", pretrained=False).state_dict()
    assert mae["pos_embed"].shape == (1, 197, 768)
    encoder = build_sam_from_config(MODEL_REGISTRY["sam_vit_b"]).image_encoder
    before = {k: v for k, v in encoder.state_dict().items() if k.startswith("neck.")}
    before = {k: v.clone() for k, v in before.items()}
    report = init_encoder_from_mae(encoder, mae)
    after = encoder.state_dict()
    assert after["pos_embed"].shape == (1, 64, 64, 768)
    assert torch.equal(after["blocks.11.mlp.lin2.weight"], mae["blocks.11.mlp.fc2.weight"])
    assert torch.equal(after["blocks.2.attn.qkv.bias"], mae["blocks.2.attn.qkv.bias"])
    assert not after["blocks.2.attn.rel_pos_h"].any()  # global block: (2*64-1, 64) zeros
    assert after["blocks.2.attn.rel_pos_h"].shape == (127, 64)
    assert set(report.ignored) == {"cls_token", "norm.weight", "norm.bias"}
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# --------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", ["sam_vit_b", "sam_vit_l", "sam_vit_h", "sam_vit_t"])
def test_registry_download_entries(name):
    cfg = MODEL_REGISTRY[name]
    assert cfg.url is not None and cfg.url.startswith("https://")
    assert cfg.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", cfg.sha256)
    assert os.path.splitext(cfg.url)[1] in (".pth", ".pt")


def test_download_verifies_reuses_and_warns_when_unverifiable(tmp_path, monkeypatch):
    """The download logic with a fake transfer (tests never touch the network)."""
    import hashlib
    import warnings

    from samtune.build import register_model
    from samtune.checkpoints import download_checkpoint

    payload = b"weights"
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        Path(dst).write_bytes(payload)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr("samtune.build.MODEL_REGISTRY", dict(MODEL_REGISTRY))
    good = with_overrides("sam_tiny", url="https://example.org/w/good.pth",
                          sha256=hashlib.sha256(payload).hexdigest())
    register_model("dl_good", good)
    register_model("dl_bad", with_overrides("sam_tiny", url="https://example.org/w/bad.pth", sha256="0" * 64))
    register_model("dl_unverified", with_overrides("sam_tiny", url="https://example.org/w/any.pth"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = download_checkpoint("dl_good", tmp_path)
        assert path == tmp_path / "good.pth" and path.read_bytes() == payload
        assert download_checkpoint("dl_good", tmp_path) == path and len(calls) == 1  # verified file reused
    with pytest.raises(CheckpointError, match=r"sha256 [0-9a-f]{64} does not match the expected 0000"):
        download_checkpoint("dl_bad", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pth"]  # nothing left of the bad download
    with pytest.warns(UserWarning, match="'dl_unverified' is registered without a sha256"):
        assert download_checkpoint("dl_unverified", tmp_path).read_bytes() == payload
