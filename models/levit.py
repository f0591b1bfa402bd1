"""A small LeViT, rebuilt from the structure of timm's ``models/levit.py`` (read, not copied).

Every BatchNorm of LeViT, in each of the places it has one:

* ``ConvNorm`` -- Conv2d -> BatchNorm2d, four of them in the 16x stem (Hardswish between);
* ``LinearNorm`` -- Linear on tokens (B, N, C) -> ``flatten(0, 1)`` -> BatchNorm1d -> ``reshape_as``:
  the q/k/v and output projections of attention, the two layers of each MLP, and the query of the
  downsampling attention, which reads a strided subsample of the token grid first;
* ``NormLinear`` -- BatchNorm1d -> Dropout -> Linear, the classifier and the distillation head, both
  reading the same pooled tokens (their mean is averaged in eval mode).

19 BatchNorms with the defaults; every one folds (forward into the layer before it, or, for the two
heads, backward into the Linear after it).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

__all__ = ["ConvNorm", "LinearNorm", "NormLinear", "LeViT", "levit"]


class ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 2, pad: int = 1) -> None:
        super().__init__()
        self.linear = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    def __init__(self, cin: int, cout: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(drop)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x)))


def _bias_index(q_res: int, k_res: int, stride: int) -> torch.Tensor:
    """Per (query, key) pair, the index of its relative offset on the grid (LeViT's attention bias)."""
    q_pos = list(itertools.product(range(0, k_res, stride), repeat=2))[: q_res * q_res]
    k_pos = list(itertools.product(range(k_res), repeat=2))
    idx = [abs(qy - ky) * k_res + abs(qx - kx) for (qy, qx) in q_pos for (ky, kx) in k_pos]
    return torch.tensor(idx).view(len(q_pos), len(k_pos))


class Attention(nn.Module):
    def __init__(self, dim: int, key_dim: int, heads: int, ratio: int, res: int) -> None:
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, ratio * key_dim
        self.scale = key_dim**-0.5
        self.qkv = LinearNorm(dim, heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.val_dim, dim))
        self.attention_biases = nn.Parameter(torch.randn(heads, res * res) * 0.1)
        self.register_buffer("bias_idxs", _bias_index(res, res, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (
            self.qkv(x).view(b, n, self.heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = (q @ k) * self.scale + self.attention_biases[:, self.bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.heads * self.val_dim)
        return self.proj(x)


class Subsample(nn.Module):
    def __init__(self, stride: int, res: int) -> None:
        super().__init__()
        self.stride, self.res = stride, res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)[:, :: self.stride, :: self.stride]
        return x.reshape(b, -1, c)


class AttentionDownsample(nn.Module):
    def __init__(self, cin: int, cout: int, key_dim: int, heads: int, ratio: int, res: int) -> None:
        super().__init__()
        self.heads, self.key_dim, self.val_dim = heads, key_dim, ratio * key_dim
        self.scale = key_dim**-0.5
        self.res_out = (res - 1) // 2 + 1
        self.kv = LinearNorm(cin, heads * (key_dim + self.val_dim))
        self.q = nn.Sequential(Subsample(2, res), LinearNorm(cin, heads * key_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * self.val_dim, cout))
        self.attention_biases = nn.Parameter(torch.randn(heads, res * res) * 0.1)
        self.register_buffer("bias_idxs", _bias_index(self.res_out, res, 2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        q = self.q(x).view(b, self.res_out**2, self.heads, self.key_dim).permute(0, 2, 1, 3)
        attn = (q @ k) * self.scale + self.attention_biases[:, self.bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, self.heads * self.val_dim)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.act(self.ln1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, key_dim: int, heads: int, res: int) -> None:
        super().__init__()
        self.attn = Attention(dim, key_dim, heads, 2, res)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class LeViT(nn.Module):
    """Stem16 -> block -> attention downsample (+ MLP) -> block -> mean -> head and distillation head."""

    def __init__(self, img: int = 64, dims: tuple[int, int] = (16, 24), classes: int = 10) -> None:
        super().__init__()
        d0, d1 = dims
        self.stem = nn.Sequential(
            ConvNorm(3, d0 // 8),
            nn.Hardswish(),
            ConvNorm(d0 // 8, d0 // 4),
            nn.Hardswish(),
            ConvNorm(d0 // 4, d0 // 2),
            nn.Hardswish(),
            ConvNorm(d0 // 2, d0),
        )
        res = img // 16
        self.stage1 = Block(d0, 8, 2, res)
        self.down = AttentionDownsample(d0, d1, 8, 2, 2, res)
        self.down_mlp = Mlp(d1, 2 * d1)
        self.stage2 = Block(d1, 8, 2, (res - 1) // 2 + 1)
        self.head = NormLinear(d1, classes)
        self.head_dist = NormLinear(d1, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.stage1(x)
        x = self.down(x)
        x = x + self.down_mlp(x)
        x = self.stage2(x).mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


def levit() -> LeViT:
    """The small LeViT with trained-looking BatchNorm statistics, in eval mode (input 2x3x64x64)."""
    from models.stats import randomize_bn

    torch.manual_seed(0)
    return randomize_bn(LeViT(), seed=11).eval()  # type: ignore[return-value]


levit.example_input_shape = (3, 64, 64)  # type: ignore[attr-defined]
