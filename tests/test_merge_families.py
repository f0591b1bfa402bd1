"""Branch merging on faithful re-creations of the real families (models/reparam_families.py).

Each family's block or small network, with realistic BN statistics, is folded by bnfold in PyTorch
(``bnfold.fold_with_report``) and as the ONNX export of the unmerged model (``torch.onnx.export`` in
eval mode, BNs exported as BatchNormalization); the result must have no BN left, as many convs as the
family's own hand-written re-parameterisation leaves, outputs equal to the original's, and the original
untouched. Where bnfold cannot merge (a form its exporter or tracer does not expose as convs), the test
pins the reason and still checks the outputs.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import bnfold  # noqa: E402
from bnfold.onnx import fold_model  # noqa: E402
from bnfold.records import MergeReason, SkipReason  # noqa: E402
from models import reparam_families as rf  # noqa: E402
from models.onnx_graphs import run  # noqa: E402
from models.stats import randomize_bn  # noqa: E402

nn = torch.nn
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

# Families bnfold does not merge fully, with the reason.
# acnet_crop (PyTorch only): ACNet's padding < k//2 form feeds the 3x1/1x3 convs a slice of x
# (x[..., 1:-1]); the ONNX merge reads a Conv of a Slice as a conv of x with the crop as negative pads.
# dbb_*: DBB's BNAndPadLayer pads with the BN's shift by slice assignment (not traceable by fx; in ONNX
# a Pad + ScatterND construction bnfold does not read as a conv) and IdentityBasedConv1x1 is a functional
# conv of a computed weight. In ONNX the avg branch's BN merges with its AveragePool where the pool reads
# x itself (dbb_depthwise).
PARTIAL = {"acnet_crop", "dbb_block", "dbb_depthwise"}
ONNX_PARTIAL = {"dbb_block", "dbb_depthwise"}


def build(name: str, dtype: Any = torch.float32) -> tuple[Any, Any]:
    ctor, shape = rf.FAMILIES[name]
    torch.manual_seed(0)
    model = randomize_bn(ctor(), seed=1).eval().to(dtype)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return model, x


def hand_convs(model: Any) -> int:
    return rf.conv_count(rf.hand_reparameterize(copy.deepcopy(model)))


def state(model: Any) -> list[tuple[str, str, Any]]:
    return [
        (n, type(m).__name__, {k: v.clone() for k, v in m.state_dict().items()})
        for n, m in model.named_modules()
    ]


def same_state(a: list[Any], b: list[Any]) -> bool:
    return [(n, t, sorted(s)) for n, t, s in a] == [(n, t, sorted(s)) for n, t, s in b] and all(
        torch.equal(sa[k], sb[k]) for (_, _, sa), (_, _, sb) in zip(a, b) for k in sa
    )


def rel_err(want: Any, got: Any) -> float:
    want, got = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
    return float(np.abs(want - got).max()) / max(1.0, float(np.abs(want).max()))


def export(model: Any, x: Any) -> Any:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        input_names=["x"],
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
    )
    return onnx.load_from_string(buf.getvalue())


def ops(m: Any, op: str) -> int:
    return sum(1 for n in m.graph.node if n.op_type == op)


def torch_case(name: str, dtype: Any) -> None:
    model, x = build(name, dtype)
    before = state(model)
    with torch.no_grad():
        want = model(x)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert same_state(before, state(model)), "the original model was changed"
    with torch.no_grad():
        assert rel_err(want, out(x)) <= TOL[dtype]
    if name in PARTIAL:
        return
    assert rf.bn_count(out) == 0 and rep.bn_after == 0
    assert rf.conv_count(out) == hand_convs(model) == rep.convs_after <= rep.convs_before


def onnx_case(name: str, dtype: Any) -> None:
    model, x = build(name, dtype)
    m = export(model, x)
    before = m.SerializeToString()
    out, rep = fold_model(m)
    assert m.SerializeToString() == before, "the input model was changed"
    feeds = {"x": x.numpy()}
    want, got = run(m, feeds), run(out, feeds)
    assert rel_err(want, got) <= TOL[dtype]
    if name in ONNX_PARTIAL:
        return
    assert ops(out, "BatchNormalization") == 0 and rep.bn_after == 0
    assert ops(out, "Conv") == hand_convs(model) == rep.convs_after <= rep.convs_before


@pytest.mark.parametrize("name", sorted(rf.FAMILIES))
def test_family_merges_like_its_own_reparameterisation_in_pytorch(name: str) -> None:
    torch_case(name, torch.float32)


@pytest.mark.parametrize("name", sorted(rf.FAMILIES))
def test_family_merges_like_its_own_reparameterisation_in_onnx(name: str) -> None:
    onnx_case(name, torch.float32)


F64_BLOCKS = [
    "timm_repvgg_dilated_groups",
    "mobileone_byobnet_dw",
    "mobileone_block_k4_se",
    "fastvit_repmixer",
    "fastvit_large_kernel",
    "repvit_repvggdw",
    "ppyoloe_block",
    "yolov6_qarepvgg_v2",
    "acnet_k5_stride2",
]


@pytest.mark.parametrize("name", F64_BLOCKS)
def test_float64_family_merges_to_rounding(name: str) -> None:
    torch_case(name, torch.float64)
    onnx_case(name, torch.float64)


def test_partial_families_say_why() -> None:
    """DBB's faithful block: the BNs bnfold leaves carry the reason (fx cannot trace BNAndPadLayer's slice
    assignment; in ONNX its Pad + ScatterND is no conv: the avg branch's BN is left, and both branches that
    pass through it get a verdict naming the ops)."""
    model, x = build("dbb_block")
    _, rep = bnfold.fold_with_report(model, example_inputs=x)
    assert rep.bn_after == 5 and {s.reason for s in rep.skips} == {SkipReason.NOT_TRACEABLE}
    _, orep = fold_model(export(model, x))
    assert [(s.bn, s.reason) for s in orep.skips] == [
        ("/dbb_avg/avgbn/BatchNormalization", SkipReason.NO_PRODUCER)
    ]
    (mg,) = orep.merges
    assert mg.merged and [(b.branch, b.merged, b.reason) for b in mg.branches] == [
        ("/dbb_origin/conv/Conv", True, None),
        ("/dbb_1x1/conv/Conv", True, None),
        ("/dbb_avg/avgbn/BatchNormalization", False, MergeReason.UNSUPPORTED),
        ("/dbb_1x1_kxk/conv2/Conv", False, MergeReason.UNSUPPORTED),
    ]
    assert all("ScatterND" in b.detail and "reads 'x' through" in b.detail for b in mg.branches[2:])


def test_dbb_depthwise_avg_branch_merges_with_its_bn_in_onnx() -> None:
    """DBB with groups == channels: the avg branch is AvgPool(x) -> BN, merged into the kxk conv with its
    BN (no BN left); the 1x1 -> BNAndPad -> kxk branch (Pad + ScatterND in ONNX) stays: 3 convs, not 1."""
    model, x = build("dbb_depthwise")
    m = export(model, x)
    out, rep = fold_model(m)
    assert rep.bn_after == 0 and ops(out, "BatchNormalization") == 0 and ops(out, "AveragePool") == 0
    assert ops(out, "Conv") == rep.convs_after == 3 and hand_convs(model) == 1
    assert [(mg.merged, [(b.branch, b.kind, b.merged) for b in mg.branches]) for mg in rep.merges] == [
        (
            True,
            [
                ("/dbb_origin/conv/Conv", "conv", True),
                ("/dbb_avg/avgbn/BatchNormalization", "avgpool", True),
                ("/dbb_1x1_kxk/conv2/Conv", "other", False),
            ],
        )
    ]
    assert "ScatterND" in rep.merges[0].branches[2].detail
    site = next(v for v in rep.sites if v.bn == "/dbb_avg/avgbn/BatchNormalization")
    assert site.target == "/dbb_origin/conv/Conv" and "merged" in site.detail
    assert rel_err(run(m, {"x": x.numpy()}), run(out, {"x": x.numpy()})) <= TOL[torch.float32]


# ---- the rules the families needed, and their limits ----------------------------------------------


class DilatedWithAsymmetric(nn.Module):
    """3x3 dilation 2 + a 3x1 of dilation 1 (same output size): the 3x1's taps are not the 3x3's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 2, 2, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, (3, 1), 1, (1, 0), bias=False), nn.BatchNorm2d(4))

    def forward(self, x: Any) -> Any:
        return self.a(x) + self.b(x)


def test_dilation_differs_on_an_axis_with_several_taps_is_refused() -> None:
    torch.manual_seed(0)
    model = randomize_bn(DilatedWithAsymmetric(), seed=1).eval()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        want = model(x)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    with torch.no_grad():
        assert rel_err(want, out(x)) <= 1e-5
    assert rf.conv_count(out) == 2
    refused = {b.branch: b.reason for mg in rep.merges for b in mg.branches if not b.merged}
    assert refused["b.0"] == MergeReason.DILATION
    o, orep = fold_model(export(model, x))
    assert ops(o, "Conv") == 2
    assert MergeReason.DILATION in {b.reason for mg in orep.merges for b in mg.branches}
    assert rel_err(run(export(model, x), {"x": x.numpy()}), run(o, {"x": x.numpy()})) <= 1e-5


class ActIdentityBranch(nn.Module):
    """conv3x3+BN plus a BatchNormAct2d *with* its ReLU on x: the identity branch is not linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = rf.ConvNormAct(4, 4, 3)
        self.identity = rf.BatchNormAct2d(4, apply_act=True)

    def forward(self, x: Any) -> Any:
        return self.conv(x) + self.identity(x)


def test_bn_subclass_with_an_activation_is_not_merged() -> None:
    torch.manual_seed(0)
    model = randomize_bn(ActIdentityBranch(), seed=1).eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        want = model(x)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    with torch.no_grad():
        assert rel_err(want, out(x)) <= 1e-5
    refused = {b.branch: b.reason for mg in rep.merges for b in mg.branches if not b.merged}
    assert refused.get("identity") == MergeReason.NONLINEAR


def test_export_onnx_of_a_family_network_merges(tmp_path: Any) -> None:
    """bnfold.export_onnx (PyTorch fold, export, ONNX fold, verify) on a whole MobileOne-S0 network."""
    model, x = build("mobileone_s0_net")
    with torch.no_grad():
        want = model(x).numpy()
    path = tmp_path / "m.onnx"
    bnfold.export_onnx(model, x, str(path))
    m = onnx.load(str(path))
    assert ops(m, "Conv") == hand_convs(model) and ops(m, "BatchNormalization") == 0
    assert rel_err(want, run(m, {m.graph.input[0].name: x.numpy()})) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


class _ScaledInput(nn.BatchNorm2d):
    def forward(self, x: Any) -> Any:
        return nn.functional.batch_norm(
            x * 2, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class _Shifted(nn.BatchNorm2d):
    def forward(self, x: Any) -> Any:
        y = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return y + 1


class _ComputedVar(nn.BatchNorm2d):
    def forward(self, x: Any) -> Any:
        var = self.running_var * 2
        return nn.functional.batch_norm(
            x, self.running_mean, var, self.weight, self.bias, False, 0.0, self.eps
        )


class _Renamed(nn.BatchNorm2d):
    pass


class _SubclassIdentity(nn.Module):
    def __init__(self, cls: Any) -> None:
        super().__init__()
        self.c = nn.Sequential(nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4))
        self.i = cls(4)

    def forward(self, x: Any) -> Any:
        return self.c(x) + self.i(x)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (_ScaledInput, MergeReason.UNSUPPORTED),
        (_Shifted, MergeReason.NONLINEAR),
        (_ComputedVar, MergeReason.UNSUPPORTED),
        (_Renamed, None),
    ],
)
def test_bn_subclass_identity_branch_merges_only_as_a_plain_bn(cls: Any, reason: Any) -> None:
    torch.manual_seed(0)
    model = randomize_bn(_SubclassIdentity(cls), seed=1).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = model(x)
    out, rep = bnfold.fold_with_report(model, example_inputs=x)
    with torch.no_grad():
        assert rel_err(want, out(x)) <= 1e-5
    got = {b.branch: b.reason for mg in rep.merges for b in mg.branches}
    assert got["i"] == reason
    assert rf.conv_count(out) == 1 and rep.bn_after == (0 if reason is None else 1)
