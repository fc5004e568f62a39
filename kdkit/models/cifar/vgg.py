"""CIFAR VGG with batch norm (RepDistiller's: five conv groups, no FC stack, a 512-d linear classifier).

``vgg8`` is configuration 'S' (one conv per group), ``vgg13`` is 'B' (two per group). Groups are
``layer0`` (full resolution, the stem; RepDistiller's f0) and ``layer1..layer4``, each ending in its
ReLU, so tapping ``layerK`` gives post-ReLU features and ``layerK.<i>`` with the last BN gives the
pre-activation. Max-pools sit between groups; on 32px input ``layer3`` and ``layer4`` both run at 4x4
(``pool3`` is used only on 64px input, as in the reference). ``in:fc`` is the 512-d pooled embedding.
"""
from __future__ import annotations

from torch import nn

from ...registry import MODELS

_CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _group(widths: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 10):
        super().__init__()
        cin = 3
        for i, widths in enumerate(cfg):
            self.add_module(f"layer{i}", _group(widths, cin))
            cin = widths[-1]
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.stages: list[str] = ["layer1", "layer2", "layer3", "layer4"]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = x.shape[2]
        x = self.pool0(self.layer0(x))
        x = self.pool1(self.layer1(x))
        x = self.pool2(self.layer2(x))
        x = self.layer3(x)
        if h == 64:
            x = self.pool3(x)
        x = self.layer4(x)
        return self.fc(self.avgpool(x).flatten(1))


def vgg8(num_classes: int = 10) -> CifarVGG:
    return CifarVGG(_CFG["S"], num_classes)


def vgg13(num_classes: int = 10) -> CifarVGG:
    return CifarVGG(_CFG["B"], num_classes)


MODELS.register("vgg8", vgg8)
MODELS.register("vgg13", vgg13)
