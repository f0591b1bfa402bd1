"""Backward folds (BN -> layer): the patterns bn-conv, bn-gemm, bn-flatten-gemm of :mod:`bnfold.patterns`,
through the no-ops of :mod:`bnfold.onnx.noops`.

The BN output must be read by one node only and must not be a graph output; after the fold that node
(the first no-op, the Flatten, or the layer) reads the BN input instead. bn-conv needs a Conv without
zero padding (padded zeros are not shifted by the BN); bn-gemm and bn-flatten-gemm contract the BN channel with the
layer's K axis (rank 2, or the K/C spatial positions after a Flatten from axis 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import NodeProto

from bnfold.fold_math import WeightLayout, fold_backward, fold_gemm_backward
from bnfold.records import Direction, Site, Skip, SkipReason

from .const import Array, ConstEvaluator, optional_input, resolve_weight, weight_and_bias
from .graph import GraphIndex, attr, name_of
from .match_qdq import dq_weight, match_qdq_backward
from .noops import walk_down
from .plan import BnParams, Fold, Write, conv_groups, finish, rank2_or_skip, tried

__all__ = ["match_backward", "reshape_flattens"]

Result = tuple[Fold | Skip, bool]


def reshape_flattens(index: GraphIndex, ev: ConstEvaluator, node: Any, x: str) -> bool:
    """True when ``Reshape(x, shape)`` provably computes ``Flatten(x, axis=1)`` (bn-flatten-gemm).

    Accepted targets: ``[0, -1]`` (dim 0 copied, the rest flattened, any rank); with the static
    shape of ``x`` known, ``[d0 | 0 | -1, prod(dims 1..)]`` and ``[d0, -1]``.
    """
    if len(node.input) < 2:
        return False
    v, _, _ = ev.resolve(node.input[1])
    if v is None or v.ndim != 1 or v.size != 2 or v.dtype.kind not in "iu":
        return False
    a, k = int(v[0]), int(v[1])
    copies_dim0 = a == 0 and not int(attr(node, "allowzero", 0))
    if copies_dim0 and k == -1:
        return True
    vt = index.value_type(x)
    shape = None if vt is None else vt.shape
    if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
        return False
    rest = 1
    for d in shape[1:]:
        rest *= int(d)  # type: ignore[arg-type]
    d0 = shape[0]
    if copies_dim0 or (a > 0 and d0 is not None and int(d0) == a):
        return k in (-1, rest)
    return a == -1 and k == rest


def match_backward(index: GraphIndex, ev: ConstEvaluator, bi: int, label: str, prm: BnParams) -> Result:
    """The backward verdict for the BN at ``bi``; the bool says whether a refusal names a foldable layer."""
    bn = index.nodes[bi]
    x, y = bn.input[0], bn.output[0]
    if y in index.graph_outputs:
        return Skip(
            label,
            SkipReason.GRAPH_OUTPUT,
            f"its output '{y}' is a graph output and nothing precedes it to fold into",
        ), False
    cons = index.consumers.get(y, [])
    if len(cons) != 1:
        what = "nothing" if not cons else f"{len(cons)} nodes"
        return Skip(
            label, SkipReason.NO_PRODUCER, f"nothing foldable before it, and {what} read its output"
        ), False
    first = cons[0]  # renamed to read x
    cur, chain = walk_down(index, ev, y)  # no-ops: Identity / inference Dropout after the BN
    ki = index.single_consumer(cur)
    if ki is None:
        return Skip(
            label,
            SkipReason.NO_PRODUCER,
            f"nothing foldable before it, and '{cur}' (after no-ops) "
            "is read by several nodes or is a graph output",
        ), False
    kn = index.nodes[ki]
    flat: int | None = None
    if index.nodes[first].input[0] != y:
        return Skip(
            label,
            SkipReason.NO_PRODUCER,
            "nothing foldable before it, and its output is not the data "
            f"input of {index.nodes[first].op_type} '{name_of(index.nodes[first])}'",
        ), False
    flattens = kn.op_type == "Reshape" and (
        reshape_flattens(index, ev, kn, cur) or reshape_flattens(index, ev, kn, x)
    )
    if kn.op_type == "Flatten" or flattens:
        if kn.op_type == "Flatten" and int(attr(kn, "axis", 1)) != 1:
            return Skip(label, SkipReason.LAYOUT, f"Flatten '{name_of(kn)}' after it has axis != 1"), True
        f_out = kn.output[0]
        after, chain2 = walk_down(index, ev, f_out)
        k2 = index.single_consumer(after)
        if (
            k2 is None
            or index.nodes[k2].op_type not in ("Gemm", "MatMul")
            or index.nodes[k2].input[0] != after
        ):
            return Skip(
                label,
                SkipReason.NO_PRODUCER,
                f"nothing foldable before it, and {kn.op_type} '{name_of(kn)}' does not feed one Gemm/MatMul",
            ), False
        flat, ki, kn, cur = ki, k2, index.nodes[k2], after
        chain = chain + chain2
    kind = kn.op_type
    if kind == "QuantizeLinear" and flat is None:
        return Skip(
            label,
            SkipReason.QUANTIZED,
            f"its output is quantized (QuantizeLinear '{name_of(kn)}'): without the BN that quantization "
            "would round and clip other values; fold before quantizing",
        ), True
    if kind not in ("Conv", "Gemm", "MatMul") or kn.domain not in ("", "ai.onnx"):
        specific = kind == "ConvTranspose"
        reason = SkipReason.UNSUPPORTED_LAYER if specific else SkipReason.NO_PRODUCER
        msg = (
            f"backward fold into ConvTranspose '{name_of(kn)}' is not exact (border outputs sum fewer taps)"
            if specific
            else f"nothing foldable before it, and its output goes to {kind} '{name_of(kn)}'"
        )
        return Skip(label, reason, msg), specific
    target = f"{kind} '{name_of(kn)}'"
    if kn.input[0] != cur or y in kn.input[1:] or cur in kn.input[1:]:
        return Skip(
            label, SkipReason.UNSUPPORTED_LAYER, f"its output is not the data input of {target}"
        ), True
    if prm.per_element:
        return Skip(
            label, SkipReason.SPATIAL, "spatial=0 statistics differ per position: not a per-channel scale"
        ), True
    via = [index.nodes[k].op_type for k in chain] + ([index.nodes[flat].op_type] if flat is not None else [])
    pattern = "bn-conv" if kind == "Conv" else "bn-gemm" if flat is None else "bn-flatten-gemm"
    detail = f"through {', '.join(via)}" if via else ""
    site = Site(label, index.label(ki), kind, Direction.BACKWARD, detail, pattern)
    base: dict[str, Any] = {"site": site, "remove": (bi,), "rename_input": (first, 0, x), "dropped": (y,)}
    locks = tuple(dict.fromkeys((ki, first) + (() if flat is None else (flat,))))
    c = Bwd(index, ev, kn, ki, label, prm, target, base, locks, x, y)
    if kind == "Conv":
        return tried(_case_conv(c), "bn-conv")
    return tried(_case_gemm(c, flat is not None), pattern)


@dataclass
class Bwd:
    """What every backward case reads: the BN, its parameters, and the layer ``ki`` that reads it.

    ``base`` and ``locks`` are the Fold fields every case shares (BN removed, the layer's data
    input renamed to ``x``; the nodes edited); ``target`` names the layer in messages.
    """

    index: GraphIndex
    ev: ConstEvaluator
    kn: NodeProto
    ki: int
    label: str
    prm: BnParams
    target: str
    base: dict[str, Any]
    locks: tuple[int, ...]
    x: str
    y: str


def _case_conv(c: Bwd) -> Result:
    """bn-conv: BN -> Conv with all pads zero: scale input channels, bias += W t."""
    ev, kn, ki, label, prm, target, base, locks = c.ev, c.kn, c.ki, c.label, c.prm, c.target, c.base, c.locks
    pads = list(attr(kn, "pads", []))
    auto_pad = attr(kn, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if any(int(v) != 0 for v in pads) or auto_pad not in ("NOTSET", "VALID"):
        return Skip(
            label,
            SkipReason.PADDING,
            f"{target} pads its input with zeros, which the BN shift "
            "would not reach; fold only convolutions without padding",
        ), True
    if dq_weight(c.index, kn) is not None:  # Case 16, backward: a quantized weight
        return match_qdq_backward(c.index, ev, ki, label, prm, base, locks)
    wb = weight_and_bias(ev, kn, label)
    if isinstance(wb, Skip):
        return wb, True
    w, b = wb
    g = conv_groups(kn, tuple(w.shape))
    if w.shape[1] * g != prm.channels:
        return Skip(
            label, SkipReason.LAYOUT, f"{target} has {w.shape[1] * g} input channels, the BN {prm.channels}"
        ), True
    w64, b64 = fold_backward(w, b, prm.scale, prm.shift, WeightLayout.conv(g))
    res = finish([w64, b64], w.dtype, label, f"weight or bias of {target}")
    if isinstance(res, Skip):
        return res, True
    return Fold(**base, locks=locks, writes=[Write(ki, 1, res[0]), Write(ki, 2, res[1])]), True


def _case_gemm(cx: Bwd, flat: bool) -> Result:
    """bn-gemm: BN -> Gemm (transA = 0) / MatMul on a rank-2 input; bn-flatten-gemm: after a Flatten(axis=1)."""
    ev, kn, ki, label, prm, target, base, locks = (
        cx.ev,
        cx.kn,
        cx.ki,
        cx.label,
        cx.prm,
        cx.target,
        cx.base,
        cx.locks,
    )
    kind = kn.op_type
    if kind == "Gemm" and int(attr(kn, "transA", 0)):
        return Skip(
            label, SkipReason.LAYOUT, f"{target} has transA=1: the BN channel is not its K axis"
        ), True
    if kind == "MatMul" and not flat:
        bad = rank2_or_skip(cx.index, cx.x, cx.y, label, f"the input of {target}", "the contracted axis")
        if bad is not None:
            return bad, True
    if dq_weight(cx.index, kn) is not None:  # Case 16, backward: a quantized weight
        return match_qdq_backward(cx.index, ev, ki, label, prm, base, locks, flat)
    bw = resolve_weight(ev, kn, 1, label, "weight")
    if isinstance(bw, Skip):
        return bw, True
    if bw.ndim != 2:
        return Skip(label, SkipReason.LAYOUT, f"the weight of {target} has rank {bw.ndim}"), True
    trans_b = kind == "Gemm" and bool(attr(kn, "transB", 0))
    c = prm.channels
    k = bw.shape[1] if trans_b else bw.shape[0]
    if k % c:
        return Skip(
            label, SkipReason.LAYOUT, f"{target} reads {k} features, not a multiple of the BN's {c}"
        ), True
    if not flat and k != c:
        return Skip(label, SkipReason.LAYOUT, f"{target} reads {k} features, the BN has {c}"), True
    reps = k // c
    s, t = prm.scale, prm.shift
    s_rep, t_rep = (np.repeat(s, reps), np.repeat(t, reps)) if reps > 1 else (s, t)
    cv: Array | None = None
    alpha = beta = 1.0
    if kind == "Gemm":
        opt = optional_input(ev, kn, 2, label, "C")
        if isinstance(opt, Skip):
            return opt, True
        cv = opt
        alpha, beta = float(attr(kn, "alpha", 1.0)), float(attr(kn, "beta", 1.0))
    b64, c64 = fold_gemm_backward(bw, cv, alpha, beta, s_rep, t_rep, trans_b)
    res = finish([b64, c64], bw.dtype, label, f"weight or bias of {target}")
    if isinstance(res, Skip):
        return res, True
    return Fold(
        **base,
        locks=locks,
        writes=[Write(ki, 1, res[0]), Write(ki, 2, res[1])],
        beta_one=(ki,) if kind == "Gemm" else (),
        to_gemm=ki if kind == "MatMul" else None,
    ), True
