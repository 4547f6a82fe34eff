"""Small building blocks shared by the encoder and the decoder (official SAM parameter names)."""
from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn import functional as F

__all__ = ["LayerNorm2d", "MLPBlock", "MLP"]


class MLPBlock(nn.Module):
    """Two-layer MLP with parameters named ``lin1``/``lin2`` as in the official checkpoints.

    Args:
        embedding_dim: input and output width.
        mlp_dim: hidden width.
        act: activation class.
        drop: dropout after the activation and after ``lin2`` (0 in SAM).
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., embedding_dim] -> [..., embedding_dim]``."""
        h = self.lin1(x)
        if (
            type(self.act) is nn.GELU
            and self.act.approximate == "none"
            and not (torch.is_grad_enabled() and h.requires_grad)
            and not torch.compiler.is_compiling()
        ):
            # No autograd: activate in place. The hidden activations are the largest tensors of a ViT block
            # (50 MB per image in fp32 for ViT-B at 1024); a second one costs a fresh, page-faulted allocation.
            h = torch.ops.aten.gelu_(h)
        else:
            h = self.act(h)
        return self.drop(self.lin2(self.drop(h)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the decoder's hypernetwork and IoU heads).

    Parameters are ``layers.{i}.weight/bias`` as in the official checkpoints.
    """

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, sigmoid_output: bool = False
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., input_dim] -> [..., output_dim]``."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
