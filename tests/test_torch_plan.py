"""The numeric stage of the PyTorch backend (bnfold.fx.plan): one rounding, and OVERFLOW refusals."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnfold.fx import fold_exported, fold_module
from bnfold.records import SkipReason
from models.stats import randomize_bn


def prep(m: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    randomize_bn(m, seed)
    return m.eval()


def test_folded_weight_is_the_float64_product_rounded_once() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)))
    out, rep = fold_module(m)
    assert rep.folded == 1
    bn = m[1]
    # The reference: the BN's eval map computed by torch in float64, multiplied in float64, one cast.
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    t = bn.bias.double() - bn.running_mean.double() * s
    w_ref = (m[0].weight.double() * s[:, None, None, None]).float()
    assert torch.equal(out[0].weight, w_ref)
    assert torch.equal(out[0].bias, t.float())


def _overflowing(bn: nn.BatchNorm2d) -> None:
    """A BN whose scale (about 1e6) cannot be written into float16 weights of size about 1."""
    with torch.no_grad():
        bn.eps = 1e-12
        bn.running_var.fill_(1e-12)


def test_overflow_refused_and_layer_left_as_it_was() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).half()
    _overflowing(m[1])
    out, rep = fold_module(m)
    assert rep.folded == 0 and [v.reason for v in rep.skips] == [SkipReason.OVERFLOW]
    assert isinstance(out[1], nn.BatchNorm2d)
    assert torch.equal(out[0].weight, m[0].weight) and out[0].weight is not m[0].weight
    assert torch.isfinite(out[0].weight).all()


class Sandwich(nn.Module):
    """bn0 -> conv -> bn1: the conv absorbs both (backward, then forward), accumulated in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(self.bn0(x)))


def test_second_fold_into_a_layer_refused_first_kept() -> None:
    m = prep(Sandwich()).half()
    _overflowing(m.bn1)
    x = torch.randn(2, 3, 5, 5).half()
    out, rep = fold_module(m)
    reasons = {v.bn: getattr(v, "reason", None) for v in rep.verdicts}
    assert rep.folded == 1 and reasons["bn1"] is SkipReason.OVERFLOW
    assert isinstance(out.bn0, nn.Identity) and isinstance(out.bn1, nn.BatchNorm2d)
    # Up to the float16 rounding of the folded conv: compare with the original run in float64.
    ref = copy.deepcopy(m).double()(x.double())
    got = copy.deepcopy(out).double()(x.double())
    assert torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_both_folds_into_a_layer_accumulate_then_round_once() -> None:
    m = prep(Sandwich())
    x = torch.randn(2, 3, 5, 5)
    out, rep = fold_module(m)
    assert rep.folded == 2 and isinstance(out.bn0, nn.Identity) and isinstance(out.bn1, nn.Identity)
    ref = copy.deepcopy(m).double()(x.double())
    got = copy.deepcopy(out).double()(x.double())
    assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max().item())


def test_export_overflow_refused() -> None:
    m = prep(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).half()
    _overflowing(m[1])
    ep = torch.export.export(m, (torch.randn(1, 3, 4, 4).half(),))
    out, rep = fold_exported(ep)
    assert out is ep and rep.folded == 0 and [v.reason for v in rep.skips] == [SkipReason.OVERFLOW]
