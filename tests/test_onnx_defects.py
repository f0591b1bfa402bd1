"""ONNX backend defects of issues 22 and 28: each test failed before its fix.

Every fold is checked by running the original and the folded model (onnxruntime, optimisations off, or
onnx's reference evaluator where onnxruntime has no kernel) and comparing outputs; every refusal by its
reason, with the rest of the model still folded and correct.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.errors import BnfoldError
from bnfold.onnx import fold_model
from bnfold.records import Site, Skip, SkipReason
from models.onnx_graphs import G, check_fold, feeds_for, run

F64 = TensorProto.DOUBLE


def cli(*args: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result: object, code: int = 2) -> str:
    """The single stderr line of a failed command (exit ``code``, no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)  # type: ignore[attr-defined]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), lines
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    return lines[0]


def verdict(model: onnx.ModelProto, bn: str) -> Site | Skip:
    """The dry-run verdict of the BN ``bn`` (the model is left unchanged)."""
    before = model.SerializeToString()
    out, report = fold_model(model, dry_run=True)
    assert out is model and model.SerializeToString() == before
    (v,) = [v for v in report.verdicts if v.bn == bn]
    return v


# ---- 22.1: attribute defaults are read as the schema types them ---------------------------------------
def test_float64_bn_without_epsilon_uses_the_float32_default() -> None:
    """BatchNormalization's epsilon is a FLOAT attribute: absent, it is float32(1e-5) = 9.99999974737875e-06
    (what onnxruntime uses), not the double 1e-5. With variances far below epsilon the difference is
    ~1e-9 of the output, far above float64 rounding."""
    g = G(F64, seed=3)
    g.node("Gemm", [g.input("x", [4, 6]), g.rand("w", (6, 5)), g.rand("b", (5,))], ["t"], name="gemm")
    bn = g.bn("t", "y", 5, "bn")
    var = next(t for t in g.inits if t.name == "bn.var")
    var.CopyFrom(onnx.numpy_helper.from_array(np.array([1e-10, 3e-9, 0.7, 1e-11, 1.3]), "bn.var"))
    assert not [a for a in bn.attribute if a.name == "epsilon"]
    g.output("y")
    check_fold(g.model(opset=15), tol=1e-13)


def test_opset6_bn_without_is_test_is_training_mode() -> None:
    """BatchNormalization-6's ``is_test`` defaults to 0 (training: batch statistics); the schema says so."""
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    g.output("y")
    v = verdict(g.model(opset=6), "bn")
    assert isinstance(v, Skip) and v.reason is SkipReason.TRAINING_MODE, v


# ---- 22.11: shapes are inferred (on a light copy) before matching --------------------------------------
def mlp(*, identity: bool = False, declare: bool = False) -> onnx.ModelProto:
    """``x[8, 6] -> Relu -> MatMul -> [Identity] -> BN1d -> MatMul``: only the input's shape is declared."""
    g = G(seed=5)
    g.node("Relu", [g.input("x", [8, 6])], ["xr"], name="relu0")
    g.node("MatMul", ["xr", g.rand("w1", (6, 5))], ["h"], name="mm1")
    src = "h"
    if identity:
        g.node("Identity", ["h"], ["hi"], name="id")
        src = "hi"
    g.bn(src, "hb", 5, "bn")
    g.node("Relu", ["hb"], ["r"], name="relu")
    g.node("MatMul", ["r", g.rand("w2", (5, 3))], ["y"], name="mm2")
    if declare:
        g.vi("h", [8, 5])
    g.output("y", shape=["N", 3])
    return g.model()


@pytest.mark.parametrize("identity", [False, True])
def test_matmul_bn_folds_with_inferred_rank(identity: bool) -> None:
    m = mlp(identity=identity)
    before = [v.SerializeToString() for v in m.graph.value_info]
    out, report = check_fold(m)
    assert [(s.bn, s.target_kind) for s in report.sites] == [("bn", "MatMul")]
    # the written model keeps its value_info as it was: nothing inferred is added
    assert [v.SerializeToString() for v in out.graph.value_info] == before == []


def test_shape_inference_failure_does_not_fail_the_fold() -> None:
    """A node inference cannot type (an unknown op of another domain) only means less is known."""
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "u", 4, "bn")
    g.node("Mystery", ["u"], ["y"], name="custom", domain="com.example")
    g.output("y", shape=[1, 4, 3, 3])
    m = g.model()
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    out, report = fold_model(m)
    assert [s.bn for s in report.sites] == ["bn"]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Mystery"]


# ---- 22.3: a MatMul product whose ranks disagree is not turned into a Gemm -----------------------------
def test_rank3_matmul_product_declared_rank2_is_refused() -> None:
    """``x[2, 4, 6] @ W`` has rank 3; a value_info declaring the BN output rank 2 must not make it a Gemm
    (Gemm takes rank-2 inputs only: the written model would not load)."""
    g = G(seed=7)
    g.node("MatMul", [g.input("x", [2, 4, 6]), g.rand("w", (6, 4))], ["h"], name="mm")
    g.bn("h", "hb", 4, "bn")
    g.vi("hb", [8, 4])  # wrong, but only onnxruntime would notice
    g.node("Relu", ["hb"], ["y"], name="relu")
    g.output("y")
    m = g.model()
    v = verdict(m, "bn")
    assert isinstance(v, Skip) and v.reason is SkipReason.LAYOUT, v
    assert "rank 2 or 3" in v.detail
    out, report = fold_model(m)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "BatchNormalization", "Relu"]


def test_inferred_rank_in_place_fold() -> None:
    """An in-place fold infers before it edits the model (mid-pass its graph is not inferable)."""
    m = mlp()
    ref = run(m, feeds_for(m))
    out, report = fold_model(m, inplace=True)
    assert out is m and [s.bn for s in report.sites] == ["bn"]
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(run(out, feeds_for(out))[0], ref[0], rtol=1e-5, atol=1e-5)


# ---- 22.4: a grouped layer whose weight does not fit its groups is a typed error ---------------------
def bad_groups(op: str) -> onnx.ModelProto:
    """A Conv / ConvTranspose whose weight's first axis (5) is not divisible by group=2, then a BN."""
    g = G(seed=2)
    x = g.input("x", [1, 5 if op == "ConvTranspose" else 4, 4, 4])
    w = g.rand("w", (5, 3, 3, 3) if op == "ConvTranspose" else (5, 2, 3, 3))
    g.node(op, [x, w], ["t"], name="layer", group=2)
    c = 6 if op == "ConvTranspose" else 5
    g.bn("t", "y", c, "bn")
    g.output("y", shape=[1, c, 6 if op == "ConvTranspose" else 2, 6 if op == "ConvTranspose" else 2])
    return g.model()


@pytest.mark.parametrize("op", ["ConvTranspose", "Conv"])
def test_weight_not_fitting_groups_is_a_typed_error(op: str, tmp_path: Path) -> None:
    m = bad_groups(op)
    before = m.SerializeToString()
    for call in (bnfold.fold_with_report, bnfold.inspect):
        with pytest.raises(BnfoldError, match="group=2 does not divide") as e:
            call(m)  # type: ignore[operator]
        assert e.value.exit_code == 2
    assert m.SerializeToString() == before
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    line = one_error_line(cli("fold", src, "-o", out))
    assert "group=2" in line and "ValueError" not in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert "ValueError" not in one_error_line(cli("inspect", src))


def test_weight_not_fitting_groups_stops_an_in_place_fold_before_any_edit() -> None:
    """The check runs before anything is edited: the other BN is not folded half-way."""
    g = G(seed=4)
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), g.rand("w0", (4, 3, 1, 1))], ["a"], name="first")
    g.bn("a", "b", 4, "bn0")
    g.node("ConvTranspose", ["b", g.rand("w", (4, 3, 1, 1))], ["t"], name="ct", group=3)
    g.bn("t", "y", 9, "bn")
    g.output("y", shape=[1, 9, 6, 6])
    m = g.model()
    before = m.SerializeToString()
    with pytest.raises(BnfoldError, match="ConvTranspose 'ct'"):
        fold_model(m, inplace=True)
    assert m.SerializeToString() == before


# ---- 28.8: node and graph names that are not UTF-8 ------------------------------------------------------
def non_utf8_names() -> bytes:
    """A valid model (onnx.checker passes) whose conv, one BN and the graph have names that are not UTF-8
    (one with an escape byte): serialised, since protobuf setters take only valid text."""
    g = G(seed=8)
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="QQconv")
    g.bn("t", "u", 4, "bn1").name = "QQbn"
    g.node("Relu", ["u"], ["r"], name="")
    g.bn("r", "y", 4, "bn2")
    g.output("y")
    m = g.model()
    m.graph.name = "QQg"
    raw = m.SerializeToString()
    for old, new in ((b"QQconv", b"conv\xff\xfe"), (b"QQbn", b"b\xff\x1bX"), (b"QQg", b"gg\xc3")):
        assert len(old) == len(new) and raw.count(old) == 1
        raw = raw.replace(old, new)
    return raw


def test_names_that_are_not_utf8_fold_and_are_carried(tmp_path: Path) -> None:
    raw = non_utf8_names()
    m = onnx.ModelProto()
    m.ParseFromString(raw)
    onnx.checker.check_model(m, full_check=True)
    assert m.graph.node[0].name == b"conv\xff\xfe"  # protobuf hands such a name out as bytes
    out, report = check_fold(m, bn_after=1)
    bn1 = "b\udcff\x1bX"  # surrogateescape: lossless, .encode("utf-8", "surrogateescape") gives the bytes
    assert [(s.bn, s.target) for s in report.sites] == [(bn1, "conv\udcff\udcfe")]
    assert bn1.encode("utf-8", "surrogateescape") == b"b\xff\x1bX"
    assert (
        out.graph.name == b"gg\xc3" and out.graph.node[0].name == b"conv\xff\xfe"
    )  # names kept as they were

    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    src.write_bytes(raw)
    r = cli("inspect", src, "-v")
    assert r.exit_code == 0, r.output
    assert "b\\xff\\x1bX" in r.stdout and "conv\\xff\\xfe" in r.stdout  # escaped for the terminal
    assert "\x1b" not in r.stdout and "\ufffd" not in r.stdout
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {v["bn"] for v in doc["verdicts"]} == {bn1, "bn2"}  # lossless through --json
    r = cli("fold", src, "-o", dst)
    assert r.exit_code == 0, r.output
    assert onnx.load(str(dst)).graph.node[0].name == b"conv\xff\xfe"
    r = cli("verify", src, dst)
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == raw
    # a candidate that differs: --locate names the BN and conv escaped, whoever prints the line
    bad = onnx.load(str(dst))
    w = next(t for t in bad.graph.initializer if t.name == "w")
    w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * 1.1, "w"))
    (tmp_path / "bad.onnx").write_bytes(bad.SerializeToString())
    r = cli("verify", src, tmp_path / "bad.onnx", "--locate")
    assert r.exit_code == 1, r.output
    assert "b\\xff\\x1bX" in r.stdout and "\x1b" not in r.output and "\ufffd" not in r.output


def test_value_names_that_are_not_utf8_are_one_clear_error(tmp_path: Path) -> None:
    """onnxruntime cannot run a model whose input/output names are not UTF-8: refused, typed, one line."""
    g = G()
    g.node("Conv", [g.input("x", [1, 3, 5, 5]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "QQy", 4, "bn")
    g.output("QQy")
    src = tmp_path / "m.onnx"
    src.write_bytes(g.model().SerializeToString().replace(b"QQy", b"y\xff\x1b"))
    for args in (("inspect", src), ("fold", src, "-o", tmp_path / "o.onnx"), ("verify", src, src)):
        line = one_error_line(cli(*args))
        assert "not valid UTF-8" in line and "y\\xff\\x1b" in line and "Decode" not in line
    m = onnx.load(str(src))
    with pytest.raises(BnfoldError, match="not valid UTF-8"):
        bnfold.fold_with_report(m)


# ---- 22.5: a BN bnfold cannot fold is left with a reason, never exit 2 -------------------------------
def spatial0_model() -> onnx.ModelProto:
    """Opset 7: a BN with ``spatial=0`` (per-(C, H, W) statistics) and a plain BN after it."""
    g = G(seed=1)
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "u", 4, "bn_sp", shape=(4, 4, 4), spatial=0)
    g.node("Conv", ["u", g.rand("w2", (5, 4, 1, 1))], ["v"], name="conv2")
    g.bn("v", "y", 5, "bn_ok")
    g.output("y", shape=[1, 5, 4, 4])
    return g.model(opset=7)


def test_spatial0_bn_is_left_and_the_rest_folds(tmp_path: Path) -> None:
    m = spatial0_model()
    out, report = bnfold.fold_with_report(m)
    assert [s.bn for s in report.sites] == ["bn_ok"]
    assert [(k.bn, k.reason) for k in report.skips] == [("bn_sp", SkipReason.SPATIAL)]
    check_fold(m, bn_after=1)
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["by_reason"] == {"spatial": 1}
    r = cli("fold", src, "-o", dst)
    assert r.exit_code == 0, r.output
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(dst)).graph.node) == 1


def test_spatial0_with_1d_statistics_on_4d_data_is_not_folded() -> None:
    """spatial=0 with [C] statistics on rank-4 data has no semantics (onnxruntime refuses it): left."""
    g = G(seed=1)
    g.node("Conv", [g.input("x", [1, 3, 6, 6]), g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "y", 4, "bn", spatial=0)
    g.output("y", shape=[1, 4, 4, 4])
    v = verdict(g.model(opset=7), "bn")
    assert isinstance(v, Skip) and v.reason is SkipReason.SPATIAL and "rank 4" in v.detail, v


def test_spatial0_bn1d_folds() -> None:
    """On 2-D data, [C] statistics are the per-element ones: the BN folds into the Gemm."""
    g = G(seed=6, dtype=F64)
    g.node("Gemm", [g.input("x", [3, 6]), g.rand("w", (6, 4)), g.rand("c", (4,))], ["t"], name="gemm")
    g.bn("t", "y", 4, "bn", spatial=0)
    g.output("y", shape=[3, 4])
    check_fold(g.model(opset=7))


# ---- 22.10: MatMul -> Reshape -> Transpose -> BN (onnxruntime's MatmulBNFusion path) -----------------
def matmul_route(
    route: list[tuple[str, object]],
    *,
    x_shape: list[int],
    d: int = 6,
    bias: bool = False,
    bn_c: int | None = None,
    dtype: int = F64,
) -> onnx.ModelProto:
    """``x @ W [+ b] -> route... -> BN -> Relu``; ``route`` is ``[(op, perm | shape | axis), ...]``."""
    g = G(dtype, seed=11)
    k = x_shape[-1]
    g.node("MatMul", [g.input("x", x_shape), g.rand("w", (k, d))], ["mm"], name="mm")
    src = "mm"
    if bias:
        g.node("Add", ["mm", g.rand("b", (d,))], ["mma"], name="bias")
        src = "mma"
    for i, (op, arg) in enumerate(route):
        out = f"r{i}"
        if op == "Transpose":
            g.node(op, [src], [out], name=f"{op}_{i}", perm=list(arg))  # type: ignore[call-overload]
        elif op == "Flatten":
            g.node(op, [src], [out], name=f"{op}_{i}", axis=int(arg))  # type: ignore[call-overload]
        else:
            g.node(op, [src, g.init(f"shape{i}", np.array(arg), np.int64)], [out], name=f"{op}_{i}")
        src = out
    g.bn(src, "bn_out", bn_c or d, "bn")
    g.node("Relu", ["bn_out"], ["y"], name="relu")
    g.output("y")
    return g.model()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    ("x_shape", "route"),
    [
        ([4, 5], [("Reshape", [4, 1, 6]), ("Transpose", [0, 2, 1])]),  # [B, C] -> [B, 1, C] -> [B, C, 1]
        ([2, 3, 5], [("Reshape", [6, 6]), ("Reshape", [2, 3, 6]), ("Transpose", [0, 2, 1])]),
        ([2, 3, 5], [("Transpose", [1, 0, 2]), ("Reshape", [0, -1, 6]), ("Transpose", [0, 2, 1])]),
        ([2, 3, 5], [("Flatten", 2), ("Reshape", [-1, 6, 1])]),
    ],
)
def test_matmul_reshape_transpose_bn_folds(
    x_shape: list[int], route: list[tuple[str, object]], bias: bool
) -> None:
    m = matmul_route(route, x_shape=x_shape, bias=bias)
    out, report = fold_model(m)
    assert [(s.bn, s.target) for s in report.sites] == [("bn", "mm")]
    onnx.checker.check_model(out, full_check=True)
    assert all(n.op_type != "BatchNormalization" for n in out.graph.node)
    assert len(out.graph.node) == len(m.graph.node) - (
        1 if bias else 0
    )  # the shift: into the bias, or one Add
    for seed in range(2):
        feeds = feeds_for(m, seed)
        np.testing.assert_allclose(run(out, feeds)[0], run(m, feeds)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("x_shape", "route", "bn_c"),
    [
        # [2, 3, 6] -> [2, 6, 3] by a Reshape: the column axis is split across axes 1 and 2
        ([2, 3, 5], [("Reshape", [2, 6, 3]), ("Transpose", [0, 1, 2])], 6),
        # the rows (not the columns) land on the BN channel axis
        ([6, 5], [("Reshape", [1, 6, 6]), ("Transpose", [0, 1, 2])], 6),
        # [2, 3, 6] -> [2, 18] -> [2, 6, 3]: 6 columns merged with rows, then cut at another stride
        ([2, 3, 5], [("Reshape", [2, 18]), ("Reshape", [2, 6, 3])], 6),
    ],
)
def test_matmul_route_that_moves_the_column_is_refused(
    x_shape: list[int], route: list[tuple[str, object]], bn_c: int
) -> None:
    m = matmul_route(route, x_shape=x_shape, bn_c=bn_c)
    v = verdict(m, "bn")
    assert isinstance(v, Skip) and v.reason is SkipReason.LAYOUT, v
    check_fold(m, bn_after=1)


def gemm_route(route: list[tuple[str, object]], *, trans_b: int = 0) -> onnx.ModelProto:
    """``x[4, 5] -> Gemm(alpha, beta, C) [6 features] -> route... -> BN -> Relu`` (float64)."""
    g = G(F64, seed=12)
    w = g.rand("w", (6, 5) if trans_b else (5, 6))
    g.node(
        "Gemm",
        [g.input("x", [4, 5]), w, g.rand("c", (6,))],
        ["gm"],
        name="gemm",
        alpha=0.7,
        beta=0.4,
        transB=trans_b,
    )
    src = "gm"
    for i, (op, arg) in enumerate(route):
        if op == "Transpose":
            g.node(op, [src], [f"r{i}"], name=f"{op}_{i}", perm=list(arg))  # type: ignore[call-overload]
        else:
            g.node(op, [src, g.init(f"shape{i}", np.array(arg), np.int64)], [f"r{i}"], name=f"{op}_{i}")
        src = f"r{i}"
    g.bn(src, "bn_out", 6, "bn")
    g.node("Relu", ["bn_out"], ["y"], name="relu")
    g.output("y")
    return g.model()


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(
    "route",
    [[("Reshape", [4, 6, 1])], [("Reshape", [2, 2, 6]), ("Transpose", [0, 2, 1])]],
)
def test_gemm_reshape_bn_folds_into_the_gemm(route: list[tuple[str, object]], trans_b: int) -> None:
    out, report = check_fold(gemm_route(route, trans_b=trans_b))
    assert [(s.bn, s.target, s.target_kind) for s in report.sites] == [("bn", "gemm", "Gemm")]


def test_gemm_reshape_that_moves_the_features_is_refused() -> None:
    """[4, 6] -> [2, 6, 2]: axis 1 has 6 entries, but not the Gemm's 6 features (rows and columns mixed)."""
    m = gemm_route([("Reshape", [2, 6, 2]), ("Transpose", [0, 1, 2])])
    v = verdict(m, "bn")
    assert isinstance(v, Skip) and v.reason is SkipReason.LAYOUT, v
    check_fold(m, bn_after=1)
