"""Wide ResNets (pre-activation BasicBlocks, depth 6n+4) as used by the CRD/RepDistiller KD benchmark.

``wrn_40_2`` and ``wrn_16_2`` (dropout 0). Stage outputs ``layer1..3`` are pre-activation residual
sums, as in the reference; the final BN+ReLU (``bn1``, ``relu``) follows ``layer3``, and ``in:fc`` is the
pooled embedding. The reference's ``blockK.layer.*`` / ``convShortcut`` keys are ``layerK.*`` /
``shortcut`` here.
"""
from __future__ import annotations

from typing import Annotated

import torch.nn.functional as F
from torch import nn

from ...config import Range
from ...registry import MODELS

DropRate = Annotated[float, Range(ge=0, lt=1)]  # dropout probability inside each block (1 would drop everything)


class WideBasicBlock(nn.Module):
    """bn-relu-conv3x3-bn-relu-(dropout)-conv3x3, plus identity or 1x1-conv shortcut.

    When the block changes width, the shortcut conv reads the pre-activated input (as in the reference)."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = cin == cout
        self.shortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, kernel_size=1, stride=stride,
                                                                 bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    """3x3 stem (16), three stages of n blocks at widths 16k/32k/64k (strides 1, 2, 2), BN-ReLU, pool, `fc`."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        cin = widths[0]
        for i, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [WideBasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1, drop_rate)
                      for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            cin = cout
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.stages: list[str] = ["layer1", "layer2", "layer3"]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.avgpool(x).flatten(1))


def wrn_40_2(num_classes: int = 10, drop_rate: DropRate = 0.0) -> WideResNet:
    return WideResNet(40, 2, num_classes, drop_rate)


def wrn_16_2(num_classes: int = 10, drop_rate: DropRate = 0.0) -> WideResNet:
    return WideResNet(16, 2, num_classes, drop_rate)


MODELS.register("wrn_40_2", wrn_40_2)
MODELS.register("wrn_16_2", wrn_16_2)
