"""Eval-time no-ops between a BN and its neighbour (walked by every pattern): Identity and inference Dropout.

``Identity(x) = x``; ``Dropout(x) = x`` when it does not train: opset >= 12 with the ``training_mode``
input absent or a constant false, opset 7-11 always (no training mode in inference), opset < 7 only
with ``is_test=1``. Its mask output, if declared, must be read by nobody (a mask is not a no-op's
output). A chain of such nodes is walked only while each value on it is read by the next node alone
and is not a graph output: after the fold those values carry the layer's (forward) or the BN input's
(backward) values, which nobody else may see.
"""

from __future__ import annotations

from onnx import NodeProto

from .const import ConstEvaluator
from .graph import GraphIndex, attr

__all__ = ["is_noop", "walk_up", "walk_down"]

_MAX_CHAIN = 64


def is_noop(index: GraphIndex, ev: ConstEvaluator, node: NodeProto) -> bool:
    """True when ``node`` provably returns its first input unchanged at inference."""
    if node.domain not in ("", "ai.onnx") or not node.input or not node.input[0]:
        return False
    if node.op_type == "Identity":
        return len(node.output) == 1
    if node.op_type != "Dropout":
        return False
    for extra in node.output[1:]:
        if extra and (index.n_uses(extra) or extra in index.graph_outputs):
            return False
    if ev.opset < 7:
        return int(attr(node, "is_test", 0, ev.opset)) == 1
    if ev.opset >= 12 and len(node.input) > 2 and node.input[2]:
        v, _, _ = ev.resolve(node.input[2])
        return v is not None and v.size == 1 and not bool(v.reshape(-1)[0])
    return True


def walk_up(index: GraphIndex, ev: ConstEvaluator, x: str) -> tuple[str, list[int]]:
    """From the value ``x``, step up through no-ops whose input is read by them alone.

    Returns ``(value, chain)``: the first value that is not a no-op's output-with-a-private-input, and the
    no-op node indices walked, nearest ``x`` first. ``x`` itself is not checked (the caller does).
    """
    chain: list[int] = []
    cur = x
    for _ in range(_MAX_CHAIN):
        p = index.producer.get(cur)
        if p is None or not is_noop(index, ev, index.nodes[p]):
            break
        src = index.nodes[p].input[0]
        if index.n_uses(src) != 1 or src in index.graph_outputs:
            break
        chain.append(p)
        cur = src
    return cur, chain


def walk_down(index: GraphIndex, ev: ConstEvaluator, y: str) -> tuple[str, list[int]]:
    """From the value ``y``, step down through no-ops that are its single reader, while each output
    is read once and is no graph output; returns the last value and the no-op indices, nearest first."""
    chain: list[int] = []
    cur = y
    for _ in range(_MAX_CHAIN):
        k = index.single_consumer(cur)
        if k is None or not is_noop(index, ev, index.nodes[k]) or index.nodes[k].input[0] != cur:
            break
        out = index.nodes[k].output[0]
        if out in index.graph_outputs or index.n_uses(out) != 1:
            break
        chain.append(k)
        cur = out
    return cur, chain
