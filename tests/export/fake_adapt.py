"""Stand-ins for samtune.adapt's checkpoint functions (not on main yet), to test the wiring of load_sam/export."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import samtune.adapt
from samtune import Sam, build_sam


class FakeAdapt:
    """Stand-ins for samtune.adapt's functions with their documented signatures: an "adapter" is one extra
    parameter ``mask_decoder.lora_delta`` added to ``iou_token.weight`` on merge."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def apply_adaptation(self, model: Sam, config: dict) -> Sam:
        self.calls.append(("apply", dict(config)))
        model.mask_decoder.lora_delta = nn.Parameter(torch.zeros_like(model.mask_decoder.iou_token.weight))
        return model

    def merge_adaptation(self, model: Sam) -> Sam:
        self.calls.append(("merge",))
        with torch.no_grad():
            model.mask_decoder.iou_token.weight += model.mask_decoder.lora_delta
        del model.mask_decoder.lora_delta
        return model

    def is_adapter_checkpoint(self, path: Path) -> bool:
        return Path(path).suffix == ".adapter"

    def load_adapter_checkpoint(self, path: Path, base_checkpoint: Path | None = None) -> Sam:
        self.calls.append(("load_adapter", Path(path), base_checkpoint))
        model = self.apply_adaptation(build_sam("sam_tiny", base_checkpoint), {"method": "lora"})
        model.mask_decoder.lora_delta.data.fill_(0.25)
        return model


@pytest.fixture
def fake_adapt(monkeypatch) -> FakeAdapt:
    fake = FakeAdapt()
    for name in ("apply_adaptation", "merge_adaptation", "is_adapter_checkpoint", "load_adapter_checkpoint"):
        monkeypatch.setattr(samtune.adapt, name, getattr(fake, name), raising=False)
    return fake


def lightning_like_checkpoint(tiny: Sam, path: Path, adaptation: dict | None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A checkpoint in Lightning's layout whose hyper-parameters carry an adaptation config."""
    state = {f"model.{k}": v for k, v in tiny.state_dict().items()}
    state.update({f"model.{k}": v for k, v in (extra or {}).items()})
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.5.0",
                "hyper_parameters": {"model": "sam_tiny", "adaptation": adaptation}}, path)
    return path
