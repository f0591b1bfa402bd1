"""Case 6 of :mod:`bnfold.onnx.match`: LinearNorm, ``MatMul [-> Add(bias)] -> Reshape | Flatten | Transpose -> BN``.

``Linear`` on tokens ``(B, N, K)`` gives ``(B, N, D)``; ``flatten(0, 1)`` makes it ``(B*N, D)`` and the
BN normalises axis 1 -- the MatMul's output axis, provided the reshape keeps the last axis as axis 1
(the same holds for ``x.transpose(1, 2)`` before a BN1d: a Transpose whose ``perm[1]`` is the last axis).
Row-major order proves it for a Reshape to a constant ``[a, D, 1, ..., 1]`` (any ``a``): input index
``(.., d)`` has flat index ``f * D + d`` and lands at ``(f, d, 0, ..)``. The fold then scales the
MatMul's output features (``W' = W * s``); the shift goes into the Add's bias (``b' = b s + t``), or,
without a bias, the BN becomes one ``Add(x, t)`` (a rank > 2 MatMul has no bias slot).

Before::                                           After::

    x -> MatMul(W) -> Reshape[-1, D] -> BN -> y        x -> MatMul(W s) -> Reshape[-1, D] -> Add(t) -> y

The product's readers other than the route may only be Shape/Size nodes (``reshape_as`` exports one):
they see the unchanged shape. Anything else is refused (OTHER_CONSUMERS; LAYOUT for a reshape that may
move the axis or a computed target shape).
"""

from __future__ import annotations

import numpy as np

from bnfold.fold_math import WeightLayout
from bnfold.records import Site, Skip, SkipReason

from .graph import name_of
from .match_forward import Fwd, common, exclusive, matmul_weight
from .plan import Fold, Write, attr, finish, resolve_weight, scale_out

__all__ = ["match_linear_norm"]

Result = tuple[Fold | Skip, bool]


def _keeps_last_axis(c: Fwd, r: int, d: int) -> str | None:
    """Why Reshape/Flatten ``r`` may move the product's last axis (size ``d``) off the BN channel axis,
    or None when it provably maps it to axis 1.

    Reshape to a constant ``[a, d, 1, ..., 1]`` (``a`` anything): row-major order keeps the index of a
    last axis of size ``d`` as the index of output axis 1 when every axis after it has size 1.
    Flatten: dim 1 is a product that includes ``d``; it equals the BN's ``d`` channels only when the
    other factors are 1 (see below). Transpose: ``perm[1]`` must be the last axis.
    """
    rn = c.index.nodes[r]
    if rn.op_type == "Transpose":
        # Output axis 1 is input axis perm[1]: the MatMul's output axis when that is the last one.
        perm = [int(p) for p in attr(rn, "perm", [])]
        if len(perm) < 2 or perm[1] != len(perm) - 1:
            return (
                f"Transpose '{name_of(rn)}' with perm {perm or 'reversed'} does not bring the last axis to axis 1"
            )
        return None
    if rn.op_type == "Flatten":
        # Flatten(axis=k) of (d_0, .., d_{r-1} = D) has dim 1 = d_k * .. * d_{r-1}, which the BN reads
        # as its C = D channels (the caller checked D == C; a BN input of another dim 1 is rejected by
        # the runtime): so d_k .. d_{r-2} are all 1 and the last index is the index of axis 1, for any
        # axis and rank.
        return None
    if len(rn.input) < 2:
        return f"Reshape '{name_of(rn)}' has no shape input"
    v, _, detail = c.ev.resolve(rn.input[1])
    if v is None:
        return f"the target shape of Reshape '{name_of(rn)}' is not a constant ({detail})"
    shape = [int(e) for e in np.asarray(v).reshape(-1)]
    if len(shape) < 2 or shape[1] != d or any(e != 1 for e in shape[2:]):
        return f"Reshape '{name_of(rn)}' to {shape} does not keep the last axis ({d}) as axis 1"
    return None


def match_linear_norm(c: Fwd, r: int) -> Result:
    """Case 6: the BN channel is the MatMul's output axis throughout (LeViT's LinearNorm)."""
    idx = c.index
    rn = idx.nodes[r]
    q = idx.producer.get(rn.input[0])
    add: int | None = None
    if q is not None and idx.nodes[q].op_type == "Add":
        an = idx.nodes[q]
        for side in (0, 1):
            m = idx.producer.get(an.input[side])
            if (
                m is not None
                and idx.nodes[m].op_type == "MatMul"
                and c.ev.resolve(an.input[1 - side])[0] is not None
            ):
                add, q = q, m
                break
    if q is None or idx.nodes[q].op_type != "MatMul":
        return Skip(
            c.label,
            SkipReason.NO_PRODUCER,
            f"its input comes from {rn.op_type} '{name_of(rn)}', which does not reshape a MatMul product",
        ), False
    m, mnode = q, idx.nodes[q]
    target = f"MatMul '{name_of(mnode)}' (through {rn.op_type} '{name_of(rn)}')"
    bad = common(c, target) or exclusive(c, rn.input[0], target, kept=True)
    if bad is None and add is not None:
        bad = exclusive(c, mnode.output[0], target, kept=True)
    if bad is not None:
        return bad, True
    mw = matmul_weight(c, m, target)
    if isinstance(mw, Skip):
        return mw, True
    why = _keeps_last_axis(c, r, int(mw.shape[1]))
    if why is not None:
        return Skip(
            c.label, SkipReason.LAYOUT, f"{why}: the BN channel may not be the MatMul's output axis"
        ), True
    s, t = c.prm.scale, c.prm.shift
    wres = scale_out(mw, None, s, None, WeightLayout.matmul(), c.label, f"weight of {target}")
    if isinstance(wres, Skip):
        return wres, True
    base = c.base(m, "MatMul", f"through {rn.op_type} '{name_of(rn)}'")
    if add is None:
        # No bias to absorb the shift: the BN becomes Add(x, t), t laid out on axis 1 of the BN input.
        if rn.op_type == "Flatten":
            rank = 2
        elif rn.op_type == "Transpose":
            rank = len(attr(rn, "perm", []))
        else:
            rank = int(np.asarray(c.ev.resolve(rn.input[1])[0]).size)
        tres = finish([t.reshape((-1,) + (1,) * (rank - 2))], mw.dtype, c.label, f"shift after {target}")
        if isinstance(tres, Skip):
            return tres, True
        site = base["site"]
        site = Site(
            site.bn,
            site.target,
            site.target_kind,
            site.direction,
            "; ".join(filter(None, [site.detail, "shift kept as one Add"])),
        )
        return Fold(
            site=site, remove=(c.bi,), locks=c.locks(m), writes=[Write(m, 1, wres[0])], shift=tres[0]
        ), True
    an = idx.nodes[add]
    bias_slot = 1 if an.input[0] == mnode.output[0] else 0
    bias = resolve_weight(c.ev, an, bias_slot, c.label, "bias")
    if isinstance(bias, Skip):
        return bias, True
    if bias.size not in (1, c.prm.channels) or (bias.ndim and bias.shape[-1] != bias.size):
        return Skip(
            c.label,
            SkipReason.LAYOUT,
            f"the bias of Add '{name_of(an)}' (shape {list(bias.shape)}) is not one value per output feature",
        ), True
    # Keep the bias's rank (all its leading axes are 1), so that the Add's output shape is unchanged.
    new_shape = (tuple(bias.shape[:-1]) + (c.prm.channels,)) if bias.ndim else (c.prm.channels,)
    b64 = (bias.astype(np.float64).reshape(-1) * s + t).reshape(new_shape)
    bres = finish([b64], mw.dtype, c.label, f"bias of {target}")
    if isinstance(bres, Skip):
        return bres, True
    return Fold(
        **base, locks=c.locks(m, add), writes=[Write(m, 1, wres[0]), Write(add, bias_slot, bres[0])]
    ), True
