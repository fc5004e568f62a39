"""ConvNet-D of the dataset-distillation literature (Zhao & Bilen's DC/DSA/DM, Cazenavette et al.'s MTT).

`depth` blocks of conv3x3(`width`, with bias) -> norm -> ReLU -> 2x2 average pool, then a linear
classifier ``fc`` on the flattened ``width x (s/2^depth)^2`` map. ``norm="instancenorm"`` is
GroupNorm(width, width, affine) exactly as MTT implements it; ``"batchnorm"`` and ``"none"`` are the usual
ablations. Weights keep PyTorch's default init, as in the reference. Blocks are ``layer1..layer<depth>``.

`im_size` is the input side in pixels; 28 (MNIST-like) is padded to 32 by the first conv, as in MTT.
"""
from __future__ import annotations

import typing
from typing import Literal

from torch import nn

from ...config import PositiveInt
from ...errors import ConfigError
from ...registry import MODELS

Norm = Literal["instancenorm", "batchnorm", "none"]
NORMS: tuple[str, ...] = typing.get_args(Norm)


def _norm(kind: str, width: int) -> list[nn.Module]:
    if kind == "instancenorm":
        return [nn.GroupNorm(width, width, affine=True)]
    if kind == "batchnorm":
        return [nn.BatchNorm2d(width)]
    return []


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 128, depth: int = 3, norm: str = "instancenorm",
                 im_size: int = 32, in_channels: int = 3):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"convnet norm must be one of {', '.join(NORMS)}, got '{norm}'")
        if depth < 1:
            raise ConfigError(f"convnet depth must be >= 1, got {depth}")
        check_side(depth, im_size)
        side = 32 if im_size == 28 else im_size
        cin = in_channels
        for d in range(depth):
            pad = 3 if (d == 0 and im_size == 28) else 1
            self.add_module(f"layer{d + 1}", nn.Sequential(
                nn.Conv2d(cin, width, kernel_size=3, padding=pad),
                *_norm(norm, width),
                nn.ReLU(),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ))
            cin = width
        self.depth = depth
        self.fc = nn.Linear(width * (side // 2 ** depth) ** 2, num_classes)
        self.stages: list[str] = [f"layer{d + 1}" for d in range(depth)]

    def forward(self, x):
        for d in range(self.depth):
            x = getattr(self, f"layer{d + 1}")(x)
        return self.fc(x.flatten(1))


def check_side(depth: int, im_size: int, at: str = "") -> None:
    """The input side must halve `depth` times (28 counts as 32, padded by the first conv)."""
    side = 32 if im_size == 28 else im_size
    if side % (2 ** depth) != 0:
        raise ConfigError(f"{at}im_size={im_size} does not fit {at}depth={depth}: the ConvNet halves its input "
                          f"{depth} times, so the side (28 counts as 32) must be divisible by {2 ** depth}")


def convnet3(num_classes: int = 10, width: PositiveInt = 128, depth: PositiveInt = 3, norm: Norm = "instancenorm",
             im_size: PositiveInt = 32, in_channels: PositiveInt = 3) -> ConvNet:
    return ConvNet(num_classes, width=width, depth=depth, norm=norm, im_size=im_size, in_channels=in_channels)


def _check_convnet3(options: dict, at: str) -> None:
    check_side(options.get("depth", 3), options.get("im_size", 32), at)


convnet3.check_options = _check_convnet3  # the cross-option rule, for `kdkit.models.check_model`
MODELS.register("convnet3", convnet3)


def _convnet3_width(width: int):
    """A named ConvNet-3 of fixed width, so CPU-scale teacher->student pairs can be named like the zoo's."""

    def factory(num_classes: int = 10, norm: Norm = "instancenorm", im_size: PositiveInt = 32,
                in_channels: PositiveInt = 3) -> ConvNet:
        return ConvNet(num_classes, width=width, depth=3, norm=norm, im_size=im_size, in_channels=in_channels)

    factory.__name__ = f"convnet3_w{width}"
    factory.check_options = _check_convnet3
    return factory


for _w in (8, 16, 32, 64):
    MODELS.register(f"convnet3_w{_w}", _convnet3_width(_w))
