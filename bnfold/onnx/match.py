"""One verdict per BatchNormalization node: fold it (and how), or leave it (and why).

The matcher reads the graph through a :class:`~bnfold.onnx.graph.GraphIndex` and constants through a
:class:`~bnfold.onnx.const.ConstEvaluator`; it never edits the model. A fold is returned as a
:class:`Fold` plan whose new tensors are already computed (float64 math in :mod:`bnfold.fold_math`,
cast back once with ``cast_exact``), so that an overflow is a refusal, never an inf in the model.

Eval-mode BN is ``y = scale * x + shift`` per channel (axis 1). Cases, in the order tried:

Forward (the BN input is produced by a layer whose output nothing else reads):
    1. Conv -> BN (with or without conv bias): scale output channels of W ``[C_out, C_in/g, *k]``.
    2. ConvTranspose -> BN: W ``[C_in, C_out/g, *k]``, output channel ``g*C_out/g + j`` (grouped).
    3. Gemm -> BN: ``alpha A'B' + beta C`` becomes ``alpha A'(B' s) + (beta C s + t)``, beta = 1;
       a broadcast C grows to ``broadcast(C, [N])``.
    4. MatMul -> BN, product (N, C) with a constant 2-D right operand: becomes ``Gemm(A, W s, t)``.
    5. MatMul -> Add(bias) -> BN, product (N, C): scale W and the bias (``b s + t``).
Backward (the BN output is read by one layer only and is not a graph output):
    6. BN -> Conv with all pads zero (auto_pad NOTSET/VALID): scale input channels, bias += W t.
    7. BN -> Gemm (transA = 0) and BN -> MatMul on a rank-2 input (becomes Gemm).
    8. BN -> Flatten(axis=1) -> Gemm/MatMul: scale and shift repeated over the K/C spatial positions.
Affine (on request, when nothing can absorb the BN): ``Mul(x, scale) -> Add(_, shift)``, constants
    shaped ``[C, 1, ..., 1]`` (or the per-element statistics of opset-7 ``spatial=0``).
Frozen BN (a per-channel Mul then Add with constant operands after Conv/ConvTranspose/Gemm) folds
    as case 1-3.

Refusals: training mode or optional outputs (TRAINING_MODE); non-constant weights or statistics
(NON_CONSTANT; a DequantizeLinear weight is QUANTIZED); non-float tensors (UNSUPPORTED_DTYPE); a folded
tensor that is not finite in its dtype (OVERFLOW); zero padding (PADDING); channel not on the layer's
feature axis (LAYOUT); per-element statistics (SPATIAL); a producer output read elsewhere
(OTHER_CONSUMERS) or a graph output (GRAPH_OUTPUT); a producer in an enclosing graph (IN_SUBGRAPH).

BN parameters whose dtype differs from the data (opset 15) are computed in float64 and cast to the
layer's weight dtype: the folded layer is exact up to the rounding of that dtype.

Speed: the large tensor of a forward fold (``W * scale[out]``) is computed by
:func:`bnfold.onnx.fastmath.scale_cast` -- the same float64 product and single rounding as
``fold_forward`` + ``cast_exact``, bit for bit, but block by block in a reused buffer, with the
finiteness check fused in. Everything else goes through :mod:`bnfold.fold_math` as is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import NodeProto, TensorProto, helper

from bnfold.fold_math import (
    WeightLayout,
    bn_affine,
    cast_exact,
    channel_factor,
    fold_backward,
    fold_forward,
    fold_gemm_backward,
    fold_gemm_forward,
)
from bnfold.records import Direction, Site, Skip, SkipReason

from .const import ConstEvaluator
from .fastmath import Scratch, scale_cast
from .graph import GraphIndex, is_bn

__all__ = [
    "Fold",
    "Write",
    "BnParams",
    "release_scratch",
    "match_bn",
    "match_affine",
    "match_mul_add",
    "FLOAT_TYPES",
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
    """Node indices removed (the BN; or the Mul and the Add)."""
    locks: tuple[int, ...] = ()
    """Node indices edited (at most one plan per node and pass)."""
    writes: list[Write] = field(default_factory=list)
    rename_output: tuple[int, str] | None = None
    """``(node, name)``: the node's first output takes the removed node's output name."""
    rename_input: tuple[int, int, str] | None = None
    """``(node, slot, name)``: the node reads ``name`` instead of the removed BN's output."""
    to_gemm: int | None = None
    """A MatMul node (index) that becomes a Gemm with the bias written to slot 2."""
    beta_one: int | None = None
    """A Gemm node (index) whose ``beta`` becomes 1 (the new C holds beta * C)."""
    dropped: tuple[str, ...] = ()
    """Values that no longer exist (their value_info is dropped)."""
    affine: tuple[Array, Array] | None = None
    """For an affine replacement: the constant Mul and Add operands."""


@dataclass(slots=True)
class BnParams:
    """A BN as ``scale * x + shift``: float64 per channel (or per element for ``spatial=0``)."""

    scale: npt.NDArray[np.float64]
    shift: npt.NDArray[np.float64]
    per_element: bool
    param_dtype: np.dtype[Any]

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])


def _attr(node: NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _label(node: NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _is_float(a: Array) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def _finish(arrays: list[Array], dtype: np.dtype[Any], bn: str, what: str) -> list[Array] | Skip:
    """Cast float64 results to ``dtype`` once (arrays already in ``dtype`` are kept); refuse with
    OVERFLOW if a value is not finite there (a finite float64 that overflows becomes inf)."""
    out = []
    for a in arrays:
        c = a if a.dtype == dtype else cast_exact(a, dtype)
        if not np.all(np.isfinite(c)):
            finite = np.isfinite(a.astype(np.float64))
            amax = float(np.max(np.abs(a.astype(np.float64)[finite]))) if finite.any() else float("inf")
            return Skip(
                bn,
                SkipReason.OVERFLOW,
                f"the folded {what} would not be finite in {dtype.name} (max |value| {amax:.3g}); "
                "keep this BN or fold in a wider dtype",
            )
        out.append(c)
    return out


_LOCAL = threading.local()  # one scratch buffer per thread (folds in two threads never share it)


def release_scratch() -> None:
    """Drop this thread's scratch buffer (called at the end of a fold)."""
    _LOCAL.scratch = None


def _scratch() -> Scratch:
    sc = getattr(_LOCAL, "scratch", None)
    if sc is None:
        sc = _LOCAL.scratch = Scratch()
    return sc


def _scale_out(
    w: Array,
    b: Array | None,
    s: npt.NDArray[np.float64],
    t: npt.NDArray[np.float64],
    layout: WeightLayout,
    bn: str,
    what: str,
) -> list[Array] | Skip:
    """Forward fold as :func:`~bnfold.fold_math.fold_forward` (``W' = W * s[out]``, ``b' = b * s + t``),
    with the weight computed block by block and rounded to its dtype once (:func:`scale_cast`).

    Returns ``[W', b']`` in the weight's dtype -- ``W'`` as a read-only array over a ``bytes`` object,
    which the rewriter stores as the tensor's ``raw_data`` without another copy -- or an OVERFLOW skip."""
    fac = channel_factor(s, w.shape, layout, "out")
    buf = _scratch().get(tuple(w.shape), w.dtype)
    w_new, finite = scale_cast(w, fac, w.dtype, out=buf)
    if not finite:
        return _finish([w.astype(np.float64) * fac], w.dtype, bn, what)  # the refusal, with figures
    b64 = np.zeros_like(s) if b is None else b.astype(np.float64).reshape(-1)
    bias = _finish([b64 * s + t], w.dtype, bn, what)
    if isinstance(bias, Skip):
        return bias
    return [np.frombuffer(w_new.tobytes(), dtype=w.dtype).reshape(w.shape), bias[0]]


def bn_params(index: GraphIndex, ev: ConstEvaluator, node: NodeProto, label: str) -> BnParams | Skip:
    """Read a BN's attributes and constant parameters; refuse what is not an inference BN."""
    if int(_attr(node, "training_mode", 0)) == 1:
        return Skip(label, SkipReason.TRAINING_MODE, "training_mode=1: it normalises with batch statistics")
    if int(_attr(node, "is_test", 1)) == 0:
        return Skip(
            label, SkipReason.TRAINING_MODE, "is_test=0 (opset 6): it normalises with batch statistics"
        )
    extra = [o for o in node.output[1:] if o]
    if extra:
        return Skip(
            label,
            SkipReason.TRAINING_MODE,
            f"its optional outputs ({', '.join(extra)}) are produced: this is a training-mode BN",
        )
    if len(node.input) < 5:
        return Skip(label, SkipReason.UNSUPPORTED_LAYER, "BatchNormalization with fewer than 5 inputs")
    vals: list[Array] = []
    for k, what in zip(range(1, 5), ("scale", "bias", "mean", "var")):
        v, reason, detail = ev.resolve(node.input[k])
        if v is None:
            return Skip(label, reason or SkipReason.NON_CONSTANT, f"BN {what} is not a constant: {detail}")
        if not _is_float(v):
            return Skip(
                label, SkipReason.UNSUPPORTED_DTYPE, f"BN {what} has dtype {v.dtype}, not a float type"
            )
        vals.append(v)
    gamma, beta, mean, var = vals
    eps = float(_attr(node, "epsilon", 1e-5))
    scale, shift = bn_affine(gamma, beta, mean, var, eps)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return Skip(
            label,
            SkipReason.OVERFLOW,
            "variance + epsilon is not positive (or not finite) for some channel: the BN itself yields inf/NaN",
        )
    per_element = False
    if scale.ndim > 1:
        # Opset 6/7/8 with spatial=0 on rank > 2 data: statistics per element [C, D1, ...]. They fold as
        # per-channel values only when constant over the spatial positions.
        flat_s = scale.reshape(scale.shape[0], -1)
        flat_t = shift.reshape(shift.shape[0], -1)
        if np.all(flat_s == flat_s[:, :1]) and np.all(flat_t == flat_t[:, :1]):
            scale, shift = flat_s[:, 0].copy(), flat_t[:, 0].copy()
        else:
            per_element = True
    return BnParams(scale, shift, per_element, np.dtype(gamma.dtype))


# ---- forward ---------------------------------------------------------------------------------------
_FORWARD_KINDS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _rank(index: GraphIndex, *names: str) -> int | None:
    for n in names:
        vt = index.value_type(n)
        if vt is not None and vt.rank is not None:
            return vt.rank
    return None


def _reshape_flattens(index: GraphIndex, ev: ConstEvaluator, node: NodeProto, x: str) -> bool:
    """True when ``Reshape(x, shape)`` provably computes ``Flatten(x, axis=1)`` (rule 8).

    Accepted targets: ``[0, -1]`` (dim 0 copied, the rest flattened, any rank); with the static
    shape of ``x`` known, ``[d0 | 0 | -1, prod(dims 1..)]`` and ``[d0, -1]``.
    """
    if len(node.input) < 2:
        return False
    v, _, _ = ev.resolve(node.input[1])
    if v is None or v.ndim != 1 or v.size != 2 or v.dtype.kind not in "iu":
        return False
    a, k = int(v[0]), int(v[1])
    copies_dim0 = a == 0 and not int(_attr(node, "allowzero", 0))
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


def _resolve_weight(ev: ConstEvaluator, node: NodeProto, slot: int, bn: str, what: str) -> Array | Skip:
    if slot >= len(node.input) or not node.input[slot]:
        return Skip(bn, SkipReason.UNSUPPORTED_LAYER, f"{node.op_type} '{node.name}' has no {what}")
    v, reason, detail = ev.resolve(node.input[slot])
    if v is None:
        r = reason or SkipReason.NON_CONSTANT
        return Skip(bn, r, f"the {what} of {node.op_type} '{node.name}' is not a constant: {detail}")
    if not _is_float(v):
        return Skip(bn, SkipReason.UNSUPPORTED_DTYPE, f"the {what} of '{node.name}' has dtype {v.dtype}")
    return v


def _weight_and_bias(
    ev: ConstEvaluator, node: NodeProto, bn: str, names: tuple[str, str] = ("weight", "bias")
) -> tuple[Array, Array | None] | Skip:
    """The constant weight (input 1) and optional bias (input 2) of a layer, or why not."""
    w = _resolve_weight(ev, node, 1, bn, names[0])
    if isinstance(w, Skip):
        return w
    b = _optional(ev, node, 2, bn, names[1])
    if isinstance(b, Skip):
        return b
    return w, b


def _optional(ev: ConstEvaluator, node: NodeProto, slot: int, bn: str, what: str) -> Array | None | Skip:
    if slot >= len(node.input) or not node.input[slot]:
        return None
    return _resolve_weight(ev, node, slot, bn, what)


def _match_forward(
    index: GraphIndex, ev: ConstEvaluator, bi: int, label: str, prm: BnParams
) -> tuple[Fold | Skip, bool]:
    """Forward fold; the bool says whether the refusal is specific (a foldable layer was found)."""
    bn = index.nodes[bi]
    x, y = bn.input[0], bn.output[0]
    p = index.producer.get(x)
    if p is None:
        if not index.is_local(x) and index.outer is not None:
            return Skip(
                label, SkipReason.IN_SUBGRAPH, f"its input '{x}' comes from the enclosing graph"
            ), True
        return Skip(label, SkipReason.NO_PRODUCER, f"its input '{x}' is a graph input or constant"), False
    pn = index.nodes[p]
    kind = pn.op_type
    mm: int | None = None  # MatMul index for MatMul -> Add
    if kind == "Add" and pn.domain in ("", "ai.onnx"):
        for side in (0, 1):
            q = index.producer.get(pn.input[side])
            if q is not None and index.nodes[q].op_type == "MatMul":
                mm = q
                break
        if mm is None:
            return Skip(
                label, SkipReason.NO_PRODUCER, f"its input comes from Add '{pn.name}', not a layer"
            ), False
    elif kind not in _FORWARD_KINDS or pn.domain not in ("", "ai.onnx"):
        return (
            Skip(
                label,
                SkipReason.NO_PRODUCER,
                f"its input comes from {kind} '{pn.name}', which cannot absorb it",
            ),
            False,
        )
    target = f"{kind} '{pn.name}'" if kind != "Add" else f"MatMul+Add '{pn.name}'"
    if x in index.graph_outputs:
        return (
            Skip(
                label,
                SkipReason.GRAPH_OUTPUT,
                f"the output '{x}' of {target} is also a graph output and must stay unscaled",
            ),
            True,
        )
    if len(index.consumers.get(x, ())) > 1:
        others = [index.nodes[c] for c in index.consumers[x] if c != bi]
        who = ", ".join(f"{o.op_type} '{o.name}'" for o in others[:3])
        return (
            Skip(
                label,
                SkipReason.OTHER_CONSUMERS,
                f"the output '{x}' of {target} is also read by {who}, which needs it unscaled",
            ),
            True,
        )
    if prm.per_element:
        return Skip(
            label, SkipReason.SPATIAL, "spatial=0 statistics differ per position: not a per-channel scale"
        ), True
    s, t, c = prm.scale, prm.shift, prm.channels
    site = Site(label, _label(pn, p), kind if kind != "Add" else "MatMul", Direction.FORWARD)
    base: dict[str, Any] = {"site": site, "remove": (bi,), "rename_output": (p, y), "dropped": (x,)}

    if kind in ("Conv", "ConvTranspose"):
        wb = _weight_and_bias(ev, pn, label)
        if isinstance(wb, Skip):
            return wb, True
        w, b = wb
        g = int(_attr(pn, "group", 1))
        if kind == "Conv":
            layout, c_out = WeightLayout.conv(g), w.shape[0]
        else:
            layout, c_out = WeightLayout.conv_transpose(g), w.shape[1] * g
        if c_out != c:
            return Skip(label, SkipReason.LAYOUT, f"{target} has {c_out} output channels, the BN {c}"), True
        res = _scale_out(w, b, s, t, layout, label, f"weight or bias of {target}")
        if isinstance(res, Skip):
            return res, True
        return Fold(**base, locks=(p,), writes=[Write(p, 1, res[0]), Write(p, 2, res[1])]), True

    if kind == "Gemm":
        bc = _weight_and_bias(ev, pn, label, ("B", "C"))
        if isinstance(bc, Skip):
            return bc, True
        bw, cv = bc
        trans_b = bool(_attr(pn, "transB", 0))
        n = bw.shape[0] if trans_b else bw.shape[1]
        if bw.ndim != 2 or n != c:
            return Skip(label, SkipReason.LAYOUT, f"{target} has {n} output features, the BN {c}"), True
        if cv is not None and cv.ndim > 2:
            return Skip(label, SkipReason.UNSUPPORTED_LAYER, f"C of {target} has rank {cv.ndim}"), True
        alpha, beta = float(_attr(pn, "alpha", 1.0)), float(_attr(pn, "beta", 1.0))
        b64, c64 = fold_gemm_forward(bw, cv, alpha, beta, s, t, trans_b)
        res = _finish([b64, c64], bw.dtype, label, f"B or C of {target}")
        if isinstance(res, Skip):
            return res, True
        return (
            Fold(**base, locks=(p,), writes=[Write(p, 1, res[0]), Write(p, 2, res[1])], beta_one=p),
            True,
        )

    # MatMul, or MatMul -> Add(bias): the BN channel must be the last axis of the product.
    rank = _rank(index, x, y)
    if rank != 2:
        why = "unknown (no shape information)" if rank is None else str(rank)
        return (
            Skip(
                label,
                SkipReason.LAYOUT,
                f"the product of {target} has rank {why}: the BN channel (axis 1) "
                "is not the MatMul's feature axis (last) unless the rank is 2",
            ),
            True,
        )
    m_idx = p if kind == "MatMul" else mm
    assert m_idx is not None
    mnode = index.nodes[m_idx]
    mw = _resolve_weight(ev, mnode, 1, label, "right operand")
    if isinstance(mw, Skip):
        return mw, True
    if mw.ndim != 2 or mw.shape[1] != c:
        return Skip(
            label, SkipReason.LAYOUT, f"{target} right operand has shape {list(mw.shape)}, the BN {c} channels"
        ), True
    if kind == "MatMul":
        res = _scale_out(mw, None, s, t, WeightLayout.matmul(), label, f"weight of {target}")
        if isinstance(res, Skip):
            return res, True
        return Fold(**base, locks=(p,), writes=[Write(p, 1, res[0]), Write(p, 2, res[1])], to_gemm=p), True
    # MatMul -> Add
    mm_out = mnode.output[0]
    if index.n_uses(mm_out) != 1:
        return Skip(
            label, SkipReason.OTHER_CONSUMERS, f"the MatMul '{mnode.name}' output is also read elsewhere"
        ), True
    bias_slot = 1 if pn.input[0] == mm_out else 0
    bias = _resolve_weight(ev, pn, bias_slot, label, "bias")
    if isinstance(bias, Skip):
        return bias, True
    if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, c)):
        return Skip(
            label, SkipReason.LAYOUT, f"the bias of Add '{pn.name}' has shape {list(bias.shape)}"
        ), True
    wres = _scale_out(mw, None, s, t, WeightLayout.matmul(), label, f"weight of {target}")
    if isinstance(wres, Skip):
        return wres, True
    bres = _finish([bias.astype(np.float64) * s + t], mw.dtype, label, f"bias of {target}")
    if isinstance(bres, Skip):
        return bres, True
    return (
        Fold(**base, locks=(p, m_idx), writes=[Write(m_idx, 1, wres[0]), Write(p, bias_slot, bres[0])]),
        True,
    )


# ---- backward --------------------------------------------------------------------------------------
def _match_backward(
    index: GraphIndex, ev: ConstEvaluator, bi: int, label: str, prm: BnParams
) -> tuple[Fold | Skip, bool]:
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
    ki = cons[0]
    kn = index.nodes[ki]
    flat: int | None = None
    if kn.op_type == "Flatten" or (kn.op_type == "Reshape" and _reshape_flattens(index, ev, kn, x)):
        if kn.op_type == "Flatten" and int(_attr(kn, "axis", 1)) != 1:
            return Skip(label, SkipReason.LAYOUT, f"Flatten '{kn.name}' after it has axis != 1"), True
        f_out = kn.output[0]
        k2 = index.single_consumer(f_out)
        if (
            k2 is None
            or index.nodes[k2].op_type not in ("Gemm", "MatMul")
            or index.nodes[k2].input[0] != f_out
        ):
            return Skip(
                label,
                SkipReason.NO_PRODUCER,
                f"nothing foldable before it, and {kn.op_type} '{kn.name}' does not feed one Gemm/MatMul",
            ), False
        flat, ki, kn = ki, k2, index.nodes[k2]
    kind = kn.op_type
    if kind not in ("Conv", "Gemm", "MatMul") or kn.domain not in ("", "ai.onnx"):
        specific = kind == "ConvTranspose"
        reason = SkipReason.UNSUPPORTED_LAYER if specific else SkipReason.NO_PRODUCER
        msg = (
            f"backward fold into ConvTranspose '{kn.name}' is not exact (border outputs sum fewer taps)"
            if specific
            else f"nothing foldable before it, and its output goes to {kind} '{kn.name}'"
        )
        return Skip(label, reason, msg), specific
    target = f"{kind} '{kn.name}'"
    read = kn.input[0]
    if read != (y if flat is None else index.nodes[flat].output[0]) or y in kn.input[1:]:
        return Skip(
            label, SkipReason.UNSUPPORTED_LAYER, f"its output is not the data input of {target}"
        ), True
    if prm.per_element:
        return Skip(
            label, SkipReason.SPATIAL, "spatial=0 statistics differ per position: not a per-channel scale"
        ), True
    s, t, c = prm.scale, prm.shift, prm.channels
    rename_node = ki if flat is None else flat
    site = Site(
        label,
        _label(kn, ki),
        kind,
        Direction.BACKWARD,
        f"through {index.nodes[flat].op_type}" if flat is not None else "",
    )
    base: dict[str, Any] = {
        "site": site,
        "remove": (bi,),
        "rename_input": (rename_node, 0, x),
        "dropped": (y,),
    }
    locks = (ki,) if flat is None else (ki, flat)

    if kind == "Conv":
        pads = list(_attr(kn, "pads", []))
        auto_pad = _attr(kn, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if any(int(v) != 0 for v in pads) or auto_pad not in ("NOTSET", "VALID"):
            return Skip(
                label,
                SkipReason.PADDING,
                f"{target} pads its input with zeros, which the BN shift "
                "would not reach; fold only convolutions without padding",
            ), True
        wb = _weight_and_bias(ev, kn, label)
        if isinstance(wb, Skip):
            return wb, True
        w, b = wb
        g = int(_attr(kn, "group", 1))
        if w.shape[1] * g != c:
            return Skip(
                label, SkipReason.LAYOUT, f"{target} has {w.shape[1] * g} input channels, the BN {c}"
            ), True
        w64, b64 = fold_backward(w, b, s, t, WeightLayout.conv(g))
        res = _finish([w64, b64], w.dtype, label, f"weight or bias of {target}")
        if isinstance(res, Skip):
            return res, True
        return Fold(**base, locks=locks, writes=[Write(ki, 1, res[0]), Write(ki, 2, res[1])]), True

    if kind == "Gemm" and int(_attr(kn, "transA", 0)):
        return Skip(
            label, SkipReason.LAYOUT, f"{target} has transA=1: the BN channel is not its K axis"
        ), True
    if kind == "MatMul" and flat is None:
        rank = _rank(index, x, y)
        if rank != 2:
            why = "unknown (no shape information)" if rank is None else str(rank)
            return Skip(
                label,
                SkipReason.LAYOUT,
                f"the input of {target} has rank {why}: the BN channel "
                "(axis 1) is not the contracted axis (last) unless the rank is 2",
            ), True
    bw = _resolve_weight(ev, kn, 1, label, "weight")
    if isinstance(bw, Skip):
        return bw, True
    if bw.ndim != 2:
        return Skip(label, SkipReason.LAYOUT, f"the weight of {target} has rank {bw.ndim}"), True
    trans_b = kind == "Gemm" and bool(_attr(kn, "transB", 0))
    k = bw.shape[1] if trans_b else bw.shape[0]
    if k % c:
        return Skip(
            label, SkipReason.LAYOUT, f"{target} reads {k} features, not a multiple of the BN's {c}"
        ), True
    if flat is None and k != c:
        return Skip(label, SkipReason.LAYOUT, f"{target} reads {k} features, the BN has {c}"), True
    reps = k // c
    s_rep, t_rep = (np.repeat(s, reps), np.repeat(t, reps)) if reps > 1 else (s, t)
    cv: Array | None = None
    alpha = beta = 1.0
    if kind == "Gemm":
        opt = _optional(ev, kn, 2, label, "C")
        if isinstance(opt, Skip):
            return opt, True
        cv = opt
        alpha, beta = float(_attr(kn, "alpha", 1.0)), float(_attr(kn, "beta", 1.0))
    b64, c64 = fold_gemm_backward(bw, cv, alpha, beta, s_rep, t_rep, trans_b)
    res = _finish([b64, c64], bw.dtype, label, f"weight or bias of {target}")
    if isinstance(res, Skip):
        return res, True
    return (
        Fold(
            **base,
            locks=locks,
            writes=[Write(ki, 1, res[0]), Write(ki, 2, res[1])],
            beta_one=ki if kind == "Gemm" else None,
            to_gemm=ki if kind == "MatMul" else None,
        ),
        True,
    )


def match_bn(index: GraphIndex, ev: ConstEvaluator, bi: int, label: str) -> Fold | Skip:
    """The verdict for the BN at node index ``bi``: a fold plan, or a skip with its reason.

    Forward is tried first, then backward; when both refuse, the refusal that names a foldable layer
    (e.g. OTHER_CONSUMERS of a Conv) is reported rather than a generic NO_PRODUCER.
    """
    node = index.nodes[bi]
    assert is_bn(node)
    prm = bn_params(index, ev, node, label)
    if isinstance(prm, Skip):
        return prm
    fwd, fwd_specific = _match_forward(index, ev, bi, label, prm)
    if isinstance(fwd, Fold):
        return fwd
    bwd, bwd_specific = _match_backward(index, ev, bi, label, prm)
    if isinstance(bwd, Fold):
        return bwd
    if fwd_specific or not bwd_specific:
        return fwd
    return bwd


def match_affine(index: GraphIndex, ev: ConstEvaluator, bi: int, label: str, opset: int) -> Fold | None:
    """Plan ``BN -> Mul + Add`` for a BN nothing can absorb, or None when that is not possible."""
    node = index.nodes[bi]
    prm = bn_params(index, ev, node, label)
    if isinstance(prm, Skip):
        return None
    x, y = node.input[0], node.output[0]
    elem, rank = _trace_type(index, x, y)
    if not elem and opset < 15:
        elem = int(helper.np_dtype_to_tensor_dtype(prm.param_dtype))
    if elem not in FLOAT_TYPES:
        return None
    if prm.per_element:
        rank = 1 + prm.scale.ndim
    if rank is None or rank < 2:
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    s, t = prm.scale, prm.shift
    if not prm.per_element:
        shape = (prm.channels,) + (1,) * (rank - 2)
        s, t = s.reshape(shape), t.reshape(shape)
    res = _finish([s, t], dtype, label, "scale or shift")
    if isinstance(res, Skip):
        return None
    site = Site(label, "", "Mul+Add", Direction.AFFINE, "BN replaced by one Mul and one Add")
    return Fold(site=site, remove=(bi,), affine=(res[0], res[1]))


# Ops whose first output has the element type and rank of their first input.
_SAME_TYPE_RANK = frozenset(
    (
        "Relu LeakyRelu PRelu Sigmoid Tanh Clip Elu Selu HardSigmoid HardSwish Softplus Mish Gelu Erf Abs "
        "Neg Exp Log Sqrt Add Sub Mul Div Max Min Sum Mean Identity Dropout BatchNormalization "
        "InstanceNormalization LRN MaxPool AveragePool LpPool Pad Concat Upsample Resize Softmax"
    ).split()
)


def _trace_type(index: GraphIndex, x: str, y: str) -> tuple[int, int | None]:
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


def _per_channel(c: Array, rank: int, channels: int) -> npt.NDArray[np.float64] | None:
    """``c`` as one value per channel of a (N, C, ...) tensor of ``rank``, or None if not per-channel."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for ax, d in enumerate(shape) if ax != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


def match_mul_add(index: GraphIndex, ev: ConstEvaluator, ai: int) -> Fold | None:
    """Plan the fold of ``layer -> Mul(const) -> Add(const)`` (a frozen BN) at the Add ``ai``, or None."""
    add = index.nodes[ai]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    for side in (0, 1):
        mi = index.producer.get(add.input[side])
        if mi is None or index.nodes[mi].op_type != "Mul":
            continue
        mul = index.nodes[mi]
        if index.n_uses(mul.output[0]) != 1:
            return None
        d, _, _ = ev.resolve(add.input[1 - side])
        if d is None or not _is_float(d):
            return None
        for mside in (0, 1):
            pi = index.producer.get(mul.input[mside])
            if pi is None or index.nodes[pi].op_type not in ("Conv", "ConvTranspose", "Gemm"):
                continue
            pn = index.nodes[pi]
            if index.n_uses(pn.output[0]) != 1:
                return None
            cval, _, _ = ev.resolve(mul.input[1 - mside])
            if cval is None or not _is_float(cval):
                return None
            return _fold_mul_add(index, ev, pi, mi, ai, cval, d)
        return None
    return None


def _fold_mul_add(
    index: GraphIndex, ev: ConstEvaluator, pi: int, mi: int, ai: int, cval: Array, d: Array
) -> Fold | None:
    pn, mul, add = index.nodes[pi], index.nodes[mi], index.nodes[ai]
    label = f"{_label(mul, mi)}+{_label(add, ai)}"
    w, _, _ = ev.resolve(pn.input[1]) if len(pn.input) > 1 else (None, None, "")
    if w is None or not _is_float(w):
        return None
    b: Array | None = None
    if len(pn.input) > 2 and pn.input[2]:
        b, _, _ = ev.resolve(pn.input[2])
        if b is None:
            return None
    kind = pn.op_type
    if kind == "Gemm":
        trans_b = bool(_attr(pn, "transB", 0))
        channels, rank = (w.shape[0] if trans_b else w.shape[1]), 2
    elif kind == "Conv":
        channels, rank = w.shape[0], w.ndim
    else:
        channels, rank = w.shape[1] * int(_attr(pn, "group", 1)), w.ndim
    s = _per_channel(cval, rank, channels)
    t = _per_channel(d, rank, channels)
    if s is None or t is None:
        return None
    if kind == "Gemm":
        alpha, beta = float(_attr(pn, "alpha", 1.0)), float(_attr(pn, "beta", 1.0))
        if b is not None and b.ndim > 2:
            return None
        w64, b64 = fold_gemm_forward(w, b, alpha, beta, s, t, bool(_attr(pn, "transB", 0)))
    else:
        g = int(_attr(pn, "group", 1))
        layout = WeightLayout.conv(g) if kind == "Conv" else WeightLayout.conv_transpose(g)
        w64, b64 = fold_forward(w, b, s, t, layout)
    res = _finish([w64, b64], w.dtype, label, "weight")
    if isinstance(res, Skip):
        return None
    site = Site(label, _label(pn, pi), kind, Direction.FORWARD, "per-channel Mul+Add (frozen BN)")
    return Fold(
        site=site,
        remove=(mi, ai),
        locks=(pi,),
        writes=[Write(pi, 1, res[0]), Write(pi, 2, res[1])],
        rename_output=(pi, add.output[0]),
        beta_one=pi if kind == "Gemm" else None,
        dropped=(pn.output[0], mul.output[0]),
    )
