"""Branch merging in ONNX graphs (bnfold.onnx.merge): re-parameterisable blocks become one Conv.

Each block of models/reparam.py is exported in eval mode with realistic BN statistics; the fold must
leave as many Convs as the block's own hand-written re-parameterisation (exported the same way), no BN,
and outputs equal to the original run in onnxruntime with optimisations off. Refusals are built so that a
merge would be wrong (different strides, a branch read elsewhere, a kernel off the taps, an activation).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import onnx
import pytest

from bnfold.onnx import fold_model
from bnfold.records import MergeReason
from models.onnx_graphs import G, assert_close, run

torch = pytest.importorskip("torch")

from models import reparam  # noqa: E402
from models.stats import randomize_bn  # noqa: E402
from models.testing import ATOL_F32, ATOL_F64  # noqa: E402

# float32: the merged conv sums the branches' products in one accumulation instead of several plus an
# Add: a few ulps of the output scale (~1e-7 each) over a 3x3xC dot product.
TOL32 = ATOL_F32  # models.testing: the one tolerance table
# float64: the same argument at 2e-16 per ulp.
TOL64 = ATOL_F64  # models.testing: the one tolerance table


def export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
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


def signature(m: onnx.ModelProto) -> list[str]:
    """Ops with attributes and constant input shapes, order-free: two graphs with the same signature do
    the same work (so run as fast)."""
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    return sorted(
        repr(
            (
                n.op_type,
                sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute),
                [inits.get(i) for i in n.input],
            )
        )
        for n in m.graph.node
    )


def ops(m: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in m.graph.node if n.op_type == op)


class RepVGGStage(torch.nn.Module):
    """A RepVGG-A stage: a strided block (no identity) then blocks with the identity BN."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.Sequential(
            reparam.RepVGGBlock(4, 8, stride=2),
            reparam.RepVGGBlock(8, 8),
            reparam.RepVGGBlock(8, 8, groups=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def reparameterize(self) -> None:
        for b in self.blocks:
            b.reparameterize()


class MobileOneS0Unit(torch.nn.Module):
    """MobileOne-S0's unit: a depthwise block (k over-parameterised 3x3, 1x1 scale, BN skip) then a
    pointwise block (k 1x1 branches, BN skip)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = reparam.MobileOneBlock(c, c, 3, groups=c, branches=4)
        self.pw = reparam.MobileOneBlock(c, c, 1, branches=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))

    def reparameterize(self) -> None:
        self.dw.reparameterize()
        self.pw.reparameterize()


BLOCKS = {
    "repvgg": lambda: reparam.RepVGGBlock(8, 8),
    "repvgg_groups": lambda: reparam.RepVGGBlock(8, 8, groups=4),
    "repvgg_stage": RepVGGStage,
    "mobileone_dw": lambda: reparam.MobileOneBlock(8, 8, 3, groups=8),
    "mobileone_pw_widen": lambda: reparam.MobileOneBlock(8, 16, 1),
    "mobileone_s0_unit": MobileOneS0Unit,
    "ppyoloe_alpha": lambda: reparam.PPYoloeRepVggBlock(8, 8),
    "repvit_bn_on_sum": lambda: reparam.RepVGGDW(8),
    "fastvit_repmixer": lambda: reparam.RepMixer(8),
    "dbb_avgpool": lambda: reparam.AvgBranchBlock(8),
    "dbb_four_branches": lambda: reparam.DBBLike(8),
    "acnet": lambda: reparam.ACBlock(4, 8),
}


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(BLOCKS[name](), seed=1).eval().to(dtype)
    cin = 4 if name in ("acnet", "repvgg_stage") else 8
    x = torch.randn(2, cin, 7, 7, generator=torch.Generator().manual_seed(2), dtype=dtype)
    return model, x


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_merges_like_its_own_reparameterisation(name: str) -> None:
    model, x = build(name)
    m = export(model, x)
    before = m.SerializeToString()
    out, rep = fold_model(m)
    assert m.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(out, full_check=True)
    hand = copy.deepcopy(model)
    hand.reparameterize()  # type: ignore[operator]
    ref = export(hand, x)
    assert ops(out, "Conv") == ops(ref, "Conv") == rep.convs_after
    assert ops(out, "BatchNormalization") == 0 and rep.bn_after == 0
    assert ops(out, "Add") == ops(ref, "Add")
    assert signature(out) == signature(ref)  # the hand-merged graph, node for node
    assert rep.convs_before == ops(m, "Conv") >= rep.convs_after and len(out.graph.node) < len(m.graph.node)
    assert all(mg.merged for mg in rep.merges) and rep.merges
    assert [o.name for o in out.graph.output] == [o.name for o in m.graph.output]
    feeds = {"x": x.numpy()}
    want = run(m, feeds)
    assert_close(want, run(out, feeds), TOL32)
    assert_close(want, run(ref, feeds), TOL32)  # the hand-written merge agrees too


@pytest.mark.parametrize("name", ["repvgg_stage", "mobileone_dw", "repvit_bn_on_sum", "ppyoloe_alpha"])
def test_float64_block_merges_to_rounding(name: str) -> None:
    model, x = build(name, torch.float64)
    m = export(model, x)
    out, rep = fold_model(m)
    assert rep.bn_after == 0 and all(mg.merged for mg in rep.merges)
    feeds = {"x": x.numpy()}
    assert_close(run(m, feeds), run(out, feeds), TOL64)


def test_merge_verdicts_name_every_branch_and_the_absorbed_bn() -> None:
    model, x = build("repvgg")
    m = export(model, x)
    _, rep = fold_model(m)
    (mg,) = rep.merges
    assert mg.input == "x" and mg.convs_before == 2 and mg.convs_after == 1 and mg.branches_merged == 3
    assert sorted(b.kind for b in mg.branches) == ["bn", "conv", "conv"]
    identity_bn = [v for v in rep.sites if "rbr_identity" in v.bn]
    assert len(identity_bn) == 1 and identity_bn[0].target == mg.target and "merged" in identity_bn[0].detail
    d = rep.to_dict()["merges"][0]
    assert d["merged"] is True and d["branches_merged"] == 3


def test_merge_branches_false_keeps_the_branches() -> None:
    model, x = build("repvgg")
    m = export(model, x)
    out, rep = fold_model(m, merge_branches=False)
    assert rep.merges == () and ops(out, "Conv") == 2 and ops(out, "BatchNormalization") == 1


def test_dry_run_predicts_the_merge() -> None:
    import bnfold

    model, x = build("repvit_bn_on_sum")
    m = export(model, x)
    before = m.SerializeToString()
    rep = bnfold.inspect(m)
    assert m.SerializeToString() == before
    _, real = fold_model(m)
    assert rep.bn_after == real.bn_after == 0 and rep.convs_after == real.convs_after == 1
    assert [g.to_dict() for g in rep.merges] == [g.to_dict() for g in real.merges]


def test_other_leaves_of_the_sum_stay() -> None:
    # conv3x3(x) + y + conv1x1(x): the two convs of x merge; y is added to the merged conv.
    g = G()
    x = g.input("x", [2, 4, 6, 6])
    y = g.input("y", [2, 5, 6, 6])
    g.node("Conv", [x, g.rand("w3", (5, 4, 3, 3)), g.rand("b3", (5,))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("Conv", [x, g.rand("w1", (5, 4, 1, 1))], ["b"], name="k1")
    g.node("Mul", ["b", g.rand("s", (5, 1, 1))], ["bs"], name="scale")
    g.node("Add", ["a", y], ["t"], name="add1")
    g.node("Add", ["t", "bs"], ["z"], name="add2")
    g.output("z")
    m = g.model()
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Add"]
    (mg,) = rep.merges
    assert mg.merged and mg.sum == "add2" and mg.branches_merged == 2
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 4, 6, 6)).astype(np.float32),
        "y": rng.standard_normal((2, 5, 6, 6)).astype(np.float32),
    }
    assert_close(run(m, feeds), run(out, feeds), TOL32)


# ---- refusals: each branch gets the right reason, the model stays as it was folded -------------------
def refused(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[MergeReason | None, str]]:
    before = m.SerializeToString()
    out, rep = fold_model(m)
    assert m.SerializeToString() == before
    assert rep.convs_after == rep.convs_before
    (mg,) = rep.merges
    assert not mg.merged and mg.target == ""
    assert_close(run(m, feeds), run(out, feeds), TOL32)
    return {b.branch: (b.reason, b.detail) for b in mg.branches}


def test_different_strides_are_refused() -> None:
    # On a width-1 input a 1x1 of stride (1, 2) gives the same shape as a 3x3 of stride 1: merging would be wrong.
    g = G()
    x = g.input("x", [1, 4, 6, 1])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("Conv", [x, g.rand("w1", (4, 4, 1, 1))], ["b"], name="k1", strides=[1, 2])
    g.node("Add", ["a", "b"], ["z"], name="sum")
    g.output("z")
    why = refused(g.model(), {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 1)).astype(np.float32)})
    assert why["k1"][0] is MergeReason.STRIDE and "stride [1, 2] differs from [1, 1]" in why["k1"][1]
    assert why["k3"][0] is MergeReason.NO_PARTNER


def test_kernel_off_the_taps_is_refused() -> None:
    # 3x3 dilation 2 reads x[o-2], x[o], x[o+2]; a 2x2 dilation 2 with pads 1 reads x[o-1], x[o+1].
    g = G()
    x = g.input("x", [1, 4, 7, 7])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3))], ["a"], name="k3", pads=[2, 2, 2, 2], dilations=[2, 2])
    g.node("Conv", [x, g.rand("w2", (4, 4, 2, 2))], ["b"], name="k2", pads=[1, 1, 1, 1], dilations=[2, 2])
    g.node("Add", ["a", "b"], ["z"], name="sum")
    g.output("z")
    why = refused(g.model(), {"x": np.random.default_rng(0).standard_normal((1, 4, 7, 7)).astype(np.float32)})
    assert why["k2"][0] is MergeReason.KERNEL and "cannot be centred" in why["k2"][1]


def test_even_kernel_placed_by_its_padding_merges() -> None:
    # A 2x2 with pads (1, 0) reads x[o-1], x[o]: the first two taps of a 3x3 with pads 1. Exact.
    g = G()
    x = g.input("x", [1, 4, 7, 7])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("Conv", [x, g.rand("w2", (4, 4, 2, 2))], ["b"], name="k2", pads=[1, 1, 0, 0])
    g.node("Add", ["a", "b"], ["z"], name="sum")
    g.output("z")
    m = g.model()
    out, rep = fold_model(m)
    assert rep.merges[0].merged and ops(out, "Conv") == 1
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 7, 7)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_branch_read_elsewhere_is_refused() -> None:
    torch.manual_seed(0)
    model = randomize_bn(reparam.BranchReadElsewhere(8), seed=1).eval()
    x = torch.randn(2, 8, 6, 6)
    why = refused(export(model, x), {"x": x.numpy()})
    ((reason, detail),) = [v for k, v in why.items() if k.startswith("/b/")]
    assert reason is MergeReason.OTHER_CONSUMERS and "also read by /Relu" in detail


def test_activation_inside_a_branch_is_refused() -> None:
    torch.manual_seed(0)
    model = randomize_bn(reparam.ActivationInBranch(8), seed=1).eval()
    x = torch.randn(2, 8, 6, 6)
    why = refused(export(model, x), {"x": x.numpy()})
    ((reason, detail),) = [v for k, v in why.items() if k.startswith("/b/")]
    assert reason is MergeReason.NONLINEAR and "Relu" in detail


def test_avgpool_without_counted_padding_is_refused() -> None:
    # count_include_pad=0 divides edge windows by fewer values: not a uniform conv kernel.
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("AveragePool", [x], ["b"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.node("Add", ["a", "b"], ["z"], name="sum")
    g.output("z")
    why = refused(g.model(), {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)})
    assert why["pool"][0] is MergeReason.PADDING and "count_include_pad=0" in why["pool"][1]


def test_resnet_block_is_not_a_candidate() -> None:
    # conv2(relu(conv1(x))) + x: no two branches read one tensor (a sequential branch is no merge).
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    g.node("Conv", [x, g.rand("w1", (4, 4, 3, 3))], ["a"], name="c1", pads=[1, 1, 1, 1])
    g.node("Relu", ["a"], ["r"])
    g.node("Conv", ["r", g.rand("w2", (4, 4, 3, 3))], ["b"], name="c2", pads=[1, 1, 1, 1])
    g.node("Add", ["b", x], ["z"], name="sum")
    g.output("z")
    out, rep = fold_model(g.model())
    assert rep.merges == () and ops(out, "Conv") == 2


def test_float16_model_merges_within_its_precision() -> None:
    # float16 is a model precision: the merged weight is rounded to 11 bits once (like the hand merge in
    # float16), against a reference that rounds every branch and the sum in float16.
    model, x = build("repvgg")
    m = export(model, x)
    from onnx import numpy_helper

    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    out, rep = fold_model(m)
    assert rep.merges[0].merged and ops(out, "Conv") == 1 and rep.bn_after == 0
    assert {t.data_type for t in out.graph.initializer} == {onnx.TensorProto.FLOAT16}
    feeds = {"x": x.numpy().astype(np.float16)}
    assert_close(run(m, feeds), run(out, feeds), 1e-2)


def test_cli_fold_merges_and_no_merge_branches(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    model, x = build("mobileone_dw")
    src = tmp_path / "m.onnx"
    onnx.save(export(model, x), str(src))
    before = src.read_bytes()
    runner = CliRunner()
    r = runner.invoke(app, ["fold", str(src), str(tmp_path / "out.onnx"), "--json"])
    assert r.exit_code == 0, r.stdout
    doc = json.loads(r.stdout)
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(
        resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8")
    )
    jsonschema.validate(doc, schema)
    s = doc["summary"]
    assert (s["merges"], s["branches_merged"], s["convs_before"], s["convs_after"]) == (1, 6, 5, 1)
    assert doc["merges"][0]["merged"] is True and doc["verification"]["passed"] is True
    assert ops(onnx.load(str(tmp_path / "out.onnx")), "Conv") == 1
    r = runner.invoke(app, ["fold", str(src), str(tmp_path / "keep.onnx"), "--json", "--no-merge-branches"])
    assert r.exit_code == 0, r.stdout
    doc = json.loads(r.stdout)
    assert doc["summary"]["merges"] == 0 and doc["merges"] == [] and doc["summary"]["convs_after"] == 5
    r = runner.invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["summary"]["convs_after"] == 1
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx", "m.onnx", "out.onnx"]


def test_excluded_merge_is_left_with_its_reason() -> None:
    # Culprit bisection leaves a merge whose verification failed by its sum label, like a BN.
    model, x = build("repvgg")
    m = export(model, x)
    _, first = fold_model(m)
    (mg,) = first.merges
    out, rep = fold_model(m, exclude={mg.sum})
    (left,) = rep.merges
    assert not left.merged and all(b.reason is MergeReason.VERIFICATION for b in left.branches)
    assert ops(out, "Conv") == 2
    feeds = {"x": x.numpy()}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


# ---- Case 5: Conv 1x1 -> Conv kxk inside a branch (DBB) --------------------------------------------------
def seq_graph(*, pads: int, bn_between: bool, bias1: bool) -> onnx.ModelProto:
    g = G(seed=3)
    x = g.input("x", [2, 4, 7, 7])
    p = [pads] * 4
    g.node("Conv", [x, g.rand("w3", (6, 4, 3, 3)), g.rand("b3", (6,))], ["a"], name="k3", pads=p)
    g.node(
        "Conv", [x, g.rand("w1", (5, 4, 1, 1)), *([g.rand("b1", (5,))] if bias1 else [])], ["m"], name="k1"
    )
    if bn_between:
        g.bn("m", "mb", 5, "bn_mid")
    g.node("Conv", ["mb" if bn_between else "m", g.rand("w13", (6, 5, 3, 3))], ["b"], name="k1k3", pads=p)
    g.node("Add", ["a", "b"], ["z"], name="sum")
    g.output("z")
    return g.model()


@pytest.mark.parametrize(
    ("pads", "bn_between", "bias1"), [(1, False, False), (0, True, True), (0, False, True)]
)
def test_conv1x1_then_kxk_merges_where_no_padded_zero_is_read(
    pads: int, bn_between: bool, bias1: bool
) -> None:
    m = seq_graph(pads=pads, bn_between=bn_between, bias1=bias1)
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    (mg,) = rep.merges
    assert mg.merged and mg.convs_before == 3 and ops(out, "Conv") == 1 and rep.bn_after == 0
    assert sorted(b.kind for b in mg.branches) == ["conv", "seq"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 7, 7)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_conv1x1_with_shift_then_padded_kxk_is_refused() -> None:
    # The BN between folds into the 1x1 as a bias; the 3x3 pads with zeros where that bias is missing.
    m = seq_graph(pads=1, bn_between=True, bias1=False)
    why = refused(m, {"x": np.random.default_rng(0).standard_normal((2, 4, 7, 7)).astype(np.float32)})
    assert why["k1k3"][0] is MergeReason.PADDING and "pads [1, 1, 1, 1] with zeros" in why["k1k3"][1]


def scaled_identity_block(g: G, x: str, pre: str = "") -> str:
    """Sum(conv3x3(x), conv1x1(x), bn(x), alpha * x) -> BN: four branch kinds and a BN on the sum."""
    g.node("Conv", [x, g.rand(pre + "w3", (4, 4, 3, 3))], [pre + "a"], name=pre + "k3", pads=[1, 1, 1, 1])
    g.node("Conv", [x, g.rand(pre + "w1", (4, 4, 1, 1))], [pre + "b"], name=pre + "k1")
    g.bn(x, pre + "c", 4, pre + "bn_id")
    g.node("Mul", [x, g.rand(pre + "alpha", (1,))], [pre + "d"], name=pre + "scaled_id")
    g.node("Sum", [pre + "a", pre + "b", pre + "c", pre + "d"], [pre + "s"], name=pre + "sum")
    g.bn(pre + "s", pre + "y", 4, pre + "bn_sum")
    return pre + "y"


@pytest.mark.parametrize("ir_version", [3, 8])
def test_sum_of_four_kinds_then_bn_is_one_conv(ir_version: int) -> None:
    g = G()
    g.output(scaled_identity_block(g, g.input("x", [1, 4, 5, 5])))
    m = g.model(ir_version=ir_version)
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Conv"] and rep.bn_after == 0
    assert all(v.folded for v in rep.verdicts)
    (mg,) = rep.merges
    assert sorted(b.kind for b in mg.branches) == ["bn", "conv", "conv", "identity"]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_merge_inside_an_if_branch() -> None:
    from onnx import TensorProto, helper

    g = G()
    g.input("x", [1, 4, 5, 5])
    cond = g.input("c", [], TensorProto.BOOL)
    sub = G(seed=1)
    y = scaled_identity_block(sub, "x", "t_")
    then = helper.make_graph(
        sub.nodes, "then", [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], sub.inits
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_y"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_y", TensorProto.FLOAT, None)],
    )
    g.node("If", [cond], ["z"], name="if", then_branch=then, else_branch=other)
    g.output("z", shape=[1, 4, 5, 5])
    m = g.model()
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert [mg.sum for mg in rep.merges if mg.merged] == ["if/then_branch/t_sum"] and rep.bn_after == 0
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["Conv"]
    feeds = {
        "x": np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32),
        "c": np.array(True),
    }
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_pytorch_fold_names_the_blocks_own_reparameterisation_and_does_not_call_it() -> None:
    import bnfold

    model, x = build("repvgg_stage")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, rep = bnfold.fold_with_report(model, example_inputs=x)
    note = [n for n in rep.notes if "own re-parameterisation" in n]
    assert len(note) == 1 and "reparameterize() on 4 module(s)" in note[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(b.rbr_reparam is None for b in model.blocks)  # type: ignore[union-attr]
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_identity_nodes_inside_branches_are_walked() -> None:
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("Identity", ["a"], ["a2"], name="id_a")
    g.node("Identity", [x], ["x2"], name="id_x")
    g.node("Add", ["a2", "x2"], ["z"], name="sum")
    g.output("z")
    m = g.model()
    out, rep = fold_model(m)
    assert [n.op_type for n in out.graph.node] == ["Conv"] and rep.merges[0].merged
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_pytorch_file_to_onnx_merges_the_exported_blocks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import bnfold.files as files

    model, x = build("repvgg_stage")
    src = tmp_path / "m.pt"
    torch.save(model, src)
    rep = files.fold_file(
        src,
        tmp_path / "m.onnx",
        files.FoldSettings(
            load=files.LoadSettings(trust_pickle=True), inputs=files.InputSettings(input_shapes=["x=2x4x7x7"])
        ),
    )
    out = onnx.load(str(tmp_path / "m.onnx"))
    assert ops(out, "Conv") == 3 and ops(out, "BatchNormalization") == 0
    assert (
        sum(mg.merged for mg in rep.merges) == 3 and rep.verification is not None and rep.verification.passed
    )


def test_sub_and_a_constant_leaf_merge_into_the_bias() -> None:
    # (conv3(x) - bn(x)) * s + c + conv1(x): signs, a scaled inner sum and a constant leaf.
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.bn(x, "n", 4, "bn_id")
    g.node("Sub", ["a", "n"], ["d"], name="sub")
    g.node("Mul", [g.rand("s", (4, 1, 1)), "d"], ["ds"], name="scale")
    g.node("Add", ["ds", g.rand("c", (4, 1, 1))], ["e"], name="add_c")
    g.node("Conv", [x, g.rand("w1", (4, 4, 1, 1))], ["b"], name="k1")
    g.node("Add", ["e", "b"], ["z"], name="sum")
    g.output("z")
    m = g.model()
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node] == ["Conv"] and rep.merges[0].merged and rep.bn_after == 0
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_subtracted_leaf_of_another_tensor_refuses_the_merge() -> None:
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    y = g.input("y", [1, 4, 5, 5])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("Conv", [x, g.rand("w1", (4, 4, 1, 1))], ["b"], name="k1")
    g.node("Add", ["a", "b"], ["s"], name="add")
    g.node("Sub", ["s", y], ["z"], name="sub")
    g.output("z")
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((1, 4, 5, 5)).astype(np.float32) for k in ("x", "y")}
    why = refused(g.model(), feeds)
    assert why["k3"][0] is MergeReason.UNSUPPORTED and "subtracts or scales 'y'" in why["k3"][1]


# ---- DBB's average-pool branch with its BN, ACNet's cropping form ----------------------------------


def pool_bn_graph(**pool: object) -> onnx.ModelProto:
    """conv3x3(x) + BN(AveragePool 3x3(x)) + x (DBB's avg branch with its BN, the identity)."""
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3)), g.rand("b3", (4,))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("AveragePool", [x], ["p"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], **pool)
    g.bn("p", "pb", 4, "avgbn")
    g.node("Add", ["a", "pb"], ["s"], name="sum1")
    g.node("Add", ["s", x], ["z"], name="sum2")
    g.output("z")
    return g.model()


def test_avgpool_then_bn_branch_merges() -> None:
    m = pool_bn_graph(count_include_pad=1)
    out, rep = fold_model(m)
    assert ops(out, "Conv") == 1 and ops(out, "BatchNormalization") == 0 and ops(out, "AveragePool") == 0
    (mg,) = rep.merges
    assert mg.merged and sorted(b.kind for b in mg.branches) == ["avgpool", "conv", "identity"]
    (site,) = rep.sites
    assert site.bn == "avgbn" and site.target == "k3" and "merged" in site.detail
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_avgpool_then_bn_without_counted_padding_is_refused() -> None:
    m = pool_bn_graph()
    out, rep = fold_model(m)
    mg = next(mg for mg in rep.merges if mg.sum == "sum2")
    assert mg.merged and ops(out, "Conv") == 1  # the conv and the identity merge; the pool branch stays
    why = {b.branch: (b.reason, b.detail) for b in mg.branches}
    assert why["avgbn"][0] is MergeReason.PADDING and "count_include_pad=0" in why["avgbn"][1]
    assert ops(out, "AveragePool") == 1 and ops(out, "BatchNormalization") == 1
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def crop_graph(
    starts: list[int], ends: list[int], kernel: tuple[int, int], pads: list[int]
) -> onnx.ModelProto:
    """conv3x3 pads 0 (x) + conv(kernel, pads)(Slice(x)[H axis starts:ends]): ACNet with padding < k // 2."""
    g = G()
    x = g.input("x", [1, 4, 9, 9])
    g.node("Conv", [x, g.rand("w3", (4, 4, 3, 3)), g.rand("b3", (4,))], ["a"], name="square")
    g.init("st", np.array(starts), np.int64)
    g.init("en", np.array(ends), np.int64)
    g.init("ax", np.array([2]), np.int64)
    g.node("Slice", [x, "st", "en", "ax"], ["xs"], name="crop")
    g.node("Conv", ["xs", g.rand("wk", (4, 4, *kernel))], ["b"], name="ver", pads=pads)
    g.node("Add", ["a", "b"], ["z"], name="sum")
    g.output("z")
    return g.model()


def test_conv_of_a_crop_merges_as_negative_pads() -> None:
    # x[:, :, 1:-1] then a 1x3 unpadded: the middle row of the 3x3's taps (ACNet's cropping form)
    m = crop_graph([1], [-1], (1, 3), [0, 0, 0, 0])
    out, rep = fold_model(m)
    assert ops(out, "Conv") == 1 and ops(out, "Slice") == 0 and rep.merges[0].merged
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype(np.float32)}
    assert_close(run(m, feeds), run(out, feeds), TOL32)


def test_conv_of_a_crop_that_pads_the_cropped_side_is_refused() -> None:
    # x[:, :, 1:-1] then a 3x3 padded 1 on H: it reads zeros where x has rows 0 and 8
    why = refused(
        crop_graph([1], [-1], (3, 3), [1, 0, 1, 0]),
        {"x": np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype(np.float32)},
    )
    assert why["ver"][0] is MergeReason.PADDING and "crops axis 2" in why["ver"][1]


def test_conv_of_a_crop_ending_at_a_fixed_index_is_refused() -> None:
    # x[:, :, 1:8]: its end depends on the input size, not a conv of x for every size
    why = refused(
        crop_graph([1], [8], (1, 3), [0, 0, 0, 0]),
        {"x": np.random.default_rng(0).standard_normal((1, 4, 9, 9)).astype(np.float32)},
    )
    assert why["ver"][0] is MergeReason.UNSUPPORTED and "counted from the end" in why["ver"][1]
