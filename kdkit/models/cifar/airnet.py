"""AirNet: the network of Keller Jordan's airbench (2024), the fastest known way to train a CIFAR-10 classifier.

Why it is here: on 2 CPU cores a ResNet-32x4 teacher takes hours per epoch, while airbench94's network reaches
94% (A100, 10 epochs, with its whitening init, lookahead and test-time augmentation) at about 0.24 GFLOPs per
image. kdkit's CPU classifier protocol trains its teacher and students from this family.

Layout, as airbench94: a 2x2 stem conv (3 -> `stem` channels, with bias, no padding: 32 -> 31 px) and GELU, then
three groups of conv3x3 -> 2x2 max-pool -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU with widths
(w, 4w, 4w), a 3x3 max-pool of the 3x3 map, and a bias-free linear head ``fc``. airbench94 is ``width=64``.
Not taken from airbench: its data-dependent whitening init of the stem and frozen BatchNorm scales (the stem and
the scales train here from PyTorch's default init), and its logit scale of 1/9 (kdkit's losses read plain logits).

Tap points: ``group1..3`` (the groups' outputs, post-GELU) and ``in:fc`` (the pooled embedding).
"""
from __future__ import annotations

from torch import nn

from ...config import PositiveInt
from ...registry import MODELS


def _group(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.GELU(),
        nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU(),
    )


class AirNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, stem: int = 24):
        super().__init__()
        widths = (width, 4 * width, 4 * width)
        self.stem = nn.Sequential(nn.Conv2d(3, stem, kernel_size=2, padding=0, bias=True), nn.GELU())
        self.group1 = _group(stem, widths[0])
        self.group2 = _group(widths[0], widths[1])
        self.group3 = _group(widths[1], widths[2])
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(widths[2], num_classes, bias=False)
        self.stages: list[str] = ["group1", "group2", "group3"]

    def forward(self, x):
        x = self.group3(self.group2(self.group1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def airnet(num_classes: int = 10, width: PositiveInt = 64, stem: PositiveInt = 24) -> AirNet:
    return AirNet(num_classes, width=width, stem=stem)


def _airnet_width(width: int, stem: int):
    """A named AirNet of fixed width, so CPU-protocol pairs are named like the zoo's (``airnet_w32-airnet_w8``)."""

    def factory(num_classes: int = 10) -> AirNet:
        return AirNet(num_classes, width=width, stem=stem)

    factory.__name__ = f"airnet_w{width}"
    return factory


MODELS.register("airnet", airnet)
for _w, _stem in ((8, 16), (16, 16), (32, 24)):
    MODELS.register(f"airnet_w{_w}", _airnet_width(_w, _stem))
