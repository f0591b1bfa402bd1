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

import bnfold
from bnfold.errors import BnfoldError
from bnfold.onnx import fold_model
from bnfold.records import Site, Skip, SkipReason
from models.onnx_graphs import G, check_fold, feeds_for, run

F64 = TensorProto.DOUBLE


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
