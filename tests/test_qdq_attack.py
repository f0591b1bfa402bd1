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
