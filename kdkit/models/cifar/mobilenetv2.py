"""CIFAR MobileNetV2 as used by the CRD/RepDistiller KD benchmark (their ``mobile_half``: expansion 6,
width multiplier 0.5, stride-2 stem, 1280-d head), registered as ``mobilenetv2``.

The seven inverted-residual groups are grouped into stages at RepDistiller's feature points:
``layer1`` = groups 0-1 (16x16 on 32px input), ``layer2`` = group 2 (8x8), ``layer3`` = groups 3-4 (4x4),
``layer4`` = groups 5-6 (2x2). Stage outputs are linear bottlenecks (no ReLU). ``conv1`` is the stem,
``conv2`` the 1x1 head conv, ``in:fc`` the 1280-d pooled embedding.
"""
from __future__ import annotations

from typing import Annotated

from torch import nn

from ...config import PositiveInt, Range
from ...registry import MODELS

# a width multiplier that leaves every layer (the narrowest has 16 channels at 1.0) at least one channel
WidthMult = Annotated[float, Range(ge=1 / 16)]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn_relu(cin, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class CifarMobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, first stride s), with t=None meaning "the model's T"
    _SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
    _STAGE_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]

    def __init__(self, num_classes: int = 10, expansion: int = 6, width_mult: float = 0.5):
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, cin, 3, stride=2))
        groups = []
        for t, c, n, s in self._SETTING:
            cout = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, expansion if t is None else t))
                cin = cout
            groups.append(blocks)
        for k, idx in enumerate(self._STAGE_GROUPS, start=1):
            self.add_module(f"layer{k}", nn.Sequential(*[b for g in idx for b in groups[g]]))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(cin, self.last_channel, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.last_channel, num_classes)
        self.stages: list[str] = ["layer1", "layer2", "layer3", "layer4"]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.conv2(x)
        return self.fc(self.avgpool(x).flatten(1))


def mobilenetv2(num_classes: int = 10, width_mult: WidthMult = 0.5, expansion: PositiveInt = 6) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes, expansion=expansion, width_mult=width_mult)


MODELS.register("mobilenetv2", mobilenetv2)
