"""Encoder architectures, looked up by name.

ImageNet encoders are torchvision's own, so checkpoints load into `torchvision.models.<arch>` unchanged.
The `*_cifar` encoders swap the 7x7/stride-2 stem and max-pool for one 3x3/stride-1 conv (the usual
small-image stem); `resnet_mini_cifar` also narrows the widths so MoCo trains in minutes on 2 CPU cores.
Every encoder keeps torchvision's parameter names (`conv1`, `bn1`, `layer1..4`, `fc`), which the
checkpoint, linear-probe and detectron2 export code rely on.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with a CIFAR stem and a chosen base width (torchvision's is fixed at 64)."""

    def __init__(self, layers: list[int], width: int, num_classes: int):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, width, layers[0])
        self.layer2 = self._make_layer(BasicBlock, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _cifar_stem(net: torchvision.models.ResNet) -> torchvision.models.ResNet:
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet18_cifar": lambda num_classes: _cifar_stem(torchvision.models.resnet18(num_classes=num_classes)),
    "resnet50_cifar": lambda num_classes: _cifar_stem(torchvision.models.resnet50(num_classes=num_classes)),
    "resnet_mini_cifar": lambda num_classes: NarrowResNet([1, 1, 1, 1], width=16, num_classes=num_classes),
}


def build_encoder(arch: str, num_classes: int) -> nn.Module:
    """One encoder of `arch` whose `fc` outputs `num_classes` features (MoCo's `dim`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    return ARCHS[arch](num_classes=num_classes)


def backbone_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features before `fc`, the representation kNN and the linear probe evaluate."""
    x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
    x = encoder.layer4(encoder.layer3(encoder.layer2(encoder.layer1(x))))
    return torch.flatten(encoder.avgpool(x), 1)
