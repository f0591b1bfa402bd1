"""ResNet-18 and ResNet-50 in the torchvision layout (no torchvision import).

Stem: ``conv7x7/2 -> BN -> ReLU -> maxpool3x3/2``; four stages of :class:`BasicBlock` ``[2, 2, 2, 2]``
(ResNet-18) or :class:`Bottleneck` ``[3, 4, 6, 3]`` (ResNet-50); the first block of stages 2-4 has
stride 2 and a ``conv1x1 -> BN`` downsample; ``AdaptiveAvgPool2d(1) -> flatten -> Linear``. All convs
have ``bias=False``, so each fold must create a bias. Every BN directly follows a conv and folds forward.
At ``width=64`` ResNet-50 has 53 BN layers and about 23.5M parameters plus the classifier
(25.6M with 1000 classes). Works on any input of at least 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; identity or ``conv1x1 -> BN`` shortcut; ReLU after the add."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """``conv1x1 -> BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv1x1 -> BN``, x4 expansion."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A torchvision-style ResNet built from ``block`` repeated ``layers[i]`` times per stage."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 10,
        width: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """Build a ResNet-18 (BasicBlock ``[2, 2, 2, 2]``, 20 BN layers).

    Args:
        num_classes: Size of the classifier output.
        width: Channels of the stem (64 in the paper); stages use 1x, 2x, 4x, 8x.

    Returns:
        A :class:`ResNet` taking ``(N, 3, H, W)`` with ``H, W >= 32``.
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width)


def resnet50(num_classes: int = 10, width: int = 64) -> ResNet:
    """Build a ResNet-50 (Bottleneck ``[3, 4, 6, 3]``, 53 BN layers, ~23.5M params + classifier).

    Args:
        num_classes: Size of the classifier output.
        width: Channels of the stem (64 in the paper).

    Returns:
        A :class:`ResNet` taking ``(N, 3, H, W)`` with ``H, W >= 32``.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width=width)


# One input's shape without the batch dimension: `bnfold fold FILE --model models.X:factory` builds
# example inputs from it when no --input-shape is given.
resnet18.example_input_shape = (3, 224, 224)  # type: ignore[attr-defined]
resnet50.example_input_shape = (3, 224, 224)  # type: ignore[attr-defined]
