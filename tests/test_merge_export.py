"""Branch merging for ``torch.export`` programs (bnfold.fx.export_merge): re-parameterisable blocks become one conv.

Each block of models/reparam.py (with realistic BN statistics) is exported with ``torch.export`` and folded by
``bnfold.fold_with_report``: the result must have as many convolution ops as the block's own hand-written
``reparameterize()`` leaves, no batch norm, outputs equal to the original's, and the original program untouched.
A float16 program's merged weights are the float64 merge rounded once. Refusals are built so that a merge
would be wrong.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_merge_torch import BLOCKS, TOL32, TOL64, build, close, convs, hand_merged  # noqa: E402

import bnfold  # noqa: E402
from models import reparam  # noqa: E402
from models.stats import randomize_bn  # noqa: E402

nn = torch.nn
aten = torch.ops.aten
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)

EXPORT_BLOCKS = sorted(BLOCKS)


def ops(ep: Any, targets: tuple[Any, ...]) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target in targets)


def bn_ops(ep: Any) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))


def program(model: nn.Module, x: torch.Tensor) -> Any:
    return torch.export.export(model, (x,))


def frozen(ep: Any) -> tuple[str, dict[str, torch.Tensor]]:
    return str(ep.graph), {k: v.clone() for k, v in ep.state_dict.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", EXPORT_BLOCKS)
def test_exported_block_merges_like_its_own_reparameterisation(name: str, dtype: torch.dtype) -> None:
    model, x = build(name, dtype)
    ep = program(model, x)
    before = frozen(ep)
    out, rep = bnfold.fold_with_report(ep)
    hand = hand_merged(model)
    assert ops(out, _CONVS) == len(convs(hand)) <= ops(ep, _CONVS)
    assert bn_ops(out) == 0 and rep.bn_after == 0
    assert rep.convs_before == ops(ep, _CONVS) and rep.convs_after == len(convs(hand))
    assert all(m.merged for m in rep.merges) and rep.merges
    with torch.no_grad():
        close(model(x), out.module()(x), TOL32 if dtype == torch.float32 else TOL64)
    after = frozen(ep)
    assert after[0] == before[0] and all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_float16_program_merge_is_the_float64_merge_rounded_once() -> None:
    """RepVGG in float16: the merged kernel is the block's own merge computed in float64 (from the float16
    parameters), rounded once to float16 -- bit for bit or within one float16 ulp (the float64 sums may
    differ in their order)."""
    m16, x = build("repvgg", torch.float16)
    (ref,) = convs(
        hand_merged(copy.deepcopy(m16).to(torch.float64))
    )  # the hand formula, same values, float64
    assert ref.bias is not None
    out, rep = bnfold.fold_with_report(program(m16, x))
    assert rep.merges and rep.merges[0].merged and bn_ops(out) == 0
    (w,) = [t for t in out.state_dict.values() if t.dim() == 4]
    (b,) = [t for t in out.state_dict.values() if t.dim() == 1]
    assert w.dtype == b.dtype == torch.float16
    for got, want64 in ((w, ref.weight.detach()), (b, ref.bias.detach())):
        want = want64.to(torch.float16)
        ulp = torch.from_numpy(np.spacing(np.abs(want.numpy())))
        assert ((got.double() - want.double()).abs() <= ulp.double()).all()
        assert (got != want).sum() <= got.numel() // 20  # nearly all bit for bit
    with torch.no_grad():
        close(m16(x).double(), out.module()(x).double(), 2e-2)


def test_merge_branches_false_keeps_the_branches() -> None:
    model, x = build("repvgg")
    ep = program(model, x)
    out, rep = bnfold.fold_with_report(ep, merge_branches=False)
    assert ops(out, _CONVS) == 2 and bn_ops(out) == 1 and not rep.merges
    with torch.no_grad():
        close(model(x), out.module()(x), TOL32)


def test_dry_run_predicts_the_merge_and_returns_the_program() -> None:
    model, x = build("mobileone_s0_unit")
    ep = program(model, x)
    before = frozen(ep)
    out, rep = bnfold.fold_with_report(ep, dry_run=True)
    assert out is ep and rep.dry_run
    assert rep.convs_before == 9 and rep.convs_after == 2 and sum(m.merged for m in rep.merges) == 2
    assert frozen(ep)[0] == before[0]


def test_merged_program_saves_and_loads(tmp_path: Any) -> None:
    model, x = build("repvit_net")
    out = bnfold.fold(program(model, x))
    torch.export.save(out, tmp_path / "m.pt2")
    back = torch.export.load(tmp_path / "m.pt2")
    with torch.no_grad():
        close(model(x), back.module()(x), TOL32)


def reasons(rep: Any) -> dict[str, str]:
    return {b.branch: (b.reason.value if b.reason else "merged") for mg in rep.merges for b in mg.branches}


def check_refused(model: nn.Module, x: torch.Tensor, want: dict[str, str]) -> None:
    model = randomize_bn(model, seed=3).eval()
    with torch.no_grad():
        expect = model(x)
    ep = program(model, x)
    out, rep = bnfold.fold_with_report(ep)
    assert reasons(rep) == want
    assert ops(out, _CONVS) == ops(ep, _CONVS) and all(not mg.merged for mg in rep.merges)
    with torch.no_grad():
        got = out.module()(x)
    for a, b in zip(
        expect if isinstance(expect, tuple) else (expect,), got if isinstance(got, tuple) else (got,)
    ):
        close(a, b, TOL32)


def test_refused_branch_read_elsewhere() -> None:
    torch.manual_seed(0)
    check_refused(
        reparam.BranchReadElsewhere(8),
        torch.randn(2, 8, 6, 6),
        {"a.0": "no_partner", "b.0": "other_consumers"},
    )


def test_refused_activation_inside_a_branch() -> None:
    torch.manual_seed(0)
    check_refused(
        reparam.ActivationInBranch(8), torch.randn(2, 8, 6, 6), {"a.0": "no_partner", "b.0": "nonlinear"}
    )


class _PaddedSequence(nn.Module):
    """3x3 + (1x1 with a bias -> 3x3 padded): the 3x3 reads padded zeros where the two-conv form reads the
    1x1's bias, so the sequence cannot be one conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = reparam.conv_bn(8, 8, 3, 1, 1)
        self.pre = nn.Conv2d(8, 8, 1)
        self.b = reparam.conv_bn(8, 8, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(self.pre(x))


def test_refused_sequence_that_reads_padded_zeros() -> None:
    torch.manual_seed(0)
    check_refused(_PaddedSequence(), torch.randn(2, 8, 6, 6), {"a.0": "no_partner", "b.0": "padding"})


def test_pt2_file_fold_merges_and_verifies(tmp_path: Any) -> None:
    """``bnfold fold m.pt2 -o out.pt2``: the program's branches merge (as many convolutions as the hand
    re-parameterisation), the verification passes, the source file is unchanged."""
    from bnfold.files import FoldSettings, fold_file

    model, x = build("repvgg_stage")
    src, out = tmp_path / "m.pt2", tmp_path / "out.pt2"
    torch.export.save(program(model, x), src)
    before = src.read_bytes()
    rep = fold_file(src, out, FoldSettings())
    assert rep.verification is not None and rep.verification.passed
    assert sum(m.merged for m in rep.merges) == 3 and rep.convs_after == 3
    back = torch.export.load(out)
    assert ops(back, _CONVS) == len(convs(hand_merged(model))) == 3 and bn_ops(back) == 0
    with torch.no_grad():
        close(model(x), back.module()(x), TOL32)
    assert src.read_bytes() == before


class _Strides(nn.Module):
    """3x3 stride 2 + 1x1 stride 3 on 7x7: both give 3x3, but the 1x1 reads other pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = reparam.conv_bn(8, 8, 3, 2, 0)
        self.b = reparam.conv_bn(8, 8, 1, 3, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_refused_different_strides() -> None:
    torch.manual_seed(0)
    check_refused(_Strides(), torch.randn(2, 8, 7, 7), {"a.0": "no_partner", "b.0": "stride"})


class _AfterNonlinearStem(nn.Module):
    """RepViT's first mixer reads the stem's BN output (conv -> BN after a GELU): the identity branch of the
    mixer is that BN's output, not a BN branch of the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(4, 8, 3, 1, 1), nn.GELU(), *reparam.conv_bn(8, 8, 3, 1, 1))
        self.mix = reparam.RepVGGDW(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.stem(x))


def test_identity_branch_that_is_a_bn_output_merges() -> None:
    torch.manual_seed(0)
    model = randomize_bn(_AfterNonlinearStem(), seed=3).eval()
    x = torch.randn(2, 4, 7, 7)
    out, rep = bnfold.fold_with_report(program(model, x))
    assert bn_ops(out) == 0 and ops(out, _CONVS) == 3 and [m.merged for m in rep.merges] == [True]
    assert sorted(b.kind for b in rep.merges[0].branches) == ["conv", "conv", "identity"]
    with torch.no_grad():
        close(model(x), out.module()(x), TOL32)
