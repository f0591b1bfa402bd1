"""A ConvNd also runs on an unbatched ``(C, ...)`` tensor: then its channels are dim 0, not the BN's dim 1.

``BatchNorm1d`` takes ``(N, C)`` and ``(N, C, L)``, so ``Conv1d -> BatchNorm1d`` on a ``(C, L)`` input with
``L == C_out`` runs and normalises the length axis; ``F.batch_norm``, ``SyncBatchNorm`` and bnfold's frozen
BN take any rank, and a Conv2d/3d's unbatched output reaches a BatchNorm1d/2d. A fold (forward, backward,
routed), a merged BN branch or a propagated scale there changes what the model computes for that input:
without recorded shapes (or a BN whose own rank check refuses the unbatched rank) it is refused with
``LAYOUT``; ``example_inputs`` that prove the batch let it fold.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.fx.sites import UNPROVEN_BATCH
from bnfold.hints import EXAMPLE_INPUTS
from bnfold.records import Site, Skip, SkipReason
from models.stats import randomize_bn


def _ready(m: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    randomize_bn(m)
    return m.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5))


class _Sum(nn.Module):
    def __init__(self, conv: type, bn: type, post: bool) -> None:
        super().__init__()
        self.a, self.b = conv(4, 4, 3, padding=1), conv(4, 4, 1)
        self.bn = bn(4)
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor
        if self.post:  # a BN on the sum of two convs (branch-sum / merged with the sum)
            y = self.bn(self.a(x) + self.b(x))
        else:  # a BN branch beside convs (merged as a scaled identity)
            y = self.a(x) + self.b(x) + self.bn(x)
        return y


class _Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(3, 2, 1), nn.Conv1d(3, 2, 1)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.bn(torch.cat([self.a(x), self.b(x)], 1))
        return y


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bn
        return F.batch_norm(self.conv(x), b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)


# (model, an unbatched input on which the original runs, a batched one, the BN's name)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], tuple[int, ...], str]] = {
    "conv1d-bn1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 1), nn.BatchNorm1d(5)), (3, 5), (2, 3, 7), "1"),
    "convt1d-bn1d": (
        lambda: nn.Sequential(nn.ConvTranspose1d(3, 5, 1), nn.BatchNorm1d(5)),
        (3, 5),
        (2, 3, 7),
        "1",
    ),
    "conv2d-bn1d": (lambda: nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm1d(5)), (3, 5, 4), (2, 3, 4), "1"),
    "conv3d-bn2d": (
        lambda: nn.Sequential(nn.Conv3d(3, 5, 1), nn.BatchNorm2d(5)),
        (3, 5, 4, 4),
        (2, 3, 5, 4, 4),
        "1",
    ),
    "conv2d-flatten-bn1d": (
        lambda: nn.Sequential(nn.Conv2d(3, 5, 1), nn.Flatten(2), nn.BatchNorm1d(5)),
        (3, 5, 4),
        (2, 3, 4, 4),
        "2",
    ),
    "conv2d-syncbn": (
        lambda: nn.Sequential(nn.Conv2d(3, 5, 1), nn.SyncBatchNorm(5)),
        (3, 5, 4),
        (2, 3, 4, 4),
        "1",
    ),
    "conv2d-functional-bn": (_Functional, (3, 4, 6), (2, 3, 6, 6), "batch_norm"),
    "bn1d-conv1d": (lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 5, 1)), (3, 3), (2, 3, 7), "0"),
    "bn1d-conv2d": (lambda: nn.Sequential(nn.BatchNorm1d(3), nn.Conv2d(3, 5, 1)), (3, 3, 4), (2, 3, 4), "0"),
    "bn2d-conv3d": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv3d(3, 5, 1)),
        (3, 3, 4, 4),
        (2, 3, 3, 4, 4),
        "0",
    ),
    "cat-bn1d": (_Cat, (3, 2), (2, 3, 7), "bn"),  # unbatched: cat along L, (2, 4)
    "sum-bn1d": (lambda: _Sum(nn.Conv1d, nn.BatchNorm1d, True), (4, 4), (2, 4, 7), "bn"),
    "bn1d-branch": (lambda: _Sum(nn.Conv1d, nn.BatchNorm1d, False), (4, 4), (2, 4, 7), "bn"),
    "bn2d-branch-conv3d": (
        lambda: _Sum(nn.Conv3d, nn.BatchNorm2d, False),
        (4, 4, 3, 3),
        (2, 4, 4, 3, 3),
        "bn",
    ),
    "bn1d-relu-conv1d": (
        lambda: nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 3, 3, padding=1)),
        (4, 4),
        (2, 4, 6),
        "1",
    ),
}
# the batched input does not run these (the BN refuses it): only the unbatched rank reaches their BN
UNBATCHED_ONLY = {"conv2d-bn1d", "conv3d-bn2d", "bn1d-conv2d", "bn2d-conv3d", "bn2d-branch-conv3d"}


def _bn_left(m: nn.Module, out: nn.Module, name: str) -> bool:
    if name == "batch_norm":
        return "batch_norm" in str(getattr(out, "code", "batch_norm"))
    return isinstance(dict(out.named_modules()).get(name), type(dict(m.named_modules())[name]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_unbatched_input_keeps_its_output_without_shapes(case: str) -> None:
    factory, unbatched, _, name = CASES[case]
    m = _ready(factory())
    x = torch.randn(unbatched)
    with torch.no_grad():
        ref = m(x)
        out, rep = bnfold.fold_with_report(m)
        assert _close(out(x), ref), (out(x) - ref).abs().max()  # before: off by up to ~5
    assert _bn_left(m, out, name)
    v = next(v for v in rep.verdicts if v.bn == name)
    assert isinstance(v, Skip)
    if case in ("bn1d-branch", "bn2d-branch-conv3d"):  # the merge leaves the BN branch, saying why
        branch = [b for g in rep.merges for b in g.branches if b.kind == "bn"]
        assert branch and all(not b.merged and UNPROVEN_BATCH in b.detail for b in branch)
    elif case == "bn1d-relu-conv1d":  # scale propagation leaves it, saying why
        assert "not propagated: the rank of the BN's input is not known" in v.detail, v.detail
    else:
        assert v.reason is SkipReason.LAYOUT and v.detail == UNPROVEN_BATCH and v.hints == (EXAMPLE_INPUTS,)


@pytest.mark.parametrize("case", sorted(set(CASES) - UNBATCHED_ONLY))
def test_recorded_batched_shapes_let_it_fold(case: str) -> None:
    factory, _, batched, name = CASES[case]
    m = _ready(factory())
    x = torch.randn(batched)
    with torch.no_grad():
        ref = m(x)
        out, rep = bnfold.fold_with_report(m, example_inputs=(x,))
        assert _close(out(x), ref), (out(x) - ref).abs().max()
    assert not _bn_left(m, out, name), rep.verdicts


def test_recorded_unbatched_shapes_name_the_rank() -> None:
    m = _ready(nn.Sequential(nn.Conv1d(3, 5, 1), nn.BatchNorm1d(5)))
    x = torch.randn(3, 5)
    with torch.no_grad():
        out, rep = bnfold.fold_with_report(m, example_inputs=(x,))
        assert _close(out(x), m(x))
    v = rep.verdicts[0]
    assert isinstance(v, Skip) and v.reason is SkipReason.LAYOUT
    assert "2-D here (unbatched)" in v.detail


class _AssertedBN(nn.BatchNorm2d):
    """timm's BatchNormAct2d: F.batch_norm after ``torch._assert(x.ndim == 4)``, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4D input")  # type: ignore[no-untyped-call]
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return torch.relu(y)


class _SuperBN(nn.BatchNorm2d):
    """Calls BatchNorm2d's forward (and so its 4-D check), then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _UncheckedBN(nn.BatchNorm2d):
    """F.batch_norm without any rank check: an unbatched Conv2d output runs through it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


@pytest.mark.parametrize(
    "bn", [nn.BatchNorm2d, nn.LazyBatchNorm2d, bnfold.nn.BatchNorm2d, _AssertedBN, _SuperBN]
)
def test_a_bn_that_refuses_the_unbatched_rank_folds_without_shapes(bn: type) -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), bn(4) if bn is not nn.LazyBatchNorm2d else bn())
    x = torch.randn(2, 3, 6, 6)
    m(x)  # a lazy BN takes its size here
    ready = _ready(m)
    with torch.no_grad():
        ref = ready(x)
        out, rep = bnfold.fold_with_report(ready)
        assert _close(out(x), ref)
    assert rep.folded == 1, rep.verdicts
    assert isinstance(rep.verdicts[0], Site)


def test_a_bn_subclass_without_a_rank_check_needs_shapes() -> None:
    m = _ready(nn.Sequential(nn.Conv2d(3, 4, 1), _UncheckedBN(4)))
    x = torch.randn(3, 4, 5)  # (C, H, W) with H == 4: the subclass normalises H
    with torch.no_grad():
        ref = m(x)
        out, rep = bnfold.fold_with_report(m)
        assert _close(out(x), ref)
    assert rep.folded == 0 and rep.verdicts[0].detail == UNPROVEN_BATCH


@pytest.mark.parametrize("post", [True, False])
def test_exported_merge_of_a_bn_needs_a_batched_input(post: bool) -> None:
    """torch.export records the rank: a BN branch or a BN on the sum merges for (N, C, L), not for (C, L)."""
    m = _ready(_Sum(nn.Conv1d, nn.BatchNorm1d, post))
    for shape, merged in (((4, 4), False), ((2, 4, 7), True)):
        x = torch.randn(shape)
        with torch.no_grad():
            ref = m(x)
            out, rep = bnfold.fold_with_report(torch.export.export(m, (x,)))
            assert _close(out.module()(x), ref), (shape, (out.module()(x) - ref).abs().max())
        assert (rep.bn_after == 0) is merged, (shape, rep.verdicts)
