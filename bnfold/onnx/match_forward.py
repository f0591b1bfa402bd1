"""Forward folds (layer -> BN): the cases 1-7 of :mod:`bnfold.onnx.match`, one function per case.

Every case returns ``(verdict, specific)``: a :class:`~bnfold.onnx.plan.Fold` or a
:class:`~bnfold.records.Skip`, and whether a refusal names a foldable layer (it is then reported rather
than the backward matcher's generic NO_PRODUCER). The routes (Concat, sums of branches: cases 8-9)
live in :mod:`bnfold.onnx.match_routes`; the no-ops walked first (case 13) in :mod:`bnfold.onnx.noops`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.fold_math import WeightLayout, fold_gemm_forward
from bnfold.records import Direction, Site, Skip, SkipReason

from .const import Array, ConstEvaluator, is_float, resolve_weight, weight_and_bias
from .graph import GraphIndex, attr, name_of
from .noops import walk_up
from .plan import BnParams, Fold, Write, conv_groups, finish, rank2_or_skip, scale_out

__all__ = [
    "Fwd",
    "match_forward",
    "common",
    "exclusive",
    "per_channel",
    "conv_layout",
    "gemm_fold",
    "layer_writes",
    "matmul_weight",
    "LAYERS",
]

Result = tuple[Fold | Skip, bool]
F64 = np.ndarray[Any, np.dtype[np.float64]]

LAYERS = ("Conv", "ConvTranspose", "Gemm")
"""Layers whose output channels can absorb a per-channel scale (and a bias shift) in any route."""


@dataclass(slots=True)
class Fwd:
    """What every forward case reads: the BN, its parameters, and the value the layer produced.

    ``src`` is the BN input with the no-ops above it walked (case 13); ``head`` the node writing the
    BN input itself (the last no-op, or the layer / route node), whose output is renamed to ``y``.
    """

    index: GraphIndex
    ev: ConstEvaluator
    bi: int
    label: str
    prm: BnParams
    x: str
    y: str
    src: str
    head: int
    chain: list[int]

    def base(self, target: int, kind: str, detail: str = "") -> dict[str, Any]:
        """The Fold fields every forward case shares: BN removed, ``head`` renamed to ``y``."""
        if self.chain:
            detail = "; ".join(
                filter(
                    None,
                    [
                        detail,
                        "through " + ", ".join(self.index.nodes[k].op_type for k in reversed(self.chain)),
                    ],
                )
            )
        site = Site(self.label, self.index.label(target), kind, Direction.FORWARD, detail)
        return {
            "site": site,
            "remove": (self.bi,),
            "rename_output": (self.head, self.y),
            "dropped": (self.x,),
        }

    def locks(self, *nodes: int) -> tuple[int, ...]:
        """The nodes edited: ``nodes`` and the head (renamed)."""
        return tuple(dict.fromkeys((*nodes, self.head)))


def exclusive(c: Fwd, value: str, target: str, *, kept: bool = False) -> Skip | None:
    """Refuse when ``value`` (a layer output the fold scales) is a graph output or read by another node
    than the one the route expects (``n_uses`` must be 1).

    ``kept``: the value keeps its name after the fold, so Shape/Size readers (which see only its
    unchanged shape) do not count."""
    idx = c.index
    if value in idx.graph_outputs:
        return Skip(
            c.label,
            SkipReason.GRAPH_OUTPUT,
            f"the output '{value}' of {target} is also a graph output and must stay unscaled",
        )
    cons = idx.consumers.get(value, [])
    if kept:
        cons = [k for k in cons if idx.nodes[k].op_type not in ("Shape", "Size") or idx.nodes[k].domain]
    if len(cons) > 1:
        who = ", ".join(f"{idx.nodes[k].op_type} '{name_of(idx.nodes[k])}'" for k in cons[1:4])
        return Skip(
            c.label,
            SkipReason.OTHER_CONSUMERS,
            f"the output '{value}' of {target} is read by "
            f"{len(cons)} nodes (e.g. {who}); they need it unscaled",
        )
    return None


def per_channel(v: Array, rank: int, channels: int) -> np.ndarray[Any, np.dtype[np.float64]] | None:
    """``v`` as one value per channel (axis 1) of a rank-``rank`` tensor, or None if it is not one."""
    if v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + tuple(v.shape)
    if any(d != 1 for ax, d in enumerate(shape) if ax != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.astype(np.float64).reshape(-1), (channels,)).copy()


def common(c: Fwd, target: str) -> Skip | None:
    """Checks shared by every single-layer case: the produced value is the BN's alone; per channel."""
    bad = exclusive(c, c.x, target) or (exclusive(c, c.src, target) if c.src != c.x else None)
    if bad is not None:
        return bad
    if c.prm.per_element:
        return Skip(
            c.label, SkipReason.SPATIAL, "spatial=0 statistics differ per position: not a per-channel scale"
        )
    return None


def match_forward(index: GraphIndex, ev: ConstEvaluator, bi: int, label: str, prm: BnParams) -> Result:
    """The forward verdict for the BN at ``bi`` (cases 1-9, through the no-ops of case 13)."""
    bn = index.nodes[bi]
    x, y = bn.input[0], bn.output[0]
    head = index.producer.get(x)
    if head is None:
        if not index.is_local(x) and index.outer is not None:
            return Skip(
                label, SkipReason.IN_SUBGRAPH, f"its input '{x}' comes from the enclosing graph"
            ), True
        return Skip(label, SkipReason.NO_PRODUCER, f"its input '{x}' is a graph input or constant"), False
    src, chain = walk_up(index, ev, x)  # Case 13: Identity / inference Dropout above the BN
    p = index.producer.get(src)
    if p is None:
        return Skip(label, SkipReason.NO_PRODUCER, f"its input comes (through no-ops) from '{src}'"), False
    c = Fwd(index, ev, bi, label, prm, x, y, src, head, chain)
    pn = index.nodes[p]
    if pn.domain not in ("", "ai.onnx"):
        return Skip(
            label,
            SkipReason.NO_PRODUCER,
            f"its input comes from {pn.op_type} '{name_of(pn)}' (domain {pn.domain}), which cannot absorb it",
        ), False
    kind = pn.op_type
    if kind in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        from .match_qdq import dq_weight, match_qdq

        if dq_weight(index, pn) is not None:
            return match_qdq(c, p)  # Cases 1-4 through a DequantizeLinear weight
    if kind == "DequantizeLinear":
        from .match_qdq import activation_skip

        return activation_skip(c, p)
    if kind in ("Conv", "ConvTranspose"):
        return _case_layer(c, p, layer_writes)  # Cases 1 and 2
    if kind == "Gemm":
        return _case_layer(c, p, gemm_fold)  # Case 3
    if kind == "MatMul":
        return _case_matmul(c, p, None)  # Case 4
    if kind == "Add":
        return _case_add(c, p)  # Cases 5, 7, 9
    if kind in ("Reshape", "Flatten", "Transpose"):
        from .match_linear_norm import match_linear_norm

        return match_linear_norm(c, p)  # Case 6
    if kind in ("Concat", "Sum"):
        from .match_routes import match_concat, match_sum

        return match_concat(c, p) if kind == "Concat" else match_sum(c, p, list(pn.input))  # Cases 8, 9
    return Skip(
        label, SkipReason.NO_PRODUCER, f"its input comes from {kind} '{name_of(pn)}', which cannot absorb it"
    ), False


# ---- Cases 1 and 2: Conv / ConvTranspose -> BN ------------------------------------------------------
def conv_layout(ev: ConstEvaluator, c: Fwd, p: int) -> tuple[Array, Array | None, WeightLayout, int] | Skip:
    """Weight, bias, layout and output-channel count of a Conv / ConvTranspose ``p``."""
    pn = c.index.nodes[p]
    wb = weight_and_bias(ev, pn, c.label)
    if isinstance(wb, Skip):
        return wb
    w, b = wb
    g = conv_groups(pn, tuple(w.shape))
    if pn.op_type == "Conv":
        return w, b, WeightLayout.conv(g), int(w.shape[0])
    return w, b, WeightLayout.conv_transpose(g), int(w.shape[1]) * g


def layer_writes(c: Fwd, p: int, s: F64, t: F64 | None) -> list[Write] | Skip:
    """The writes that scale layer ``p``'s output channels by ``s`` and add ``t`` (None: nothing) to its
    bias: Conv / ConvTranspose through :func:`~bnfold.onnx.plan.scale_out`, Gemm through
    :func:`gemm_fold`."""
    pn = c.index.nodes[p]
    if pn.op_type == "Gemm":
        return gemm_fold(c, p, s, np.zeros_like(s) if t is None else t)
    target = f"{pn.op_type} '{name_of(pn)}'"
    lay = conv_layout(c.ev, c, p)
    if isinstance(lay, Skip):
        return lay
    w, b, layout, c_out = lay
    if c_out != s.shape[0]:
        return Skip(c.label, SkipReason.LAYOUT, f"{target} has {c_out} output channels, the BN {s.shape[0]}")
    res = scale_out(w, b, s, t, layout, c.label, f"weight or bias of {target}")
    if isinstance(res, Skip):
        return res
    if b is None and t is None:
        return [Write(p, 1, res[0])]  # no bias to scale and no shift: keep it bias-free
    return [Write(p, 1, res[0]), Write(p, 2, res[1])]


def _case_layer(c: Fwd, p: int, writes: Callable[[Fwd, int, F64, F64], list[Write] | Skip]) -> Result:
    """Cases 1-3: scale the output channels of a Conv / ConvTranspose / Gemm ``p`` and shift its
    bias, with the writes ``writes`` computes (a Gemm also gets beta = 1)."""
    pn = c.index.nodes[p]
    bad = common(c, f"{pn.op_type} '{name_of(pn)}'")
    if bad is not None:
        return bad, True
    w = writes(c, p, c.prm.scale, c.prm.shift)
    if isinstance(w, Skip):
        return w, True
    beta_one = (p,) if pn.op_type == "Gemm" else ()
    return Fold(**c.base(p, pn.op_type), locks=c.locks(p), writes=w, beta_one=beta_one), True


# ---- Case 3: Gemm -> BN ----------------------------------------------------------------------------
def gemm_fold(
    c: Fwd, p: int, s: np.ndarray[Any, np.dtype[np.float64]], t: np.ndarray[Any, np.dtype[np.float64]]
) -> list[Write] | Skip:
    """The writes that scale Gemm ``p``'s output features by ``s`` and add ``t`` (beta becomes 1)."""
    pn = c.index.nodes[p]
    target = f"Gemm '{name_of(pn)}'"
    bc = weight_and_bias(c.ev, pn, c.label, ("B", "C"))
    if isinstance(bc, Skip):
        return bc
    bw, cv = bc
    trans_b = bool(attr(pn, "transB", 0))
    if bw.ndim != 2:
        return Skip(c.label, SkipReason.LAYOUT, f"B of {target} has rank {bw.ndim}")
    n = bw.shape[0] if trans_b else bw.shape[1]
    if n != s.shape[0]:
        return Skip(c.label, SkipReason.LAYOUT, f"{target} has {n} output features, the BN {s.shape[0]}")
    if cv is not None and cv.ndim > 2:
        return Skip(c.label, SkipReason.UNSUPPORTED_LAYER, f"C of {target} has rank {cv.ndim}")
    alpha, beta = float(attr(pn, "alpha", 1.0)), float(attr(pn, "beta", 1.0))
    b64, c64 = fold_gemm_forward(bw, cv, alpha, beta, s, t, trans_b)
    res = finish([b64, c64], bw.dtype, c.label, f"B or C of {target}")
    if isinstance(res, Skip):
        return res
    return [Write(p, 1, res[0]), Write(p, 2, res[1])]


# ---- Cases 4 and 5: MatMul [-> Add(bias)] -> BN, product of rank 2 -----------------------------------
def matmul_weight(c: Fwd, m: int, target: str) -> Array | Skip:
    mw = resolve_weight(c.ev, c.index.nodes[m], 1, c.label, "right operand")
    if isinstance(mw, Skip):
        return mw
    if mw.ndim != 2 or mw.shape[1] != c.prm.channels:
        return Skip(
            c.label,
            SkipReason.LAYOUT,
            f"{target} right operand has shape {list(mw.shape)}, the BN {c.prm.channels} channels",
        )
    return mw


def _case_matmul(c: Fwd, m: int, add: int | None) -> Result:
    idx = c.index
    mnode = idx.nodes[m]
    target = f"MatMul '{name_of(mnode)}'" if add is None else f"MatMul+Add '{name_of(idx.nodes[add])}'"
    bad = common(c, target)
    if bad is not None:
        return bad, True
    bad = rank2_or_skip(
        idx, c.x, c.y, c.label, f"the product of {target}", "the MatMul's feature axis", mnode.input[0]
    )
    if bad is not None:
        return bad, True
    mw = matmul_weight(c, m, target)
    if isinstance(mw, Skip):
        return mw, True
    s, t = c.prm.scale, c.prm.shift
    if add is None:  # Case 4: becomes Gemm(A, W s, t)
        res = scale_out(mw, None, s, t, WeightLayout.matmul(), c.label, f"weight of {target}")
        if isinstance(res, Skip):
            return res, True
        return Fold(
            **c.base(m, "MatMul"),
            locks=c.locks(m),
            writes=[Write(m, 1, res[0]), Write(m, 2, res[1])],
            to_gemm=m,
        ), True
    # Case 5: MatMul -> Add(bias): scale W and the bias (b s + t)
    an = idx.nodes[add]
    bad = exclusive(c, mnode.output[0], f"MatMul '{name_of(mnode)}'", kept=True)
    if bad is not None:
        return bad, True
    bias_slot = 1 if an.input[0] == mnode.output[0] else 0
    bias = resolve_weight(c.ev, an, bias_slot, c.label, "bias")
    if isinstance(bias, Skip):
        return bias, True
    if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, c.prm.channels)):
        return Skip(
            c.label, SkipReason.LAYOUT, f"the bias of Add '{name_of(an)}' has shape {list(bias.shape)}"
        ), True
    wres = scale_out(mw, None, s, None, WeightLayout.matmul(), c.label, f"weight of {target}")
    if isinstance(wres, Skip):
        return wres, True
    bres = finish([bias.astype(np.float64) * s + t], mw.dtype, c.label, f"bias of {target}")
    if isinstance(bres, Skip):
        return bres, True
    return Fold(
        **c.base(m, "MatMul"),
        locks=c.locks(add, m),
        writes=[Write(m, 1, wres[0]), Write(add, bias_slot, bres[0])],
    ), True


# ---- Cases 5, 7, 9: what an Add before the BN adds -----------------------------------------------------
def _case_add(c: Fwd, a: int) -> Result:
    idx = c.index
    an = idx.nodes[a]
    if len(an.input) != 2:
        return Skip(
            c.label, SkipReason.NO_PRODUCER, f"its input comes from Add '{name_of(an)}', not a layer"
        ), False
    kinds = []
    for v in an.input:
        q = idx.producer.get(v)
        kinds.append(idx.nodes[q].op_type if q is not None and idx.nodes[q].domain in ("", "ai.onnx") else "")
    consts = [c.ev.resolve(v)[0] is not None for v in an.input]
    for side in (0, 1):
        if kinds[side] == "MatMul" and consts[1 - side]:
            q = idx.producer[an.input[side]]
            return _case_matmul(c, q, a)  # Case 5
        if kinds[side] in LAYERS and consts[1 - side]:
            return _case_add_const(c, idx.producer[an.input[side]], a, 1 - side)  # Case 7
    if any(k in LAYERS or k == "MatMul" for k in kinds):
        from .match_routes import match_sum

        return match_sum(c, a, list(an.input))  # Case 9 (refuses a branch that is not a layer)
    return Skip(c.label, SkipReason.NO_PRODUCER, f"its input comes from Add '{name_of(an)}', not a layer"), False


def _case_add_const(c: Fwd, p: int, a: int, const_slot: int) -> Result:
    """Case 7: ``layer -> Add(constant per channel) -> BN``: the constant joins the layer's bias, the
    Add and the BN go (``s (W x + b + k) + t = (s W) x + (s (b + k) + t)``)."""
    idx = c.index
    pn, an = idx.nodes[p], idx.nodes[a]
    target = f"{pn.op_type} '{name_of(pn)}' (+ Add '{name_of(an)}')"
    bad = common(c, target) or exclusive(c, pn.output[0], f"{pn.op_type} '{name_of(pn)}'")
    if bad is not None:
        return bad, True
    if c.chain:
        # The Add goes away; a no-op between it and the BN would lose its input.
        return Skip(c.label, SkipReason.UNSUPPORTED_LAYER, f"no-ops between Add '{name_of(an)}' and the BN"), True
    k, _, _ = c.ev.resolve(an.input[const_slot])
    assert k is not None
    w = resolve_weight(c.ev, pn, 1, c.label, "weight")
    if isinstance(w, Skip):
        return w, True
    rank = 2 if pn.op_type == "Gemm" else w.ndim
    k64 = per_channel(k, rank, c.prm.channels) if is_float(k) else None
    if k64 is None:
        return Skip(
            c.label,
            SkipReason.LAYOUT,
            f"the constant of Add '{name_of(an)}' (shape {list(k.shape)}) is not "
            f"one value per channel of the {pn.op_type} output",
        ), True
    s, t = c.prm.scale, c.prm.shift
    writes = layer_writes(c, p, s, s * k64 + t)
    if isinstance(writes, Skip):
        return writes, True
    base = c.base(p, pn.op_type, f"through Add '{name_of(an)}' (constant)")
    base["remove"] = (c.bi, a)
    base["dropped"] = (an.output[0], pn.output[0])
    base["rename_output"] = (p, c.y)
    gemm = (p,) if pn.op_type == "Gemm" else ()
    return Fold(**base, locks=c.locks(p, a), writes=writes, beta_one=gemm), True
