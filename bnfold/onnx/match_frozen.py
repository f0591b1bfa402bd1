"""Pattern ``frozen-bn``: a frozen BN, ``layer -> Mul(constant) -> Add(constant)``.

When both constants are one value per output channel of a Conv / ConvTranspose / Gemm whose output
only the Mul reads, ``k * (W x + b) + d = (k W) x + (k b + d)``: it folds as cases 1-3, and both
nodes go. Anything else is left alone (no verdict: these are not BatchNormalization nodes).
"""

from __future__ import annotations

from onnx import NodeProto

from bnfold.fold_math import WeightLayout, fold_forward, fold_gemm_forward
from bnfold.records import Direction, Site, Skip

from .const import Array, ConstEvaluator, is_float
from .forward import per_channel
from .graph import GraphIndex, attr
from .plan import Fold, Write, conv_groups, finish

__all__ = ["match_mul_add"]


def match_mul_add(index: GraphIndex, ev: ConstEvaluator, ai: int) -> Fold | None:
    """Plan the fold of ``layer -> Mul(const) -> Add(const)`` (a frozen BN) at the Add ``ai``, or None."""
    add = index.nodes[ai]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    found = _producer_and_const(index, ev, add, ("Mul",))
    if found is None:
        return None
    mi, d = found
    found = _producer_and_const(index, ev, index.nodes[mi], ("Conv", "ConvTranspose", "Gemm"))
    if found is None:
        return None
    pi, cval = found
    return _fold_mul_add(index, ev, pi, mi, ai, cval, d)


def _producer_and_const(
    index: GraphIndex, ev: ConstEvaluator, node: NodeProto, ops: tuple[str, ...]
) -> tuple[int, Array] | None:
    """``(producer, constant)`` of a two-input node ``node`` whose one input comes from a node of
    type ``ops`` read only by ``node`` and whose other input is a float constant; else None.

    The first side whose producer has a type in ``ops`` decides: a second one is not tried."""
    for side in (0, 1):
        pi = index.producer.get(node.input[side])
        if pi is None or index.nodes[pi].op_type not in ops:
            continue
        if index.n_uses(index.nodes[pi].output[0]) != 1:
            return None
        val, _, _ = ev.resolve(node.input[1 - side])
        if val is None or not is_float(val):
            return None
        return pi, val
    return None


def _fold_mul_add(
    index: GraphIndex, ev: ConstEvaluator, pi: int, mi: int, ai: int, cval: Array, d: Array
) -> Fold | None:
    pn, mul, add = index.nodes[pi], index.nodes[mi], index.nodes[ai]
    label = f"{index.label(mi)}+{index.label(ai)}"
    w, _, _ = ev.resolve(pn.input[1]) if len(pn.input) > 1 else (None, None, "")
    if w is None or not is_float(w):
        return None
    b: Array | None = None
    if len(pn.input) > 2 and pn.input[2]:
        b, _, _ = ev.resolve(pn.input[2])
        if b is None:
            return None
    kind = pn.op_type
    if kind == "Gemm":
        trans_b = bool(attr(pn, "transB", 0))
        channels, rank = (w.shape[0] if trans_b else w.shape[1]), 2
    elif kind == "Conv":
        conv_groups(pn, tuple(w.shape))
        channels, rank = w.shape[0], w.ndim
    else:
        channels, rank = w.shape[1] * conv_groups(pn, tuple(w.shape)), w.ndim
    s = per_channel(cval, rank, channels)
    t = per_channel(d, rank, channels)
    if s is None or t is None:
        return None
    if kind == "Gemm":
        alpha, beta = float(attr(pn, "alpha", 1.0)), float(attr(pn, "beta", 1.0))
        if b is not None and b.ndim > 2:
            return None
        w64, b64 = fold_gemm_forward(w, b, alpha, beta, s, t, bool(attr(pn, "transB", 0)))
    else:
        g = conv_groups(pn, tuple(w.shape))
        layout = WeightLayout.conv(g) if kind == "Conv" else WeightLayout.conv_transpose(g)
        w64, b64 = fold_forward(w, b, s, t, layout)
    res = finish([w64, b64], w.dtype, label, "weight")
    if isinstance(res, Skip):
        return None
    site = Site(
        label, index.label(pi), kind, Direction.FORWARD, "per-channel Mul+Add (frozen BN)", "frozen-bn"
    )
    return Fold(
        site=site,
        remove=(mi, ai),
        locks=(pi,),
        writes=[Write(pi, 1, res[0]), Write(pi, 2, res[1])],
        rename_output=(pi, add.output[0]),
        beta_one=(pi,) if kind == "Gemm" else (),
        dropped=(pn.output[0], mul.output[0]),
    )
