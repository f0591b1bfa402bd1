"""Forward folds (layer -> BN): the cases 1-7 of :mod:`bnfold.onnx.match`, one function per case.

Every case returns ``(verdict, specific)``: a :class:`~bnfold.onnx.plan.Fold` or a
:class:`~bnfold.records.Skip`, and whether a refusal names a foldable layer (it is then reported rather
than the backward matcher's generic NO_PRODUCER). The routes (Concat, sums of branches: cases 8-9)
live in :mod:`bnfold.onnx.match_routes`; the no-ops walked first in :mod:`bnfold.onnx.noops`.
This module dispatches on the producer; the vocabulary every case shares (:class:`Fwd`, the route
checks, the layer writes) is :mod:`bnfold.onnx.forward`, which imports no case module.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bnfold.fold_math import WeightLayout
from bnfold.records import Skip, SkipReason

from .const import ConstEvaluator, is_float, resolve_weight
from .forward import (
    F64,
    LAYERS,
    Fwd,
    Result,
    common,
    exclusive,
    gemm_fold,
    layer_writes,
    matmul_weight,
    per_channel,
)
from .graph import GraphIndex, name_of
from .match_linear_norm import match_linear_norm
from .match_qdq import activation_skip, dq_weight, match_qdq
from .match_routes import match_concat, match_sum
from .noops import walk_up
from .plan import BnParams, Fold, Write, enforced_rank, finish, rank2_or_skip, scale_out, tried

__all__ = ["match_forward"]


def match_forward(index: GraphIndex, ev: ConstEvaluator, bi: int, label: str, prm: BnParams) -> Result:
    """The forward verdict for the BN at ``bi`` (the forward patterns, through no-ops)."""
    bn = index.nodes[bi]
    x, y = bn.input[0], bn.output[0]
    head = index.producer.get(x)
    if head is None:
        if not index.is_local(x) and index.outer is not None:
            return Skip(
                label, SkipReason.IN_SUBGRAPH, f"its input '{x}' comes from the enclosing graph"
            ), True
        return Skip(label, SkipReason.NO_PRODUCER, f"its input '{x}' is a graph input or constant"), False
    src, chain = walk_up(index, ev, x)  # no-ops: Identity / inference Dropout above the BN
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
        if dq_weight(index, pn) is not None:
            return tried(match_qdq(c, p), "qdq-bn")  # conv-bn / gemm-bn through a DequantizeLinear weight
    if kind == "DequantizeLinear":
        return activation_skip(c, p)
    if kind in ("Conv", "ConvTranspose"):
        return tried(_case_layer(c, p, layer_writes), "conv-bn")
    if kind == "Gemm":
        return tried(_case_layer(c, p, gemm_fold), "gemm-bn")
    if kind == "MatMul":
        return tried(_case_matmul(c, p, None), "gemm-bn")
    if kind == "Add":
        return _case_add(c, p)  # gemm-bn (MatMul -> Add), const-add-bn, branch-sum
    if kind in ("Reshape", "Flatten", "Transpose"):
        return tried(match_linear_norm(c, p), "linear-norm")
    if kind == "Concat":
        return tried(match_concat(c, p), "concat-split")
    if kind == "Sum":
        return tried(match_sum(c, p, list(pn.input)), "branch-sum")
    return Skip(
        label, SkipReason.NO_PRODUCER, f"its input comes from {kind} '{name_of(pn)}', which cannot absorb it"
    ), False


# ---- conv-bn: Conv / ConvTranspose -> BN ------------------------------------------------------------


def _case_layer(c: Fwd, p: int, writes: Callable[[Fwd, int, F64, F64], list[Write] | Skip]) -> Result:
    """conv-bn, gemm-bn: scale the output channels of a Conv / ConvTranspose / Gemm ``p`` and shift its
    bias, with the writes ``writes`` computes (a Gemm also gets beta = 1)."""
    pn = c.index.nodes[p]
    bad = common(c, f"{pn.op_type} '{name_of(pn)}'")
    if bad is not None:
        return bad, True
    w = writes(c, p, c.prm.scale, c.prm.shift)
    if isinstance(w, Skip):
        return w, True
    beta_one = (p,) if pn.op_type == "Gemm" else ()
    pattern = "gemm-bn" if pn.op_type == "Gemm" else "conv-bn"
    return Fold(**c.base(p, pn.op_type, pattern=pattern), locks=c.locks(p), writes=w, beta_one=beta_one), True


# ---- gemm-bn: Gemm -> BN ---------------------------------------------------------------------------


# ---- gemm-bn: MatMul [-> Add(bias)] -> BN, product of rank 2 ----------------------------------------


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
    if add is None:  # gemm-bn: becomes Gemm(A, W s, t)
        res = scale_out(mw, None, s, t, WeightLayout.matmul(), c.label, f"weight of {target}")
        if isinstance(res, Skip):
            return res, True
        return Fold(
            **c.base(m, "MatMul", pattern="gemm-bn"),
            locks=c.locks(m),
            writes=[Write(m, 1, res[0]), Write(m, 2, res[1])],
            to_gemm=m,
        ), True
    # gemm-bn: MatMul -> Add(bias): scale W and the bias (b s + t). The MatMul stays a MatMul, which
    # takes any rank: the rank 2 must be one the runtime enforces, not only declared (a value_info
    # entry on an intermediate value is never checked; a rank-3 product would be scaled on its rows).
    if enforced_rank(idx, mnode.input[0]) != 2:
        return Skip(
            c.label,
            SkipReason.LAYOUT,
            f"the rank of the left operand of {target} is declared, not enforced by the model (it comes "
            "from no graph input, initializer, Gemm, Flatten or constant-shape Reshape of rank 2)",
        ), True
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
        **c.base(m, "MatMul", pattern="gemm-bn"),
        locks=c.locks(add, m),
        writes=[Write(m, 1, wres[0]), Write(add, bias_slot, bres[0])],
    ), True


# ---- gemm-bn, const-add-bn, branch-sum: what an Add before the BN adds ---------------------------------


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
            return tried(_case_matmul(c, q, a), "gemm-bn")
        if kinds[side] in LAYERS and consts[1 - side]:
            return tried(_case_add_const(c, idx.producer[an.input[side]], a, 1 - side), "const-add-bn")
    if any(k in LAYERS or k == "MatMul" for k in kinds):
        return tried(match_sum(c, a, list(an.input)), "branch-sum")  # refuses a branch that is not a layer
    return Skip(
        c.label, SkipReason.NO_PRODUCER, f"its input comes from Add '{name_of(an)}', not a layer"
    ), False


def _case_add_const(c: Fwd, p: int, a: int, const_slot: int) -> Result:
    """const-add-bn: ``layer -> Add(constant per channel) -> BN``: the constant joins the layer's bias, the
    Add and the BN go (``s (W x + b + k) + t = (s W) x + (s (b + k) + t)``)."""
    idx = c.index
    pn, an = idx.nodes[p], idx.nodes[a]
    target = f"{pn.op_type} '{name_of(pn)}' (+ Add '{name_of(an)}')"
    bad = common(c, target) or exclusive(c, pn.output[0], f"{pn.op_type} '{name_of(pn)}'")
    if bad is not None:
        return bad, True
    if c.chain:
        # The Add goes away; a no-op between it and the BN would lose its input.
        return Skip(
            c.label, SkipReason.UNSUPPORTED_LAYER, f"no-ops between Add '{name_of(an)}' and the BN"
        ), True
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
    base = c.base(p, pn.op_type, f"through Add '{name_of(an)}' (constant)", "const-add-bn")
    base["remove"] = (c.bi, a)
    base["dropped"] = (an.output[0], pn.output[0])
    base["rename_output"] = (p, c.y)
    gemm = (p,) if pn.op_type == "Gemm" else ()
    return Fold(**base, locks=c.locks(p, a), writes=writes, beta_one=gemm), True
