"""The vocabulary of the forward folds (layer -> BN), shared by every forward case.

:class:`Fwd` is what each case reads (the BN, its parameters, the value the layer produced); the
helpers check a route (:func:`exclusive`, :func:`common`) and write a layer (:func:`layer_writes`,
:func:`gemm_fold`, :func:`matmul_weight`). The cases themselves live in :mod:`bnfold.onnx.match_forward`
(conv-bn, gemm-bn, const-add-bn: it dispatches on the producer), :mod:`~bnfold.onnx.match_linear_norm`
(linear-norm), :mod:`~bnfold.onnx.match_routes` (concat-split, branch-sum) and :mod:`~bnfold.onnx.match_qdq`
(qdq-bn); all of them import this
module and none imports another case module back, so the matchers form no import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.fold_math import WeightLayout, fold_gemm_forward
from bnfold.records import Direction, Site, Skip, SkipReason

from .const import Array, ConstEvaluator, resolve_weight, weight_and_bias
from .graph import GraphIndex, attr, name_of
from .plan import BnParams, Fold, Write, conv_groups, finish, scale_out

__all__ = [
    "Result",
    "F64",
    "Fwd",
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

    ``src`` is the BN input with the no-ops above it walked; ``head`` the node writing the
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

    def base(self, target: int, kind: str, detail: str = "", pattern: str | None = None) -> dict[str, Any]:
        """The Fold fields every forward case shares: BN removed, ``head`` renamed to ``y``; ``pattern``
        is the catalogue id (:mod:`bnfold.patterns`) the case matched."""
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
        site = Site(self.label, self.index.label(target), kind, Direction.FORWARD, detail, pattern)
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
