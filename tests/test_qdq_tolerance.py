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
