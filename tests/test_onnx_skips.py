"""ONNX backend: every refusal has its stated reason, and the model stays correct."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from bnfold.onnx import fold_model
from bnfold.records import Skip, SkipReason
from models.onnx_graphs import G, check_fold, skip_reason

F16 = TensorProto.FLOAT16


def conv_bn(g: G, x: str = "x", name: str = "bn") -> None:
    g.node("Conv", [g.input(x, [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "y", 4, name)


def assert_skip(m: onnx.ModelProto, reason: SkipReason, bn: str | None = None, text: str = "") -> Skip:
    v = skip_reason(m, bn)
    assert isinstance(v, Skip), v
    assert v.reason is reason, v
    assert text in v.detail
    check_fold(m, bn_after=None)  # folding the rest leaves a correct model
    return v


def test_fan_out_other_consumers() -> None:
    g = G()
    conv_bn(g)
    g.node("Relu", ["t"], ["r"])
    g.output("y")
    g.output("r")
    assert_skip(g.model(), SkipReason.OTHER_CONSUMERS, text="Relu")


def test_producer_output_is_graph_output() -> None:
    g = G()
    conv_bn(g)
    g.output("y")
    g.output("t")
    assert_skip(g.model(), SkipReason.GRAPH_OUTPUT)


def test_non_constant_weight() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.input("w", [4, 3, 3, 3])], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    g.output("y")
    assert_skip(g.model(), SkipReason.NON_CONSTANT, text="graph input")


def test_non_constant_bn_param() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    names = (
        [g.input("gamma", [4])]
        + [g.rand(f"p{k}", (4,)) for k in range(2)]
        + [g.init("var", np.ones(4) * 0.7)]
    )
    g.node("BatchNormalization", ["t", *names], ["y"], name="bn")
    g.output("y")
    assert_skip(g.model(), SkipReason.NON_CONSTANT, text="BN scale")


def test_initializer_overridable_input_is_not_constant() -> None:
    g = G()
    conv_bn(g)
    g.output("y")
    m = g.model()
    m.graph.input.append(onnx.helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    assert_skip(m, SkipReason.NON_CONSTANT)


def test_dequantize_linear_weight() -> None:
    g = G()
    g.init("wq", np.random.default_rng(0).integers(-100, 100, (4, 3, 3, 3)), np.int8)
    g.init("ws", np.array(0.01), np.float32)
    g.init("wz", np.array(0), np.int8)
    g.node("DequantizeLinear", ["wq", "ws", "wz"], ["w"])
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), "w"], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    g.output("y")
    # Opset 12: a per-tensor scale cannot become per-channel (QDQ folds: tests/test_qdq_fold.py).
    assert_skip(
        g.model(opset=12), SkipReason.QUANTIZED, text="opset 12 < 13 has no per-channel DequantizeLinear"
    )


def test_training_mode() -> None:
    g = G()
    conv_bn(g)
    g.nodes[-1].attribute.append(onnx.helper.make_attribute("training_mode", 1))
    g.output("y")
    v = skip_reason(g.model())
    assert v.reason is SkipReason.TRAINING_MODE


def test_optional_outputs_used() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    bn = g.bn("t", "y", 4, "bn")
    bn.output.extend(["rm", "rv"])
    bn.attribute.append(onnx.helper.make_attribute("training_mode", 0))
    g.output("y")
    v = skip_reason(g.model(15))
    assert v.reason is SkipReason.TRAINING_MODE and "rm" in v.detail


def test_integer_dtype_refused() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    names = [g.init(f"p{k}", np.ones(4), np.int64) for k in range(4)]
    g.node("BatchNormalization", ["t", *names], ["y"], name="bn")
    g.output("y")
    # not a valid ONNX model (BN needs floats), but the verdict must still be a refusal, not a crash
    _, rep = fold_model(g.model())
    assert rep.verdicts[0].reason is SkipReason.UNSUPPORTED_DTYPE


def test_float16_overflow_refused() -> None:
    g = G(F16)
    g.node(
        "Conv", [g.input("x", [1, 3, 5, 5]), g.init("w", np.full((4, 3, 3, 3), 60000.0))], ["t"], name="conv"
    )
    names = [
        g.init("g", np.full(4, 4.0)),
        g.init("b", np.zeros(4)),
        g.init("m", np.zeros(4)),
        g.init("v", np.ones(4)),
    ]
    g.node("BatchNormalization", ["t", *names], ["y"], name="bn")
    g.output("y")
    v = skip_reason(g.model())
    assert v.reason is SkipReason.OVERFLOW and "float16" in v.detail


def test_variance_underflow_refused() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    names = [
        g.init("g", np.ones(4)),
        g.init("b", np.zeros(4)),
        g.init("m", np.zeros(4)),
        g.init("v", np.zeros(4)),
    ]
    g.node("BatchNormalization", ["t", *names], ["y"], name="bn", epsilon=0.0)
    g.output("y")
    v = skip_reason(g.model())
    assert v.reason is SkipReason.OVERFLOW


def test_padding_refused() -> None:
    g = G()
    g.bn(g.input("x", [1, 4, 6, 6]), "t", 4, "bn")
    g.node("Conv", ["t", g.rand("w", (3, 4, 3, 3))], ["y"], name="conv", pads=[1, 1, 1, 1])
    g.output("y")
    # The exact fold refuses (padding); scale propagation (on by default) then moves it (issue 27).
    _, rep = fold_model(g.model(), propagate=False)
    (v,) = rep.verdicts
    assert isinstance(v, Skip) and v.reason is SkipReason.PADDING, v
    out, rep = check_fold(g.model(), bn_after=0)
    assert rep.verdicts[0].to_dict()["status"] == "propagated"


def test_same_padding_refused() -> None:
    g = G()
    g.bn(g.input("x", [1, 4, 6, 6]), "t", 4, "bn")
    g.node("Conv", ["t", g.rand("w", (3, 4, 3, 3))], ["y"], name="conv", auto_pad="SAME_UPPER")
    g.output("y")
    # The exact fold refuses (padding); scale propagation (on by default) then moves it (issue 27).
    _, rep = fold_model(g.model(), propagate=False)
    (v,) = rep.verdicts
    assert isinstance(v, Skip) and v.reason is SkipReason.PADDING, v
    out, rep = check_fold(g.model(), bn_after=0)
    assert rep.verdicts[0].to_dict()["status"] == "propagated"


def test_matmul_rank3_layout() -> None:
    g = G()
    g.node("MatMul", [g.input("a", [2, 3, 4]), g.rand("W", (4, 3))], ["t"], name="mm")
    g.vi("t", [2, 3, 3])
    g.bn("t", "y", 3, "bn")
    g.output("y")
    assert_skip(g.model(), SkipReason.LAYOUT, text="rank 3")


def test_gemm_trans_a_backward_layout() -> None:
    g = G()
    g.bn(g.input("x", [4, 4]), "t", 4, "bn")
    g.node("Gemm", ["t", g.rand("B", (4, 5))], ["y"], transA=1)
    g.output("y")
    assert_skip(g.model(), SkipReason.LAYOUT, text="transA")


def test_bn_conv_transpose_backward_unsupported() -> None:
    g = G()
    g.bn(g.input("x", [1, 4, 3, 3]), "t", 4, "bn")
    g.node("ConvTranspose", ["t", g.rand("w", (4, 2, 3, 3))], ["y"], name="deconv")
    g.output("y", shape=[1, 2, 5, 5])
    assert_skip(g.model(), SkipReason.UNSUPPORTED_LAYER)


def test_no_producer() -> None:
    g = G()
    g.node("Relu", [g.input("x", [1, 3, 4, 4])], ["r"])
    g.bn("r", "y", 3, "bn")
    g.output("y")
    assert_skip(g.model(), SkipReason.NO_PRODUCER, text="Relu")


def test_in_subgraph_reads_outer_value() -> None:
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.node("Relu", ["t"], ["t2"])  # a second reader keeps the outer conv output alive
    cond = g.input("cond", [], TensorProto.BOOL)
    subs = []
    for k in range(2):
        s = G(seed=k)
        s.bn("t", f"y{k}", 4, f"bn{k}")
        s.output(f"y{k}", shape=[1, 4, 3, 3])
        subs.append(onnx.helper.make_graph(s.nodes, f"b{k}", [], s.outputs, s.inits))
    g.node("If", [cond], ["y"], name="if", then_branch=subs[0], else_branch=subs[1])
    g.output("y", shape=[1, 4, 3, 3])
    g.output("t2")
    m = g.model()
    _, rep = fold_model(m, dry_run=True)
    assert {v.reason for v in rep.skips} == {SkipReason.IN_SUBGRAPH}


@pytest.mark.parametrize("affine", [False, True])
def test_every_verdict_present_and_model_correct_mixed(affine: bool) -> None:
    g = G()
    conv_bn(g)
    g.node("Relu", ["y"], ["r"])
    g.bn("r", "z", 4, "bn_relu")
    g.output("z")
    out, rep = check_fold(g.model(), bn_after=0 if affine else 1, affine=affine)
    assert [v.bn for v in rep.verdicts] == ["bn", "bn_relu"]
    if affine:
        assert len({t.name for t in out.graph.initializer}) == len(out.graph.initializer)
        assert any(numpy_helper.to_array(t).shape == (4, 1, 1) for t in out.graph.initializer)
