"""Networks whose BNs no exact fold removes, but scale propagation does (issue 27).

* :class:`PreActBlock` -- pre-activation ResNet block: ``BN -> ReLU -> Conv3x3 p1`` twice, identity sum.
* :class:`DenseBlock` -- DenseNet-style layer: ``concat -> BN -> ReLU -> Conv1x1 -> BN -> ReLU -> Conv3x3 p1``.
* :class:`Crepe` -- CREPE-style audio net: ``Conv -> ReLU -> BN -> MaxPool -> Conv (zero padded) -> ... ->
  BN -> MaxPool -> Flatten -> Linear``.

:func:`set_bn` gives every BN realistic statistics with a chosen sign pattern for gamma.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PreActBlock", "DenseBlock", "Crepe", "set_bn", "MODELS"]


class PreActBlock(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(c)
        self.conv4 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))
        return x + self.conv4(torch.relu(self.bn4(self.conv3(torch.relu(self.bn3(x))))))

    @staticmethod
    def example(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(2, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))


class DenseBlock(nn.Module):
    def __init__(self, c: int = 8, growth: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bns1 = nn.ModuleList()
        self.convs1 = nn.ModuleList()
        self.bns2 = nn.ModuleList()
        self.convs2 = nn.ModuleList()
        for k in range(layers):
            cin = c + k * growth
            self.bns1.append(nn.BatchNorm2d(cin))
            self.convs1.append(nn.Conv2d(cin, 4 * growth, 1, bias=False))
            self.bns2.append(nn.BatchNorm2d(4 * growth))
            self.convs2.append(nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        for bn1, conv1, bn2, conv2 in zip(self.bns1, self.convs1, self.bns2, self.convs2):
            h = torch.cat(feats, 1)
            feats.append(conv2(torch.relu(bn2(conv1(torch.relu(bn1(h)))))))
        return torch.cat(feats, 1)

    @staticmethod
    def example(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(2, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(2))


class Crepe(nn.Module):
    """CREPE-style: 1-D signal as ``(N, 1, L, 1)``; each layer Conv -> ReLU -> BN -> MaxPool (-> Dropout)."""

    def __init__(
        self, widths: tuple[int, ...] = (16, 8, 8, 8), length: int = 256, ceil_mode: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for k, w in enumerate(widths):
            kernel, stride = (32, 4) if k == 0 else (16, 1)
            layers += [
                nn.ConstantPad2d((0, 0, kernel // 2 - 1, kernel // 2), 0.0) if k == 0 else nn.Identity(),
                nn.Conv2d(
                    cin,
                    w,
                    (kernel, 1),
                    stride=(stride, 1),
                    padding=(0, 0) if k == 0 else (kernel // 2 - 1, 0),
                ),
                nn.ReLU(),
                nn.BatchNorm2d(w),
                nn.MaxPool2d((2, 1), ceil_mode=ceil_mode),
                nn.Dropout(0.25),
            ]
            cin = w
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            n = self.body(torch.zeros(1, 1, length, 1)).numel()
        self.fc = nn.Linear(n, 10)
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.body(x), 1))

    def example(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(2, 1, self.length, 1, dtype=dtype, generator=torch.Generator().manual_seed(3))


def set_bn(model: nn.Module, seed: int = 0, *, sign: str = "positive") -> nn.Module:
    """Realistic BN statistics (mean != 0, var != 1, |gamma| in [0.5, 1.5], beta != 0), in place.

    ``sign``: "positive" (every gamma > 0), "negative" (every gamma < 0), "mixed" (a third negative),
    "zero" (every fourth gamma 0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features

            def u(lo: float, hi: float, c: int = c) -> torch.Tensor:
                return torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo

            with torch.no_grad():
                m.running_mean.copy_(u(-0.5, 0.5))
                m.running_var.copy_(torch.exp(u(-1.4, 0.9)))
                gamma = u(0.5, 1.5)
                if sign == "negative":
                    gamma = -gamma
                elif sign == "mixed":
                    gamma[::3] = -gamma[::3]
                elif sign == "zero":
                    gamma[::4] = 0.0
                m.weight.copy_(gamma)
                m.bias.copy_(u(-0.5, 0.5))
    return model.eval()


MODELS = {"preact": PreActBlock, "dense": DenseBlock, "crepe": Crepe}


class PreActResNet(nn.Module):
    """ResNet-v2 (pre-activation): blocks ``x + conv(relu(bn(conv(relu(bn(x))))))``; a downsampling block's
    projection shortcut reads ``relu(bn(x))`` like its first conv (the tensor forks into two convs); head
    ``bn -> relu -> global average pool -> flatten -> linear``."""

    def __init__(self, c: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList([_PreAct(c, c, 1), _PreAct(c, 2 * c, 2), _PreAct(2 * c, 2 * c, 1)])
        self.bn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    @staticmethod
    def example(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(2, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(4))


class _PreAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(torch.relu(self.bn2(out))) + short


MODELS["preact_resnet"] = PreActResNet
__all__ += ["PreActResNet"]
