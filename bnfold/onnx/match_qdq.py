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
bias zero point; OTHER_CONSUMERS: a DequantizeLinear output read by another node (shared weights are
not cloned); OVERFLOW: a scale that is not finite or underflows to zero, an int32 bias overflow (``-2**31``
negated, or a requantised bias out of range).
Shared *initializers* (one ``w_q`` or scale read by two DequantizeLinear nodes) are handled by the
rewriter, which writes a new initializer when the old one has other readers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
from onnx import NodeProto

from bnfold.records import Skip, SkipReason

from .const import Array, is_float
from .forward import Fwd, common, exclusive
from .graph import GraphIndex, attr, name_of
from .plan import Fold, Write, finish, rank2_or_skip

__all__ = ["dq_weight", "match_qdq", "activation_skip", "requantize_int32_bias", "QDQ_LAYERS"]

Result = tuple[Fold | Skip, bool]
F64 = np.ndarray[Any, np.dtype[np.float64]]

QDQ_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_INT_TYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32))
_I32 = np.iinfo(np.int32)
_REQUANTIZE: ContextVar[bool] = ContextVar("bnfold_qdq_requantize", default=False)


@contextmanager
def requantize_int32_bias(on: bool = True) -> Iterator[None]:
    """Within this block, an int32 bias through DequantizeLinear takes the BN shift by requantisation
    (round to nearest: not exact, each bias value off by at most half a step of its new scale, the
    bound the site's detail states) instead of the exact default (the shift kept as one Add).

    The fold's verification compares at the default tolerance: a requantised fold may need
    ``--atol`` of that bound on the outputs it reaches."""
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


def _const(c: Fwd, name: str, what: str) -> Array:
    v, reason, detail = c.ev.resolve(name)
    if v is None:
        raise _Refuse(reason or SkipReason.NON_CONSTANT, f"the {what} is not a constant: {detail}")
    return v


def _sole(c: Fwd, d: int, reader: str) -> None:
    out = c.index.nodes[d].output[0]
    bad = exclusive(c, out, f"DequantizeLinear '{name_of(c.index.nodes[d])}'")
    if bad is not None:
        raise _Refuse(bad.reason, bad.detail + f" (a quantized tensor of {reader} shared: not cloned)")


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
    _sole(c, d, target)
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
                f"point {int(z64[k])} would overflow (e.g. {info.min} with zero point 0)",
            )
        writes.append(Write(d, 0, new_q.astype(q.dtype)))
    attrs: list[tuple[int, str, int]] = [(d, "axis", axis)]
    locks = [p, d]
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
        b = _const(c, bname, f"bias of {target}")
        if not is_float(b):
            raise _Refuse(SkipReason.UNSUPPORTED_DTYPE, f"the bias of {target} has dtype {b.dtype}")
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
        xs = _input_scale(c, pn)
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
        if shift is None or neg.any():
            writes.append(Write(bd, 0, qv.astype(np.int32)))
        writes.append(Write(bd, 1, nbs))
        if bz is not None and b_pt:
            writes.append(Write(bd, 2, np.zeros(ch, np.int32)))
        attrs.append((bd, "axis", 0))
        locks.append(bd)
        if shift is None:
            bound = float(np.max(nbs.astype(np.float64))) / 2
            detail += f"; int32 bias requantised (round to nearest, |error| <= {bound:.3g}, half a step)"
        else:
            detail += (
                "; int32 bias rescaled exactly, the shift kept as one Add (an int32 bias cannot hold it)"
            )
    base = c.base(p, kind, detail, "qdq-bn")
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
    )


def activation_skip(c: Fwd, d: int) -> Result:
    """The refusal for a BN reading a dequantized activation (``layer -> QuantizeLinear ->
    DequantizeLinear -> BN``): scaling the layer would move its output across that quantization grid
    (rounding and saturation), so no fold above it is exact."""
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
    ), True


def _input_scale(c: Fwd, pn: NodeProto) -> F64 | None:
    """The per-tensor scale of the DequantizeLinear feeding the layer's input, if any."""
    xd = _dq(c.index, pn.input[0])
    if xd is None or len(c.index.nodes[xd].input) < 2:
        return None
    v, _, _ = c.ev.resolve(c.index.nodes[xd].input[1])
    if v is None or v.size != 1 or not is_float(v):
        return None
    return np.asarray(v, np.float64).reshape(-1)[:1]


def _same_product(xs: F64, s64: F64, bs64: F64, dtype: np.dtype[Any]) -> bool:
    """True when the bias scale is exactly the input scale times the weight scale, rounded once."""
    with np.errstate(over="ignore", under="ignore"):
        return bool(np.array_equal((xs * s64).astype(dtype), bs64.astype(dtype)))
