"""Folds through quantized (QDQ) weights: the integers stay, the scales and the bias change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold.onnx import fold_model
from bnfold.onnx.match_qdq import requantize_int32_bias
from bnfold.records import SkipReason
from models.onnx_graphs import TOL, G, check_fold, qdq_layer, skip_reason


def with_bn(g: G, c: int, negate: tuple[int, ...] = (), zero: tuple[int, ...] = ()) -> onnx.ModelProto:
    g.bn("t", "y", c, "bn")
    gamma = next(t for t in g.inits if t.name == "bn.gamma")
    v = np.abs(numpy_helper.to_array(gamma)).astype(np.float32)
    v[list(negate)] *= -1
    v[list(zero)] = 0
    gamma.CopyFrom(numpy_helper.from_array(v, "bn.gamma"))
    g.output("y")
    return g.model(opset=17)


def int32_bias_tol(m: onnx.ModelProto) -> float:
    """The default float32 tolerance plus half a step of every requantised int32 bias (the bound
    the report states; outputs are compared relative to max(1, max |output|), so an absolute bound
    is a bound on the relative one)."""
    with requantize_int32_bias():
        out, _ = fold_model(m)
    if not any(n.name == "dq_b" for n in out.graph.node):
        return TOL[onnx.TensorProto.FLOAT]
    return TOL[onnx.TensorProto.FLOAT] + float(np.max(dq_inputs(out, "dq_b")[1].astype(np.float64))) / 2


def inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def dq_inputs(m: onnx.ModelProto, name: str) -> tuple[np.ndarray, ...]:
    n = next(n for n in m.graph.node if n.name == name)
    vals = inits(m)
    return tuple(vals[i] for i in n.input if i)


def dq_axis(m: onnx.ModelProto, name: str) -> int | None:
    n = next(n for n in m.graph.node if n.name == name)
    return next((a.i for a in n.attribute if a.name == "axis"), None)


# Tolerance: the reference runs the BN after the layer in float32; the fold rounds each new scale once
# (half an ulp, relative 6e-8): the default TOL of 2e-5. A requantised int32 bias adds its own
# rounding, at most half a step of its new scale s_x * s_w' per channel (the bound the report states):
# that is added to the tolerance of those graphs only (int32_bias_tol).


@pytest.mark.parametrize("kind", ["Conv", "ConvTranspose", "Gemm", "MatMul"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bias", ["none", "float", "int32"])
def test_qdq_fold_exact(kind: str, per_channel: bool, bias: str) -> None:
    if kind == "MatMul" and bias != "none":
        pytest.skip("MatMul has no bias input")
    g = qdq_layer(kind, per_channel=per_channel, bias=bias)
    m = with_bn(g, 6)
    w_before = inits(m)["w_q"].tobytes()
    out, rep = check_fold(m)
    assert rep.sites[0].target == "layer"
    w_q, w_s, *_ = dq_inputs(out, "dq_w")
    assert w_q.tobytes() == w_before  # the integers are byte-identical
    assert w_s.shape == (6,) and w_s.dtype == np.float32
    assert dq_axis(out, "dq_w") == (1 if kind in ("ConvTranspose", "Gemm", "MatMul") else 0)
    if bias == "int32":
        b_q, b_s = dq_inputs(out, "dq_b")
        assert b_q.tobytes() == inits(m)["b_q"].tobytes()  # exact: the int32 bias keeps its integers
        x_s = inits(out)["x_s"].astype(np.float64)
        # onnxruntime's QDQ Conv invariant: bias scale = input scale * weight scale (float32 product)
        assert np.array_equal(b_s, (x_s * w_s.astype(np.float64)).astype(np.float32))
        assert "shift kept as one Add" in rep.sites[0].detail
        assert [n.op_type for n in out.graph.node][-1] == "Add" and out.graph.node[-1].output[0] == "y"
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    layer = next(n for n in out.graph.node if n.name == "layer")
    assert layer.op_type == ("Gemm" if kind == "MatMul" else kind)


def test_qdq_gemm_trans_b() -> None:
    m = with_bn(qdq_layer("Gemm", trans_b=1, bias="int32"), 6)
    out, _ = check_fold(m)
    assert dq_axis(out, "dq_w") == 0


@pytest.mark.parametrize("zero_point", [0, 3])
def test_qdq_negative_scale_negates_integers(zero_point: int) -> None:
    m = with_bn(qdq_layer("Conv", zero_point=zero_point, bias="int32"), 6, negate=(1, 4))
    before = inits(m)["w_q"]
    out, rep = check_fold(m)
    after = dq_inputs(out, "dq_w")[0]
    keep = [0, 2, 3, 5]
    assert np.array_equal(after[keep], before[keep])
    assert np.array_equal(after[[1, 4]].astype(int), 2 * zero_point - before[[1, 4]].astype(int))
    assert "integers negated on 2 channel(s)" in rep.sites[0].detail


def test_qdq_negative_scale_with_int8_min_is_refused() -> None:
    m = with_bn(qdq_layer("Conv", negate=(2,), min_weight=True), 6, negate=(2,))
    v = skip_reason(m)
    assert v.reason is SkipReason.QUANTIZED and "negative on channel 2" in v.detail and "overflow" in v.detail


def test_qdq_int8_min_on_positive_channel_folds() -> None:
    # -128 only where the BN scale is positive: nothing is negated there.
    g = qdq_layer("Conv", negate=(2,), min_weight=True)
    m = with_bn(g, 6, negate=(3,))
    check_fold(m)


@pytest.mark.parametrize("bias", ["none", "float", "int32"])
def test_qdq_zero_scale_channel_becomes_its_bias(bias: str) -> None:
    m = with_bn(qdq_layer("Conv", bias=bias, zero_point=2), 6, zero=(1,), negate=(4,))
    before = inits(m)["w_q"]
    out, rep = check_fold(m)
    after = dq_inputs(out, "dq_w")[0]
    assert np.all(after[1] == 2)  # the zero point: weights exactly 0
    assert after[[0, 2, 3, 5]].tobytes() == before[[0, 2, 3, 5]].tobytes()
    assert np.all(dq_inputs(out, "dq_w")[1] > 0)  # scales stay positive
    assert "1 channel(s) zeroed" in rep.sites[0].detail
    if bias == "int32":
        with requantize_int32_bias():
            check_fold(m, tol=int32_bias_tol(m))


def test_qdq_blocked_refused() -> None:
    g = qdq_layer("Conv")
    dq = next(n for n in g.nodes if n.name == "dq_w")
    dq.attribute.append(onnx.helper.make_attribute("block_size", 2))
    m = with_bn(g, 6)
    v = skip_reason(m)
    assert v.reason is SkipReason.QUANTIZED and "block_size" in v.detail


def test_qdq_other_axis_refused() -> None:
    g = qdq_layer("Conv", c_out=4)  # weight [4, 4, 3, 3]: quantize on the input-channel axis instead
    dq = next(n for n in g.nodes if n.name == "dq_w")
    next(a for a in dq.attribute if a.name == "axis").i = 1
    v = skip_reason(with_bn(g, 4))
    assert v.reason is SkipReason.QUANTIZED and "axis 1" in v.detail


def test_qdq_int4_refused() -> None:
    g = qdq_layer("Conv")
    for t in g.inits:
        if t.name in ("w_q", "w_z"):
            arr = numpy_helper.to_array(t).clip(-8, 7)
            t.CopyFrom(
                onnx.helper.make_tensor(t.name, onnx.TensorProto.INT4, arr.shape, arr.flatten().tolist())
            )
    m = with_bn(g, 6)
    m.opset_import[0].version = 21
    v = skip_reason(m)
    assert v.reason is SkipReason.QUANTIZED and "int4" in v.detail


@pytest.mark.parametrize("negate", [(), (2,)])
def test_qdq_shared_dequantize_is_copied(negate: tuple[int, ...]) -> None:
    # One DequantizeLinear read by two convs, only one followed by a BN: the folded conv reads a copy
    # of it with its own scale (and its own integers only where a channel is negated).
    g = qdq_layer("Conv", bias="float")
    g.node("Conv", ["x_dq", "w"], ["t2"], name="other", pads=[1, 1, 1, 1])
    g.output("t2", shape=[2, 6, 6, 6])
    m = with_bn(g, 6, negate=negate)
    out, rep = check_fold(m)  # both outputs (y and t2) equal to the original's
    assert "shared DequantizeLinear copied" in rep.sites[0].detail
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] != "x_q"]
    assert len(dqs) == 2
    orig = next(n for n in dqs if n.name == "dq_w")
    copy = next(n for n in dqs if n.name != "dq_w")
    assert next(n for n in out.graph.node if n.name == "other").input[1] == orig.output[0] == "w"
    assert next(n for n in out.graph.node if n.name == "layer").input[1] == copy.output[0]
    assert list(orig.input) == ["w_q", "w_s", "w_z"]  # the other reader: untouched
    vals = inits(out)
    assert vals["w_s"].tobytes() == inits(m)["w_s"].tobytes()
    assert copy.input[1] != "w_s" and copy.input[2] == "w_z"
    if negate:
        assert copy.input[0] != "w_q"
        assert np.array_equal(vals[copy.input[0]][2].astype(int), -inits(m)["w_q"][2].astype(int))
    else:
        assert copy.input[0] == "w_q"  # the int8 initializer is shared, not copied
    assert len(out.graph.initializer) == len(m.graph.initializer) - 4 + 1 + bool(negate)


def test_qdq_shared_dequantize_both_readers_fold() -> None:
    # Both convs reading one DequantizeLinear are followed by BNs: each folds with its own scales.
    g = qdq_layer("Conv", bias="int32")
    g.node("Conv", ["x_dq", "w"], ["t2"], name="other", pads=[1, 1, 1, 1])
    g.bn("t2", "y2", 6, "bn2")
    g.output("y2", shape=[2, 6, 6, 6])
    m = with_bn(g, 6, negate=(1,))
    out, rep = check_fold(m)
    assert len(rep.sites) == 2
    w_q = [n.input[0] for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] != "x_q"]
    assert len([n for n in w_q if n == "w_q"]) >= 1  # the integers of the unnegated reader stay shared


def test_qdq_shared_initializer_is_cloned() -> None:
    # Two DequantizeLinear nodes read the same w_q and w_s: the folded site gets its own scale.
    g = qdq_layer("Conv", bias="float")
    g.node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w2"], name="dq_w2", axis=0)
    g.node("Conv", ["x_dq", "w2"], ["t2"], name="other", pads=[1, 1, 1, 1])
    g.output("t2", shape=[2, 6, 6, 6])
    m = with_bn(g, 6, negate=(1,))
    out, _ = check_fold(m)
    # the other reader keeps the original integers and scales; the folded site has its own copies
    assert np.array_equal(dq_inputs(out, "dq_w2")[1], inits(m)["w_s"])
    assert dq_inputs(out, "dq_w2")[0].tobytes() == inits(m)["w_q"].tobytes()
    folded = dq_inputs(out, "dq_w")[0]
    assert np.array_equal(folded[1].astype(int), -inits(m)["w_q"][1].astype(int))
    assert folded[[0, 2, 3, 4, 5]].tobytes() == inits(m)["w_q"][[0, 2, 3, 4, 5]].tobytes()


def test_qdq_int32_bias_overflow_refused() -> None:
    g = qdq_layer("Conv", bias="int32")
    m = with_bn(g, 6)
    beta = next(t for t in m.graph.initializer if t.name == "bn.beta")
    v = numpy_helper.to_array(beta).copy()
    v[0] = 1e6  # shift / (s_x * s_w') is far beyond int32
    beta.CopyFrom(numpy_helper.from_array(v, "bn.beta"))
    with requantize_int32_bias():
        r = skip_reason(m)
    assert r.reason is SkipReason.OVERFLOW and "int32" in r.detail
    check_fold(m)  # the exact default keeps the shift in an Add: nothing to overflow


@pytest.mark.parametrize("kind", ["Conv", "Gemm"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_qdq_int32_bias_requantised(kind: str, per_channel: bool) -> None:
    m = with_bn(qdq_layer(kind, per_channel=per_channel, bias="int32"), 6, negate=(3,))
    tol = int32_bias_tol(m)
    with requantize_int32_bias():
        out, rep = check_fold(m, tol=tol)
    assert "half a step" in rep.sites[0].detail
    assert [n.op_type for n in out.graph.node][-1] == kind
    b_s = dq_inputs(out, "dq_b")[1]
    x_s = inits(out)["x_s"].astype(np.float64)
    assert np.array_equal(b_s, (x_s * dq_inputs(out, "dq_w")[1].astype(np.float64)).astype(np.float32))


# ---- A graph quantized by onnxruntime's own quantizer ---------------------------------------------
def _ort_quantized(tmp_path, exclude_output: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    g = G(seed=1)
    x = g.input("x", [1, 4, 8, 8])
    g.node("Conv", [x, g.rand("w", (6, 4, 3, 3)), g.rand("b", (6,))], ["t"], name="conv", pads=[1, 1, 1, 1])
    m = with_bn(g, 6, negate=(2,))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.it = iter([{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "q.onnx"
    onnx.save(m, src)
    extra = {"OpTypesToExcludeOutputQuantization": ["Conv"]} if exclude_output else {}
    # op_types_to_quantize=['Conv']: the quantizer leaves the BN (it neither fuses nor quantizes it).
    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],
        extra_options=extra,
    )
    return onnx.load(dst)


def test_ort_quantized_conv_bn_folds(tmp_path) -> None:
    q = _ort_quantized(tmp_path, exclude_output=True)
    assert [n.op_type for n in q.graph.node][-2:] == ["Conv", "BatchNormalization"]
    w_name = next(n for n in q.graph.node if n.op_type == "Conv").input[1]
    dq_w = next(n for n in q.graph.node if n.output[0] == w_name)
    before = inits(q)[dq_w.input[0]]
    # the reference is the quantized model itself, BN included (its own Q/DQ), in onnxruntime
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    b_name = next(n for n in q.graph.node if n.output[0] == conv.input[2]).input[0]
    b_before = inits(q)[b_name]
    keep = [0, 1, 3, 4, 5]  # channel 2 has a negative BN scale
    out, rep = check_fold(q)  # exact by default: the default tolerance
    assert rep.sites[0].target_kind == "Conv" and "shift kept as one Add" in rep.sites[0].detail
    dq_out = next(n for n in out.graph.node if n.output[0] == w_name)
    after = inits(out)[dq_out.input[0]]
    assert after[keep].tobytes() == before[keep].tobytes()
    assert np.array_equal(after[2].astype(int), -before[2].astype(int))
    b_after = inits(out)[b_name]
    assert b_after[keep].tobytes() == b_before[keep].tobytes() and b_after[2] == -b_before[2]
    # Requantised on request: no Add, the bias off by at most the half step the report states.
    with requantize_int32_bias():
        out, rep = check_fold(q, tol=TOL[onnx.TensorProto.FLOAT] + _bias_half_step(q))
    assert "half a step" in rep.sites[0].detail
    assert [n.op_type for n in out.graph.node][-1] == "Conv"
    assert inits(out)[dq_out.input[0]].tobytes() == after.tobytes()


def _bias_half_step(m: onnx.ModelProto) -> float:
    with requantize_int32_bias():
        out, _ = fold_model(m)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    dq_b = next(n for n in out.graph.node if n.output[0] == conv.input[2])
    return float(np.max(inits(out)[dq_b.input[1]].astype(np.float64))) / 2


def test_ort_quantized_with_output_qdq_refused(tmp_path) -> None:
    q = _ort_quantized(tmp_path, exclude_output=False)
    v = skip_reason(q)
    assert v.reason is SkipReason.QUANTIZED and "quantized output of Conv 'conv'" in v.detail


@pytest.mark.parametrize("kind,bias", [("Conv", "int32"), ("Gemm", "int32"), ("MatMul", "none")])
def test_cli_fold_verifies_at_default_tolerance(tmp_path, kind: str, bias: str) -> None:
    """`bnfold fold` verifies the folded QDQ model in onnxruntime at its default tolerance and passes."""
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    src, dst = tmp_path / "q.onnx", tmp_path / "f.onnx"
    onnx.save(with_bn(qdq_layer(kind, bias=bias, per_channel=False), 6, negate=(1,)), src)
    before = src.read_bytes()
    r = CliRunner().invoke(app, ["fold", str(src), "-o", str(dst), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["verification"]["passed"] is True and data["summary"]["bn_after"] == 0
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "q.onnx"]


@pytest.mark.parametrize("bias", ["none", "float", "int32"])
def test_qdq_gemm_alpha_beta(bias: str) -> None:
    g = qdq_layer("Gemm", bias=bias, trans_b=1)
    layer = next(n for n in g.nodes if n.name == "layer")
    layer.attribute.extend(
        [onnx.helper.make_attribute("alpha", 0.7), onnx.helper.make_attribute("beta", -1.3)]
    )
    m = with_bn(g, 6, negate=(0,))
    check_fold(m)
    if bias == "int32":
        with requantize_int32_bias():
            check_fold(m, tol=int32_bias_tol(m))


def test_qdq_uint8_negated_around_zero_point() -> None:
    # uint8 weights in [1, 100) with zero point 128: 2 * 128 - w_q lies in (156, 255]: fits.
    m = with_bn(qdq_layer("Conv", wq_dtype=np.uint8, zero_point=128, bias="float"), 6, negate=(5,))
    before = inits(m)["w_q"]
    out, _ = check_fold(m)
    after = dq_inputs(out, "dq_w")[0]
    assert after.dtype == np.uint8 and np.array_equal(after[5].astype(int), 256 - before[5].astype(int))
    assert after[:5].tobytes() == before[:5].tobytes()


def test_qdq_uint8_negation_overflow_refused() -> None:
    # zero point 0: every non-zero uint8 weight would become negative.
    v = skip_reason(with_bn(qdq_layer("Conv", wq_dtype=np.uint8, zero_point=0), 6, negate=(5,)))
    assert v.reason is SkipReason.QUANTIZED and "negative on channel 5" in v.detail


@pytest.mark.parametrize("flag", [False, True])
def test_cli_requantize_bias_flag(tmp_path, flag: bool) -> None:
    """`--requantize-bias` folds the shift into the int32 bias (no Add; the report states the bound);
    without it the shift stays as one exact Add."""
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    src, dst = tmp_path / "q.onnx", tmp_path / "f.onnx"
    m = with_bn(qdq_layer("Conv", bias="int32"), 6, negate=(1,))
    onnx.save(m, src)
    args = ["fold", str(src), "-o", str(dst), "--json", "--atol", "1e-3"]
    r = CliRunner().invoke(app, args + (["--requantize-bias"] if flag else []))
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["verification"]["passed"] is True and data["summary"]["bn_after"] == 0
    (v,) = data["verdicts"]
    out = onnx.load(str(dst))
    ops = [n.op_type for n in out.graph.node]
    if flag:
        assert "half a step" in v["detail"] and "Add" not in ops
        b_q = dq_inputs(out, "dq_b")[0]
        assert b_q.tobytes() != inits(m)["b_q"].tobytes()  # the shift went into the integers
    else:
        assert "shift kept as one Add" in v["detail"] and ops[-1] == "Add"
    # the flag is scoped to the command: the library default is the exact fold again
    assert "shift kept as one Add" in fold_model(m)[1].sites[0].detail
