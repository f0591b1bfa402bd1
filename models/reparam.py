"""Re-creations of re-parameterisable blocks, each with its own hand-written merge, as the projects do it.

Written from the papers' descriptions and the structure of the public implementations (RepVGG,
MobileOne, RepViT, PP-YOLOE, DBB); the merge methods compute in the weight dtype, as those projects
do, and are the reference bnfold's merge is compared with (same number of convs, same outputs).

Blocks (training form; ``reparameterize()`` turns each into one conv in place):

* :class:`RepVGGBlock` -- ``relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x))`` (the identity BN only
  when ``C_in == C_out`` and stride 1), groups supported.
* :class:`MobileOneBlock` -- ``act(sum_k bn(conv_kxk_k(x)) + bn(conv1x1(x)) + bn(x))``: ``k``
  over-parameterised branches, a 1x1 "scale" branch (kernel > 1 only), a BN skip; depthwise or
  pointwise as in MobileOne-S0.
* :class:`RepMixer` -- FastViT's ``x + layer_scale * (mixer(x) - norm(x))`` (a Sub and a per-channel
  scale over an inner sum).
* :class:`PPYoloeRepVggBlock` -- ``act(bn(conv3x3(x)) + alpha * bn(conv1x1(x)))`` with a learnt scalar.
* :class:`RepVGGDW` -- RepViT's token mixer: ``bn(bn(dwconv3x3(x)) + dwconv1x1(x) + x)`` (BN on the sum).
* :class:`AvgBranchBlock` -- a DBB-style average-pool branch: ``bn(conv3x3(x)) + avgpool3x3(x)``.
* :class:`DBBLike` -- DBB's four branches (kxk, 1x1, 1x1 -> kxk, average pool), see its docstring.
* :class:`ACBlock` -- ACNet's asymmetric kernels: ``bn(conv3x3) + bn(conv1x3) + bn(conv3x1)``.
* Refused forms: :class:`BranchReadElsewhere`, :class:`ActivationInBranch` (different strides and
  kernels that cannot be centred are built as ONNX graphs in the tests: PyTorch's symmetric padding
  cannot make such branches the same size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "fuse_bn",
    "RepVGGBlock",
    "MobileOneBlock",
    "PPYoloeRepVggBlock",
    "RepMixer",
    "RepVGGDW",
    "AvgBranchBlock",
    "ACBlock",
    "DBBLike",
    "BranchReadElsewhere",
    "ActivationInBranch",
    "conv_count",
]


def conv_bn(
    cin: int,
    cout: int,
    k: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The projects' ``_fuse_bn_tensor``: kernel * gamma/std, beta - mean * gamma/std (weight dtype)."""
    assert bn.running_var is not None and bn.running_mean is not None
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


def identity_kernel(channels: int, groups: int, k: int, like: torch.Tensor) -> torch.Tensor:
    cg = channels // groups
    w = torch.zeros(channels, cg, k, k, dtype=like.dtype)
    for i in range(channels):
        w[i, i % cg, k // 2, k // 2] = 1
    return w


def _deploy_conv(ref: nn.Conv2d, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(
        ref.in_channels,
        ref.out_channels,
        ref.kernel_size,
        ref.stride,
        ref.padding,
        ref.dilation,
        ref.groups,
        bias=True,
    ).to(kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        assert conv.bias is not None
        conv.bias.copy_(bias)
    return conv


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_reparam: nn.Conv2d | None = None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + id_out)

    @torch.no_grad()
    def reparameterize(self) -> None:
        k3, b3 = fuse_bn(self.rbr_dense[0].weight, self.rbr_dense[1])
        k1, b1 = fuse_bn(self.rbr_1x1[0].weight, self.rbr_1x1[1])
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            kid, bid = fuse_bn(identity_kernel(kernel.shape[0], self.groups, 3, kernel), self.rbr_identity)
            kernel, bias = kernel + kid, bias + bid
        self.rbr_reparam = _deploy_conv(self.rbr_dense[0], kernel, bias)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.rbr_identity = None


class MobileOneBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        branches: int = 4,
        use_scale: bool = True,
        use_act: bool = True,
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.stride, self.groups, self.k = cin, cout, stride, groups, k
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList(conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches))
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 and use_scale else None
        self.reparam_conv: nn.Conv2d | None = None
        self.act: nn.Module = nn.ReLU() if use_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))
        scale_out = 0 if self.rbr_scale is None else self.rbr_scale(x)
        identity_out = 0 if self.rbr_skip is None else self.rbr_skip(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.act(out)

    @torch.no_grad()
    def reparameterize(self) -> None:
        kernel = bias = 0
        if self.rbr_scale is not None:
            ks, bs = fuse_bn(self.rbr_scale[0].weight, self.rbr_scale[1])
            p = self.k // 2
            kernel, bias = F.pad(ks, [p, p, p, p]), bs
        if self.rbr_skip is not None:
            like = self.rbr_skip.weight
            kid, bid = fuse_bn(identity_kernel(self.cout, self.groups, self.k, like), self.rbr_skip)
            kernel, bias = kernel + kid, bias + bid
        for branch in self.rbr_conv:
            kc, bc = fuse_bn(branch[0].weight, branch[1])
            kernel, bias = kernel + kc, bias + bc
        assert isinstance(kernel, torch.Tensor) and isinstance(bias, torch.Tensor)
        shape = nn.Conv2d(self.cin, self.cout, self.k, self.stride, self.k // 2, groups=self.groups)
        self.reparam_conv = _deploy_conv(shape, kernel, bias)
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.rbr_skip = self.rbr_scale = None


class RepMixer(nn.Module):
    """FastViT's token mixer: ``x + layer_scale * (mixer(x) - norm(x))``, the mixer a depthwise MobileOne
    block without activation, the norm a MobileOne block with only its BN skip (``0 + bn(x)``)."""

    def __init__(self, dim: int, k: int = 3) -> None:
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, k, groups=dim, branches=0, use_scale=False, use_act=False)
        self.mixer = MobileOneBlock(dim, dim, k, groups=dim, branches=1, use_act=False)
        self.layer_scale = nn.Parameter(torch.linspace(0.2, 0.9, dim).reshape(dim, 1, 1))
        self.k = k
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        self.mixer.reparameterize()
        self.norm.reparameterize()
        m, n = self.mixer.reparam_conv, self.norm.reparam_conv
        assert m is not None and n is not None and m.bias is not None and n.bias is not None
        dim = m.weight.shape[0]
        w = identity_kernel(dim, dim, self.k, m.weight) + self.layer_scale.unsqueeze(-1) * (
            m.weight - n.weight
        )
        b = self.layer_scale.squeeze() * (m.bias - n.bias)
        self.reparam_conv = _deploy_conv(m, w, b)
        del self.mixer, self.norm


class PPYoloeRepVggBlock(nn.Module):
    def __init__(self, cin: int, cout: int, alpha: float = 0.73) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, 1, 1)
        self.conv2 = conv_bn(cin, cout, 1, 1, 0)
        self.alpha = nn.Parameter(torch.tensor([alpha]))
        self.conv: nn.Conv2d | None = None
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.alpha * self.conv2(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        k3, b3 = fuse_bn(self.conv1[0].weight, self.conv1[1])
        k1, b1 = fuse_bn(self.conv2[0].weight, self.conv2[1])
        kernel = k3 + self.alpha * F.pad(k1, [1, 1, 1, 1])
        self.conv = _deploy_conv(self.conv1[0], kernel, b3 + self.alpha * b1)
        del self.conv1, self.conv2


class RepVGGDW(nn.Module):
    """RepViT's depthwise token mixer: a BN on the sum of a 3x3 dw conv+BN, a 1x1 dw conv and x."""

    def __init__(self, ed: int) -> None:
        super().__init__()
        self.conv = conv_bn(ed, ed, 3, 1, 1, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.bn = nn.BatchNorm2d(ed)
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.bn((self.conv(x) + self.conv1(x)) + x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        k3, b3 = fuse_bn(self.conv[0].weight, self.conv[1])
        k1 = F.pad(self.conv1.weight, [1, 1, 1, 1])
        assert self.conv1.bias is not None
        kid = identity_kernel(k3.shape[0], k3.shape[0], 3, k3)
        kernel, bias = fuse_bn(k3 + k1 + kid, self.bn)
        bn = self.bn
        assert bn.running_var is not None
        bias = bias + (b3 + self.conv1.bias) * bn.weight / (bn.running_var + bn.eps).sqrt()
        self.fused = _deploy_conv(self.conv[0], kernel, bias)
        del self.conv, self.conv1, self.bn


class AvgBranchBlock(nn.Module):
    """A DBB-style average-pool branch next to a 3x3 conv (pool padding counted, as a conv's zeros)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = conv_bn(c, c, 3, 1, 1)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=True)
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.conv(x) + self.pool(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        k3, b3 = fuse_bn(self.conv[0].weight, self.conv[1])
        c = k3.shape[0]
        kavg = torch.zeros_like(k3)
        kavg[torch.arange(c), torch.arange(c)] = 1.0 / 9
        self.fused = _deploy_conv(self.conv[0], k3 + kavg, b3)
        del self.conv


class DBBLike(nn.Module):
    """Diverse Branch Block, in the form an exported graph can merge exactly: kxk+BN, 1x1+BN, a bias-free
    1x1 -> kxk+BN sequence and an average pool (padding counted).

    DBB itself puts a BN between the 1x1 and the kxk and pads with that BN's shift ("BNAndPad"); an ONNX
    export of that is a Pad/Slice construction, not a Conv, so this re-creation leaves that BN out (with it,
    the kxk would read zeros where the two-conv form reads the shift: bnfold refuses that case).
    """

    def __init__(self, c: int, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.origin = conv_bn(c, c, k, 1, k // 2)
        self.one = conv_bn(c, c, 1, 1, 0)
        self.seq_1x1 = nn.Conv2d(c, c, 1, bias=False)
        self.seq_kxk = conv_bn(c, c, k, 1, k // 2)
        self.avg = nn.AvgPool2d(k, 1, k // 2, count_include_pad=True)
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.origin(x) + self.one(x) + self.seq_kxk(self.seq_1x1(x)) + self.avg(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        p = self.k // 2
        ko, bo = fuse_bn(self.origin[0].weight, self.origin[1])
        k1, b1 = fuse_bn(self.one[0].weight, self.one[1])
        ks, bs = fuse_bn(self.seq_kxk[0].weight, self.seq_kxk[1])
        ks = torch.einsum("omhw,mi->oihw", ks, self.seq_1x1.weight[:, :, 0, 0])
        c = ko.shape[0]
        kavg = torch.zeros_like(ko)
        kavg[torch.arange(c), torch.arange(c)] = 1.0 / (self.k * self.k)
        kernel = ko + F.pad(k1, [p, p, p, p]) + ks + kavg
        self.fused = _deploy_conv(self.origin[0], kernel, bo + b1 + bs)
        del self.origin, self.one, self.seq_1x1, self.seq_kxk


class ACBlock(nn.Module):
    """ACNet: a square kernel and its horizontal and vertical skeletons, each with its BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.square = conv_bn(cin, cout, 3, 1, 1)
        self.hor = conv_bn(cin, cout, (1, 3), 1, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), 1, (1, 0))
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.square(x) + self.hor(x) + self.ver(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        ks, bs = fuse_bn(self.square[0].weight, self.square[1])
        kh, bh = fuse_bn(self.hor[0].weight, self.hor[1])
        kv, bv = fuse_bn(self.ver[0].weight, self.ver[1])
        kernel = ks + F.pad(kh, [0, 0, 1, 1]) + F.pad(kv, [1, 1, 0, 0])
        self.fused = _deploy_conv(self.square[0], kernel, bs + bh + bv)
        del self.square, self.hor, self.ver


# ---- refused forms --------------------------------------------------------------------------------


class BranchReadElsewhere(nn.Module):
    """RepVGG-like, but the 1x1 branch's output is also returned."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = conv_bn(c, c, 3, 1, 1)
        self.b = conv_bn(c, c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.b(x)
        return self.a(x) + b, torch.relu(b)


class ActivationInBranch(nn.Module):
    """3x3 + relu(1x1): the 1x1 branch is not linear in x."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = conv_bn(c, c, 3, 1, 1)
        self.b = conv_bn(c, c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + torch.relu(self.b(x))


def conv_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
