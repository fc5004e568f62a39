"""CIFAR ResNets (BasicBlock, 3 stages) as used by the CRD/RepDistiller KD benchmark.

Depth is 6n+2; ``resnet8/20/32/56/110`` use widths 16/32/64, ``resnet8x4/32x4`` use 64/128/256 with a
32-wide stem. Module names match the reference implementation's state-dict keys (``conv1``, ``bn1``,
``layer1..3``, ``fc``), so RepDistiller ResNet checkpoints load unchanged.

Tap points: ``layerK`` is the (post-ReLU) output of stage K; ``in:layerK.<last>.relu2`` is the stage's
pre-activation (the residual sum before the final ReLU); ``in:fc`` is the pooled embedding. No op in
these models is in-place, so a tapped tensor is never overwritten by a later layer.
"""
from __future__ import annotations

from torch import nn

from ...registry import MODELS


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus an identity or 1x1-conv shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """3x3 stem, three stages of `n` BasicBlocks (strides 1, 2, 2), global average pool, `fc`."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.stages: list[str] = ["layer1", "layer2", "layer3"]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


def resnet8x4(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)


for _f in (resnet8, resnet20, resnet32, resnet56, resnet110, resnet8x4, resnet32x4):
    MODELS.register(_f.__name__, _f)
