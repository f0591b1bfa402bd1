"""``bnfold recalibrate`` on BNs inside ``If`` branches (nested too): each BN's statistics come from the
batches on which its branch ran, equal to float64 statistics computed independently with numpy; a BN
whose branch never runs is one line, exit 2, nothing written; a BN in a ``Loop`` body is refused.

The graph (the condition is computed from the data, as exporters write it)::

    h = Conv1x1(x);  m = ReduceMean(x)
    y = If(m > 0)
          then: a = bn_a(h) (training_mode=1); r = Relu(a)
                t = If(m > 1)  then: bn_n(r)   else: Identity(r)
          else: bn_c(2 * h)    (its statistics are initializers of the branch graph)
    z = bn_d(y)

The oracle runs that graph in numpy, float64, BN by BN in graph order with the BNs before it holding
their new statistics, and takes the statistics over the batches where each BN ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from bnfold.cli import app

runner = CliRunner()

OPSET = 15
# Statistics of float32 activations (onnxruntime) against float64 ones (numpy): a few float32 ulps of the
# activation's scale (a 3-term 1x1 conv, two BNs deep).
RTOL, ATOL = 2e-5, 2e-6
EPS = 1e-3
BNS = ("bn_a", "bn_n", "bn_c", "bn_d")  # graph order


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p: dict[str, np.ndarray] = {
        "w": rng.standard_normal((4, 3, 1, 1)) * 0.7,
        "wb": rng.standard_normal(4) * 0.2 + 0.1,
    }
    for bn in BNS:  # realistic statistics: mean != 0, var != 1, gamma != 1, beta != 0
        p[f"{bn}.g"] = rng.random(4) + 0.5
        p[f"{bn}.b"] = rng.standard_normal(4) * 0.2 + 0.1
        p[f"{bn}.mean"] = rng.standard_normal(4) * 0.5 + 0.3
        p[f"{bn}.var"] = rng.random(4) * 2 + 0.5
    return p


def _write(path: Path, p: dict[str, np.ndarray]) -> None:
    def init(name: str) -> Any:
        return numpy_helper.from_array(p[name].astype(np.float32), name)

    def bn(name: str, x: str, y: str, training: bool = False) -> Any:
        ins = [x, f"{name}.g", f"{name}.b", f"{name}.mean", f"{name}.var"]
        if training:  # what exporters write: running-statistics outputs nothing reads
            return helper.make_node(
                "BatchNormalization",
                ins,
                [y, f"{name}.rm", f"{name}.rv"],
                name=name,
                epsilon=EPS,
                training_mode=1,
            )
        return helper.make_node("BatchNormalization", ins, [y], name=name, epsilon=EPS)

    def vi(name: str) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4, 6, 6])

    inner_then = helper.make_graph([bn("bn_n", "r", "tn")], "inner_then", [], [vi("tn")])
    inner_else = helper.make_graph(
        [helper.make_node("Identity", ["r"], ["te"])], "inner_else", [], [vi("te")]
    )
    then = helper.make_graph(
        [
            bn("bn_a", "h", "a", training=True),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("If", ["c2"], ["t"], then_branch=inner_then, else_branch=inner_else, name="if2"),
        ],
        "then",
        [],
        [vi("t")],
    )
    other = helper.make_graph(
        [helper.make_node("Mul", ["h", "two"], ["e2"]), bn("bn_c", "e2", "ec")],
        "else",
        [],
        [vi("ec")],
        [init(f"bn_c.{k}") for k in ("g", "b", "mean", "var")],  # statistics held by the branch graph
    )
    nodes = [
        helper.make_node("Conv", ["x", "w", "wb"], ["h"]),
        helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["c1"]),
        helper.make_node("Greater", ["m", "one"], ["c2"]),
        helper.make_node("If", ["c1"], ["y"], then_branch=then, else_branch=other, name="if1"),
        bn("bn_d", "y", "z"),
    ]
    consts = [
        numpy_helper.from_array(np.array(v, np.float32), n)
        for n, v in (("zero", 0.0), ("one", 1.0), ("two", 2.0))
    ]
    main_inits = [init(k) for k in p if not k.startswith("bn_c.")]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [*main_inits, *consts],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))


def _bn(x: np.ndarray, p: dict[str, np.ndarray], name: str) -> np.ndarray:
    def c(v: np.ndarray) -> np.ndarray:
        return v.astype(np.float32).astype(np.float64).reshape(1, -1, 1, 1)  # the file holds float32

    return (x - c(p[f"{name}.mean"])) / np.sqrt(c(p[f"{name}.var"]) + EPS) * c(p[f"{name}.g"]) + c(
        p[f"{name}.b"]
    )


def _forward(
    x: np.ndarray, p: dict[str, np.ndarray], seen: dict[str, list[np.ndarray]], batch_stats: bool = False
) -> np.ndarray:
    """The graph in numpy, float64, BNs in inference mode (or normalising with the batch's statistics,
    biased variance, as in training); records every BN's input in ``seen``."""

    def f32(name: str) -> np.ndarray:
        return p[name].astype(np.float32).astype(np.float64)

    def bn(h: np.ndarray, name: str) -> np.ndarray:
        seen[name].append(h)
        if batch_stats:
            q = {**p, f"{name}.mean": h.mean(axis=(0, 2, 3)), f"{name}.var": h.var(axis=(0, 2, 3))}
            return _bn(h, q, name)
        return _bn(h, p, name)

    h = np.einsum("oc,nchw->nohw", f32("w")[:, :, 0, 0], x) + f32("wb").reshape(1, -1, 1, 1)
    m = x.mean()
    if m > 0:
        r = np.maximum(bn(h, "bn_a"), 0.0)
        y = bn(r, "bn_n") if m > 1 else r
    else:
        y = bn(2 * h, "bn_c")
    return bn(y, "bn_d")


def _oracle(
    p: dict[str, np.ndarray], data: list[np.ndarray], pooled: bool, prior: float | None = None
) -> dict[str, Any]:
    p = dict(p)
    out: dict[str, Any] = {}
    for name in BNS:
        seen: dict[str, list[np.ndarray]] = {n: [] for n in BNS}
        for b in data:
            _forward(b.astype(np.float64), p, seen)
        flat = [s.transpose(1, 0, 2, 3).reshape(s.shape[1], -1) for s in seen[name]]
        if pooled:
            allv = np.concatenate(flat, axis=1)
            mean, var = allv.mean(axis=1), allv.var(axis=1, ddof=1)
        else:
            mean = np.mean([f.mean(axis=1) for f in flat], axis=0)
            var = np.mean([f.var(axis=1, ddof=1) for f in flat], axis=0)
        if prior:
            # the file's statistics as `prior` samples of the size of the batches this BN saw: two pooled groups
            k_t = sum(f.shape[1] for f in flat)
            k_s = prior * k_t / sum(s.shape[0] for s in seen[name])
            ms = p[f"{name}.mean"].astype(np.float32).astype(np.float64)
            vs = p[f"{name}.var"].astype(np.float32).astype(np.float64)
            tot = k_s + k_t
            m2 = vs * (k_s - 1) + var * (k_t - 1) + (ms - mean) ** 2 * k_s * k_t / tot
            mean, var = (k_s * ms + k_t * mean) / tot, m2 / (tot - 1)
        p[f"{name}.mean"], p[f"{name}.var"] = mean, var
        out[name] = (mean, var, len(flat))
    return out


def test_upstream_batch_in_if_branches(tmp_path: Path) -> None:
    """``--upstream batch``: one pass, every BN (in the branches too) normalising with its batch."""
    p = _params()
    src, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx"
    _write(src, p)
    batches = _data(SHIFTS)
    _npz(data, batches)
    r = runner.invoke(
        app, ["recalibrate", str(src), str(out), "--data", str(data), "--upstream", "batch", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passes"] == 1
    seen: dict[str, list[np.ndarray]] = {n: [] for n in BNS}
    for b in batches:
        _forward(b.astype(np.float64), p, seen, batch_stats=True)
    got = _stats(out)
    for name in BNS:
        flat = [s.transpose(1, 0, 2, 3).reshape(s.shape[1], -1) for s in seen[name]]
        mean = np.mean([f.mean(axis=1) for f in flat], axis=0)
        var = np.mean([f.var(axis=1, ddof=1) for f in flat], axis=0)
        np.testing.assert_allclose(got[name][0], mean, rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got[name][1], var, rtol=RTOL, atol=ATOL, err_msg=name)


def _data(shifts: list[float], size: int = 5, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((size, 3, 6, 6)) * (1.2 + 0.2 * i) + s).astype(np.float32)
        for i, s in enumerate(shifts)
    ]


def _npz(path: Path, data: list[np.ndarray]) -> None:
    np.savez(path, **{f"x__{i}": b for i, b in enumerate(data)})


def _stats(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    m = onnx.load(str(path))
    arr = {t.name: numpy_helper.to_array(t) for g in _graphs(m.graph) for t in g.initializer}
    return {n: (arr[f"{n}.mean"], arr[f"{n}.var"]) for n in BNS}


def _graphs(g: Any) -> list[Any]:
    out = [g]
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g"):
                out += _graphs(a.g)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {q.name: q.read_bytes() for q in sorted(folder.iterdir()) if q.is_file()}


# batches that take: else, then, then+nested, else, then, then+nested
SHIFTS = [-1.0, 0.5, 1.6, -0.8, 0.4, 1.4]


@pytest.mark.parametrize(("pooled", "prior"), [(False, None), (True, None), (False, 6.0), (True, 6.0)])
def test_bns_in_if_branches_equal_float64_oracle(tmp_path: Path, pooled: bool, prior: float | None) -> None:
    p = _params()
    src, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx"
    _write(src, p)
    batches = _data(SHIFTS)
    _npz(data, batches)
    before = src.read_bytes()
    flags = [*(["--pooled"] if pooled else []), *(["--prior", str(prior)] if prior else [])]
    r = runner.invoke(app, ["recalibrate", str(src), str(out), "--data", str(data), "--json", *flags])
    assert r.exit_code == 0, r.output
    assert src.read_bytes() == before
    doc = json.loads(r.stdout)
    assert doc["passes"] == 3  # bn_a, bn_c: depth 0; bn_n: 1; bn_d: 2 (after the If)
    want = _oracle(p, batches, pooled, prior)
    got = _stats(out)
    per_bn = {c["bn"]: c for c in doc["bns"]}
    for name in BNS:
        np.testing.assert_allclose(got[name][0], want[name][0], rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got[name][1], want[name][1], rtol=RTOL, atol=ATOL, err_msg=name)
        assert per_bn[name]["batches"] == want[name][2], name
    # the batch counts: each BN counted only the batches on which its branch ran
    assert [want[n][2] for n in BNS] == [4, 2, 2, 6]
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    bn_a = next(n for g in _graphs(m.graph) for n in g.node if n.name == "bn_a")
    assert [a.name for a in bn_a.attribute if a.name == "training_mode"] == [] and len(bn_a.output) == 1
    # the written model computes the graph with the new statistics (inference mode)
    q = dict(p)
    for name in BNS:
        q[f"{name}.mean"], q[f"{name}.var"] = want[name][0], want[name][1]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for b in batches:
        ref = _forward(b.astype(np.float64), q, {n: [] for n in BNS})
        np.testing.assert_allclose(sess.run(None, {"x": b})[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("shifts", "bn"),
    [([-1.0, -0.5], "bn_a"), ([-1.0, 0.5], "bn_n"), ([0.5, 1.5], "bn_c")],
    ids=["then-never", "nested-never", "else-never"],
)
def test_bn_whose_branch_never_runs(tmp_path: Path, shifts: list[float], bn: str) -> None:
    src, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx"
    _write(src, _params())
    _npz(data, _data(shifts))
    before = _snapshot(tmp_path)
    r = runner.invoke(app, ["recalibrate", str(src), str(out), "--data", str(data)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("bnfold: error:") and f" {bn}: the If branch" in lines[0]
    ), lines
    assert "never runs" in lines[0] and "Traceback" not in r.output
    assert _snapshot(tmp_path) == before


def test_bn_in_a_loop_body_is_refused(tmp_path: Path) -> None:
    p = _params()

    def init(name: str) -> Any:
        return numpy_helper.from_array(p[name].astype(np.float32), name)

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node(
                "BatchNormalization",
                ["h", "bn_a.g", "bn_a.b", "bn_a.mean", "bn_a.var"],
                ["hb"],
                name="bn_in_loop",
            ),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("hb", TensorProto.FLOAT, ["N", 4, 6, 6]),
        ],
    )
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "wb"], ["h"]),
            helper.make_node("Loop", ["n", ""], ["hs"], body=body, name="loop"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("hs", TensorProto.FLOAT, ["K", "N", 4, 6, 6])],
        [
            init("w"),
            init("wb"),
            *[init(f"bn_a.{k}") for k in ("g", "b", "mean", "var")],
            numpy_helper.from_array(np.array(2, np.int64), "n"),
        ],
    )
    src, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "o.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)]), str(src))
    _npz(data, _data([0.5]))
    r = runner.invoke(app, ["recalibrate", str(src), str(out), "--data", str(data)])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "inside the Loop node 'loop'" in lines[0] and "only If branches" in lines[0], (
        lines
    )
    assert not out.exists()
