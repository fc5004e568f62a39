"""Networks condensation builds by name: the CIFAR ResNet-18 of the relabel protocol and the CV-DD committee members.

Both the committee (`committee.py`) and the evaluation protocols (`image_eval.py`) build networks by these names,
so they live here, below both: a name is checked (`check_member`) before any data loads.

- `convnet<D>_bn_w<W>`: ConvNet-D (batch norm, width W), e.g. `convnet3_bn_w32`;
- `resnet18`: torchvision's ResNet-18 with the CIFAR stem (3x3 conv, no max-pool);
- any name in `kdkit.registry.MODELS` that has batch norm (`resnet20`, `resnet8x4`, ...).
"""
from __future__ import annotations

import re

from torch import nn

from ..errors import ConfigError

_CONVNET = re.compile(r"^convnet(\d)_bn_w(\d+)$")


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 conv, no max-pool), as in the relabel literature."""
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


def member_model(name: str, num_classes: int, im_size: int = 32, in_channels: int = 3) -> nn.Module:
    """A fresh, untrained network by name (see the module docstring); it must have batch norm."""
    m = _CONVNET.match(name)
    if m:
        from ..models.cifar.convnet import ConvNet

        model = ConvNet(num_classes, width=int(m.group(2)), depth=int(m.group(1)), norm="batchnorm",
                        im_size=im_size, in_channels=in_channels)
    elif name == "resnet18":
        model = cifar_resnet18(num_classes)
    else:
        import kdkit.models  # noqa: F401  (registers the zoo)
        from ..registry import MODELS

        if name not in MODELS:
            raise ConfigError(f"unknown committee member '{name}'; use convnet<depth>_bn_w<width> (e.g. "
                              f"convnet3_bn_w32), resnet18, or a batch-norm model of the zoo: "
                              f"{', '.join(MODELS.names())}")
        model = MODELS.get(name)(num_classes=num_classes)
    if not any(isinstance(mod, nn.BatchNorm2d) for mod in model.modules()):
        raise ConfigError(f"committee member '{name}' has no BatchNorm2d layer; CV-DD matches batch-norm "
                          "statistics, so every member needs batch norm")
    return model


def check_member(name: str, key: str) -> str:
    """`name` builds a batch-norm network (checked without data: zoo networks are built once, untrained)."""
    if not (_CONVNET.match(name) or name == "resnet18"):
        try:
            member_model(name, 10)
        except ConfigError as e:
            raise ConfigError(f"{key}={name!r} is not allowed: {e}") from None
    return name
