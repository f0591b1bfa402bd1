"""Soundness attacks on scale propagation (issue 27; bnfold.onnx.propagate and bnfold.fx.propagate).

Each case builds a small model a propagated fold could get wrong (ops that look like they carry the
scale but do not, shapes that move the channel, forks, values that overflow in the model's dtype) and
checks what a user would: the folded model computes what the original computes (onnxruntime with
optimisations off / PyTorch in eval, against the original), the original is untouched, and the BN is
either propagated or left with a reason -- never a wrong output, never an exception (the suite runs
with warnings as errors, so a numpy overflow warning is an exception too). BN statistics are realistic
(mean != 0, var != 1, |gamma| != 1, beta != 0) unless the case is about the scale itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser

from bnfold.onnx import fold_model
from bnfold.records import Direction, Site, Skip
from models.onnx_graphs import assert_close, run
from models.testing import atol

C = 6
_NP = {"float": np.float32, "double": np.float64, "float16": np.float16}


def _bn_params(rng: np.random.Generator, gamma: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {
        "g": rng.uniform(0.5, 1.5, C) if gamma is None else np.asarray(gamma, np.float64),
        "b": rng.uniform(-0.5, 0.5, C),
        "m": rng.uniform(-0.5, 0.5, C),
        "v": np.exp(rng.uniform(-1.4, 0.9, C)),
    }


def _model(body: str, inits: dict[str, np.ndarray], dtype: str = "float", outs: str = "y") -> onnx.ModelProto:
    """``x (2, C, 4, 4) -> body -> outs`` in ONNX text; float initializers cast to ``dtype``."""
    out_decl = ", ".join(f"{dtype} {o.strip()}" for o in outs.split(","))
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"g ({dtype}[2, {C}, 4, 4] x) => ({out_decl}) {{\n{body}\n}}"
    )
    m = parser.parse_model(text)
    for o in m.graph.output:  # the parser declares a scalar; the outputs' shapes are left to inference
        o.type.tensor_type.ClearField("shape")
    for name, v in inits.items():
        arr = np.asarray(v)
        m.graph.initializer.append(
            numpy_helper.from_array(arr.astype(_NP[dtype]) if arr.dtype.kind == "f" else arr, name)
        )
    return m


def _fold_and_compare(m: onnx.ModelProto, dtype: str = "float") -> Any:
    before = m.SerializeToString()
    out, report = fold_model(m)
    assert m.SerializeToString() == before, "the input model was changed"
    feeds = {"x": np.random.default_rng(3).standard_normal((2, C, 4, 4)).astype(_NP[dtype])}
    assert_close(run(m, feeds), run(out, feeds), atol(_NP[dtype]))
    return report


_PRE = "p = Relu(x)\nh = BatchNormalization(p, g, b, m, v)\n"


@pytest.mark.parametrize("dtype", ["float16", "float", "double"])
def test_onnx_scale_whose_shift_overflows_the_dtype_is_refused_without_a_warning(dtype: str) -> None:
    """|b / a| beyond float16's range (a = 1e-6): the Add of ``b / a`` before a zero-padded conv would
    be inf in float16. Defect: the finiteness check cast with numpy's overflow warning on, so the fold
    raised RuntimeWarning under ``-W error`` instead of refusing. Now refused (float16) or exact."""
    rng = np.random.default_rng(0)
    w = {"w": rng.standard_normal((4, C, 3, 3)) * 0.4, "wb": rng.standard_normal(4) * 0.2}
    m = _model(
        _PRE + "q = Relu(h)\ny = Conv<pads=[1,1,1,1]>(q, w, wb)",
        {**_bn_params(rng, np.full(C, 1e-6)), **w},
        dtype,
    )
    report = _fold_and_compare(m, dtype)
    (verdict,) = report.verdicts
    if dtype == "float16":
        assert isinstance(verdict, Skip)
    else:
        assert isinstance(verdict, Site) and verdict.direction is Direction.PROPAGATED
