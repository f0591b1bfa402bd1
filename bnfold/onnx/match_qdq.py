"""Forward folds through quantized weights (QDQ graphs): ``layer(DequantizeLinear(w_q, s, z)) -> BN``.

A weight quantized per output channel ``W = (w_q - z) * s[c]`` followed by a BN ``a * y + t`` is
``DequantizeLinear(w_q, s * a, z)``: the integer weights are not touched, only the scales change
(float64 product, one rounding to the scale's dtype, as every float fold rounds its weights once), and
the shift goes into the bias (``b' = a * b + t``).

Handled (Conv, ConvTranspose with group 1, Gemm, MatMul on a rank-2 product; the weight's
DequantizeLinear read by the layer alone):

* per-channel scales on the output-channel axis: scaled; per-tensor scales (opset >= 13) become
  per-channel, the ``axis`` attribute set and the zero point repeated per channel (exact);
* a negative BN scale ``a``: the channel's integers become ``2 z - w_q`` (so ``(w_q' - z) = -(w_q - z)``)
  and its scale ``s |a|`` -- only where every new integer fits the type (int8 ``-128`` with zero point 0
  does not: refused);
* a float bias takes ``a b + t``; a missing one is added (``t``); an int32 bias through
  DequantizeLinear gets the new scale ``s_x * s_w'`` (kept equal to the input scale times the new
  weight scale where it was so before, as onnxruntime's QDQ Conv requires). By default it stays exact:
  its integers are kept (negated where ``a < 0``) and the shift, which an int32 bias cannot hold
  exactly, stays as one ``Add`` in place of the BN. Within :func:`requantize_int32_bias` the shift is
  requantised into the bias instead (round to nearest; the site's detail states the bound, half a step
  of the new scale; an int32 overflow is refused) and the layer's output needs no Add.

A BN reading a quantized *activation* (``layer -> QuantizeLinear -> DequantizeLinear -> BN``) is
refused (QUANTIZED): scaling the layer would change what that Q/DQ rounds and clips.

A zero BN scale keeps the channel's scale and sets its integers to the zero point: its weights are
exactly 0 and the channel is its (new) bias, as after the BN.

Refused with the reason QUANTIZED: blocked quantization (``block_size``), weights
quantized on another axis, int4/uint4/float8 weights, per-tensor scales below opset 13, a non-zero
bias zero point, a DequantizeLinear whose ``output_dtype`` (opset 23) is not its scale's dtype (the
folded scale, rounded to the scale's dtype, would lose what the output keeps), a weight scale of 0;
OTHER_CONSUMERS: a quantized *bias* read by another node; OVERFLOW: a scale that is not finite or
underflows to zero, an int32 bias overflow (``-2**31`` negated, or a requantised bias out of range).

Shared weights: a weight DequantizeLinear whose output other nodes read too is copied for the folded
layer (``Fold.clone``: the rewriter inserts the copy after it; the copy reads the same ``w_q`` and
zero point and gets its own scale -- and its own integers only where a channel is negated); the other
readers keep the original. Shared *initializers* (one ``w_q`` or scale read by two DequantizeLinear
nodes) are handled by the rewriter, which writes a new initializer when the old one has other readers.

Backward (``BN -> layer(DequantizeLinear weight)``, :func:`match_qdq_backward`): the BN scales the
layer's input channels; exact only with one BN scale for every channel (case B1) or a weight quantized
per input channel (case B2), the shift ``W t`` into a float bias (an int32 bias where exact, or
requantised on request); a BN whose output is quantized (``BN -> QuantizeLinear``) is refused by
:mod:`~bnfold.onnx.match_backward`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
from onnx import NodeProto, TensorProto, helper

from bnfold.fold_math import WeightLayout, channel_factor, fold_backward, fold_gemm_backward
from bnfold.records import Direction, Site, Skip, SkipReason

from .const import Array, ConstEvaluator, is_float
from .forward import F64, Fwd, Result, common, exclusive
from .graph import GraphIndex, attr, name_of
from .plan import BnParams, Fold, Write, conv_groups, finish, rank2_or_skip

__all__ = [
    "dq_weight",
    "match_qdq",
    "match_qdq_backward",
    "activation_skip",
    "requantize_int32_bias",
    "QDQ_LAYERS",
]


QDQ_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_INT_TYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32))
_I32 = np.iinfo(np.int32)
_REQUANTIZE: ContextVar[bool] = ContextVar("bnfold_qdq_requantize", default=False)


@contextmanager
def requantize_int32_bias(on: bool = True) -> Iterator[None]:
    """Within this block, an int32 bias through DequantizeLinear takes the BN shift by requantisation
    (round to nearest: not exact, each bias value off by at most half a step of its new scale, the
    bound the site's detail states) instead of the exact default (the shift kept as one Add).

    The site records the bound (:attr:`~bnfold.records.Site.bias_rounding`); the file job's
    verification adds it to the default tolerance of the outputs it reaches
    (:func:`bnfold.verification.policy.bias_rounding_atol`)."""
    tok = _REQUANTIZE.set(on)
    try:
        yield
    finally:
        _REQUANTIZE.reset(tok)


def _dq(index: GraphIndex, value: str) -> int | None:
    p = index.producer.get(value) if value else None
    if p is None:
        return None
    n = index.nodes[p]
    return p if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx") else None


def dq_weight(index: GraphIndex, node: NodeProto) -> int | None:
    """The DequantizeLinear node (index) producing the weight (input 1) of ``node``, or None."""
    if node.op_type not in QDQ_LAYERS or len(node.input) < 2:
        return None
    return _dq(index, node.input[1])


class _Refuse(Exception):
    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Ctx(Protocol):
    """What the constant readers need (a forward :class:`Fwd` or the backward :class:`_Back`)."""

    @property
    def index(self) -> GraphIndex: ...

    @property
    def ev(self) -> ConstEvaluator: ...


def _const(c: _Ctx, name: str, what: str) -> Array:
    v, reason, detail = c.ev.resolve(name)
    if v is None:
        raise _Refuse(reason or SkipReason.NON_CONSTANT, f"the {what} is not a constant: {detail}")
    return v


def _same_output_dtype(c: _Ctx, dn: NodeProto, s: Array, what: str) -> None:
    """Refuse a DequantizeLinear whose ``output_dtype`` (opset 23) is not its scale's dtype: the
    folded scale is rounded to the scale's dtype, which would lose what a wider output keeps (and a
    new bias or shift written in the scale's dtype would not match the layer's)."""
    od = int(attr(dn, "output_dtype", 0, c.ev.opset))
    if od and od != helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)):
        raise _Refuse(
            SkipReason.QUANTIZED,
            f"the DequantizeLinear of the {what} has output_dtype {TensorProto.DataType.Name(od).lower()} "
            f"and {np.dtype(s.dtype).name} scales: a folded scale rounded to {np.dtype(s.dtype).name} "
            "would lose precision the output keeps",
        )


def _sole(c: Fwd, d: int, reader: str) -> None:
    out = c.index.nodes[d].output[0]
    bad = exclusive(c, out, f"DequantizeLinear '{name_of(c.index.nodes[d])}'")
    if bad is not None:
        raise _Refuse(bad.reason, bad.detail + f" (a quantized tensor of {reader} shared: not cloned)")


def _shared(index: GraphIndex, d: int) -> bool:
    """True when the output of DequantizeLinear ``d`` is read by more than one node or is a graph
    output: the folded layer then reads a copy of ``d`` (``Fold.clone``), the others keep ``d``."""
    out = index.nodes[d].output[0]
    return out in index.graph_outputs or len(index.consumers.get(out, [])) > 1


def _dq_parts(
    c: Fwd, d: int, channels: int, axis: int, ndim: int, what: str
) -> tuple[Array, Array, Array | None, bool]:
    """``(q, scale, zero_point, per_tensor)`` of DequantizeLinear ``d`` whose channels lie on ``axis``."""
    dn = c.index.nodes[d]
    opset = c.ev.opset
    if int(attr(dn, "block_size", 0, opset)) != 0:
        raise _Refuse(SkipReason.QUANTIZED, f"the {what} uses blocked quantization (block_size): not folded")
    q = _const(c, dn.input[0], f"quantized {what}")
    if np.dtype(q.dtype) not in _INT_TYPES:
        raise _Refuse(
            SkipReason.QUANTIZED, f"the quantized {what} has type {q.dtype} (only 8/16/32-bit integers fold)"
        )
    if q.ndim != ndim:
        raise _Refuse(SkipReason.LAYOUT, f"the quantized {what} has rank {q.ndim}, expected {ndim}")
    s = _const(c, dn.input[1], f"scale of the {what}")
    if not is_float(s):
        raise _Refuse(SkipReason.QUANTIZED, f"the scale of the {what} has type {s.dtype}")
    _same_output_dtype(c, dn, s, what)
    z = _const(c, dn.input[2], f"zero point of the {what}") if len(dn.input) > 2 and dn.input[2] else None
    if z is not None and (z.dtype != q.dtype or z.shape != s.shape):
        raise _Refuse(SkipReason.QUANTIZED, f"the zero point of the {what} does not match its data or scale")
    if s.size == 1 and s.ndim <= 1:
        if opset < 13:
            raise _Refuse(
                SkipReason.QUANTIZED,
                f"the {what} has a per-tensor scale and opset {opset} < 13 has no per-channel DequantizeLinear",
            )
        return q, s, z, True
    ax = int(attr(dn, "axis", 1, opset))
    ax = ax + ndim if ax < 0 else ax
    if s.ndim != 1 or ax != axis or s.shape[0] != channels:
        raise _Refuse(
            SkipReason.QUANTIZED,
            f"the {what} is quantized on axis {ax} with {s.size} scales, not per output channel "
            f"(axis {axis}, {channels} channels)",
        )
    return q, s, z, False


def _first_overflow(q: Array, new_q: Array, out: Array, info: np.iinfo[Any]) -> str:
    """The first integer whose negation around its zero point leaves the type, as the reason says it."""
    i = int(np.flatnonzero(out.reshape(-1))[0])
    return (
        f"weight {int(q.reshape(-1)[i])} would become {int(new_q.reshape(-1)[i])}, outside "
        f"[{info.min}, {info.max}]"
    )


def _first(mask: Array) -> int:
    return int(np.flatnonzero(mask.reshape(-1))[0])


def _per_c(v: Array, channels: int) -> F64:
    return np.broadcast_to(v.astype(np.float64).reshape(-1), (channels,)).copy()


def match_qdq(c: Fwd, p: int) -> Result:
    """The forward verdict for ``layer(DequantizeLinear weight) -> BN`` (Conv, ConvTranspose, Gemm,
    MatMul); refusals are specific (they name the quantized layer)."""
    try:
        return _match(c, p), True
    except _Refuse as e:
        return Skip(c.label, e.reason, e.detail), True


def _match(c: Fwd, p: int) -> Fold | Skip:
    idx, opset = c.index, c.ev.opset
    pn = idx.nodes[p]
    kind = pn.op_type
    target = f"{kind} '{name_of(pn)}'"
    bad = common(c, target)
    if bad is not None:
        return bad
    d = dq_weight(idx, pn)
    assert d is not None
    clone = (d, p, 1) if _shared(idx, d) else None
    ch = c.prm.channels
    if kind == "Conv":
        axis, ndim, bias_slot = 0, 0, 2
    elif kind == "ConvTranspose":
        if int(attr(pn, "group", 1, opset)) != 1:
            raise _Refuse(SkipReason.LAYOUT, f"{target} is grouped: its output channels span two weight axes")
        axis, ndim, bias_slot = 1, 0, 2
    elif kind == "Gemm":
        axis, ndim, bias_slot = (0 if int(attr(pn, "transB", 0, opset)) else 1), 2, 2
    else:  # MatMul: becomes Gemm(A, W', t) on a rank-2 product
        bad = rank2_or_skip(
            idx, c.x, c.y, c.label, f"the product of {target}", "the MatMul's feature axis", pn.input[0]
        )
        if bad is not None:
            return bad
        axis, ndim, bias_slot = 1, 2, -1
    if kind in ("Conv", "ConvTranspose"):
        wq = _const(c, idx.nodes[d].input[0], f"quantized weight of {target}")
        ndim = wq.ndim
    q, s, z, per_tensor = _dq_parts(c, d, ch, axis, ndim, f"weight of {target}")
    if q.shape[axis] != ch:
        raise _Refuse(SkipReason.LAYOUT, f"{target} has {q.shape[axis]} output channels, the BN {ch}")
    a, t = c.prm.scale, c.prm.shift
    # New weight scale s |a| (one rounding); negative channels negate the integers around the zero
    # point; a zero BN scale keeps the scale and sets the channel's integers to the zero point (its
    # weights become exactly 0: the channel is its bias, as after the BN).
    zero = a == 0
    sa = np.where(zero, 1.0, np.abs(a))
    s64 = _per_c(s, ch)
    res = finish([s64 * sa], s.dtype, c.label, f"weight scale of {target}")
    if isinstance(res, Skip):
        return res
    s_new = res[0]
    if np.any(s64 == 0):
        raise _Refuse(SkipReason.QUANTIZED, f"a weight scale of {target} is 0 (channel {_first(s64 == 0)})")
    if np.any(s_new == 0):
        return Skip(c.label, SkipReason.OVERFLOW, f"a new weight scale of {target} underflows to zero")
    writes = [Write(d, 1, s_new)]
    zc = np.broadcast_to(z.reshape(-1), (ch,)).astype(q.dtype) if z is not None else None
    if per_tensor and zc is not None:
        writes.append(Write(d, 2, zc))
    neg = a < 0
    if neg.any() or zero.any():
        info = np.iinfo(q.dtype)
        z64 = zc.astype(np.int64) if zc is not None else np.zeros(ch, np.int64)
        shape = [1] * q.ndim
        shape[axis] = ch
        flipped = 2 * z64.reshape(shape) - q.astype(np.int64)
        new_q = np.where(neg.reshape(shape), flipped, q.astype(np.int64))
        new_q = np.where(zero.reshape(shape), z64.reshape(shape), new_q)
        out_of_range = (new_q < info.min) | (new_q > info.max)
        if out_of_range.any():
            k = int(np.flatnonzero(np.moveaxis(out_of_range, axis, 0).reshape(ch, -1).any(axis=1))[0])
            raise _Refuse(
                SkipReason.QUANTIZED,
                f"the BN scale is negative on channel {k} and negating its {q.dtype} weights around zero "
                f"point {int(z64[k])} would overflow: {_first_overflow(q, new_q, out_of_range, info)}",
            )
        writes.append(Write(d, 0, new_q.astype(q.dtype)))
    attrs: list[tuple[int, str, int]] = [(d, "axis", axis)]
    locks = [p, d]
    if clone is not None:
        detail_clone = "; the shared DequantizeLinear copied for this layer (integers shared)"
    else:
        detail_clone = ""
    rounding: tuple[str, float] | None = None
    detail = (
        "quantized weight: scales multiplied, "
        + (
            f"integers negated on {int(neg.sum())} channel(s) (BN scale < 0), the others unchanged"
            if neg.any()
            else "integers unchanged"
        )
        + (
            f"; {int(zero.sum())} channel(s) zeroed (BN scale 0: the channel is its bias)"
            if zero.any()
            else ""
        )
    )
    # Bias: b' = a b + t (Gemm: beta C a + t, beta becomes 1).
    beta = float(attr(pn, "beta", 1.0, opset)) if kind == "Gemm" else 1.0
    beta_one, shift = True, None
    bname = pn.input[bias_slot] if 0 <= bias_slot < len(pn.input) else ""
    bd = _dq(idx, bname)
    if not bname:
        bres = finish([t.copy()], s_new.dtype, c.label, f"bias of {target}")
        if isinstance(bres, Skip):
            return bres
        writes.append(Write(p, 2, bres[0]))
    elif bd is None:
        b = _float_bias(c, bname, target)
        if b.size not in (1, ch) or b.ndim > 2 or (b.ndim == 2 and b.shape[0] != 1):
            raise _Refuse(SkipReason.LAYOUT, f"the bias of {target} has shape {list(b.shape)}")
        bres = finish([beta * _per_c(b, ch) * a + t], b.dtype, c.label, f"bias of {target}")
        if isinstance(bres, Skip):
            return bres
        writes.append(Write(p, 2, bres[0]))
    else:
        _sole(c, bd, f"the bias of {target}")
        bq, bs, bz, b_pt = _dq_parts(c, bd, ch, 0, 1, f"bias of {target}")
        if bq.dtype != np.int32:
            raise _Refuse(SkipReason.QUANTIZED, f"the quantized bias of {target} is {bq.dtype}, not int32")
        if bz is not None and np.any(bz != 0):
            raise _Refuse(SkipReason.QUANTIZED, f"the quantized bias of {target} has a non-zero zero point")
        if bq.shape[0] != ch:
            raise _Refuse(SkipReason.LAYOUT, f"the bias of {target} has {bq.shape[0]} values, the BN {ch}")
        bs64 = _per_c(bs, ch)
        b64 = bq.astype(np.float64) * bs64 * beta
        target_b = a * b64 + t
        # Keep the bias scale = input scale * weight scale where the graph had it so (ORT's QDQ Conv).
        xs = _input_scale_of(c, pn.input[0])  # the layer's input
        if xs is not None and _same_product(xs, s64, bs64, bs.dtype):
            new_bs = finish([xs * s_new.astype(np.float64)], bs.dtype, c.label, f"bias scale of {target}")
        else:
            new_bs = finish([bs64 * sa], bs.dtype, c.label, f"bias scale of {target}")
        if isinstance(new_bs, Skip):
            return new_bs
        nbs = new_bs[0]
        if np.any(nbs == 0):
            return Skip(c.label, SkipReason.OVERFLOW, f"a new bias scale of {target} underflows to zero")
        if _REQUANTIZE.get():
            qv = np.rint(target_b / nbs.astype(np.float64))
            what = "requantised"
        else:  # exact: the integers keep their value (negated where a < 0), the shift stays as one Add
            qv = np.sign(a) * bq.astype(np.float64)
            what = "negated"
            beta_one = False  # C' = a C exactly (scale s_b |a|): beta keeps multiplying it
            rank = q.ndim if kind in ("Conv", "ConvTranspose") else 2
            sres = finish(
                [t.reshape((-1,) + (1,) * (rank - 2))], s_new.dtype, c.label, f"shift after {target}"
            )
            if isinstance(sres, Skip):
                return sres
            shift = sres[0]
        if np.any(qv < _I32.min) or np.any(qv > _I32.max) or not np.all(np.isfinite(qv)):
            return Skip(
                c.label,
                SkipReason.OVERFLOW,
                f"the {what} int32 bias of {target} would overflow int32 (max |value| "
                f"{float(np.max(np.abs(qv))):.3g})",
            )
        if shift is None or neg.any() or zero.any():  # integers changed: negated, or 0 where a = 0
            writes.append(Write(bd, 0, qv.astype(np.int32)))
        writes.append(Write(bd, 1, nbs))
        if bz is not None and b_pt:
            writes.append(Write(bd, 2, np.zeros(ch, np.int32)))
        attrs.append((bd, "axis", 0))
        locks.append(bd)
        if shift is None:
            bound = float(np.max(np.abs(nbs.astype(np.float64)))) / 2  # scales may be negative
            detail += f"; int32 bias requantised (round to nearest, |error| <= {bound:.3g}, half a step)"
            rounding = (c.y, bound)  # the layer's output takes the BN's name
        else:
            detail += (
                "; int32 bias rescaled exactly, the shift kept as one Add (an int32 bias cannot hold it)"
            )
    base = c.base(p, kind, detail + detail_clone, "qdq-bn")
    if rounding is not None:
        base["site"] = replace(base["site"], bias_rounding=rounding)
    if shift is not None:  # the BN becomes Add(its input, shift): the layer keeps its output name
        base["rename_output"], base["dropped"] = None, ()
    return Fold(
        **base,
        locks=c.locks(*locks),
        writes=writes,
        shift=shift,
        beta_one=(p,) if kind == "Gemm" and beta_one else (),
        to_gemm=p if kind == "MatMul" else None,
        set_int_attrs=tuple(attrs),
        clone=clone,
    )


def activation_skip(c: Fwd, d: int) -> Result:
    """The refusal for a BN reading a dequantized activation (``layer -> QuantizeLinear ->
    DequantizeLinear -> BN``): scaling the layer would move its output across that quantization grid
    (rounding and saturation), so no fold above it is exact. Not specific: a backward verdict that
    names the layer after the BN (a fold into it, or its own refusal) is reported instead."""
    dn = c.index.nodes[d]
    q = c.index.producer.get(dn.input[0]) if dn.input else None
    via = ""
    if q is not None and c.index.nodes[q].op_type == "QuantizeLinear":
        src = c.index.producer.get(c.index.nodes[q].input[0])
        if src is not None:
            via = f" of {c.index.nodes[src].op_type} '{name_of(c.index.nodes[src])}'"
    return Skip(
        c.label,
        SkipReason.QUANTIZED,
        f"its input is the quantized output{via} (DequantizeLinear '{name_of(dn)}'): folding it into the "
        "layer would change what that quantization rounds and clips; quantize without the layer's "
        "output Q/DQ (or fold before quantizing)",
    ), False


def _same_product(xs: F64, s64: F64, bs64: F64, dtype: np.dtype[Any]) -> bool:
    """True when the bias scale is exactly the input scale times the weight scale, rounded once."""
    with np.errstate(over="ignore", under="ignore"):
        return bool(np.array_equal((xs * s64).astype(dtype), bs64.astype(dtype)))


# ---- Backward: BN -> layer(DequantizeLinear weight) ------------------------------------------------
class _Back:
    """What the backward QDQ case reads (the constant readers' :class:`_Ctx`)."""

    __slots__ = ("index", "ev")

    def __init__(self, index: GraphIndex, ev: ConstEvaluator) -> None:
        self.index, self.ev = index, ev


def match_qdq_backward(
    index: GraphIndex,
    ev: ConstEvaluator,
    ki: int,
    label: str,
    prm: BnParams,
    base: dict[str, Any],
    locks: tuple[int, ...],
    flat: bool = False,
) -> Result:
    """The backward verdict for ``BN -> layer(DequantizeLinear(w_q, s, z))`` (Conv without padding,
    Gemm with ``transA = 0``, MatMul on a rank-2 input; ``reps`` > 1 after a Flatten). The caller has
    checked what the float backward fold checks (padding, transA, ranks, the K axis).

    ``layer(a x + t) = layer_{W diag(a)}(x) + W t``: the BN scales the layer's *input* channels.
    The integers stay (negated around the zero point where the factor is negative, the zero point
    where it is 0) and the scales take ``|factor|`` -- which a DequantizeLinear can express exactly
    (one rounding of each new scale, as every float fold rounds its weights once) in two cases only:

    * Case B1, one factor for the whole weight: every BN scale is the same ``alpha`` (any quantization
      axis, per tensor included): ``s' = s |alpha|``.
    * Case B2, the weight is quantized per *input* channel (the DequantizeLinear axis is the layer's
      input-channel axis: Conv axis 1 with one group, or BN channels that agree across the groups;
      Gemm/MatMul the K axis): ``s'[k] = s[k] |a[k]|``.

    Anything else (per-output-channel or per-tensor scales with BN scales that differ per channel)
    would need new integers ``(w_q - z) a[k] / alpha`` off the integer grid: refused (QUANTIZED).

    The shift's image ``W t`` is computed in float64 from the weight as the graph dequantizes it
    (``(w_q - z) s`` rounded to the scale's dtype) and goes into a float bias (or a new one). An
    int32 bias through DequantizeLinear keeps its scale (or ``s_x * s_w'`` where it was the input
    scale times the weight scale) and takes the shift only when the new integers are exact; within
    :func:`requantize_int32_bias` it is rounded to nearest (the detail states the bound, half a step);
    otherwise refused with that reason.
    """
    try:
        return _backward(_Back(index, ev), ki, label, prm, base, locks, flat), True
    except _Refuse as e:
        return Skip(label, e.reason, e.detail), True


def _backward(
    c: _Back, ki: int, label: str, prm: BnParams, base: dict[str, Any], locks: tuple[int, ...], flat: bool
) -> Fold | Skip:
    idx, opset = c.index, c.ev.opset
    kn = idx.nodes[ki]
    kind, target = kn.op_type, f"{kn.op_type} '{name_of(kn)}'"
    d = dq_weight(idx, kn)
    assert d is not None
    dn = idx.nodes[d]
    clone = (d, ki, 1) if _shared(idx, d) else None
    if int(attr(dn, "block_size", 0, opset)) != 0:
        raise _Refuse(SkipReason.QUANTIZED, f"the weight of {target} uses blocked quantization (block_size)")
    q = _const(c, dn.input[0], f"quantized weight of {target}")
    if np.dtype(q.dtype) not in _INT_TYPES:
        raise _Refuse(
            SkipReason.QUANTIZED,
            f"the quantized weight of {target} has type {q.dtype} (only 8/16/32-bit integers fold)",
        )
    s = _const(c, dn.input[1], f"scale of the weight of {target}")
    if not is_float(s):
        raise _Refuse(SkipReason.QUANTIZED, f"the scale of the weight of {target} has type {s.dtype}")
    _same_output_dtype(c, dn, s, f"weight of {target}")
    z = (
        _const(c, dn.input[2], f"zero point of the weight of {target}")
        if len(dn.input) > 2 and dn.input[2]
        else None
    )
    if z is not None and (z.dtype != q.dtype or z.shape != s.shape):
        raise _Refuse(
            SkipReason.QUANTIZED, f"the zero point of the weight of {target} does not match its data or scale"
        )
    per_tensor = s.size == 1 and s.ndim <= 1
    qaxis = None
    if not per_tensor:
        qaxis = int(attr(dn, "axis", 1, opset))
        qaxis = qaxis + q.ndim if qaxis < 0 else qaxis
        if s.ndim != 1 or not 0 <= qaxis < q.ndim or s.shape[0] != q.shape[qaxis]:
            raise _Refuse(SkipReason.QUANTIZED, f"the weight scales of {target} do not fit its axis {qaxis}")
    trans_b = kind == "Gemm" and bool(attr(kn, "transB", 0, opset))
    reps = 1
    if kind == "Conv":
        g = conv_groups(kn, tuple(q.shape))
        layout, in_axis = WeightLayout.conv(g), 1
        if q.shape[1] * g != prm.channels:
            raise _Refuse(
                SkipReason.LAYOUT, f"{target} has {q.shape[1] * g} input channels, the BN {prm.channels}"
            )
    else:
        if q.ndim != 2:
            raise _Refuse(SkipReason.LAYOUT, f"the weight of {target} has rank {q.ndim}")
        g, in_axis = 1, (1 if trans_b else 0)
        layout = WeightLayout(out_axis=1 - in_axis, in_axis=in_axis)
        reps = max(1, q.shape[in_axis] // prm.channels) if flat else 1
        if q.shape[in_axis] != prm.channels * reps:
            raise _Refuse(
                SkipReason.LAYOUT,
                f"{target} reads {q.shape[in_axis]} features, the BN {prm.channels}"
                + (f" x {reps}" if reps > 1 else ""),
            )
    a = np.repeat(prm.scale, reps) if reps > 1 else prm.scale
    t = np.repeat(prm.shift, reps) if reps > 1 else prm.shift
    n_in = q.shape[in_axis]
    # The factor per scale entry, or the refusal.
    if np.all(a == a[0]):  # Case B1: one factor
        f = np.full(s.size, a[0])
        case = "one BN scale for every channel: weight scales multiplied"
    elif qaxis == in_axis:  # Case B2: per input channel
        full = np.broadcast_to(channel_factor(a, tuple(q.shape), layout, "in"), q.shape)
        rows = np.moveaxis(full, in_axis, 0).reshape(n_in, -1)
        if not np.all(rows == rows[:, :1]):
            raise _Refuse(
                SkipReason.QUANTIZED,
                f"{target} has {g} groups whose BN scales differ for the same weight input channel: "
                "its per-input-channel weight scales cannot take them",
            )
        f = rows[:, 0].copy()
        case = "weight quantized per input channel: scales multiplied"
    else:
        how = "per tensor" if per_tensor else f"on axis {qaxis}, not its input-channel axis {in_axis}"
        raise _Refuse(
            SkipReason.QUANTIZED,
            f"the BN scales the input channels of {target} by different factors, but its weight is "
            f"quantized {how}: the scaled weights are off its integer grid; quantize the weight per "
            "input channel, or fold before quantizing",
        )
    zero, neg = f == 0, f < 0
    res = finish(
        [s.astype(np.float64).reshape(-1) * np.where(zero, 1.0, np.abs(f))],
        s.dtype,
        label,
        f"weight scale of {target}",
    )
    if isinstance(res, Skip):
        return res
    s_new = res[0].reshape(s.shape)
    if np.any(s == 0):
        raise _Refuse(
            SkipReason.QUANTIZED, f"a weight scale of {target} is 0 (entry {_first(s.reshape(-1) == 0)})"
        )
    if np.any(s_new == 0):
        return Skip(label, SkipReason.OVERFLOW, f"a new weight scale of {target} underflows to zero")
    writes = [Write(d, 1, s_new)]
    shape = [1] * q.ndim
    if qaxis is not None:
        shape[qaxis] = s.size
    z64 = np.zeros(shape, np.int64) if z is None else z.astype(np.int64).reshape(shape)
    if neg.any() or zero.any():
        info = np.iinfo(q.dtype)
        q64 = q.astype(np.int64)
        new_q = np.where(neg.reshape(shape), 2 * z64 - q64, q64)
        new_q = np.where(zero.reshape(shape), z64, new_q)
        out_of_range = (new_q < info.min) | (new_q > info.max)
        if out_of_range.any():
            raise _Refuse(
                SkipReason.QUANTIZED,
                f"a BN scale is negative and negating the {q.dtype} weights of {target} around their zero "
                f"point would overflow: {_first_overflow(q, new_q, out_of_range, info)}",
            )
        writes.append(Write(d, 0, new_q.astype(q.dtype)))
    # The shift's image W t, from the weight as the graph dequantizes it (rounded to the scale's dtype).
    w_dq = ((q.astype(np.float64) - z64) * s.astype(np.float64).reshape(shape)).astype(s.dtype)
    ones = np.ones(n_in if kind != "Conv" else prm.channels)
    if kind == "Conv":
        _, delta = fold_backward(w_dq, None, ones, prm.shift, layout)
    else:
        alpha = float(attr(kn, "alpha", 1.0, opset)) if kind == "Gemm" else 1.0
        _, delta = fold_gemm_backward(w_dq, None, alpha, 1.0, ones, t, trans_b)
    n_out = q.shape[layout.out_axis]
    rounding: tuple[str, float] | None = None
    detail = case + (
        f", integers negated on {int(neg.sum())} slice(s)" if neg.any() else ", integers unchanged"
    )
    if zero.any():
        detail += f", {int(zero.sum())} slice(s) zeroed (BN scale 0)"
    bias_slot = 2 if kind in ("Conv", "Gemm") else -1
    bname = kn.input[bias_slot] if 0 <= bias_slot < len(kn.input) else ""
    bd = _dq(idx, bname)
    beta = float(attr(kn, "beta", 1.0, opset)) if kind == "Gemm" else 1.0
    lock = [ki, d]
    bias_attrs: tuple[tuple[int, str, int], ...] = ()
    if not bname:
        bres = finish([delta.reshape(-1)], s_new.dtype, label, f"bias of {target}")
        if isinstance(bres, Skip):
            return bres
        writes.append(Write(ki, 2, bres[0]))
    elif bd is None:
        b = _float_bias(c, bname, target)
        if b.ndim > 2 or b.size not in (1, n_out) and kind == "Conv":
            raise _Refuse(SkipReason.LAYOUT, f"the bias of {target} has shape {list(b.shape)}")
        new_b = beta * b.astype(np.float64) + delta.reshape(-1)  # beta becomes 1
        bres = finish([new_b], b.dtype, label, f"bias of {target}")
        if isinstance(bres, Skip):
            return bres
        writes.append(Write(ki, 2, bres[0]))
    else:
        wo = idx.nodes[bd].output[0]
        if wo in idx.graph_outputs or len(idx.consumers.get(wo, [])) != 1:
            raise _Refuse(
                SkipReason.OTHER_CONSUMERS, f"the dequantized bias '{wo}' of {target} is read elsewhere"
            )
        bdn = idx.nodes[bd]
        bq = _const(c, bdn.input[0], f"quantized bias of {target}")
        bs = _const(c, bdn.input[1], f"scale of the bias of {target}")
        bz = (
            _const(c, bdn.input[2], f"zero point of the bias of {target}")
            if len(bdn.input) > 2 and bdn.input[2]
            else None
        )
        if bq.dtype != np.int32 or bq.shape != (n_out,) or not is_float(bs) or bs.size not in (1, n_out):
            raise _Refuse(
                SkipReason.QUANTIZED, f"the quantized bias of {target} is not int32 per output channel"
            )
        if bz is not None and np.any(bz != 0):
            raise _Refuse(SkipReason.QUANTIZED, f"the quantized bias of {target} has a non-zero zero point")
        _same_output_dtype(c, bdn, bs, f"bias of {target}")
        bs64 = np.broadcast_to(bs.astype(np.float64).reshape(-1), (n_out,))
        value = bq.astype(np.float64) * bs64 * beta + delta.reshape(-1)  # beta becomes 1
        # The bias scale: s_x * s_w' where it was the input scale times the weight scale per output
        # channel (what onnxruntime's QDQ Conv reads); else kept.
        nbs64, rescaled = bs64, False
        xs = _input_scale_of(c, base["rename_input"][2])
        if xs is not None and qaxis != in_axis:
            old = np.broadcast_to(xs * s.astype(np.float64).reshape(-1), (n_out,))
            if np.array_equal(old.astype(bs.dtype), bs64.astype(bs.dtype)):
                new = np.broadcast_to(xs * s_new.astype(np.float64).reshape(-1), (n_out,)).copy()
                nb = finish([new], bs.dtype, label, f"bias scale of {target}")
                if isinstance(nb, Skip):
                    return nb
                if np.any(nb[0] == 0):
                    return Skip(
                        label, SkipReason.OVERFLOW, f"a new bias scale of {target} underflows to zero"
                    )
                nbs64, rescaled = nb[0].astype(np.float64), not np.array_equal(nb[0], bs64.astype(bs.dtype))
        exact = value / nbs64
        qv = np.rint(exact)
        if not np.all(np.isfinite(qv)) or np.any(qv < _I32.min) or np.any(qv > _I32.max):
            return Skip(
                label,
                SkipReason.OVERFLOW,
                f"the int32 bias of {target} would overflow int32 with the BN shift",
            )
        if np.array_equal(qv, exact):
            detail += "; int32 bias takes the shift exactly"
        elif _REQUANTIZE.get():
            bound = float(np.max(np.abs(nbs64))) / 2  # scales may be negative
            detail += f"; int32 bias requantised (round to nearest, |error| <= {bound:.3g}, half a step)"
            rounding = (kn.output[0], bound)
        else:
            raise _Refuse(
                SkipReason.QUANTIZED,
                f"the int32 bias of {target} cannot hold the BN shift W t exactly (not a multiple of its "
                "scale); requantise it (requantize_int32_bias, --requantize-bias: at most half a step off) "
                "or fold before quantizing",
            )
        writes.append(Write(bd, 0, qv.astype(np.int32)))
        if rescaled:
            writes.append(Write(bd, 1, nbs64.astype(bs.dtype)))
            if bz is not None and bz.size != n_out:
                writes.append(Write(bd, 2, np.zeros(n_out, np.int32)))
            bias_attrs = ((bd, "axis", 0),)
        lock.append(bd)
    if clone is not None:
        detail += "; the shared DequantizeLinear copied for this layer (integers shared)"
    site: Site = base["site"]
    detail = "; ".join(filter(None, ["quantized weight: " + detail, site.detail]))
    return Fold(
        **{
            **base,
            "site": Site(
                site.bn,
                site.target,
                site.target_kind,
                Direction.BACKWARD,
                detail,
                "bn-qdq",
                bias_rounding=rounding,
            ),
        },
        locks=tuple(dict.fromkeys((*locks, *lock))),
        writes=writes,
        beta_one=(ki,) if kind == "Gemm" else (),
        to_gemm=ki if kind == "MatMul" else None,
        set_int_attrs=bias_attrs,
        clone=clone,
    )


def _float_bias(c: _Ctx, name: str, target: str) -> Array:
    """The float bias ``name`` of ``target`` (a constant, not dequantized), or _Refuse why not."""
    b = _const(c, name, f"bias of {target}")
    if not is_float(b):
        raise _Refuse(SkipReason.UNSUPPORTED_DTYPE, f"the bias of {target} has dtype {b.dtype}")
    return b


def _input_scale_of(c: _Ctx, x: str) -> F64 | None:
    """The per-tensor scale of the DequantizeLinear producing ``x``, if any."""
    xd = _dq(c.index, x)
    if xd is None or len(c.index.nodes[xd].input) < 2:
        return None
    v, _, _ = c.ev.resolve(c.index.nodes[xd].input[1])
    if v is None or v.size != 1 or not is_float(v):
        return None
    return np.asarray(v, np.float64).reshape(-1)[:1]
