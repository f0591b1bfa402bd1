"""Adversarial probes of the ONNX backend: graphs where a fold could go wrong or crash.

Every test runs the original and the folded model in onnxruntime with graph optimisations disabled
(``ORT_DISABLE_ALL``: the runtime must not fold anything itself) on the same inputs, checks the
rewritten model with ``onnx.checker.check_model(full_check=True)`` and checks that the input model
was not changed.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.records import Direction, SkipReason
from models.onnx_graphs import G, bn_stats
from models.testing import ATOL_F32_DEEP, run_onnx

# float32 relative to the output scale: folded in float64, rounded once; a few ulps per short sum.
TOL32 = ATOL_F32_DEEP  # models.testing: the one tolerance table


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in run_onnx(model, feeds)]


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        if tt.elem_type == TensorProto.BOOL:
            out[vi.name] = np.array(seed % 2 == 0)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return out


def fold_check(
    model: onnx.ModelProto, seeds: tuple[int, ...] = (0,)
) -> tuple[onnx.ModelProto, bnfold.FoldReport]:
    before = model.SerializeToString()
    out, rep = bnfold.fold_with_report(model)
    assert model.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(out, full_check=True)
    for s in seeds:
        f = feeds(model, s)
        ref, got = ort_run(model, f), ort_run(out, f)
        assert len(ref) == len(got)
        for a, b in zip(ref, got):
            scale = max(1.0, float(np.abs(a).max()))
            assert float(np.abs(a.astype(np.float64) - b).max()) <= TOL32 * scale
    return out, rep


def reason(rep: bnfold.FoldReport, bn: str) -> SkipReason:
    return next(v.reason for v in rep.skips if v.bn == bn)


def conv_bn(g: G, x: str, w: str, name: str = "conv", c: int = 4) -> None:
    g.node("Conv", [x, w], ["t"], name=name)
    g.bn("t", "y", c, "bn")
    g.output("y")


# ---- where the conv weight comes from, and who else reads it --------------------------------------
def test_weight_initializer_is_also_a_graph_output() -> None:
    g = G()
    conv_bn(g, g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3)))
    g.output("w", shape=[4, 3, 3, 3])
    out, rep = fold_check(g.model())
    assert rep.folded == 1


def test_weight_initializer_read_by_shape() -> None:
    g = G()
    conv_bn(g, g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3)))
    g.node("Shape", ["w"], ["s"])
    g.output("s", dtype=TensorProto.INT64, shape=[4])
    assert fold_check(g.model())[1].folded == 1


@pytest.mark.parametrize("also_output", [False, True])
def test_weight_from_constant_node(also_output: bool) -> None:
    g = G()
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    g.node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))
    conv_bn(g, g.input("x", [1, 3, 6, 6]), "w")
    if also_output:
        g.output("w", shape=[4, 3, 3, 3])
    assert fold_check(g.model())[1].folded == 1


def test_weight_and_bias_shared_with_other_convs() -> None:
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    w, b = g.rand("w", (3, 3, 3, 3)), g.rand("b", (3,))
    g.node("Conv", [x, w, b], ["t"], name="c1", pads=[1] * 4)
    g.bn("t", "u", 3, "bn")
    g.node("Conv", ["u", w, b], ["y"], name="c2", pads=[1] * 4)
    g.output("y")
    out, rep = fold_check(g.model())
    assert rep.folded == 1 and "shared" in rep.sites[0].detail


@pytest.mark.parametrize("what", ["weight", "bias", "gamma"])
def test_non_constant_parameters_are_left(what: str) -> None:
    g = G()
    x = g.input("x", [2, 3, 4, 4])
    w = g.input("w", [4, 3, 1, 1]) if what == "weight" else g.rand("w", (4, 3, 1, 1))
    b = g.input("b", [4]) if what == "bias" else g.rand("b", (4,))
    g.node("Conv", [x, w, b], ["t"], name="conv")
    gam, be, mu, var = bn_stats(4, np.random.default_rng(2))
    gname = g.input("gam", [4]) if what == "gamma" else g.init("gam", gam)
    g.node(
        "BatchNormalization",
        ["t", gname, g.init("be", be), g.init("mu", mu), g.init("var", var)],
        ["y"],
        name="bn",
    )
    g.output("y")
    _, rep = fold_check(g.model())
    assert reason(rep, "bn") is SkipReason.NON_CONSTANT


# ---- opsets and attributes ----------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 9, 11, 13, 15, 17, 21])
def test_opsets_forward_and_backward(opset: int) -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "u", 4, "bn1")
    g.node("Relu", ["u"], ["r"])
    g.bn("r", "v", 4, "bn2", epsilon=1e-3)
    g.node("Conv", ["v", g.rand("w2", (2, 4, 1, 1))], ["y"], name="c2")
    g.output("y")
    out, rep = fold_check(g.model(opset=opset))
    assert rep.folded == 2 and not any(n.op_type == "BatchNormalization" for n in out.graph.node)


def test_ir3_initializers_listed_as_inputs() -> None:
    g = G()
    conv_bn(g, g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3)))
    assert fold_check(g.model(opset=7, ir_version=3))[1].folded == 1


# ---- graph inputs, graph outputs, fan-out ----------------------------------------------------------
def test_bn_on_graph_input() -> None:
    g = G()
    g.bn(g.input("x", [2, 4, 3, 3]), "y", 4, "bn")
    g.output("y")
    _, rep = fold_check(g.model())
    assert reason(rep, "bn") is SkipReason.NO_PRODUCER


def test_two_bns_read_the_same_conv_output() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    g.bn("t", "z", 4, "bn2")
    g.output("y")
    g.output("z")
    _, rep = fold_check(g.model())
    assert (
        reason(rep, "bn") is SkipReason.OTHER_CONSUMERS and reason(rep, "bn2") is SkipReason.OTHER_CONSUMERS
    )


def test_conv_output_also_graph_output() -> None:
    g = G()
    conv_bn(g, g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3)))
    g.output("t", shape=[1, 4, 4, 4])
    _, rep = fold_check(g.model())
    assert reason(rep, "bn") is SkipReason.GRAPH_OUTPUT


@pytest.mark.parametrize("second", ["conv", "output"])
def test_bn_feeding_two_consumers_is_not_folded_backward(second: str) -> None:
    g = G()
    g.node("Relu", [g.input("x", [1, 3, 6, 6])], ["r"])
    g.bn("r", "u", 3, "bn")
    g.node("Conv", ["u", g.rand("w", (4, 3, 1, 1))], ["y"], name="c1")
    g.output("y")
    if second == "conv":
        g.node("Conv", ["u", g.rand("w2", (4, 3, 1, 1))], ["z"], name="c2")
        g.output("z")
    else:
        g.output("u", shape=[1, 3, 6, 6])
    _, rep = fold_check(g.model())
    # no exact fold; the fork into two convs is scale propagation (issue 27), outputs checked above
    assert not any(s.direction in (Direction.FORWARD, Direction.BACKWARD) for s in rep.sites)
    assert rep.folded == (1 if second == "conv" else 0)


# ---- Gemm / MatMul layouts ------------------------------------------------------------------------
def test_bn_gemm_trans_a_refused() -> None:
    g = G()
    g.bn(g.input("x", [3, 4]), "u", 4, "bn")
    g.node("Gemm", ["u", g.rand("w", (3, 5))], ["y"], name="gemm", transA=1)
    g.output("y")
    _, rep = fold_check(g.model())
    assert reason(rep, "bn") is SkipReason.LAYOUT


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_full_c_then_bn(trans_a: int) -> None:
    g = G()
    x = g.input("x", [3, 4] if trans_a else [4, 3])
    g.node(
        "Gemm",
        [x, g.rand("w", (3, 5)), g.rand("c", (4, 5))],
        ["t"],
        name="gemm",
        transA=trans_a,
        alpha=0.7,
        beta=-1.3,
    )
    g.bn("t", "y", 5, "bn")
    g.output("y")
    assert fold_check(g.model())[1].folded == 1


def test_bn_gemm_full_c_trans_b() -> None:
    g = G()
    g.bn(g.input("x", [3, 4]), "u", 4, "bn")
    g.node("Gemm", ["u", g.rand("w", (5, 4)), g.rand("c", (3, 5))], ["y"], name="gemm", transB=1, beta=1.7)
    g.output("y")
    _, rep = fold_check(g.model())
    assert rep.folded == 1 and rep.sites[0].direction is Direction.BACKWARD


@pytest.mark.parametrize("add", [False, True])
def test_matmul_3d_activation_2d_weight_then_bn_refused(add: bool) -> None:
    g = G()
    g.node("MatMul", [g.input("x", [2, 5, 3]), g.rand("w", (3, 5))], ["t"], name="mm")
    src = "t"
    if add:
        g.node("Add", ["t", g.rand("b", (5,))], ["t2"])
        src = "t2"
    g.bn(src, "y", 5, "bn")
    g.output("y")
    _, rep = fold_check(g.model())
    assert reason(rep, "bn") is SkipReason.LAYOUT


def test_matmul_weight_on_the_left_refused() -> None:
    # out[i, j] = sum_k W[i, k] x[k, j]: the BN channel (axis 1) comes from x, not from W.
    g = G()
    g.node("MatMul", [g.rand("w", (5, 5)), g.input("x", [5, 5])], ["t"], name="mm")
    g.bn("t", "y", 5, "bn")
    g.output("y")
    assert fold_check(g.model())[1].folded == 0
    g = G()
    g.node("Relu", [g.input("x", [5, 5])], ["r"])
    g.bn("r", "u", 5, "bn")
    g.node("MatMul", [g.rand("w", (5, 5)), "u"], ["y"], name="mm")
    g.output("y")
    assert fold_check(g.model())[1].folded == 0


def test_matmul_batched_weight_refused() -> None:
    g = G()
    g.node("MatMul", [g.input("x", [4, 3]), g.rand("w", (2, 3, 5))], ["t"], name="mm")
    g.bn("t", "y", 4, "bn")
    g.output("y")
    assert fold_check(g.model())[1].folded == 0


@pytest.mark.parametrize("bshape", [(5,), (4, 1), (4, 5)])
def test_matmul_add_bias_shapes(bshape: tuple[int, ...]) -> None:
    g = G()
    g.node("MatMul", [g.input("x", [4, 3]), g.rand("w", (3, 5))], ["t"], name="mm")
    g.node("Add", [g.rand("b", bshape), "t"], ["t2"])
    g.bn("t2", "y", 5, "bn")
    g.output("y")
    assert fold_check(g.model())[1].folded == 1


def test_bn_reshape_to_non_flatten_shape_refused() -> None:
    # [2, 3, 2, 2] -> [12, 2]: rows mix batch and channel; the Gemm's K axis is spatial.
    g = G()
    g.node("Relu", [g.input("x", [2, 3, 2, 2])], ["r"])
    g.bn("r", "u", 3, "bn")
    g.node("Reshape", ["u", g.init("sh", np.array([12, 2]), np.int64)], ["f"])
    g.node("Gemm", ["f", g.rand("w", (2, 5))], ["y"], name="gemm")
    g.output("y")
    assert fold_check(g.model())[1].folded == 0


def test_bn_flatten_axis2_refused() -> None:
    g = G()
    g.node("Relu", [g.input("x", [2, 3, 2, 2])], ["r"])
    g.bn("r", "u", 3, "bn")
    g.node("Flatten", ["u"], ["f"], axis=2)
    g.node("MatMul", ["f", g.rand("w", (4, 5))], ["y"], name="mm")
    g.output("y", shape=[6, 5])
    _, rep = fold_check(g.model())
    assert reason(rep, "bn") is SkipReason.LAYOUT


# ---- ConvTranspose, padding -----------------------------------------------------------------------
def test_conv_transpose_output_padding_dilation_groups_pads() -> None:
    g = G()
    g.node(
        "ConvTranspose",
        [g.input("x", [1, 4, 5, 5]), g.rand("w", (4, 3, 3, 3)), g.rand("b", (6,))],
        ["t"],
        name="ct",
        group=2,
        strides=[2, 2],
        dilations=[2, 2],
        output_padding=[1, 1],
        pads=[1, 0, 1, 0],
    )
    g.bn("t", "y", 6, "bn")
    g.output("y")
    assert fold_check(g.model())[1].folded == 1


def test_backward_into_conv_transpose_refused() -> None:
    g = G()
    g.node("Relu", [g.input("x", [1, 4, 7])], ["r"])
    g.bn("r", "u", 4, "bn")
    g.node("ConvTranspose", ["u", g.rand("w", (4, 2, 3))], ["y"], name="ct")
    g.output("y")
    _, rep = fold_check(g.model())
    assert reason(rep, "bn") is SkipReason.UNSUPPORTED_LAYER


@pytest.mark.parametrize("auto_pad,folds", [("SAME_UPPER", False), ("SAME_LOWER", False), ("VALID", True)])
def test_backward_auto_pad(auto_pad: str, folds: bool) -> None:
    g = G()
    g.node("Relu", [g.input("x", [1, 3, 6, 6])], ["r"])
    g.bn("r", "u", 3, "bn")
    g.node("Conv", ["u", g.rand("w", (4, 3, 3, 3))], ["y"], name="c1", auto_pad=auto_pad)
    g.output("y")
    _, rep = fold_check(g.model())
    assert (
        rep.folded == 1
    )  # SAME padding: by scale propagation (issue 27), the shift as an Add before the conv
    if not folds:
        assert rep.verdicts[0].to_dict()["status"] == "propagated"
        _, rep = bnfold.fold_with_report(g.model(), propagate=False)
        assert reason(rep, "bn") is SkipReason.PADDING


# ---- control flow: subgraphs read outer initializers --------------------------------------------------
def _branch(name: str, wname: str, bnp: list[str]) -> onnx.GraphProto:
    nodes = [
        helper.make_node("Conv", ["x", wname], [name + "_t"], name=name + "_conv"),
        helper.make_node("BatchNormalization", [name + "_t", *bnp], [name + "_y"], name=name + "_bn"),
    ]
    out = helper.make_tensor_value_info(name + "_y", TensorProto.FLOAT, [1, 4, 4, 4])
    return helper.make_graph(nodes, name, [], [out])


def test_if_branches_share_outer_weights_and_bn_params() -> None:
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    g.input("cond", [], TensorProto.BOOL)
    w, w2 = g.rand("w", (4, 3, 3, 3)), g.rand("w2", (4, 3, 3, 3))
    bnp = [f"ob.{k}" for k in ("gamma", "beta", "mean", "var")]
    for n, v in zip(bnp, bn_stats(4, np.random.default_rng(3))):
        g.init(n, v)
    g.node("Conv", [x, w2], ["t0"], name="outer_conv")
    g.node("BatchNormalization", ["t0", *bnp], ["y0"], name="outer_bn")
    g.node("If", ["cond"], ["y"], then_branch=_branch("th", w, bnp), else_branch=_branch("el", w2, bnp))
    g.output("y0")
    g.output("y", shape=[1, 4, 4, 4])
    fold_check(g.model(), seeds=(0, 1))  # both branches


def test_loop_body_reads_the_folded_weight() -> None:
    g = G()
    w = g.rand("w", (3, 3, 1, 1))
    g.init("trip", np.array(2), np.int64)
    g.init("cond0", np.array(True), np.bool_)
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), w], ["t0"], name="oc")
    g.bn("t0", "y0", 3, "obn")
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("Conv", ["xin", "w"], ["xo"], name="lc"),
            helper.make_node("Identity", ["c"], ["co"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("xin", f32, [1, 3, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("co", TensorProto.BOOL, []),
            helper.make_tensor_value_info("xo", f32, [1, 3, 6, 6]),
        ],
    )
    g.node("Loop", ["trip", "cond0", "y0"], ["y"], body=body)
    g.output("y", shape=[1, 3, 6, 6])
    _, rep = fold_check(g.model())
    assert rep.folded == 1 and "shared" in rep.sites[0].detail


# ---- exported from PyTorch ------------------------------------------------------------------------------
def test_legacy_exporter_preserve_mixed_layers() -> None:
    import torch
    from torch import nn

    from models.stats import randomize_bn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(8)
            self.b2 = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 1)
            self.ct = nn.ConvTranspose2d(8, 4, 3, stride=2, output_padding=1, groups=2, bias=False)
            self.b4 = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 18 * 18, 6)
            self.b5 = nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c2(self.b2(torch.relu(self.b1(self.c1(x)))))
            return self.b5(self.fc(self.b4(self.ct(y)).flatten(1)))

    torch.manual_seed(0)
    m = randomize_bn(Net(), 0).eval()
    x = torch.randn(2, 3, 8, 8)
    buf = io.BytesIO()
    torch.onnx.export(
        m,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
    )
    model = onnx.load_from_string(buf.getvalue())
    out, rep = fold_check(model)
    assert rep.folded == 4 and bnfold.onnx.count_bn(out) == 0
    got = ort_run(out, {model.graph.input[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert float(np.abs(got - ref).max()) <= TOL32 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("where", ["forward", "forward_add", "backward"])
def test_matmul_with_unknown_rank_is_refused(where: str) -> None:
    g = G()
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    if where == "backward":
        g.node("Relu", ["x"], ["r"])
        g.bn("r", "u", 3, "bn")
        g.node("MatMul", ["u", g.rand("w", (3, 5))], ["y"], name="mm")
    else:
        g.node("MatMul", ["x", g.rand("w", (3, 5))], ["t"], name="mm")
        src = "t"
        if where == "forward_add":
            g.node("Add", ["t", g.rand("b", (5,))], ["t2"])
            src = "t2"
        g.bn(src, "y", 5, "bn")
    g.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    model = g.model()
    out, rep = bnfold.fold_with_report(model)
    assert reason(rep, "bn") is SkipReason.LAYOUT
    x = (
        np.random.default_rng(0)
        .standard_normal((2, 3, 3) if where == "backward" else (2, 5, 3))
        .astype(np.float32)
    )
    np.testing.assert_array_equal(ort_run(model, {"x": x})[0], ort_run(out, {"x": x})[0])


@pytest.mark.parametrize("groups,cin", [(2, 4), (4, 4)])
def test_backward_into_grouped_conv(groups: int, cin: int) -> None:
    g = G()
    g.node("Relu", [g.input("x", [1, cin, 6, 6])], ["r"])
    g.bn("r", "u", cin, "bn")
    g.node(
        "Conv",
        ["u", g.rand("w", (8, cin // groups, 3, 3)), g.rand("b", (8,))],
        ["y"],
        name="c",
        group=groups,
        strides=[2, 2],
        dilations=[1, 2],
    )
    g.output("y")
    _, rep = fold_check(g.model())
    assert rep.folded == 1 and rep.sites[0].direction is Direction.BACKWARD
