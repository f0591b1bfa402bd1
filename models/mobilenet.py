"""MobileNetV2 (inverted residuals, depthwise convolutions, ReLU6), torchvision layout.

Stem ``conv3x3/2 -> BN -> ReLU6``; inverted residual blocks
``[expand conv1x1 -> BN -> ReLU6] -> depthwise conv3x3 (groups=C) -> BN -> ReLU6 -> project conv1x1 -> BN``
with an identity shortcut when stride is 1 and the widths match; last ``conv1x1 -> BN -> ReLU6``;
``AdaptiveAvgPool2d(1) -> Dropout -> Linear``. All convs have ``bias=False`` and every conv is followed
by a BN (52 BN layers at ``width_mult=1.0``), each foldable forward; the depthwise ones exercise the
grouped-weight layout (one input channel per group).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# t (expansion), c (output channels), n (repeats), s (first stride)
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear bottleneck), BN after every conv."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor and classifier."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn_relu6(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0) -> MobileNetV2:
    """Build a MobileNetV2.

    Args:
        num_classes: Size of the classifier output.
        width_mult: Channel multiplier (1.0 is the paper's network, ~2.2M params + classifier).

    Returns:
        A :class:`MobileNetV2` taking ``(N, 3, H, W)`` with ``H, W >= 32``.
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


# One input's shape without the batch dimension: `bnfold fold FILE --model models.X:factory` builds
# example inputs from it when no --input-shape is given.
mobilenet_v2.example_input_shape = (3, 224, 224)  # type: ignore[attr-defined]
