"""Re-creations of the BN placements of issue 13 that the ONNX backend folds through a route.

* :class:`LinearNorm` -- LeViT's ``Linear`` on tokens ``(B, N, C)``, ``flatten(0, 1)``, ``BatchNorm1d``
  over the output features, reshaped back. Exported: MatMul [-> Add] -> Reshape -> BN -> Reshape.
* :class:`TokenLinearBN` -- ``Linear`` on tokens, then ``BatchNorm1d`` on ``x.transpose(1, 2)`` (and
  back): MatMul [-> Add] -> Transpose(perm [0, 2, 1]) -> BN.
* :class:`LeViTMlp` -- two LinearNorms around a Hardswish (LeViT's MLP / attention projections).
* :class:`CSPBlock` -- CSPNet / YOLO-style: two 1x1 conv paths concatenated, then one BN + activation.
* :class:`MixConv` -- mixed-kernel depthwise convs (MixNet) on channel splits, concatenated, one BN.
* :class:`BranchSum` -- RepVGG-style train-time block without identity: ``BN(conv3x3(x) + conv1x1(x))``.
* :class:`ResidualSumBN` -- ``BN(conv(x) + x)``: the identity branch has no layer to absorb the BN
  (must be refused).
* :class:`NormLinearHead` -- ViT NormLinear head: ``BatchNorm1d -> Dropout -> Linear`` (eval: Dropout
  is a no-op; the exporter drops it in eval mode, so tests also build it with ``onnx.helper``).

Every factory calls :func:`models.stats.randomize_bn` (realistic statistics) and returns ``eval()``.
"""

from __future__ import annotations

import torch
from torch import nn

from .stats import randomize_bn

__all__ = [
    "LinearNorm",
    "TokenLinearBN",
    "LeViTMlp",
    "CSPBlock",
    "MixConv",
    "BranchSum",
    "ResidualSumBN",
    "NormLinearHead",
    "build_route_model",
    "ROUTE_MODELS",
]


class LinearNorm(nn.Module):
    """``Linear`` on ``(B, N, C)`` then ``BatchNorm1d`` over its output features (LeViT)."""

    def __init__(self, c_in: int, c_out: int, bias: bool = False) -> None:
        super().__init__()
        self.c = nn.Linear(c_in, c_out, bias=bias)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenLinearBN(nn.Module):
    """``Linear`` on ``(B, N, C)``, then ``BatchNorm1d`` over the features of ``x.transpose(1, 2)``."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c_out, bias=bias)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2)


class LeViTMlp(nn.Module):
    """LinearNorm -> Hardswish -> LinearNorm, as in LeViT's residual MLP."""

    def __init__(self, c: int = 16, hidden: int = 32, bias: bool = False) -> None:
        super().__init__()
        self.ln1 = LinearNorm(c, hidden, bias)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, c, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ln2(self.act(self.ln1(x)))


class CSPBlock(nn.Module):
    """Two 1x1 conv paths (one through a 3x3 conv), concatenated on channels, one BN + LeakyReLU."""

    def __init__(self, c: int = 8, hidden: int = 4) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(c, hidden, 1, bias=False)
        self.m = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU()
        )
        self.cv3 = nn.Conv2d(self.m[0].out_channels, hidden, 1, bias=False)
        self.cv2 = nn.Conv2d(c, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(2 * hidden)
        self.act = nn.LeakyReLU(0.1)
        self.cv4 = nn.Conv2d(2 * hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), dim=1))))


class MixConv(nn.Module):
    """Depthwise convs with kernels 3/5/7 on channel splits, concatenated, one BN (MixNet)."""

    def __init__(self, splits: tuple[int, ...] = (4, 2, 2)) -> None:
        super().__init__()
        self.splits = splits
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=i == 1)
            for i, (c, k) in enumerate(zip(splits, (3, 5, 7)))
        )
        self.bn = nn.BatchNorm2d(sum(splits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, list(self.splits), dim=1)
        return torch.relu(self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], dim=1)))


class BranchSum(nn.Module):
    """``BN(conv3x3(x) + conv1x1(x))`` (RepVGG without the identity branch)."""

    def __init__(self, c_in: int = 4, c_out: int = 6) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.k1 = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.k3(x) + self.k1(x)))


class ResidualSumBN(nn.Module):
    """``BN(conv(x) + x)``: the identity branch cannot absorb the BN's scale."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x) + x))


class NormLinearHead(nn.Module):
    """``BatchNorm1d -> Dropout -> Linear`` on pooled features (a ViT NormLinear head)."""

    def __init__(self, c: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(c)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(x)))


ROUTE_MODELS: dict[str, tuple[type[nn.Module], dict[str, object], tuple[int, ...]]] = {
    "linear_norm": (LinearNorm, {"c_in": 8, "c_out": 12}, (2, 5, 8)),
    "linear_norm_bias": (LinearNorm, {"c_in": 8, "c_out": 12, "bias": True}, (2, 5, 8)),
    "token_linear_bn": (TokenLinearBN, {"c_in": 8, "c_out": 6}, (2, 5, 8)),
    "levit_mlp": (LeViTMlp, {}, (2, 7, 16)),
    "csp_block": (CSPBlock, {}, (2, 8, 6, 6)),
    "mixconv": (MixConv, {}, (2, 8, 7, 7)),
    "branch_sum": (BranchSum, {}, (2, 4, 6, 6)),
    "residual_sum_bn": (ResidualSumBN, {}, (2, 4, 6, 6)),
    "norm_linear_head": (NormLinearHead, {}, (3, 8)),
}
"""name -> (class, keyword arguments, example input shape)."""


def build_route_model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model ``name`` of :data:`ROUTE_MODELS` with seeded weights and BN statistics, in eval mode,
    and an example input."""
    cls, kwargs, shape = ROUTE_MODELS[name]
    torch.manual_seed(seed)
    model = randomize_bn(cls(**kwargs), seed).eval()  # type: ignore[arg-type]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x
