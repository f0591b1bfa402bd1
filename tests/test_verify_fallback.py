"""Verification where onnxruntime cannot run the model: float64 Conv, opsets below 7.

The fallback (``onnx.reference.ReferenceEvaluator``) must run such models, say so in the report, and
be as strict as onnxruntime: a wrong fold still fails.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.errors import NotComparableError
from bnfold.onnx import fold_model
from bnfold.verification import DEFAULT_TOLERANCES, REFERENCE_EVALUATOR, verify

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "models" / "samples"
runner = CliRunner()


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _bn_count(m: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def _run_ref(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]


def _conv_bn(dtype: int = T.DOUBLE, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BN -> Relu -> y, realistic BN statistics, in ``dtype``, at ``opset``."""
    rng = np.random.default_rng(seed)
    npdt = h.tensor_dtype_to_np_dtype(dtype)
    inits = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(npdt), "W"),
        nh.from_array(rng.standard_normal(4).astype(npdt), "B"),
        nh.from_array(rng.uniform(0.5, 1.5, 4).astype(npdt), "gamma"),
        nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(npdt), "beta"),
        nh.from_array(rng.uniform(-0.8, 0.8, 4).astype(npdt), "mean"),
        nh.from_array(rng.uniform(0.25, 2.5, 4).astype(npdt), "var"),
    ]
    bn_attrs: dict[str, object] = {"epsilon": 1e-3}
    if opset < 7:
        bn_attrs["is_test"] = 1
    if opset < 6:
        bn_attrs["consumed_inputs"] = [0, 0, 0, 1, 1]
    nodes = [
        h.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        h.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn", **bn_attrs
        ),
        h.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    inputs = [h.make_tensor_value_info("x", dtype, ["N", 3, 8, 8])]
    ir = 8
    if opset < 7:  # IR version 3: initializers are listed as graph inputs too
        ir = 3
        inputs += [h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info("y", dtype, ["N", 4, 8, 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=ir)


def test_float64_fold_verifies_with_the_reference_evaluator() -> None:
    ref = _conv_bn(T.DOUBLE)
    folded, report = fold_model(ref)
    assert report.folded == 1 and _bn_count(folded) == 0
    rep = verify(ref, folded, samples=2)
    assert rep.passed
    assert [r.runtime for r in rep.runtimes] == [REFERENCE_EVALUATOR, REFERENCE_EVALUATOR]
    assert all("Conv" in r.reason for r in rep.runtimes)  # onnxruntime's reason is kept
    assert 0 < rep.max_rel_error < DEFAULT_TOLERANCES["float64"].rtol
    d = rep.to_dict()
    assert d["runtimes"][0]["runtime"] == REFERENCE_EVALUATOR


def test_float32_still_runs_in_onnxruntime() -> None:
    ref = _conv_bn(T.FLOAT)
    rep = verify(ref, fold_model(ref)[0])
    assert rep.passed and [r.runtime for r in rep.runtimes] == ["onnxruntime", "onnxruntime"]
    assert all(r.reason == "" for r in rep.runtimes)


def test_fallback_is_as_strict_a_wrong_float64_fold_fails() -> None:
    ref = _conv_bn(T.DOUBLE)
    folded, _ = fold_model(ref)
    for i, t in enumerate(folded.graph.initializer):
        if t.dims == [4, 3, 3, 3]:
            a = nh.to_array(t).copy()
            a.flat[5] *= 1 + 1e-6  # 1e-6 of one weight: far below float32 resolution, far above float64's
            folded.graph.initializer[i].CopyFrom(nh.from_array(a, t.name))
    rep = verify(ref, folded)
    assert not rep.passed
    assert rep.worst() is not None and rep.worst().failure == "tolerance"  # type: ignore[union-attr]


@pytest.mark.parametrize("opset", [1, 5, 6])
def test_old_opsets_fold_and_verify(opset: int) -> None:
    ref = _conv_bn(T.FLOAT, opset=opset)
    folded, report = fold_model(ref)
    assert report.folded == 1 and _bn_count(folded) == 0
    rep = verify(ref, folded, samples=2)
    assert rep.passed
    assert rep.runtimes[0].runtime == REFERENCE_EVALUATOR
    assert "BatchNormalization" in rep.runtimes[0].reason


def test_legacy_batchnorm_matches_the_evaluators_own_batchnorm6() -> None:
    """The BatchNormalization-1 added for opsets 1-5 computes what the evaluator's BN-6 computes."""
    from bnfold.verification.runners import _inference_ops

    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    old, new = _conv_bn(T.FLOAT, opset=5), _conv_bn(T.FLOAT, opset=6)
    got = ReferenceEvaluator(old, new_ops=_inference_ops(old)).run(None, {"x": x})[0]
    want = _run_ref(new, {"x": x})[0]
    assert got.dtype == want.dtype
    # a few float32 roundings apart (the two evaluate the same formula in a different order)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))


def _bn_as_arithmetic(opset: int, spatial: int, dtype: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """x -> BatchNormalization (legacy opset, ``spatial``) and the same formula as Sub/Div/Mul/Add (opset 17)."""
    rng = np.random.default_rng(11)
    npdt = h.tensor_dtype_to_np_dtype(dtype)
    stat = (3, 4, 4) if spatial == 0 else (3,)
    vals = {
        "g": rng.uniform(0.5, 1.5, stat),
        "b": rng.uniform(-0.5, 0.5, stat),
        "m": rng.uniform(-0.8, 0.8, stat),
        "v": rng.uniform(0.25, 2.5, stat),
    }
    inits = [nh.from_array(a.astype(npdt), k) for k, a in vals.items()]
    attrs: dict[str, object] = {"epsilon": 1e-3, "spatial": spatial}
    if opset < 7:
        attrs["is_test"] = 1
    inputs = [h.make_tensor_value_info("x", dtype, [2, 3, 4, 4])]
    inputs += [h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]  # IR 3
    bn = h.make_graph(
        [h.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], **attrs)],
        "bn",
        inputs,
        [h.make_tensor_value_info("y", dtype, [2, 3, 4, 4])],
        inits,
    )
    shape = (3, 4, 4) if spatial == 0 else (3, 1, 1)
    arith_inits = [nh.from_array(a.reshape(shape).astype(npdt), k) for k, a in vals.items()]
    arith_inits.append(nh.from_array(np.array(1e-3, npdt), "eps"))
    arith = h.make_graph(
        [
            h.make_node("Sub", ["x", "m"], ["xm"]),
            h.make_node("Add", ["v", "eps"], ["ve"]),
            h.make_node("Sqrt", ["ve"], ["sd"]),
            h.make_node("Div", ["xm", "sd"], ["n"]),
            h.make_node("Mul", ["n", "g"], ["ng"]),
            h.make_node("Add", ["ng", "b"], ["y"]),
        ],
        "arith",
        [h.make_tensor_value_info("x", dtype, [2, 3, 4, 4])],
        [h.make_tensor_value_info("y", dtype, [2, 3, 4, 4])],
        arith_inits,
    )
    return (
        h.make_model(bn, opset_imports=[h.make_opsetid("", opset)], ir_version=3),
        h.make_model(arith, opset_imports=[h.make_opsetid("", 17)], ir_version=8),
    )


@pytest.mark.parametrize(("opset", "spatial"), [(5, 1), (6, 0), (7, 0), (8, 1)])
@pytest.mark.parametrize("dtype", [T.FLOAT, T.DOUBLE])
def test_legacy_batchnorm_semantics_against_plain_arithmetic(opset: int, spatial: int, dtype: int) -> None:
    """spatial=0 (per-element statistics) and opsets 7/8 (no is_test) run with inference semantics."""
    from bnfold.verification.runners import _inference_ops

    bn, arith = _bn_as_arithmetic(opset, spatial, dtype)
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(h.tensor_dtype_to_np_dtype(dtype))
    got = ReferenceEvaluator(bn, new_ops=_inference_ops(bn)).run(None, {"x": x})[0]
    want = _run_ref(arith, {"x": x})[0]
    rtol = DEFAULT_TOLERANCES[np.dtype(got.dtype).name].rtol
    assert got.dtype == want.dtype
    assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want))


def test_legacy_batchnorm_refuses_training_mode() -> None:
    bn, _ = _bn_as_arithmetic(6, 1, T.FLOAT)
    node = bn.graph.node[0]
    keep = [a for a in node.attribute if a.name != "is_test"]  # is_test defaults to 0: training
    del node.attribute[:]
    node.attribute.extend(keep)
    with pytest.raises(NotComparableError, match="training mode"):
        verify(bn, bn)


def test_a_model_no_runtime_can_run_is_not_comparable() -> None:
    ref = _conv_bn(T.FLOAT)
    bad = onnx.ModelProto()
    bad.CopyFrom(ref)
    bad.graph.node[2].op_type = "NoSuchOp"
    with pytest.raises(NotComparableError, match="onnxruntime cannot load.*reference evaluator cannot") as ei:
        verify(ref, bad)
    assert ei.value.exit_code == 2


def test_a_candidate_only_the_fallback_runs_is_refused() -> None:
    """The reference loads in onnxruntime, the candidate does not: never checked by the lenient fallback."""
    ref = _conv_bn(T.FLOAT)
    broken = onnx.ModelProto()
    broken.CopyFrom(fold_model(ref)[0])
    broken.opset_import[0].version = 5  # Conv/Relu-1 still run in the reference evaluator, not in onnxruntime
    broken.ir_version = 3
    broken.graph.input.extend(
        h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in broken.graph.initializer
    )
    with pytest.raises(
        NotComparableError, match="onnxruntime cannot load it although it loads the reference"
    ):
        verify(ref, broken)


@pytest.mark.parametrize(
    ("sample", "bn_before", "reason"),
    [("lenet5_fp64.onnx", 4, "Conv"), ("cnn_opset6.onnx", 2, "BatchNormalization")],
)
def test_cli_folds_and_verifies_the_fp64_and_old_opset_samples(
    tmp_path: Path, sample: str, bn_before: int, reason: str
) -> None:
    src = SAMPLES / sample
    before = _digest(src)
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["bn_before"] == bn_before and d["bn_after"] == 0
    v = d["verification"]
    assert v["passed"]
    ref_rt = v["runtimes"][0]
    assert (
        ref_rt["role"] == "reference"
        and ref_rt["runtime"] == REFERENCE_EVALUATOR
        and reason in ref_rt["reason"]
    )
    assert any(n.startswith("reference run with the ONNX reference evaluator") for n in d["notes"])
    assert _digest(src) == before
    # Independent check: both files run in the reference evaluator and agree.
    orig, folded = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert _bn_count(orig) == bn_before and _bn_count(folded) == 0
    inp = orig.graph.input[0]
    dtype = h.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    shape = [d.dim_value or 2 for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    a, b = _run_ref(orig, {inp.name: x})[0], _run_ref(folded, {inp.name: x})[0]
    rtol = DEFAULT_TOLERANCES[np.dtype(dtype).name].rtol
    assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(a))


def test_cli_verify_names_the_fallback_runtime(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert (
        runner.invoke(app, ["fold", str(SAMPLES / "lenet5_fp64.onnx"), "-o", str(out), "-q"]).exit_code == 0
    )
    r = runner.invoke(app, ["verify", str(SAMPLES / "lenet5_fp64.onnx"), str(out)])
    assert r.exit_code == 0, r.output
    assert "reference: ran with onnx.reference" in " ".join(r.stdout.split())
