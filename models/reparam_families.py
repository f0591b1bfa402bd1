"""Faithful re-creations of the re-parameterisable blocks of real model families, as their projects write
them, each with its own hand-written re-parameterisation (computed in the weight dtype, as they do).

Written after the public sources (module and attribute names, forward code, merge code kept):

* timm ``byobnet.RepVggBlock`` -- ``ConvNormAct`` branches with ``BatchNormAct2d`` (a ``BatchNorm2d``
  subclass calling ``F.batch_norm``), ``x += identity`` in place, drop-path and attn ``nn.Identity``;
  dilation and groups.
* timm ``fastvit.MobileOneBlock`` -- ``num_conv_branches`` kxk branches summed with ``out += rc(x)``,
  a 1x1 scale branch, a BN skip, an SE (``x * sigmoid(...)``), GELU; ``fastvit.RepMixer``
  (``x + layer_scale(mixer(x) - norm(x))`` with ``LayerScale2d``), ``fastvit.RepConditionalPosEnc``
  (``pos_enc(x) + x``, a depthwise 7x7 with bias), ``fastvit.ReparamLargeKernelConv`` (7x7 + 3x3,
  stride 2, ``group_size=1`` so groups = C_in with C_out = 2 C_in) and its ``PatchEmbed``.
* RepViT ``RepVGGDW`` (``bn(conv(x) + conv1(x) + x)``, and timm's ``legacy`` form), ``RepViTBlock``
  (stride 1 and 2, SE, residual channel mixer).
* PP-YOLOE ``RepVggBlock`` with ``alpha`` in CSPResNet's ``BasicBlock`` with ``EffectiveSELayer``.
* YOLOv6 ``RepVGGBlock`` (``+ id_out`` with ``id_out = 0``), ``QARepVGGBlock`` (1x1 without BN, identity
  ``nn.Identity()``, BN on the sum) and ``QARepVGGBlockV2`` (plus an average-pool branch).
* DBB ``DiverseBranchBlock`` with ``BNAndPadLayer`` (pads with the BN's shift) and
  ``IdentityBasedConv1x1`` (a functional conv of weight + identity).
* ACNet ``ACBlock`` (3x3 + 3x1 + 1x3 with paddings ``[p, p - k//2]`` / ``[p - k//2, p]``, and the
  cropping form for ``padding < k // 2``).

``hand_reparameterize(model)`` calls every block's own method (``reparameterize``, ``switch_to_deploy``,
``fuse``) as the projects' deployment scripts do.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FAMILIES", "hand_reparameterize", "conv_count", "bn_count"]


# ---- timm layers ----------------------------------------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` (eval path): ``F.batch_norm`` then drop and act."""

    def __init__(self, num_features: int, apply_act: bool = True, act_layer: Any = nn.ReLU) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


def get_padding(k: int, stride: int = 1, dilation: int = 1) -> int:
    return ((stride - 1) + dilation * (k - 1)) // 2


class ConvNormAct(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        apply_act: bool = False,
    ) -> None:
        super().__init__()
        p = get_padding(k, stride, dilation)
        self.conv = nn.Conv2d(cin, cout, k, stride, p, dilation, groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=apply_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """timm's ``SEModule`` (``x * sigmoid(fc2(relu(fc1(mean(x)))))``)."""

    def __init__(self, c: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        rd = max(1, int(c * rd_ratio))
        self.fc1 = nn.Conv2d(c, rd, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, c, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.fc1(x_se)))
        return x * self.gate(x_se)


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    assert bn.running_mean is not None and bn.running_var is not None
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


def _id_kernel(cin: int, groups: int, kh: int, kw: int, like: torch.Tensor) -> torch.Tensor:
    input_dim = cin // groups
    k = torch.zeros((cin, input_dim, kh, kw), dtype=like.dtype)
    for i in range(cin):
        k[i, i % input_dim, kh // 2, kw // 2] = 1
    return k


def _deploy(ref: nn.Conv2d, kernel: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(
        ref.in_channels, ref.out_channels, ref.kernel_size, ref.stride, ref.padding, ref.dilation, ref.groups
    ).to(kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        assert conv.bias is not None
        conv.bias.copy_(bias)
    return conv


# ---- timm byobnet.RepVggBlock ----------------------------------------------------------------------


class TimmRepVggBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        attn: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = k
        use_ident = cin == cout and stride == 1
        self.identity = BatchNormAct2d(cout, apply_act=False) if use_ident else None
        self.conv_kxk = ConvNormAct(cin, cout, k, stride, dilation, groups)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride, 1, groups)
        self.attn: nn.Module = SqueezeExcite(cout) if attn else nn.Identity()
        self.drop_path = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        if self.identity is None:
            x = self.conv_1x1(x) + self.conv_kxk(x)
        else:
            identity = self.identity(x)
            x = self.conv_1x1(x) + self.conv_kxk(x)
            x = self.drop_path(x)
            x += identity
        x = self.attn(x)
        return self.act(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        k1, b1 = _fuse_bn(self.conv_1x1.conv.weight, self.conv_1x1.bn)
        pad = self.kernel_size // 2
        k1 = F.pad(k1, [pad, pad, pad, pad])
        kc, bc = _fuse_bn(self.conv_kxk.conv.weight, self.conv_kxk.bn)
        kernel, bias = kc + k1, bc + b1
        if self.identity is not None:
            c = self.conv_kxk.conv
            kid, bid = _fuse_bn(
                _id_kernel(c.in_channels, c.groups, pad * 2 + 1, pad * 2 + 1, kc), self.identity
            )
            kernel, bias = kernel + kid, bias + bid
        self.reparam_conv = _deploy(self.conv_kxk.conv, kernel, bias)
        del self.conv_kxk, self.conv_1x1, self.identity
        self.identity = None


# ---- timm fastvit ----------------------------------------------------------------------------------


class MobileOneBlock(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        group_size: int = 0,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
        byobnet: bool = False,
    ) -> None:
        super().__init__()
        self.groups = cin // group_size if group_size else 1
        self.cin, self.cout, self.k, self.stride = cin, cout, k, stride
        self.se: nn.Module = SqueezeExcite(cout, 0.0625) if use_se else nn.Identity()
        self.reparam_conv: nn.Conv2d | None = None
        # fastvit.py: nn.BatchNorm2d; byobnet.py: layers.norm_act(out_chs, apply_act=False)
        norm: Any = (lambda c: BatchNormAct2d(c, apply_act=False)) if byobnet else nn.BatchNorm2d
        self.identity = norm(cin) if cout == cin and stride == 1 else None
        self.conv_kxk = (
            nn.ModuleList(ConvNormAct(cin, cout, k, stride, 1, self.groups) for _ in range(num_conv_branches))
            if num_conv_branches > 0
            else None
        )
        self.conv_scale = (
            ConvNormAct(cin, cout, 1, stride, 1, self.groups) if k > 1 and use_scale_branch else None
        )
        self.act: nn.Module = nn.GELU() if use_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        identity_out: Any = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out: Any = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        if self.conv_kxk is not None:
            for rc in self.conv_kxk:
                out += rc(x)
        return self.act(self.se(out))

    @torch.no_grad()
    def reparameterize(self) -> None:
        kernel: Any = 0
        bias: Any = 0
        if self.conv_scale is not None:
            ks, bs = _fuse_bn(self.conv_scale.conv.weight, self.conv_scale.bn)
            pad = self.k // 2
            kernel, bias = F.pad(ks, [pad, pad, pad, pad]), bs
        if self.identity is not None:
            like = self.identity.weight
            kid, bid = _fuse_bn(_id_kernel(self.cin, self.groups, self.k, self.k, like), self.identity)
            kernel, bias = kernel + kid, bias + bid
        if self.conv_kxk is not None:
            for rc in self.conv_kxk:
                kc, bc = _fuse_bn(rc.conv.weight, rc.bn)
                kernel, bias = kernel + kc, bias + bc
        ref = nn.Conv2d(
            self.cin, self.cout, self.k, self.stride, get_padding(self.k, self.stride), groups=self.groups
        )
        self.reparam_conv = _deploy(ref, kernel, bias)
        self.id_tensor = _id_kernel(self.cin, self.groups, self.k, self.k, ref.weight).to(kernel.dtype)
        del self.conv_kxk, self.conv_scale, self.identity
        self.conv_kxk = self.conv_scale = self.identity = None


class LayerScale2d(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RepMixer(nn.Module):
    def __init__(self, dim: int, k: int = 3) -> None:
        super().__init__()
        self.dim, self.k = dim, k
        self.norm = MobileOneBlock(
            dim, dim, k, group_size=1, use_act=False, use_scale_branch=False, num_conv_branches=0
        )
        self.mixer = MobileOneBlock(dim, dim, k, group_size=1, use_act=False)
        self.layer_scale = LayerScale2d(dim, 1e-5)
        with torch.no_grad():  # a trained layer scale, not its 1e-5 init
            self.layer_scale.gamma.copy_(torch.linspace(0.05, 0.8, dim).reshape(dim, 1, 1))
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        self.mixer.reparameterize()
        self.norm.reparameterize()
        m, n = self.mixer.reparam_conv, self.norm.reparam_conv
        assert m is not None and n is not None and m.bias is not None and n.bias is not None
        w = self.mixer.id_tensor + self.layer_scale.gamma.unsqueeze(-1) * (m.weight - n.weight)
        b = torch.squeeze(self.layer_scale.gamma) * (m.bias - n.bias)
        self.reparam_conv = _deploy(m, w, b)
        del self.mixer, self.norm, self.layer_scale


class RepConditionalPosEnc(nn.Module):
    def __init__(self, dim: int, spatial_shape: tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        self.dim, self.spatial_shape, self.groups = dim, spatial_shape, dim
        self.pos_enc = nn.Conv2d(
            dim, dim, spatial_shape, 1, int(spatial_shape[0] // 2), groups=dim, bias=True
        )
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return self.pos_enc(x) + x

    @torch.no_grad()
    def reparameterize(self) -> None:
        idt = _id_kernel(self.dim, self.groups, *self.spatial_shape, self.pos_enc.weight)
        assert self.pos_enc.bias is not None
        self.reparam_conv = _deploy(self.pos_enc, idt + self.pos_enc.weight, self.pos_enc.bias)
        del self.pos_enc


class ReparamLargeKernelConv(nn.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        stride: int,
        group_size: int,
        small_kernel: int | None,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size, self.small_kernel = k, small_kernel
        groups = cin // group_size
        self.large_conv = ConvNormAct(cin, cout, k, stride, 1, groups)
        self.small_conv = ConvNormAct(cin, cout, small_kernel, stride, 1, groups) if small_kernel else None
        self.se: nn.Module = SqueezeExcite(cout, 0.25) if use_se else nn.Identity()
        self.act = nn.GELU()
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x)
            if self.small_conv is not None:
                out = out + self.small_conv(x)
        return self.act(self.se(out))

    @torch.no_grad()
    def reparameterize(self) -> None:
        eq_k, eq_b = _fuse_bn(self.large_conv.conv.weight, self.large_conv.bn)
        if self.small_conv is not None:
            assert self.small_kernel is not None
            small_k, small_b = _fuse_bn(self.small_conv.conv.weight, self.small_conv.bn)
            eq_b = eq_b + small_b
            eq_k = eq_k + F.pad(small_k, [(self.kernel_size - self.small_kernel) // 2] * 4)
        self.reparam_conv = _deploy(self.large_conv.conv, eq_k, eq_b)
        del self.large_conv, self.small_conv
        self.small_conv = None


class FastVitPatchEmbed(nn.Module):
    def __init__(self, cin: int, embed_dim: int, use_se: bool = False) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(cin, embed_dim, 7, 2, 1, 3, use_se),
            MobileOneBlock(embed_dim, embed_dim, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvMlp(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.conv = ConvNormAct(c, c, 7, 1, 1, groups=c)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, 3)
        self.mlp = ConvMlp(dim, dim * 3)
        self.layer_scale = LayerScale2d(dim, 1e-5)
        with torch.no_grad():
            self.layer_scale.gamma.copy_(torch.linspace(0.1, 0.6, dim).reshape(dim, 1, 1))
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale(self.mlp(x)))


class FastVitNet(nn.Module):
    """A small FastViT: MobileOne stem (3x3 s2, dw 3x3, pw 1x1), a RepMixer stage, a PatchEmbed
    (7x7+3x3 s2), RepCPE, another RepMixer stage, head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            MobileOneBlock(3, c, 3, 2),
            MobileOneBlock(c, c, 3, 1, group_size=1),
            MobileOneBlock(c, c, 1, 1),
        )
        self.stage1 = nn.Sequential(RepMixerBlock(c), RepMixerBlock(c))
        self.down = FastVitPatchEmbed(c, 2 * c, use_se=True)
        self.pos_emb = RepConditionalPosEnc(2 * c)
        self.stage2 = RepMixerBlock(2 * c)
        self.final = MobileOneBlock(2 * c, 4 * c, 3, 1, group_size=1, use_se=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.stage2(self.pos_emb(self.down(self.stage1(self.stem(x))))))


# ---- RepViT ------------------------------------------------------------------------------------------


class Conv2dBN(nn.Sequential):
    """RepViT's ``Conv2d_BN`` (a Sequential of ``c`` and ``bn``) with its ``fuse()``."""

    def __init__(self, a: int, b: int, ks: int = 1, stride: int = 1, pad: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, 1, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        c, bn = self.c, self.bn
        assert bn.running_var is not None and bn.running_mean is not None
        w = bn.weight / (bn.running_var + bn.eps) ** 0.5
        w = c.weight * w[:, None, None, None]
        b = bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps) ** 0.5
        return _deploy(c, w, b)


class RepVGGDW(nn.Module):
    def __init__(self, ed: int, legacy: bool = False) -> None:
        super().__init__()
        self.legacy = legacy
        self.conv = Conv2dBN(ed, ed, 3, 1, 1, groups=ed)
        self.conv1: nn.Module = (
            Conv2dBN(ed, ed, 1, 1, 0, groups=ed) if legacy else nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        )
        self.bn: nn.Module = nn.Identity() if legacy else nn.BatchNorm2d(ed)
        self.dim = ed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn((self.conv(x) + self.conv1(x)) + x)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        conv = self.conv.fuse()
        conv1 = self.conv1.fuse() if isinstance(self.conv1, Conv2dBN) else self.conv1
        assert conv.bias is not None and conv1.bias is not None
        conv1_w = F.pad(conv1.weight, [1, 1, 1, 1])
        identity = F.pad(
            torch.ones(conv1_w.shape[0], conv1_w.shape[1], 1, 1, dtype=conv1_w.dtype), [1, 1, 1, 1]
        )
        conv.weight.copy_(conv.weight + conv1_w + identity)
        conv.bias.copy_(conv.bias + conv1.bias)
        if isinstance(self.bn, nn.BatchNorm2d):
            bn = self.bn
            assert bn.running_var is not None and bn.running_mean is not None
            w = bn.weight / (bn.running_var + bn.eps) ** 0.5
            b = bn.bias + (conv.bias - bn.running_mean) * bn.weight / (bn.running_var + bn.eps) ** 0.5
            conv.weight.copy_(conv.weight * w[:, None, None, None])
            conv.bias.copy_(b)
        return conv


class Residual(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class RepViTBlock(nn.Module):
    def __init__(
        self, inp: int, hidden: int, oup: int, k: int, stride: int, use_se: bool, legacy: bool = False
    ) -> None:
        super().__init__()
        if stride == 2:
            self.token_mixer = nn.Sequential(
                Conv2dBN(inp, inp, k, stride, (k - 1) // 2, groups=inp),
                SqueezeExcite(inp, 0.25) if use_se else nn.Identity(),
                Conv2dBN(inp, oup, 1, 1, 0),
            )
        else:
            self.token_mixer = nn.Sequential(
                RepVGGDW(inp, legacy), SqueezeExcite(inp, 0.25) if use_se else nn.Identity()
            )
        self.channel_mixer = Residual(nn.Sequential(Conv2dBN(oup, hidden), nn.GELU(), Conv2dBN(hidden, oup)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_mixer(self.token_mixer(x))


class RepViTNet(nn.Module):
    def __init__(self, c: int = 8, legacy: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Sequential(
            Conv2dBN(3, c // 2, 3, 2, 1), nn.GELU(), Conv2dBN(c // 2, c, 3, 2, 1)
        )
        self.features = nn.Sequential(
            RepViTBlock(c, 2 * c, c, 3, 1, True, legacy),
            RepViTBlock(c, 2 * c, c, 3, 1, False, legacy),
            RepViTBlock(c, 4 * c, 2 * c, 3, 2, False, legacy),
            RepViTBlock(2 * c, 4 * c, 2 * c, 3, 1, True, legacy),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.patch_embed(x))


# ---- PP-YOLOE (CSPResNet) ----------------------------------------------------------------------------


class ConvBNLayer(nn.Module):
    def __init__(
        self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 0, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act: nn.Module = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class PPYoloeRepVggBlock(nn.Module):
    def __init__(self, cin: int, cout: int, alpha: bool = True) -> None:
        super().__init__()
        self.ch_in, self.ch_out = cin, cout
        self.conv1 = ConvBNLayer(cin, cout, 3, 1, 1, act=False)
        self.conv2 = ConvBNLayer(cin, cout, 1, 1, 0, act=False)
        self.act = nn.SiLU()
        self.alpha = nn.Parameter(torch.tensor([0.63])) if alpha else None
        self.conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            y = self.conv(x)
        elif self.alpha is not None:
            y = self.conv1(x) + self.alpha * self.conv2(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)

    @torch.no_grad()
    def convert_to_deploy(self) -> None:
        k3, b3 = _fuse_bn(self.conv1.conv.weight, self.conv1.bn)
        k1, b1 = _fuse_bn(self.conv2.conv.weight, self.conv2.bn)
        k1 = F.pad(k1, [1, 1, 1, 1])
        if self.alpha is not None:
            kernel, bias = k3 + self.alpha * k1, b3 + self.alpha * b1
        else:
            kernel, bias = k3 + k1, b3 + b1
        self.conv = _deploy(self.conv1.conv, kernel, bias)
        del self.conv1, self.conv2


class EffectiveSELayer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)
        self.act = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        return x * self.act(self.fc(x_se))


class PPBasicBlock(nn.Module):
    def __init__(self, c: int, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvBNLayer(c, c, 3, 1, 1)
        self.conv2 = PPYoloeRepVggBlock(c, c)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class CSPResStage(nn.Module):
    def __init__(self, cin: int, cout: int, n: int = 2) -> None:
        super().__init__()
        mid = (cin + cout) // 2
        self.conv_down = ConvBNLayer(cin, mid, 3, 2, 1)
        self.conv1 = ConvBNLayer(mid, mid // 2, 1)
        self.conv2 = ConvBNLayer(mid, mid // 2, 1)
        self.blocks = nn.Sequential(*[PPBasicBlock(mid // 2) for _ in range(n)])
        self.attn = EffectiveSELayer(mid)
        self.conv3 = ConvBNLayer(mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_down(x)
        y1 = self.conv1(x)
        y2 = self.blocks(self.conv2(x))
        y = torch.cat([y1, y2], dim=1)
        return self.conv3(self.attn(y))


class PPYoloeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNLayer(3, 8, 3, 2, 1)
        self.stages = nn.Sequential(CSPResStage(8, 16), CSPResStage(16, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


# ---- YOLOv6 ------------------------------------------------------------------------------------------


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class YoloV6RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.in_channels, self.groups = cin, groups
        padding, k = 1, 3
        padding_11 = padding - k // 2
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity: nn.Module | None = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_dense = ConvModule(cin, cout, k, stride, padding, groups)
        self.rbr_1x1: nn.Module = ConvModule(cin, cout, 1, stride, padding_11, groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out: Any = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    def _fuse_bn_tensor(self, branch: Any) -> tuple[Any, Any]:
        if branch is None:
            return 0, 0
        if isinstance(branch, ConvModule):
            return _fuse_bn(branch.conv.weight, branch.bn)
        assert isinstance(branch, nn.BatchNorm2d)
        return _fuse_bn(_id_kernel(self.in_channels, self.groups, 3, 3, branch.weight), branch)

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        k3, b3 = self._fuse_bn_tensor(self.rbr_dense)
        k1, b1 = self._fuse_bn_tensor(self.rbr_1x1)
        kid, bid = self._fuse_bn_tensor(self.rbr_identity)
        return k3 + F.pad(k1, [1, 1, 1, 1]) + kid, b3 + b1 + bid

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        kernel, bias = self.get_equivalent_kernel_bias()
        self.rbr_reparam = _deploy(self.rbr_dense.conv, kernel, bias)
        del self.rbr_dense, self.rbr_1x1
        if hasattr(self, "rbr_identity"):
            del self.rbr_identity


class QARepVGGBlock(YoloV6RepVGGBlock):
    """YOLOv6's QARepVGGBlock (``v2=True``: QARepVGGBlockV2 with an average-pool branch)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, v2: bool = False) -> None:
        super().__init__(cin, cout, stride, groups)
        self.bn = nn.BatchNorm2d(cout)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, groups=groups, bias=False)
        same = cout == cin and stride == 1
        self.rbr_identity = nn.Identity() if same else None
        self.rbr_avg = nn.AvgPool2d(3, stride, 1) if v2 and same else None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        id_out: Any = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        y = self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out
        if self.rbr_avg is not None:
            y = y + self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.se(y)))

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        k3, b3 = _fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        assert isinstance(self.rbr_1x1, nn.Conv2d)
        kernel = k3 + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if self.rbr_identity is not None:
            kernel = kernel + _id_kernel(self.in_channels, self.groups, 3, 3, kernel)
        if self.rbr_avg is not None:
            c, input_dim = kernel.shape[0], kernel.shape[1]
            k = torch.zeros_like(kernel)
            k[np.arange(c), np.tile(np.arange(input_dim), self.groups), :, :] = 1.0 / 9
            kernel = kernel + k
        return kernel, b3

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        super().switch_to_deploy()
        self.rbr_avg = None


class YoloV6Net(nn.Module):
    """An EfficientRep-style backbone: strided RepVGG blocks then RepBlocks (stride 1), QARepVGG variant."""

    def __init__(self, qa: bool = False, v2: bool = False) -> None:
        super().__init__()

        def blk(a: int, b: int, s: int = 1) -> nn.Module:
            return QARepVGGBlock(a, b, s, v2=v2) if qa else YoloV6RepVGGBlock(a, b, s)

        self.stem = blk(3, 8, 2)
        self.stage = nn.Sequential(blk(8, 16, 2), blk(16, 16), blk(16, 16), blk(16, 24, 2), blk(24, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))


# ---- DBB -----------------------------------------------------------------------------------------------


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels: int, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        output = self.bn(inp)
        if self.pad_pixels > 0:
            bn = self.bn
            assert bn.running_mean is not None and bn.running_var is not None
            pad_values = bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(
                bn.running_var + bn.eps
            )
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            p = self.pad_pixels
            output[:, :, 0:p, :] = pad_values
            output[:, :, -p:, :] = pad_values
            output[:, :, :, 0:p] = pad_values
            output[:, :, :, -p:] = pad_values
        return output


class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = np.zeros((channels, input_dim, 1, 1), dtype=np.float32)
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.register_buffer("id_tensor", torch.from_numpy(id_value))
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.dtype)
        return F.conv2d(x, kernel, None, stride=1, padding=0, dilation=1, groups=self.groups)

    def get_actual_kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor.to(self.weight.dtype)


class DiverseBranchBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.k, self.padding, self.groups = k, padding, groups
        self.dbb_origin = ConvModule(cin, cout, k, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(padding, cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, 0))
            self.dbb_1x1: ConvModule | None = ConvModule(cin, cout, 1, stride, 0, groups)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, padding))
            self.dbb_1x1 = None
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(cin, groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(padding, internal))
        self.dbb_1x1_kxk.add_module(
            "conv2", nn.Conv2d(internal, cout, k, stride, 0, groups=groups, bias=False)
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()
        self.dbb_reparam: nn.Conv2d | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.dbb_reparam is not None:
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if self.dbb_1x1 is not None:
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    @staticmethod
    def _trans_1x1_kxk(
        k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor, b2: torch.Tensor, groups: int
    ) -> Any:
        """DBB's ``transIII_1x1_kxk`` (grouped: per group, then concatenated)."""
        k1_t = k1.permute(1, 0, 2, 3)
        w1, w2 = k1.size(0) // groups, k2.size(0) // groups
        ks, bs = [], []
        for g in range(groups):
            k1_s = k1_t[:, g * w1 : (g + 1) * w1]
            k2_s = k2[g * w2 : (g + 1) * w2]
            ks.append(F.conv2d(k2_s, k1_s))
            bs.append((k2_s * b1[g * w1 : (g + 1) * w1].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
        return torch.cat(ks), torch.cat(bs) + b2

    def _avg_kernel(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        input_dim = channels // self.groups
        k = torch.zeros((channels, input_dim, self.k, self.k), dtype=like.dtype)
        k[np.arange(channels), np.tile(np.arange(input_dim), self.groups), :, :] = 1.0 / self.k**2
        return k

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        k_origin, b_origin = _fuse_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        p = self.k // 2
        if self.dbb_1x1 is not None:
            k1, b1 = _fuse_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            k_1x1, b_1x1 = F.pad(k1, [p, p, p, p]), b1
        else:
            k_1x1, b_1x1 = 0, 0  # type: ignore[assignment]
        seq = self.dbb_1x1_kxk
        k_first = seq.idconv1.get_actual_kernel() if hasattr(seq, "idconv1") else seq.conv1.weight
        k_first, b_first = _fuse_bn(k_first, seq.bn1.bn)
        k_second, b_second = _fuse_bn(seq.conv2.weight, seq.bn2)
        k_1x1_kxk, b_1x1_kxk = self._trans_1x1_kxk(k_first, b_first, k_second, b_second, self.groups)
        k_avg = self._avg_kernel(k_origin.shape[0], k_origin)
        k_1x1_avg_second, b_1x1_avg_second = _fuse_bn(k_avg, self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, "conv"):
            k_1x1_avg_first, b_1x1_avg_first = _fuse_bn(self.dbb_avg.conv.weight, self.dbb_avg.bn.bn)
            k_1x1_avg, b_1x1_avg = self._trans_1x1_kxk(
                k_1x1_avg_first, b_1x1_avg_first, k_1x1_avg_second, b_1x1_avg_second, self.groups
            )
        else:
            k_1x1_avg, b_1x1_avg = k_1x1_avg_second, b_1x1_avg_second
        kernel = k_origin + k_1x1 + k_1x1_kxk + k_1x1_avg
        bias = b_origin + b_1x1 + b_1x1_kxk + b_1x1_avg
        self.dbb_reparam = _deploy(self.dbb_origin.conv, kernel, bias)
        del self.dbb_origin, self.dbb_avg, self.dbb_1x1_kxk, self.dbb_1x1
        self.dbb_1x1 = None


# ---- ACNet ---------------------------------------------------------------------------------------------


class ACBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.square_conv = nn.Conv2d(cin, cout, (k, k), stride, padding, 1, groups, bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        if padding - k // 2 >= 0:
            self.crop = 0
            hor_padding = [padding - k // 2, padding]
            ver_padding = [padding, padding - k // 2]
        else:
            self.crop = k // 2 - padding
            hor_padding = [0, 0]
            ver_padding = [0, 0]
        self.ver_conv = nn.Conv2d(cin, cout, (k, 1), stride, ver_padding, 1, groups, bias=False)
        self.hor_conv = nn.Conv2d(cin, cout, (1, k), stride, hor_padding, 1, groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)
        self.hor_bn = nn.BatchNorm2d(cout)
        self.fused_conv: nn.Conv2d | None = None

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if self.fused_conv is not None:
            return self.fused_conv(inp)
        square_outputs = self.square_bn(self.square_conv(inp))
        if self.crop > 0:
            ver_input = inp[:, :, :, self.crop : -self.crop]
            hor_input = inp[:, :, self.crop : -self.crop, :]
        else:
            ver_input = inp
            hor_input = inp
        vertical_outputs = self.ver_bn(self.ver_conv(ver_input))
        horizontal_outputs = self.hor_bn(self.hor_conv(hor_input))
        return square_outputs + vertical_outputs + horizontal_outputs

    @staticmethod
    def _add_to_square_kernel(square_kernel: torch.Tensor, asym_kernel: torch.Tensor) -> None:
        ah, aw = asym_kernel.size(2), asym_kernel.size(3)
        sh, sw = square_kernel.size(2), square_kernel.size(3)
        square_kernel[
            :, :, sh // 2 - ah // 2 : sh // 2 - ah // 2 + ah, sw // 2 - aw // 2 : sw // 2 - aw // 2 + aw
        ] += asym_kernel

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        hk, hb = _fuse_bn(self.hor_conv.weight, self.hor_bn)
        vk, vb = _fuse_bn(self.ver_conv.weight, self.ver_bn)
        sk, sb = _fuse_bn(self.square_conv.weight, self.square_bn)
        sk = sk.clone()
        self._add_to_square_kernel(sk, hk)
        self._add_to_square_kernel(sk, vk)
        self.fused_conv = _deploy(self.square_conv, sk, hb + vb + sb)
        del self.square_conv, self.square_bn, self.ver_conv, self.ver_bn, self.hor_conv, self.hor_bn


class ACNetNet(nn.Module):
    """ACNet-converted ResNet-ish: ACBlocks with BN+ReLU, a strided one, a residual, a k=5 one."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = ACBlock(3, 8, 3, 2, 1)
        self.b2 = ACBlock(8, 8, 3, 1, 1)
        self.b3 = ACBlock(8, 8, 5, 1, 2, groups=2)
        self.b4 = ACBlock(8, 16, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(x))
        x = x + torch.relu(self.b2(x))
        x = torch.relu(self.b3(x))
        return self.b4(x)


# ---- networks and registry ---------------------------------------------------------------------------


class TimmRepVggNet(nn.Module):
    """RepVGG-A-style: stride-2 stages, identity blocks, a grouped one, a dilated one, SE in the last."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = TimmRepVggBlock(3, 8, stride=2)
        self.stages = nn.Sequential(
            TimmRepVggBlock(8, 8),
            TimmRepVggBlock(8, 16, stride=2),
            TimmRepVggBlock(16, 16, groups=4),
            TimmRepVggBlock(16, 16, dilation=2),
            TimmRepVggBlock(16, 16, attn=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class MobileOneS0Net(nn.Module):
    """MobileOne-S0 (timm byobnet form: num_conv_branches=4): dw 3x3 + pw 1x1 units, strided stages,
    an SE-block unit as in S4."""

    def __init__(self) -> None:
        super().__init__()
        k = 4

        def unit(a: int, b: int, s: int, se: bool = False) -> list[nn.Module]:
            return [
                MobileOneBlock(a, a, 3, s, group_size=1, num_conv_branches=k, use_se=se),
                MobileOneBlock(a, b, 1, 1, num_conv_branches=k, use_se=se),
            ]

        self.stem = MobileOneBlock(3, 8, 3, 2, num_conv_branches=k)
        self.stages = nn.Sequential(*unit(8, 8, 2), *unit(8, 16, 1), *unit(16, 16, 2, se=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def hand_reparameterize(model: nn.Module) -> nn.Module:
    """Every block's own re-parameterisation, in place (as the projects' deploy scripts); returns it."""
    if isinstance(model, RepVGGDW):
        return model.fuse().eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, RepVGGDW):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], m.fuse())
    for m in list(model.modules()):
        if isinstance(m, RepMixer):
            m.reparameterize()
    for m in list(model.modules()):
        for meth in ("reparameterize", "switch_to_deploy", "convert_to_deploy"):
            if hasattr(m, meth) and not isinstance(m, RepMixer):
                if getattr(m, "reparam_conv", 0) is None or not hasattr(m, "reparam_conv"):
                    getattr(m, meth)()
                break
    return model.eval()


def conv_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))


def bn_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


FAMILIES: dict[str, tuple[Any, tuple[int, int, int]]] = {
    # name: (constructor, input C, H, W)
    "timm_repvgg_block": (lambda: TimmRepVggBlock(8, 8), (8, 9, 9)),
    "timm_repvgg_dilated_groups": (lambda: TimmRepVggBlock(8, 8, dilation=2, groups=2), (8, 9, 9)),
    "timm_repvgg_net": (TimmRepVggNet, (3, 16, 16)),
    "mobileone_block_k4_se": (lambda: MobileOneBlock(8, 8, 3, num_conv_branches=4, use_se=True), (8, 9, 9)),
    "mobileone_dw_stride2": (
        lambda: MobileOneBlock(8, 8, 3, 2, group_size=1, num_conv_branches=4),
        (8, 9, 9),
    ),
    "mobileone_s0_net": (MobileOneS0Net, (3, 16, 16)),
    "mobileone_byobnet_dw": (
        lambda: MobileOneBlock(8, 8, 3, group_size=1, num_conv_branches=4, byobnet=True),
        (8, 9, 9),
    ),
    "fastvit_repmixer": (lambda: RepMixer(8), (8, 9, 9)),
    "fastvit_repcpe": (lambda: RepConditionalPosEnc(8), (8, 9, 9)),
    "fastvit_large_kernel": (lambda: ReparamLargeKernelConv(8, 16, 7, 2, 1, 3), (8, 12, 12)),
    "fastvit_net": (FastVitNet, (3, 16, 16)),
    "repvit_repvggdw": (lambda: RepVGGDW(8), (8, 9, 9)),
    "repvit_repvggdw_legacy": (lambda: RepVGGDW(8, legacy=True), (8, 9, 9)),
    "repvit_net": (RepViTNet, (3, 32, 32)),
    "repvit_net_legacy": (lambda: RepViTNet(legacy=True), (3, 32, 32)),
    "ppyoloe_block": (lambda: PPYoloeRepVggBlock(8, 8), (8, 9, 9)),
    "ppyoloe_net": (PPYoloeNet, (3, 16, 16)),
    "yolov6_repvgg_net": (YoloV6Net, (3, 16, 16)),
    "yolov6_qarepvgg": (lambda: QARepVGGBlock(8, 8), (8, 9, 9)),
    "yolov6_qarepvgg_v2": (lambda: QARepVGGBlock(8, 8, v2=True), (8, 9, 9)),
    "yolov6_qarepvgg_net": (lambda: YoloV6Net(qa=True, v2=True), (3, 16, 16)),
    "acnet_block": (lambda: ACBlock(8, 8, 3, 1, 1), (8, 9, 9)),
    "acnet_k5_stride2": (lambda: ACBlock(8, 16, 5, 2, 2), (8, 10, 11)),
    "acnet_crop": (lambda: ACBlock(8, 8, 3, 1, 0), (8, 9, 9)),
    "acnet_net": (ACNetNet, (3, 16, 16)),
    "dbb_block": (lambda: DiverseBranchBlock(8, 8, 3, 1, 1), (8, 9, 9)),
    "dbb_depthwise": (lambda: DiverseBranchBlock(8, 8, 3, 1, 1, groups=8), (8, 9, 9)),
}
