"""A pre-activation network (ResNetV2 / DenseNet style): ``BN -> ReLU -> Conv`` blocks.

Layout (input ``(N, 3, 32, 32)``, names as in ``named_modules``)::

    stem:        conv3x3(3 -> 16, p1, no bias)                                   x0   32x32
    block1:      a = relu(bn1(x0)); y = conv2(relu(bn2(conv1(a)))) ; x1 = y + x0       32x32
    block2:      a = relu(bn1(x1)); y = conv2(relu(bn2(conv1/2(a)))); x2 = y + shortcut1x1/2(a)  16x16
    transition:  x3 = avgpool2(conv1x1(relu(bn(x2))))        (DenseNet transition)    8x8
    proj:        x4 = relu(conv1x1 p0 (bn(x3)))              (BN straight into a 1x1 conv)
    pad:         x5 = conv3x3 p1 (bn(x4)) + x4               (BN straight into a padded conv)
    head:        logits = fc(flatten(bn_out(pool(relu(bn(x5))))))

Which BN folds, and through which pattern (forward = into the producing layer, backward = into the
consuming layer):

====================  ========================  ===============================================
BN                    verdict                   why
====================  ========================  ===============================================
block1.bn1            not foldable              producer (stem conv) also feeds the residual add;
                                                a ReLU sits before the next conv
block1.bn2            forward into block1.conv1 the conv's output goes only to this BN
block2.bn1            not foldable              producer is an Add; ReLU before the conv
block2.bn2            forward into block2.conv1 the conv's output goes only to this BN
transition.bn         not foldable              producer is an Add; ``BN -> ReLU -> Conv`` (the
                                                ReLU is not affine, so nothing can pass it)
proj.bn               backward into proj.conv   ``BN -> Conv1x1`` with padding 0: exact,
                                                ``W' = W diag(s)``, ``b' = b + W t``
pad.bn                not foldable              ``BN -> Conv3x3`` with padding 1: the zero padding
                                                is not shifted by the BN, so borders would differ;
                                                producer is a ReLU
head.bn               not foldable              producer is an Add; ReLU after it
head.bn_out           backward into head.fc     ``BN -> Flatten -> Linear`` (1x1 spatial): exact
====================  ========================  ===============================================

So 4 of the 9 BNs fold exactly (two forward, two backward) and 5 are kept, each with a reason.
:data:`FOLDABLE` and :data:`NOT_FOLDABLE` list them by module name for tests.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PreActBlock", "PreActNet", "preact_net", "FOLDABLE", "NOT_FOLDABLE"]

#: BN module names that fold exactly, with the direction and the target module.
FOLDABLE: dict[str, tuple[str, str]] = {
    "block1.bn2": ("forward", "block1.conv1"),
    "block2.bn2": ("forward", "block2.conv1"),
    "proj.bn": ("backward", "proj.conv"),
    "head.bn_out": ("backward", "head.fc"),
}
#: BN module names that must be kept.
NOT_FOLDABLE: tuple[str, ...] = ("block1.bn1", "block2.bn1", "transition.bn", "pad.bn", "head.bn")


class PreActBlock(nn.Module):
    """ResNetV2 block ``BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3`` plus a shortcut.

    The projection shortcut (``conv1x1``, padding 0, when the shape changes) reads the
    pre-activated input, as in ResNetV2.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(a)
        y = self.conv2(self.relu(self.bn2(self.conv1(a))))
        return y + identity


class _Transition(nn.Module):
    """DenseNet transition ``BN -> ReLU -> conv1x1 -> avgpool2``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, padding=0, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class _Proj(nn.Module):
    """``BN -> conv1x1 (padding 0, bias) -> ReLU``: the BN folds backward into the conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, padding=0, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(self.bn(x)))


class _Pad(nn.Module):
    """``x + conv3x3 p1 (BN(x))``: BN straight into a padded conv (not exactly foldable)."""

    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.bn(x))


class _Head(nn.Module):
    """``BN -> ReLU -> global pool -> BN -> Flatten -> Linear``."""

    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bn_out = nn.BatchNorm2d(c)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.bn_out(self.pool(self.relu(self.bn(x))))))


class PreActNet(nn.Module):
    """Stem, two pre-activation blocks, a transition, a 1x1 projection, a padded conv, a head."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.block1 = PreActBlock(w, w)
        self.block2 = PreActBlock(w, 2 * w, stride=2)
        self.transition = _Transition(2 * w, 2 * w)
        self.proj = _Proj(2 * w, 4 * w)
        self.pad = _Pad(4 * w)
        self.head = _Head(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        x = self.pad(self.proj(self.transition(x)))
        return self.head(x)


def preact_net(num_classes: int = 10) -> PreActNet:
    """Build the pre-activation net (9 BNs: 4 foldable, 5 not; see the module docstring).

    Args:
        num_classes: Size of the classifier output.

    Returns:
        A :class:`PreActNet` taking ``(N, 3, 32, 32)`` (any ``H, W`` multiple of 4).
    """
    return PreActNet(num_classes=num_classes)


# One input's shape without the batch dimension: `bnfold fold FILE --model models.X:factory` builds
# example inputs from it when no --input-shape is given.
preact_net.example_input_shape = (3, 32, 32)  # type: ignore[attr-defined]
