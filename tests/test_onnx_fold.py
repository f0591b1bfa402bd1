"""ONNX backend: every foldable pattern folds, and the folded model computes what the original did."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx import fold_model
from bnfold.records import Direction
from models.onnx_graphs import G, check_fold, feeds_for, run

F32, F64, F16 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16


@pytest.mark.parametrize("dtype", [F32, F64, F16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_bn(dtype: int, bias: bool, groups: int) -> None:
    g = G(dtype)
    x = g.input("x", [2, 4, 7, 7])
    ins = [x, g.rand("w", (6, 4 // groups, 3, 3))] + ([g.rand("b", (6,))] if bias else [])
    g.node("Conv", ins, ["t"], name="conv", pads=[1, 1, 1, 1], group=groups)
    g.bn("t", "y", 6, "bn")
    g.output("y")
    out, rep = check_fold(g.model())
    assert rep.sites[0].target == "conv" and rep.sites[0].direction is Direction.FORWARD
    assert [n.op_type for n in out.graph.node] == ["Conv"] and out.graph.node[0].output[0] == "y"
    assert out.graph.node[0].name == "conv"


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_conv_transpose_bn_grouped(groups: int) -> None:
    g = G()
    x = g.input("x", [2, 6, 5, 5])
    g.node(
        "ConvTranspose",
        [x, g.rand("w", (6, 12 // groups, 3, 3)), g.rand("b", (12,))],
        ["t"],
        name="deconv",
        group=groups,
        strides=[2, 2],
    )
    g.bn("t", "y", 12, "bn")
    g.output("y", shape=[2, 12, 11, 11])
    check_fold(g.model())


def test_conv_bn_bn_fixpoint() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "u", 4, "bn1")
    g.bn("u", "y", 4, "bn2")
    g.output("y")
    out, rep = check_fold(g.model())
    assert {s.bn for s in rep.sites} == {"bn1", "bn2"}
    assert len(out.graph.node) == 1


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 1), (3, 5), ()])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, -1.3)])
def test_gemm_bn(trans_b: int, c_shape: tuple[int, ...] | None, alpha: float, beta: float) -> None:
    g = G()
    a = g.input("a", [3, 4])
    ins = [a, g.rand("B", (5, 4) if trans_b else (4, 5))]
    if c_shape is not None:
        ins.append(g.rand("C", c_shape))
    g.node("Gemm", ins, ["t"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    g.bn("t", "y", 5, "bn")
    g.output("y")
    out, _ = check_fold(g.model())
    gemm = out.graph.node[0]
    assert gemm.op_type == "Gemm"
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute}.get("beta", 1.0) == 1.0


def test_matmul_bn_becomes_gemm() -> None:
    g = G()
    g.node("MatMul", [g.input("a", [3, 4]), g.rand("W", (4, 5))], ["t"], name="mm")
    g.vi("t", [3, 5])
    g.bn("t", "y", 5, "bn")
    g.output("y")
    out, rep = check_fold(g.model())
    assert [n.op_type for n in out.graph.node] == ["Gemm"]
    assert rep.sites[0].target_kind == "MatMul"


@pytest.mark.parametrize("bias_shape", [(5,), (1, 5)])
def test_matmul_add_bn(bias_shape: tuple[int, ...]) -> None:
    g = G()
    g.node("MatMul", [g.input("a", [3, 4]), g.rand("W", (4, 5))], ["m"], name="mm")
    g.node("Add", ["m", g.rand("b", bias_shape)], ["t"], name="add")
    g.vi("t", [3, 5])
    g.bn("t", "y", 5, "bn")
    g.output("y")
    out, _ = check_fold(g.model())
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_bn_conv_backward(bias: bool, groups: int) -> None:
    g = G()
    x = g.input("x", [2, 4, 6, 6])
    g.bn(x, "t", 4, "bn")
    ins = ["t", g.rand("w", (6, 4 // groups, 3, 3))] + ([g.rand("b", (6,))] if bias else [])
    g.node("Conv", ins, ["y"], name="conv", pads=[0, 0, 0, 0], group=groups, strides=[2, 2])
    g.output("y")
    out, rep = check_fold(g.model())
    assert rep.sites[0].direction is Direction.BACKWARD and rep.sites[0].target == "conv"
    assert out.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_bn_gemm_backward(trans_b: int, alpha: float, beta: float) -> None:
    g = G()
    g.bn(g.input("x", [3, 4]), "t", 4, "bn")
    g.node(
        "Gemm",
        ["t", g.rand("B", (5, 4) if trans_b else (4, 5)), g.rand("C", (5,))],
        ["y"],
        transB=trans_b,
        alpha=alpha,
        beta=beta,
    )
    g.output("y")
    check_fold(g.model())


def test_bn_matmul_backward() -> None:
    g = G()
    g.bn(g.input("x", [3, 4]), "t", 4, "bn")
    g.node("MatMul", ["t", g.rand("W", (4, 5))], ["y"])
    g.output("y")
    out, _ = check_fold(g.model())
    assert [n.op_type for n in out.graph.node] == ["Gemm"]


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_bn_flatten_gemm(op: str) -> None:
    g = G()
    g.bn(g.input("x", [2, 3, 2, 2]), "t", 3, "bn")
    g.node("Flatten", ["t"], ["f"], axis=1)
    g.node(op, ["f", g.rand("W", (12, 5))] + ([g.rand("C", (5,))] if op == "Gemm" else []), ["y"])
    g.output("y")
    out, rep = check_fold(g.model())
    assert [n.op_type for n in out.graph.node] == ["Flatten", "Gemm"]
    assert rep.sites[0].direction is Direction.BACKWARD


@pytest.mark.parametrize("layer", ["Conv", "Gemm"])
def test_mul_add_after_layer(layer: str) -> None:
    g = G()
    if layer == "Conv":
        g.node("Conv", [g.input("x", [2, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
        cshape: tuple[int, ...] = (4, 1, 1)
    else:
        g.node("Gemm", [g.input("x", [2, 3]), g.rand("w", (3, 4))], ["t"], name="conv")
        cshape = (4,)
    g.node("Mul", ["t", g.rand("s", cshape)], ["m"], name="mul")
    g.node("Add", ["m", g.rand("d", cshape)], ["y"], name="add")
    g.output("y")
    out, rep = check_fold(g.model())
    assert len(out.graph.node) == 1
    assert rep.extra["mul_add"][0]["target"] == "conv"


def test_mul_add_not_per_channel_left_alone() -> None:
    g = G()
    g.node("Conv", [g.input("x", [2, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.node("Mul", ["t", g.rand("s", (3, 1))], ["m"], name="mul")  # varies along H: not per channel
    g.node("Add", ["m", g.rand("d", (4, 1, 1))], ["y"], name="add")
    g.output("y")
    out, _ = check_fold(g.model())
    assert len(out.graph.node) == 3


def test_shared_weight_two_sites() -> None:
    g = G()
    w = g.rand("w", (4, 3, 3, 3))
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), w], ["t1"], name="c1")
    g.node("Conv", ["x", w], ["t2"], name="c2")
    g.bn("t1", "y1", 4, "bn1")
    g.bn("t2", "y2", 4, "bn2")
    g.output("y1")
    g.output("y2")
    m = g.model()
    out, rep = check_fold(m)
    assert rep.folded == 2
    ws = {n.input[1] for n in out.graph.node}
    assert len(ws) == 2  # each conv has its own folded weight
    orig = numpy_helper.to_array(m.graph.initializer[0])
    assert all(
        not np.array_equal(numpy_helper.to_array(t), orig) for t in out.graph.initializer if t.name in ws
    )


def test_bn_output_is_graph_output_keeps_name() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 1, 1))], ["t"], name="conv")
    g.vi("t", [1, 4, 5, 5])
    g.bn("t", "y", 4, "bn")
    g.node("Relu", ["y"], ["z"])
    g.output("y")
    g.output("z")
    out, _ = check_fold(g.model())
    assert out.graph.node[0].output[0] == "y"
    assert "t" not in {v.name for v in out.graph.value_info}


def test_if_subgraph_bn() -> None:
    g = G()
    x = g.input("x", [1, 3, 5, 5])
    cond = g.input("cond", [], TensorProto.BOOL)
    w = g.rand("w", (4, 3, 3, 3))
    branches = []
    for k in range(2):
        sub = G(seed=10 + k)
        sub.node("Conv", [x, w], [f"t{k}"], name=f"conv{k}")
        sub.bn(f"t{k}", f"y{k}", 4, f"bn{k}")
        sub.output(f"y{k}")
        branches.append(helper.make_graph(sub.nodes, f"b{k}", [], sub.outputs, sub.inits))
    g.node("If", [cond], ["y"], name="if", then_branch=branches[0], else_branch=branches[1])
    g.output("y")
    m = g.model()
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert rep.bn_before == 2 and rep.bn_after == 0
    assert {v.bn for v in rep.verdicts} == {"if/then_branch/bn0", "if/else_branch/bn1"}
    for c in (True, False):
        feeds = {"x": feeds_for(m)["x"], "cond": np.array(c)}
        np.testing.assert_allclose(run(m, feeds)[0], run(out, feeds)[0], rtol=0, atol=2e-5 * 10)


@pytest.mark.parametrize("opset", [7, 8, 9, 11, 13, 14, 15, 17, 19, onnx.defs.onnx_opset_version()])
def test_opsets(opset: int) -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3)), g.rand("b", (4,))], ["t"])
    g.bn("t", "u", 4, "bn1", **({"spatial": 1} if opset in (7, 8) else {}))
    g.node("Gemm", [g.input("a", [2, 3]), g.rand("B", (3, 4)), g.rand("C", (4,))], ["v"])
    g.bn("v", "z", 4, "bn2")
    g.output("u", shape=[1, 4, 3, 3])
    g.output("z", shape=[2, 4])
    check_fold(g.model(opset, ir_version=3 if opset < 9 else None), bn_after=0)


def test_ir3_initializers_listed_as_inputs() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"])
    g.bn("t", "y", 4, "bn")
    g.output("y", shape=[1, 4, 3, 3])
    m = g.model(7, ir_version=3)
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert rep.bn_after == 0
    feeds = feeds_for(m)
    np.testing.assert_allclose(run(m, feeds)[0], run(out, feeds)[0], atol=1e-4)


def test_spatial0_uniform_stats_fold_and_per_element_affine() -> None:
    for uniform in (True, False):
        g = G()
        g.node("Conv", [g.input("x", [1, 3, 4, 4]), g.rand("w", (2, 3, 1, 1))], ["t"])
        names = [f"bn.{k}" for k in ("g", "b", "m", "v")]
        rng = np.random.default_rng(0)
        for n, lo, hi in zip(names, (0.5, -0.5, -0.5, 0.3), (1.5, 0.5, 0.5, 2.0)):
            v = rng.uniform(lo, hi, (2, 1, 1)) if uniform else rng.uniform(lo, hi, (2, 4, 4))
            g.init(n, np.broadcast_to(v, (2, 4, 4)))
        g.node("BatchNormalization", ["t", *names], ["y"], name="bn", spatial=0)
        g.output("y", shape=[1, 2, 4, 4])
        m = g.model(7, ir_version=3)
        if uniform:
            check_fold(m, bn_after=0)
        else:
            out, rep = check_fold(m, bn_after=1)
            assert rep.skips[0].reason.value == "spatial"
            out, rep = check_fold(m, bn_after=0, affine=True)
            assert rep.sites[0].direction is Direction.AFFINE


def test_affine_option() -> None:
    g = G()
    g.node("Relu", [g.input("x", [2, 3, 4, 4])], ["r"])
    g.bn("r", "y", 3, "bn")
    g.output("y")
    m = g.model()
    out, rep = check_fold(m, bn_after=1)
    assert rep.skips[0].reason.value == "no_producer"
    out, rep = check_fold(m, bn_after=0, affine=True)
    assert [n.op_type for n in out.graph.node] == ["Relu", "Mul", "Add"]
    assert out.graph.node[-1].output[0] == "y"


def test_bn_params_other_dtype_opset15() -> None:
    g = G(F16)
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"])
    g.bn("t", "y", 4, "bn", param_dtype=np.float32)
    g.output("y")
    out, _ = check_fold(g.model(15))
    assert all(t.data_type == F16 for t in out.graph.initializer)


def test_bfloat16_initializers_match_float64_reference() -> None:
    """onnxruntime has no bfloat16 Gemm on CPU: check the folded tensors against float64 math instead."""
    bf = ml_dtypes.bfloat16
    g = G(TensorProto.BFLOAT16)
    g.np = bf
    g.node("Gemm", [g.input("x", [2, 3]), g.rand("w", (3, 4)), g.rand("c", (4,))], ["t"], name="gemm")
    bn = g.bn("t", "y", 4, "bn")
    g.output("y", shape=[2, 4])
    m = g.model(17)
    out, rep = fold_model(m)
    onnx.checker.check_model(out, full_check=True)
    assert rep.bn_after == 0
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    gamma, beta, mean, var = (inits[n] for n in bn.input[1:])
    scale = gamma / np.sqrt(var + 1e-5)
    gemm = out.graph.node[0]
    new = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert new[gemm.input[1]].dtype == bf
    want_w = inits["w"] * scale[None, :]
    want_c = (inits["c"] - mean) * scale + beta
    # one bfloat16 rounding (8 significant bits) of the float64 result
    np.testing.assert_allclose(new[gemm.input[1]].astype(np.float64), want_w, rtol=2**-8, atol=0)
    np.testing.assert_allclose(new[gemm.input[2]].astype(np.float64), want_c, rtol=2**-8, atol=1e-6)


def test_dynamo_style_runtime_bias_folds() -> None:
    """What torch.onnx.export(dynamo=True, optimize=False) emits for Conv(bias=False) -> BN."""
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    w = g.rand("w", (4, 3, 3, 3))
    g.node("Shape", [w], ["s0"], start=0, end=1)
    g.node("Constant", [], ["c1"], value_ints=[1])
    g.node("Expand", ["s0", "c1"], ["s1"])
    g.node("Constant", [], ["z"], value=numpy_helper.from_array(np.array(0.0, np.float32)))
    g.node("CastLike", ["z", x], ["zc"])
    g.node("Expand", ["zc", "s1"], ["bias"])
    g.node("Conv", [x, w, "bias"], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    g.output("y")
    for name in ("w", "t"):
        g.vi(name, [4, 3, 3, 3] if name == "w" else [1, 4, 4, 4])
    out, rep = check_fold(g.model(20))
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert out.graph.node[0].input[1] == "w"  # written in place: only Shape also reads it
    assert "w" in {v.name for v in out.graph.value_info}


def test_inplace_edits_given_model_and_dry_run_does_not() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"])
    g.bn("t", "y", 4, "bn")
    g.output("y")
    m = g.model()
    ref = run(m, feeds_for(m))
    same, rep = fold_model(m, dry_run=True)
    assert same is m and rep.dry_run and rep.folded == 1 and rep.bn_after == 0
    assert len(m.graph.node) == 2
    out, rep = fold_model(m, inplace=True)
    assert out is m and len(m.graph.node) == 1
    np.testing.assert_allclose(run(m, feeds_for(m))[0], ref[0], atol=1e-4)


def test_chain_of_pairs_folds_in_one_pass() -> None:
    g = G()
    cur = g.input("x", [1, 4, 3, 3])
    for i in range(30):
        g.node("Conv", [cur, g.rand(f"w{i}", (4, 4, 1, 1))], [f"t{i}"])
        cur = f"y{i}"
        g.bn(f"t{i}", cur, 4, f"bn{i}")
    g.output(cur)
    out, rep = check_fold(g.model(), tol=1e-4)
    assert rep.folded == 30 and len(out.graph.node) == 30


def test_external_data_round_trip(tmp_path) -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (16, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "y", 16, "bn")
    g.output("y")
    m = g.model()
    feeds = feeds_for(m)
    ref = run(m, feeds)[0]
    src = tmp_path / "in.onnx"
    onnx.save(
        m,
        src,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="in.data",
        size_threshold=64,
    )
    # weights not loaded: nothing to fold, and it says why
    lazy = onnx.load(src, load_external_data=False)
    _, rep = fold_model(lazy, dry_run=True)
    assert rep.skips[0].reason.value == "non_constant" and "external data" in rep.skips[0].detail
    loaded = onnx.load(src)
    out, rep = fold_model(loaded, inplace=True)
    assert out is loaded and rep.bn_after == 0
    dst = tmp_path / "out" / "out.onnx"
    dst.parent.mkdir()
    onnx.save(out, dst, save_as_external_data=True, location="out.data", size_threshold=64)
    back = onnx.load(dst)
    onnx.checker.check_model(str(dst), full_check=True)
    np.testing.assert_allclose(run(back, feeds)[0], ref, rtol=0, atol=2e-5 * 10)


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["Conv", "ConvTranspose"]),
    groups=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_forward_fold_matches(
    kind: str, groups: int, k: int, stride: int, bias: bool, seed: int
) -> None:
    g = G(seed=seed)
    cin, cout = 4, 8
    wshape = (cout, cin // groups, k, k) if kind == "Conv" else (cin, cout // groups, k, k)
    ins = [g.input("x", [1, cin, 5, 5]), g.rand("w", wshape)] + ([g.rand("b", (cout,))] if bias else [])
    g.node(kind, ins, ["t"], name="layer", group=groups, strides=[stride, stride])
    g.bn("t", "y", cout, "bn")
    side = (5 - k) // stride + 1 if kind == "Conv" else (5 - 1) * stride + k
    g.output("y", shape=[1, cout, side, side])
    check_fold(g.model(), seeds=1)
