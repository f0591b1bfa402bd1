"""Re-creations (no timm) of layer patterns found everywhere in real model libraries, and small nets
combining them. Written from the behaviour of timm's layers (``layers/norm_act.py``,
``layers/conv2d_same.py``, ``models/levit.py``, ``models/_manipulate.py``), not copied.

Patterns:
    * :class:`BatchNormAct2d` -- a ``BatchNorm2d`` subclass whose forward calls ``F.batch_norm`` with
      its own statistics, then dropout and an activation;
    * :class:`Conv2dSame` -- a ``Conv2d`` whose forward pads the input ("same") by an amount computed
      from the input size at run time, then calls ``F.conv2d`` with its own weight and bias;
    * :class:`NormLinear` -- BN1d -> Dropout -> Linear classifier head;
    * :class:`LinearNorm` -- Linear on (B, N, C) -> flatten(0, 1) -> BN1d -> reshape back (LeViT);
      :class:`LeViTAttention` keeps a Python-side attention-bias cache filled in eval mode;
    * :class:`MixedConv2d` -- several kernel sizes on channel splits, concatenated, then one BN;
    * :func:`checkpoint_seq` + :class:`CheckpointNet` -- a parent that torch.fx cannot trace (a Python
      branch on the input size), whose only other use of its stages is a gradient-checkpointing branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "BatchNormAct2d",
    "ConvNormAct",
    "Conv2dSame",
    "NormLinear",
    "LinearNorm",
    "LeViTAttention",
    "MixedConv2d",
    "CspBlock",
    "checkpoint_seq",
    "CheckpointNet",
    "TimmResNet",
    "EfficientNetSame",
    "LeViTNet",
    "CspNet",
    "FlattenHeadNet",
    "REALWORLD",
    "partly_freezable",
]


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d + dropout + activation in one module, timm style (same state_dict keys as BN)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        *,
        act: nn.Module | None = None,
        drop: float = 0.0,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = True if self.training else (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


def _same_pad(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


def pad_same(x: torch.Tensor, k: tuple[int, ...], s: tuple[int, ...], d: tuple[int, ...]) -> torch.Tensor:
    """TensorFlow "SAME" padding computed from the input size (asymmetric when odd)."""
    ih, iw = x.size()[-2:]
    ph, pw = _same_pad(ih, k[0], s[0], d[0]), _same_pad(iw, k[1], s[1], d[1])
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow-like "SAME" padding decided at run time."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False
    ) -> None:
        super().__init__(cin, cout, k, stride, 0, 1, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, tuple(self.weight.shape[-2:]), self.stride, self.dilation)  # type: ignore[arg-type]
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class ConvNormAct(nn.Module):
    """conv -> BatchNormAct2d, as timm's ConvNormAct (``conv``, ``bn`` attributes)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        *,
        same: bool = False,
        act: Callable[[], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if same:
            self.conv: nn.Conv2d = Conv2dSame(cin, cout, k, stride, groups)
        else:
            self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, act=act() if act is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class NormLinear(nn.Module):
    """BN1d -> Dropout -> Linear (the classifier head of LeViT-style models)."""

    def __init__(self, cin: int, cout: int, drop: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


class LinearNorm(nn.Module):
    """Linear on tokens (B, N, C), BN1d over C on the flattened tokens, shape restored."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTAttention(nn.Module):
    """Multi-head attention with LinearNorm projections and a learned attention bias per offset.

    In eval mode the gathered bias is cached per device in a Python dict (cleared by ``train()``),
    as LeViT does: tracing this forward stores an fx Proxy in that cache.
    """

    def __init__(self, dim: int, heads: int = 2, key_dim: int = 8, resolution: int = 4) -> None:
        super().__init__()
        self.heads, self.key_dim, self.scale = heads, key_dim, key_dim**-0.5
        self.val_dim = 2 * key_dim
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.val_dim))
        self.act = nn.Hardswish()
        self.proj = LinearNorm(heads * self.val_dim, dim)
        pos = torch.stack(
            torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")
        ).flatten(1)
        rel = (pos[..., :, None] - pos[..., None, :]).abs()
        rel = rel[0] * resolution + rel[1]
        self.attention_biases = nn.Parameter(torch.randn(heads, resolution * resolution) * 0.1)
        self.register_buffer("attention_bias_idxs", rel, persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def train(self, mode: bool = True) -> LeViTAttention:
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            self.qkv(x).view(b, n, self.heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.get_attention_biases(x.device)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.val_dim)
        return self.proj(self.act(x))


class MixedConv2d(nn.Module):
    """Channel splits, one conv per kernel size, outputs concatenated (MixNet)."""

    def __init__(self, cin: int, cout: int, kernels: tuple[int, ...] = (3, 5)) -> None:
        super().__init__()
        self.splits_in = [cin // len(kernels)] * (len(kernels) - 1)
        self.splits_in.append(cin - sum(self.splits_in))
        outs = [cout // len(kernels)] * (len(kernels) - 1)
        outs.append(cout - sum(outs))
        self.convs = nn.ModuleList(
            nn.Conv2d(ci, co, k, padding=k // 2, bias=False)
            for ci, co, k in zip(self.splits_in, outs, kernels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = torch.split(x, self.splits_in, 1)
        return torch.cat([c(xs[i]) for i, c in enumerate(self.convs)], 1)


class CspBlock(nn.Module):
    """Cross-stage partial block: two conv branches concatenated, then BN + act, then a 1x1 conv."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c, c // 2, 1, bias=False)
        self.conv_b = nn.Conv2d(c, c // 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(c, c, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(torch.cat([self.conv_a(x), self.conv_b(x)], dim=1)))
        return self.bn_out(self.conv_out(y))


def checkpoint_seq(functions: nn.Module, x: torch.Tensor, every: int = 1) -> torch.Tensor:
    """Run the children of ``functions`` in order, under activation checkpointing (timm's helper)."""
    mods: list[Any] = list(functions.children()) if isinstance(functions, nn.Sequential) else list(functions)

    def run(start: int, end: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fwd(t: torch.Tensor) -> torch.Tensor:
            for j in range(start, end + 1):
                t = mods[j](t)
            return t

        return fwd

    for start in range(0, len(mods), every):
        end = min(start + every - 1, len(mods) - 1)
        x = torch.utils.checkpoint.checkpoint(run(start, end), x, use_reentrant=False)
    return x


class _Block(nn.Module):
    """Residual basic block with BatchNormAct2d (timm ResNet style: ``conv1/bn1/conv2/bn2``)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, *, same: bool = False) -> None:
        super().__init__()
        self.conv1 = (
            Conv2dSame(cin, cout, 3, stride) if same else nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        )
        self.bn1 = BatchNormAct2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = BatchNormAct2d(cout, act=nn.Identity())
        self.act = nn.ReLU()
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + self.down(x))


class ClassifierHead(nn.Module):
    """pool -> flatten -> NormLinear."""

    def __init__(self, c: int, n: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = NormLinear(c, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(x)))


class TimmResNet(nn.Module):
    """A small timm-style ResNet: every BN is a BatchNormAct2d, NormLinear head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, width, 3, 2)
        self.stages = nn.Sequential(
            _Block(width, width), _Block(width, 2 * width, 2), _Block(2 * width, 2 * width)
        )
        self.head = ClassifierHead(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, max(c // 4, 1), 1)
        self.expand = nn.Conv2d(max(c // 4, 1), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cin * 4
        self.pw = ConvNormAct(cin, mid, 1, act=nn.SiLU)
        self.dw = ConvNormAct(mid, mid, 3, stride, groups=mid, same=True, act=nn.SiLU)
        self.se = _SqueezeExcite(mid)
        self.pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, act=nn.Identity())
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.pwl(self.se(self.dw(self.pw(x)))))
        return x + y if self.skip else y


class EfficientNetSame(nn.Module):
    """An EfficientNet-ish net with TF "same" padding convs (tf_ variants) and BatchNormAct2d."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv_stem = Conv2dSame(3, width, 3, 2)
        self.bn1 = BatchNormAct2d(width, act=nn.SiLU())
        self.blocks = nn.Sequential(
            _InvertedResidual(width, width, 1), _InvertedResidual(width, 2 * width, 2)
        )
        self.conv_head = nn.Conv2d(2 * width, 4 * width, 1, bias=False)
        self.bn2 = BatchNormAct2d(4 * width, act=nn.SiLU(), drop=0.2)
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))


class _LeViTMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, 2 * dim)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LeViTNet(nn.Module):
    """A LeViT-ish net: conv stem (BN2d), tokens, attention + MLP with LinearNorm, NormLinear head."""

    def __init__(self, dim: int = 16, classes: int = 10, resolution: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dim // 2, 3, 2, 1),
            nn.BatchNorm2d(dim // 2),
            nn.Hardswish(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1),
            nn.BatchNorm2d(dim),
        )
        self.attn = LeViTAttention(dim, resolution=resolution)
        self.mlp = _LeViTMlp(dim)
        self.head = NormLinear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class CspNet(nn.Module):
    """Mixed-kernel convs and CSP blocks: BN on the concatenation of several conv outputs."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, width, 3, 2)
        self.mix = MixedConv2d(width, 2 * width)
        self.bn_mix = nn.BatchNorm2d(2 * width)
        self.csp = CspBlock(2 * width)
        self.head = ClassifierHead(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_mix(self.mix(self.stem(x))))
        return self.head(self.csp(x))


class FlattenHeadNet(nn.Module):
    """conv -> BN2d -> Flatten -> Linear (the BN folds into the Linear, repeated over positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.bn(self.act(self.conv(x)))))


class CheckpointNet(nn.Module):
    """Untraceable parent (Python branch on the input size) with a gradient-checkpointing branch."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, width, 3, 2)
        self.stages = nn.Sequential(_Block(width, width), _Block(width, 2 * width, 2))
        self.head = ClassifierHead(2 * width, classes)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:  # odd sizes are padded: torch.fx cannot trace this branch
            x = F.pad(x, (0, 1, 0, 1))
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.head(x)


REALWORLD: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "timm_resnet": (TimmResNet, (2, 3, 32, 32)),
    "efficientnet_same": (EfficientNetSame, (2, 3, 33, 33)),
    "levit": (LeViTNet, (2, 3, 16, 16)),
    "csp_mixconv": (CspNet, (2, 3, 32, 32)),
    "flatten_head": (FlattenHeadNet, (2, 3, 8, 8)),
    "checkpoint_net": (CheckpointNet, (2, 3, 31, 31)),
}
"""Reference nets: factory and an input shape each."""


def partly_freezable() -> nn.Module:
    """conv -> BN without running statistics (cannot be frozen) -> conv -> BN."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    )
