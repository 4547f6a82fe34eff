"""A tiny fake SAM with the decode contract of ``samtune.modeling.Sam`` for the prompt and loss tests."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn


class FakeSam(nn.Module):
    """Decoder stand-in: logits from Gaussian bumps at the points, the box interior and the mask input.

    Token t adds ``token_bias[t]``; the predicted IoU is a sigmoid of the mean logit plus ``iou_bias[t]``.
    Every call is recorded in ``self.calls`` (inputs cloned) so tests can check what the simulator sent.
    Pure tensor code: no host synchronisation.
    """

    def __init__(self, image_size: int = 64, low_res_size: int = 16) -> None:
        super().__init__()
        self.image_size = image_size
        self.low_res_size = low_res_size
        self.point_gain = nn.Parameter(torch.tensor(4.0))
        self.box_gain = nn.Parameter(torch.tensor(3.0))
        self.mask_gain = nn.Parameter(torch.tensor(0.5))
        self.background = nn.Parameter(torch.tensor(-1.0))
        self.token_bias = nn.Parameter(torch.tensor([0.0, 1.0, -0.5, -2.0]))
        self.iou_bias = nn.Parameter(torch.tensor([0.0, 0.3, 0.1, -0.2]))
        self.calls: list[dict[str, Any]] = []

    def decode(
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_all_tokens: bool = False,
        pad_points: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert pad_points is False, "the simulator and the evaluator send their own padding token"
        self.calls.append(
            {
                "point_coords": None if point_coords is None else point_coords.detach().clone(),
                "point_labels": None if point_labels is None else point_labels.clone(),
                "coords_requires_grad": point_coords is not None and point_coords.requires_grad,
                "mask_inputs": None if mask_inputs is None else mask_inputs.detach().clone(),
                "mask_requires_grad": mask_inputs is not None and mask_inputs.requires_grad,
                "multimask_output": multimask_output,
                "return_all_tokens": return_all_tokens,
            }
        )
        m = image_index.shape[0]
        size, scale = self.low_res_size, self.image_size / self.low_res_size
        centres = (torch.arange(size, dtype=torch.float32, device=image_index.device) + 0.5) * scale - 0.5
        field = self.background + image_embeddings.mean(dim=(1, 2, 3))[image_index][:, None, None]
        field = field.expand(m, size, size)
        if point_coords is not None:
            xs = centres.view(1, 1, 1, size)
            ys = centres.view(1, 1, size, 1)
            d2 = (xs - point_coords[..., 0, None, None]) ** 2 + (ys - point_coords[..., 1, None, None]) ** 2
            bump = torch.exp(-d2 / (2 * (self.image_size / 10) ** 2))  # [M, P, L, L]
            sign = (point_labels == 1).float() - (point_labels == 0).float()
            field = field + self.point_gain * (sign[..., None, None] * bump).sum(dim=1)
            tl = (point_coords * (point_labels == 2)[..., None]).sum(dim=1)  # [M, 2]
            br = (point_coords * (point_labels == 3)[..., None]).sum(dim=1)
            has_box = (point_labels == 2).any(dim=1).float()[:, None, None]
            inside = (
                (xs[0] >= tl[:, 0, None, None]) & (xs[0] <= br[:, 0, None, None])
                & (ys[0] >= tl[:, 1, None, None]) & (ys[0] <= br[:, 1, None, None])
            ).float()
            field = field + self.box_gain * has_box * (2 * inside - 1)
        if mask_inputs is not None:
            field = field + self.mask_gain * mask_inputs[:, 0]
        logits = field[:, None] + self.token_bias.view(1, 4, 1, 1)
        iou = torch.sigmoid(logits.mean(dim=(-2, -1)) + self.iou_bias)
        if return_all_tokens:
            return logits, iou
        if multimask_output:
            return logits[:, 1:], iou[:, 1:]
        return logits[:, :1], iou[:, :1]


@pytest.fixture
def fake_sam() -> FakeSam:
    return FakeSam()


@pytest.fixture
def embeddings() -> torch.Tensor:
    """``[2, 8, 4, 4]`` image embeddings of two images."""
    return torch.randn(2, 8, 4, 4) * 0.1
