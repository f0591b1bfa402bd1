"""The numeric stage of the ``torch.export`` backend: float64 numbers -> new tensors, or ``Skip``.

Mirrors :func:`bnfold.fx.plan.plan_sites` for the graph of an exported program (the matcher is
:mod:`bnfold.fx.export_match`, the rewrite :mod:`bnfold.fx.export_rewrite`). Rules:

1. A layer that absorbs one forward fold takes the blocked route
   (:func:`bnfold.fx.plan.plan_forward`: the float64 product rounded once, bit for bit).
2. A layer that absorbs several folds (a batch norm before it and one after, or a channel route
   that shares it) accumulates them in float64 and is rounded once at the end.
3. A fold whose new weight or bias is not finite in the layer's dtype is refused (``OVERFLOW``); a
   fold whose channels do not line up with the layer is refused (``LAYOUT``). A refused fold changes
   no layer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import torch
from torch import fx, nn

from bnfold.dtypes import to_float64
from bnfold.fold_math import F64, bn_affine, bn_nonfinite_reason, fold_backward, fold_forward
from bnfold.records import Direction, Skip, SkipReason

from .export_match import ExportCandidate, ExportMatched
from .layers import fetch_attr
from .plan import fits, plan_forward, round_accumulated, write_forward

__all__ = ["plan_export_sites"]

Writes = dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]


def _tensor(gm: nn.Module, n: fx.Node | None) -> torch.Tensor | None:
    return None if n is None else fetch_attr(gm, str(n.target))


class _NonFinite(Exception):
    """The BN's own eval map is not finite (the reason: :func:`bn_nonfinite_reason`)."""


def _scale_shift(gm: nn.Module, c: ExportCandidate) -> tuple[F64, F64]:
    a = c.bn_args
    g, beta, mean, var = (
        None if a[k] is None else to_float64(fetch_attr(gm, str(a[k].target)))
        for k in ("weight", "bias", "running_mean", "running_var")
    )
    scale, shift = bn_affine(g, beta, mean, var, float(a["eps"]))  # type: ignore[arg-type]
    if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
        why = bn_nonfinite_reason(g, beta, mean, var, float(a["eps"]))  # type: ignore[arg-type]
        raise _NonFinite(why or "its scale or shift is not finite")
    if c.repeat > 1:  # BN -> flatten -> linear: channel c covers features c*k .. c*k + k - 1
        scale, shift = np.repeat(scale, c.repeat), np.repeat(shift, c.repeat)
    return scale, shift


def plan_export_sites(gm: nn.Module, matched: list[ExportMatched]) -> tuple[list[ExportMatched], Writes]:
    """Compute every folded weight (Rules 1-3); refused folds are swapped for their ``Skip``.

    Args:
        gm: the unlifted module the matcher read (not changed).
        matched: :func:`bnfold.fx.export_match.find_export_sites`'s verdicts.

    Returns:
        ``(verdicts with the refusals swapped in, new (weight, bias) per layer node)``.
    """
    touches: Counter[fx.Node] = Counter(
        p.producer for c in matched if isinstance(c, ExportCandidate) for p in c.parts
    )
    state: dict[fx.Node, tuple[F64, F64]] = {}  # Rule 2: float64 accumulators
    writes: Writes = {}
    out: list[ExportMatched] = []
    for c in matched:
        if not isinstance(c, ExportCandidate):
            out.append(c)
            continue
        try:
            scale, shift = _scale_shift(gm, c)
        except _NonFinite as e:
            out.append(Skip(c.site.bn, SkipReason.OVERFLOW, str(e), c.site.pattern))
            continue
        first = c.parts[0]
        if c.site.direction is Direction.FORWARD and len(c.parts) == 1 and touches[first.producer] == 1:
            weight, bias = _tensor(gm, first.weight), _tensor(gm, first.bias)
            assert weight is not None
            why = write_forward(
                writes, first.producer, plan_forward(weight, bias, scale, shift, first.layout, c.site.bn)
            )
        else:
            why = _accumulate(gm, c, scale, shift, state)
        out.append(c if why is None else replace(why, pattern=c.site.pattern))  # the pattern it was tried as
    for c in matched:
        if not isinstance(c, ExportCandidate):
            continue
        for p in c.parts:
            if p.producer not in state or p.producer in writes:
                continue
            w0, b0 = _tensor(gm, p.weight), _tensor(gm, p.bias)
            assert w0 is not None
            writes[p.producer] = round_accumulated(*state[p.producer], w0, b0)
    return out, writes


def _accumulate(
    gm: nn.Module, c: ExportCandidate, scale: F64, shift: F64, state: dict[fx.Node, tuple[F64, F64]]
) -> Skip | None:
    """Rule 2: fold ``c`` into the float64 state of its layers; a refusal (Rule 3) changes none."""
    fold = fold_forward if c.site.direction is Direction.FORWARD else fold_backward
    new: dict[fx.Node, tuple[F64, F64]] = {}
    for p in c.parts:
        w0, b0 = _tensor(gm, p.weight), _tensor(gm, p.bias)
        assert w0 is not None
        if p.producer in new:
            w, b = new[p.producer]
        elif p.producer in state:
            w, b = state[p.producer]
        else:
            w64 = to_float64(w0)
            assert w64 is not None
            w, b = w64, to_float64(b0)
        t = shift[p.lo : p.hi] if p.with_shift else np.zeros(p.hi - p.lo)
        try:
            w_new, b_new = fold(w, b, scale[p.lo : p.hi], t, p.layout)
        except ValueError as e:
            return Skip(c.site.bn, SkipReason.LAYOUT, f"channels do not line up ({e})")
        b_dt = b0.dtype if b0 is not None else w0.dtype
        if not (fits(w_new, w0.dtype) and fits(b_new, b_dt)):
            return Skip(
                c.site.bn, SkipReason.OVERFLOW, f"the folded weights would not be finite in {w0.dtype}"
            )
        new[p.producer] = (w_new, b_new)
    state.update(new)
    return None
