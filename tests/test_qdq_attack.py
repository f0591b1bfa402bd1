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

from bnfold.onnx import fold_model
from bnfold.onnx.match_qdq import requantize_int32_bias
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


BN_SCALES = {  # gamma, var per BN channel (4 channels)
    "uniform": ([0.8] * 4, [1.7] * 4),
    "uniform_negative": ([-0.8] * 4, [1.7] * 4),
    "zero": ([0.0] * 4, [1.7] * 4),
    "varied": ([0.8, -1.1, 1.3, 0.0], [1.7, 0.4, 2.2, 1.0]),
}


def pre_bn_layer(kind: str, bias: str, quant: str = "tensor", scales: str = "uniform") -> onnx.ModelProto:
    """``x -> BN -> kind(DequantizeLinear weight[, bias]) -> y`` with the weight quantized per
    "tensor", per "out" channel or per "in" channel; BN scales from :data:`BN_SCALES`."""
    g = G(seed=4)
    x = g.input("x", [2, 4, 5, 5] if kind == "Conv" else [3, 4])
    wshape = (6, 4, 3, 3) if kind == "Conv" else (4, 6)
    out_axis, in_axis = (0, 1) if kind == "Conv" else (1, 0)
    g.init("w_q", g.rng.integers(-100, 100, size=wshape), np.int8)
    axis = {} if quant == "tensor" else {"axis": out_axis if quant == "out" else in_axis}
    n = wshape[axis["axis"]] if axis else 1
    g.init("w_s", np.array(0.01) if quant == "tensor" else g.rng.uniform(0.002, 0.02, n), np.float32)
    g.init("w_z", np.full(() if quant == "tensor" else (n,), 3), np.int8)
    g.node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq_w", **axis)
    gamma, var = BN_SCALES[scales]
    for k, v in (
        ("gamma", gamma),
        ("beta", [0.3, -0.2, 0.1, 0.4]),
        ("mean", [-0.2, 0.5, 0.0, 0.3]),
        ("var", var),
    ):
        g.init(f"bn.{k}", np.asarray(v))
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


# ---- Forward: layer(DequantizeLinear weight) -> BN ----------------------------------------------
GAMMAS = {
    "negative": [0.8, -1.1, 1.3, 0.7, -0.6, 1.2],
    "zero_and_negative": [0.8, 0.0, 1.3, -0.7, 0.6, 0.0],
}
# (integer type, zero point): zero points in the middle and at both ends of each type
ZERO_POINTS = [(np.int8, 0), (np.int8, -128), (np.int8, 127), (np.uint8, 128), (np.uint8, 255)]


def negation_overflows(m: onnx.ModelProto, axis: int, gamma: list[float]) -> bool:
    """True when some integer of a channel with a negative BN scale leaves its type once negated
    around the zero point (2 z - w_q): the one case the forward fold must refuse."""
    vals = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    q, z = vals["w_q"], vals["w_z"]
    info = np.iinfo(q.dtype)
    for k, gk in enumerate(gamma):
        if gk < 0:
            zk = int(z.reshape(-1)[k if z.size > 1 else 0])
            flipped = 2 * zk - np.take(q, k, axis=axis).astype(np.int64)
            if flipped.min() < info.min or flipped.max() > info.max:
                return True
    return False


@pytest.mark.parametrize("gamma", sorted(GAMMAS))
@pytest.mark.parametrize(("dtype", "zero_point"), ZERO_POINTS)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize(
    ("kind", "bias"),
    [("Conv", "none"), ("Conv", "float"), ("Conv", "int32"), ("ConvTranspose", "int32"), ("Gemm", "int32"),
     ("MatMul", "none")],
)  # fmt: skip
def test_forward_exact_or_refused(
    kind: str, bias: str, per_channel: bool, dtype: type, zero_point: int, gamma: str
) -> None:
    g = qdq_layer(kind, bias=bias, per_channel=per_channel, zero_point=zero_point, wq_dtype=dtype)
    m = with_bn(g, 6, GAMMAS[gamma])
    axis = 1 if kind in ("ConvTranspose", "Gemm", "MatMul") else 0
    if negation_overflows(m, axis, GAMMAS[gamma]):
        v = skip_reason(m)
        assert v.reason is SkipReason.QUANTIZED and "would overflow" in v.detail, v.to_dict()
    else:
        check_fold(m, seeds=1)


@pytest.mark.parametrize(
    ("kind", "axis", "trans_b", "folds"),
    [("Conv", -4, 0, True), ("ConvTranspose", -3, 0, True), ("Gemm", -1, 0, True), ("Gemm", -2, 1, True),
     ("MatMul", -1, 0, True), ("Conv", 1, 0, False), ("Conv", -3, 0, False), ("ConvTranspose", 0, 0, False),
     ("Gemm", 0, 0, False), ("Gemm", 1, 1, False), ("MatMul", 0, 0, False)],
)  # fmt: skip
def test_quantization_axis(kind: str, axis: int, trans_b: int, folds: bool) -> None:
    # Negative axes that name the output channel fold; any other axis (the input channels of a
    # square weight, so the scale count matches) is refused.
    bias = "none" if kind == "MatMul" else "float"
    g = qdq_layer(kind, trans_b=trans_b, bias=bias, c_out=4 if kind in ("Conv", "ConvTranspose") else 5)
    next(a for a in next(n for n in g.nodes if n.name == "dq_w").attribute if a.name == "axis").i = axis
    c = 4 if kind in ("Conv", "ConvTranspose") else 5
    m = with_bn(g, c, [0.8, -1.1, 1.3, 0.7, 0.9][:c])
    if folds:
        check_fold(m, seeds=1)
    else:
        v = skip_reason(m)
        assert v.reason is SkipReason.QUANTIZED and "not per output channel" in v.detail


@pytest.mark.parametrize("opset", [10, 11, 12])
def test_per_tensor_below_opset_13_refused(opset: int) -> None:
    m = with_bn(qdq_layer("Conv", per_channel=False, x_qdq=False), 6, GAMMAS["negative"], opset=opset)
    v = skip_reason(m)
    assert v.reason is SkipReason.QUANTIZED and f"opset {opset} < 13" in v.detail


@pytest.mark.parametrize("name", ["w_q", "w_s", "w_z", "b_q", "b_s", "bn.gamma"])
def test_initializer_that_is_a_graph_input_refused(name: str) -> None:
    # A user can feed an initializer that is also a graph input: not a constant, never folded.
    m = with_bn(qdq_layer("Conv", bias="int32"), 6, GAMMAS["negative"])
    t = next(t for t in m.graph.initializer if t.name == name)
    m.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    v = skip_reason(m)
    assert (
        v.reason is SkipReason.NON_CONSTANT
        and f"'{name}' is an initializer that is also a graph input" in v.detail
    )


def half_scales(m: onnx.ModelProto, value: float | None = None) -> onnx.ModelProto:
    """The model in float16 (opset 19: float16 DequantizeLinear scales), weight scales set to ``value``."""
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            a = np.full_like(a, value) if value is not None and t.name == "w_s" else a
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16), t.name))
    for v in (*m.graph.input, *m.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    m.opset_import[0].version = 19
    return m


def test_half_scales_fold_within_float16_tolerance() -> None:
    m = half_scales(with_bn(qdq_layer("Conv", bias="int32"), 6, GAMMAS["zero_and_negative"]))
    check_fold(m, seeds=1)


@pytest.mark.parametrize(
    ("scale", "gamma", "what"), [(60.0, 3000.0, "not be finite"), (1e-4, 1e-4, "underflows")]
)
def test_half_scales_overflow_and_underflow_refused(scale: float, gamma: float, what: str) -> None:
    # s * a past float16's range (inf) or below its smallest subnormal (0): refused, never written.
    m = half_scales(with_bn(qdq_layer("Conv", bias="none"), 6, [gamma] * 6), scale)
    v = skip_reason(m)
    assert v.reason is SkipReason.OVERFLOW and what in v.detail, v.to_dict()


@pytest.mark.parametrize("elem", ["UINT4", "FLOAT8E4M3FN", "FLOAT8E5M2"])
def test_low_bit_weights_refused(elem: str) -> None:
    g = qdq_layer("Conv")
    dt = getattr(onnx.TensorProto, elem)
    for t in g.inits:
        if t.name in ("w_q", "w_z"):
            arr = numpy_helper.to_array(t).astype(np.float32)
            arr = np.clip(arr, 0, 15) if elem == "UINT4" else arr / 16
            t.CopyFrom(onnx.helper.make_tensor(t.name, dt, arr.shape, arr.flatten().tolist()))
    v = skip_reason(with_bn(g, 6, GAMMAS["negative"], opset=21))
    assert v.reason is SkipReason.QUANTIZED and "only 8/16/32-bit integers fold" in v.detail


@pytest.mark.parametrize("share", ["w_s", "w_q", "w_z", "all"])
@pytest.mark.parametrize("second_bn", [True, False])
def test_initializers_shared_by_two_dequantize_nodes(share: str, second_bn: bool) -> None:
    # Two DequantizeLinear nodes (two convs) read one initializer: the fold of one conv writes new
    # initializers, the other conv (folded or not) keeps reading the original values.
    g = qdq_layer("Conv", bias="float")
    for name in ("w_q", "w_s", "w_z"):
        t = next(t for t in g.inits if t.name == name)
        g.init(name + "2", numpy_helper.to_array(t)[::-1].copy(), numpy_helper.to_array(t).dtype)
    ins = [n if share in (n, "all") else n + "2" for n in ("w_q", "w_s", "w_z")]
    g.node("DequantizeLinear", ins, ["w2"], name="dq_w2", axis=0)
    g.node("Conv", ["x_dq", "w2"], ["t2"], name="other", pads=[1, 1, 1, 1])
    if second_bn:
        g.bn("t2", "y2", 6, "bn2")
        g.output("y2", shape=[2, 6, 6, 6])
    else:
        g.output("t2", shape=[2, 6, 6, 6])
    m = with_bn(g, 6, GAMMAS["negative"])
    check_fold(m, seeds=1)


def test_dequantized_weight_read_in_a_subgraph_is_copied() -> None:
    # The weight DequantizeLinear's output is read inside an If branch too: the branch keeps the
    # original weight, the folded conv reads a copy.
    g = qdq_layer("Conv", bias="int32")
    g.input("cond", [], onnx.TensorProto.BOOL)
    vi = onnx.helper.make_tensor_value_info
    then = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x_dq", "w"], ["e"], pads=[1, 1, 1, 1])],
        "then",
        [],
        [vi("e", onnx.TensorProto.FLOAT, [2, 6, 6, 6])],
    )
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x_dq"], ["f"])],
        "else",
        [],
        [vi("f", onnx.TensorProto.FLOAT, None)],
    )
    g.node("If", ["cond"], ["branch"], name="if", then_branch=then, else_branch=other)
    g.output("branch", shape=[2, 6, 6, 6])
    m = with_bn(g, 6, GAMMAS["negative"])
    out, rep = check_fold(m, seeds=1)  # feeds cond=True: the branch that reads the weight
    assert "shared DequantizeLinear copied" in rep.sites[0].detail


def test_qdq_fold_inside_an_if_branch() -> None:
    # The whole layer + BN inside a branch, its initializers in the enclosing graph.
    g = qdq_layer("Conv", bias="int32")
    body = with_bn(g, 6, GAMMAS["zero_and_negative"]).graph
    outer = G()
    outer.input("cond", [], onnx.TensorProto.BOOL)
    outer.input("x", [2, 4, 6, 6])
    outer.inits.extend(body.initializer)
    vi = onnx.helper.make_tensor_value_info
    then = onnx.helper.make_graph(list(body.node), "then", [], list(body.output))
    other = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["f"])], "else", [], [vi("f", onnx.TensorProto.FLOAT, None)]
    )
    outer.node("If", ["cond"], ["branch"], name="if", then_branch=then, else_branch=other)
    outer.output("branch", shape=None)
    m = outer.model(opset=17)
    out, rep = check_fold(m, seeds=1)
    assert rep.bn_after == 0 and "shift kept as one Add" in rep.sites[0].detail


def test_second_bn_after_the_shift_add_is_left() -> None:
    # layer(int32 bias) -> BN -> BN: the first becomes the exact Add; the second is left with its
    # reason (the dry run says so too), and the two-step result is still the original.
    g = qdq_layer("Conv", bias="int32")
    g.bn("t", "y1", 6, "bn")
    g.bn("y1", "y", 6, "bn2")
    g.output("y")
    m = g.model(opset=17)
    dry = [(v.bn, type(v).__name__) for v in fold_model(m, dry_run=True)[1].verdicts]
    out, rep = check_fold(m, bn_after=1, seeds=1)
    assert [(v.bn, type(v).__name__) for v in rep.verdicts] == dry


# ---- Backward: BN -> layer(DequantizeLinear weight) ---------------------------------------------
@pytest.mark.parametrize("scales", sorted(BN_SCALES))
@pytest.mark.parametrize("quant", ["tensor", "out", "in"])
@pytest.mark.parametrize(
    ("kind", "bias"), [("Conv", "float"), ("Conv", "none"), ("Gemm", "float"), ("MatMul", "none")]
)
def test_backward_exact_or_refused(kind: str, bias: str, quant: str, scales: str) -> None:
    # Exact only with one BN scale for every channel, or a weight quantized per input channel.
    m = pre_bn_layer(kind, bias, quant, scales)
    gamma, var = BN_SCALES[scales]
    if quant == "in" or (len(set(gamma)) == 1 and len(set(var)) == 1):
        out, rep = check_fold(m, seeds=1)
        assert rep.sites[0].direction.value == "backward"
    else:
        v = skip_reason(m)
        assert v.reason is SkipReason.QUANTIZED and "off its integer grid" in v.detail, v.to_dict()


def test_backward_into_padded_conv_refused() -> None:
    m = pre_bn_layer("Conv", "float")
    next(n for n in m.graph.node if n.name == "layer").attribute.append(
        onnx.helper.make_attribute("pads", [1, 1, 1, 1])
    )
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 5
    m.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 5
    v = skip_reason(m)
    assert v.reason is SkipReason.PADDING


# ---- The CLI: exit codes and one line, dry run agreeing with the fold ---------------------------
@pytest.mark.parametrize(
    "case", ["zero_scale_int32", "output_dtype", "negation_overflow", "backward_refused", "backward_folds"]
)
def test_cli_fold_and_inspect_agree(tmp_path, case: str) -> None:
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    models = {
        "zero_scale_int32": lambda: with_bn(
            qdq_layer("Conv", bias="int32"), 6, [0.8, 0.0, 1.3, 0.7, 0.0, 1.2]
        ),
        "output_dtype": lambda: half_scales_float_output(with_bn(qdq_layer("Conv", x_qdq=False), 6)),
        "negation_overflow": lambda: with_bn(
            qdq_layer("Conv", negate=(1,), min_weight=True), 6, [0.8, -1.1, 1.3, 0.7, 0.6, 1.2]
        ),
        "backward_refused": lambda: pre_bn_layer("Conv", "float", "tensor", "varied"),
        "backward_folds": lambda: pre_bn_layer("Gemm", "float", "in", "varied"),
    }
    src, dst = tmp_path / "q.onnx", tmp_path / "f.onnx"
    onnx.save(models[case](), src)
    before = src.read_bytes()
    r = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code == 0, r.output
    predicted = [(v["bn"], v["status"], v.get("reason")) for v in json.loads(r.stdout)["verdicts"]]
    r = CliRunner().invoke(app, ["fold", str(src), "-o", str(dst), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [(v["bn"], v["status"], v.get("reason")) for v in data["verdicts"]] == [
        (b, "folded" if s in ("folded", "would fold") else s, reason) for b, s, reason in predicted
    ]
    folds = any(s == "folded" for _, s, _ in predicted) or any(s == "would fold" for _, s, _ in predicted)
    # a fold is verified in onnxruntime and passes; nothing folded: nothing to verify
    assert (data["verification"] or {}).get("passed") is (True if folds else None)
    assert src.read_bytes() == before


@pytest.mark.parametrize("declared", ["graph_input_ir3", "value_info"])
def test_per_tensor_scale_made_per_channel_keeps_declarations_valid(declared: str) -> None:
    # A per-tensor scale and zero point rewritten in place become per-channel ([] -> [6]): where the
    # model also declares those initializers (as IR 3 graph inputs, or in value_info) the declared
    # shape must follow, or the folded model fails the checker (and, IR 3, onnxruntime's loader).
    g = qdq_layer("Conv", bias="int32", per_channel=False)
    m = with_bn(g, 6, GAMMAS["negative"])
    decl = [
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer
    ]
    if declared == "value_info":
        m.graph.value_info.extend(decl)
    else:
        m.ir_version = 3
        m.graph.input.extend(decl)
    check_fold(m, seeds=1)


@pytest.mark.parametrize("per_channel", [True, False])
def test_one_dequantize_read_by_a_forward_and_a_backward_fold(per_channel: bool) -> None:
    # conv1 -> bn1 (forward) and bn2 -> conv2 (backward, one BN scale) read one DequantizeLinear:
    # each fold gets its own scales, neither sees the other's.
    g = G(seed=5)
    x = g.input("x", [2, 4, 5, 5])
    g.init("w_q", g.rng.integers(-100, 100, size=(4, 4, 1, 1)), np.int8)
    g.init("w_s", g.rng.uniform(0.01, 0.02, 4) if per_channel else np.array(0.01), np.float32)
    g.node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", **({"axis": 0} if per_channel else {}))
    g.node("Conv", [x, "w"], ["t1"], name="conv1")
    g.bn("t1", "y1", 4, "bn1")
    for k, v in (("gamma", 0.9), ("beta", 0.2), ("mean", -0.3), ("var", 1.3)):
        g.init(f"bn2.{k}", np.full(4, v) + (np.arange(4) * 0.1 if k in ("beta", "mean") else 0))
    g.node("BatchNormalization", [x, "bn2.gamma", "bn2.beta", "bn2.mean", "bn2.var"], ["h2"], name="bn2")
    g.node("Conv", ["h2", "w"], ["y2"], name="conv2")
    g.output("y1", shape=[2, 4, 5, 5])
    g.output("y2", shape=[2, 4, 5, 5])
    out, rep = check_fold(g.model(opset=17), seeds=1)
    assert sorted(s.direction.value for s in rep.sites) == ["backward", "forward"]


def stated_bound(detail: str) -> float:
    """The requantisation bound a site's detail states (``|error| <= B``)."""
    import re

    found = re.search(r"\|error\| <= (\S+),", detail)
    assert found is not None, detail
    return float(found.group(1))


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_requantised_bias_error_within_the_stated_bound(direction: str, sign: float) -> None:
    # Weight scales may be negative (DequantizeLinear allows it; the bias scale s_x * s_w then is
    # too): the bound the report states is half a step in magnitude, and the outputs agree within it.
    from models.onnx_graphs import assert_close, feeds_for, run

    if direction == "forward":
        m = with_bn(qdq_layer("Gemm", bias="int32"), 6, GAMMAS["negative"])
    else:
        m = pre_bn_layer("Gemm", "int32", "in", "varied")
    for t in m.graph.initializer:
        if t.name in ("w_s", "b_s"):
            t.CopyFrom(numpy_helper.from_array(sign * numpy_helper.to_array(t), t.name))
    with requantize_int32_bias():
        out, rep = fold_model(m)
    bound = stated_bound(rep.sites[0].detail)
    assert bound > 0
    feeds = feeds_for(m)
    ref, got = run(m, feeds), run(out, feeds)
    assert_close(ref, got, 2e-5 + bound)  # relative to max(1, |output|): the absolute bound bounds it


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_zero_weight_scale_refused_with_its_reason(direction: str) -> None:
    # A weight scale that is already 0 is not an underflow of the fold: the reason says what it is.
    m = (
        with_bn(qdq_layer("Conv"), 6, GAMMAS["negative"])
        if direction == "forward"
        else pre_bn_layer("Gemm", "float", "in")
    )
    for t in m.graph.initializer:
        if t.name == "w_s":
            a = numpy_helper.to_array(t).copy()
            a[1] = 0
            t.CopyFrom(numpy_helper.from_array(a, "w_s"))
    v = skip_reason(m)
    assert v.reason is SkipReason.QUANTIZED and "a weight scale of" in v.detail and "is 0" in v.detail, (
        v.to_dict()
    )
