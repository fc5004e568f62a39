"""The CIFAR KD-benchmark architectures (CRD/RepDistiller) and ConvNet-3; importing registers them in
`kdkit.registry.MODELS`."""
from .airnet import AirNet, airnet
from .convnet import ConvNet, convnet3
from .mobilenetv2 import CifarMobileNetV2, mobilenetv2
from .resnet import CifarResNet, resnet8, resnet8x4, resnet20, resnet32, resnet32x4, resnet56, resnet110
from .shufflenetv2 import CifarShuffleNetV2, shufflenetv2
from .vgg import CifarVGG, vgg8, vgg13
from .wrn import WideResNet, wrn_16_2, wrn_40_2

__all__ = [
    "AirNet", "CifarMobileNetV2", "CifarResNet", "CifarShuffleNetV2", "CifarVGG", "ConvNet", "WideResNet",
    "airnet", "convnet3", "mobilenetv2", "resnet8", "resnet8x4", "resnet20", "resnet32", "resnet32x4", "resnet56", "resnet110",
    "shufflenetv2", "vgg8", "vgg13", "wrn_16_2", "wrn_40_2",
]
