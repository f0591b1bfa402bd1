"""Pattern ``linear-norm``: LinearNorm, ``MatMul [-> Add(bias)] -> Reshape | Flatten | Transpose -> BN``.

A chain of those (``MatMul -> Reshape -> Transpose -> BN``, which onnxruntime fuses) folds when the
MatMul's output axis provably arrives intact at the BN's axis 1 (:func:`_track_column`).

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
from onnx import NodeProto

from bnfold.fold_math import WeightLayout
from bnfold.records import Site, Skip, SkipReason

from .const import resolve_weight
from .forward import Fwd, common, exclusive, gemm_fold, matmul_weight
from .graph import attr, name_of
from .plan import Fold, Write, finish, scale_out

__all__ = ["match_linear_norm"]

Result = tuple[Fold | Skip, bool]


def _target_shape(c: Fwd, n: NodeProto) -> list[int] | str:
    """The constant target shape of Reshape ``n``, or why it has none."""
    if len(n.input) < 2:
        return f"Reshape '{name_of(n)}' has no shape input"
    v, _, detail = c.ev.resolve(n.input[1])
    if v is None:
        return f"the target shape of Reshape '{name_of(n)}' is not a constant ({detail})"
    return [int(e) for e in np.asarray(v).reshape(-1)]


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
            return f"Transpose '{name_of(rn)}' with perm {perm or 'reversed'} does not bring the last axis to axis 1"
        return None
    if rn.op_type == "Flatten":
        # Flatten(axis=k) of (d_0, .., d_{r-1} = D) has dim 1 = d_k * .. * d_{r-1}, which the BN reads
        # as its C = D channels (the caller checked D == C; a BN input of another dim 1 is rejected by
        # the runtime): so d_k .. d_{r-2} are all 1 and the last index is the index of axis 1, for any
        # axis and rank.
        return None
    shape = _target_shape(c, rn)
    if isinstance(shape, str):
        return shape
    if len(shape) < 2 or shape[1] != d or any(e != 1 for e in shape[2:]):
        return f"Reshape '{name_of(rn)}' to {shape} does not keep the last axis ({d}) as axis 1"
    return None


def _product_shape(c: Fwd, value: str, m: int) -> list[int | None] | None:
    """The (partly static) shape of the MatMul product ``value`` (or its Add): declared or inferred, else
    the rank of the MatMul's left operand (the right one is 2-D); None where the rank is unknown. A
    Gemm's output has rank 2."""
    idx = c.index
    for v in (value, idx.nodes[m].output[0]):
        vt = idx.value_type(v)
        if vt is not None and vt.shape is not None:
            return list(vt.shape)
    if idx.nodes[m].op_type == "Gemm":
        return [None, None]
    ranks = idx.ranks(idx.nodes[m].input[0])
    if value == idx.nodes[m].output[0] and len(ranks) == 1 and min(ranks) >= 2:
        return [None] * min(ranks)
    return None


def _prod(dims: list[int | None]) -> int | None:
    out = 1
    for d in dims:
        if d is None:
            return None
        out *= int(d)
    return out


def _reshape_target(c: Fwd, node: int, shape: list[int | None]) -> list[int | None] | str:
    """The output shape of Reshape / Flatten ``node`` on ``shape`` (None where not static), or why not."""
    n = c.index.nodes[node]
    if n.op_type == "Flatten":
        k = int(attr(n, "axis", 1))
        k = k + len(shape) if k < 0 else k
        if not 0 <= k <= len(shape):
            return f"Flatten '{name_of(n)}' has axis {k} for rank {len(shape)}"
        return [_prod(shape[:k]), _prod(shape[k:])]
    target = _target_shape(c, n)
    if isinstance(target, str):
        return target
    allowzero = int(attr(n, "allowzero", 0))
    out: list[int | None] = []
    for i, e in enumerate(target):
        if e == 0 and not allowzero:
            if i >= len(shape):
                return f"Reshape '{name_of(n)}' copies axis {i} of a rank-{len(shape)} tensor"
            out.append(shape[i])
        else:
            out.append(None if e == -1 else e)
    if -1 in target:
        total, rest = _prod(shape), _prod([d for d, e in zip(out, target) if e != -1])
        if total is not None and rest:
            out[target.index(-1)] = total // rest
    return out


def _track_column(c: Fwd, chain: list[int], d: int, product: str, m: int) -> tuple[str | None, int]:
    """Follow the MatMul's output axis (size ``d``) through ``chain`` (Reshape / Flatten / Transpose,
    top first) to the BN: ``(None, rank of the BN input)`` when it provably lands on axis 1 intact, else
    ``(why, 0)``.

    The axis is carried as a position ``a`` in a shape whose dims after ``a`` are static. A Transpose
    moves it to ``perm.index(a)``. A Reshape keeps it intact, at axis ``j`` of the new shape, when
    ``T[j] = d`` and the dims after ``j`` multiply to the same stride as the dims after ``a``: in
    row-major order the flat index is ``(outer * d + i) * stride + r``, so index ``i`` of the old axis
    is index ``i`` of the new one, for every element. Anything else (the axis split or merged, a shape
    not known) is refused.
    """
    idx = c.index
    shape = _product_shape(c, product, m)
    if shape is None:
        return "the rank of the MatMul product is unknown", 0
    a = len(shape) - 1
    if shape[a] not in (None, d):
        return f"the MatMul product's last axis has {shape[a]} values, the weight {d} columns", 0
    shape[a] = d
    for k in chain:
        n = idx.nodes[k]
        if n.op_type == "Transpose":
            perm = [int(p) for p in attr(n, "perm", [])] or list(range(len(shape)))[::-1]
            if sorted(perm) != list(range(len(shape))):
                return f"Transpose '{name_of(n)}' has perm {perm} for a rank-{len(shape)} tensor", 0
            shape, a = [shape[p] for p in perm], perm.index(a)
            continue
        target = _reshape_target(c, k, shape)
        if isinstance(target, str):
            return target, 0
        stride = _prod(shape[a + 1 :])
        found = (
            [j for j in range(len(target)) if target[j] == d and _prod(target[j + 1 :]) == stride]
            if stride is not None
            else []
        )
        if len(found) != 1:
            return (
                f"{n.op_type} '{name_of(n)}' from {shape} to {target} may split or merge the MatMul's "
                f"output axis ({d})"
            ), 0
        shape, a = target, found[0]
    if a != 1:
        return f"the MatMul's output axis arrives at axis {a} of the BN input, not its channel axis 1", 0
    return None, len(shape)


def _gemm_route(c: Fwd, g: int, chain: list[int]) -> Result:
    """``Gemm -> Reshape / Flatten / Transpose ... -> BN``: a Gemm's output (rank 2) has its features on
    the last axis, as a MatMul's; when they provably arrive at the BN's axis 1 the BN folds into the
    Gemm as in gemm-bn (B's feature columns scaled, the shift into C, beta = 1)."""
    idx = c.index
    gn = idx.nodes[g]
    route = ", ".join(f"{idx.nodes[k].op_type} '{name_of(idx.nodes[k])}'" for k in reversed(chain))
    target = f"Gemm '{name_of(gn)}' (through {route})"
    bad = common(c, target)
    for k in chain:
        bad = bad or exclusive(c, idx.nodes[k].input[0], target, kept=True)
    if bad is not None:
        return bad, True
    bw = resolve_weight(c.ev, gn, 1, c.label, "B")
    if isinstance(bw, Skip):
        return bw, True
    if bw.ndim != 2:
        return Skip(c.label, SkipReason.LAYOUT, f"B of {target} has rank {bw.ndim}"), True
    d = int(bw.shape[0] if attr(gn, "transB", 0) else bw.shape[1])
    if d != c.prm.channels:
        return Skip(
            c.label, SkipReason.LAYOUT, f"{target} has {d} output features, the BN {c.prm.channels}"
        ), True
    if len(chain) == 1:
        why = _keeps_last_axis(c, chain[0], d)
    else:
        why, _ = _track_column(c, chain[::-1], d, gn.output[0], g)
    if why is not None:
        return Skip(
            c.label, SkipReason.LAYOUT, f"{why}: the BN channel may not be the Gemm's output axis"
        ), True
    writes = gemm_fold(c, g, c.prm.scale, c.prm.shift)
    if isinstance(writes, Skip):
        return writes, True
    base = c.base(g, "Gemm", f"through {route}", "linear-norm")
    return Fold(**base, locks=c.locks(g), writes=writes, beta_one=(g,)), True


_ROUTE = ("Reshape", "Flatten", "Transpose")
_MAX_ROUTE = 8


def match_linear_norm(c: Fwd, r: int) -> Result:
    """linear-norm: the BN channel is the MatMul's output axis throughout (LeViT's LinearNorm), through one
    Reshape / Flatten / Transpose or a chain of them (``MatMul -> Reshape -> Transpose -> BN``)."""
    idx = c.index
    chain = [r]  # nearest the BN first
    while len(chain) < _MAX_ROUTE:
        above = idx.producer.get(idx.nodes[chain[-1]].input[0])
        if (
            above is None
            or idx.nodes[above].op_type not in _ROUTE
            or idx.nodes[above].domain not in ("", "ai.onnx")
        ):
            break
        chain.append(above)
    rn = idx.nodes[chain[-1]]  # the route node reading the product
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
    if (
        q is not None
        and add is None
        and idx.nodes[q].op_type == "Gemm"
        and idx.nodes[q].domain in ("", "ai.onnx")
    ):
        return _gemm_route(c, q, chain)
    if q is None or idx.nodes[q].op_type != "MatMul":
        return Skip(
            c.label,
            SkipReason.NO_PRODUCER,
            f"its input comes from {rn.op_type} '{name_of(rn)}', which does not reshape a MatMul product",
        ), False
    m, mnode = q, idx.nodes[q]
    route = ", ".join(f"{idx.nodes[k].op_type} '{name_of(idx.nodes[k])}'" for k in reversed(chain))
    target = f"MatMul '{name_of(mnode)}' (through {route})"
    bad = common(c, target)
    for k in chain:
        bad = bad or exclusive(c, idx.nodes[k].input[0], target, kept=True)
    if bad is None and add is not None:
        bad = exclusive(c, mnode.output[0], target, kept=True)
    if bad is not None:
        return bad, True
    mw = matmul_weight(c, m, target)
    if isinstance(mw, Skip):
        return mw, True
    rank = 0
    if len(chain) == 1:
        why = _keeps_last_axis(c, r, int(mw.shape[1]))
    else:
        why, rank = _track_column(c, chain[::-1], int(mw.shape[1]), rn.input[0], m)
    if why is not None:
        return Skip(
            c.label, SkipReason.LAYOUT, f"{why}: the BN channel may not be the MatMul's output axis"
        ), True
    s, t = c.prm.scale, c.prm.shift
    wres = scale_out(mw, None, s, None, WeightLayout.matmul(), c.label, f"weight of {target}")
    if isinstance(wres, Skip):
        return wres, True
    base = c.base(m, "MatMul", f"through {route}", "linear-norm")
    if add is None:
        # No bias to absorb the shift: the BN becomes Add(x, t), t laid out on axis 1 of the BN input.
        r0 = idx.nodes[r]
        if rank:  # a chain: the tracked rank
            pass
        elif r0.op_type == "Flatten":
            rank = 2
        elif r0.op_type == "Transpose":
            rank = len(attr(r0, "perm", []))
        else:
            rank = int(np.asarray(c.ev.resolve(r0.input[1])[0]).size)
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
            site.pattern,
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
