"""bnfold.freeze / unfreeze / recalibrate and FrozenBatchNorm: checked by running the models."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnfold
from bnfold.freezing import bn_state_dict, freeze_with_report, recalibrate, to_bn_state_dict, unfreeze
from bnfold.nn.frozen import FrozenBatchNorm
from bnfold.records import Site, SkipReason
from models.stats import randomize_bn
from models.testing import ATOL_F32, ATOL_F64, run_onnx

# Frozen vs BN in float32: both are one multiply-add per element from float32-rounded scale/shift; the
# BN kernel rounds its own scale differently, so a few ulps of the output scale (|y| ~ 10).
ATOL32 = ATOL_F32  # models.testing: the one tolerance table
# float64: same, at the float64 floor.
ATOL64 = ATOL_F64  # models.testing: the one tolerance table
# float16: scale/shift rounded to 11 bits; outputs of size ~10 differ by a few float16 ulps.
ATOL16 = 3e-2


def conv_net(bn_eps: float = 1e-5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=bn_eps),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.BatchNorm2d(6, eps=bn_eps, affine=False),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
        nn.BatchNorm1d(5, eps=bn_eps),
    )


def ready(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and not isinstance(m, nn.modules.batchnorm._NormBase):
            m.reset_parameters()
    return randomize_bn(model, seed).eval()


def x_img(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("dtype,atol", [(torch.float32, ATOL32), (torch.float64, ATOL64)])
def test_frozen_train_equals_eval_equals_bn(dtype: torch.dtype, atol: float) -> None:
    model = ready(conv_net()).to(dtype)
    x = x_img().to(dtype)
    ref = model(x)
    frozen, report = freeze_with_report(model)
    assert report.bn_before == 3 and report.bn_after == 0 and report.folded == 3
    assert all(isinstance(v, Site) for v in report.verdicts)
    assert count(frozen, FrozenBatchNorm) == 3
    assert all(m.scale.dtype == dtype for m in frozen.modules() if isinstance(m, FrozenBatchNorm))
    out_eval = frozen.eval()(x)
    out_train = frozen.train()(x)
    assert torch.equal(out_train, out_eval)
    torch.testing.assert_close(out_eval, ref, atol=atol, rtol=0)


def test_frozen_in_train_mode_changes_no_state_and_model_untouched() -> None:
    model = ready(conv_net())
    before = copy.deepcopy(model.state_dict())
    frozen = bnfold.freeze(model).train()
    state = copy.deepcopy(frozen.state_dict())
    for seed in range(3):
        frozen(x_img(seed))
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the input model is another object and is unchanged
    assert count(model, nn.BatchNorm2d) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_default_gets_no_gradient_and_optimizer_leaves_it() -> None:
    frozen = bnfold.freeze(ready(conv_net())).train()
    layers = [m for m in frozen.modules() if isinstance(m, FrozenBatchNorm)]
    params = {id(p) for p in frozen.parameters()}
    for m in layers:
        assert not m.scale.requires_grad and not m.shift.requires_grad
        assert id(m.scale) not in params and id(m.shift) not in params
    saved = [(m.scale.clone(), m.shift.clone()) for m in layers]
    conv_w = frozen[0].weight.detach().clone()
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    frozen(x_img()).square().mean().backward()
    opt.step()
    assert not torch.equal(frozen[0].weight, conv_w)
    for m, (s, b) in zip(layers, saved):
        assert torch.equal(m.scale, s) and torch.equal(m.shift, b)


def test_learnable_starts_at_folded_values_and_trains() -> None:
    model = ready(conv_net())
    x = x_img()
    frozen = bnfold.freeze(model, learnable=True).train()
    torch.testing.assert_close(frozen(x), model(x), atol=ATOL32, rtol=0)
    layers = [m for m in frozen.modules() if isinstance(m, FrozenBatchNorm)]
    params = {id(p) for p in frozen.parameters()}
    assert all(id(m.scale) in params and id(m.shift) in params for m in layers)
    saved = [m.scale.detach().clone() for m in layers]
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    frozen(x).square().mean().backward()
    assert all(m.scale.grad is not None and m.shift.grad is not None for m in layers)
    opt.step()
    assert any(not torch.equal(m.scale, s) for m, s in zip(layers, saved))


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_bn_checkpoint_loads_into_frozen_model(eps: float) -> None:
    trained = ready(conv_net(eps), seed=3)
    buf = io.BytesIO()
    torch.save(trained.state_dict(), buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()))
    assert any(k.endswith("num_batches_tracked") for k in ckpt)
    # a fresh (untrained) model frozen, then the BN checkpoint loaded into it
    frozen = bnfold.freeze(conv_net(eps).eval())
    frozen.load_state_dict(ckpt, strict=True)
    x = x_img()
    torch.testing.assert_close(frozen.train()(x), trained(x), atol=ATOL32, rtol=0)
    # and the learnable variant
    frozen_l = bnfold.freeze(conv_net(eps).eval(), learnable=True)
    frozen_l.load_state_dict(ckpt, strict=True)
    torch.testing.assert_close(frozen_l(x), trained(x), atol=ATOL32, rtol=0)


def test_frozen_state_maps_back_to_bn_checkpoint() -> None:
    model = ready(conv_net(1e-3), seed=4)
    x = x_img()
    frozen = bnfold.freeze(model, learnable=True)
    with torch.no_grad():  # as after fine-tuning the affine
        for m in frozen.modules():
            if isinstance(m, FrozenBatchNorm):
                m.scale.mul_(1.3)
                m.shift.add_(0.2)
    expected = frozen.eval()(x)
    target = conv_net(1e-3).eval()
    target.load_state_dict(bn_state_dict(frozen), strict=True)
    torch.testing.assert_close(target(x), expected, atol=ATOL32, rtol=0)
    # from a saved frozen state_dict alone (statistics unknown)
    saved = {k: v.clone() for k, v in frozen.state_dict().items()}
    target2 = conv_net(1e-3).eval()
    target2.load_state_dict(to_bn_state_dict(saved, eps=1e-3, affine={"4": False}), strict=True)
    torch.testing.assert_close(target2(x), expected, atol=ATOL32, rtol=0)
    # the frozen state_dict also round-trips into a frozen model
    again = bnfold.freeze(conv_net(1e-3).eval())
    again.load_state_dict(saved, strict=True)
    torch.testing.assert_close(again(x), expected, atol=ATOL32, rtol=0)


def test_eps_never_zero_and_float16_zero_variance_is_finite() -> None:
    with pytest.raises(ValueError):
        FrozenBatchNorm(4, eps=0.0)
    bn = nn.BatchNorm2d(4)
    randomize_bn(bn, 0)
    with torch.no_grad():
        bn.running_var[:2] = 0.0
    bn = bn.half().eval()
    frozen = bnfold.freeze(bn)
    assert isinstance(frozen, FrozenBatchNorm) and frozen.eps == bn.eps > 0
    assert frozen.scale.dtype == torch.float16
    x = bn.running_mean.view(1, 4, 1, 1).expand(2, 4, 3, 3).clone()  # zero-variance data: x == mean
    x = x + torch.randn(2, 4, 3, 3).half() * 1e-3
    out = frozen(x)
    assert torch.isfinite(out).all()
    # x * scale + shift in float16 cancels: the error is a few float16 ulps of |x * scale| + |shift|
    s, b = frozen.scale.float().view(1, 4, 1, 1), frozen.shift.float().view(1, 4, 1, 1)
    bound = 4 * 2.0**-11 * (x.float().abs() * s.abs() + b.abs()) + 1e-3
    assert ((out.float() - bn.float()(x.float())).abs() <= bound).all()
    back = unfreeze(frozen)
    assert back.eps == bn.eps > 0


def test_overflow_and_no_stats_and_custom_bn_are_skipped() -> None:
    class MyBN(nn.BatchNorm2d):  # adds its input back: not "BN, then ops on its output"
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + x

    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), MyBN(3), nn.BatchNorm2d(3))
    randomize_bn(model, 0)
    with torch.no_grad():
        model[2].weight.fill_(6e4)
        model[2].running_var.zero_()
    model = model.half().eval()
    out, report = freeze_with_report(model)
    reasons = {v.bn: v.reason for v in report.skips}
    assert reasons == {
        "0": SkipReason.NO_RUNNING_STATS,
        "1": SkipReason.CUSTOM_BN,
        "2": SkipReason.OVERFLOW,
    }
    assert count(out, FrozenBatchNorm) == 0 and report.bn_after == 3


def test_bn1d_3d_sync_and_bnfold_nn_layers() -> None:
    bnn = pytest.importorskip("bnfold.nn")
    model = nn.ModuleDict(
        {
            "a": nn.BatchNorm1d(4),
            "b": nn.BatchNorm3d(4),
            "c": nn.SyncBatchNorm(4),
            "d": bnn.BatchNorm2d(4),
            "e": bnn.SyncBatchNorm(4),
        }
    )
    randomize_bn(model, 5)
    model.eval()
    g = torch.Generator().manual_seed(0)
    inputs = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(2, 4, 2, 3, 3, generator=g),
        "c": torch.randn(2, 4, 5, generator=g),
        "d": torch.randn(2, 4, 3, 3, generator=g),
        "e": torch.randn(2, 4, 3, 3, generator=g),
    }
    frozen, report = freeze_with_report(model)
    assert report.folded == 5 and report.bn_after == 0
    back = unfreeze(frozen).eval()
    for k, x in inputs.items():
        assert isinstance(frozen[k], FrozenBatchNorm)
        ref = model[k](x)
        torch.testing.assert_close(frozen[k].train()(x), ref, atol=ATOL32, rtol=0)
        assert type(back[k]) is type(model[k])
        torch.testing.assert_close(back[k](x), ref, atol=ATOL32, rtol=0)


def test_unfreeze_restores_trainable_bn() -> None:
    model = ready(conv_net(1e-3), seed=2)
    x = x_img(n=8)
    back = unfreeze(bnfold.freeze(model))
    assert count(back, FrozenBatchNorm) == 0
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    bns = [m for m in back.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # as the source BNs: affine ones with trainable gamma/beta, affine=False ones without
    src = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [m.affine for m in bns] == [m.affine for m in src] and not all(m.affine for m in src)
    assert all((m.weight is None or m.weight.requires_grad) and m.eps == 1e-3 for m in bns)
    torch.testing.assert_close(back.eval()(x), model(x), atol=ATOL32, rtol=0)
    # never fine-tuned: it is the original BN again, also in train mode
    torch.testing.assert_close(back.train()(x), copy.deepcopy(model).train()(x), atol=ATOL32, rtol=0)
    # a layer known only by scale/shift (e.g. loaded from a frozen checkpoint)
    layer = FrozenBatchNorm(8, 1e-3, dim=2)
    layer.load_state_dict({"scale": torch.rand(8) + 0.5, "shift": torch.randn(8)})
    bn = unfreeze(layer)
    assert type(bn) is nn.BatchNorm2d
    y = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(bn.eval()(y), layer(y), atol=ATOL32, rtol=0)


def test_prefix_and_predicate_select() -> None:
    model = ready(conv_net())
    only_first = bnfold.freeze(model, prefix="1")
    assert isinstance(only_first[1], FrozenBatchNorm) and isinstance(only_first[4], nn.BatchNorm2d)
    out, report = freeze_with_report(model, prefix=["1", "7"])
    assert [v.bn for v in report.sites] == ["1", "7"] and report.bn_after == 1
    assert any("4" in n for n in report.notes)
    verdicts: list = []
    pred = bnfold.freeze(model, predicate=lambda name, m: m.affine is False, report=verdicts)
    assert isinstance(pred[4], FrozenBatchNorm) and count(pred, FrozenBatchNorm) == 1
    assert [v.bn for v in verdicts] == ["4"]
    nested = nn.Sequential(nn.Sequential(nn.BatchNorm2d(2)), nn.Sequential(nn.BatchNorm2d(2)))
    for i in range(11):
        nested.add_module(f"x{i}", nn.Identity())
    nested.add_module("10", nn.Sequential(nn.BatchNorm2d(2)))
    sel = bnfold.freeze(nested, prefix="1")  # "1" and what is under it, not "10"
    assert isinstance(sel[1][0], FrozenBatchNorm) and isinstance(getattr(sel, "10")[0], nn.BatchNorm2d)


def test_inplace_and_root_and_shared_module() -> None:
    model = ready(conv_net())
    same = bnfold.freeze(model, inplace=True)
    assert same is model and count(model, FrozenBatchNorm) == 3
    bn = randomize_bn(nn.BatchNorm2d(3), 1).eval()
    shared = nn.Sequential(bn, nn.ReLU(), bn)
    x = torch.randn(2, 3, 4, 4)
    frozen, report = freeze_with_report(shared)
    assert frozen[0] is frozen[2] and isinstance(frozen[0], FrozenBatchNorm)
    assert report.folded == 1 and "shared" in report.verdicts[0].detail
    torch.testing.assert_close(frozen(x), shared(x), atol=ATOL32, rtol=0)
    back = unfreeze(frozen)
    assert back[0] is back[2]
    root = bnfold.freeze(bn)
    assert isinstance(root, FrozenBatchNorm) and isinstance(bn, nn.BatchNorm2d)


class _DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.drop(self.conv(x))))


def test_recalibrate_is_cumulative_average_and_changes_nothing_else() -> None:
    model = ready(_DropNet(), seed=6)
    model.head.train()  # mixed flags, to be restored
    batches = [x_img(s, n=5) * (1 + s) + s for s in range(3)]
    new = recalibrate(model, batches)
    # reference: per-batch statistics of the BN input (dropout off), averaged
    with torch.no_grad():
        feats = [model.conv(b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(new.bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new.bn.running_var, var, atol=1e-5, rtol=1e-5)
    assert int(new.bn.num_batches_tracked) == 3
    assert new.bn.momentum == 0.3 and new.head[2].momentum == 0.1
    assert [m.training for m in new.modules()] == [m.training for m in model.modules()]
    for (n, p), q in zip(model.named_parameters(), new.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(model.bn.running_mean, new.bn.running_mean)  # the input is untouched
    # frozen layers have nothing to recalibrate and are left exactly as they are
    frozen = bnfold.freeze(model, prefix="bn")
    again = recalibrate(frozen, batches)
    assert torch.equal(again.bn.scale, frozen.bn.scale) and torch.equal(again.bn.shift, frozen.bn.shift)
    with pytest.raises(bnfold.OptionError):
        recalibrate(model, [])


def test_onnx_export_is_mul_add_and_matches_onnxruntime(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = ready(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    x = x_img()
    for learnable in (False, True):
        frozen = bnfold.freeze(model, learnable=learnable).eval()
        path = tmp_path / f"f{learnable}.onnx"
        torch.onnx.export(frozen, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
        proto = onnx.load(str(path))
        ops = [n.op_type for n in proto.graph.node]
        assert "BatchNormalization" not in ops and ops.count("Mul") == 1 and ops.count("Add") == 1
        onnx.checker.check_model(proto, full_check=True)
        (y,) = run_onnx(path, {"x": x.numpy()})
        np.testing.assert_allclose(y, model(x).detach().numpy(), atol=ATOL32, rtol=0)


_BN_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(2, 5),
    channels=st.integers(1, 6),
    eps=st.sampled_from([1e-6, 1e-5, 1e-3, 0.1, 1.0, 2.0]),
    affine=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_freeze_unfreeze_roundtrip(
    rank: int, channels: int, eps: float, affine: bool, seed: int
) -> None:
    bn = _BN_BY_RANK[rank](channels, eps=eps, affine=affine).double()
    randomize_bn(bn, seed).eval()
    shape = (3, channels) + (2,) * (rank - 2)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = bn(x)
    frozen = bnfold.freeze(bn)
    torch.testing.assert_close(frozen.train()(x), ref, atol=ATOL64, rtol=1e-12)
    back = unfreeze(frozen).eval()
    assert type(back) is type(bn) and back.eps == eps
    torch.testing.assert_close(back(x), ref, atol=ATOL64, rtol=1e-12)
    target = _BN_BY_RANK[rank](channels, eps=eps, affine=affine).double().eval()
    target.load_state_dict(bn_state_dict(frozen))
    torch.testing.assert_close(target(x), ref, atol=ATOL64, rtol=1e-12)


def test_lazy_uninitialised_bn_is_refused() -> None:
    with pytest.raises(bnfold.UnsupportedModelError):
        bnfold.freeze(nn.Sequential(nn.LazyBatchNorm2d()))
