"""Adapter checkpoints: small files of trainable weights + metadata, weights_only-safe, atomic; reloaded in a fresh
process they reproduce the adapted model; wrong or missing bases give clear errors."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import samtune
from samtune.adapt import (
    AdaptationConfig,
    apply_adaptation,
    is_adapter_checkpoint,
    load_adapter_checkpoint,
    read_adapter_checkpoint,
    save_adapter_checkpoint,
    trainable_state_dict,
)
from samtune.build import build_sam
from samtune.checkpoints import CheckpointError, save_checkpoint
from tests.adapt.helpers import eval_outputs, make_inputs, train_steps
from tests.conftest import REPO_ROOT

LORA = AdaptationConfig(method="lora", lora_rank=4, lora_include_decoder=True, freeze_policy="prompt_decoder")
ADAPTER = AdaptationConfig(method="adapter", adapter_dim=16, blocks=[1, 3], freeze_policy="decoder_only")


def adapted_model(folder, config: AdaptationConfig):
    """sam_tiny from a base file, adapted and trained for one step; returns (model, base path)."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    base = save_checkpoint(build_sam("sam_tiny"), folder / "base.pth")
    model = apply_adaptation(build_sam("sam_tiny", base), config)
    train_steps(model, steps=1)
    return model, base


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One trained model per method (shared: tests must not change them)."""
    root = tmp_path_factory.mktemp("trained")
    return {name: adapted_model(root / name, config) for name, config in (("lora", LORA), ("adapter", ADAPTER))}


def assert_same_outputs(a, b) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_round_trip_and_contents(tmp_path, trained, name, suffix):
    model, base = trained[name]
    config = {"lora": LORA, "adapter": ADAPTER}[name]
    path = save_adapter_checkpoint(model, tmp_path / f"adapter{suffix}", model_name="sam_tiny", base_checkpoint=base,
                                   config=config)
    assert is_adapter_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir()] == [f"adapter{suffix}"]  # no temporary files left
    meta, tensors = read_adapter_checkpoint(path)
    assert set(tensors) == set(trainable_state_dict(model)) == set(meta["trainable_keys"])
    assert meta["format"] == "samtune-adapter" and meta["samtune_version"] == samtune.__version__
    assert (meta["model_name"], meta["base_checkpoint"], meta["complete"]) == ("sam_tiny", str(base), False)
    assert meta["adaptation"] == config.to_dict()
    json.dumps(meta)  # plain values only
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)  # no pickled Python objects
        assert set(raw) == {"samtune_adapter", "state_dict"}
    assert os.path.getsize(path) < 0.5 * os.path.getsize(base)
    inputs = make_inputs(model)
    assert_same_outputs(eval_outputs(model, inputs), eval_outputs(load_adapter_checkpoint(path), inputs))


def test_reloaded_in_a_fresh_process(tmp_path, trained):
    """Both methods and both formats, loaded by a new Python process, give the same outputs."""
    files, expected = {}, {}
    for name, suffix in (("lora", ".safetensors"), ("adapter", ".pt")):
        model, base = trained[name]
        files[name] = save_adapter_checkpoint(model, tmp_path / f"{name}{suffix}", model_name="sam_tiny",
                                              base_checkpoint=base)
        inputs = make_inputs(model, seed=3)
        expected[name] = eval_outputs(model, inputs)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        from samtune.adapt import load_adapter_checkpoint
        from tests.adapt.helpers import eval_outputs
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        out = {{}}
        for name, path in {({k: str(v) for k, v in files.items()})!r}.items():
            out[name] = eval_outputs(load_adapter_checkpoint(path), inputs)
        torch.save(out, {str(tmp_path / 'outputs.pt')!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for name in files:
        assert_same_outputs(expected[name], got[name])


def test_wrong_missing_or_moved_base(tmp_path, trained):
    model, shared_base = trained["lora"]
    base = tmp_path / "base0.pth"
    base.write_bytes(shared_base.read_bytes())
    path = save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=base)
    inputs = make_inputs(model)
    expected = eval_outputs(model, inputs)
    # another base of the same architecture: shapes fit, the fingerprint does not
    torch.manual_seed(1)
    other = save_checkpoint(build_sam("sam_tiny"), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"not the ones the adapter was trained on .* frozen tensors differ"):
        load_adapter_checkpoint(path, base_checkpoint=other)
    # a base of another model
    tiny_vit = save_checkpoint(build_sam("sam_tiny_vit_t"), tmp_path / "tiny_vit.pth")
    with pytest.raises(CheckpointError, match=r"\(model 'sam_tiny'\): the base checkpoint does not fit"):
        load_adapter_checkpoint(path, base_checkpoint=tiny_vit)
    # the base moved: a clear error, and base_checkpoint= points to the new place
    moved = base.rename(tmp_path / "moved.pth")
    with pytest.raises(CheckpointError, match="base checkpoint .*base0.pth not found.*pass base_checkpoint="):
        load_adapter_checkpoint(path)
    assert_same_outputs(expected, eval_outputs(load_adapter_checkpoint(path, base_checkpoint=moved), inputs))


def test_blocks_wrapped_for_activation_checkpointing_or_fsdp_keep_their_trainable_weights(tmp_path, trained):
    """Lightning's FSDP strategy (configs/trainer/fsdp.yaml) wraps the encoder blocks: module names gain a level
    (``_checkpoint_wrapped_module``, ``_fsdp_wrapped_module``) that state-dict keys lack. The LoRA weights inside
    must still count as trainable, not as frozen base (which checkpoints strip and fingerprint)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from samtune.adapt.core import base_fingerprint
    from samtune.modeling.image_encoder import EncoderBlock

    model, base = trained["lora"]
    model = copy.deepcopy(model)
    trainable, fingerprint = sorted(trainable_state_dict(model)), base_fingerprint(model)
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, EncoderBlock))
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_parameters())
    assert sorted(trainable_state_dict(model)) == trainable
    assert base_fingerprint(model) == fingerprint
    path = save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=base)
    inputs = make_inputs(model)
    assert_same_outputs(eval_outputs(model, inputs), eval_outputs(load_adapter_checkpoint(path), inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_saved_from_a_half_precision_model_loads_on_its_float32_base(tmp_path, trained, dtype):
    """A model held in bf16 / fp16 when saved has its frozen base rounded to that dtype: the float32 base file it was
    built from is still its base (rounded alike it is the same), not 'not the ones the adapter was trained on'."""
    model, base = trained["lora"]
    half = copy.deepcopy(model).to(dtype)
    path = save_adapter_checkpoint(half, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=base)
    loaded = load_adapter_checkpoint(path)
    expected = {k: v.float() for k, v in trainable_state_dict(half).items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    # still a wrong base for another file of the same architecture
    torch.manual_seed(1)
    other = save_checkpoint(build_sam("sam_tiny"), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not the ones the adapter was trained on"):
        load_adapter_checkpoint(path, base_checkpoint=other)


def test_random_base_needs_a_base_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny"), ADAPTER)
    path = save_adapter_checkpoint(model, tmp_path / "a.safetensors", model_name="sam_tiny", base_checkpoint=None)
    with pytest.raises(CheckpointError, match="records no base checkpoint .*random weights.*pass base_checkpoint="):
        load_adapter_checkpoint(path)


def test_save_errors(tmp_path):
    torch.manual_seed(0)
    plain = build_sam("sam_tiny")
    with pytest.raises(ValueError, match="the model is not adapted"):
        save_adapter_checkpoint(plain, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=None)
    model = apply_adaptation(plain, LORA)
    with pytest.raises(ValueError, match=r"config differs from the adaptation applied .*'lora_rank': \(8, 4\)"):
        save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=None,
                                config=LORA.to_dict() | {"lora_rank": 8})
    with pytest.raises(ValueError, match="unknown model 'sam_huge'"):
        save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_huge", base_checkpoint=None)
    assert not any(tmp_path.iterdir())


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny"), ADAPTER)
    path = save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=None)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter_checkpoint(model, path, model_name="sam_tiny", base_checkpoint=None)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=lambda m: f"umask{m:03o}")
def test_saved_files_get_the_mode_torch_save_gives(tmp_path, umask, monkeypatch):
    """Adapter files are readable like torch.save's (0o666 & ~umask), not mkstemp's / safetensors' 0o600; the
    umask is the same when /proc cannot be read."""
    from samtune import files as adapter_checkpoint

    torch.manual_seed(0)
    model = apply_adaptation(build_sam("sam_tiny"), LORA)
    old = os.umask(umask)
    try:
        for suffix in (".pt", ".safetensors"):
            path = save_adapter_checkpoint(model, tmp_path / f"a{suffix}", model_name="sam_tiny", base_checkpoint=None)
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (suffix, oct(path.stat().st_mode))
        expected = adapter_checkpoint.new_file_mode()

        def no_proc(*args, **kwargs):
            raise OSError("no /proc")

        monkeypatch.setattr(adapter_checkpoint, "open", no_proc, raising=False)
        assert adapter_checkpoint.new_file_mode() == expected == 0o666 & ~umask
        assert os.umask(umask) == umask  # restored by the fallback
    finally:
        os.umask(old)


def test_plain_and_broken_files_are_not_adapter_checkpoints(tmp_path):
    torch.manual_seed(0)
    plain = save_checkpoint(build_sam("sam_tiny"), tmp_path / "plain.pth")
    plain_st = save_checkpoint(build_sam("sam_tiny"), tmp_path / "plain.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (plain, plain_st, garbage, tmp_path / "missing.pt"):
        assert not is_adapter_checkpoint(path)
    with pytest.raises(CheckpointError, match="no samtune adapter metadata .*build_sam"):
        load_adapter_checkpoint(plain)
    with pytest.raises(CheckpointError, match="safetensors file without samtune adapter metadata"):
        load_adapter_checkpoint(plain_st)
    with pytest.raises(CheckpointError, match="file not found"):
        load_adapter_checkpoint(tmp_path / "missing.pt")


def test_relative_base_is_found_from_another_directory(tmp_path, trained, monkeypatch):
    """A base given relative to the run's directory (as recipes do) is recorded absolute too, so the adapter loads
    from anywhere."""
    model, shared_base = trained["lora"]
    run, weights = tmp_path / "project" / "run", tmp_path / "project" / "weights"
    run.mkdir(parents=True)
    weights.mkdir()
    (weights / "base.pth").write_bytes(shared_base.read_bytes())
    monkeypatch.chdir(run)
    path = save_adapter_checkpoint(model, run / "a.pt", model_name="sam_tiny", base_checkpoint="../weights/base.pth")
    meta, _ = read_adapter_checkpoint(path)
    assert meta["base_checkpoint"] == "../weights/base.pth"
    assert os.path.samefile(meta["base_checkpoint_absolute"], weights / "base.pth")
    monkeypatch.chdir(weights)  # ../weights/base.pth is not there from here
    inputs = make_inputs(model)
    assert_same_outputs(eval_outputs(model, inputs), eval_outputs(load_adapter_checkpoint(path), inputs))


def test_unresolvable_relative_base_names_the_flag_and_the_argument(tmp_path, trained, monkeypatch):
    """Files written before the absolute path was recorded: a clear error naming --base-checkpoint and
    base_checkpoint=, and both ways to pass the base work."""
    model, shared_base = trained["lora"]
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "base.pth").write_bytes(shared_base.read_bytes())
    monkeypatch.chdir(run)
    path = save_adapter_checkpoint(model, run / "a.pt", model_name="sam_tiny", base_checkpoint="../base.pth")
    raw = torch.load(path, weights_only=True)
    for key in ("base_checkpoint_absolute", "mae_checkpoint_absolute"):
        del raw["samtune_adapter"][key]
    torch.save(raw, path)
    assert isinstance(load_adapter_checkpoint(path), torch.nn.Module)  # from the run's directory: as before
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CheckpointError, match=r"base checkpoint \.\./base\.pth not found .*current directory .*"
                                              r"pass base_checkpoint= \(Python\) or --base-checkpoint"):
        load_adapter_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"base checkpoint .*nope\.pth not found \(given as base_checkpoint="):
        load_adapter_checkpoint(path, base_checkpoint=tmp_path / "nope.pth")
    inputs = make_inputs(model)
    loaded = load_adapter_checkpoint(path, base_checkpoint=tmp_path / "base.pth")
    assert_same_outputs(eval_outputs(model, inputs), eval_outputs(loaded, inputs))


def test_bottleneck_adapters_run_unmerged_in_the_predictor_and_evaluate(tmp_path, trained):
    """Bottleneck adapters cannot be folded into linear weights: inference loads them as modules (LoRA is merged),
    and only an explicit merge is an error."""
    from samtune import Predictor
    from samtune.evaluation.cli import load_model
    from samtune.export import load_sam

    model, base = trained["adapter"]
    path = save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=base,
                                   config=ADAPTER)
    inputs = make_inputs(model)
    expected = eval_outputs(model, inputs)
    predictor = Predictor.from_checkpoint(path, precision="fp32")
    assert_same_outputs(eval_outputs(predictor.model, inputs), expected)
    assert_same_outputs(eval_outputs(load_model(path, None), inputs), expected)
    loaded = load_sam(path, merge_adapters="auto")
    assert (loaded.merged, loaded.name) == (False, "sam_tiny")
    with pytest.raises(CheckpointError, match="cannot be merged"):
        load_sam(path, merge_adapters=True)
    from samtune.export import export_checkpoint

    # Without --merge the error points to the format that holds adapters (it used to say "pass --merge", which
    # then failed with "cannot be merged").
    with pytest.raises(ValueError, match=r"\(adapter\).*cannot be merged into them: export with --format safetensors"):
        export_checkpoint(path, tmp_path / "a.pth", "pth")
    lora, lora_base = trained["lora"]
    lora_path = save_adapter_checkpoint(lora, tmp_path / "l.pt", model_name="sam_tiny", base_checkpoint=lora_base,
                                        config=LORA)
    assert load_sam(lora_path, merge_adapters="auto").merged
    # LoRA weights that merge to NaN are broken, not unmergeable: "auto" used to keep them unmerged without a word
    weight = next(p for n, p in lora.named_parameters() if "lora_B" in n)
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        nan_path = save_adapter_checkpoint(lora, tmp_path / "nan.pt", model_name="sam_tiny",
                                           base_checkpoint=lora_base, config=LORA)
    finally:  # the fixture is shared by the module's tests
        with torch.no_grad():
            weight.copy_(kept)
    with pytest.raises(CheckpointError, match=r"nan\.pt: its adaptation cannot be merged .*non-finite"):
        load_sam(nan_path, merge_adapters="auto")


def test_complete_checkpoint_needs_no_recorded_files(tmp_path):
    """A checkpoint marked complete (every weight stored, e.g. a Lightning checkpoint of a run started from random
    weights + MAE) reloads without the MAE file it records, which may be gone, and without re-initialising."""
    from timm.models.vision_transformer import VisionTransformer

    from samtune.adapt.checkpoint import METADATA_KEY, adapter_metadata
    from samtune.checkpoints import init_encoder_from_mae

    torch.manual_seed(0)
    mae = tmp_path / "mae.pth"
    torch.save(VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=4, num_heads=3, global_pool="",
                                 class_token=True, num_classes=0).state_dict(), mae)
    model = build_sam("sam_tiny")
    init_encoder_from_mae(model.image_encoder, mae)
    apply_adaptation(model, LORA)
    train_steps(model, steps=1)
    meta = adapter_metadata(model, model_name="sam_tiny", base_checkpoint=None, mae_checkpoint=mae, complete=True)
    path = tmp_path / "complete.pt"
    torch.save({METADATA_KEY: meta, "state_dict": dict(model.state_dict())}, path)
    mae.unlink()
    inputs = make_inputs(model)
    assert_same_outputs(eval_outputs(model, inputs), eval_outputs(load_adapter_checkpoint(path), inputs))


@pytest.mark.parametrize(("saved", "resumed"), [("trainable", "full"), ("full", "trainable")])
def test_task_resumes_with_another_checkpoint_weights_setting(tmp_path, saved, resumed):
    """``checkpoint_weights`` says what later checkpoints store, not how the model is adapted: a run resumed (or
    loaded) with the other setting restores the same model instead of refusing the checkpoint."""
    from samtune.tasks import PromptableSegmentationTask

    torch.manual_seed(0)
    base = str(save_checkpoint(build_sam("sam_tiny"), tmp_path / "base.pth"))
    config = LORA.to_dict()
    task = PromptableSegmentationTask("sam_tiny", base, adaptation=config | {"checkpoint_weights": saved})
    with torch.no_grad():
        for name, param in task.model.named_parameters():
            if param.requires_grad:
                param.add_(0.01)  # "trained"
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    other = PromptableSegmentationTask("sam_tiny", base, adaptation=config | {"checkpoint_weights": resumed})
    other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"])
    expected = task.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in other.model.state_dict().items())


def test_complete_checkpoint_warns_that_a_given_base_is_unused(tmp_path):
    """A complete checkpoint stores every weight: a base passed along is not read, and the caller is told so
    instead of believing the weights came from it."""
    from samtune.adapt.checkpoint import METADATA_KEY, adapter_metadata

    torch.manual_seed(0)
    model = build_sam("sam_tiny")
    apply_adaptation(model, LORA)
    meta = adapter_metadata(model, model_name="sam_tiny", base_checkpoint=None, complete=True)
    path = tmp_path / "complete.pt"
    torch.save({METADATA_KEY: meta, "state_dict": dict(model.state_dict())}, path)
    other = save_checkpoint(build_sam("sam_tiny"), tmp_path / "other.pth")
    inputs = make_inputs(model)
    with pytest.warns(UserWarning, match=r"complete.*other\.pth is not used"):
        loaded = load_adapter_checkpoint(path, base_checkpoint=other)
    assert_same_outputs(eval_outputs(model, inputs), eval_outputs(loaded, inputs))


@pytest.mark.parametrize("version", ["one", 1.5, None, True])
def test_bad_format_version_is_a_checkpoint_error(tmp_path, version):
    """A corrupt ``format_version`` is reported as a bad adapter file naming the key, not a bare ValueError."""
    from samtune.adapt.checkpoint import METADATA_KEY, adapter_metadata

    model = build_sam("sam_tiny")
    apply_adaptation(model, LORA)
    meta = adapter_metadata(model, model_name="sam_tiny", base_checkpoint=None, complete=True) | {
        "format_version": version}
    path = tmp_path / "bad.pt"
    torch.save({METADATA_KEY: meta, "state_dict": dict(model.state_dict())}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt: adapter metadata 'format_version' must be"):
        load_adapter_checkpoint(path)


MAPPING = {"bands": [2], "intensity": "percentile", "percentiles": [1.0, 99.0], "window": None}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_adapter_files_carry_the_input_mapping(tmp_path, trained, suffix):
    """The training data's input mapping (bands, intensity) that a task's Lightning checkpoint records travels into
    the standalone adapter files written from it (extracted, or saved by the task or save_adapter_checkpoint), and
    the loaders of those files (load_sam, Predictor.from_checkpoint, samtune export) expose it as they do for the
    Lightning checkpoint."""
    from samtune import Predictor
    from samtune.checkpoints import INPUT_MAPPING_KEY
    from samtune.export import export_checkpoint, load_sam, read_export_metadata
    from samtune.tasks import PromptableSegmentationTask

    model, base = trained["lora"]
    task = PromptableSegmentationTask("sam_tiny", str(base), adaptation=LORA.to_dict())
    task.model.load_state_dict(model.state_dict())
    task.input_mapping = dict(MAPPING)
    ckpt = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(ckpt)
    assert ckpt[INPUT_MAPPING_KEY] == MAPPING
    run = tmp_path / "run.ckpt"
    torch.save(ckpt, run)
    assert load_sam(run).input_mapping == MAPPING  # the Lightning checkpoint itself

    from samtune.adapt import extract_adapter_checkpoint

    inputs = make_inputs(model)
    expected = eval_outputs(model, inputs)

    def check(path, what):
        meta, _ = read_adapter_checkpoint(path)
        loaded = load_sam(path, base_checkpoint=base)
        assert loaded.input_mapping == MAPPING, what
        assert meta.get("input_mapping") == MAPPING, what
        for got, want in zip(eval_outputs(loaded.model, inputs), expected):  # LoRA merged: rounding differs
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert Predictor.from_checkpoint(path, base_checkpoint=base).input_mapping == MAPPING, what

    extracted = extract_adapter_checkpoint(run, tmp_path / f"extracted{suffix}")
    check(extracted, "extracted from the Lightning checkpoint")
    check(extract_adapter_checkpoint(extracted, tmp_path / f"again{suffix}"), "extracted from an adapter file")
    check(task.save_adapter_checkpoint(tmp_path / f"task{suffix}"), "saved by the task")
    check(save_adapter_checkpoint(model, tmp_path / f"saved{suffix}", model_name="sam_tiny", base_checkpoint=base,
                                  input_mapping=MAPPING), "save_adapter_checkpoint(input_mapping=)")
    exported = export_checkpoint(extracted, tmp_path / "exported.pth", "pth", merge=True)
    assert read_export_metadata(exported.output)["input_mapping"] == MAPPING
    # a file saved without a mapping records none, and its loaders say so (None), as for official weights
    plain = save_adapter_checkpoint(model, tmp_path / f"plain{suffix}", model_name="sam_tiny", base_checkpoint=base)
    assert read_adapter_checkpoint(plain)[0].get("input_mapping") is None
    assert load_sam(plain).input_mapping is None
    with pytest.raises(TypeError, match="input_mapping must be a dict"):
        save_adapter_checkpoint(model, tmp_path / f"bad{suffix}", model_name="sam_tiny", base_checkpoint=base,
                                input_mapping=["bands", 2])


def test_corrupt_input_mapping_metadata_is_a_checkpoint_error(tmp_path):
    from samtune.adapt.checkpoint import METADATA_KEY, adapter_metadata

    model = apply_adaptation(build_sam("sam_tiny"), LORA)
    meta = adapter_metadata(model, model_name="sam_tiny", base_checkpoint=None, complete=True) | {
        "input_mapping": "band 2"}
    path = tmp_path / "bad.pt"
    torch.save({METADATA_KEY: meta, "state_dict": dict(model.state_dict())}, path)
    with pytest.raises(CheckpointError, match=r"bad\.pt: adapter metadata 'input_mapping' must be a dict or null"):
        read_adapter_checkpoint(path)


def test_adapter_file_that_does_not_fit_names_the_keys(tmp_path, trained):
    """A trainable-weights-only file is validated against the adapted model it records: a missing trainable weight,
    a mis-shaped or unknown tensor, or a frozen base weight (which must come from the verified base checkpoint,
    not silently replace it) is a CheckpointError naming the key."""
    model, base = trained["lora"]
    path = save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=base)
    trainable = sorted(trainable_state_dict(model))
    key = trainable[0]
    pos = model.state_dict()["image_encoder.pos_embed"]
    cases = {
        "missing": (lambda sd: sd.pop(key), rf"1 trainable weights missing: \['{key}'\]"),
        "misshaped": (lambda sd: sd.__setitem__(key, torch.zeros(3)), rf"mis-shaped: \['{key} \(file \(3,\) vs model"),
        "unexpected": (lambda sd: sd.__setitem__("image_encoder.foo.weight", torch.zeros(3)),
                       r"unexpected keys: \['image_encoder\.foo\.weight'\]"),
        "frozen": (lambda sd: sd.__setitem__("image_encoder.pos_embed", torch.zeros_like(pos)),
                   r"frozen base weights.*\['image_encoder\.pos_embed'\]"),
    }
    for name, (mutate, message) in cases.items():
        raw = torch.load(path, weights_only=True)
        mutate(raw["state_dict"])
        torch.save(raw, tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=rf"{name}\.pt does not fit model 'sam_tiny'.*{message}"):
            load_adapter_checkpoint(tmp_path / f"{name}.pt")
