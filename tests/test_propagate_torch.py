"""Scale propagation for nn.Module (issue 27, bnfold.fx.propagate): a BN no exact fold removes is split into
its scale and its shift, moved through ReLU / LeakyReLU / pooling / flatten / zero padding into the next
Conv or Linear by exact identities; channels whose scale cannot move keep the whole BN.

Each case runs the original in float64 and the folded model in float32 (1e-5 of the output scale) or
float64 (1e-12), counts BN modules and add / mul nodes, and checks the original is untouched (every
tensor, every attribute). BN statistics are realistic (mean != 0, var != 1, |gamma| != 1, beta != 0).
"""

from __future__ import annotations

import copy
import io
import operator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import bnfold
from bnfold.records import Direction, FoldReport, Site, Skip, SkipReason
from models import propagate as nets
from models.preact import preact_net

C = 6
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def set_stats(m: nn.Module, sign: str = "positive", seed: int = 7) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            c = bn.num_features

            def u(lo: float, hi: float, c: int = c) -> torch.Tensor:
                return torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo

            gamma = u(0.5, 1.5)
            if sign == "negative":
                gamma = -gamma
            elif sign == "mixed":
                gamma[::2] = -gamma[::2]
            elif sign == "zero":
                gamma[1::3] = 0.0
            with torch.no_grad():
                bn.weight.copy_(gamma)
                bn.bias.copy_(u(-0.5, 0.5))
                bn.running_mean.copy_(u(-0.5, 0.5))
                bn.running_var.copy_(torch.exp(u(-1.4, 0.9)))
    return m.eval()


class Chain(nn.Module):
    """producer -> BN -> ops -> layer (-> also the producer's output when ``extra_out``)."""

    def __init__(
        self, ops: list[nn.Module], layer: nn.Module, producer: str = "relu", extra_out: bool = False
    ):
        super().__init__()
        self.pre = nn.Conv2d(C, C, 1) if producer == "conv" else nn.ReLU()
        self.bn = nn.BatchNorm2d(C, eps=1e-3)
        self.ops = nn.Sequential(*ops)
        self.layer = layer
        self.extra_out = extra_out

    def forward(self, x: torch.Tensor) -> Any:
        p = self.pre(x)
        y = self.layer(self.ops(self.bn(p)))
        return (y, p) if self.extra_out else y


def conv(pads: int = 0, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(C, 12 if groups > 1 else 4, 3, padding=pads, groups=groups, bias=bias)


def x_for(dtype: torch.dtype = torch.float64, shape: tuple[int, ...] = (2, C, 8, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)


def snapshot(m: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: (v, v.detach().clone()) for k, v in m.state_dict(keep_vars=True).items()},
        "modules": [(n, type(s), s.training, dict(vars(s))) for n, s in m.named_modules()],
    }


def assert_untouched(m: nn.Module, snap: dict[str, Any]) -> None:
    now = m.state_dict(keep_vars=True)
    assert set(now) == set(snap["state"])
    for k, (obj, val) in snap["state"].items():
        assert now[k] is obj and torch.equal(now[k].detach(), val), k
    mods = [(n, type(s), s.training, dict(vars(s))) for n, s in m.named_modules()]
    assert len(mods) == len(snap["modules"])
    for (n, t, tr, d), (n2, t2, tr2, d2) in zip(mods, snap["modules"]):
        assert (n, t, tr) == (n2, t2, tr2) and d.keys() == d2.keys(), n
        for key in d:
            assert d[key] is d2[key] or d[key] == d2[key], (n, key)


def outputs(m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        y = m(x)
    return list(y) if isinstance(y, tuple) else [y]


def fold_and_check(
    m: nn.Module, x: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, **kw: Any
) -> tuple[nn.Module, FoldReport]:
    """Fold ``m`` (in ``dtype``), compare with the original run in float64; the original is untouched."""
    x = x_for() if x is None else x.double()
    ref = outputs(copy.deepcopy(m).double(), x)
    m = m.to(dtype)
    snap = snapshot(m)
    out, report = bnfold.fold_with_report(m, **kw)
    assert_untouched(m, snap)
    got = outputs(out, x.to(dtype))
    for r, g in zip(ref, got):
        scale = max(1.0, float(r.abs().max()))
        assert float((r - g.double()).abs().max()) <= TOL[dtype] * scale
    return out, report


def bn_count(m: nn.Module) -> int:
    return sum(isinstance(s, nn.modules.batchnorm._BatchNorm) for s in m.modules())


def counts(m: nn.Module) -> tuple[int, int, int]:
    """BN modules, multiplications and additions in the model's graph."""
    g = m.graph if isinstance(m, fx.GraphModule) else fx.symbolic_trace(m).graph
    muls = sum(n.target in (operator.mul, torch.mul) for n in g.nodes)
    adds = sum(n.target in (operator.add, torch.add) for n in g.nodes)
    return bn_count(m), muls, adds


def verdict(report: FoldReport, name: str = "bn") -> Site | Skip:
    (v,) = [v for v in report.verdicts if v.bn == name]
    return v


def assert_propagated(report: FoldReport, target: str = "layer", name: str = "bn") -> Site:
    v = verdict(report, name)
    assert isinstance(v, Site) and v.direction is Direction.PROPAGATED, v
    assert v.target == target and v.to_dict()["status"] == "propagated"
    assert v in report.sites
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.13), nn.LeakyReLU(-0.4)])
def test_relu_positive_scale_moves_into_the_conv_and_one_add_stays(
    act: nn.Module, dtype: torch.dtype
) -> None:
    m = set_stats(Chain([act], conv(pads=1)))
    assert counts(m) == (1, 0, 0)
    out, report = fold_and_check(m, dtype=dtype)
    v = assert_propagated(report)
    assert f"shift as one Add before {type(act).__name__} 'ops.0'" in v.detail
    assert isinstance(out, fx.GraphModule) and report.result == "graph_module"
    assert counts(out) == (0, 0, 1) and report.bn_after == 0


def test_relu_with_every_channel_blocked_keeps_the_whole_bn() -> None:
    m = set_stats(Chain([nn.ReLU()], conv(pads=1)), "negative")
    out, report = fold_and_check(m)
    v = verdict(report)
    why = "6 of 6 channels have a negative scale before ReLU 'ops.0'"
    assert (
        isinstance(v, Skip)
        and v.reason is SkipReason.NO_PRODUCER
        and v.detail.endswith("; not propagated: " + why)
    )
    assert counts(out) == (1, 0, 0) and type(out) is Chain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "sign,kept",
    [
        ("mixed", "3 of 6 channels keep their affine (3 with a negative scale before ReLU 'ops.0')"),
        (
            "zero",
            "2 of 6 channels keep their affine (2 with a zero scale and a non-zero shift before ReLU 'ops.0')",
        ),
    ],
)
def test_relu_blocked_channels_keep_one_multiply_the_others_move(
    sign: str, kept: str, dtype: torch.dtype
) -> None:
    """Channels whose scale cannot pass the ReLU keep ``a*x + b`` (a Mul and an Add before it); the
    others' scale goes into the conv, their shift into that Add."""
    m = set_stats(Chain([nn.ReLU()], conv(pads=1)), sign)
    out, report = fold_and_check(m, dtype=dtype)
    v = assert_propagated(report)
    assert v.detail == (
        "scale into the input channels of Conv2d 'layer' through ReLU; shift in that Add before ReLU 'ops.0'; "
        f"{kept}: one Mul and one Add before ReLU 'ops.0'"
    )
    assert counts(out) == (0, 1, 1) and report.bn_after == 0


def test_mixed_signs_before_maxpool_keep_their_affine_there_the_shift_goes_into_the_bias() -> None:
    m = set_stats(Chain([nn.AdaptiveAvgPool2d(6), nn.MaxPool2d(2)], conv()), "mixed")
    out, report = fold_and_check(m)
    v = assert_propagated(report)
    assert v.detail.endswith(
        "shift into the bias of Conv2d 'layer'; 3 of 6 channels keep their affine "
        "(3 with a negative scale before MaxPool2d 'ops.1'): one Mul and one Add before MaxPool2d 'ops.1'"
    )
    assert counts(out) == (0, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_signs_after_a_flatten_keep_a_per_feature_affine(dtype: torch.dtype) -> None:
    """The Mul and Add go after the flatten (before the ReLU): one value per feature, channel-major."""
    m = set_stats(Chain([nn.AvgPool2d(2), nn.Flatten(), nn.LeakyReLU(0.2)], nn.Linear(C * 16, 5)), "mixed")
    out, report = fold_and_check(m, dtype=dtype)
    v = assert_propagated(report)
    assert (
        v.detail.endswith("one Mul and one Add before LeakyReLU 'ops.2'")
        and "shift in that Add before LeakyReLU 'ops.2'" in v.detail
    )
    assert counts(out) == (0, 1, 1)


class FunctionalPoolHead(nn.Module):
    def __init__(self, pool: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.fc = nn.Linear(C * 4, 3)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.relu(self.bn(torch.relu(x)))
        p = F.adaptive_avg_pool2d(t, 2) if self.pool == "avg" else F.adaptive_max_pool2d(t, (2, 2))
        return self.fc(torch.flatten(p, 1))


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("sign", ["positive", "mixed"])
def test_functional_adaptive_pools_carry_the_scale(pool: str, sign: str) -> None:
    out, report = fold_and_check(set_stats(FunctionalPoolHead(pool), sign))
    v = assert_propagated(report, "fc")
    assert v.detail.startswith(
        f"scale into the input channels of Linear 'fc' through relu, adaptive_{pool}_pool2d, flatten; "
    )
    assert bn_count(out) == 0 and counts(out)[1] == (sign == "mixed")


def test_mixed_signs_and_zero_scales_before_a_flatten_and_linear() -> None:
    """Blocked channels of both kinds; the shift stops at the ReLU after a flatten (a per-feature add)."""
    m = set_stats(Chain([nn.MaxPool2d(2), nn.Flatten(), nn.ReLU()], nn.Linear(C * 16, 5)), "mixed")
    with torch.no_grad():
        m.bn.weight[1] = 0.0
    out, report = fold_and_check(m)
    v = assert_propagated(report)
    assert (
        "4 of 6 channels keep their affine (3 with a negative scale before MaxPool2d 'ops.0', 1 with a zero"
        in v.detail
    )
    fold_and_check(m, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pads,ceil", [(0, False), (1, True), (1, False)])
@pytest.mark.parametrize("sign", ["positive", "zero"])
def test_maxpool_carries_scale_and_shift_into_an_unpadded_conv(
    pads: int, ceil: bool, sign: str, dtype: torch.dtype
) -> None:
    """maxpool(a*x + b) = a*maxpool(x) + b for a >= 0 (any padding: max pads with -inf; ceil mode)."""
    m = set_stats(Chain([nn.MaxPool2d(3, 2, padding=pads, ceil_mode=ceil)], conv()), sign)
    out, report = fold_and_check(m, x_for(shape=(2, C, 9, 9)), dtype=dtype)
    v = assert_propagated(report)
    assert "shift into the bias of Conv2d 'layer'" in v.detail and "through MaxPool2d" in v.detail
    assert counts(out) == (0, 0, 0)


def test_maxpool_negative_scale_keeps_the_bn() -> None:
    out, report = fold_and_check(set_stats(Chain([nn.MaxPool2d(2)], conv()), "negative"))
    v = verdict(report)
    assert isinstance(v, Skip) and "negative scale before MaxPool2d" in v.detail
    assert counts(out) == (1, 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", ["positive", "negative", "mixed"])
def test_bn_into_a_zero_padded_conv_is_propagated(sign: str, dtype: torch.dtype) -> None:
    """Refused as 'padding' without propagation: the scale goes into the conv, the shift is an add before it."""
    m = set_stats(Chain([], conv(pads=1)), sign)
    out0, r0 = fold_and_check(m, dtype=dtype, propagate=False)
    v0 = verdict(r0)
    assert isinstance(v0, Skip) and v0.reason is SkipReason.PADDING and counts(out0) == (1, 0, 0)
    assert type(out0) is Chain and r0.result == "module"
    out, report = fold_and_check(m, dtype=dtype)
    v = assert_propagated(report)
    assert "through nothing; shift as one Add before Conv2d 'layer'" in v.detail
    assert counts(out) == (0, 0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_padded_conv_with_some_zero_scales_keeps_their_affine(dtype: torch.dtype) -> None:
    out, report = fold_and_check(set_stats(Chain([], conv(pads=1)), "zero"), dtype=dtype)
    v = assert_propagated(report)
    assert v.detail == (
        "scale into the input channels of Conv2d 'layer' through nothing; shift in that Add before Conv2d "
        "'layer' (it pads with zeros); 2 of 6 channels keep their affine (2 with a zero scale and a non-zero "
        "shift before Conv2d 'layer' (it pads with zeros)): one Mul and one Add before Conv2d 'layer' (it pads "
        "with zeros)"
    )
    assert counts(out) == (0, 1, 1)


def test_zero_padded_conv_with_every_scale_zero_keeps_the_bn() -> None:
    m = set_stats(Chain([], conv(pads=1)))
    with torch.no_grad():
        m.bn.weight.zero_()
    out, report = fold_and_check(m)
    v = verdict(report)
    assert isinstance(v, Skip) and v.reason is SkipReason.PADDING
    assert v.detail.endswith(
        "; not propagated: 6 of 6 channels have a zero scale and a non-zero shift before Conv2d 'layer' "
        "(it pads with zeros)"
    )
    assert counts(out) == (1, 0, 0)


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((1, 2, 2, 1)), nn.ConstantPad2d(1, 0.0)])
@pytest.mark.parametrize("sign", ["positive", "mixed"])
def test_zero_pad_passes_the_scale_not_the_shift(pad: nn.Module, sign: str) -> None:
    out, report = fold_and_check(set_stats(Chain([pad], conv()), sign))
    v = assert_propagated(report)
    assert f"shift as one Add before {type(pad).__name__} 'ops.0'" in v.detail
    assert counts(out) == (0, 0, 1)


def test_non_zero_constant_pad_is_refused() -> None:
    out, report = fold_and_check(set_stats(Chain([nn.ConstantPad2d(1, 0.5)], conv())))
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)


@pytest.mark.parametrize("cip,adds", [(False, 0), (True, 1)])
def test_average_pool_with_padding_passes_the_shift_only_when_padding_is_not_counted(
    cip: bool, adds: int
) -> None:
    m = set_stats(Chain([nn.AvgPool2d(3, padding=1, count_include_pad=cip)], conv()), "mixed")
    out, report = fold_and_check(m, x_for(shape=(2, C, 9, 9)))
    assert_propagated(report)
    assert counts(out) == (0, 0, adds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_pool_flatten_linear_folds_completely_for_any_sign(dtype: torch.dtype) -> None:
    m = set_stats(Chain([nn.AdaptiveAvgPool2d(1), nn.Flatten()], nn.Linear(C, 5)), "mixed")
    out, report = fold_and_check(m, dtype=dtype)
    assert_propagated(report)
    assert counts(out) == (0, 0, 0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_crepe_head_maxpool_flatten_linear(dtype: torch.dtype, bias: bool) -> None:
    """BN -> MaxPool (ceil mode, padded) -> Dropout -> Flatten -> Linear: scale and shift both into the Linear."""
    ops = [nn.MaxPool2d(2, padding=1, ceil_mode=True), nn.Dropout(0.3), nn.Flatten()]
    m = set_stats(Chain(ops, nn.Linear(C * 25, 5, bias=bias)))
    out, report = fold_and_check(m, x_for(shape=(2, C, 9, 9)), dtype=dtype)
    v = assert_propagated(report)
    assert "shift into the bias of Linear 'layer'" in v.detail
    assert counts(out) == (0, 0, 0)


def test_depthwise_conv_scales_each_group() -> None:
    out, report = fold_and_check(set_stats(Chain([nn.ReLU()], conv(pads=1, groups=C))))
    assert_propagated(report)
    assert counts(out) == (0, 0, 1)


def test_grouped_conv_unpadded_takes_the_shift_in_its_new_bias() -> None:
    out, report = fold_and_check(set_stats(Chain([nn.MaxPool2d(2)], conv(groups=2, bias=False)), "zero"))
    v = assert_propagated(report)
    assert "shift into the bias" in v.detail and counts(out) == (0, 0, 0)


@pytest.mark.parametrize("rank", [1, 3])
def test_conv1d_and_conv3d(rank: int) -> None:
    bn_t = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[rank]
    conv_t = {1: nn.Conv1d, 3: nn.Conv3d}[rank]
    pool_t = {1: nn.MaxPool1d, 3: nn.MaxPool3d}[rank]
    m = nn.Sequential(nn.ReLU(), bn_t(C), pool_t(2, padding=1, ceil_mode=True), conv_t(C, 4, 3, padding=1))
    set_stats(m)
    x = x_for(shape=(2, C) + (7,) * rank)
    # a Conv1d also runs on an unbatched (C, L), which BatchNorm1d reads as (N, C): shapes prove the batch
    out, report = fold_and_check(m, x, **({"example_inputs": x.float()} if rank == 1 else {}))
    assert_propagated(report, target="3", name="1")
    assert counts(out) == (0, 0, 1)


def test_batchnorm1d_into_linear_needs_recorded_shapes() -> None:
    """BatchNorm1d -> ReLU -> Linear is exact on (N, C) only: the rank comes from example_inputs."""
    m = set_stats(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(C), nn.ReLU(), nn.Linear(C, 3)))
    x = x_for(shape=(5, C))
    _, r0 = fold_and_check(m, x)
    assert isinstance(verdict(r0, "1"), Skip)
    out, report = fold_and_check(m, x, example_inputs=x.float())
    v = assert_propagated(report, target="3", name="1")
    assert "shift as one Add before ReLU '2'" in v.detail and bn_count(out) == 0


def test_functional_relu_flatten_and_pad() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(C)
            self.conv = nn.Conv2d(C, 4, 3)
            self.bn2 = nn.BatchNorm2d(C)
            self.fc = nn.Linear(C * 16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(x)
            y = self.conv(F.pad(F.relu(self.bn(x)), (1, 1, 1, 1)))
            z = F.max_pool2d(x, 2)
            z = F.leaky_relu(self.bn2(z), 0.2)
            return y.sum((2, 3)).sum(1, keepdim=True) + self.fc(z.view(z.size(0), -1))

    out, report = fold_and_check(set_stats(Net()))
    assert_propagated(report, target="conv")
    assert_propagated(report, target="fc", name="bn2")
    assert bn_count(out) == 0


def test_shift_reaching_a_producer_read_elsewhere_stays_an_add() -> None:
    """The producing Conv's output is also a model output: its bias must not take the shift."""
    m = set_stats(Chain([nn.ReLU()], conv(pads=1), producer="conv", extra_out=True))
    pb = m.pre.bias.detach().clone()
    out, report = fold_and_check(m)
    v = assert_propagated(report)
    assert "shift as one Add before ReLU 'ops.0'" in v.detail
    assert counts(out) == (0, 0, 1)
    assert torch.equal(out.get_submodule("pre").bias.detach(), pb)


def test_bn_output_read_twice_is_not_propagated() -> None:
    class Twice(Chain):
        def forward(self, x: torch.Tensor) -> Any:
            h = self.bn(self.pre(x))
            return self.layer(self.ops(h)), h

    out, report = fold_and_check(set_stats(Twice([nn.ReLU()], conv(pads=1))))
    assert isinstance(verdict(report), Skip) and bn_count(out) == 1


def test_inplace_relu_on_a_tensor_read_elsewhere_stays_exact() -> None:
    """ReLU(inplace=True) after the BN: after the rewrite it reads the add of the shift, never the BN's input."""
    m = set_stats(Chain([nn.ReLU(inplace=True)], conv(pads=1), producer="conv", extra_out=True))
    out, report = fold_and_check(m)
    assert_propagated(report)


def test_inplace_relu_with_no_shift_is_refused() -> None:
    m = set_stats(Chain([nn.ReLU(inplace=True)], conv(pads=1), producer="conv", extra_out=True))
    with torch.no_grad():  # b = beta - mean * a = 0: no add would protect the producer's output
        m.bn.bias.zero_()
        m.bn.running_mean.zero_()
    out, report = fold_and_check(m)  # compares the producer's output too
    assert isinstance(verdict(report), Skip) and bn_count(out) == 1


def test_hooks_on_a_chain_module_refuse() -> None:
    m = set_stats(Chain([nn.ReLU()], conv(pads=1)))
    m.ops[0].register_forward_hook(lambda mod, i, o: None)
    out, report = fold_and_check(m)
    assert isinstance(verdict(report), Skip) and bn_count(out) == 1


def test_train_mode_dropout_passes_only_the_scale() -> None:
    m = set_stats(Chain([nn.Dropout(0.0)], conv(pads=1)))
    m.ops[0].train()
    out, report = fold_and_check(m)
    v = assert_propagated(report)
    assert "shift as one Add before Dropout" in v.detail


def test_shared_layer_is_cloned_for_the_propagated_call() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(C)
            self.conv = nn.Conv2d(C, C, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.bn(torch.relu(self.conv(x)))))

    out, report = fold_and_check(set_stats(Shared()))
    assert isinstance(verdict(report), Site) and bn_count(out) == 0


def test_propagate_false_keeps_todays_result_and_inspect_predicts() -> None:
    m = set_stats(Chain([nn.ReLU()], conv(pads=1)))
    out, report = fold_and_check(m, propagate=False)
    assert type(out) is Chain and report.result == "module" and isinstance(verdict(report), Skip)
    dry = bnfold.inspect(m)
    _, real = fold_and_check(m)
    assert [v.to_dict() for v in dry.verdicts] == [v.to_dict() for v in real.verdicts]
    assert (dry.bn_after, dry.result, dry.nodes_after, dry.params_after) == (
        real.bn_after,
        real.result,
        real.nodes_after,
        real.params_after,
    )
    assert isinstance(verdict(bnfold.inspect(m, propagate=False)), Skip)


def test_inplace_fold_does_not_propagate() -> None:
    m = set_stats(Chain([nn.ReLU()], conv(pads=1)))
    x = x_for(torch.float32)
    ref = outputs(m, x)[0]
    out, report = bnfold.fold_with_report(m, inplace=True)
    assert out is m and isinstance(verdict(report), Skip)
    assert torch.allclose(outputs(out, x)[0], ref, atol=1e-5)


# ---- the networks of models/propagate.py and models/preact.py ---------------------------------------


def network(name: str, sign: str) -> tuple[nn.Module, torch.Tensor]:
    if name == "preact_net":
        return nets.set_bn(preact_net(), sign=sign), torch.randn(
            2, 3, 32, 32, generator=torch.Generator().manual_seed(4)
        )
    net = nets.set_bn(nets.MODELS[name](), sign=sign)
    return net, net.example()


@pytest.mark.parametrize("name", ["preact", "dense", "crepe", "preact_resnet"])
def test_networks_lose_every_bn_for_positive_scales(name: str) -> None:
    net, x = network(name, "positive")
    out, report = fold_and_check(net, x)
    assert bn_count(out) == 0 and report.bn_after == 0 and report.folded == report.bn_before
    assert any(isinstance(v, Site) and v.direction is Direction.PROPAGATED for v in report.verdicts)
    assert counts(out)[1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_preact_net_bn_read_by_two_layers_scales_both(dtype: torch.dtype) -> None:
    """block2.bn1 -> ReLU -> {shortcut 1x1 (no padding), conv1 3x3 (padded)}: both take the scale; the
    shift stops before them (the 3x3 pads) as one Add."""
    net, x = network("preact_net", "positive")
    out, report = fold_and_check(net, x, dtype=dtype)
    assert report.skips == [] and bn_count(out) == 0
    v = assert_propagated(report, "block2.shortcut", "block2.bn1")
    assert v.detail == (
        "scale into the input channels of Conv2d 'block2.shortcut', Conv2d 'block2.conv1' through ReLU; "
        "shift as one Add before ReLU 'block2.relu'"
    )


class Fork(nn.Module):
    """producer -> BN [-> ReLU] -> {conv a, conv b[, linear after a pool]}: the tensor forks into layers."""

    def __init__(self, relu: bool, pads: int, bias: bool):
        super().__init__()
        self.pre = nn.ReLU()
        self.bn = nn.BatchNorm2d(C, eps=1e-3)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.a = nn.Conv2d(C, 4, 1, bias=bias)
        self.b = nn.Conv2d(C, 5, 3, padding=pads, bias=bias)
        self.c = nn.Conv2d(C, C, 3, groups=C)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.act(self.bn(self.pre(x)))
        u = self.a(t)[:, :, 1:-1, 1:-1].sum(1, keepdim=True)
        y = self.b(t).mean(1, keepdim=True)
        return u + (y[..., 1:-1, 1:-1] if self.pads else y) + self.c(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "relu,pads,sign,shift",
    [
        (False, 0, "positive", "shift into the bias of Conv2d 'a', Conv2d 'b', Conv2d 'c'"),
        (False, 1, "mixed", "shift as one Add before Conv2d 'a', Conv2d 'b', Conv2d 'c'"),
        (True, 0, "positive", "shift as one Add before ReLU 'act'"),
        (True, 0, "mixed", "shift in that Add before ReLU 'act'; 3 of 6 channels keep"),
    ],
)
def test_fork_into_several_layers_scales_every_reader(
    relu: bool, pads: int, sign: str, shift: str, dtype: torch.dtype
) -> None:
    m = set_stats(Fork(relu, pads, bias=pads == 0), sign)
    x = x_for(shape=(2, C, 6, 6))
    out, report = fold_and_check(m, x, dtype=dtype)
    v = assert_propagated(report, "a")
    assert "scale into the input channels of Conv2d 'a', Conv2d 'b', Conv2d 'c' through " in v.detail
    assert shift in v.detail
    assert bn_count(out) == 0


def test_fork_into_a_layer_and_another_op_keeps_the_bn() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(C)
            self.conv = nn.Conv2d(C, C, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = torch.relu(self.bn(torch.relu(x)))
            return self.conv(t) * t

    out, report = fold_and_check(set_stats(M()))
    assert isinstance(verdict(report), Skip) and bn_count(out) == 1


def test_crepe_ceil_mode_float64_and_mixed_signs() -> None:
    net = nets.set_bn(nets.Crepe(ceil_mode=True), sign="positive")
    out, _ = fold_and_check(net, net.example(torch.float64), dtype=torch.float64)
    assert bn_count(out) == 0
    mixed = nets.set_bn(nets.Crepe(), sign="mixed")
    out, report = fold_and_check(mixed, mixed.example())
    assert bn_count(out) == 0 and report.skips == []
    kept = [v.detail for v in report.verdicts if "keep their affine" in v.detail]
    assert len(kept) == 4 and all("with a negative scale before MaxPool2d" in d for d in kept)


# ---- parity with the ONNX backend -------------------------------------------------------------------


def _module_name(onnx_name: str) -> str:
    """``/block1/bn1/BatchNormalization`` -> ``block1.bn1``; ``/body/body.3/...`` -> ``body.3``."""
    path: list[str] = []
    for seg in onnx_name.strip("/").split("/")[:-1]:
        if path and seg.startswith(".".join(path) + "."):
            path = seg.split(".")
        else:
            path.append(seg)
    return ".".join(path)


@pytest.mark.parametrize("sign", ["positive", "mixed"])
@pytest.mark.parametrize("name", ["preact", "dense", "crepe", "preact_net", "preact_resnet"])
def test_same_bns_propagated_as_through_onnx(name: str, sign: str) -> None:
    onnx = pytest.importorskip("onnx")
    from bnfold.onnx import fold_model

    net, x = network(name, sign)
    buf = io.BytesIO()
    torch.onnx.export(
        net, (x,), buf, dynamo=False, do_constant_folding=False, input_names=["x"], opset_version=17
    )
    _, rep_onnx = fold_model(onnx.load_from_string(buf.getvalue()))
    _, rep_torch = bnfold.fold_with_report(net)
    via_onnx = {_module_name(v.bn): v.to_dict()["status"] for v in rep_onnx.verdicts}
    via_torch = {v.bn: v.to_dict()["status"] for v in rep_torch.verdicts}
    assert via_torch.keys() == via_onnx.keys()
    assert via_torch == via_onnx


def test_eval_semantics_with_recorded_shapes_leaves_the_kept_bns_statistics() -> None:
    """A train()-mode model folded with eval_semantics: recording shapes for propagation must not run the
    kept BN in train mode (which would update its running statistics)."""
    m = nn.Sequential(
        nn.ReLU(),
        nn.BatchNorm1d(C),
        nn.ReLU(),
        nn.Linear(C, C),
        nn.ReLU(),
        nn.BatchNorm1d(C),
        nn.ReLU(),
        nn.Linear(C, 3),
    )
    set_stats(m)
    set_stats(m[5], "negative", seed=9)
    x = x_for(torch.float32, (5, C))
    ref = outputs(copy.deepcopy(m).eval(), x)[0]
    m.train()
    snap = snapshot(m)
    out, report = bnfold.fold_with_report(m, eval_semantics=True, example_inputs=x)
    assert_untouched(m, snap)
    assert isinstance(verdict(report, "1"), Site) and isinstance(verdict(report, "5"), Skip)
    assert torch.allclose(outputs(out.eval(), x)[0], ref, atol=1e-5, rtol=1e-5)


def test_result_saves_and_loads_with_torch_save(tmp_path: Any) -> None:
    """The networks use postponed annotations (strings), which torch.save of a GraphModule cannot write."""
    net, x = network("crepe", "positive")
    out = bnfold.fold(net)
    path = tmp_path / "m.pt"
    torch.save(out, path)
    back = torch.load(path, weights_only=False)
    assert torch.equal(outputs(back, x)[0], outputs(out, x)[0])


class RepVGGBlock(nn.Module):
    """conv3x3+BN + conv1x1+BN + BN identity, summed then ReLU: branch merging returns a GraphModule. This
    module's annotations are strings (``from __future__ import annotations``), as in most model code."""

    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.bn_id = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


def test_merged_graph_module_saves_and_loads_with_torch_save(tmp_path: Any) -> None:
    net = set_stats(RepVGGBlock())
    out, report = bnfold.fold_with_report(net)
    assert isinstance(out, fx.GraphModule) and any(m.merged for m in report.merges)
    path = tmp_path / "m.pt"
    torch.save(out, path)
    back = torch.load(path, weights_only=False)
    x = x_for(torch.float32)
    assert torch.equal(outputs(back, x)[0], outputs(out, x)[0])
    assert torch.allclose(outputs(back, x)[0], outputs(net, x)[0], atol=1e-5)


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BN: folded per call site on a clone, which
    needs a GraphModule (graph mode); string annotations as in :class:`RepVGGBlock`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.bn_a = nn.BatchNorm2d(C)
        self.bn_b = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv(x)) * self.bn_b(self.conv(x + 1))


def test_graph_mode_result_saves_and_loads_with_torch_save(tmp_path: Any) -> None:
    net = set_stats(SharedConv())
    out, report = bnfold.fold_with_report(net)
    assert isinstance(out, fx.GraphModule) and report.bn_after == 0
    path = tmp_path / "m.pt"
    torch.save(out, path)
    back = torch.load(path, weights_only=False)
    x = x_for(torch.float32)
    assert torch.equal(outputs(back, x)[0], outputs(out, x)[0])
    assert torch.allclose(outputs(back, x)[0], outputs(net, x)[0], atol=1e-5)


_REPVGG_SOURCE = """from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn_id = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_id(x))


def make() -> Block:
    return Block()
"""


def test_cli_writes_a_merged_graph_module_that_loads(tmp_path: Any) -> None:
    """``bnfold fold ckpt.pt -m file.py:make out.pt`` on a state_dict of a model whose module has string
    annotations: the merged GraphModule is written with torch.save and loads back."""
    from typer.testing import CliRunner

    from bnfold.cli import app

    src_py = tmp_path / "repvgg_strs.py"
    src_py.write_text(_REPVGG_SOURCE)
    ns: dict[str, Any] = {}
    exec(compile(_REPVGG_SOURCE, str(src_py), "exec"), ns)
    net = set_stats(ns["make"]())
    ckpt, dst = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save(net.state_dict(), ckpt)
    before = ckpt.read_bytes()
    res = CliRunner().invoke(app, ["fold", str(ckpt), "-m", f"{src_py}:make", str(dst), "-s", "x=1x4x8x8"])
    assert res.exit_code == 0, res.output
    assert ckpt.read_bytes() == before
    back = torch.load(dst, weights_only=False)
    assert isinstance(back, fx.GraphModule) and bn_count(back) == 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(outputs(back, x)[0], outputs(net, x)[0], atol=1e-5)
