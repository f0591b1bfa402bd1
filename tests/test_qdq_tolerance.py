"""The default verification tolerance of a requantised int32 bias (``fold --requantize-bias``).

The fold is not exact by design there: each bias value moves by at most half a step of its new
scale, the bound the report states. Without ``--atol`` the outputs that bound reaches through
operators that keep it (Relu, reshapes, pooling, Add) are compared with it added; nothing else is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.verification.policy import bias_rounding_atol
from models.onnx_graphs import G, qdq_layer

W_SCALE = 0.05  # coarse weights: the requantised bias steps (0.03 * 0.05 * |a|) dwarf float32 rounding


def coarse_layer(after: str | None = None, seed: int = 2) -> onnx.ModelProto:
    """QDQ Conv (int8 weights at scale ~0.05, int32 bias) -> BN [-> ``after``] -> output."""
    g = qdq_layer("Conv", bias="int32", seed=seed)
    for t in g.inits:
        if t.name in ("w_s", "b_s"):
            v = numpy_helper.to_array(t).astype(np.float64)
            v = v * (W_SCALE / 0.011)  # the bias scale stays s_x * s_w
            t.CopyFrom(numpy_helper.from_array(v.astype(np.float32), t.name))
    g.bn("t", "y", 6, "bn")
    if after is None:
        g.output("y")
    elif after == "Relu":
        g.node("Relu", ["y"], ["z"], name="relu")
        g.output("z")
    else:  # an operator that amplifies: the bound does not pass it
        g.init("k", np.full((1, 6, 1, 1), 7.0, np.float32), np.float32)
        g.node("Mul", ["y", "k"], ["z"], name="mul")
        g.output("z")
    return g.model(opset=17)


def run_fold(tmp_path: Path, m: onnx.ModelProto, *extra: str) -> tuple[Any, dict[str, Any] | None]:
    src, dst = tmp_path / "q.onnx", tmp_path / "f.onnx"
    onnx.save(m, src)
    r = CliRunner().invoke(app, ["fold", str(src), "-o", str(dst), "--json", "--requantize-bias", *extra])
    try:
        data = json.loads(r.stdout)
    except ValueError:
        data = None
    return r, data


@pytest.mark.parametrize("after", [None, "Relu"])
def test_requantised_bias_passes_default_verification(tmp_path: Path, after: str | None) -> None:
    m = coarse_layer(after)
    r, data = run_fold(tmp_path, m)
    assert r.exit_code == 0, r.output
    assert data is not None and data["verification"]["passed"] is True
    assert data["summary"]["bn_after"] == 0
    (v,) = data["verdicts"]
    bound = v["bias_rounding"]["bound"]
    assert v["bias_rounding"]["value"] == "y" and f"|error| <= {bound:.3g}" in v["detail"]
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(resources.files("bnfold").joinpath("schemas/report-v1.json").read_text("utf-8"))
    jsonschema.validate(data, schema)  # the new field is in the schema
    out = "y" if after is None else "z"
    assert any(f"'{out}' {bound:.3g}" in n for n in data["notes"]), data["notes"]
    # The rounding is real: the largest error is past what the default tolerance allows (it failed
    # before the bound was added), and within the bound plus that default.
    (o,) = data["verification"]["outputs"]
    scale = o["max_abs_error"] / o["max_rel_error"]
    assert 1e-5 * scale < o["max_abs_error"] <= bound + 1e-5 * scale


def test_requantised_bias_atol_given_is_kept(tmp_path: Path) -> None:
    # The user's --atol wins: no widening, no note.
    r, data = run_fold(tmp_path, coarse_layer(), "--atol", "1e-2")
    assert r.exit_code == 0, r.output
    assert data is not None and not any("atol widened" in n for n in data["notes"])


def test_wrong_fold_of_that_size_still_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold whose bias is off by 10x the stated bound on one channel is still not equivalent."""
    import bnfold.files.fold as ff

    original = ff._fold_onnx

    def corrupt(*args: Any, **kwargs: Any) -> Any:
        report, model = original(*args, **kwargs)
        inits = {t.name: t for t in model.graph.initializer}
        dq_b = next(n for n in model.graph.node if n.name == "dq_b")
        q, s = (numpy_helper.to_array(inits[i]) for i in dq_b.input[:2])
        k = int(np.argmax(np.abs(s)))
        q = q.copy()
        q[k] += 20  # 20 steps of the largest scale: 10x the bound (half a step)
        inits[dq_b.input[0]].CopyFrom(numpy_helper.from_array(q, dq_b.input[0]))
        return report, model

    monkeypatch.setattr(ff, "_fold_onnx", corrupt)
    r, data = run_fold(tmp_path, coarse_layer())
    assert r.exit_code == 1, r.output
    assert data is not None and data["verification"]["passed"] is False
    assert not (tmp_path / "f.onnx").exists()


def test_bound_stops_at_an_amplifying_operator(tmp_path: Path) -> None:
    m = coarse_layer("Mul")
    _, data = run_fold(tmp_path, m, "--atol", "1")  # the fold itself is fine: check the policy
    assert data is not None
    folded = onnx.load(str(tmp_path / "f.onnx"))
    (v,) = data["verdicts"]
    value, bound = v["bias_rounding"]["value"], v["bias_rounding"]["bound"]
    assert bias_rounding_atol(folded, [(value, bound)]) == {}
    # Without --atol: the default tolerance, the note says why, and the 7x amplified rounding fails it.
    (tmp_path / "f.onnx").unlink()
    r, data = run_fold(tmp_path, m)
    assert r.exit_code == 1 and data is not None
    assert any(
        "'layer' reaches the outputs only through operators that may amplify" in n for n in data["notes"]
    )


def test_bound_propagation_rules() -> None:
    """Relu/Reshape keep the bound, Add sums two, Concat takes the largest, Mul or Conv stop it."""
    g = G(seed=0)
    g.input("a", [1, 2, 3, 3])
    g.input("b", [1, 2, 3, 3])
    g.init("shape", np.array([1, -1], np.int64), np.int64)
    g.init("two", np.full((1,), 2.0, np.float32), np.float32)
    g.node("Relu", ["a"], ["ra"], name="r")
    g.node("Reshape", ["ra", "shape"], ["o_keep"], name="rs")
    g.node("Add", ["a", "b"], ["o_sum"], name="add")
    g.node("Concat", ["a", "b"], ["o_cat"], name="cat", axis=1)
    g.node("Mul", ["a", "two"], ["o_mul"], name="mul")
    for o in ("o_keep", "o_sum", "o_cat", "o_mul"):
        g.output(o)
    m = g.model(opset=17)
    got = bias_rounding_atol(m, [("a", 1e-3), ("b", 2e-3)])
    assert set(got) == {"o_keep", "o_sum", "o_cat"}
    assert got["o_keep"] == pytest.approx(1e-3) and got["o_sum"] == pytest.approx(3e-3)
    assert got["o_cat"] == pytest.approx(2e-3)


# ------------------------------------------------------------------ fold_quant on QDQ weights
def dequantized_weight(m: onnx.ModelProto, layer: str) -> np.ndarray:
    """The layer's weight as DequantizeLinear computes it: (q - z) * s, s and z along ``axis``."""
    node = next(n for n in m.graph.node if n.name == layer)
    dq = next(n for n in m.graph.node if n.output[0] == node.input[1])
    vals = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    q = vals[dq.input[0]].astype(np.float64)
    s = vals[dq.input[1]].astype(np.float64)
    z = vals[dq.input[2]].astype(np.float64) if len(dq.input) > 2 else np.zeros_like(s)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    shape = [1] * q.ndim
    if s.size > 1:
        shape[axis] = -1
    return (q - z.reshape(shape)) * s.reshape(shape)


def expected_ranges(w: np.ndarray, out_axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(w, out_axis, 0)).reshape(w.shape[out_axis], -1).max(axis=1)


def pre_bn_conv() -> onnx.ModelProto:
    """``x -> BN -> Conv(DequantizeLinear(w_q, s, z, axis=1))``: quantized per input channel, the axis
    the backward fold scales (not the output axis the readiness ranges are taken on)."""
    g = G(seed=5)
    g.input("x", [2, 4, 5, 5])
    g.init("w_q", g.rng.integers(-100, 100, size=(6, 4, 3, 3)), np.int8)
    g.init("w_s", np.array([0.01, 0.004, 0.02, 0.008]), np.float32)
    g.init("w_z", np.array([3, -2, 0, 5]), np.int8)
    g.node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq_w", axis=1)
    for k, v in (("gamma", [0.9, 1.7, 0.4, 1.2]), ("beta", [0.3, -0.2, 0.1, 0.4])):
        g.init(f"bn.{k}", np.asarray(v))
    g.init("bn.mean", np.asarray([-0.2, 0.5, 0.0, 0.3]))
    g.init("bn.var", np.asarray([1.3, 0.6, 2.0, 0.9]))
    g.node("BatchNormalization", ["x", "bn.gamma", "bn.beta", "bn.mean", "bn.var"], ["h"], name="bn")
    g.node("Conv", ["h", "w"], ["y"], name="layer")
    g.output("y")
    return g.model(opset=17)


@pytest.mark.parametrize(
    ("kind", "trans_b", "per_channel", "out_axis"),
    [
        ("Conv", 0, True, 0),
        ("Conv", 0, False, 0),
        ("ConvTranspose", 0, True, 1),
        ("Gemm", 0, True, 1),
        ("Gemm", 1, False, 0),
        ("MatMul", 0, True, 1),
        ("backward", 0, False, 0),
    ],
)
def test_fold_quant_reads_dequantized_weights(
    kind: str, trans_b: int, per_channel: bool, out_axis: int
) -> None:
    """Every fold's int8-readiness summary includes layers whose weight comes through
    DequantizeLinear: the per-channel ranges of the weight it dequantizes to."""
    from bnfold.api import fold_with_report

    if kind == "backward":
        m = pre_bn_conv()
    else:
        g = qdq_layer(kind, per_channel=per_channel, trans_b=trans_b, zero_point=2, seed=1)
        g.bn("t", "y", 6, "bn")
        g.output("y")
        m = g.model(opset=17)
    out, rep = fold_with_report(m)
    assert rep.bn_after == 0
    (rec,) = rep.quant
    ranges = expected_ranges(dequantized_weight(out, rec.layer), out_axis)
    assert rec.layer == "layer" and rec.channels == ranges.size
    assert rec.max_range == pytest.approx(ranges.max(), rel=1e-12)
    assert rec.worst_channel == int(np.argmax(ranges))
    assert rec.ratio == pytest.approx(ranges.max() / np.median(ranges), rel=1e-12)


def test_fold_quant_flags_a_tiny_variance_channel_of_a_qdq_layer() -> None:
    from bnfold.api import fold_with_report
    from bnfold.health_records import QUANT_RATIO_FLAG

    g = qdq_layer("Conv", seed=1)
    g.bn("t", "y", 6, "bn")
    g.output("y")
    m = g.model(opset=17)
    var = next(t for t in m.graph.initializer if t.name == "bn.var")
    v = numpy_helper.to_array(var).copy()
    v[4] = 1e-9  # the channel saw a constant input: its BN scale ~ gamma / sqrt(eps)
    var.CopyFrom(numpy_helper.from_array(v, "bn.var"))
    _, rep = fold_with_report(m)
    (rec,) = rep.quant
    assert rec.worst_channel == 4 and rec.ratio >= QUANT_RATIO_FLAG


@pytest.mark.parametrize("kind", ["Conv", "Gemm"])
def test_backward_requantised_bias_passes_default_verification(tmp_path: Path, kind: str) -> None:
    """BN -> QDQ layer with an int32 bias: the requantised bias is the layer's own output."""
    from test_qdq_attack import pre_bn_layer

    r, data = run_fold(tmp_path, pre_bn_layer(kind, "int32", "in", "varied"))
    assert r.exit_code == 0, r.output
    assert data is not None and data["verification"]["passed"] is True
    (v,) = data["verdicts"]
    assert v["direction"] == "backward" and v["bias_rounding"]["value"] == "y"
    (o,) = data["verification"]["outputs"]
    scale = o["max_abs_error"] / o["max_rel_error"]
    assert 1e-5 * scale < o["max_abs_error"] <= v["bias_rounding"]["bound"] + 1e-5 * scale
