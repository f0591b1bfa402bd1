"""Tiny ONNX graphs for tests and benchmarks: built with onnx.helper, run in onnxruntime.

Every comparison runs the *original* model in onnxruntime with graph optimisations disabled as the
reference, never the fold formula.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx import count_bn, fold_model

from .stats import bn_stats
from .testing import ATOL_F32_DEEP, run_onnx

# Tolerances relative to the output scale (max |reference|), per dtype:
# float32: a fold changes the rounding of each product: a few ulps over short sums (~1e-7 each).
TOL = {
    TensorProto.FLOAT: ATOL_F32_DEEP,
    # float64: same argument at 2e-16 per ulp.
    TensorProto.DOUBLE: 1e-11,
    # float16: weights rounded to 11 bits once more than the unfused model (~5e-4 each), plus the BN
    # itself computed in float16 by the reference.
    TensorProto.FLOAT16: 1e-2,
}
NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}


class G:
    """A tiny graph under construction."""

    def __init__(self, dtype: int = TensorProto.FLOAT, seed: int = 0) -> None:
        self.dtype = dtype
        self.np = NP.get(dtype, np.float32)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []

    def input(self, name: str, shape: list[int], dtype: int | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype or self.dtype, shape))
        return name

    def output(self, name: str, dtype: int | None = None, shape: list[int] | None = None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype or self.dtype, shape))
        return name

    def vi(self, name: str, shape: list[int]) -> None:
        self.value_info.append(helper.make_tensor_value_info(name, self.dtype, shape))

    def init(self, name: str, value: np.ndarray, dtype: Any = None) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(dtype or self.np), name))
        return name

    def rand(self, name: str, shape: tuple[int, ...], scale: float = 0.5) -> str:
        return self.init(name, self.rng.standard_normal(shape) * scale)

    def node(
        self, op: str, inputs: list[str], outputs: list[str], name: str = "", **attrs: Any
    ) -> onnx.NodeProto:
        n = helper.make_node(op, inputs, outputs, name=name or f"{op}_{len(self.nodes)}", **attrs)
        self.nodes.append(n)
        return n

    def bn(
        self,
        x: str,
        y: str,
        c: int,
        name: str,
        param_dtype: Any = None,
        shape: tuple[int, ...] | None = None,
        **attrs: Any,
    ) -> onnx.NodeProto:
        names = [f"{name}.{k}" for k in ("gamma", "beta", "mean", "var")]
        for n, v in zip(names, bn_stats(c, self.rng, shape)):
            self.init(n, v, param_dtype)
        return self.node("BatchNormalization", [x, *names], [y], name=name, **attrs)

    def model(self, opset: int = 17, ir_version: int | None = None) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "g", self.inputs, self.outputs, self.inits, value_info=self.value_info
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = ir_version or min(m.ir_version, 10)
        if m.ir_version < 4:  # IR 3: every initializer is also listed as a graph input
            for t in m.graph.initializer:
                m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        if any(not o.type.tensor_type.HasField("shape") for o in m.graph.output):
            inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(m).graph.output}
            for o in m.graph.output:
                if not o.type.tensor_type.HasField("shape") and o.name in inferred:
                    o.type.CopyFrom(inferred[o.name].type)
        return m


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.elem_type == TensorProto.BOOL:
            out[vi.name] = np.array(rng.random() < 0.5)
        else:
            out[vi.name] = rng.standard_normal(shape).astype(dt)
    return out


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run in onnxruntime (optimisations off); where it has no kernel for a dtype (double Conv, some
    float16 ops), run onnx's reference evaluator instead -- on both models alike."""
    try:
        return _run_ort(model, feeds)
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail):
        from onnx.reference import ReferenceEvaluator

        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]


def _run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_onnx(model, feeds)


def assert_close(ref: list[np.ndarray], got: list[np.ndarray], tol: float) -> None:
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(a64))) if a64.size else 1.0)
        err = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        assert err <= tol * scale, f"max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def check_fold(
    model: onnx.ModelProto,
    *,
    bn_after: int | None = 0,
    affine: bool = False,
    tol: float | None = None,
    seeds: int = 2,
    run_ort: bool = True,
):
    """Fold a copy, check the input is unchanged, the checker passes and every output agrees."""
    before = model.SerializeToString()
    out, report = fold_model(model, affine=affine)
    assert model.SerializeToString() == before, "the input model was changed"
    onnx.checker.check_model(out, full_check=True)
    assert len(report.verdicts) == report.bn_before == count_bn(model)
    assert report.bn_after == count_bn(out)
    if bn_after is not None:
        assert report.bn_after == bn_after, [v.to_dict() for v in report.verdicts]

    # interface kept
    def real_inputs(m: onnx.ModelProto) -> list[bytes]:
        inits = {t.name for t in m.graph.initializer}
        return [v.SerializeToString() for v in m.graph.input if v.name not in inits]

    assert real_inputs(out) == real_inputs(model)
    assert [v.SerializeToString() for v in out.graph.output] == [
        v.SerializeToString() for v in model.graph.output
    ]
    n_affine = sum(1 for v in report.sites if v.direction.value == "affine")
    n_shift = sum(1 for v in report.sites if "shift kept as one Add" in v.detail)  # the BN became an Add
    # propagated: at most one Add each, and a Mul where some channels keep their affine (issue 27)
    n_propagated = sum(
        1 + ("keep their affine" in v.detail) for v in report.sites if v.direction.value == "propagated"
    )
    n_copied = sum(1 for v in report.sites if "DequantizeLinear copied" in v.detail)  # a shared DQ copied
    assert len(out.graph.node) <= (
        len(model.graph.node)
        - (report.bn_before - report.bn_after)
        + 2 * n_affine
        + n_shift
        + n_propagated
        + n_copied
    )
    if run_ort:
        elem = model.graph.output[0].type.tensor_type.elem_type
        t = tol if tol is not None else TOL.get(elem, 2e-5)
        for s in range(seeds):
            feeds = feeds_for(model, s)
            assert_close(run(model, feeds), run(out, feeds), t)
    return out, report


def skip_reason(model: onnx.ModelProto, bn: str | None = None):
    """The single (or named) verdict of a dry run."""
    before = model.SerializeToString()
    out, report = fold_model(model, dry_run=True)
    assert out is model and model.SerializeToString() == before
    vs = [v for v in report.verdicts if bn is None or v.bn == bn]
    assert len(vs) == 1, [v.to_dict() for v in report.verdicts]
    return vs[0]


def qdq_layer(
    kind: str = "Conv",
    *,
    per_channel: bool = True,
    bias: str = "float",
    c_out: int = 6,
    negate: tuple[int, ...] = (),
    min_weight: bool = False,
    zero_point: int = 0,
    seed: int = 0,
    trans_b: int = 0,
    opset: int = 17,
    x_qdq: bool = True,
    wq_dtype: Any = np.int8,
) -> G:
    """``[Q/DQ(x)] -> kind(DequantizeLinear(w_q, s, z)[, bias]) -> BN -> y``, the BN still to add.

    ``bias``: "none", "float" or "int32" (int32 through DequantizeLinear with scale ``s_x * s_w``, as
    onnxruntime's quantizer writes it). ``negate``: channels whose BN gamma is made negative (by the
    caller through the returned graph's BN; listed here so that ``min_weight`` puts the integer minimum
    with zero point 0 into the first of them). Output name of the layer: "t"; BN: "bn" on "t" -> "y"."""
    g = G(seed=seed)
    rng = g.rng
    if kind in ("Conv", "ConvTranspose"):
        x = g.input("x", [2, 4, 6, 6])
        wshape = (c_out, 4, 3, 3) if kind == "Conv" else (4, c_out, 3, 3)
        axis = 0 if kind == "Conv" else 1
    else:
        x = g.input("x", [3, 5])
        wshape = (c_out, 5) if (kind == "Gemm" and trans_b) else (5, c_out)
        axis = 0 if (kind == "Gemm" and trans_b) else 1
    info = np.iinfo(wq_dtype)
    wq = rng.integers(max(info.min + 1, -100), min(info.max, 100), size=wshape).astype(wq_dtype)
    if min_weight and negate:
        idx = [slice(None)] * len(wshape)
        idx[axis] = negate[0]
        wq[tuple(idx)].flat[0] = info.min
    g.init("w_q", wq, wq_dtype)
    sw = (rng.uniform(0.002, 0.02, size=(c_out,)) if per_channel else np.array(0.01)).astype(np.float32)
    g.init("w_s", sw, np.float32)
    g.init("w_z", np.full(sw.shape, zero_point, wq_dtype), wq_dtype)
    g.node(
        "DequantizeLinear",
        ["w_q", "w_s", "w_z"],
        ["w"],
        name="dq_w",
        **({"axis": axis} if per_channel else {}),
    )
    sx = np.float32(0.03)
    if x_qdq:
        g.init("x_s", np.array(sx), np.float32)
        g.init("x_z", np.array(128, np.uint8), np.uint8)
        g.node("QuantizeLinear", [x, "x_s", "x_z"], ["x_q"], name="q_x")
        g.node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"], name="dq_x")
        x = "x_dq"
    ins = [x, "w"]
    if bias == "float":
        ins.append(g.rand("b", (c_out,)))
    elif bias == "int32":
        bs = (np.float64(sx) * np.broadcast_to(sw, (c_out,)).astype(np.float64)).astype(np.float32)
        g.init("b_q", rng.integers(-2000, 2000, size=(c_out,)).astype(np.int32), np.int32)
        g.init("b_s", bs, np.float32)
        g.node("DequantizeLinear", ["b_q", "b_s"], ["b"], name="dq_b", axis=0)
        ins.append("b")
    attrs: dict[str, Any] = {"transB": trans_b} if kind == "Gemm" else {}
    if kind in ("Conv", "ConvTranspose"):
        attrs["pads"] = [1, 1, 1, 1]
    g.node(kind, ins, ["t"], name="layer", **attrs)
    return g


def small_conv_bn(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    """``x (1, 3, 8, 8) -> Conv 3x3 (c) -> BN -> z`` with realistic statistics (mean != 0, var != 1,
    gamma != 1, beta != 0); the file-safety tests' model (c >= 10 puts the weight over the 1 KiB that goes
    to external data)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    stats = [
        rng.uniform(0.5, 2.0, c),
        rng.normal(0.3, 0.5, c),
        rng.normal(0.5, 1.0, c),
        rng.uniform(0.3, 3.0, c),
    ]
    inits = [numpy_helper.from_array(w, "W")]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in zip("sbmv", stats)]
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
            helper.make_node("BatchNormalization", ["y", "s", "b", "m", "v"], ["z"], name="bn", epsilon=1e-3),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, 6, 6])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
