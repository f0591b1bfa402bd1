"""A BN whose parameters the constant evaluator computes gets the same shape rule as initializers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold


def _conv_bn(scale_len: int) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    stats = {
        "g_src": rng.uniform(0.5, 2.0, scale_len).astype(np.float32),
        "b": rng.normal(0.3, 1.0, 4).astype(np.float32),
        "m": rng.normal(0.5, 1.0, 4).astype(np.float32),
        "v": rng.uniform(0.2, 3.0, 4).astype(np.float32),
    }
    inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(a, n) for n, a in stats.items()]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Identity", ["g_src"], ["g"], name="gamma_copy"),  # a computed scale
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_computed_scale_of_the_right_length_folds() -> None:
    model = _conv_bn(4)
    folded, report = bnfold.fold_with_report(model)
    assert report.folded == 1
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)


def test_computed_scale_of_another_length_is_a_typed_error() -> None:
    model = _conv_bn(3)
    before = model.SerializeToString()
    with pytest.raises(bnfold.errors.ModelFormatError, match="must be 1-D and of one length"):
        bnfold.inspect(model)
    with pytest.raises(bnfold.errors.ModelFormatError):
        bnfold.fold_with_report(model)
    assert model.SerializeToString() == before


def test_cli_says_one_line_and_exits_2(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn(3), src)
    out = tmp_path / "out.onnx"
    r = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "must be 1-D" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
