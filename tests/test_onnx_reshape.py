"""BN -> Reshape -> Gemm (what the dynamo exporter writes for ``x.view(N, -1)``): folded backward only when
the Reshape provably flattens from axis 1, refused otherwise, and the model stays correct either way."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.records import Direction, SkipReason
from models.onnx_graphs import G, check_fold, skip_reason


def _model(target: list[int], *, declare_shape: bool, k: int = 12):
    g = G(seed=3)
    # Symbolic H, W (they run as 2 x 2): only a declared static shape proves what [-1, K] does.
    g.bn(g.input("x", [2, 3, "H", "W"]) if not declare_shape else g.input("x", [2, 3, 2, 2]), "t", 3, "bn")
    g.node("Reshape", ["t", g.init("shape", np.array(target), np.int64)], ["f"])
    g.node("Gemm", ["f", g.rand("W", (k, 5)), g.rand("C", (5,))], ["y"])
    g.output("y")
    return g.model()


@pytest.mark.parametrize(
    "target,declare",
    [([0, -1], False), ([-1, 12], True), ([2, -1], True), ([2, 12], True), ([0, 12], True)],
)
def test_reshape_that_flattens_folds(target: list[int], declare: bool) -> None:
    out, rep = check_fold(_model(target, declare_shape=declare))
    assert rep.sites[0].direction is Direction.BACKWARD
    assert "Reshape" in rep.sites[0].detail
    assert [n.op_type for n in out.graph.node] == ["Reshape", "Gemm"]


def test_reshape_without_shape_proof_is_left() -> None:
    """[-1, 12] flattens from axis 1 only if dims 1.. hold 12 elements: unknown without shapes."""
    m = _model([-1, 12], declare_shape=False)
    v = skip_reason(m)
    assert v.reason is SkipReason.NO_PRODUCER
    check_fold(m, bn_after=1)


def test_reshape_that_mixes_rows_is_left() -> None:
    """[-1, 6] splits each sample over two rows: channels land on other features; not a flatten."""
    m = _model([-1, 6], declare_shape=True, k=6)
    assert skip_reason(m).reason is SkipReason.NO_PRODUCER
    check_fold(m, bn_after=1)


def test_bn_nodes_sharing_a_name_get_distinct_verdicts() -> None:
    """ONNX does not require unique node names; the report must still tell the two BNs apart."""
    from models.onnx_graphs import G as Graph

    g = Graph(seed=4)
    g.node("Conv", [g.input("x", [2, 3, 5, 5]), g.rand("w", (4, 3, 1, 1))], ["a"], name="conv")
    g.bn("a", "b", 4, "bn")
    g.node("Relu", ["b"], ["r"])
    g.bn("r", "y", 4, "bn_two").name = "bn"  # same node name, own initializers
    g.output("y")
    _, rep = check_fold(g.model(), bn_after=1)
    assert sorted(v.bn for v in rep.verdicts) == ["bn", "bn#2"]
