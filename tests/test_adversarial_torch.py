"""Adversarial probes of the PyTorch backends: odd module graphs where a fold could go wrong.

Each test runs the original and the folded model on the same inputs; the reference is always the
unfused model run, never the fold formula.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import InputError
from bnfold.records import Direction, Site, Skip, SkipReason
from models.stats import randomize_bn
from models.testing import ATOL_F16, ATOL_F32_DEEP

# Max |folded - original| relative to the output scale. float32: the fold is computed in float64 and
# rounded once, so only the rounding of each product changes (a few ulps over short sums).
TOL32 = ATOL_F32_DEEP  # models.testing: the one tolerance table
# float16: weights rounded to 11 bits once more than in the unfused model.
TOL16 = ATOL_F16  # models.testing: the one tolerance table


def prep(m: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    randomize_bn(m, seed)
    return m.eval()


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def fold_and_compare(m: nn.Module, x: torch.Tensor, tol: float = TOL32, **kw: object) -> bnfold.FoldReport:
    """Fold ``m``; assert outputs match and that ``m`` itself (state and attributes) is unchanged."""
    ref = m(x)
    before = state(m)
    attrs = {id(s): set(vars(s)) for s in m.modules()}
    out, rep = bnfold.fold_with_report(m, **kw)
    assert err(out(x), ref) <= tol, err(out(x), ref)
    after = state(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {id(s): set(vars(s)) for s in m.modules()} == attrs, "the input model got new attributes"
    assert err(m(x), ref) == 0.0
    return rep


def by_bn(rep: bnfold.FoldReport) -> dict[str, object]:
    return {v.bn: v for v in rep.verdicts}


# ---- BN input is a conv output reshaped / sliced / permuted: never folded ----------------------
class _Slice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)[:, 2:6])


class _Transpose(nn.Module):
    """conv1d -> transpose -> BN1d with a matching channel count (a peer folds this wrongly)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(8, 8, 1)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x).transpose(1, 2))


class _View(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.bn(y.view(y.shape[0], 8, -1))


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.c1(x), self.c2(x)], 1))


def test_bn_after_cat_of_conv_outputs_is_split_per_slice() -> None:
    rep = fold_and_compare(prep(_Cat()), torch.randn(2, 3, 8, 8))
    assert rep.folded == 1 and "split per concatenated input" in by_bn(rep)["bn"].detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", [_Slice, _Transpose, _View])
def test_bn_after_reshaped_conv_output_is_left(cls: type[nn.Module]) -> None:
    m = prep(cls())
    x = torch.randn(2, 8, 8) if cls is _Transpose else torch.randn(2, 3, 8, 8)
    rep = fold_and_compare(m, x)
    assert rep.folded == 0 and by_bn(rep)["bn"].reason is SkipReason.NO_PRODUCER  # type: ignore[attr-defined]


@pytest.mark.parametrize("drop", [nn.Dropout(0.5), nn.Dropout2d(0.5)])
def test_conv_dropout_bn(drop: nn.Module) -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 8, 3), drop, nn.BatchNorm2d(8)))
    fold_and_compare(m, torch.randn(2, 3, 8, 8))


# ---- in-place ops on the conv output --------------------------------------------------------------
class _InplaceAfter(nn.Module):
    def __init__(self, before: bool) -> None:
        super().__init__()
        self.before = before
        self.c = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        if self.before:
            y.add_(0.25)
            return self.bn(y)
        z = self.bn(y)
        y.relu_()
        return z + y


@pytest.mark.parametrize("before", [True, False])
def test_inplace_op_on_conv_output(before: bool) -> None:
    rep = fold_and_compare(prep(_InplaceAfter(before)), torch.randn(2, 3, 8, 8))
    assert rep.folded == 0


# ---- shared modules, attribute reads ------------------------------------------------------------
class _BNSharedByTwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c1(x)) - self.bn(self.c2(x))


def test_bn_module_shared_between_two_convs() -> None:
    rep = fold_and_compare(prep(_BNSharedByTwoConvs()), torch.randn(2, 3, 8, 8))
    assert rep.folded == 2


def test_conv_registered_twice_in_sequential() -> None:
    c = nn.Conv2d(3, 3, 3, padding=1)
    m = prep(nn.Sequential(c, nn.BatchNorm2d(3), nn.ReLU(), c, nn.BatchNorm2d(3)))
    x = torch.randn(2, 3, 8, 8)
    rep = fold_and_compare(m, x)
    assert rep.folded == 2
    rep = fold_and_compare(copy.deepcopy(m), x, inplace=True)  # in place must keep the object: left
    assert {v.reason for v in rep.skips} == {SkipReason.SHARED_MODULE}


class _ReadsBNBuffer(nn.Module):
    """forward reads the BN's running_mean directly: fx keeps it as a tensor constant, not a proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) + self.bn.running_mean.view(1, -1, 1, 1)


class _ReadsBNWeight(_ReadsBNBuffer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) * self.bn.weight.view(1, -1, 1, 1) + self.c.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("cls", [_ReadsBNBuffer, _ReadsBNWeight])
def test_forward_reads_bn_tensors(cls: type[nn.Module]) -> None:
    # Bug found: with a buffer read, the BN was replaced by Identity in module mode and the folded
    # model crashed with AttributeError('Identity' object has no attribute 'running_mean').
    rep = fold_and_compare(prep(cls()), torch.randn(2, 3, 8, 8))
    assert rep.folded == 1


class _TensorConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) + torch.ones(1)


def test_tracing_does_not_add_attributes_to_the_input_model() -> None:
    # Bug found: fx tracing stored `_tensor_constant0` on the user's model (fold and inspect alike).
    m = prep(_TensorConstant())
    keys = set(vars(m))
    bnfold.inspect(m)
    assert set(vars(m)) == keys
    fold_and_compare(m, torch.randn(2, 3, 8, 8))
    assert set(vars(m)) == keys


def test_wrong_example_inputs_is_a_typed_error() -> None:
    # Bug found: a shape error from ShapeProp escaped as a bare RuntimeError.
    m = prep(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8)))
    with pytest.raises(InputError, match="example_inputs"):
        bnfold.fold(m, example_inputs=torch.randn(4, 3, 5))


# ---- padding modes, dilation, stride, groups: forward and backward folds ------------------------
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_padding_modes_forward_and_backward(mode: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    fwd = prep(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(8)))
    assert fold_and_compare(fwd, x).folded == 1
    bwd = prep(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode)))
    rep = fold_and_compare(bwd, x, propagate=False)  # the exact folds alone (propagation: its own tests)
    if mode == "zeros":  # padded zeros are not shifted by the BN
        assert rep.skips[0].reason is SkipReason.PADDING
    else:  # padded values are copies of BN outputs: exact
        assert rep.folded == 1 and rep.sites[0].direction is Direction.BACKWARD


@pytest.mark.parametrize(
    "conv,folds",
    [
        (nn.Conv2d(3, 8, 3, padding="same", dilation=2), False),
        (nn.Conv2d(3, 8, 3, padding="valid", dilation=2, stride=2), True),
        (nn.Conv2d(4, 8, 3, groups=2), True),
        (nn.Conv2d(4, 8, 3, groups=4, bias=False), True),
    ],
)
def test_backward_into_odd_convs(conv: nn.Conv2d, folds: bool) -> None:
    m = prep(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(conv.in_channels), conv))
    rep = fold_and_compare(m, torch.randn(2, conv.in_channels, 9, 9), propagate=False)  # exact folds only
    assert rep.folded == int(folds)


def test_conv_transpose_output_padding_dilation_groups() -> None:
    ct = nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
    x = torch.randn(2, 4, 5, 5)
    assert fold_and_compare(prep(nn.Sequential(ct, nn.BatchNorm2d(8))), x).folded == 1
    back = prep(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), copy.deepcopy(ct)))
    rep = fold_and_compare(back, x)
    assert rep.skips[0].reason is SkipReason.UNSUPPORTED_LAYER


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)) for _ in range(2)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(3) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c, b in zip(self.convs, self.bns):
            x = torch.relu(b(c(x)))
        return x


def test_nested_sequential_and_modulelist() -> None:
    m = prep(_Nested())
    rep = fold_and_compare(m, torch.randn(2, 3, 8, 8))
    assert rep.folded == 2


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float16, TOL16), (torch.bfloat16, 3 * TOL16), (torch.float64, 1e-12)]
)
def test_low_and_high_precision(dtype: torch.dtype, tol: float) -> None:
    m = prep(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
    )
    m = m.to(dtype)
    rep = fold_and_compare(m, torch.randn(2, 3, 8, 8, dtype=dtype), tol=tol)
    assert rep.folded == 2


def test_half_conv_float_bn_keeps_conv_dtype() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 8, 3).half(), nn.BatchNorm2d(8)))
    out, rep = bnfold.fold_with_report(m)
    x = torch.randn(2, 3, 8, 8).half()
    assert err(out(x), m(x)) <= TOL16 and out[0].weight.dtype == torch.float16


def test_channels_last_and_frozen_weights() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).to(memory_format=torch.channels_last)
    m[0].weight.requires_grad_(False)
    out, _ = bnfold.fold_with_report(m)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    assert err(out(x), m(x)) <= TOL32
    assert out[0].weight.requires_grad is False


def test_hooks_and_parametrizations_are_left() -> None:
    x = torch.randn(2, 3, 8, 8)
    m = prep(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    m[0].register_forward_pre_hook(lambda mod, i: (i[0] * 2,))
    assert fold_and_compare(m, x).folded == 0
    m = prep(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3)), nn.BatchNorm2d(8)))
    assert fold_and_compare(m, x).folded == 0


# ---- untraceable parents (Rule 3 fallback) --------------------------------------------------------
class _UntraceableReusesChildConv(nn.Module):
    """The untraceable forward calls a child's conv directly as well as the child."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x) + self.a[0](x)
        return self.a(x)


class _UntraceableReadsChildBN(_UntraceableReusesChildConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x) + self.a[1].running_mean.view(1, -1, 1, 1)
        return self.a(x)


@pytest.mark.parametrize("cls", [_UntraceableReusesChildConv, _UntraceableReadsChildBN])
def test_untraceable_parent_uses_child_layers(cls: type[nn.Module]) -> None:
    """The untraceable forward reaches into the child: folding inside it would change that code's result."""
    m = prep(cls())
    x = torch.randn(2, 3, 8, 8).abs()
    rep = fold_and_compare(m, x)
    fold_and_compare(m, -x)
    v = by_bn(rep)["a.1"]
    assert isinstance(v, Skip) and v.reason is SkipReason.NOT_TRACEABLE
    assert "self.a." in v.detail


class _UntraceableLoopsOverBlocks(nn.Module):
    """Detection-head style: Python control flow on values, blocks called whole in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()) for _ in range(3)
        )
        self.heads = nn.ModuleDict({"cls": nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))})

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["cls"](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            if float(x.detach().mean()) > 10.0:
                break
        return self._head(x)


def test_untraceable_parent_that_calls_children_whole_still_folds() -> None:
    m = prep(_UntraceableLoopsOverBlocks())
    rep = fold_and_compare(m, torch.randn(2, 3, 8, 8))
    assert rep.folded == 4 and rep.bn_after == 0


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        self.c = nn.Conv2d(3, 8, 3)
        self.b = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(self.c(x))


def test_untraceable_parent_folds_traceable_children() -> None:
    m = prep(_Untraceable())
    x = torch.randn(2, 3, 8, 8).abs()
    rep = fold_and_compare(m, x)
    fold_and_compare(m, -x)
    v = by_bn(rep)
    # b is a child the untraceable forward runs only as b(c(x)): it folds too (both branches checked)
    assert isinstance(v["a.1"], Site) and isinstance(v["b"], Site)


# ---- torch.export ---------------------------------------------------------------------------------
class _ExportNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.b2 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.b3 = nn.BatchNorm2d(8)
        self.ct = nn.ConvTranspose2d(8, 4, 3, stride=2, output_padding=1, groups=2)
        self.b4 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 18 * 18, 6)
        self.b5 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b1(self.c1(x))
        y = self.c2(self.b2(torch.relu(y)))
        y = self.b3(torch.sigmoid(y))  # after a non-foldable op: left
        y = self.b4(self.ct(y))
        return self.b5(self.fc(y.flatten(1)))


@pytest.mark.parametrize("dynamic", [False, True])
def test_export_several_bns_and_unbounded_dynamic_batch(dynamic: bool) -> None:
    # Bug found: a Dim with no max (upper bound int_oo) crashed the re-export with AttributeError.
    m = prep(_ExportNet())
    x = torch.randn(2, 3, 8, 8)
    dyn = ({0: torch.export.Dim("b", min=2)},) if dynamic else None
    ep = torch.export.export(m, (x,), dynamic_shapes=dyn)
    before = {k: v.clone() for k, v in ep.state_dict.items()}
    out, rep = bnfold.fold_with_report(ep)
    assert isinstance(out, torch.export.ExportedProgram)
    assert err(out.module()(x), m(x)) <= TOL32
    assert all(torch.equal(before[k], v) for k, v in ep.state_dict.items())
    # b2 folds backward into the circular-padded c2 (the pad copies BN outputs); b3 sits after a sigmoid
    # before a ConvTranspose; BNs are named by module path
    assert rep.folded == 4 and {v.bn for v in rep.skips} == {"b3"}
    if dynamic:
        x5 = torch.randn(5, 3, 8, 8)
        assert err(out.module()(x5), m(x5)) <= TOL32


class _ExportReadsBuffers(_ReadsBNBuffer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x)) + self.bn.running_mean.view(1, -1, 1, 1) + self.c.weight.sum()


def test_export_program_reading_bn_and_conv_tensors() -> None:
    m = prep(_ExportReadsBuffers())
    x = torch.randn(2, 3, 8, 8)
    out = bnfold.fold(torch.export.export(m, (x,)))
    assert err(out.module()(x), m(x)) <= TOL32


class _Linear3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_linear_bn1d_on_3d_square_tensor_is_left_everywhere() -> None:
    # (N, C, L) with C == L == features: a channel-count check alone would fold it wrongly.
    m = prep(_Linear3d())
    x = torch.randn(2, 6, 6)
    rep = fold_and_compare(m, x, example_inputs=x)
    assert rep.folded == 0 and rep.skips[0].reason is SkipReason.LAYOUT
    out, rep = bnfold.fold_with_report(torch.export.export(m, (x,)))
    assert rep.folded == 0 and err(out.module()(x), m(x)) == 0.0


def test_reads_bn_buffer_inplace_is_left_as_shared_module() -> None:
    m = prep(_ReadsBNBuffer())
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    out, rep = bnfold.fold_with_report(m, inplace=True)
    assert out is m and err(out(x), ref) == 0.0
    assert rep.skips[0].reason is SkipReason.SHARED_MODULE


@pytest.mark.parametrize("compile_", ["script", "trace"])
def test_torchscript_module_is_refused_not_reported_bn_free(compile_: str) -> None:
    # Bug found: a scripted model came back with an empty report ("No BatchNorm layer found").
    from bnfold.errors import UnsupportedModelError

    m = prep(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    x = torch.randn(2, 3, 8, 8)
    sm = torch.jit.script(m) if compile_ == "script" else torch.jit.trace(m, x)
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        bnfold.inspect(sm)
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        bnfold.fold(sm)


def test_data_parallel_wrapper_folds() -> None:
    m = prep(nn.DataParallel(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())))
    assert fold_and_compare(m, torch.randn(2, 3, 8, 8)).folded == 1
