"""BN health audit (``bnfold.health``) and the denormal flush (``flush_denormals``), ONNX and PyTorch.

Oracles: the BN statistics the test itself sets (which channel is dead, which variance is 0), direct
NumPy / ml_dtypes counts on the tensors of the folded model, and the original model run in
onnxruntime (optimisations off) or in PyTorch float64.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import bnfold
from bnfold.denormals import count_subnormal, flush_array, range_counts
from models.onnx_graphs import G, assert_close, feeds_for, run
from models.stats import randomize_bn
from models.testing import ATOL_F32_DEEP

F32_TINY = np.finfo(np.float32).tiny
# float32 fold vs unfolded float32 model: a few ulps per product over short sums (see models.onnx_graphs).
TOL_F32 = ATOL_F32_DEEP  # models.testing: the one tolerance table


def _np_subnormal(a: np.ndarray) -> int:
    """The direct count: nonzero and below float32's smallest normal number."""
    a = np.asarray(a, dtype=np.float32)
    return int(np.count_nonzero((a != 0) & (np.abs(a) < F32_TINY)))


def _sick_conv_bn(eps: float = 1e-8) -> onnx.ModelProto:
    """x -> Conv(8 out) -> BN -> y with: channel 0 gamma = 0 (dead), 1 gamma = 1e-39 (subnormal),
    2 var = 0 (with a small eps), 3 gamma = 1e4 and var = 1e-6 (scale 1e7: overflows float16)."""
    g = G()
    g.input("x", [1, 3, 6, 6])
    g.output("y")
    g.rand("w", (8, 3, 3, 3))
    g.rand("b", (8,))
    g.node("Conv", ["x", "w", "b"], ["t"], name="conv")
    g.bn("t", "y", 8, "bn", epsilon=eps)
    m = g.model()
    init = {t.name: t for t in m.graph.initializer}
    gamma = numpy_helper.to_array(init["bn.gamma"]).copy()
    var = numpy_helper.to_array(init["bn.var"]).copy()
    gamma[0], gamma[1], gamma[3] = 0.0, 1e-39, 1e4
    var[2], var[3] = 0.0, 1e-6
    init["bn.gamma"].CopyFrom(numpy_helper.from_array(gamma.astype(np.float32), "bn.gamma"))
    init["bn.var"].CopyFrom(numpy_helper.from_array(var.astype(np.float32), "bn.var"))
    return m


def _init(m: onnx.ModelProto, reader: str) -> list[np.ndarray]:
    """The float initializers node ``reader`` reads in the folded model."""
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    node = next(n for n in m.graph.node if n.name == reader)
    return [init[x] for x in node.input if x in init]


# ---------------------------------------------------------------------------------------- ONNX
def test_onnx_health_flags_each_sick_channel() -> None:
    m = _sick_conv_bn(eps=1e-8)
    before = m.SerializeToString()
    h = bnfold.health(m)
    assert m.SerializeToString() == before, "the audit changed the model"
    (b,) = h.bns
    assert (b.bn, b.status, b.target) == ("bn", "folded", "conv")
    assert b.channels == 8 and b.eps == pytest.approx(1e-8)
    assert b.constant_channels == (0,)
    assert 1 in b.near_zero_gamma and 0 not in b.near_zero_gamma
    assert b.small_var == (2,)  # var = 0 <= eps; channel 3 has var 1e-6 > eps 1e-8
    assert not h.healthy and h.flagged == (b,)


def test_onnx_var_zero_small_eps_blows_up_scale() -> None:
    m = _sick_conv_bn(eps=1e-10)
    (b,) = bnfold.health(m).bns
    gamma = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "bn.gamma")).astype(
        np.float64
    )
    # var = 0: scale = gamma / sqrt(eps) = 1e5 * gamma on channel 2.
    assert b.max_abs_scale >= abs(gamma[2]) / np.sqrt(1e-10) * (1 - 1e-6)
    assert 2 in b.small_var


def test_onnx_counts_match_direct_numpy_on_folded_weights() -> None:
    m = _sick_conv_bn()
    h = bnfold.health(m)
    folded = bnfold.fold(m, flush_denormals=False)
    w, bias = _init(folded, "conv")
    (b,) = h.bns
    assert b.folded_values == w.size + bias.size
    direct = _np_subnormal(w) + _np_subnormal(bias)
    assert direct > 0  # gamma = 1e-39 makes the weights of channel 1 subnormal
    assert b.subnormal == h.subnormal == direct
    vals = np.concatenate([w.ravel(), bias.ravel()]).astype(np.float64)
    nz = vals[vals != 0]
    with np.errstate(over="ignore"):
        f16 = nz.astype(np.float16)
    assert b.folded_range.fp16_overflow == int(np.count_nonzero(np.isinf(f16))) > 0  # scale 1e7
    assert b.folded_range.fp16_subnormal == int(np.count_nonzero(np.abs(f16) < np.finfo(np.float16).tiny))
    bf = np.abs(nz.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64))
    assert b.folded_range.bf16_subnormal == int(np.count_nonzero(bf < F32_TINY))
    assert b.scale_range.fp16_overflow >= 1  # the scale 1e7 itself does not fit float16


def test_onnx_flush_zeroes_subnormals_and_keeps_outputs() -> None:
    m = _sick_conv_bn()
    before = m.SerializeToString()
    kept, rep_kept = bnfold.fold_with_report(m, flush_denormals=False)
    flushed, rep = bnfold.fold_with_report(m)  # the default flushes
    assert m.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(flushed, full_check=True)
    w_kept, b_kept = _init(kept, "conv")
    w, b = _init(flushed, "conv")
    n = _np_subnormal(w_kept) + _np_subnormal(b_kept)
    assert rep.flushed_denormals == n > 0 and rep_kept.flushed_denormals is None
    assert _np_subnormal(w) == _np_subnormal(b) == 0
    # Only subnormal values changed, to zero.
    changed = w_kept != w
    assert np.all(w[changed] == 0) and np.all(np.abs(w_kept[changed]) < F32_TINY)
    for s in range(2):
        feeds = feeds_for(m, s)
        assert_close(run(m, feeds), run(flushed, feeds), TOL_F32)
    assert rep.to_dict()["flushed_denormals"] == n


def test_onnx_flush_leaves_tensors_the_fold_did_not_write() -> None:
    g = G()
    g.input("x", [1, 3, 6, 6])
    g.output("z")
    g.rand("w", (4, 3, 1, 1))
    g.node("Conv", ["x", "w"], ["t"], name="conv")
    g.bn("t", "u", 4, "bn")
    w2 = g.rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    w2[0, 0, 0, 0] = 1e-40  # already subnormal in the original, in a layer no BN folds into
    g.init("w2", w2)
    g.node("Conv", ["u", "w2"], ["z"], name="conv2")
    m = g.model()
    gamma = next(t for t in m.graph.initializer if t.name == "bn.gamma")
    gm = numpy_helper.to_array(gamma).copy()
    gm[1] = 1e-39
    gamma.CopyFrom(numpy_helper.from_array(gm.astype(np.float32), "bn.gamma"))
    out, rep = bnfold.fold_with_report(m)
    assert rep.flushed_denormals and rep.flushed_denormals > 0
    (w2_after,) = _init(out, "conv2")
    assert np.array_equal(w2_after, w2) and _np_subnormal(w2_after) == 1
    assert _np_subnormal(_init(out, "conv")[0]) == 0


def test_onnx_inplace_flush() -> None:
    m = _sick_conv_bn()
    ref = copy.deepcopy(m)
    out, rep = bnfold.fold_with_report(m, inplace=True)
    assert out is m and rep.flushed_denormals and rep.flushed_denormals > 0
    assert sum(_np_subnormal(a) for a in _init(out, "conv")) == 0
    feeds = feeds_for(ref, 0)
    assert_close(run(ref, feeds), run(out, feeds), TOL_F32)


def test_onnx_affine_site_counts_its_constants() -> None:
    g = G()
    g.input("x", [1, 4, 5, 5])
    g.output("y")
    g.node("Relu", ["x"], ["r"], name="relu")
    g.bn("r", "y", 4, "bn")
    m = g.model()
    gamma = next(t for t in m.graph.initializer if t.name == "bn.gamma")
    gm = numpy_helper.to_array(gamma).copy()
    gm[2] = 1e-39
    gamma.CopyFrom(numpy_helper.from_array(gm.astype(np.float32), "bn.gamma"))
    (b,) = bnfold.health(m, affine=True).bns
    assert b.status == "affine" and b.folded_values == 8  # 4 scales + 4 shifts
    kept = bnfold.fold(m, affine=True, flush_denormals=False)
    direct = sum(_np_subnormal(numpy_helper.to_array(t)) for t in kept.graph.initializer)
    assert b.subnormal == direct == 1
    (left,) = bnfold.health(m).bns  # without --affine the BN stays: nothing written
    assert left.status == "left" and left.folded_values == 0 and 2 in left.near_zero_gamma


def test_healthy_model_reports_healthy() -> None:
    g = G()
    g.input("x", [1, 3, 6, 6])
    g.output("y")
    g.rand("w", (4, 3, 3, 3))
    g.node("Conv", ["x", "w"], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    m = g.model()
    h = bnfold.health(m)
    assert h.healthy and not h.flagged and h.subnormal == 0
    assert h.changed_values == 4 * 3 * 3 * 3 + 4  # weight and the new bias
    _, rep = bnfold.fold_with_report(m)
    assert rep.flushed_denormals == 0


# ------------------------------------------------------------------------------------- PyTorch
class ConvChain(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN, then flatten -> Linear -> BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.fc, self.b3 = nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.b3(self.fc(torch.flatten(y, 1)))


def _sick_module() -> ConvChain:
    torch.manual_seed(0)
    m = randomize_bn(ConvChain()).eval()
    with torch.no_grad():
        m.b1.weight[0] = 0.0  # dead
        m.b1.weight[1] = 1e-39  # subnormal gamma
        m.b2.running_var[1] = 0.0  # var = 0 ...
        m.b2.eps = 1e-9  # ... with a small eps: scale ~ 3e4 * gamma
        m.b3.weight[2] = 0.0
        m.b3.weight[4] = 3e-39
    return m


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_torch_health_and_direct_counts() -> None:
    m = _sick_module()
    st, attrs = _state(m), {n: dict(vars(mod)) for n, mod in m.named_modules()}
    h = bnfold.health(m)
    by = {b.bn: b for b in h.bns}
    assert by["b1"].constant_channels == (0,) and 1 in by["b1"].near_zero_gamma
    assert by["b2"].small_var == (1,) and by["b2"].eps == pytest.approx(1e-9)
    assert by["b3"].constant_channels == (2,) and 4 in by["b3"].near_zero_gamma
    assert {b.target for b in h.bns} == {"c1", "c2", "fc"}
    folded = bnfold.fold(m, flush_denormals=False)
    for bn, layer in (("b1", folded.c1), ("b2", folded.c2), ("b3", folded.fc)):
        direct = _np_subnormal(layer.weight.detach().numpy()) + _np_subnormal(layer.bias.detach().numpy())
        assert by[bn].subnormal == direct, bn
    assert by["b1"].subnormal > 0 and by["b3"].subnormal > 0
    assert h.subnormal == sum(b.subnormal for b in h.bns)
    # the original is untouched: values and every attribute
    assert all(torch.equal(st[k], v) for k, v in m.state_dict().items())
    for n, mod in m.named_modules():
        assert set(vars(mod)) == set(attrs[n]) and mod.training is False


def test_torch_flush_keeps_outputs_and_original() -> None:
    m = _sick_module()
    st = _state(m)
    out, rep = bnfold.fold_with_report(m)
    assert rep.bn_after == 0
    assert rep.flushed_denormals and rep.flushed_denormals > 0
    for layer in (out.c1, out.c2, out.fc):
        for p in (layer.weight, layer.bias):
            assert _np_subnormal(p.detach().numpy()) == 0
    assert all(torch.equal(st[k], v) for k, v in m.state_dict().items()), "the original was changed"
    assert _np_subnormal(m.b1.weight.detach().numpy()) == 1  # its subnormal gamma is still there
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double())
        got = out(x).double()
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= TOL_F32 * scale


def test_torch_flush_leaves_unfolded_layers() -> None:
    m = _sick_module()
    with torch.no_grad():
        m.b3.track_running_stats = False  # b3 cannot be folded now: fc keeps its own weights
        m.b3.running_mean = None
        m.b3.running_var = None
        m.fc.weight[0, 0] = 1e-40
    out, rep = bnfold.fold_with_report(m)
    assert any(v.bn == "b3" and not v.folded for v in rep.verdicts)
    assert out.fc.weight[0, 0].item() == pytest.approx(1e-40, rel=1e-3)  # not written by the fold
    h = bnfold.health(m)
    b3 = next(b for b in h.bns if b.bn == "b3")
    assert b3.status == "left" and "running" in b3.note


def test_health_refuses_exported_program() -> None:
    m = _sick_module()
    ep = torch.export.export(m, (torch.randn(2, 3, 6, 6),))
    with pytest.raises(bnfold.UnsupportedModelError, match="torch.export"):
        bnfold.health(ep)


def test_health_with_inplace_fold_is_refused() -> None:
    with pytest.raises(bnfold.OptionError, match="inplace"):
        bnfold.fold_with_report(_sick_module(), inplace=True, health=True)


# --------------------------------------------------------------------------------- the helpers
def test_range_counts_against_ml_dtypes() -> None:
    vals = np.array([1e-40, 3e-39, 5e-6, 1e-8, 7e4, 1e5, 3.4e38, -3.4e38, 1.0, 0.0], dtype=np.float64)
    r = range_counts(vals)
    nz = vals[vals != 0]
    with np.errstate(over="ignore"):
        f16 = np.abs(nz.astype(np.float16).astype(np.float64))
    bf = np.abs(nz.astype(ml_dtypes.bfloat16).astype(np.float64))
    assert r.fp16_overflow == int(np.count_nonzero(np.isinf(f16))) == 4
    assert r.fp16_subnormal == int(np.count_nonzero(f16 < np.finfo(np.float16).tiny)) == 4
    assert r.bf16_overflow == int(np.count_nonzero(np.isinf(bf))) == 2
    assert r.bf16_subnormal == int(np.count_nonzero(bf < F32_TINY)) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_flush_array_and_raw_scan(dtype: type) -> None:
    from bnfold.denormals import _onnx_has_subnormal

    tiny = np.finfo(dtype).tiny
    a = np.array([0.0, -0.0, tiny, -tiny / 4, tiny / 2, 1.0, -2.0, np.inf], dtype=dtype)
    out, n = flush_array(a)
    assert n == 2 and count_subnormal(a) == 2 and count_subnormal(out) == 0
    assert np.array_equal(out[[0, 1, 2, 5, 6, 7]], a[[0, 1, 2, 5, 6, 7]]) and out[3] == out[4] == 0
    t = numpy_helper.from_array(a, "t")
    assert _onnx_has_subnormal(t) and not _onnx_has_subnormal(numpy_helper.from_array(out, "t"))
    big = np.ones(200_000, dtype=dtype)  # more than one scan chunk; the subnormal in the last one
    big[-1] = tiny / 2
    assert _onnx_has_subnormal(numpy_helper.from_array(big, "b"))


def test_bfloat16_initializer_scan() -> None:
    from bnfold.denormals import _onnx_has_subnormal

    a = np.array([1.0, 1e-39, 0.0], dtype=np.float32)
    t = onnx.helper.make_tensor(
        "t", TensorProto.BFLOAT16, [3], a.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True
    )
    assert _onnx_has_subnormal(t)


def test_exported_program_flush_keeps_original() -> None:
    m = _sick_module()
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(m, (x,))
    before = {k: v.detach().clone() for k, v in ep.state_dict.items()}
    kept = bnfold.fold(ep, flush_denormals=False)
    out, rep = bnfold.fold_with_report(ep)
    assert all(torch.equal(before[k], v) for k, v in ep.state_dict.items()), (
        "the original program was changed"
    )
    n_kept = sum(_np_subnormal(v.detach().numpy()) for v in kept.state_dict.values() if v.is_floating_point())
    n_out = sum(_np_subnormal(v.detach().numpy()) for v in out.state_dict.values() if v.is_floating_point())
    n_orig = sum(_np_subnormal(v.detach().numpy()) for v in ep.state_dict.values() if v.is_floating_point())
    assert n_out == 0 < n_orig  # the gammas 1e-39 / 3e-39 are gone with their BNs
    assert rep.flushed_denormals == n_kept > 0
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double())
        got = out.module()(x).double()
    assert float((got - ref).abs().max()) <= TOL_F32 * float(ref.abs().max())


def test_torch_source_to_onnx_flushes_the_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from bnfold.files import FoldSettings, InputSettings, LoadSettings, fold_file

    m = _sick_module()
    src, dst = tmp_path / "m.pt", tmp_path / "m.onnx"
    torch.save(m, src)
    rep = fold_file(
        src, dst, FoldSettings(load=LoadSettings(trust_pickle=True), inputs=InputSettings(["x=2x3x6x6"]))
    )
    assert rep.verification is not None and rep.verification.passed
    assert rep.flushed_denormals and rep.flushed_denormals > 0
    folded = onnx.load(str(dst))
    assert sum(_np_subnormal(numpy_helper.to_array(t)) for t in folded.graph.initializer) == 0


def test_float16_subnormals_are_reported_not_flushed() -> None:
    g = G(dtype=TensorProto.FLOAT16)
    g.input("x", [1, 3, 6, 6])
    g.output("y")
    g.rand("w", (4, 3, 3, 3), scale=0.05)
    g.node("Conv", ["x", "w"], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    m = g.model()
    gamma = next(t for t in m.graph.initializer if t.name == "bn.gamma")
    gm = numpy_helper.to_array(gamma).astype(np.float32)
    gm[0] = 1e-3  # folded weights ~5e-5: subnormal in float16 (below 6.1e-5), normal in float32
    gamma.CopyFrom(numpy_helper.from_array(gm.astype(np.float16), "bn.gamma"))
    kept = bnfold.fold(m, flush_denormals=False)
    out, rep = bnfold.fold_with_report(m)
    (w_kept,), (w_out,) = _init(kept, "conv")[:1], _init(out, "conv")[:1]
    f16_sub = int(np.count_nonzero((w_kept != 0) & (np.abs(w_kept) < np.finfo(np.float16).tiny)))
    assert f16_sub > 0 and bnfold.health(m).subnormal >= f16_sub
    assert rep.flushed_denormals == 0 and np.array_equal(w_out, w_kept)
