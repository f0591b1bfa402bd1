"""Backward folds into quantized (QDQ) weights: ``BN -> layer(DequantizeLinear(w_q, s, z))``.

The BN scales the layer's *input* channels: exact (integers kept, scales multiplied) only with one
BN scale for every channel, or with the weight quantized per input channel; every other case is
refused with its reason. The reference is always the unfolded model run in onnxruntime.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold.onnx import fold_model
from bnfold.onnx.match_qdq import requantize_int32_bias
from bnfold.records import Direction, SkipReason
from models.onnx_graphs import TOL, G, check_fold, skip_reason


def pre_bn(
    kind: str = "Conv",
    *,
    quant: str = "out",
    uniform: bool = False,
    negate: tuple[int, ...] = (),
    bias: str = "float",
    x_qdq: bool = False,
    bn_qdq: bool = False,
    group: int = 1,
    flatten: bool = False,
    trans_b: int = 0,
    zero_point: int = 0,
    no_shift: bool = False,
    bias_product: bool = False,
) -> onnx.ModelProto:
    """``x [-> Q/DQ] -> BN [-> Q/DQ] [-> Flatten] -> kind(DequantizeLinear(w_q, s, z)[, bias]) -> y``.

    ``quant``: the weight's scales per "out" channel, per "in" channel or per "tensor". ``uniform``:
    one BN scale for every channel (gamma and var equal, mean and beta differ). ``negate``: BN
    channels with a negative gamma. ``no_shift``: beta = mean = 0 (a BN whose shift is zero)."""
    g = G(seed=3)
    rng = g.rng
    c = 4
    n = 8 if group == 4 else 6  # output channels: a multiple of the groups
    if kind == "Conv":
        x = g.input("x", [2, c, 5, 5])
        wshape: tuple[int, ...] = (n, c // group, 3, 3)
        out_axis, in_axis = 0, 1
    elif flatten:
        x = g.input("x", [3, c, 2, 2])
        wshape = (6, c * 4) if trans_b else (c * 4, 6)
        out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    else:
        x = g.input("x", [3, c])
        wshape = (6, c) if trans_b else (c, 6)
        out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    if x_qdq:
        g.init("x_s", np.array(0.02), np.float32)
        g.init("x_z", np.array(3, np.int8), np.int8)
        g.node("QuantizeLinear", [x, "x_s", "x_z"], ["x_q"], name="q_x")
        g.node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="dq_x")
        x = "x_dq"
    gamma = rng.uniform(0.5, 1.5, c)
    var = np.exp(rng.uniform(-1.4, 0.9, c))
    if uniform:
        gamma[:], var[:] = 0.8, 1.7
    gamma[list(negate)] *= -1
    beta, mean = rng.uniform(-0.5, 0.5, c), rng.uniform(-0.5, 0.5, c)
    if no_shift:
        beta[:], mean[:] = 0.0, 0.0
    for k, v in zip(("gamma", "beta", "mean", "var"), (gamma, beta, mean, var)):
        g.init(f"bn.{k}", v)
    g.node("BatchNormalization", [x, "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["h"], name="bn")
    h = "h"
    if bn_qdq:
        g.init("h_s", np.array(0.05), np.float32)
        g.init("h_z", np.array(0, np.int8), np.int8)
        g.node("QuantizeLinear", [h, "h_s", "h_z"], ["h_q"], name="q_h")
        g.node("DequantizeLinear", ["h_q", "h_s", "h_z"], ["h_dq"], name="dq_h")
        h = "h_dq"
    if flatten:
        g.node("Flatten", [h], ["hf"], name="flat", axis=1)
        h = "hf"
    wq = rng.integers(-100, 100, size=wshape).astype(np.int8)
    g.init("w_q", wq, np.int8)
    axis: dict[str, Any] = {}
    if quant == "tensor":
        sw = np.array(0.01, np.float32)
    else:
        ax = out_axis if quant == "out" else in_axis
        sw = rng.uniform(0.002, 0.02, size=(wshape[ax],)).astype(np.float32)
        axis = {"axis": ax}
    g.init("w_s", sw, np.float32)
    g.init("w_z", np.full(sw.shape, zero_point, np.int8), np.int8)
    g.node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq_w", **axis)
    ins = [h, "w"]
    if bias == "float":
        ins.append(g.rand("b", (n,)))
    elif bias == "int32":
        g.init("b_q", rng.integers(-2000, 2000, size=(n,)).astype(np.int32), np.int32)
        bs = np.full(n, 0.001)
        if bias_product:  # s_x * s_w per output channel, as onnxruntime's quantizer writes it
            bs = np.float64(np.float32(0.02)) * np.broadcast_to(sw.astype(np.float64), (n,))
        g.init("b_s", bs.astype(np.float32), np.float32)
        g.node("DequantizeLinear", ["b_q", "b_s"], ["b"], name="dq_b", axis=0)
        ins.append("b")
    attrs: dict[str, Any] = {"group": group} if kind == "Conv" else {}
    if kind == "Gemm":
        attrs["transB"] = trans_b
    g.node(kind, ins, ["y"], name="layer", **attrs)
    g.output("y")
    return g.model(opset=17)


def inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def dq_w(m: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    n = next(n for n in m.graph.node if n.name == "dq_w")
    v = inits(m)
    return v[n.input[0]], v[n.input[1]]


@pytest.mark.parametrize("kind", ["Conv", "Gemm", "MatMul"])
@pytest.mark.parametrize("quant", ["out", "in", "tensor"])
@pytest.mark.parametrize("bias", ["none", "float"])
def test_uniform_bn_scale_folds_any_quantization(kind: str, quant: str, bias: str) -> None:
    if kind == "MatMul" and bias != "none":
        pytest.skip("MatMul has no bias input")
    m = pre_bn(kind, quant=quant, uniform=True, bias=bias)
    before = inits(m)["w_q"]
    out, rep = check_fold(m)
    site = rep.sites[0]
    assert site.direction is Direction.BACKWARD and site.target == "layer"
    assert "one BN scale for every channel" in site.detail
    q, s = dq_w(out)
    assert q.tobytes() == before.tobytes()  # integers byte-identical
    assert s.shape == inits(m)["w_s"].shape and s.dtype == np.float32


@pytest.mark.parametrize("kind,trans_b", [("Conv", 0), ("Gemm", 0), ("Gemm", 1), ("MatMul", 0)])
@pytest.mark.parametrize("bias", ["none", "float"])
def test_per_input_channel_weight_folds(kind: str, trans_b: int, bias: str) -> None:
    if kind == "MatMul" and bias != "none":
        pytest.skip("MatMul has no bias input")
    m = pre_bn(kind, quant="in", bias=bias, trans_b=trans_b, negate=(1,), zero_point=2)
    before = inits(m)["w_q"]
    out, rep = check_fold(m)
    assert "per input channel" in rep.sites[0].detail and "negated on 1 slice" in rep.sites[0].detail
    q, _ = dq_w(out)
    in_axis = {"Conv": 1, "MatMul": 0}.get(kind, 1 if trans_b else 0)
    qa, qb = np.moveaxis(q, in_axis, 0), np.moveaxis(before, in_axis, 0)
    assert qa[[0, 2, 3]].tobytes() == qb[[0, 2, 3]].tobytes()
    assert np.array_equal(qa[1].astype(int), 4 - qb[1].astype(int))  # 2 z - w_q


def test_uniform_negative_scale_negates_every_integer() -> None:
    m = pre_bn("Conv", quant="out", uniform=True, negate=(0, 1, 2, 3), x_qdq=True)
    out, rep = check_fold(m)
    assert np.array_equal(dq_w(out)[0].astype(int), -inits(m)["w_q"].astype(int))
    assert np.all(dq_w(out)[1] > 0)


def test_flatten_then_gemm_per_input_channel() -> None:
    m = pre_bn("Gemm", quant="in", flatten=True)
    out, rep = check_fold(m)
    assert "through Flatten" in rep.sites[0].detail
    assert dq_w(out)[0].tobytes() == inits(m)["w_q"].tobytes()


@pytest.mark.parametrize("quant", ["out", "tensor"])
def test_per_channel_bn_on_output_quantization_refused(quant: str) -> None:
    v = skip_reason(pre_bn("Conv", quant=quant))
    assert v.reason is SkipReason.QUANTIZED
    assert "input channels of Conv 'layer' by different factors" in v.detail
    assert "off its integer grid" in v.detail


def test_grouped_per_input_channel_refused_when_groups_differ() -> None:
    v = skip_reason(pre_bn("Conv", quant="in", group=2))
    assert v.reason is SkipReason.QUANTIZED and "2 groups" in v.detail


def test_bn_output_quantized_refused() -> None:
    v = skip_reason(pre_bn("Conv", quant="in", bn_qdq=True))
    assert v.reason is SkipReason.QUANTIZED and "its output is quantized (QuantizeLinear 'q_h')" in v.detail


def test_padding_refused_before_quantization() -> None:
    m = pre_bn("Conv", quant="in")
    next(n for n in m.graph.node if n.name == "layer").attribute.append(
        onnx.helper.make_attribute("pads", [1, 1, 1, 1])
    )
    assert skip_reason(m).reason is SkipReason.PADDING


def test_negation_overflow_refused() -> None:
    m = pre_bn("Conv", quant="in", negate=(2,))
    wq = next(t for t in m.graph.initializer if t.name == "w_q")
    arr = numpy_helper.to_array(wq).copy()
    arr[0, 2, 0, 0] = -128
    wq.CopyFrom(numpy_helper.from_array(arr, "w_q"))
    v = skip_reason(m)
    assert v.reason is SkipReason.QUANTIZED and "overflow" in v.detail


def test_shared_dequantized_weight_is_copied() -> None:
    m = pre_bn("Conv", quant="in")
    m.graph.node.append(onnx.helper.make_node("Identity", ["w"], ["w_copy"], name="reader"))
    m.graph.output.append(onnx.helper.make_tensor_value_info("w_copy", onnx.TensorProto.FLOAT, [6, 4, 3, 3]))
    out, rep = check_fold(m)  # y and w_copy (the original weight) equal to the original's
    assert "shared DequantizeLinear copied" in rep.sites[0].detail
    layer = next(n for n in out.graph.node if n.name == "layer")
    copy = next(n for n in out.graph.node if n.output[0] == layer.input[1])
    assert copy.op_type == "DequantizeLinear" and copy.name != "dq_w" and copy.input[0] == "w_q"


def test_int32_bias_shift_refused_by_default_requantised_on_request() -> None:
    m = pre_bn("Conv", quant="in", bias="int32", x_qdq=True)
    v = skip_reason(m)
    assert v.reason is SkipReason.QUANTIZED and "cannot hold the BN shift" in v.detail
    with requantize_int32_bias():
        # the bias is off by at most half a step of its scale 0.001 (the bound the report states)
        out, rep = check_fold(m, tol=TOL[onnx.TensorProto.FLOAT] + 0.0005)
    assert "half a step" in rep.sites[0].detail
    assert dq_w(out)[0].tobytes() == inits(m)["w_q"].tobytes()


def test_int32_bias_with_zero_shift_is_exact() -> None:
    # beta = mean = 0: the shift W t is zero, the int32 bias keeps its integers exactly.
    m = pre_bn("Conv", quant="in", bias="int32", no_shift=True)
    out, rep = check_fold(m)
    assert "int32 bias takes the shift exactly" in rep.sites[0].detail
    b = next(n for n in out.graph.node if n.name == "dq_b")
    assert inits(out)[b.input[0]].tobytes() == inits(m)["b_q"].tobytes()


def test_ort_quantized_pre_bn_conv_refused(tmp_path) -> None:
    """onnxruntime's quantize_static on ``BN -> Conv``: it quantizes the conv's input (the BN output)
    and its weight per output channel: the BN is left, with the Q/DQ after it named."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    g = G(seed=5)
    x = g.input("x", [1, 4, 8, 8])
    g.bn(x, "h", 4, "bn")
    g.node("Conv", ["h", g.rand("w", (6, 4, 3, 3)), g.rand("b", (6,))], ["y"], name="conv")
    g.output("y")
    m = g.model(opset=17)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.it = iter([{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "q.onnx"
    onnx.save(m, src)
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],
    )
    q = onnx.load(dst)
    assert any(n.op_type == "BatchNormalization" for n in q.graph.node)
    v = skip_reason(q)
    assert v.reason is SkipReason.QUANTIZED and "its output is quantized (QuantizeLinear" in v.detail


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_conv_with_one_bn_scale_folds(group: int) -> None:
    m = pre_bn("Conv", quant="out", uniform=True, group=group, negate=(0, 1, 2, 3), zero_point=1)
    out, rep = check_fold(m)
    assert np.array_equal(dq_w(out)[0].astype(int), 2 - inits(m)["w_q"].astype(int))


def test_int32_bias_scale_follows_the_weight_scale() -> None:
    # bias scale = s_x * s_w (x quantized before the BN): with one BN scale alpha the weight scales
    # become s_w |alpha| and the bias scale s_x * s_w' (kept as onnxruntime's QDQ Conv reads it).
    m = pre_bn("Conv", quant="out", uniform=True, bias="int32", x_qdq=True, bias_product=True)
    assert skip_reason(m).reason is SkipReason.QUANTIZED  # the integers cannot stay exact
    with requantize_int32_bias():
        first, _ = fold_model(m)
        b = next(n for n in first.graph.node if n.name == "dq_b")
        half_step = float(np.max(inits(first)[b.input[1]].astype(np.float64))) / 2  # the stated bound
        out, rep = check_fold(m, tol=TOL[onnx.TensorProto.FLOAT] + half_step)
    b = next(n for n in out.graph.node if n.name == "dq_b")
    b_s = inits(out)[b.input[1]].astype(np.float64)
    w_s = dq_w(out)[1].astype(np.float64)
    assert np.array_equal(b_s.astype(np.float32), (np.float64(np.float32(0.02)) * w_s).astype(np.float32))
    assert "half a step" in rep.sites[0].detail
