"""Folding real-world layer patterns (models/realworld.py, models/unsound.py) in nn.Modules.

Each test runs the original and the folded model and compares them, counts the BNs left, and checks
that the original came back with every attribute as it was (not only its state_dict).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold.records import Direction, Site, Skip, SkipReason
from models import realworld as rw
from models.snapshot import assert_unchanged, snapshot
from models.stats import randomize_bn
from models.testing import ATOL_F32_DEEP, ATOL_F64
from models.unsound import UNSOUND

# |folded - original| / output scale. float32: folded in float64, rounded once; the sums inside the
# layers change order (a few ulps times depth). float64: the same, 1e-16 ulps.
TOL = {torch.float32: ATOL_F32_DEEP, torch.float64: ATOL_F64}

bnfold.register_checkpoint_runner(rw.checkpoint_seq, "children")


def bn_like(m: nn.Module) -> int:
    from torch.nn.modules.batchnorm import _BatchNorm

    return sum(isinstance(x, _BatchNorm) for x in m.modules())


def ready(m: nn.Module, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    randomize_bn(m, seed)
    return m.to(dtype).eval()


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, ref.abs().max().item())
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, err


def fold_checked(m: nn.Module, x: torch.Tensor, **kw: object) -> tuple[nn.Module, bnfold.FoldReport]:
    dtype = x.dtype
    with torch.no_grad():
        ref = m(x)
    before = snapshot(m)
    out, rep = bnfold.fold_with_report(m, **kw)  # type: ignore[arg-type]
    assert_unchanged(before, m)
    with torch.no_grad():
        assert_close(out(x), ref, dtype)
        assert_close(m(x), ref, dtype)
    assert bn_like(out) == len(rep.skips) == rep.bn_after
    return out, rep


@pytest.mark.parametrize("name", sorted(rw.REALWORLD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_nets_fold_every_bn(name: str, dtype: torch.dtype) -> None:
    factory, shape = rw.REALWORLD[name]
    m = ready(factory(), dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        m(x)  # fills eval-time caches (LeViT), as a model that was evaluated before folding
    out, rep = fold_checked(m, x)
    assert rep.folded == len(rep.verdicts) > 0, [v for v in rep.skips]
    assert bn_like(out) == 0


def test_norm_act_keeps_its_activation_and_dropout() -> None:
    m = ready(nn.Sequential(nn.Conv2d(3, 4, 3), rw.BatchNormAct2d(4, act=nn.SiLU(), drop=0.5)))
    out, rep = fold_checked(m, torch.randn(2, 3, 6, 6))
    site = rep.verdicts[0]
    assert isinstance(site, Site) and "activation" in site.detail
    tail = out[1]
    assert isinstance(tail.act, nn.SiLU) and isinstance(tail.drop, nn.Dropout)
    # train(): dropout still acts after the folded conv (the BN part is gone, the rest stays)
    out.train()
    y = out(torch.randn(8, 3, 6, 6))
    assert (y == 0).float().mean() > 0.2


class PreScaledBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 2.0)


class ResidualBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x)) + x


class CountingBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked.add_(1)  # a write in eval mode: a fold would drop it
        return super().forward(x)


class BatchStatsBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps
        )


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        (PreScaledBN, "changes the input"),
        (ResidualBN, "reads more than the normalised value"),
        (CountingBN, "writes 'num_batches_tracked' in eval mode"),
        (BatchStatsBN, "batch statistics"),
    ],
)
def test_bn_subclasses_that_do_more_are_refused(cls: type, why: str) -> None:
    m = ready(nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)))
    out, rep = fold_checked(m, torch.randn(2, 3, 6, 6))
    v = rep.verdicts[0]
    assert isinstance(v, Skip) and v.reason is SkipReason.CUSTOM_BN and why in v.detail, v


def test_norm_act_does_not_fold_backward_past_its_activation() -> None:
    m = ready(nn.Sequential(rw.BatchNormAct2d(3), nn.Conv2d(3, 4, 1)))
    _, rep = fold_checked(m, torch.randn(2, 3, 5, 5))
    v = rep.verdicts[0]
    assert isinstance(v, Skip) and v.reason is SkipReason.NO_PRODUCER and "activation" in v.detail


class BnActLike(nn.Module):
    """A BN-like layer that is no _BatchNorm at all: its own names for everything."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.rand(c) + 0.5)
        self.b = nn.Parameter(torch.rand(c) - 0.5)
        self.register_buffer("mu", torch.rand(c) - 0.5)
        self.register_buffer("sigma2", torch.rand(c) + 0.5)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        y = (x - self.mu.view(shape)) / torch.sqrt(self.sigma2.view(shape) + 1e-3) * self.g.view(shape)
        return self.act(y + self.b.view(shape))


def test_register_bn_like_folds_and_freezes_a_declared_layer() -> None:
    m = ready(nn.Sequential(nn.Conv2d(3, 4, 3), BnActLike(4)))
    x = torch.randn(2, 3, 6, 6)
    before = bnfold.inspect(m)
    assert before.folded == 0  # not a BN until declared
    bnfold.register_bn_like(BnActLike, stats=lambda m: (m.g, m.b, m.mu, m.sigma2, 1e-3), tail=lambda m: m.act)
    try:
        out, rep = fold_checked(m, x, example_inputs=(x,))  # a declared layer may run on any rank
        assert rep.folded == 1 and isinstance(out[1], nn.ReLU6)
        frozen = bnfold.freeze(m)
        assert type(frozen[1]).__name__ == "FrozenBatchNorm" and frozen[1].tail is not None
        with torch.no_grad():
            assert_close(frozen.train()(x), m(x), torch.float32)
    finally:
        from bnfold.fx import custom

        custom._REGISTRY.pop(BnActLike, None)


def test_same_padding_conv_folds_forward_only() -> None:
    m = ready(nn.Sequential(rw.Conv2dSame(3, 4, 3, 2), nn.BatchNorm2d(4), nn.ReLU()))
    out, rep = fold_checked(m, torch.randn(2, 3, 9, 8))
    assert rep.folded == 1 and "only its input" in rep.verdicts[0].detail
    back = ready(nn.Sequential(nn.BatchNorm2d(3), rw.Conv2dSame(3, 4, 3)))
    _, rep = fold_checked(back, torch.randn(2, 3, 7, 7))
    assert rep.verdicts[0].reason is SkipReason.PADDING


class CachedWeightConv(nn.Conv2d):
    """Reads a weight cached at construction: replacing ``weight`` would not reach forward."""

    def __init__(self) -> None:
        super().__init__(3, 4, 3)
        self.cached = [self.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.cached[0], self.bias)


class ScaledOutConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias).tanh()


@pytest.mark.parametrize("cls", [CachedWeightConv, ScaledOutConv])
def test_conv_subclasses_that_touch_more_than_the_input_are_refused(cls: type) -> None:
    m = ready(nn.Sequential(cls() if cls is CachedWeightConv else cls(3, 4, 3), nn.BatchNorm2d(4)))
    _, rep = fold_checked(m, torch.randn(2, 3, 7, 7))
    assert rep.verdicts[0].reason is SkipReason.UNSUPPORTED_LAYER


def test_noops_and_flatten_between_bn_and_linear() -> None:
    head = ready(nn.Sequential(nn.Flatten(), rw.NormLinear(12, 5)))
    out, rep = fold_checked(head, torch.randn(4, 12, 1, 1))
    assert rep.folded == 1 and rep.verdicts[0].direction is Direction.BACKWARD
    ident = ready(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(6), nn.Identity(), nn.Linear(6, 3)))
    _, rep = fold_checked(ident, torch.randn(4, 6, 1))
    assert rep.folded == 1
    flat = ready(rw.FlattenHeadNet())
    _, rep = fold_checked(flat, torch.randn(2, 3, 8, 8))
    assert rep.folded == 1 and "16 features" in rep.verdicts[0].detail


class TokensNorm(nn.Module):
    def __init__(self, flat_end: int = 1) -> None:
        super().__init__()
        self.ln = rw.LinearNorm(6, 6)
        self.flat_end = flat_end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


def test_linear_norm_needs_the_token_rank_proven() -> None:
    m = ready(TokensNorm())
    x = torch.randn(2, 5, 6)
    _, rep = fold_checked(m, x)  # the input rank is unknown: flatten(0, 1) could be of a 4-D tensor
    assert rep.verdicts[0].reason is SkipReason.LAYOUT
    _, rep = fold_checked(m, x, example_inputs=(x,))
    assert rep.folded == 1
    x4 = torch.randn(2, 3, 6, 6)  # flatten(0, 1) of (B, N, M, C): BN1d normalises over M, not C
    _, rep = fold_checked(m, x4, example_inputs=(x4,))
    assert rep.verdicts[0].reason is SkipReason.LAYOUT


class SumOfBranches(nn.Module):
    def __init__(self, identity: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.identity = identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + self.b(x) + self.c(x)
        return self.bn(y + x[:, :1] if self.identity else y)


class CatReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.bn(torch.cat([a, self.b(x)], 1)) + a.sum()


def test_bn_after_sum_and_cat_of_branches() -> None:
    _, rep = fold_checked(ready(SumOfBranches()), torch.randn(2, 3, 5, 5))
    assert rep.folded == 1 and "summed branch" in rep.verdicts[0].detail
    _, rep = fold_checked(ready(SumOfBranches(identity=True)), torch.randn(2, 3, 5, 5))
    assert rep.verdicts[0].reason is SkipReason.NO_PRODUCER
    _, rep = fold_checked(ready(CatReadTwice()), torch.randn(2, 3, 5, 5))
    assert rep.verdicts[0].reason is SkipReason.OTHER_CONSUMERS


@pytest.mark.parametrize("name", sorted(UNSOUND))
def test_unsound_parents_are_refused(name: str) -> None:
    m = ready(UNSOUND[name]())
    x = torch.rand(2, 3, 6, 6)  # positive: the branch that reaches into block[0] runs
    out, rep = fold_checked(m, x)
    v = rep.verdicts[0]
    assert isinstance(v, Skip) and v.reason is SkipReason.NOT_TRACEABLE and "traces, but" in v.detail


def test_checkpointing_parent_folds_and_runs_both_branches() -> None:
    m = ready(rw.CheckpointNet())
    x = torch.randn(2, 3, 31, 31)
    out, rep = fold_checked(m, x)
    assert rep.folded == len(rep.verdicts)
    out.grad_checkpointing = m.grad_checkpointing = True
    with torch.no_grad():
        assert_close(out(x), m(x), torch.float32)


class OtherRunner(nn.Module):
    """Hands its stages to a helper nobody declared: refused."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return _undeclared(self.stages, x)
        return self.stages(x)


def _undeclared(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return seq[0](x)


def test_undeclared_runner_is_refused() -> None:
    _, rep = fold_checked(ready(OtherRunner()), torch.rand(2, 3, 6, 6))
    assert rep.verdicts[0].reason is SkipReason.NOT_TRACEABLE


def test_caller_model_with_cache_survives_fold_export_and_freeze() -> None:
    m = ready(rw.LeViTNet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
    before = snapshot(m)
    for _ in range(2):
        bnfold.fold(m)
        bnfold.inspect(m)
    frozen = bnfold.freeze(m)
    assert_unchanged(before, m)
    with torch.no_grad():
        assert_close(m(x), ref, torch.float32)
        assert_close(frozen(x), ref, torch.float32)


def test_inplace_fold_traces_a_shadow() -> None:
    m = ready(rw.LeViTNet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
    out, rep = bnfold.fold_with_report(m, inplace=True)
    assert out is m and rep.folded == len(rep.verdicts)
    for mod in m.modules():
        for v in vars(mod).values():
            vals = v.values() if isinstance(v, dict) else [v]
            assert not any(type(t).__name__ == "Proxy" for t in vals)
    with torch.no_grad():
        assert_close(m(x), ref, torch.float32)


def test_fold_from_many_threads() -> None:
    base = ready(rw.TimmResNet())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = base(x)
    models = [copy.deepcopy(base) for _ in range(4)]
    errors: list[BaseException] = []
    results: list[torch.Tensor] = []
    lock = threading.Lock()

    def work(m: nn.Module) -> None:
        try:
            for i in range(3):
                out = bnfold.fold(m) if i != 1 else bnfold.freeze(m)  # freeze traces BN subclasses too
                with torch.no_grad():
                    y = out(x)
                with lock:
                    results.append(y)
        except BaseException as e:  # noqa: BLE001 - collected and reported below
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in models + models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(results) == 24
    for y in results:
        assert_close(y, ref, torch.float32)


class SharedNormAct(nn.Module):
    """One BatchNormAct2d called after two convs: folding needs a GraphModule (one tail per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = rw.BatchNormAct2d(4, act=nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) * self.bn(self.b(x))


def test_shared_norm_act_folds_in_a_graph_module() -> None:
    out, rep = fold_checked(ready(SharedNormAct()), torch.randn(2, 3, 5, 5))
    assert isinstance(out, torch.fx.GraphModule) and rep.folded == 2
    assert "batch_norm" not in out.code and sum(isinstance(m, nn.SiLU) for m in out.modules()) >= 1


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNormAct: SyncBatchNorm.forward, then dropout and activation."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def test_sync_batchnorm_act_subclass_folds() -> None:
    m = ready(nn.Sequential(nn.Conv2d(3, 4, 3), SyncBatchNormAct(4)))
    x = torch.randn(2, 3, 6, 6)
    out, rep = fold_checked(m, x, example_inputs=(x,))  # SyncBatchNorm runs on any rank >= 2
    assert rep.folded == 1 and isinstance(out[1].act, nn.Hardswish)


class ClampedWeightConv(nn.Conv2d):
    """Edits its weight through ``.data`` before the conv: not input-side only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.weight.data.clamp_(-0.1, 0.1)
        return F.conv2d(x, self.weight, self.bias)


def test_conv_subclass_that_edits_its_weight_is_refused() -> None:
    m = ready(nn.Sequential(ClampedWeightConv(3, 4, 3), nn.BatchNorm2d(4)))
    m(torch.randn(1, 3, 5, 5))  # the clamp has happened once; it happens on every call
    _, rep = fold_checked(m, torch.randn(2, 3, 7, 7))
    assert rep.verdicts[0].reason is SkipReason.UNSUPPORTED_LAYER


class UntraceableStem(nn.Module):
    """BN children called directly by an untraceable forward: ``bn(conv(x))`` and ``x = bn(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = rw.BatchNormAct2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.bn4 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # not traceable
            x = x * 2
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.bn2(self.conv2(x))
        y = self.conv3(x)
        x = self.bn3(y) + y  # the conv output is read twice: not a pair
        x = self.conv4(x)
        z = x
        x = self.bn4(x)  # an alias of the conv output survives: not a pair
        return x + z


def test_untraceable_parent_folds_the_pairs_it_provably_runs() -> None:
    out, rep = fold_checked(ready(UntraceableStem()), torch.rand(2, 3, 6, 6))
    reasons = {v.bn: (v.reason if isinstance(v, Skip) else "folded") for v in rep.verdicts}
    assert reasons == {
        "bn1": "folded",
        "bn2": "folded",
        "bn3": SkipReason.NOT_TRACEABLE,
        "bn4": SkipReason.NOT_TRACEABLE,
    }


class CheckpointWhole(nn.Module):
    """Hands its block whole to torch.utils.checkpoint: the block is called whole, so it folds."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


def test_checkpointed_block_handed_whole_folds() -> None:
    import torch.utils.checkpoint  # noqa: F401 - used by the model

    _, rep = fold_checked(ready(CheckpointWhole()), torch.rand(2, 3, 6, 6))
    assert rep.folded == 1


class SizeBranchConv(nn.Conv2d):
    """Scales its weight for large inputs only: a probe at small sizes would not see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 64:
            return F.conv2d(x, self.weight * 2, self.bias)
        return F.conv2d(x, self.weight, self.bias)


def test_conv_subclass_with_an_input_size_branch_is_refused() -> None:
    m = ready(nn.Sequential(SizeBranchConv(3, 4, 3), nn.BatchNorm2d(4)))
    _, rep = fold_checked(m, torch.randn(1, 3, 70, 70))
    assert rep.verdicts[0].reason is SkipReason.UNSUPPORTED_LAYER
