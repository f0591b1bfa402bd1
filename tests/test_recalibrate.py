"""bnfold.recalibrate on one process: checked against torch's own BatchNorm and plain tensor statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnfold
import bnfold.freezing
import bnfold.nn as bnn
import bnfold.recalibration
from bnfold.recalibration import recalibrate
from models.stats import randomize_bn
from models.testing import ATOL_F32_DEEP

# float64 models: ours accumulates in float64 in another order than the reference; near the floor.
ATOL64 = 1e-10
# float32 models against torch's float32 running statistics (its own float32 reductions).
ATOL32 = ATOL_F32_DEEP  # models.testing: the one tolerance table


def net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(5, 4, 3),
        nn.BatchNorm2d(4, affine=False),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 6),
        nn.BatchNorm1d(6),
    ).to(dtype)
    return randomize_bn(model, seed=3).eval()


def batches(seed: int, sizes: tuple[int, ...], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # batches that differ from each other (scale and offset): the two estimators then differ
    return [
        torch.randn(n, 3, 4, 4, generator=g, dtype=dtype) * (1 + i) + 0.5 * i for i, n in enumerate(sizes)
    ]


def bn_inputs(model: nn.Module, xs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per BN (in order), the input it gets in each batch with every BN normalising by batch
    statistics (torch's F.batch_norm in training mode), the rest in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    seen: list[list[torch.Tensor]] = [[] for _ in bns]
    with torch.no_grad():
        for x in xs:
            h = x
            for layer in model:
                if layer in bns:
                    seen[bns.index(layer)].append(h)
                    h = F.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
                else:
                    h = layer(h)
    return seen


def channel_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, h.dim())]
    return h.mean(dims), h.var(dims, unbiased=True)


def bn_list(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_one_function_behind_all_names() -> None:
    assert bnfold.recalibrate is bnfold.freezing.recalibrate is bnfold.recalibration.recalibrate


@pytest.mark.parametrize("dtype,atol", [(torch.float32, ATOL32), (torch.float64, ATOL64)])
def test_default_equals_torch_cumulative_average(dtype: torch.dtype, atol: float) -> None:
    model = net(dtype)
    xs = batches(1, (4, 3, 6), dtype)
    new = recalibrate(model, xs)
    # oracle: torch's own BatchNorm with momentum=None run in train mode over the same batches
    ref = copy.deepcopy(model)
    for m in bn_list(ref):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in xs:
            ref(x)
    for got, want in zip(bn_list(new), bn_list(ref)):
        torch.testing.assert_close(got.running_mean, want.running_mean, atol=atol, rtol=atol)
        torch.testing.assert_close(got.running_var, want.running_var, atol=atol, rtol=atol)
        assert int(got.num_batches_tracked) == 3
    assert [m.momentum for m in bn_list(new)] == [0.3, 0.1, 0.1]


def test_pooled_is_the_statistics_of_all_values_together() -> None:
    model = net()
    xs = batches(2, (2, 5, 3))
    new = recalibrate(model, xs, pooled=True)
    for bn, seen in zip(bn_list(new), bn_inputs(model, xs)):
        mean, var = channel_stats(torch.cat(seen))
        torch.testing.assert_close(bn.running_mean, mean, atol=ATOL64, rtol=ATOL64)
        torch.testing.assert_close(bn.running_var, var, atol=ATOL64, rtol=ATOL64)
    # and it is not the default estimator on batches that differ
    default = recalibrate(model, xs)
    assert not torch.allclose(default[1].running_var, new[1].running_var, rtol=1e-3)


def test_pooled_keeps_precision_at_a_large_offset() -> None:
    """mean = 1e4 std: a float32 E[x^2] - E[x]^2 would lose every digit; float64 Chan keeps them."""
    bn = nn.BatchNorm1d(3).eval()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 3, generator=g) * 0.01 + 100.0 for _ in range(4)]
    new = recalibrate(bn, xs, pooled=True)
    mean, var = channel_stats(torch.cat(xs).double())
    torch.testing.assert_close(new.running_var.double(), var, rtol=1e-5, atol=0)
    torch.testing.assert_close(new.running_mean.double(), mean, rtol=1e-7, atol=0)


def test_prior_counts_the_source_as_samples() -> None:
    """Source statistics pooled over S, then target T with prior=|S|: the same as pooling S + T."""
    model = net()
    source = batches(3, (4, 6))
    target = batches(4, (3, 5))
    src = recalibrate(model, source, pooled=True)
    mixed = recalibrate(src, target, pooled=True, prior=10)
    together = recalibrate(model, source + target, pooled=True)
    for a, b in zip(bn_list(mixed), bn_list(together)):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=ATOL64, rtol=ATOL64)
        torch.testing.assert_close(a.running_var, b.running_var, atol=ATOL64, rtol=ATOL64)
    # prior 0 replaces; a huge prior keeps the source; in between lies between
    only_t = recalibrate(src, target, pooled=True)
    zero = recalibrate(src, target, pooled=True, prior=0)
    huge = recalibrate(src, target, pooled=True, prior=1e12)
    for z, t, h, s, m in zip(*(bn_list(x) for x in (zero, only_t, huge, src, mixed))):
        assert torch.equal(z.running_mean, t.running_mean) and torch.equal(z.running_var, t.running_var)
        torch.testing.assert_close(h.running_mean, s.running_mean, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(h.running_var, s.running_var, atol=1e-9, rtol=1e-9)
        lo, hi = torch.minimum(s.running_mean, t.running_mean), torch.maximum(s.running_mean, t.running_mean)
        assert bool(((m.running_mean >= lo - 1e-12) & (m.running_mean <= hi + 1e-12)).all())


def test_prior_variance_includes_the_between_means_term() -> None:
    """Two groups with equal variance but far-apart means: the mixture is wider than either."""
    bn = nn.BatchNorm1d(1, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    src_x = torch.randn(400, 1, generator=g, dtype=torch.float64)
    tgt_x = torch.randn(400, 1, generator=g, dtype=torch.float64) + 6.0
    src = recalibrate(bn, [src_x], pooled=True)
    mixed = recalibrate(src, [tgt_x], pooled=True, prior=400)
    mean, var = channel_stats(torch.cat([src_x, tgt_x]))
    torch.testing.assert_close(mixed.running_mean, mean, atol=ATOL64, rtol=ATOL64)
    torch.testing.assert_close(mixed.running_var, var, atol=ATOL64, rtol=ATOL64)
    assert float(mixed.running_var) > 9.0  # ~1 + 3^2


@pytest.mark.parametrize("prior", [-1.0, float("inf"), float("nan")])
def test_bad_prior_is_refused(prior: float) -> None:
    with pytest.raises(bnfold.OptionError, match="prior"):
        recalibrate(net(), batches(0, (2,)), prior=prior)


def test_sync_layers_recalibrate_locally_like_batchnorm() -> None:
    """torch's and bnfold's SyncBatchNorm (no process group) get the statistics a BatchNorm2d gets."""
    plain = net()
    model = copy.deepcopy(plain)
    model[1] = bnn.SyncBatchNorm.convert_sync_batchnorm(model[1])
    model[4] = nn.SyncBatchNorm.convert_sync_batchnorm(model[4])
    assert isinstance(model[1], bnn.SyncBatchNorm) and isinstance(model[4], nn.SyncBatchNorm)
    xs = batches(5, (3, 4))
    want, got = recalibrate(plain, xs), recalibrate(model, xs)
    for a, b in zip(bn_list(got), bn_list(want)):
        torch.testing.assert_close(a.running_mean, b.running_mean, atol=ATOL64, rtol=ATOL64)
        torch.testing.assert_close(a.running_var, b.running_var, atol=ATOL64, rtol=ATOL64)
    assert not got[1].training and not got[4].training
    x = batches(6, (2,))[0]
    torch.testing.assert_close(got(x), want(x), atol=ATOL64, rtol=ATOL64)


def _snapshot(model: nn.Module) -> list[object]:
    out: list[object] = []
    for name, m in model.named_modules():
        out.append(
            (
                name,
                type(m),
                m.training,
                getattr(m, "momentum", None),
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()},
            )
        )
    return out


def _same(a: list[object], b: list[object]) -> bool:
    for x, y in zip(a, b, strict=True):
        *meta_x, sx = x  # type: ignore[misc]
        *meta_y, sy = y  # type: ignore[misc]
        if meta_x != meta_y or sx.keys() != sy.keys():
            return False
        if not all(torch.equal(sx[k], sy[k]) for k in sx):
            return False
    return True


def test_input_untouched_and_only_statistics_change() -> None:
    model = net()
    model[7].train()  # mixed flags must come back
    before = _snapshot(model)
    new = recalibrate(model, batches(7, (3, 3)))
    assert _same(_snapshot(model), before)
    after = _snapshot(new)
    for (name, *meta_b, sb), (_, *meta_a, sa) in zip(before, after):  # type: ignore[misc]
        assert meta_a == meta_b, name  # type, training flag, momentum, no hook left behind
        for k in sb:
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert not torch.equal(sa[k], sb[k]), f"{name}.{k} not re-estimated"
            else:
                assert torch.equal(sa[k], sb[k]), f"{name}.{k} changed"


def test_failure_restores_statistics_even_in_place() -> None:
    model = net()
    before = _snapshot(model)

    def broken():
        yield from batches(8, (3,))
        raise RuntimeError("data loader died")

    with pytest.raises(RuntimeError, match="data loader died"):
        recalibrate(model, broken(), inplace=True)
    assert _same(_snapshot(model), before)
    with pytest.raises(bnfold.OptionError, match="at least one batch"):
        recalibrate(model, [], inplace=True)
    assert _same(_snapshot(model), before)
    with pytest.raises(bnfold.InputError):
        recalibrate("not a model", [])  # type: ignore[arg-type]
    bad = batches(11, (3, 3))
    bad[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(bnfold.InputError, match="not finite"):
        recalibrate(model, bad, inplace=True)
    assert _same(_snapshot(model), before)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.BatchNorm1d(3)
        self.b = nn.BatchNorm1d(3)  # never called in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def test_unreached_and_frozen_layers_keep_their_state() -> None:
    model = randomize_bn(_Branchy(), seed=1).eval()
    new = recalibrate(model, [torch.randn(4, 3) + 2.0])
    assert torch.equal(new.b.running_mean, model.b.running_mean)
    assert torch.equal(new.b.running_var, model.b.running_var)
    assert torch.equal(new.b.num_batches_tracked, model.b.num_batches_tracked)
    assert not torch.equal(new.a.running_mean, model.a.running_mean)
    frozen = bnfold.freeze(net(), prefix="1")
    again = recalibrate(frozen, batches(9, (3,)))
    assert torch.equal(again[1].scale, frozen[1].scale) and torch.equal(again[1].shift, frozen[1].shift)
    assert not torch.equal(again[4].running_var, frozen[4].running_var)


def test_inputs_as_tuples_and_mappings() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
            return self.bn(x + shift)

    m = randomize_bn(Two()).eval()
    x = torch.randn(5, 2)
    a = recalibrate(m, [(x, 1.0)])
    b = recalibrate(m, [{"x": x, "shift": 1.0}])
    c = recalibrate(m, [x + 1.0])
    assert torch.equal(a.bn.running_mean, c.bn.running_mean) and torch.equal(
        b.bn.running_var, c.bn.running_var
    )


def test_param_groups_put_the_frozen_affine_at_its_own_rate() -> None:
    class Holder(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net, self.alias = net, net[1]  # a shared frozen layer: its parameters appear once

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def __getitem__(self, i: int) -> nn.Module:
            return self.net[i]

    model = Holder(bnfold.freeze(net(), learnable=True, prefix=["1", "7"]))  # float64: exact step ratio
    groups = bnfold.param_groups(model, 0.01, affine_lr_scale=10.0)
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    others, affine = ({id(p) for p in g["params"]} for g in groups)
    want_affine = {id(p) for i in (1, 7) for p in (model[i].scale, model[i].shift)}
    assert affine == want_affine and not others & affine
    assert others | affine == {id(p) for p in model.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # one SGD step moves the affine 10x as far as the same step at the common rate
    x = batches(10, (4,))[0]
    steps = []
    for scale in (1.0, 10.0):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(bnfold.param_groups(m, 0.01, affine_lr_scale=scale), lr=0.01)
        m(x).square().sum().backward()
        before = m[1].scale.detach().clone()
        opt.step()
        steps.append(m[1].scale.detach() - before)
    torch.testing.assert_close(steps[1], steps[0] * 10, rtol=1e-9, atol=1e-12)
    assert steps[0].abs().max() > 1e-4  # the step is not trivially zero
    # without learnable frozen layers: one group, everything at lr
    plain = bnfold.param_groups(bnfold.freeze(net()), 0.01)
    assert len(plain) == 1 and plain[0]["lr"] == 0.01
    with pytest.raises(bnfold.OptionError, match="affine_lr_scale"):
        bnfold.param_groups(model, 0.01, affine_lr_scale=-1.0)


def test_model_with_a_forward_cache_is_copied_not_changed() -> None:
    # LeViT keeps an eval-mode attention-bias cache: a tensor with a grad_fn, which copy.deepcopy refuses.
    from models.realworld import LeViTNet

    torch.manual_seed(0)
    model = LeViTNet().eval()
    x = torch.randn(4, 3, 16, 16)
    model(x)  # fills the cache
    assert model.attn.attention_bias_cache
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = bnfold.recalibrate(model, [torch.randn(4, 3, 16, 16) + 0.5 for _ in range(3)])
    assert out is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert not torch.equal(out.stem[1].running_mean, model.stem[1].running_mean)  # the copy was recalibrated
    out(x)  # and still runs
