"""AdaptationConfig: defaults, validation with clear errors, plain-dict / YAML round trip."""
from __future__ import annotations

import pickle

import pytest
import torch
import yaml

from samtune.adapt import AdaptationConfig


def test_defaults_and_plain_round_trip(tmp_path):
    config = AdaptationConfig(method="lora", blocks=[0, -1], lora_targets=["qkv"], freeze_policy="last_k", last_k=2)
    assert config.blocks == (0, -1) and config.lora_targets == ("qkv",)
    plain = config.to_dict()
    assert plain["blocks"] == [0, -1] and plain["lora_targets"] == ["qkv"] and plain["method"] == "lora"
    # YAML and weights_only torch.load accept the plain form, and it rebuilds an equal config
    assert AdaptationConfig.coerce(yaml.safe_load(yaml.safe_dump(plain))) == config
    torch.save({"adaptation": plain}, tmp_path / "c.pt")
    assert AdaptationConfig.coerce(torch.load(tmp_path / "c.pt", weights_only=True)["adaptation"]) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert AdaptationConfig.coerce(config) is config
    default = AdaptationConfig()
    assert (default.method, default.freeze_policy, default.lora_rank, default.adapter_ratio,
            default.adapter_mlp_scale) == ("none", "decoder_only", 8, 0.25, 0.5)


def test_regex_blocks_are_kept_as_string():
    assert AdaptationConfig(method="adapter", blocks=r"blocks\.(2|5)").blocks == r"blocks\.(2|5)"
    for alias in ("all", "None", "null"):  # "None": a command-line null as jsonargparse may pass it
        assert AdaptationConfig(method="adapter", blocks=alias).blocks is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "prefix"}, "AdaptationConfig.method must be one of"),
        ({"freeze_policy": "encoder"}, "AdaptationConfig.freeze_policy must be one of"),
        ({"freeze_policy": "frozen"}, "leaves nothing to train"),
        ({"freeze_policy": "last_k"}, "AdaptationConfig.last_k must be a positive integer"),
        ({"freeze_policy": "last_k", "last_k": 0}, "AdaptationConfig.last_k must be a positive integer"),
        ({"last_k": 2}, "only applies to freeze_policy 'last_k'"),
        ({"blocks": []}, "AdaptationConfig.blocks must be a non-empty list"),
        ({"blocks": [1, 1]}, "repeated indices"),
        ({"blocks": [1.5]}, "AdaptationConfig.blocks must be a non-empty list of integers"),
        ({"blocks": "blocks.("}, "not a valid regular expression"),
        ({"blocks": ""}, "empty pattern"),
        ({"lora_rank": 0}, "AdaptationConfig.lora_rank must be a positive integer"),
        ({"lora_alpha": 0.0}, "AdaptationConfig.lora_alpha must be > 0"),
        ({"lora_dropout": 1.0}, "AdaptationConfig.lora_dropout must be in [0, 1)"),
        ({"lora_targets": ["qkv", "fc1"]}, "AdaptationConfig.lora_targets must be"),
        ({"lora_targets": []}, "AdaptationConfig.lora_targets must be"),
        ({"lora_decoder_targets": ["q"]}, "AdaptationConfig.lora_decoder_targets must be"),
        ({"adapter_dim": 0}, "AdaptationConfig.adapter_dim must be a positive integer"),
        ({"adapter_ratio": -0.1}, "AdaptationConfig.adapter_ratio must be > 0"),
        ({"adapter_positions": ["mlp", "mlp"]}, "AdaptationConfig.adapter_positions must be"),
        ({"checkpoint_weights": "some"}, "AdaptationConfig.checkpoint_weights must be"),
    ],
)
def test_invalid_values_name_the_field(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        AdaptationConfig(**kwargs)


def test_coerce_rejects_unknown_keys_and_types():
    with pytest.raises(ValueError, match=r"adaptation: unknown keys \['rank'\] for AdaptationConfig"):
        AdaptationConfig.coerce({"method": "lora", "rank": 4})
    with pytest.raises(TypeError, match="adaptation must be an AdaptationConfig or a dict"):
        AdaptationConfig.coerce("lora")


def test_integral_float_last_k_is_an_int_that_applies():
    """``last_k: 2.0`` (a YAML / JSON float) passes the check as a whole number; it must then work like 2."""
    from samtune.adapt import apply_adaptation
    from samtune.build import build_sam

    config = AdaptationConfig(freeze_policy="last_k", last_k=2.0)
    assert config.last_k == 2 and isinstance(config.last_k, int)
    model = apply_adaptation(build_sam("sam_tiny"), config)
    depth = len(model.image_encoder.blocks)
    trains = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and ".blocks." in n}
    assert trains == {str(depth - 2), str(depth - 1)}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lora_alpha": "8"}, "lora_alpha"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"lora_dropout": "0.1"}, "lora_dropout"),
        ({"adapter_ratio": "0.25"}, "adapter_ratio"),
        ({"adapter_ratio": float("inf")}, "adapter_ratio"),
        ({"adapter_mlp_scale": "0.5"}, "adapter_mlp_scale"),
        ({"adapter_mlp_scale": float("nan")}, "adapter_mlp_scale"),
        ({"adapter_mlp_scale": 0.0}, "adapter_mlp_scale"),
    ],
)
def test_non_numbers_and_non_finite_values_name_the_field(kwargs, field):
    """A string, NaN or infinity in a numeric field is an error that names the field (not a bare comparison
    TypeError, and not a config accepted only to give NaN outputs or an adapter branch multiplied by 0)."""
    with pytest.raises(ValueError, match=f"AdaptationConfig.{field} must be"):
        AdaptationConfig(method="adapter", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "none", "blocks": [2, 3]}, "blocks"),
        ({"method": "none", "blocks": r"blocks\.3"}, "blocks"),
        ({"method": "adapter", "lora_include_decoder": True}, "lora_include_decoder"),
        ({"method": "none", "lora_include_decoder": True}, "lora_include_decoder"),
        ({"method": "lora", "adapter_dim": 16}, "adapter_dim"),
    ],
)
def test_settings_the_method_ignores_are_errors(kwargs, field):
    """A non-default setting that the chosen method never reads (``blocks`` without LoRA / adapters, LoRA on the
    decoder with adapters, an adapter width with LoRA) would silently train something else than asked."""
    with pytest.raises(ValueError, match=f"AdaptationConfig.{field}.*method {kwargs['method']!r}"):
        AdaptationConfig(**kwargs)
    # the defaults (what the config fragments list for the other method) stay accepted
    AdaptationConfig(method=kwargs["method"], blocks=None, lora_include_decoder=False, adapter_dim=None)
    AdaptationConfig(method=kwargs["method"], blocks="all")


def test_stored_configs_with_ignored_settings_still_load(tmp_path):
    """A dict form (how checkpoints store the config) saved before such settings were refused: the settings are
    dropped with a warning (they never had an effect), so the checkpoint rebuilds the same model."""
    import torch

    from samtune.adapt import apply_adaptation, load_adapter_checkpoint, save_adapter_checkpoint
    from samtune.build import build_sam
    from samtune.checkpoints import save_checkpoint

    with pytest.warns(UserWarning, match="dropping settings that method 'adapter' ignores: lora_include_decoder"):
        config = AdaptationConfig.coerce({"method": "adapter", "lora_include_decoder": True, "adapter_dim": 4})
    assert config == AdaptationConfig(method="adapter", adapter_dim=4)
    torch.manual_seed(0)
    base = save_checkpoint(build_sam("sam_tiny"), tmp_path / "base.pth")
    model = apply_adaptation(build_sam("sam_tiny", base), dict(method="none", freeze_policy="prompt_decoder"))
    path = save_adapter_checkpoint(model, tmp_path / "a.pt", model_name="sam_tiny", base_checkpoint=base)
    raw = torch.load(path, weights_only=True)
    raw["samtune_adapter"]["adaptation"]["blocks"] = [0, 1]  # as an older samtune accepted and ignored it
    torch.save(raw, path)
    with pytest.warns(UserWarning, match="blocks="):
        loaded = load_adapter_checkpoint(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
