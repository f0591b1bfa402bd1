"""``prune_constant_channels``: constant (gamma = 0) channels removed after the fold, where exact."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import bnfold
from models.stats import randomize_bn
from models.testing import ATOL_F32_DEEP

# float32 model against the unfolded float64 original: a few ulps per product over short sums.
TOL_F32 = ATOL_F32_DEEP  # models.testing: the one tolerance table


def _kill(bn: nn.Module, channels: list[int], beta: float | None = None) -> None:
    with torch.no_grad():
        for c in channels:
            bn.weight[c] = 0.0
            if beta is not None:
                bn.bias[c] = beta


def _check(m: nn.Module, x: torch.Tensor, **kw: Any) -> tuple[nn.Module, bnfold.FoldReport]:
    """Fold with pruning; the original is untouched and both agree (reference: original in float64)."""
    state = {k: v.clone() for k, v in m.state_dict().items()}
    attrs = {n: sorted(vars(mod)) for n, mod in m.named_modules()}
    out, rep = bnfold.fold_with_report(m, prune_constant_channels=True, example_inputs=(x,), **kw)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items()), "the original was changed"
    assert {n: sorted(vars(mod)) for n, mod in m.named_modules()} == attrs
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double())
        got = out(x).double()
    assert float((got - ref).abs().max()) <= TOL_F32 * float(ref.abs().max())
    return out, rep


def _pruned(rep: bnfold.FoldReport) -> dict[str, dict]:
    return {d["layer"]: d for d in rep.extra["pruned_channels"]}


def test_conv_bn_relu_conv_no_padding() -> None:
    torch.manual_seed(0)
    m = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3))
    ).eval()
    _kill(m[1], [1, 6], beta=0.7)  # constant relu(0.7) = 0.7, read by a conv without padding
    out, rep = _check(m, torch.randn(2, 3, 9, 9))
    assert _pruned(rep)["0"]["pruned"] and _pruned(rep)["0"]["channels"] == [1, 6]
    assert (
        out[0].out_channels == out[0].weight.shape[0] == 6
        and out[3].in_channels == out[3].weight.shape[1] == 6
    )
    assert rep.bn_after == 0 and rep.params_after < rep.params_before


def test_next_conv_with_padding_is_left_unless_constant_is_zero() -> None:
    torch.manual_seed(1)
    make = lambda: randomize_bn(  # noqa: E731
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1))
    ).eval()
    m = make()
    _kill(m[1], [2], beta=0.4)
    out, rep = _check(m, torch.randn(2, 3, 9, 9))
    rec = _pruned(rep)["0"]
    assert not rec["pruned"] and "pads with zeros" in rec["detail"] and out[0].out_channels == 8
    m = make()
    _kill(m[1], [2], beta=-0.4)  # relu(-0.4) = 0: the channel contributes nothing, padding or not
    out, rep = _check(m, torch.randn(2, 3, 9, 9))
    assert _pruned(rep)["0"]["pruned"] and out[0].out_channels == 7


def test_linear_chain() -> None:
    torch.manual_seed(2)
    m = randomize_bn(
        nn.Sequential(
            nn.Linear(10, 16),
            nn.BatchNorm1d(16),
            nn.GELU(),
            nn.Linear(16, 12),
            nn.BatchNorm1d(12),
            nn.Sigmoid(),
            nn.Linear(12, 3),
        )
    ).eval()
    _kill(m[1], [0, 5, 9], beta=0.3)
    _kill(m[4], [11])  # bias of the folded layer stays whatever beta was: sigmoid of it feeds the last Linear
    x = torch.randn(4, 10)
    out, rep = _check(m, x)
    rec = _pruned(rep)
    assert rep.bn_after == 0
    assert rec["0"]["pruned"] and rec["3"]["pruned"]
    assert out[0].out_features == 13 and out[3].in_features == 13
    assert out[3].out_features == 11 and out[6].in_features == 11


def test_second_reader_is_left() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.conv2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            return self.conv2(y) + y  # y read twice: its constant channel cannot go

    torch.manual_seed(3)
    m = randomize_bn(Res()).eval()
    _kill(m.bn, [1], beta=0.2)
    # without merging (merged, conv2(y) + y is one conv: y then has one reader, and its channel goes)
    out, rep = _check(m, torch.randn(2, 4, 5, 5), merge_branches=False)
    rec = _pruned(rep)["conv"]
    assert not rec["pruned"] and "more than one" in rec["detail"]
    assert out.conv.out_channels == 4


def test_refused_for_onnx() -> None:
    from test_health import _sick_conv_bn

    with pytest.raises(bnfold.OptionError, match="nn.Module"):
        bnfold.fold_with_report(_sick_conv_bn(), prune_constant_channels=True)


def test_layer_registered_twice_or_weight_read_directly_is_left() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn, self.out = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.out(torch.relu(self.bn(self.fc(x))))
            return y + torch.nn.functional.linear(x, self.out.weight)  # reads out.weight directly

    torch.manual_seed(4)
    m = randomize_bn(Tied()).eval()
    _kill(m.bn, [2], beta=0.5)
    x = torch.randn(3, 6)
    out, rep = _check(m, x)
    rec = _pruned(rep)["fc"]
    assert not rec["pruned"] and "read directly" in rec["detail"]
    assert out.out.weight.shape == (6, 6)
