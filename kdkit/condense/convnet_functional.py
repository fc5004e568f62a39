"""ConvNet-3 run from a flat parameter vector, the form trajectory matching needs.

Trajectory matching unrolls student SGD steps on parameters that are plain tensors in an autograd graph, and
compares them with an expert's stored snapshot; both are one flat vector (the order of
`model.named_parameters()`). `functional_forward` runs the module's own `forward` on those parameters through
`torch.func.functional_call`, so there is exactly one ConvNet definition (`kdkit.models.cifar.convnet`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ..models.cifar.convnet import ConvNet


def make_convnet(num_classes: int = 10, width: int = 128, depth: int = 3, norm: str = "instancenorm",
                 im_size: int = 32, in_channels: int = 3) -> ConvNet:
    """The distillation literature's ConvNet-D (instance norm, average pooling), default init."""
    return ConvNet(num_classes, width=width, depth=depth, norm=norm, im_size=im_size, in_channels=in_channels)


class FlatConvNet:
    """A module plus the layout of its parameters in one flat vector."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self) -> torch.Tensor:
        """The module's current parameters as one detached flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def load(self, flat: torch.Tensor) -> None:
        """Copy a flat vector into the module's parameters (for a plain, stateful evaluation)."""
        with torch.no_grad():
            for p, t in zip(self.model.parameters(), flat.split(self.numels)):
                p.copy_(t.view_as(p))

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflatten(flat), (x,))


def functional_forward(model: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` with its parameters replaced by the flat vector `flat` (differentiable in both)."""
    return FlatConvNet(model)(flat, x)
