"""bnfold.fx.fold_module / bnfold.fold on nn.Modules: run the original and the folded model, compare."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.errors import ModelStateError, UnsupportedModelError
from bnfold.fx import fold_module
from bnfold.records import Direction, SkipReason
from models.stats import randomize_bn
from models.testing import ATOL_BF16, ATOL_F16, ATOL_F32_DEEP, ATOL_F64

# Max |folded - original| relative to the output scale, per dtype. float32: the fold is computed in
# float64 and rounded once, so only the order of the conv sums changes (a few ulps times depth).
TOL = {
    torch.float32: ATOL_F32_DEEP,
    torch.float64: ATOL_F64,
    torch.float16: ATOL_F16,
    torch.bfloat16: ATOL_BF16,
}


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    a, b = a.detach().double(), b.detach().double()
    scale = max(1.0, b.abs().max().item())
    return (a - b).abs().max().item() <= TOL[dtype] * scale


def prep(m: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    randomize_bn(m, seed)
    return m.eval()


def bn_count(m: nn.Module) -> int:
    from torch.nn.modules.batchnorm import _BatchNorm

    return sum(isinstance(x, _BatchNorm) for x in m.modules())


def check(m: nn.Module, x: torch.Tensor, **kw: object) -> tuple[nn.Module, bnfold.FoldReport]:
    ref = m(x)
    out, rep = fold_module(m, **kw)  # type: ignore[arg-type]
    assert close(out(x), ref), (out(x) - ref).abs().max()
    assert close(m(x), ref)  # the original is unchanged
    return out, rep


def verdict(rep: bnfold.FoldReport, name: str) -> object:
    return next(v for v in rep.verdicts if v.bn == name)


# ---- forward folds: layer kind x groups x bias -------------------------------------------------
CONVS = [
    (nn.Conv1d, nn.BatchNorm1d, (2, 8, 11)),
    (nn.Conv2d, nn.BatchNorm2d, (2, 8, 9, 9)),
    (nn.Conv3d, nn.BatchNorm3d, (2, 8, 5, 5, 5)),
]
CONVTS = [
    (nn.ConvTranspose1d, nn.BatchNorm1d, (2, 8, 7)),
    (nn.ConvTranspose2d, nn.BatchNorm2d, (2, 8, 5, 5)),
    (nn.ConvTranspose3d, nn.BatchNorm3d, (2, 8, 3, 3, 3)),
]


@pytest.mark.parametrize("layer,bn,shape", CONVS + CONVTS)
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_forward(layer: type, bn: type, shape: tuple[int, ...], groups: int, bias: bool) -> None:
    out_ch = 8 if groups == 8 else 12
    m = prep(nn.Sequential(layer(8, out_ch, 3, groups=groups, bias=bias), bn(out_ch), nn.ReLU()))
    x = torch.randn(shape)
    # A Conv1d also runs on an unbatched (C, L), which BatchNorm1d reads as (N, C): only recorded shapes
    # prove the batch (BatchNorm2d/3d refuse the unbatched rank themselves).
    out, rep = check(m, x, **({"example_inputs": (x,)} if bn is nn.BatchNorm1d else {}))
    assert rep.folded == 1 and bn_count(out) == 0
    assert type(out) is nn.Sequential and isinstance(out[1], nn.Identity)


def test_linear_bn1d_2d_folds_and_3d_refused() -> None:
    m2 = prep(nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6)))
    out, rep = check(m2, torch.randn(4, 3, 4))
    assert rep.folded == 1
    # (N, C, L): BN normalises dim 1, Linear acts on the last dim -> not foldable.
    m3 = prep(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)))
    x3 = torch.randn(4, 6, 6)
    out, rep = check(m3, x3, example_inputs=(x3,))
    assert verdict(rep, "1").reason is SkipReason.LAYOUT
    # Rank unknown (no example inputs): refused, and the model still computes the same on 3-D input.
    out, rep = fold_module(m3)
    assert verdict(rep, "1").reason is SkipReason.LAYOUT
    assert "example_inputs" in verdict(rep, "1").text()  # the hint, worded for Python
    assert close(out(x3), m3(x3))
    # Shapes recorded from example inputs prove a 2-D input.
    m4 = prep(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 6)
    out, rep = check(m4, x, example_inputs=(x,))
    assert rep.folded == 1


def test_bn_then_linear_and_conv_backward() -> None:
    m = prep(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12), nn.Linear(12, 4)))
    out, rep = check(m, torch.randn(5, 3, 4))
    assert rep.sites[0].direction is Direction.BACKWARD
    m = prep(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=0, groups=2)))
    out, rep = check(m, torch.randn(2, 6, 8, 8))
    assert rep.sites[0].direction is Direction.BACKWARD and bn_count(out) == 0
    m = prep(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)))
    out, rep = check(m, torch.randn(2, 6, 8, 8), propagate=False)  # no exact fold (propagation moves it)
    assert verdict(rep, "1").reason is SkipReason.PADDING
    m = prep(
        nn.Sequential(nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"))
    )
    out, rep = check(m, torch.randn(2, 6, 8, 8))
    assert rep.folded == 1


class TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))


def test_shared_conv_two_bns_cloned_per_call() -> None:
    m = prep(TwoCalls())
    w0 = m.conv.weight.detach().clone()
    out, rep = check(m, torch.randn(2, 4, 6, 6))
    assert rep.folded == 2 and isinstance(out, torch.fx.GraphModule)
    assert torch.equal(m.conv.weight, w0)
    assert all("cloned" in s.detail for s in rep.sites)
    # Without a GraphModule both are left, with the reason.
    out, rep = check(m, torch.randn(2, 4, 6, 6), graph=False)
    assert {v.reason for v in rep.skips} == {SkipReason.SHARED_MODULE} and type(out) is TwoCalls


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_residual_tap_refused() -> None:
    out, rep = check(prep(Residual()), torch.randn(2, 4, 5, 5))
    assert verdict(rep, "bn").reason is SkipReason.OTHER_CONSUMERS


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.5)
        self.gamma = nn.Parameter(torch.randn(5))
        self.beta = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


def test_functional_batch_norm() -> None:
    x = torch.randn(2, 3, 7, 7)
    # F.batch_norm takes any rank >= 2: only the recorded shapes prove the conv's output is batched
    out, rep = check(prep(Functional()), x, example_inputs=(x,))
    assert rep.folded == 1
    assert "batch_norm" not in out.code


class ActBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class PlainSub(nn.BatchNorm2d):
    pass


class ResidualBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


def test_custom_bn_subclass() -> None:
    # BN-then-ReLU subclass: the BN part folds, the ReLU stays; a residual subclass is refused.
    m = prep(
        nn.Sequential(
            nn.Conv2d(3, 4, 3), ActBN(4), nn.Conv2d(4, 4, 1), PlainSub(4), nn.Conv2d(4, 4, 1), ResidualBN(4)
        )
    )
    out, rep = check(m, torch.randn(2, 3, 6, 6))
    assert isinstance(verdict(rep, "1"), bnfold.Site)
    assert verdict(rep, "5").reason is SkipReason.CUSTOM_BN
    assert isinstance(verdict(rep, "3"), bnfold.Site)
    assert not isinstance(out[1], nn.BatchNorm2d) and (out[1](-torch.ones(1, 4, 1, 1)) == 0).all()


def test_no_running_stats_and_affine_false() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    out, rep = check(m, torch.randn(4, 3, 6, 6))
    assert verdict(rep, "1").reason is SkipReason.NO_RUNNING_STATS
    m = prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)))
    out, rep = check(m, torch.randn(4, 3, 6, 6))
    assert rep.folded == 1


def test_train_mode_refused_unless_eval_semantics() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)))
    x = torch.randn(2, 3, 6, 6)
    ref = m(x)
    m.train()
    with pytest.raises(ModelStateError, match="eval_semantics"):
        fold_module(m)
    out, rep = fold_module(m, eval_semantics=True)
    assert rep.folded == 1 and out.training and m.training
    assert close(out.eval()(x), ref)


def test_lazy_module_error() -> None:
    m = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(UnsupportedModelError, match="lazy"):
        fold_module(m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_kept(dtype: torch.dtype) -> None:
    m = prep(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 16, 4), nn.BatchNorm1d(4)
        )
    )
    x = torch.randn(2, 3, 6, 6)
    m64 = copy.deepcopy(m).double()
    ref = m64(x.double())
    m = m.to(dtype)
    out, rep = fold_module(m)
    assert rep.folded == 2
    assert all(p.dtype == dtype for p in out.parameters())
    # Folded in float64 and rounded once: at least as close to the float64 truth as the original.
    err_fold = (out(x.to(dtype)).double() - ref).abs().max().item()
    err_orig = (m(x.to(dtype)).double() - ref).abs().max().item()
    assert err_fold <= 2 * err_orig + TOL[dtype] * 1e-3


def test_channels_last_kept() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    out, rep = check(m, x)
    assert out[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert out(x).is_contiguous(memory_format=torch.channels_last)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow
            return self.bn(self.conv(y))
        return self.conv(y)


def test_untraceable_model_folds_safe_parts() -> None:
    m = prep(Untraceable())
    x = torch.randn(2, 3, 7, 7)
    out, rep = check(m, x)
    assert close(out(-x), m(-x))
    assert isinstance(verdict(rep, "body.1"), bnfold.Site)
    v = verdict(rep, "bn")
    assert v.reason is SkipReason.NOT_TRACEABLE and "trace" in v.detail.lower()
    assert type(out) is Untraceable


def test_inplace_and_dry_run() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(1, 3, 5, 5)
    ref = m(x)
    rep = bnfold.inspect(m)
    assert rep.dry_run and rep.folded == 1 and bn_count(m) == 1
    out = bnfold.fold(m, inplace=True)
    assert out is m and bn_count(m) == 0 and close(m(x), ref)


def test_bnfold_nn_and_sync_bn() -> None:
    m = prep(
        nn.Sequential(nn.Conv2d(3, 4, 3), bnfold.nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4))
    )
    x = torch.randn(2, 3, 6, 6)
    out, rep = check(m, x)
    assert rep.folded == 1  # SyncBatchNorm takes any rank >= 2: an unbatched (C, H, W) is not refused
    assert verdict(rep, "3").reason is SkipReason.LAYOUT  # type: ignore[attr-defined]
    out, rep = check(m, x, example_inputs=(x,))
    assert rep.folded == 2


def test_frozen_bn_folds() -> None:
    from bnfold.nn import FrozenBatchNorm2d

    bn = prep(nn.BatchNorm2d(4))
    fz = (
        FrozenBatchNorm2d.from_bn(bn)
        if hasattr(FrozenBatchNorm2d, "from_bn")
        else bnfold.freeze(nn.Sequential(bn))[0]
    )
    m = nn.Sequential(nn.Conv2d(3, 4, 3), fz).eval()
    x = torch.randn(2, 3, 6, 6)
    out, rep = check(m, x, example_inputs=(x,))  # a frozen BN runs on any rank >= 2
    assert rep.folded == 1


def test_folded_module_is_ordinary() -> None:
    m = prep(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 2),
            nn.BatchNorm2d(2),
        )
    )
    x = torch.randn(1, 3, 6, 6)
    out, _ = check(m, x)
    # scripted and saved
    s = torch.jit.script(out)
    assert close(s(x), m(x))
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert close(torch.load(buf, weights_only=False)(x), m(x))
    # state_dict loads into the same architecture with BN -> Identity (and the bias the fold added)
    arch = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=True), nn.Identity(), nn.ReLU(), nn.ConvTranspose2d(4, 2, 2), nn.Identity()
    )
    arch.load_state_dict(out.state_dict())
    assert close(arch(x), m(x))
    # torch.onnx export (legacy) runs
    buf = io.BytesIO()
    torch.onnx.export(out, (x,), buf, dynamo=False)
    assert len(buf.getvalue()) > 0


REFERENCE = [
    "resnet18",
    "mobilenet_v2",
    "lenet5",
    "mnist_mlp",
    "bn_linear_mlp",
    "unet_decoder",
    "conv1d_net",
    "preact_net",
]


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_models(name: str) -> None:
    zoo = pytest.importorskip("models.zoo")
    entry = zoo.ZOO.get(name)
    if entry is None:
        pytest.skip(f"{name} not in models.zoo")
    factory, shape = entry
    m = prep(factory())
    shape = tuple(64 if d == 224 else d for d in shape)  # small images: the nets pool adaptively
    x = torch.randn(2, *shape)
    ref = m(x)
    out, rep = fold_module(m, example_inputs=(x,))
    assert close(out(x), ref)
    assert rep.folded >= 1
    assert all(v.reason is not SkipReason.NOT_TRACEABLE for v in rep.skips)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.b.weight = self.a.weight  # tied: folding into a must not change b
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


def test_tied_weight_not_corrupted_and_no_sharing_with_original() -> None:
    m = prep(Tied())
    out, rep = check(m, torch.randn(2, 4, 5, 5))
    assert rep.folded == 1
    originals = {id(p) for p in m.parameters()}
    assert not any(id(p) in originals for p in out.parameters())
