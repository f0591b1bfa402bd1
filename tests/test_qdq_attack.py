"""Attacks on the QDQ folds (issue 25): hand-built quantized graphs meant to make a fold wrong.

Each graph is folded and both models run in onnxruntime (optimisations off; the reference is the
original graph, never the fold formula): the fold is exact at the stated tolerance or the BN is left
with a precise reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold.records import SkipReason
from models.onnx_graphs import G, check_fold, qdq_layer, skip_reason


def with_bn(g: G, c: int, gamma: list[float] | None = None, opset: int = 17) -> onnx.ModelProto:
    """Add the BN "bn" on "t" -> "y" (realistic statistics), its gamma set where given."""
    g.bn("t", "y", c, "bn")
    if gamma is not None:
        t = next(t for t in g.inits if t.name == "bn.gamma")
        t.CopyFrom(numpy_helper.from_array(np.asarray(gamma, np.float32), "bn.gamma"))
    g.output("y")
    return g.model(opset=opset)


@pytest.mark.parametrize("kind", ["Conv", "Gemm"])
@pytest.mark.parametrize("gamma", [[0.0] * 6, [0.8, 0.0, 1.3, 0.7, 0.0, 1.2]])
def test_int32_bias_zero_bn_scale_without_negative_channel(kind: str, gamma: list[float]) -> None:
    # A zero BN scale zeroes the channel's bias integers too (b' = 0 * b + t): with no negative
    # channel the integers must still be written, or the old bias survives next to the shift.
    m = with_bn(qdq_layer(kind, bias="int32"), 6, gamma)
    check_fold(m)


def half_scales_float_output(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every DequantizeLinear's scale in float16, its output still float32 (opset 23 ``output_dtype``)."""
    scales = {n.input[1] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    for t in m.graph.initializer:
        if t.name in scales:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear":
            n.attribute.append(onnx.helper.make_attribute("output_dtype", onnx.TensorProto.FLOAT))
    m.opset_import[0].version = 23
    return m


def pre_bn_layer(kind: str, bias: str, quant: str = "tensor") -> onnx.ModelProto:
    """``x -> BN (one scale for every channel) -> kind(DequantizeLinear weight[, bias]) -> y``."""
    g = G(seed=4)
    x = g.input("x", [2, 4, 5, 5] if kind == "Conv" else [3, 4])
    wshape = (6, 4, 3, 3) if kind == "Conv" else (4, 6)
    g.init("w_q", g.rng.integers(-100, 100, size=wshape), np.int8)
    axis = {} if quant == "tensor" else {"axis": 0 if kind == "Conv" else 1}
    g.init("w_s", np.array(0.01) if quant == "tensor" else g.rng.uniform(0.002, 0.02, 6), np.float32)
    g.node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", **axis)
    for k, v in (("gamma", 0.8), ("beta", 0.3), ("mean", -0.2), ("var", 1.7)):
        g.init(f"bn.{k}", np.full(4, v) + (np.arange(4) * 0.1 if k in ("beta", "mean") else 0))
    g.node("BatchNormalization", [x, "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["h"], name="bn")
    ins = ["h", "w"]
    if bias == "float":
        ins.append(g.rand("b", (6,)))
    elif bias == "int32":
        g.init("b_q", g.rng.integers(-2000, 2000, size=6), np.int32)
        g.init("b_s", np.full(6, 2.0**-10), np.float32)
        g.node("DequantizeLinear", ["b_q", "b_s"], ["b"], name="dq_b", axis=0)
        ins.append("b")
    g.node(kind, ins, ["y"], name="layer")
    g.output("y")
    return g.model(opset=17)


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("bias", ["none", "float", "int32"])
def test_output_dtype_wider_than_scale_refused(direction: str, bias: str) -> None:
    # DequantizeLinear-23 with float16 scales and output_dtype float: a folded scale rounded to
    # float16 loses what the float32 output keeps (and a new bias or shift in the scale's dtype
    # would not type-check): refused with the reason, never folded.
    if direction == "forward":
        m = with_bn(qdq_layer("Conv", bias=bias, x_qdq=False), 6)
    else:
        m = pre_bn_layer("Conv", bias)
    m = half_scales_float_output(m)
    onnx.checker.check_model(m, full_check=True)
    v = skip_reason(m, "bn")
    assert v.reason is SkipReason.QUANTIZED and "output_dtype" in v.detail, v.to_dict()


@pytest.mark.parametrize(
    ("dtype", "zero_point", "bad", "becomes"),
    [(np.int8, 0, -128, 128), (np.int8, 5, -120, 130), (np.int8, -128, 1, -257), (np.uint8, 128, 0, 256),
     (np.uint8, 0, 7, -7), (np.uint8, 255, 3, 507)],
)  # fmt: skip
def test_negation_overflow_names_the_integer(dtype: type, zero_point: int, bad: int, becomes: int) -> None:
    # A negative BN scale negates the channel's integers around its zero point (2 z - w_q): where one
    # leaves the type the BN is left, and the reason names that integer and its range.
    g = qdq_layer("Conv", zero_point=zero_point, wq_dtype=dtype)
    wq = next(t for t in g.inits if t.name == "w_q")
    arr = np.full(numpy_helper.to_array(wq).shape, zero_point, dtype)  # every weight 0 ...
    arr[1, 0, 0, 0] = bad  # ... but one, on the negated channel
    wq.CopyFrom(numpy_helper.from_array(arr, "w_q"))
    v = skip_reason(with_bn(g, 6, [0.8, -1.1, 1.3, 0.7, 0.6, 1.2]))
    info = np.iinfo(dtype)
    assert v.reason is SkipReason.QUANTIZED
    assert "negative on channel 1" in v.detail and f"zero point {zero_point}" in v.detail
    assert f"weight {bad} would become {becomes}, outside [{info.min}, {info.max}]" in v.detail, v.detail
