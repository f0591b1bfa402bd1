"""ONNX routes of issue 13: LinearNorm (MatMul -> Reshape/Flatten -> BN), BN on Concat and on sums of
layer branches, Conv -> Add(constant) -> BN, and Identity / Dropout between a BN and its neighbour.

Each fold is checked by running the original and the folded model (onnxruntime, optimisations off;
onnx's reference evaluator where onnxruntime has no double kernel), in float32 and float64 graphs, and
for the exported torch models against the torch module run in float64. Every rewritten model passes
``onnx.checker.check_model(full_check=True)``; the input model is never changed; each refusal is
asserted by its reason.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold.onnx import count_bn, fold_model
from bnfold.records import Direction, SkipReason
from models.onnx_graphs import TOL, G, assert_close, feeds_for, run
from models.testing import ATOL_F32

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
DTYPES = [F32, F64]
# Exported models vs the torch module in float64: the float32 model's own rounding over a few layers
# (each ~1e-7 relative), with margin for fan-in sums of up to 32 terms.
TORCH_TOL = ATOL_F32  # models.testing: the one tolerance table


def fold_ok(model: onnx.ModelProto, *, bn_after: int = 0, seeds: int = 2, tol: float | None = None):
    """Fold a copy; the input is unchanged, the checker passes, BN count as expected, outputs agree."""
    before = model.SerializeToString()
    out, rep = fold_model(model)
    assert model.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(out, full_check=True)
    assert len(rep.verdicts) == rep.bn_before == count_bn(model)
    assert rep.bn_after == count_bn(out) == bn_after, [v.to_dict() for v in rep.verdicts]
    assert [o.SerializeToString() for o in out.graph.output] == [
        o.SerializeToString() for o in model.graph.output
    ]
    elem = model.graph.output[0].type.tensor_type.elem_type
    for s in range(seeds):
        feeds = feeds_for(model, s)
        assert_close(run(model, feeds), run(out, feeds), tol if tol is not None else TOL[elem])
    return out, rep


def reason_of(model: onnx.ModelProto, bn: str = "bn") -> tuple[SkipReason, str]:
    out, rep = fold_model(model, dry_run=True)
    (v,) = [v for v in rep.verdicts if v.bn == bn]
    assert not v.folded, v.to_dict()
    return v.reason, v.detail  # type: ignore[union-attr]


def refused(model: onnx.ModelProto, bn: str = "bn") -> tuple[SkipReason, str]:
    """The reason and detail of ``bn``'s refusal, after checking that the fold leaves it and stays exact."""
    why = reason_of(model, bn)
    fold_ok(model, bn_after=1)
    return why


# ---- Case 6: LinearNorm ------------------------------------------------------------------------------
def linear_norm(
    dtype: int,
    *,
    bias: str = "",
    route: str = "reshape",
    b: int = 2,
    n: int = 5,
    k: int = 8,
    d: int = 12,
    opset_shape: list[int] | None = None,
    extra_reader: bool = False,
) -> G:
    g = G(dtype)
    x = g.input("x", [b, n, k])
    g.node("MatMul", [x, g.rand("w", (k, d))], ["mm"], name="mm")
    src = "mm"
    if bias:
        bb = g.rand("b", (d,) if bias != "scalar" else (1,))
        g.node("Add", [src, bb] if bias == "right" else [bb, src], ["mma"], name="add")
        src = "mma"
    if route == "reshape":
        target = opset_shape or [-1, d]
        g.node("Reshape", [src, g.init("shape", np.array(target), np.int64)], ["flat"], name="flatten")
    else:
        g.node("Flatten", [src], ["flat"], name="flatten", axis=int(route.split("=")[1]))
    g.bn("flat", "bnout", d, "bn")
    g.node("Reshape", ["bnout", g.init("back", np.array([b, n, -1]), np.int64)], ["y"], name="back")
    g.output("y")
    if extra_reader:
        g.node("Relu", [src], ["side"], name="side")
        g.output("side")
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", ["", "right", "left", "scalar"])
@pytest.mark.parametrize("route", ["reshape", "reshape3d", "flatten=2", "flatten=-1"])
def test_linear_norm_folds(dtype: int, bias: str, route: str) -> None:
    shape = [-1, 12, 1] if route == "reshape3d" else None
    g = linear_norm(dtype, bias=bias, route="reshape" if route == "reshape3d" else route, opset_shape=shape)
    if route == "reshape3d":  # BN over (B*N, D, 1): the back reshape reads it the same way
        pass
    out, rep = fold_ok(g.model())
    (site,) = rep.sites
    assert site.target == "mm" and site.direction is Direction.FORWARD
    ops = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in ops
    # Without a bias the shift stays as one Add in the BN's place; with one, it goes into that bias.
    assert ops.count("Add") == 1


@pytest.mark.parametrize("opset", [11, 13, 14, 15, 17, 19, 21])
def test_linear_norm_opsets(opset: int) -> None:
    fold_ok(linear_norm(F32).model(opset=opset))


def test_linear_norm_reshape_that_moves_the_channel_is_refused() -> None:
    # (2, 5, 12) -> (20, 6, 1)... as [-1, 6]: each row of 6 holds half of one token's features.
    g = G()
    g.node("MatMul", [g.input("x", [2, 5, 8]), g.rand("w", (8, 12))], ["mm"], name="mm")
    g.node("Reshape", ["mm", g.init("shape", np.array([-1, 6]), np.int64)], ["flat"], name="flatten")
    g.bn("flat", "y", 6, "bn")
    g.output("y")
    m = g.model()
    assert refused(m)[0] is SkipReason.LAYOUT


def test_linear_norm_computed_shape_is_refused() -> None:
    g = G()
    g.node("MatMul", [g.input("x", [2, 5, 8]), g.rand("w", (8, 12))], ["mm"], name="mm")
    g.node("Reshape", ["mm", g.input("shape", [2], TensorProto.INT64)], ["flat"], name="flatten")
    g.bn("flat", "y", 12, "bn")
    g.output("y")
    r, detail = reason_of(g.model())
    assert r is SkipReason.LAYOUT and "not a constant" in detail


def test_linear_norm_product_read_elsewhere_is_refused() -> None:
    m = linear_norm(F32, bias="right", extra_reader=True).model()
    assert refused(m)[0] is SkipReason.OTHER_CONSUMERS


def test_linear_norm_shape_reader_is_fine() -> None:
    # reshape_as(x) in torch exports Shape(x): it reads the (unchanged) shape only.
    g = linear_norm(F32)
    g.node("Shape", ["mm"], ["shp"], name="shape_of")
    g.outputs.append(helper.make_tensor_value_info("shp", TensorProto.INT64, [3]))
    fold_ok(g.model())


# ---- Case 8: Concat -------------------------------------------------------------------------------------
def concat_graph(dtype: int, *, axis: int = 1, shared: bool = False, extra: str = "") -> G:
    g = G(dtype)
    x = g.input("x", [2, 4, 6, 6])
    w = g.rand("w1", (3, 4, 3, 3))
    g.node("Conv", [x, w, g.rand("b1", (3,))], ["a"], name="conv1", pads=[1, 1, 1, 1])
    if shared:  # the same weight (and padding) as conv1
        g.node("Conv", [x, w], ["b"], name="conv2", pads=[1, 1, 1, 1])
    else:
        g.node("Conv", [x, g.rand("w2", (2, 4, 1, 1))], ["b"], name="conv2")
    grp = (
        2 if dtype == F32 else 1
    )  # onnx's reference evaluator (the float64 runner) mis-runs grouped ConvTranspose
    g.node(
        "ConvTranspose",
        [x, g.rand("w3", (4, 4 // grp, 3, 3))],
        ["c"],
        name="convt",
        group=grp,
        pads=[1, 1, 1, 1],
    )
    inputs = ["a", "b", "c"]
    ch = 3 + (3 if shared else 2) + 4
    if extra == "input":
        inputs.append("x")
        ch += 4
    if extra == "twice":
        inputs.append("a")
        ch += 3
    g.node("Concat", inputs, ["cat"], name="cat", axis=axis)
    g.bn("cat", "bnout", ch, "bn")
    g.node("Relu", ["bnout"], ["y"])
    g.output("y")
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -3])
def test_concat_of_convs_folds(dtype: int, axis: int) -> None:
    out, rep = fold_ok(concat_graph(dtype, axis=axis).model())
    (site,) = rep.sites
    assert site.target_kind == "Concat" and "conv1" in site.detail and "convt" in site.detail


def test_concat_shared_weight_is_copied_not_edited() -> None:
    m = concat_graph(F32, shared=True).model()
    w_before = next(t for t in m.graph.initializer if t.name == "w1").SerializeToString()
    out, _ = fold_ok(m)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]  # each slice got its own weight
    assert next(t for t in m.graph.initializer if t.name == "w1").SerializeToString() == w_before


def test_concat_of_gemms_folds() -> None:
    g = G()
    x = g.input("x", [3, 4])
    g.node("Gemm", [x, g.rand("w1", (4, 5)), g.rand("c1", (5,))], ["a"], name="g1", alpha=0.7, beta=1.3)
    g.node("Gemm", [x, g.rand("w2", (2, 4))], ["b"], name="g2", transB=1)
    g.node("Concat", ["a", "b"], ["cat"], name="cat", axis=-1)
    g.bn("cat", "y", 7, "bn")
    g.output("y")
    fold_ok(g.model())


def test_concat_on_another_axis_is_refused() -> None:
    g = G()
    x = g.input("x", [2, 4, 6, 6])
    g.node("Conv", [x, g.rand("w1", (4, 4, 1, 1))], ["a"], name="conv1")
    g.node("Conv", [x, g.rand("w2", (4, 4, 1, 1))], ["b"], name="conv2")
    g.node("Concat", ["a", "b"], ["cat"], name="cat", axis=2)
    g.bn("cat", "y", 4, "bn")
    g.output("y")
    m = g.model()
    assert refused(m)[0] is SkipReason.LAYOUT


@pytest.mark.parametrize(
    "extra,reason", [("input", SkipReason.UNFOLDABLE_BRANCH), ("twice", SkipReason.OTHER_CONSUMERS)]
)
def test_concat_refusals(extra: str, reason: SkipReason) -> None:
    m = concat_graph(F32, extra=extra).model()
    assert refused(m)[0] is reason


def test_concat_producer_read_elsewhere_is_refused() -> None:
    g = concat_graph(F32)
    g.node("Sigmoid", ["b"], ["side"])
    g.output("side")
    m = g.model()
    assert refused(m)[0] is SkipReason.OTHER_CONSUMERS


# ---- Case 9: sums of layer branches ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["Add", "Sum"])
def test_branch_sum_folds(dtype: int, op: str) -> None:
    g = G(dtype)
    x = g.input("x", [2, 4, 6, 6])
    g.node("Conv", [x, g.rand("w1", (5, 4, 3, 3)), g.rand("b1", (5,))], ["a"], name="k3", pads=[1, 1, 1, 1])
    g.node("Conv", [x, g.rand("w2", (5, 4, 1, 1))], ["b"], name="k1")
    inputs = ["a", "b"]
    if op == "Sum":
        g.node("ConvTranspose", [x, g.rand("w3", (4, 5, 1, 1))], ["c"], name="ct")
        inputs.append("c")
    g.node(op, inputs, ["s"], name="sum")
    g.bn("s", "y", 5, "bn")
    g.output("y")
    out, rep = fold_ok(g.model())
    assert rep.sites[0].target_kind == op
    # Then the two convs of x merge into one (bnfold.onnx.merge); the ConvTranspose branch is added to it.
    assert [n.op_type for n in out.graph.node] == (
        ["Conv"] if op == "Add" else ["Conv", "ConvTranspose", "Add"]
    )
    _, unmerged = fold_model(g.model(), merge_branches=False)
    assert unmerged.sites[0].target_kind == op and unmerged.merges == ()


def test_branch_sum_with_spatial_broadcast_folds() -> None:
    # A pooled branch (N, C, 1, 1) added to a full one: the shift still lands once per element.
    g = G()
    x = g.input("x", [2, 4, 6, 6])
    g.node("GlobalAveragePool", [x], ["p"])
    g.node("Conv", ["p", g.rand("w1", (5, 4, 1, 1)), g.rand("b1", (5,))], ["a"], name="pooled")
    g.node("Conv", [x, g.rand("w2", (5, 4, 1, 1))], ["b"], name="full")
    g.node("Add", ["a", "b"], ["s"], name="sum")
    g.bn("s", "y", 5, "bn")
    g.output("y")
    fold_ok(g.model())


def test_gemm_branch_sum_folds() -> None:
    g = G()
    x = g.input("x", [3, 4])
    g.node("Gemm", [x, g.rand("w1", (4, 5)), g.rand("c1", (3, 5))], ["a"], name="g1", beta=0.5)
    g.node("Gemm", [x, g.rand("w2", (5, 4))], ["b"], name="g2", transB=1, alpha=2.0)
    g.node("Add", ["a", "b"], ["s"], name="sum")
    g.bn("s", "y", 5, "bn")
    g.output("y")
    fold_ok(g.model())


def test_residual_identity_branch_is_refused() -> None:
    g = G()
    x = g.input("x", [2, 4, 6, 6])
    g.node("Conv", [x, g.rand("w", (4, 4, 3, 3))], ["a"], name="conv", pads=[1, 1, 1, 1])
    g.node("Add", ["a", x], ["s"], name="res")
    g.bn("s", "y", 4, "bn")
    g.output("y")
    m = g.model()
    _, rep = fold_model(m, merge_branches=False)  # merged (bnfold.onnx.merge), the BN then folds
    (v,) = rep.verdicts
    assert v.reason is SkipReason.UNFOLDABLE_BRANCH and "residual identity" in v.detail  # type: ignore[union-attr]
    fold_ok(m, bn_after=0)


def test_branch_broadcast_over_channels_is_refused() -> None:
    g = G()
    x = g.input("x", [2, 4, 6, 6])
    g.node("Conv", [x, g.rand("w1", (4, 4, 1, 1))], ["a"], name="c4")
    g.node("Conv", [x, g.rand("w2", (1, 4, 1, 1))], ["b"], name="c1")
    g.node("Add", ["a", "b"], ["s"], name="sum")
    g.bn("s", "y", 4, "bn")
    g.output("y")
    m = g.model()
    assert refused(m)[0] is SkipReason.LAYOUT


def test_branches_of_different_rank_are_refused() -> None:
    # (4, 4) + (2, 4, 4) broadcasts the Gemm's features over the conv's last axis, not its channels.
    g = G()
    g.node("Gemm", [g.input("v", [4, 4]), g.rand("w1", (4, 4))], ["a"], name="gemm")
    g.node("Conv", [g.input("x", [2, 3, 4]), g.rand("w2", (4, 3, 1))], ["b"], name="conv")
    g.node("Add", ["a", "b"], ["s"], name="sum")
    g.bn("s", "y", 4, "bn")
    g.output("y")
    m = g.model()
    r, detail = refused(m)
    assert r is SkipReason.LAYOUT and "ranks" in detail


# ---- Case 7: layer -> Add(constant) -> BN ------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 1, 1), (1,), (1, 5, 1, 1)])
def test_conv_add_constant_folds(shape: tuple[int, ...]) -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 4, 6, 6]), g.rand("w", (5, 4, 3, 3))], ["a"], name="conv")
    g.node("Add", ["a", g.rand("k", shape)], ["s"], name="plus")
    g.bn("s", "y", 5, "bn")
    g.output("y")
    out, _ = fold_ok(g.model())
    assert [n.op_type for n in out.graph.node] == ["Conv"]


def test_gemm_add_constant_folds() -> None:
    g = G()
    g.node(
        "Gemm", [g.input("x", [3, 4]), g.rand("w", (4, 5)), g.rand("c", (5,))], ["a"], name="gemm", beta=0.5
    )
    g.node("Add", [g.rand("k", (5,)), "a"], ["s"], name="plus")
    g.bn("s", "y", 5, "bn")
    g.output("y")
    out, _ = fold_ok(g.model())
    assert [n.op_type for n in out.graph.node] == ["Gemm"]


def test_conv_add_full_constant_is_refused() -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 4, 6, 6]), g.rand("w", (5, 4, 3, 3))], ["a"], name="conv")
    g.node("Add", ["a", g.rand("k", (1, 5, 4, 4))], ["s"], name="plus")
    g.bn("s", "y", 5, "bn")
    g.output("y")
    m = g.model()
    assert refused(m)[0] is SkipReason.LAYOUT


# ---- Case 13: Identity / Dropout ------------------------------------------------------------------------
def dropout(g: G, x: str, y: str, opset: int, training: bool | None = None, mask: bool = False) -> None:
    inputs = [x]
    if opset >= 12 and training is not None:
        inputs += [g.init("ratio", np.array(0.3), np.float32), g.init("train", np.array(training), np.bool_)]
    outputs = [y, y + "_mask"] if mask else [y]
    attrs = {"ratio": 0.3} if opset < 12 else {}
    g.node("Dropout", inputs, outputs, name="drop", **attrs)


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 21])
@pytest.mark.parametrize("op", ["Identity", "Dropout"])
def test_conv_noop_bn_folds(opset: int, op: str) -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 4, 6, 6]), g.rand("w", (5, 4, 3, 3))], ["a"], name="conv")
    if op == "Identity":
        g.node("Identity", ["a"], ["i"], name="id")
    else:
        dropout(g, "a", "i", opset, training=False if opset >= 12 else None)
    g.bn("i", "y", 5, "bn")
    g.output("y")
    out, rep = fold_ok(g.model(opset=opset))
    assert op in rep.sites[0].detail


@pytest.mark.parametrize("opset", [11, 13, 21])
def test_bn_dropout_gemm_folds(opset: int) -> None:
    # The NormLinear head: BN1d -> Dropout -> Linear.
    g = G()
    g.node("Relu", [g.input("x", [3, 8])], ["r"])
    g.bn("r", "u", 8, "bn")
    dropout(g, "u", "d", opset)
    g.node("Gemm", ["d", g.rand("w", (5, 8)), g.rand("c", (5,))], ["y"], name="fc", transB=1)
    g.output("y")
    out, rep = fold_ok(g.model(opset=opset))
    assert rep.sites[0].direction is Direction.BACKWARD and "Dropout" in rep.sites[0].detail


def test_bn_identity_flatten_gemm_folds() -> None:
    g = G()
    g.node("Relu", [g.input("x", [2, 3, 2, 2])], ["r"])
    g.bn("r", "u", 3, "bn")
    g.node("Identity", ["u"], ["i"])
    g.node("Flatten", ["i"], ["f"], axis=1)
    g.node("Identity", ["f"], ["f2"])
    g.node("Gemm", ["f2", g.rand("w", (12, 5))], ["y"], name="fc")
    g.output("y")
    fold_ok(g.model())


def test_training_dropout_is_not_a_noop() -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 4, 6, 6]), g.rand("w", (5, 4, 3, 3))], ["a"], name="conv")
    dropout(g, "a", "i", 17, training=True)
    g.bn("i", "y", 5, "bn")
    g.output("y")
    assert reason_of(g.model(opset=17))[0] is SkipReason.NO_PRODUCER


def test_dropout_mask_read_is_not_a_noop() -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 4, 6, 6]), g.rand("w", (5, 4, 3, 3))], ["a"], name="conv")
    dropout(g, "a", "i", 17, mask=True)
    g.bn("i", "y", 5, "bn")
    g.output("y")
    g.outputs.append(helper.make_tensor_value_info("i_mask", TensorProto.BOOL, [2, 5, 4, 4]))
    assert reason_of(g.model(opset=17))[0] is SkipReason.NO_PRODUCER


def test_noop_output_read_elsewhere_is_refused() -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 4, 6, 6]), g.rand("w", (5, 4, 3, 3))], ["a"], name="conv")
    g.node("Identity", ["a"], ["i"], name="id")
    g.bn("i", "y", 5, "bn")
    g.node("Relu", ["i"], ["side"])
    g.output("y")
    g.output("side")
    m = g.model()
    assert refused(m)[0] is SkipReason.OTHER_CONSUMERS


# ---- exported torch models (models/onnx_routes.py) ----------------------------------------------------
EXPECTED_LEFT: dict[str, SkipReason] = {}  # residual_sum_bn: its identity branch merges, then the BN folds


def _export(name: str, opset: int):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from models.onnx_routes import build_route_model

    model, x = build_route_model(name)
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=opset,
    )
    return model, x, onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize(
    "name",
    [
        "linear_norm",
        "linear_norm_bias",
        "token_linear_bn",
        "levit_mlp",
        "csp_block",
        "mixconv",
        "branch_sum",
        "residual_sum_bn",
        "norm_linear_head",
    ],
)
def test_exported_route_models(name: str, opset: int) -> None:
    import copy

    model, x, m = _export(name, opset)
    left = 1 if name in EXPECTED_LEFT else 0
    out, rep = fold_ok(m, bn_after=left, seeds=1)
    for v in rep.verdicts:
        if not v.folded:
            assert v.reason is EXPECTED_LEFT[name]  # type: ignore[union-attr]
    # Against the torch module run in float64 (the float32 model rounds; the fold must not add more).
    ref = copy.deepcopy(model).double()(x.double()).detach().numpy()
    got = run(out, {m.graph.input[0].name: x.numpy()})[0].astype(np.float64)
    assert np.max(np.abs(got - ref)) <= TORCH_TOL * max(1.0, float(np.max(np.abs(ref))))


def test_inspect_reports_the_predicted_result() -> None:
    import bnfold

    m = concat_graph(F32).model()
    g = G()
    x = g.input("x", [2, 4, 6, 6])
    g.node("Conv", [x, g.rand("w", (4, 4, 3, 3))], ["a"], name="conv", pads=[1, 1, 1, 1])
    g.node("Add", ["a", x], ["s"], name="res")
    g.bn("s", "y", 4, "bn")
    g.output("y")
    for model, left in ((m, 0), (g.model(), 0), (linear_norm(F32).model(), 0)):
        before = model.SerializeToString()
        rep = bnfold.inspect(model)
        assert model.SerializeToString() == before
        _, real = fold_model(model)
        assert rep.bn_after == real.bn_after == left
        assert [v.to_dict() for v in rep.verdicts] == [v.to_dict() for v in real.verdicts]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear_norm_bias", "csp_block"])
def test_dynamo_exported_route_models(name: str) -> None:
    # optimize=False keeps the BN (and writes Concat-built Reshape shapes, Identity for eval Dropout).
    torch = pytest.importorskip("torch")
    from models.onnx_routes import build_route_model

    model, x = build_route_model(name)
    m = torch.onnx.export(model, (x,), dynamo=True, optimize=False).model_proto
    out, _ = fold_ok(m, seeds=1)
    ref = model.double()(x.double()).detach().numpy()
    got = run(out, {m.graph.input[0].name: x.numpy()})[0].astype(np.float64)
    assert np.max(np.abs(got - ref)) <= TORCH_TOL * max(1.0, float(np.max(np.abs(ref))))


# ---- property: random routes ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    route=st.sampled_from(["Concat", "Add", "Sum"]),
    kinds=st.lists(st.sampled_from(["Conv", "ConvTranspose"]), min_size=1, max_size=3),
    bias=st.lists(st.booleans(), min_size=3, max_size=3),
    groups=st.sampled_from([1, 2]),
    share=st.booleans(),
    noop=st.sampled_from(["", "Identity", "Dropout"]),
    seed=st.integers(0, 1000),
)
def test_property_routes_fold_exactly(
    route: str, kinds: list[str], bias: list[bool], groups: int, share: bool, noop: str, seed: int
) -> None:
    if route == "Add" and len(kinds) != 2:
        kinds = (kinds * 2)[:2]
    g = G(seed=seed)
    x = g.input("x", [2, 4, 5, 5])
    outs, total = [], 0
    shared_w: dict[str, str] = {}
    for i, k in enumerate(kinds):
        c_out = 4 if route != "Concat" else 2 * (i + 1)
        if k == "Conv":
            shape = (c_out, 4 // groups, 3, 3)
        else:
            shape = (4, c_out // groups, 3, 3)
        key = f"{k}{shape}"
        w = shared_w[key] if share and key in shared_w else g.rand(f"w{i}", shape)
        shared_w.setdefault(key, w)
        ins = [x, w] + ([g.rand(f"b{i}", (c_out,))] if bias[i] else [])
        g.node(k, ins, [f"o{i}"], name=f"l{i}", group=groups, pads=[1, 1, 1, 1])
        outs.append(f"o{i}")
        total += c_out
    c = total if route == "Concat" else 4
    attrs = {"axis": 1} if route == "Concat" else {}
    g.node(route, outs, ["r"], name="route", **attrs)
    src = "r"
    if noop:
        g.node(noop, ["r"], ["n"], name="noop")
        src = "n"
    g.bn(src, "y", c, "bn")
    g.output("y")
    fold_ok(g.model(), seeds=1)


def test_route_producer_that_is_a_graph_output_is_refused() -> None:
    g = concat_graph(F32)
    g.output("a")
    m = g.model()
    assert refused(m)[0] is SkipReason.GRAPH_OUTPUT


def test_noop_between_add_constant_and_bn_is_refused() -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 4, 6, 6]), g.rand("w", (5, 4, 3, 3))], ["a"], name="conv")
    g.node("Add", ["a", g.rand("k", (5, 1, 1))], ["s"], name="plus")
    g.node("Identity", ["s"], ["i"])
    g.bn("i", "y", 5, "bn")
    g.output("y")
    m = g.model()
    assert refused(m)[0] is SkipReason.UNSUPPORTED_LAYER


@pytest.mark.parametrize("opset", [11, 13, 15, 18, 21])
def test_routes_across_opsets(opset: int) -> None:
    fold_ok(concat_graph(F32).model(opset=opset))
    g = G()
    x = g.input("x", [2, 4, 5, 5])
    g.node("Conv", [x, g.rand("w1", (3, 4, 1, 1)), g.rand("b1", (3,))], ["a"], name="c1")
    g.node("Conv", [x, g.rand("w2", (3, 4, 1, 1))], ["b"], name="c2")
    g.node("Sum", ["a", "b"], ["s"], name="sum")
    g.node("Dropout", ["s"], ["d"], name="drop")
    g.bn("d", "y", 3, "bn")
    g.output("y")
    fold_ok(g.model(opset=opset))


def test_branch_sum_float16() -> None:
    g = G(TensorProto.FLOAT16)
    x = g.input("x", [2, 4, 5, 5])
    g.node("Conv", [x, g.rand("w1", (3, 4, 3, 3)), g.rand("b1", (3,))], ["a"], name="c1", pads=[1, 1, 1, 1])
    g.node("Conv", [x, g.rand("w2", (3, 4, 1, 1))], ["b"], name="c2")
    g.node("Add", ["a", "b"], ["s"], name="sum")
    g.bn("s", "y", 3, "bn")
    g.output("y")
    fold_ok(g.model())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("perm,ok", [([0, 2, 1], True), ([2, 0, 1], False), ([0, 1, 2], False)])
def test_matmul_transpose_bn(bias: bool, perm: list[int], ok: bool) -> None:
    # Linear on tokens, then x.transpose(1, 2) into a BN1d over the features.
    g = G()
    g.node(
        "MatMul",
        [g.input("x", [2, 5, 8]), g.rand("w", (8, 5 if perm == [0, 1, 2] else 6))],
        ["mm"],
        name="mm",
    )
    src = "mm"
    if bias:
        g.node("Add", ["mm", g.rand("b", (5 if perm == [0, 1, 2] else 6,))], ["mma"], name="add")
        src = "mma"
    g.node("Transpose", [src], ["tr"], name="tr", perm=perm)
    c = {(0, 2, 1): 6, (2, 0, 1): 2, (0, 1, 2): 5}[tuple(perm)]
    g.bn("tr", "y", c, "bn")
    g.output("y")
    m = g.model()
    if ok:
        fold_ok(m)
    else:
        assert refused(m)[0] is SkipReason.LAYOUT
