"""Merge parallel branches that read one tensor into one Conv (structural re-parameterisation).

RepVGG, MobileOne, RepViT, PP-YOLOE, DBB/ACNet-style blocks compute, after their BNs are folded,
``y = sum_i B_i(x)`` where every branch ``B_i`` is linear in ``x`` and reads the same tensor ``x``::

    Before:                                   After:

        x --+-> Conv kxk -----------+             x -> Conv kxk (W, b) -> y
            +-> Conv 1x1 -> Mul(a) -+-> Add -> y
            +-> BN -----------------+
            +-------(identity)------+

A branch is one of (each optionally followed by ``Mul`` with a per-tensor or per-channel constant, and
``Identity`` nodes):

1. ``Conv(x)`` with the merged Conv's stride, dilation and groups, ``auto_pad`` NOTSET/VALID, a kernel
   ``k <= K`` per axis with ``K - k`` even, whose padding centres it in the largest kernel ``K``:
   ``p_small = p_large - d * (K - k) / 2`` on each side of each axis. Then the small conv reads
   exactly the pixels the large one reads at offsets ``(K - k) / 2 .. (K + k) / 2 - 1``, and zero-padding
   it to ``K`` gives the same output (same output size, by the same relation).
2. ``x`` itself (identity: ``C_in == C_out``, stride 1): a kernel with a 1 at the centre tap of
   input channel ``o mod (C_in / g)`` of output channel ``o`` (group-aware, depthwise included).
3. ``BatchNormalization(x)`` in inference mode: the identity kernel scaled by the BN scale; the BN shift
   is the bias.
4. ``AveragePool(x)`` with the merged stride, ``count_include_pad=1`` (or no padding), ``ceil_mode=0``:
   the uniform kernel ``1 / prod(k)`` on the diagonal channel, centred as in 1.
   4b. ``BatchNormalization(AveragePool(x))`` (DBB's avg branch with its BN): that kernel scaled by the
   BN scale per channel, the BN shift as bias.
1b. ``Conv(Slice(x))`` (ACNet with padding < k // 2: the 1x3 / 3x1 convs read ``x[..., 1:-1]``): a slice
   dropping ``s`` pixels at the begin and ``e`` at the end of spatial axes (step 1, the end counted from
   the end) is a conv of ``x`` with pads ``p - s`` / ``p - e`` (negative: a crop), placed as in 1.
   Refused where it both crops and pads one side, slices another axis, or ends at a fixed index.
5. ``Conv kxk(Conv 1x1(x))`` (DBB), both ungrouped, the 1x1 of stride 1 and unpadded: the product
   ``W[o, i] = sum_m W2[o, m] W1[m, i]``, bias ``b2 + sum_{m, taps} W2[o, m] b1[m]``. Exact only where
   the kxk conv reads no padded zeros (pads 0) or the 1x1 has no bias: at a padded border the bias
   ``b1`` is missing from the two-conv result; otherwise refused (PADDING).

6. The sum itself may hold ``Sub`` (its second operand counts negated) and ``Mul`` by a per-channel
   constant of an inner sum (FastViT: ``x + ls * (mixer(x) - norm(x))``); a leaf that is a per-channel
   constant joins the bias. A leaf that is not a branch of ``x`` stays (added to the merged conv) unless
   it is negated or scaled: then the merge is refused.

Kernels of any size merge when their padding places them on the taps of the largest one (an even
kernel with asymmetric pads included): per axis, ``c = (P_begin - p_begin) / d`` must be an integer
with ``0 <= c <= K - k`` and ``P_end - p_end = d * (K - k - c)`` (the same output size for any input).

The merged weight and bias are summed in float64 and cast once to the weight dtype (an overflow
refuses the merge). A branch conv that a BN fold wrote is read as the float64 values that fold rounded
(:class:`Exact`, recorded by the fold driver through :func:`exact_fold` and used only where they round
to exactly the tensors in the graph), so a float16 merge rounds once, not once per branch and again for
the sum; a BN on the merged sum then folds from the merged float64 values (one rounding again). The largest conv (by kernel volume) is the reference: its attributes stay, its
weight and bias are replaced, and its output takes the sum's name (graph outputs keep their names).
Leaves of the sum that are not branches of ``x`` (any other tensor) stay, added to the merged conv.

A sum is a *candidate* when at least two of its leaves reach the same ``x`` through at most a few
single-input ops, at least one of them a Conv. Every branch of a candidate gets a verdict
(:class:`~bnfold.records.BranchVerdict`): an activation inside a branch (NONLINEAR), a tensor inside a
branch read elsewhere (OTHER_CONSUMERS), a different stride/dilation/groups, padding that does not
centre, a kernel that cannot be centred, non-constant weights... A candidate where fewer than two
branches can be merged is refused as a whole (a :class:`~bnfold.records.Merge` with ``merged=False``).

The pass runs after bnfold's BN folds (so ``Conv -> BN`` branches are already plain Convs); the fold
driver folds again after it, so that a BN on the sum (RepViT, QARepVGG) folds into the merged conv.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import GraphProto, NodeProto, helper, numpy_helper

from bnfold.fold_math import cast_exact
from bnfold.fold_math.merge import (
    ConvRead,
    MergeRef,
    MergeRefusal,
    absorb_constants,
    blocker_refusal,
    check_conv,
    compose_pointwise,
    embed,
    identity_kernel,
    merge_record,
    pick_input,
    pick_reference,
    pool_kernel,
    refuse_odd,
    refuse_open,
    scale_branch,
    sum_kernels,
)
from bnfold.fold_math.subnormal import flush_written
from bnfold.records import Direction, Merge, MergeReason, Site, Skip

from .const import ConstEvaluator, is_float
from .graph import GraphIndex, attr
from .rewrite import Names

__all__ = ["MergeResult", "merge_branches"]

F64 = npt.NDArray[np.float64]

_MAX_WALK = 4
"""Ops walked from a leaf of the sum towards a shared input when looking for a branch."""

_SUM_OPS = ("Add", "Sum")
"""Sum nodes; ``Sub`` joins a chain too (its second operand counts with sign -1)."""

_ACTIVATIONS = frozenset(
    "Relu LeakyRelu PRelu Sigmoid HardSigmoid Tanh Clip Elu Selu Celu Gelu HardSwish Softplus Softsign Mish "
    "Swish Erf Abs Exp Log Sqrt Pow Reciprocal Sin Cos Floor Ceil Round Sign ThresholdedRelu Softmax "
    "LogSoftmax MaxPool Max Min".split()
)


@dataclass(slots=True)
class Exact:
    """The float64 values a conv's rounded weight and bias came from: ``(w * s, b * s + t)`` per output
    channel (``s`` None: ``(w, b)`` as they are). Kept so that a merge (and a BN folded into a merged conv
    afterwards) sums and scales these, not the rounded tensors, and rounds once (a float16 model would
    otherwise round twice). Used only where it rounds to exactly the tensors in the graph."""

    bias_name: str
    w: npt.NDArray[Any]
    b: npt.NDArray[Any] | None
    s: F64 | None = None
    t: F64 | None = None

    def values(self) -> tuple[F64, F64]:
        """The float64 weight and bias."""
        w = self.w.astype(np.float64)
        b = np.zeros(w.shape[0]) if self.b is None else self.b.astype(np.float64).reshape(-1)
        if self.s is None:
            return w, b
        t = np.zeros_like(self.s) if self.t is None else self.t
        w *= self.s.reshape((-1,) + (1,) * (w.ndim - 1))  # in place: ``w`` is astype's own copy
        return w, b * self.s + t


ExactTable = dict[str, Exact]
"""``{weight initializer name: Exact}`` of the convs a fold or a merge wrote (see :class:`Exact`)."""

_EXACT_READERS = frozenset(("Add", "Sum", "Sub", "Mul", "Identity"))
"""A fold is recorded only when the BN's output is read by these alone (a possible branch of a sum):
the original weight is held until the merge, so only for convs that may merge."""


def exact_values(
    exact: ExactTable, n: NodeProto, w: npt.NDArray[Any], bias: npt.NDArray[Any] | None
) -> tuple[F64, F64 | None]:
    """Conv ``n``'s weight and bias in float64: the exact values of the fold or merge that wrote them where
    they round to exactly ``w`` and ``bias`` (bit for bit), else ``w`` and ``bias`` themselves."""
    got = _recorded(exact, n, w, bias)
    if got is not None:
        return got
    return w.astype(np.float64), None if bias is None else bias.astype(np.float64).reshape(-1)


def _recorded(
    exact: ExactTable, n: NodeProto, w: npt.NDArray[Any], bias: npt.NDArray[Any] | None
) -> tuple[F64, F64] | None:
    rec = exact.get(n.input[1]) if len(n.input) > 1 else None
    b_name = n.input[2] if len(n.input) > 2 else ""
    if rec is None or bias is None or rec.bias_name != b_name or w.dtype == np.float64:
        return None
    ew, eb = rec.values()
    if ew.shape != w.shape or eb.shape != (w.shape[0],) or bias.size != w.shape[0]:
        return None
    if _same_bits(cast_exact(ew, w.dtype), w) and _same_bits(cast_exact(eb, bias.dtype), bias.reshape(-1)):
        return ew, eb
    return None


def _same_bits(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    """Same shape, dtype and bits (compared as unsigned integers in place: no byte copies)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    size = a.dtype.itemsize
    if size not in (1, 2, 4, 8):
        return a.tobytes() == np.ascontiguousarray(b).tobytes()
    bits = np.dtype(f"u{size}")
    return bool(np.array_equal(np.ascontiguousarray(a).view(bits), np.ascontiguousarray(b).view(bits)))


def exact_fold(
    index: GraphIndex, ev: ConstEvaluator, plan: Any, exact: ExactTable
) -> tuple[int, Exact] | None:
    """Before a forward BN fold into a Conv is applied: ``(conv node, Exact)`` to record under the conv's
    weight name once applied (the caller sets its ``bias_name``), or None.

    The plan's result must be ``cast(w * s)``, ``cast(b * s + t)`` of the conv's current tensors and the
    BN's scale and shift (checked bit for bit: folds through reshapes or channel splits are not
    recorded), and the BN's output read by a sum (or a scale of one) only. When the conv's tensors came
    from an exact record themselves (a merged conv with a BN on its sum: RepViT, QARepVGG), the plan's
    writes are replaced by the once-rounded ``cast(exact * s)``, ``cast(exact_b * s + t)``."""
    from .match import bn_params  # the fold's own reading of a BN (no import cycle at load)

    if plan.clone is not None or not plan.remove or plan.site.direction is not Direction.FORWARD:
        return None
    bn = index.nodes[plan.remove[0]]
    if bn.op_type != "BatchNormalization":
        return None
    if len({wr.node for wr in plan.writes}) != 1 or sorted(wr.slot for wr in plan.writes) != [1, 2]:
        return None
    ci = plan.writes[0].node
    conv = index.nodes[ci]
    if conv.op_type != "Conv" or not _is_std(conv):
        return None
    if conv.input[1] not in exact:  # cheap test first: most folds are no branch of a sum
        readers = index.consumers.get(bn.output[0], [])
        if not readers or any(index.nodes[r].op_type not in _EXACT_READERS for r in readers):
            return None  # not a branch of a sum: nothing to merge it with, nothing held
    w = ev.resolve(conv.input[1])[0]
    b = ev.resolve(conv.input[2])[0] if len(conv.input) > 2 and conv.input[2] else None
    prm = bn_params(index, ev, bn, plan.site.bn)
    if w is None or isinstance(prm, Skip) or prm.per_element or not is_float(w) or w.dtype == np.float64:
        return None
    if prm.channels != w.shape[0] or (b is not None and (b.size != w.shape[0] or b.dtype != w.dtype)):
        return None
    new_w = next(wr for wr in plan.writes if wr.slot == 1)
    new_b = next(wr for wr in plan.writes if wr.slot == 2)
    plain = Exact("", w, b, prm.scale, prm.shift)
    pw, pb = plain.values()
    if not (
        _same_bits(cast_exact(pw, w.dtype), new_w.value)
        and _same_bits(cast_exact(pb, w.dtype), new_b.value.reshape(-1))
    ):
        return None
    base = _recorded(exact, conv, w, b)
    if base is None:
        return ci, plain
    rec = Exact("", base[0], base[1], prm.scale, prm.shift)
    ew, eb = rec.values()
    cw, cb = cast_exact(ew, w.dtype), cast_exact(eb, w.dtype)
    if not (np.all(np.isfinite(cw)) and np.all(np.isfinite(cb))):
        return ci, plain
    new_w.value = cw
    new_b.value = cb.reshape(new_b.value.shape)
    return ci, rec


@dataclass(slots=True)
class MergeResult:
    """What one merge pass did."""

    merges: list[Merge] = field(default_factory=list)
    """Every candidate sum: merged or refused."""
    absorbed: dict[str, Site] = field(default_factory=dict)
    """``{BN output name: Site}`` for the identity-BN branches merged into a conv."""
    candidates: set[str] = field(default_factory=set)
    """Values that may have become unread (for :func:`bnfold.onnx.rewrite.remove_dead`)."""
    applied: int = 0
    flushed: int = 0


@dataclass(slots=True)
class _Branch:
    """One leaf of the sum read as a branch of ``x``."""

    leaf: str
    kind: str  # conv | identity | bn | avgpool | other
    base: int | None  # the Conv/BN/AveragePool node (None for the identity)
    muls: list[int]  # Mul nodes between the base and the sum (closest to the base first)
    blockers: list[int]  # non-linear nodes in the way (kind "other")
    pre: int | None = None  # kind "seq": the 1x1 Conv before the base Conv
    post: int | None = None  # kind "avgpool": a BatchNormalization right after the pool (DBB's avgbn)
    crop: int | None = None  # kind "conv": a Slice of x the conv reads (ACNet's cropping form)
    sign: int = 1  # -1: the second operand of a Sub of the chain
    chain_muls: tuple[int, ...] = ()  # constant Muls of the chain over this leaf
    label: str = ""
    reason: MergeReason | None = None
    detail: str = ""
    weight: F64 | None = None
    bias: F64 | None = None


def _is_std(n: NodeProto) -> bool:
    return n.domain in ("", "ai.onnx")


Coef = tuple[int, tuple[int, ...]]
"""A leaf's coefficient in the sum: its sign (a Sub's second operand: -1) and the chain Muls over it."""


def _chain(index: GraphIndex, ev: ConstEvaluator, top: int) -> tuple[list[int], list[str], list[Coef]]:
    """The nodes of the sum ending at ``top`` (Add, Sum, Sub, and a Mul by a constant of an inner sum) and
    its leaves with their coefficients, in the order the sum reads them. An inner node is part of the
    chain when the chain alone reads its output."""
    nodes: list[int] = []
    leaves: list[str] = []
    coefs: list[Coef] = []

    def walk(i: int, sign: int, factors: tuple[int, ...], depth: int) -> None:
        nodes.append(i)
        n = index.nodes[i]
        if n.op_type == "Mul":  # Case 6: a constant scale of an inner sum (FastViT's layer scale)
            k = _const_slot(ev, n)
            assert k is not None
            walk(index.producer[n.input[1 - k]], sign, (*factors, i), depth + 1)
            return
        for slot, v in enumerate(n.input):
            s = -sign if n.op_type == "Sub" and slot == 1 else sign
            p = index.producer.get(v)
            if p is not None and depth < 256 and index.single_consumer(v) == i and _expandable(index, ev, p):
                walk(p, s, factors, depth + 1)
            else:
                leaves.append(v)
                coefs.append((s, factors))

    walk(top, 1, (), 0)
    return nodes, leaves, coefs


def _plain_sum(n: NodeProto) -> bool:
    if not (_is_std(n) and not n.attribute and len(n.output) == 1):
        return False
    return n.op_type in _SUM_OPS or (n.op_type == "Sub" and len(n.input) == 2)


def _expandable(index: GraphIndex, ev: ConstEvaluator, p: int) -> bool:
    """Node ``p`` continues a sum: an Add/Sum/Sub, or a Mul by a constant of an Add/Sum/Sub read by it alone."""
    n = index.nodes[p]
    if _plain_sum(n):
        return True
    if n.op_type != "Mul" or not _is_std(n) or len(n.input) != 2 or len(n.output) != 1:
        return False
    k = _const_slot(ev, n)
    if k is None:
        return False
    v = n.input[1 - k]
    q = index.producer.get(v)
    return q is not None and _plain_sum(index.nodes[q]) and index.single_consumer(v) == p


def _chain_parent(index: GraphIndex, ev: ConstEvaluator, i: int) -> int | None:
    """The chain node that would absorb sum node ``i`` (its reader, through one constant Mul), or None."""
    c = index.single_consumer(index.nodes[i].output[0])
    if c is None:
        return None
    if _plain_sum(index.nodes[c]):
        return c
    if _expandable(index, ev, c):
        c2 = index.single_consumer(index.nodes[c].output[0])
        if c2 is not None and _plain_sum(index.nodes[c2]):
            return c2
    return None


def _interpretations(index: GraphIndex, ev: ConstEvaluator, leaf: str) -> list[tuple[str, _Branch]]:
    """Every ``(x, branch)`` reading of ``leaf`` as a branch of some tensor ``x``, nearest first."""
    out: list[tuple[str, _Branch]] = []
    v = leaf
    muls: list[int] = []
    blockers: list[int] = []
    for _ in range(_MAX_WALK + 1):
        out.append(
            (v, _Branch(leaf, "identity" if not blockers else "other", None, list(muls), list(blockers)))
        )
        p = index.producer.get(v)
        if p is None:
            break
        n = index.nodes[p]
        if not _is_std(n) or not n.input:
            break
        if n.op_type == "Identity" and len(n.input) == 1:  # exporters insert these: a scale of 1
            muls.insert(0, p)
            v = n.input[0]
            continue
        if n.op_type == "Mul" and len(n.input) == 2:
            k = _const_slot(ev, n)
            if k is None:
                break
            muls.insert(0, p)
            v = n.input[1 - k]
            continue
        if n.op_type in ("Conv", "BatchNormalization", "AveragePool"):  # Cases 1, 3, 4
            kind = {"Conv": "conv", "BatchNormalization": "bn", "AveragePool": "avgpool"}[n.op_type]
            out.append(
                (n.input[0], _Branch(leaf, kind if not blockers else "other", p, list(muls), list(blockers)))
            )
            q = index.producer.get(n.input[0])
            qn = index.nodes[q] if q is not None else None
            if n.op_type == "BatchNormalization" and not blockers and qn is not None and _is_std(qn):
                if qn.op_type == "AveragePool" and qn.input:
                    # Case 4b: AveragePool -> BN (DBB's avg branch): a uniform kernel, scaled and shifted
                    out.append((qn.input[0], _Branch(leaf, "avgpool", q, list(muls), [], post=p)))
            if (
                n.op_type == "Conv"
                and not blockers
                and qn is not None
                and _is_std(qn)
                and qn.op_type == "Slice"
            ):
                # Case 1b: Conv(Slice(x)) (ACNet with padding < k // 2): a conv of x with the crop as pads
                out.append((qn.input[0], _Branch(leaf, "conv", p, list(muls), [], crop=q)))
            if (
                n.op_type == "Conv"
                and not blockers
                and q is not None
                and index.nodes[q].op_type == "Conv"
                and _is_std(index.nodes[q])
                and _is_pointwise(ev, index.nodes[q])
            ):
                # Case 5: Conv 1x1 -> Conv kxk, one linear map of the 1x1's input
                out.append((index.nodes[q].input[0], _Branch(leaf, "seq", p, list(muls), [], pre=q)))
            break
        if n.op_type in _SUM_OPS or n.op_type in ("Concat", "Gemm", "MatMul", "ConvTranspose"):
            break
        # any other op on one data input (activation, Clip, Pad, ...): a blocker
        blockers.insert(0, p)
        muls = []
        v = n.input[0]
    return out


def _is_pointwise(ev: ConstEvaluator, n: NodeProto) -> bool:
    """A Conv whose kernel is 1 on every spatial axis (from ``kernel_shape`` or its constant weight)."""
    ks = attr(n, "kernel_shape", None)
    if ks is None and len(n.input) > 1:
        vt = ev.index.value_type(n.input[1])
        ks = None if vt is None or vt.shape is None else vt.shape[2:]
    return ks is not None and len(ks) > 0 and all(k == 1 for k in ks)


def _const_slot(ev: ConstEvaluator, n: NodeProto) -> int | None:
    """The input slot of a Mul that is a constant (the other one not), or None."""
    consts = [k for k in (0, 1) if n.input[k] and ev.resolve(n.input[k])[0] is not None]
    return consts[0] if len(consts) == 1 else None


def _pick_input(
    index: GraphIndex, ev: ConstEvaluator, leaves: list[str], coefs: list[Coef]
) -> tuple[str, list[_Branch], list[tuple[str, Coef]]] | None:
    """The shared input ``x`` read by the most leaves (at least two, one through a Conv): its branches
    (one per leaf that reaches it) and the other leaves."""
    return pick_input(
        leaves,
        coefs,
        [_interpretations(index, ev, v) for v in leaves],
        lambda b: (
            b.kind in ("conv", "seq")
            or (b.kind == "other" and b.base is not None and index.nodes[b.base].op_type == "Conv")
        ),
    )


# ---- per-branch checks ---------------------------------------------------------------------------


def _ints(n: NodeProto, name: str, default: list[int]) -> list[int]:
    return [int(v) for v in attr(n, name, default)]


def _conv_geometry(n: NodeProto, w: npt.NDArray[Any]) -> tuple[list[int], list[int], list[int], int]:
    """strides, dilations, pads (begins + ends) and group of a Conv; raises MergeRefusal for auto_pad SAME."""
    r = w.ndim - 2
    auto = attr(n, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        raise MergeRefusal(MergeReason.PADDING, f"auto_pad={auto}: its padding depends on the input size")
    pads = [0] * (2 * r) if auto == "VALID" else _ints(n, "pads", [0] * (2 * r))
    return _ints(n, "strides", [1] * r), _ints(n, "dilations", [1] * r), pads, int(attr(n, "group", 1))


def _weights(
    ev: ConstEvaluator, n: NodeProto, label: str
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    vals: list[npt.NDArray[Any] | None] = []
    for slot, what in ((1, "weight"), (2, "bias")):
        if slot >= len(n.input) or not n.input[slot]:
            vals.append(None)
            continue
        v, _, detail = ev.resolve(n.input[slot])
        if v is None:
            raise MergeRefusal(MergeReason.NON_CONSTANT, f"the {what} of {label} is not a constant: {detail}")
        if not is_float(v):
            raise MergeRefusal(MergeReason.UNSUPPORTED, f"the {what} of {label} has dtype {v.dtype}")
        vals.append(v)
    w = vals[0]
    if w is None:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{label} has no weight")
    return w, vals[1]


def _read_conv(index: GraphIndex, ev: ConstEvaluator, b: _Branch, exact: ExactTable) -> ConvRead:
    """A conv branch's weight and geometry; for ``seq`` (Case 5: ``Conv 1x1 -> Conv kxk``) the product of
    the two, ``W[o, i] = sum_m W2[o, m] W1[m, i]``, ``b = b2 + sum_{m, taps} W2[o, m] b1[m]``: exact only
    when the kxk conv reads no padded zeros (there the 1x1's bias would be missing) or ``b1 = 0``."""
    what = b.label
    assert b.base is not None
    n = index.nodes[b.base]
    w, bias = _weights(ev, n, what)
    if w.ndim < 3:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: weight of rank {w.ndim}")
    strides, dil, pads, group = _conv_geometry(n, w)
    w64, b64 = exact_values(exact, n, w, bias)  # a folded conv's float64 values: the merge rounds once
    if b.crop is not None:
        pads = _crop_pads(index, ev, b.crop, pads, w.ndim, what)
    if b.pre is not None:
        pre = index.nodes[b.pre]
        pre_label = index.label(b.pre)
        w1, b1 = _weights(ev, pre, pre_label)
        s1, _, p1, g1 = _conv_geometry(pre, w1)
        if any(s != 1 for s in s1) or any(p1) or w1.ndim != w.ndim or any(k != 1 for k in w1.shape[2:]):
            raise MergeRefusal(
                MergeReason.UNSUPPORTED,
                f"{pre_label} -> {what}: the first conv is not a 1x1, stride 1, unpadded",
            )
        if g1 != 1 or group != 1 or w1.shape[0] != w.shape[1]:
            raise MergeRefusal(
                MergeReason.GROUPS, f"{pre_label} -> {what}: grouped convs in sequence (groups {g1}, {group})"
            )
        m1, b1_64 = exact_values(exact, pre, w1, b1)
        w64, b64 = compose_pointwise(w64, b64, m1, b1_64, pads, f"{pre_label} -> {what}")
    return ConvRead(w64, b64, np.dtype(w.dtype), strides, dil, pads, group)


_TO_END = 2**31 - 1
"""A Slice end at or past this reads to the end of the axis (exporters write INT32_MAX or INT64_MAX)."""


def _crop_pads(
    index: GraphIndex, ev: ConstEvaluator, i: int, pads: list[int], ndim: int, what: str
) -> list[int]:
    """Case 1b: the pads of a conv of ``x`` equal to the conv (``pads``) of ``Slice(x)`` (node ``i``).

    A slice that drops ``s`` pixels at the begin and ``e`` at the end of a spatial axis (step 1, the end
    counted from the end: independent of the input size) followed by a conv with pads ``p`` reads what a
    conv of ``x`` with pads ``p - s`` (and ``p - e``) reads -- a negative pad crops -- provided it does not
    both crop and pad one side (the padded zeros would sit where ``x`` has values). Refused otherwise."""
    sl = index.nodes[i]
    label = index.label(i)
    r = ndim - 2
    if len(sl.input) < 3:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what} reads Slice '{label}' of the attribute form")
    vals: list[list[int] | None] = []
    for slot in (1, 2, 3, 4):
        if slot >= len(sl.input) or not sl.input[slot]:
            vals.append(None)
            continue
        v = ev.resolve(sl.input[slot])[0]
        if v is None or v.dtype.kind not in "iu":
            raise MergeRefusal(
                MergeReason.NON_CONSTANT,
                f"{what} reads Slice '{label}' whose starts/ends/axes/steps are not constant",
            )
        vals.append([int(k) for k in np.asarray(v).reshape(-1)])
    starts, ends, axes, steps = vals
    assert starts is not None and ends is not None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what} reads Slice '{label}' of inconsistent inputs")
    out = list(pads)
    for ax, st, en, step in zip(axes, starts, ends, steps):
        ax = ax + ndim if ax < 0 else ax
        full = st == 0 and en >= _TO_END
        if full:
            continue
        if step != 1 or ax < 2 or ax >= ndim or st < 0 or (0 <= en < _TO_END):
            raise MergeRefusal(
                MergeReason.UNSUPPORTED,
                f"{what} reads Slice '{label}' (axis {ax}, {st}:{en}:{step}): only a crop of a spatial axis, step 1, "
                "its end counted from the end, is a conv of the uncropped input",
            )
        a = ax - 2
        e = 0 if en >= _TO_END else -en
        if (st and out[a]) or (e and out[a + r]):
            raise MergeRefusal(
                MergeReason.PADDING,
                f"{what} pads {pads} after Slice '{label}' crops axis {ax}: the padded zeros sit where the "
                "uncropped input has values",
            )
        out[a] -= st
        out[a + r] -= e
    return out


def _branch_kernel(
    index: GraphIndex, ev: ConstEvaluator, ref: MergeRef, b: _Branch, x: str, exact: ExactTable
) -> tuple[F64, F64]:
    """The branch as (weight, bias) of the merged conv's shape, in float64; MergeRefusal why not."""
    what = b.label
    if b.kind in ("conv", "seq"):  # Cases 1 and 5
        cr = _read_conv(index, ev, b, exact)
        w64 = embed(ref, cr.w, check_conv(ref, cr, what))
        b64 = np.zeros(ref.c_out) if cr.bias is None else cr.bias
        if b64.shape != (ref.c_out,):
            raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: bias of shape {list(b64.shape)}")
    elif b.kind == "identity":  # Case 2
        w64, b64 = identity_kernel(ref, what), np.zeros(ref.c_out)
    elif b.kind == "bn":  # Case 3
        assert b.base is not None
        s, t = _bn_affine(index, ev, b.base, ref, what)
        w64 = identity_kernel(ref, what, s)
        b64 = t
    elif b.kind == "avgpool":  # Case 4
        assert b.base is not None
        n = index.nodes[b.base]
        k = tuple(_ints(n, "kernel_shape", []))
        r = len(k)
        auto = attr(n, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto not in ("NOTSET", "VALID"):
            raise MergeRefusal(MergeReason.PADDING, f"{what}: auto_pad={auto}")
        pads = [0] * (2 * r) if auto == "VALID" else _ints(n, "pads", [0] * (2 * r))
        if int(attr(n, "ceil_mode", 0)):
            raise MergeRefusal(MergeReason.PADDING, f"{what}: ceil_mode=1 (its output size is not a conv's)")
        if any(pads) and not int(attr(n, "count_include_pad", 0)):
            raise MergeRefusal(
                MergeReason.PADDING,
                f"{what}: count_include_pad=0 with padding: edge windows divide by fewer values than a conv",
            )
        dilated = _ints(n, "dilations", [1] * r) != ref.dilations
        w64 = pool_kernel(ref, k, _ints(n, "strides", [1] * r), pads, dilated, what)
        b64 = np.zeros(ref.c_out)
        if b.post is not None:  # Case 4b: the BN after the pool scales and shifts it per channel
            s, t = _bn_affine(index, ev, b.post, ref, what)
            w64 = w64 * s.reshape((-1,) + (1,) * (ref.rank + 1))
            b64 = t
    else:  # pragma: no cover - callers pass the four kinds
        raise AssertionError(b.kind)
    # a constant scale after the branch (PP-YOLOE alpha, a layer scale)
    factors = (_mul_factor(ev, index.nodes[m], ref, index.label(m)) for m in (*b.muls, *b.chain_muls))
    return scale_branch(ref, w64, b64, factors, b.sign)


def _bn_affine(index: GraphIndex, ev: ConstEvaluator, i: int, ref: MergeRef, what: str) -> tuple[F64, F64]:
    """BN node ``i`` as a float64 per-channel ``(scale, shift)`` over the merged conv's output channels."""
    from .match import bn_params  # the fold's own reading of a BN (no import cycle at load)

    prm = bn_params(index, ev, index.nodes[i], what)
    if isinstance(prm, Skip):
        reason = MergeReason.NON_CONSTANT if prm.reason.value == "non_constant" else MergeReason.UNSUPPORTED
        raise MergeRefusal(reason, f"{what}: {prm.detail}")
    if prm.per_element or prm.channels != ref.c_out:
        raise MergeRefusal(
            MergeReason.GROUPS, f"{what}: {prm.channels} BN channels, the merged conv {ref.c_out}"
        )
    return prm.scale.astype(np.float64), prm.shift.astype(np.float64)


def _mul_factor(ev: ConstEvaluator, n: NodeProto, ref: MergeRef, label: str) -> F64:
    if n.op_type == "Identity":
        return np.ones(ref.c_out)
    k = _const_slot(ev, n)
    assert k is not None
    c, _, _ = ev.resolve(n.input[k])
    assert c is not None
    return _channel_vector(c, ref, label, "scale")


def _channel_vector(c: npt.NDArray[Any], ref: MergeRef, label: str, what: str) -> F64:
    """A constant that broadcasts per output channel over the merged conv's output, as a float64 [C]."""
    if not is_float(c):
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{label}: {what} of dtype {c.dtype}")
    full = ref.rank + 2
    if c.ndim > full:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{label}: {what} of rank {c.ndim} > {full}")
    shape = (1,) * (full - c.ndim) + tuple(c.shape)
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, ref.c_out):
        raise MergeRefusal(
            MergeReason.UNSUPPORTED, f"{label}: {what} of shape {list(c.shape)} is not per channel"
        )
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (ref.c_out,)).copy()


def _exclusive(index: GraphIndex, b: _Branch, x: str, chain: set[int]) -> None:
    """MergeRefusal when a tensor inside the branch is read by anything but the next node of the branch."""
    path = _path(b)
    for k, node in enumerate(path):
        out = index.nodes[node].output[0]
        readers = index.consumers.get(out, [])
        allowed = {path[k + 1]} if k + 1 < len(path) else chain
        if out in index.graph_outputs or any(r not in allowed for r in readers):
            who = (
                "a graph output"
                if out in index.graph_outputs
                else ", ".join(sorted({index.label(r) for r in readers if r not in allowed}))
            )
            raise MergeRefusal(
                MergeReason.OTHER_CONSUMERS, f"'{out}' inside the branch is also read by {who}"
            )


def _path(b: _Branch) -> list[int]:
    """The nodes of a branch from its base to the sum (a 1x1 Conv before it, the base, then its Muls)."""
    return (
        ([b.crop] if b.crop is not None else [])
        + ([b.pre] if b.pre is not None else [])
        + ([b.base] if b.base is not None else [])
        + ([b.post] if b.post is not None else [])
        + b.muls
    )


_FAR_WALK = 64
"""Nodes walked (first inputs only) from a leaf that is no branch to find that it still reads ``x``."""


def _far_branch(index: GraphIndex, leaf: str, x: str) -> _Branch | None:
    """A leaf of the sum that reads ``x`` through more (or other) ops than a branch has, as a refused
    branch naming them (DBB's BNAndPadLayer exported as Pad + ScatterND, ...); None when it does not."""
    v = leaf
    path: list[int] = []
    for _ in range(_FAR_WALK):
        p = index.producer.get(v)
        if p is None or not index.nodes[p].input:
            return None
        path.append(p)
        v = index.nodes[p].input[0]
        if v == x:
            break
    else:
        return None
    kinds: list[str] = []
    for i in reversed(path):
        op = index.nodes[i].op_type
        if op not in kinds:
            kinds.append(op)
    return _Branch(
        leaf,
        "other",
        None,
        [],
        [path[0]],
        reason=MergeReason.UNSUPPORTED,
        detail=(
            f"reads '{x}' through {len(path)} ops ({', '.join(kinds)}): not a form bnfold merges "
            "(a branch is a Conv, Conv 1x1 -> Conv, AveragePool, BN or the identity, each optionally scaled)"
        ),
    )


def _kind_label(index: GraphIndex, b: _Branch, x: str) -> str:
    if b.base is not None:
        return index.label(b.base)
    if b.muls:
        return index.label(b.muls[-1])
    if b.blockers:
        return index.label(b.blockers[-1])
    return x


# ---- the pass ------------------------------------------------------------------------------------


def merge_branches(
    graph: GraphProto,
    index: GraphIndex,
    ev: ConstEvaluator,
    names: Names,
    *,
    prefix: str = "",
    bn_labels: dict[str, str] | None = None,
    exclude: frozenset[str] = frozenset(),
    add_inputs: bool = False,
    flush: bool = False,
    exact: ExactTable | None = None,
) -> MergeResult:
    """Merge every sum of branches of one tensor into one Conv (see the module docstring); edit ``graph``.

    Args:
        graph: the graph (``index`` indexes it as it is now).
        index: its index; ``ev`` its constant evaluator.
        names: the model's name allocator.
        prefix: subgraph label prefix of the verdicts.
        bn_labels: ``{BN output: verdict label}`` for the BN branches merged.
        exclude: labels of sums left unmerged (their record says why).
        add_inputs: list new initializers as graph inputs (IR < 4).
        flush: set subnormal values of the merged tensors to zero.
        exact: the float64 values of the convs folds wrote (:class:`Exact`), read for the branches and
            extended with each merged conv's (a BN on the sum folds into it with one rounding).
    """
    exact = {} if exact is None else exact
    res = MergeResult()
    locked: set[int] = set()
    removed: set[int] = set()
    inserts: dict[int, list[NodeProto]] = {}
    dropped: set[str] = set()
    bn_labels = bn_labels or {}
    in_chain: set[int] = set()
    tops = []
    for i, n in enumerate(index.nodes):
        if not _plain_sum(n):
            continue
        if _chain_parent(index, ev, i) is not None:
            continue  # an inner node of a longer chain
        tops.append(i)
    for top in tops:
        chain_nodes, leaves, coefs = _chain(index, ev, top)
        if any(c in in_chain for c in chain_nodes):
            continue
        picked = _pick_input(index, ev, leaves, coefs)
        if picked is None:
            continue
        x, branches, rest = picked
        for leaf, coef in list(rest):  # a leaf that reads x through a longer path: a verdict, kept as is
            far = _far_branch(index, leaf, x)
            if far is not None:
                far.sign, far.chain_muls = coef
                branches.append(far)
                rest.remove((leaf, coef))
        sum_label = prefix + index.label(top)
        chain = set(chain_nodes)
        for b in branches:
            b.label = prefix + _kind_label(index, b, x)
            if b.kind == "bn" and b.base is not None:
                b.label = bn_labels.get(index.nodes[b.base].output[0], b.label)
            if b.post is not None:
                b.label = bn_labels.get(index.nodes[b.post].output[0], b.label)
        rec = _plan(index, ev, x, branches, chain, sum_label, exclude, exact)
        touched = chain | {i for br in branches if br.reason is None for i in _path(br)}
        if isinstance(rec, Merge):
            res.merges.append(rec)
            continue
        if touched & locked:
            continue  # overlaps a merge of this pass: decided in the next one
        locked |= touched
        in_chain |= chain
        ref, w_sum, b_sum = rec
        # the leaves kept (not branches of x, or refused ones); a constant one joins the bias
        b_sum, kept, odd = absorb_constants(
            b_sum,
            [
                *((leaf, sign, factors) for leaf, (sign, factors) in rest),
                *((br.leaf, br.sign, br.chain_muls) for br in branches if br.reason is not None),
            ],
            partial(_constant_leaf, index, ev, ref),
        )
        if odd:
            refuse_odd(branches, [repr(v) for v in odd], x, ops="Conv plus an Add")
            res.merges.append(_refused(sum_label, x, branches, index))
            continue
        # write: the reference conv takes the merged weight and bias and the sum's output name
        ref_node = index.nodes[ref.node]
        out_dtype = ref.dtype
        wc, bc = cast_exact(w_sum, out_dtype), cast_exact(b_sum, out_dtype)
        if not (np.all(np.isfinite(wc)) and np.all(np.isfinite(bc))):
            refuse_open(
                branches, MergeReason.OVERFLOW, f"the merged weight or bias is not finite in {out_dtype}"
            )
            res.merges.append(_refused(sum_label, x, branches, index))
            continue
        if flush:
            wc, n1 = flush_written(wc)
            bc, n2 = flush_written(bc)
            res.flushed += n1 + n2
        base = ref_node.name or index.label(ref.node)
        w_name, b_name = names.fresh(f"{base}.weight_merged"), names.fresh(f"{base}.bias_merged")
        for nm, val in ((w_name, wc), (b_name, bc)):
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(val), nm))
            if add_inputs:
                graph.input.append(
                    helper.make_tensor_value_info(nm, graph.initializer[-1].data_type, list(val.shape))
                )
        res.candidates.update(v for v in ref_node.input[1:] if v)
        exact[w_name] = Exact(b_name, w_sum, b_sum)
        while len(ref_node.input) < 3:
            ref_node.input.append("")
        ref_node.input[0], ref_node.input[1], ref_node.input[2] = x, w_name, b_name
        top_out = index.nodes[top].output[0]
        old_out = ref_node.output[0]
        dropped.add(old_out)
        label = index.labels.pop(old_out, None)
        merged_branches = [br for br in branches if br.reason is None]
        for br in merged_branches:
            for node in _path(br):
                if node != ref.node:
                    removed.add(node)
                    res.candidates.update(v for v in index.nodes[node].input if v)
                    dropped.update(o for o in index.nodes[node].output if o)
                    if (br.kind == "bn" and node == br.base) or node == br.post:
                        key = index.nodes[node].output[0]
                        bl = bn_labels.get(key, prefix + index.label(node))
                        res.absorbed[key] = Site(
                            bl,
                            base,
                            "Conv",
                            Direction.FORWARD,
                            f"identity BN branch merged into one Conv with the other branches of '{sum_label}'",
                            "branch-merge",
                        )
        for node in chain:
            removed.add(node)
            dropped.update(o for o in index.nodes[node].output if o and o != top_out)
        # the leaves kept are added back after the merged conv
        if not kept:
            ref_node.output[0] = top_out
        else:
            mid = names.fresh(f"{old_out}_merged")
            ref_node.output[0] = mid
            cur = mid
            new_nodes = []
            for k, leaf in enumerate(kept):
                o = top_out if k == len(kept) - 1 else names.fresh(f"{top_out}_part")
                new_nodes.append(
                    helper.make_node("Add", [cur, leaf], [o], name=names.fresh(f"{sum_label}_rest"))
                )
                cur = o
            inserts[top] = new_nodes
        if label is not None:
            index.labels[ref_node.output[0]] = label
        res.applied += 1
        res.merges.append(merge_record(sum_label, x, base, branches))
    # apply removals and inserts from the end (indices stay valid)
    for i in sorted(removed | set(inserts), reverse=True):
        if i in removed:
            del graph.node[i]
        for k, n in enumerate(inserts.get(i, [])):
            graph.node.insert(i + k, n)
    if dropped:
        for k in range(len(graph.value_info) - 1, -1, -1):
            if graph.value_info[k].name in dropped:
                del graph.value_info[k]
    return res


def _constant_leaf(
    index: GraphIndex, ev: ConstEvaluator, ref: MergeRef, leaf: str, factors: Sequence[int]
) -> F64 | None:
    """A constant ``leaf`` of a sum as a per-channel vector (its chain scales ``factors`` applied), or None
    where it is not a constant."""
    c = ev.resolve(leaf)[0]
    if c is None:
        return None
    vec = _channel_vector(c, ref, leaf, "constant")
    for m in factors:
        vec = vec * _mul_factor(ev, index.nodes[m], ref, index.label(m))
    return vec


def _refused(sum_label: str, x: str, branches: list[_Branch], index: GraphIndex) -> Merge:
    return merge_record(sum_label, x, "", branches)


def _plan(
    index: GraphIndex,
    ev: ConstEvaluator,
    x: str,
    branches: list[_Branch],
    chain: set[int],
    sum_label: str,
    exclude: frozenset[str],
    exact: ExactTable,
) -> tuple[MergeRef, F64, F64] | Merge:
    """Decide each branch; return the reference and the merged float64 weight and bias, or the refusal."""
    if sum_label in exclude:
        for b in branches:
            b.reason, b.detail = MergeReason.VERIFICATION, "left in place: excluded from merging"
        return _refused(sum_label, x, branches, index)
    for b in branches:
        if (
            b.kind == "bn" or b.post is not None
        ) and b.label in exclude:  # the caller keeps this BN (its fold failed verification)
            b.reason, b.detail = MergeReason.VERIFICATION, "left in place: its BN is excluded from folding"
            continue
        if b.kind == "other" and b.reason is not None:
            continue  # decided already (_far_branch)
        if b.kind == "other":
            ops = ", ".join(f"{index.nodes[i].op_type} '{index.label(i)}'" for i in b.blockers)
            r = blocker_refusal(ops, any(index.nodes[i].op_type in _ACTIVATIONS for i in b.blockers), x)
            b.reason, b.detail = r.reason, r.detail
            continue
        try:
            _exclusive(index, b, x, chain)
        except MergeRefusal as e:
            b.reason, b.detail = e.reason, e.detail
    # the reference: the conv branch with the largest kernel (first on ties)
    ref = pick_reference(
        [b for b in branches if b.kind in ("conv", "seq") and b.reason is None and b.crop is None],
        lambda b: (b.base, _read_conv(index, ev, b, exact)),
    )
    if ref is None:
        return _refused(sum_label, x, branches, index)
    w_sum, b_sum = sum_kernels(ref, branches, lambda b: _branch_kernel(index, ev, ref, b, x, exact))
    ok = [b for b in branches if b.reason is None]
    if len(ok) < 2 or not any(b.base == ref.node for b in ok):
        return _refused(sum_label, x, branches, index)
    return ref, w_sum, b_sum
