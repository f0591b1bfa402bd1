"""Fold plans and the numeric stage shared by every matcher case.

A :class:`Fold` is what :mod:`bnfold.onnx.rewrite` applies: nodes removed, inputs written with
constants already in their dtype, values renamed. The numbers come from :mod:`bnfold.fold_math`
(float64, one rounding back with ``cast_exact``); :func:`finish` turns a non-finite result into an
OVERFLOW refusal, so an overflow is never an inf in the model. :func:`scale_out` is the forward fold
of one layer (``W' = W * s[out]``, ``b' = b * s + t``) through
:func:`bnfold.fold_math.fold_forward_cast`, the blocked routine every backend shares.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import NodeProto, TensorProto

from bnfold.errors import ModelFormatError
from bnfold.fold_math import Scratch, WeightLayout, cast_exact, fold_forward_cast
from bnfold.records import Site, Skip, SkipReason

from .graph import GraphIndex, attr, text

__all__ = [
    "Array",
    "FLOAT_TYPES",
    "Write",
    "Fold",
    "BnParams",
    "label_of",
    "finish",
    "scale_out",
    "release_scratch",
    "rank2_or_skip",
    "enforced_rank",
    "trace_type",
    "conv_groups",
    "tried",
]

Array = npt.NDArray[Any]

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


@dataclass(slots=True)
class Write:
    """Set input ``slot`` of node ``node`` (index) to a constant ``value`` (already in its dtype)."""

    node: int
    slot: int
    value: Array


@dataclass(slots=True)
class Fold:
    """A planned rewrite of one BN (or one Mul+Add pair); applied by :mod:`bnfold.onnx.rewrite`."""

    site: Site
    remove: tuple[int, ...]
    """Node indices removed (the BN first; or the Mul and the Add)."""
    locks: tuple[int, ...] = ()
    """Node indices edited (at most one plan per node and pass)."""
    writes: list[Write] = field(default_factory=list)
    rename_output: tuple[int, str] | None = None
    """``(node, name)``: the node's first output takes the removed node's output name."""
    rename_input: tuple[int, int, str] | None = None
    """``(node, slot, name)``: the node reads ``name`` instead of the removed BN's output."""
    to_gemm: int | None = None
    """A MatMul node (index) that becomes a Gemm with the bias written to slot 2."""
    beta_one: tuple[int, ...] = ()
    """Gemm nodes (indices) whose ``beta`` becomes 1 (the new C holds beta * C)."""
    dropped: tuple[str, ...] = ()
    """Values that no longer exist (their value_info is dropped)."""
    affine: tuple[Array, Array] | None = None
    """For an affine replacement: the constant Mul and Add operands."""
    set_int_attrs: tuple[tuple[int, str, int], ...] = ()
    """``(node, name, value)``: integer attributes set (e.g. a DequantizeLinear's ``axis`` when its
    scale becomes per channel, :mod:`bnfold.onnx.match_qdq`)."""
    clone: tuple[int, int, int] | None = None
    """``(dq, layer, slot)``: DequantizeLinear ``dq`` is also read by other nodes; ``layer`` reads a
    copy of it at ``slot`` (same inputs: the integer initializer stays shared), and the writes and
    attributes aimed at ``dq`` go to that copy, always as new initializers."""
    shift: Array | None = None
    """The BN (``remove[0]``) becomes ``Add(its input, shift)``: the scale went into a layer, the
    shift has no bias to go to (a MatMul on a rank > 2 product)."""


@dataclass(slots=True)
class BnParams:
    """A BN as ``scale * x + shift``: float64 per channel (or per element for ``spatial=0``)."""

    scale: npt.NDArray[np.float64]
    shift: npt.NDArray[np.float64]
    per_element: bool
    param_dtype: np.dtype[Any]

    @property
    def channels(self) -> int:
        """Number of channels (length of ``scale``)."""
        return int(self.scale.shape[0])


def conv_groups(node: NodeProto, shape: tuple[int, ...]) -> int:
    """The ``group`` of a Conv / ConvTranspose ``node`` whose weight has ``shape``, checked against it.

    Both weights have their full channel axis first (Conv ``[C_out, C_in/g, ..]``, ConvTranspose
    ``[C_in, C_out/g, ..]``), which the groups must divide. A weight that does not fit its groups is
    not a valid layer (no runtime runs it): the model is refused as bad input (a typed error, exit 2),
    not guessed at.

    Raises:
        ModelFormatError: the group is not positive, or does not divide the weight's first axis.
    """
    g = int(attr(node, "group", 1))
    if g < 1 or len(shape) < 2 or int(shape[0]) % g:
        side = "output" if node.op_type == "Conv" else "input"
        raise ModelFormatError(
            f"{node.op_type} '{text(node.name)}': its weight of shape {list(shape)} has "
            f"{int(shape[0]) if shape else 0} {side} channels, which group={g} does not divide: "
            "not a valid layer"
        )
    return g


def label_of(node: NodeProto, index: int) -> str:
    """The node's name, or ``<op>_<index>`` for an unnamed node."""
    return text(node.name) or f"{node.op_type}_{index}"


def finish(arrays: list[Array], dtype: np.dtype[Any], bn: str, what: str) -> list[Array] | Skip:
    """Cast float64 results to ``dtype`` once (arrays already in ``dtype`` are kept); refuse with
    OVERFLOW if a value is not finite there (a finite float64 that overflows becomes inf)."""
    out = []
    for a in arrays:
        c = a if a.dtype == dtype else cast_exact(a, dtype)
        if not np.all(np.isfinite(c)):
            return _overflow(a, dtype, bn, what)
        out.append(c)
    return out


def _overflow(a: Array, dtype: np.dtype[Any], bn: str, what: str) -> Skip:
    a64 = a.astype(np.float64)
    finite = np.isfinite(a64)
    amax = float(np.max(np.abs(a64[finite]))) if finite.any() else float("inf")
    return Skip(
        bn,
        SkipReason.OVERFLOW,
        f"the folded {what} would not be finite in {np.dtype(dtype).name} (max |value| {amax:.3g}); "
        "keep this BN or fold in a wider dtype",
    )


_LOCAL = threading.local()  # one scratch buffer per thread (folds in two threads never share it)


def release_scratch() -> None:
    """Drop this thread's scratch buffer (called at the end of a fold)."""
    _LOCAL.scratch = None


def _scratch() -> Scratch:
    sc = getattr(_LOCAL, "scratch", None)
    if sc is None:
        sc = _LOCAL.scratch = Scratch()
    return sc


def scale_out(
    w: Array,
    b: Array | None,
    s: npt.NDArray[np.float64],
    t: npt.NDArray[np.float64] | None,
    layout: WeightLayout,
    bn: str,
    what: str,
) -> list[Array] | Skip:
    """Forward fold ``W' = W * s[out]``, ``b' = b * s + t`` (``t=None``: no shift), in ``W``'s dtype.

    Returns ``[W', b']`` -- ``W'`` as a read-only array over a ``bytes`` object, which the rewriter
    stores as the tensor's ``raw_data`` without another copy -- or an OVERFLOW skip with figures."""
    buf = _scratch().get(tuple(w.shape), w.dtype)
    shift = np.zeros_like(s) if t is None else t
    w_new, b_new, finite = fold_forward_cast(w, b, s, shift, layout, out=buf)
    if not finite:
        from bnfold.fold_math import fold_forward

        w64, b64 = fold_forward(w, b, s, shift, layout)
        res = finish([w64, b64], w.dtype, bn, what)
        assert isinstance(res, Skip)
        return res
    return [np.frombuffer(w_new.tobytes(), dtype=w.dtype).reshape(w.shape), b_new]


def rank2_or_skip(
    index: GraphIndex, x: str, y: str, bn: str, subject: str, axis: str, operand: str | None = None
) -> Skip | None:
    """None when the BN data (``x`` and ``y``) provably has rank 2, else the skip: only at rank 2 is
    the BN channel (axis 1) the last axis, the one a MatMul reads (``axis``) on ``subject``.

    Every rank known counts -- declared and inferred, of ``x``, ``y`` and, for a MatMul product,
    of the MatMul's left ``operand`` (with a 2-D right operand, the product has the left operand's
    rank) -- and all must be 2: a declaration that contradicts another (a rank-3 product declared
    rank 2 downstream) is refused rather than trusted (a Gemm needs rank-2 inputs).
    """
    ranks = index.ranks(x) | index.ranks(y)
    if operand is not None:
        ranks |= {r if r >= 2 else 1 for r in index.ranks(operand)}
    if ranks == {2}:
        return None
    if not ranks:
        why = "unknown (no shape information)"
    elif len(ranks) > 1:
        why = f"{' or '.join(map(str, sorted(ranks)))} (its declared and inferred shapes disagree)"
    else:
        why = str(next(iter(ranks)))
    return Skip(
        bn,
        SkipReason.LAYOUT,
        f"{subject} has rank {why}: the BN channel (axis 1) is not {axis} (last) unless the rank is 2",
    )


# Ops whose first output has the element type and rank of their first input.
_SAME_TYPE_RANK = frozenset(
    (
        "Relu LeakyRelu PRelu Sigmoid Tanh Clip Elu Selu HardSigmoid HardSwish Softplus Mish Gelu Erf Abs "
        "Neg Exp Log Sqrt Add Sub Mul Div Max Min Sum Mean Identity Dropout BatchNormalization "
        "InstanceNormalization LRN MaxPool AveragePool LpPool Pad Concat Upsample Resize Softmax"
    ).split()
)


_SAME_RANK_UNARY = frozenset(
    "Relu LeakyRelu Sigmoid Tanh Elu Selu HardSigmoid HardSwish Softplus Mish Gelu Erf Abs Neg Exp Log Sqrt "
    "Identity Dropout Cast Softmax Transpose".split()
)
_BROADCAST = frozenset("Add Sub Mul Div Max Min Sum Mean Pow".split())


def enforced_rank(index: GraphIndex, value: str, budget: int = 64) -> int | None:
    """The rank of ``value`` as the runtime makes it, not as a declaration says: a graph input's
    declared rank (onnxruntime refuses a feed of another rank), an initializer's, the output of Gemm
    or Flatten (2) or of a Reshape by a constant shape, walked up through unary ops that keep the rank
    and element-wise ops (the largest rank of their inputs). None where nothing enforces it: a
    ``value_info`` entry on an intermediate value is not checked by onnxruntime."""
    if budget <= 0:
        return None
    p = index.producer.get(value)
    if p is None:
        if value in index.initializers:
            return len(index.initializers[value].dims)
        if index.outer is None and index.is_real_input(value):
            vt = index.types.get(value)
            return None if vt is None else vt.rank
        if index.outer is not None and not index.is_local(value):
            return enforced_rank(index.outer, value, budget - 1)
        return None
    n = index.nodes[p]
    if n.domain not in ("", "ai.onnx") or not n.input:
        return None
    if n.op_type in ("Gemm", "Flatten"):
        return 2
    if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in index.initializers:
        dims = index.initializers[n.input[1]].dims
        return int(dims[0]) if len(dims) == 1 else None
    if n.op_type in _SAME_RANK_UNARY:
        return enforced_rank(index, n.input[0], budget - 1)
    if n.op_type in _BROADCAST:
        ranks = [enforced_rank(index, v, budget - 1) for v in n.input if v]
        return None if not ranks or any(r is None for r in ranks) else max(r for r in ranks if r is not None)
    return None


def trace_type(index: GraphIndex, x: str, y: str) -> tuple[int, int | None]:
    """Element type and rank of a BN's data: declared types first, else walked up through ops that
    keep both (activations, pools, element-wise ops), stopping at Conv/ConvTranspose (rank of the
    weight) and Gemm (rank 2). Returns ``(0, None)`` where nothing is known."""
    elem, rank = 0, None
    for n in (x, y):
        vt = index.value_type(n)
        if vt is not None:
            elem = elem or vt.elem_type
            rank = rank if rank is not None else vt.rank
    cur = x
    for _ in range(256):
        if elem and rank is not None:
            break
        p = index.producer.get(cur)
        if p is None:
            break
        pn = index.nodes[p]
        if pn.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(pn.input) > 1:
            wt = index.value_type(pn.input[1])
            elem = elem or (wt.elem_type if wt is not None else 0)
            if rank is None and pn.op_type in ("Conv", "ConvTranspose") and wt is not None:
                rank = wt.rank
            if rank is None and pn.op_type == "Gemm":
                rank = 2
        if pn.op_type not in _SAME_TYPE_RANK or not pn.input:
            break
        cur = pn.input[0]
        vt = index.value_type(cur)
        if vt is not None:
            elem = elem or vt.elem_type
            rank = rank if rank is not None else vt.rank
    return elem, rank


def tried(res: tuple[Fold | Skip, bool], pattern: str) -> tuple[Fold | Skip, bool]:
    """A matcher's ``(verdict, specific)`` with a refusal specific to its case naming the pattern it was
    tried as (``Skip.pattern``, an id of :mod:`bnfold.patterns`)."""
    v, specific = res
    if specific and isinstance(v, Skip) and v.pattern is None:
        return replace(v, pattern=pattern), specific
    return res
