"""``precision="auto"``: bf16 only where the hardware runs it natively."""
from __future__ import annotations

import pytest
import torch

from samtune.modeling import precision


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_follows_the_device_capability(monkeypatch, capability, expected) -> None:
    """Turing (7.5) emulates bf16 (torch.cuda.is_bf16_supported() says True there): auto must pick fp32."""
    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: asked.append(index) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.resolve_precision("auto", "cuda:1") == expected
    assert precision.resolve_precision("auto", "cuda") == expected
    assert asked == [1, 0]  # the given device, else the current one


def test_explicit_and_bad_values(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be"):
        precision.resolve_precision("fp16", "cpu")  # type: ignore[arg-type]
