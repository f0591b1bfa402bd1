"""Freezing real-world BN layers (models/realworld.py): every BN-like layer frozen, what it adds kept.

Checked on each reference net: no live BN left, eval output unchanged, train() output equal to the
original run with its BN parts in eval mode and everything else (dropout) in train mode under the
same seed, the original untouched, and ``unfreeze`` after a save/load round trip exact.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnfold
from bnfold.errors import UnsupportedModelError
from bnfold.nn.frozen import FrozenBatchNorm
from bnfold.records import SkipReason
from models import realworld as rw
from models.snapshot import assert_unchanged, snapshot
from models.stats import randomize_bn
from models.testing import ATOL_F32_DEEP

# x * scale + shift against BN's (x - mean) / sqrt(var + eps) * gamma + beta in float32: a few ulps
# of the output scale per layer.
TOL = ATOL_F32_DEEP  # models.testing: the one tolerance table


def ready(m: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(m, seed).eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


def bn_eval_rest_train(m: nn.Module) -> nn.Module:
    """The reference for a frozen model in train(): BN parts in eval, dropout & co. in train."""
    ref = copy.deepcopy(m).train()
    for mod in ref.modules():
        if isinstance(mod, _BatchNorm):
            mod.training = False  # its own children (dropout/act of a BatchNormAct2d) stay in train
    return ref


@pytest.mark.parametrize("name", sorted(rw.REALWORLD))
def test_reference_nets_freeze_everywhere(name: str) -> None:
    factory, shape = rw.REALWORLD[name]
    m = ready(factory())
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = m(x)
    before = snapshot(m)
    frozen, rep = bnfold.freeze_with_report(m)
    assert_unchanged(before, m)
    n_bn = sum(isinstance(v, _BatchNorm) for v in m.modules())
    assert not rep.skips and rep.bn_after == 0
    assert sum(isinstance(v, _BatchNorm) for v in frozen.modules()) == 0
    assert sum(isinstance(v, FrozenBatchNorm) for v in frozen.modules()) == n_bn
    with torch.no_grad():
        assert close(frozen.eval()(x), ref)
        reference = bn_eval_rest_train(m)
        torch.manual_seed(1)
        want = reference(x)
        torch.manual_seed(1)
        got = frozen.train()(x)
    assert close(got, want)


def test_frozen_norm_act_is_affine_then_its_activation() -> None:
    bn = ready(nn.Sequential(rw.BatchNormAct2d(4, act=nn.SiLU(), drop=0.5)))[0]
    frozen = bnfold.freeze(nn.Sequential(bn))[0]
    assert isinstance(frozen, FrozenBatchNorm) and frozen.tail is not None
    x = torch.randn(4, 4, 5, 5)
    affine = x * frozen.scale.view(1, -1, 1, 1) + frozen.shift.view(1, -1, 1, 1)
    with torch.no_grad():
        assert close(frozen.eval()(x), F.silu(affine))
        frozen.train()
        y = frozen(x)
    assert (y == 0).float().mean() > 0.2  # dropout active in train mode


def test_unfreeze_after_save_and_load_gives_the_bn_back_exactly() -> None:
    m = ready(rw.TimmResNet())
    frozen = bnfold.freeze(m)
    buf = io.BytesIO()
    torch.save(frozen.state_dict(), buf)
    buf.seek(0)
    fresh = bnfold.freeze(ready(rw.TimmResNet(), seed=7))  # other statistics before loading
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    back = bnfold.unfreeze(fresh)
    orig = m.state_dict()
    restored = back.state_dict()
    assert orig.keys() == restored.keys()
    for k, v in orig.items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(v, restored[k]), k
        else:
            torch.testing.assert_close(restored[k], v, rtol=2e-7, atol=1e-7)
    assert type(back.stem.bn) is rw.BatchNormAct2d and isinstance(back.stem.bn.act, nn.ReLU)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert close(back.eval()(x), m(x))


def test_bn_checkpoint_loads_into_a_frozen_norm_act() -> None:
    m = ready(nn.Sequential(nn.Conv2d(3, 4, 3), rw.BatchNormAct2d(4, act=nn.PReLU(4))))
    with torch.no_grad():
        m[1].act.weight.uniform_(0.1, 0.4)
    target = bnfold.freeze(nn.Sequential(nn.Conv2d(3, 4, 3), rw.BatchNormAct2d(4, act=nn.PReLU(4))).eval())
    target.load_state_dict(m.state_dict())  # BN-format keys, act.weight included
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert close(target(x), m(x))
    assert torch.equal(bnfold.freezing.bn_state_dict(target)["1.act.weight"], m[1].act.weight.detach())


class Residual(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


def test_strict_by_default_names_what_it_cannot_freeze() -> None:
    m = ready(nn.Sequential(nn.Conv2d(3, 4, 3), Residual(4), nn.BatchNorm2d(4, track_running_stats=False)))
    with pytest.raises(UnsupportedModelError) as e:
        bnfold.freeze(m)
    assert "'1' (custom_bn" in str(e.value) and "'2' (no_running_stats" in str(e.value)
    report: list[object] = []
    partial = bnfold.freeze(m, strict=False, report=report)
    reasons = {v.bn: v.reason for v in report if isinstance(v, bnfold.Skip)}
    assert reasons == {"1": SkipReason.CUSTOM_BN, "2": SkipReason.NO_RUNNING_STATS}
    assert type(partial[1]) is Residual


class TrainOnlyNoise(nn.BatchNorm2d):
    """Adds its activation only in train mode: the eval-mode tail would be wrong in train()."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return self.act(y) if self.training else y


def test_subclass_whose_tail_depends_on_train_mode_is_not_frozen() -> None:
    m = ready(nn.Sequential(nn.Conv2d(3, 4, 3), TrainOnlyNoise(4)))
    _, rep = bnfold.freeze_with_report(m)
    assert rep.skips and rep.skips[0].reason is SkipReason.CUSTOM_BN and "train mode" in rep.skips[0].detail
    ok = ready(nn.Sequential(nn.Conv2d(3, 4, 3), rw.BatchNormAct2d(4, drop=0.3)))
    _, rep = bnfold.freeze_with_report(ok.train())
    assert not rep.skips
