"""BN after a channel route: Concat of layers (``concat-split``) and the sum of layer branches (``branch-sum``).

``concat-split``, ``BN(Concat(P_1(x_1), ..., P_k(x_k), axis=1))``: the BN is per channel, so the slice of
channels ``[o_i, o_i + C_i)`` that producer ``P_i`` writes is scaled and shifted by
``scale[o_i : o_i + C_i]`` and ``shift[...]`` alone -- a forward fold of each producer with its slice::

    Before:  P_1 -> a --\\                         After:  P_1' -> a --\\
                        Concat -> c -> BN -> y                          Concat -> y
             P_2 -> b --/                                  P_2' -> b --/

``branch-sum``, ``BN(P_1(x_1) + ... + P_k(x_k))`` (Add, or Sum): ``s * (sum_i z_i) + t = sum_i (s z_i) + t``,
so every branch's output channels are scaled by ``s`` and the shift goes into the first branch's bias
once. Every branch must be a layer with ``C`` output channels of the same rank (so that its channel
axis is the sum's axis 1 under broadcasting); a broadcast along other axes is fine (each output
element still receives exactly one element of the first branch, hence ``t`` once).

Both need every producer output read by the route alone (it is scaled) and a distinct value per
input (a value read twice would need two scales). A branch that is not a Conv / ConvTranspose / Gemm
-- a residual identity, an activation, a graph input, a MatMul -- is refused (UNFOLDABLE_BRANCH):
``BN(conv(x) + x)`` has no layer that could absorb the BN's scale of ``x``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnfold.records import Skip, SkipReason

from .forward import LAYERS, Fwd, common, conv_layout, exclusive, layer_writes
from .graph import attr, name_of
from .plan import Fold, Write

__all__ = ["match_concat", "match_sum"]

Result = tuple[Fold | Skip, bool]
F64 = np.ndarray[Any, np.dtype[np.float64]]


def _branches(c: Fwd, node: int, inputs: list[str], what: str) -> list[tuple[int, int, int]] | Skip:
    """For each input: ``(producer, output channels, rank)``, or the refusal naming the bad branch."""
    idx = c.index
    if len(set(inputs)) != len(inputs) or any(not v for v in inputs):
        return Skip(
            c.label, SkipReason.OTHER_CONSUMERS, f"{what} reads one value twice: it would need two scales"
        )
    out: list[tuple[int, int, int]] = []
    for v in inputs:
        p = idx.producer.get(v)
        pn = idx.nodes[p] if p is not None else None
        if pn is None or pn.op_type not in LAYERS or pn.domain not in ("", "ai.onnx"):
            src = f"{pn.op_type} '{name_of(pn)}'" if pn is not None else "a graph input or constant"
            residual = pn is None or c.index.n_uses(v) > 1
            hint = " (a residual identity branch)" if residual else ""
            return Skip(
                c.label,
                SkipReason.UNFOLDABLE_BRANCH,
                f"the branch '{v}' of {what} comes from {src}{hint}, which cannot absorb the BN's scale",
            )
        bad = exclusive(c, v, f"{pn.op_type} '{name_of(pn)}'", kept=True)
        if bad is not None:
            return bad
        if pn.op_type == "Gemm":
            from .const import resolve_weight

            w = resolve_weight(c.ev, pn, 1, c.label, "B")
            if isinstance(w, Skip):
                return w
            if w.ndim != 2:
                return Skip(c.label, SkipReason.LAYOUT, f"B of Gemm '{name_of(pn)}' has rank {w.ndim}")
            ch = int(w.shape[0] if attr(pn, "transB", 0) else w.shape[1])
            out.append((p, ch, 2))  # type: ignore[arg-type]
        else:
            lay = conv_layout(c.ev, c, p)  # type: ignore[arg-type]
            if isinstance(lay, Skip):
                return lay
            out.append((p, lay[3], lay[0].ndim))  # type: ignore[arg-type]
    ranks = {r for _, _, r in out}
    if len(ranks) != 1:
        return Skip(
            c.label,
            SkipReason.LAYOUT,
            f"the branches of {what} have ranks {sorted(ranks)}: their channel axes do not line up",
        )
    return out


def _route_fold(c: Fwd, node: int, kind: str, plans: list[tuple[int, F64, F64 | None]], what: str) -> Result:
    writes: list[Write] = []
    gemms: list[int] = []
    for p, s, t in plans:
        w = layer_writes(c, p, s, t)
        if isinstance(w, Skip):
            return w, True
        writes.extend(w)
        if c.index.nodes[p].op_type == "Gemm":
            gemms.append(p)
    names = ", ".join(c.index.label(p) for p, _, _ in plans)
    pattern = "concat-split" if kind == "Concat" else "branch-sum"
    base = c.base(node, kind, f"{what} into {len(plans)} producers: {names}", pattern)
    return Fold(
        **base, locks=c.locks(node, *(p for p, _, _ in plans)), writes=writes, beta_one=tuple(gemms)
    ), True


def match_concat(c: Fwd, node: int) -> Result:
    """concat-split: split the BN over the producers of a channel-axis Concat."""
    cn = c.index.nodes[node]
    what = f"Concat '{name_of(cn)}'"
    bad = common(c, what)
    if bad is not None:
        return bad, True
    br = _branches(c, node, list(cn.input), what)
    if isinstance(br, Skip):
        return br, True
    rank = br[0][2]
    axis = int(attr(cn, "axis", 1))
    if axis != 1 and axis != 1 - rank:
        return Skip(
            c.label,
            SkipReason.LAYOUT,
            f"{what} joins axis {axis} of rank-{rank} tensors, not the channel axis 1",
        ), True
    total = sum(ch for _, ch, _ in br)
    if total != c.prm.channels:
        return Skip(
            c.label, SkipReason.LAYOUT, f"{what} joins {total} channels, the BN has {c.prm.channels}"
        ), True
    plans: list[tuple[int, F64, F64 | None]] = []
    lo = 0
    for p, ch, _ in br:
        plans.append((p, c.prm.scale[lo : lo + ch].copy(), c.prm.shift[lo : lo + ch].copy()))
        lo += ch
    return _route_fold(c, node, "Concat", plans, "split per slice")


def match_sum(c: Fwd, node: int, inputs: list[str]) -> Result:
    """branch-sum: scale every branch of a sum, the shift into the first branch's bias."""
    an = c.index.nodes[node]
    what = f"{an.op_type} '{name_of(an)}'"
    bad = common(c, what)
    if bad is not None:
        return bad, True
    br = _branches(c, node, inputs, what)
    if isinstance(br, Skip):
        return br, True
    for p, ch, _ in br:
        if ch != c.prm.channels:
            pn = c.index.nodes[p]
            return Skip(
                c.label,
                SkipReason.LAYOUT,
                f"the branch {pn.op_type} '{name_of(pn)}' of {what} has {ch} "
                f"channels, the BN {c.prm.channels}: it is broadcast over the channels",
            ), True
    plans: list[tuple[int, F64, F64 | None]] = [
        (p, c.prm.scale, c.prm.shift if k == 0 else None) for k, (p, _, _) in enumerate(br)
    ]
    return _route_fold(c, node, an.op_type, plans, "scaled every branch, shift")
