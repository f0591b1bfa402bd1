"""bnfold.fold on torch.export programs: fold in the ATen graph, run, re-export, save/load .pt2."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import bnfold
from bnfold.fx import fold_exported
from bnfold.records import SkipReason
from models.stats import randomize_bn
from models.testing import ATOL_F32_DEEP

# float32, folded in float64 and rounded once: a few ulps of the output scale.
TOL32 = ATOL_F32_DEEP  # models.testing: the one tolerance table


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL32 * max(1.0, b.abs().max().item())


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.ct = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.b2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 6, 1)
        self.b3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        self.b4 = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.ct(y))
        z = self.c3(y)
        y = self.b3(z) + z  # residual tap: left
        return self.b4(self.fc(y.mean((2, 3))))


def _program() -> tuple[torch.export.ExportedProgram, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    m = randomize_bn(Net(), 0).eval()
    x = torch.randn(2, 3, 8, 8)
    return torch.export.export(m, (x,)), m, x


@pytest.mark.parametrize("decompose", [False, True])
def test_fold_exported_runs_and_matches(decompose: bool) -> None:
    ep, m, x = _program()
    if decompose:
        ep = ep.run_decompositions()
    out, rep = fold_exported(ep)
    assert isinstance(out, torch.export.ExportedProgram)
    assert rep.folded == 3 and rep.bn_after == 1
    assert [v.reason for v in rep.skips] == [SkipReason.OTHER_CONSUMERS]
    assert close(out.module()(x), m(x))
    assert close(ep.module()(x), m(x))  # the given program is untouched
    names = [str(n.target) for n in out.graph.nodes]
    assert sum("batch_norm" in t for t in names) == 1
    # it re-exports
    again = torch.export.export(out.module(), (x,))
    assert close(again.module()(x), m(x))


def test_bnfold_fold_dispatch_and_pt2_roundtrip(tmp_path: os.PathLike[str]) -> None:
    ep, m, x = _program()
    out = bnfold.fold(ep)
    assert isinstance(out, torch.export.ExportedProgram)
    path = os.path.join(tmp_path, "f.pt2")
    torch.export.save(out, path)
    loaded = torch.export.load(path)
    assert close(loaded.module()(x), m(x))
    rep = bnfold.inspect(ep)
    assert rep.dry_run and rep.folded == 3


def test_training_mode_batch_norm_left() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    ep = torch.export.export(m, (torch.randn(2, 3, 6, 6),))
    out, rep = fold_exported(ep)
    assert rep.folded == 0 and rep.skips[0].reason is SkipReason.TRAINING_MODE


def test_dynamic_batch_dim_is_kept(tmp_path: os.PathLike[str]) -> None:
    """A program exported with a dynamic batch still takes any batch size after folding."""
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), seed=5).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    out, rep = fold_exported(ep)
    assert rep.bn_after == 0 and not rep.notes
    for n in (1, 5, 17):
        x = torch.randn(n, 3, 8, 8)
        assert close(out.module()(x), m(x))
    path = os.path.join(tmp_path, "f.pt2")
    torch.export.save(out, path)
    x = torch.randn(9, 3, 8, 8)
    assert close(torch.export.load(path).module()(x), m(x))


@pytest.mark.parametrize("decompose", [False, True])
def test_dry_run_predicts_bn_and_params(decompose: bool) -> None:
    ep, _, _ = _program()
    if decompose:
        ep = ep.run_decompositions()
    same, dry = fold_exported(ep, dry_run=True)
    assert same is ep and dry.dry_run
    out, real = fold_exported(ep)
    assert dry.folded == real.folded == 3
    assert (dry.bn_after, dry.params_after) == (real.bn_after, real.params_after)
    assert real.bn_after == 1
    assert real.params_after < real.params_before  # three BNs' tensors left, one conv gained a bias
