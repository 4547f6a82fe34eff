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


def test_a_model_cast_whole_to_bf16_decodes_like_fp32() -> None:
    """Lightning's ``bf16-true`` casts the model itself: the decoder takes the prompt encoder's fp32 positional
    encodings and fp32 mask inputs (it used to fail: 'mat1 and mat2 must have the same dtype'), and gives what the
    fp32 model gives, to bf16 rounding."""
    from samtune.build import build_sam

    torch.manual_seed(0)
    model = build_sam("sam_tiny").eval()
    size = model.image_encoder.img_size
    images = torch.rand(1, 3, size, size)
    prompts = dict(point_coords=torch.rand(2, 1, 2) * size, point_labels=torch.ones(2, 1),
                   boxes=torch.tensor([[10.0, 20.0, 150.0, 200.0]] * 2),
                   mask_inputs=torch.randn(2, 1, 4 * size // 16, 4 * size // 16))
    with torch.no_grad():
        expected, expected_iou = model.decode(model.encode_image(images), **prompts)
        model.to(torch.bfloat16)
        logits, iou = model.decode(model.encode_image(images.to(torch.bfloat16)), **prompts)
    assert logits.dtype == iou.dtype == torch.bfloat16
    scale = expected.abs().max()
    assert (logits.float() - expected).abs().max() < 0.05 * scale
    assert ((logits > 0) == (expected > 0)).float().mean() > 0.98
    torch.testing.assert_close(iou.float(), expected_iou, atol=0.05 * expected_iou.abs().max(), rtol=0)
