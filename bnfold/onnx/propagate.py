"""Scale propagation: split a BatchNormalization that no exact fold removed into its scale and its shift.

A BN left after the folds is ``y = a * x + b`` per channel (``a = gamma / sqrt(var + eps)``,
``b = beta - mean * a``, float64). This pass follows ``y`` forward, through nodes that each read the
previous tensor alone, and moves the BN's parts with exact identities (per channel ``c``):

* *full* nodes commute with the whole affine: ``MaxPool`` / ``GlobalMaxPool`` (``a >= 0``; max pads with
  -inf and a non-decreasing map commutes with max), ``GlobalAveragePool``, ``AveragePool`` whose divisor
  counts only real elements (``count_include_pad=0``, or no padding and no ceil mode), ``ReduceMean``
  over spatial axes (all of them when ``keepdims=0``: then a flatten), ``Flatten``
  (``axis=1``: channel ``c`` becomes a block of features, every ``C``-th feature when the channel is the
  last axis, or runs of features when it sits in the middle with static sizes after it), a ``Reshape``
  to a constant 2-D shape that is that flatten (the input's non-batch dimensions static), ``Transpose`` (the channel axis is followed through ``perm``), ``Identity``;
* *scale-only* nodes commute with a per-channel scale but not with a shift: ``Relu`` and ``LeakyRelu``
  (``a >= 0``: ``relu(a*z) = a*relu(z)``), ``Pad`` with constant zeros off the batch and channel axes and an
  ``AveragePool`` that counts padded zeros (``pad0(a*z) = a*pad0(z)``);
* the walk ends at a *layer* reading the tensor as its data input: ``Conv`` (any padding, group-aware;
  channel on axis 1), ``Gemm`` (``transA=0``) or ``MatMul`` (the channel is the contracted last axis):
  the scale multiplies the layer's input channels. The last tensor may fork into several such layers
  (a pre-activation block's projection shortcut and first conv): each takes the scale, and the shift
  goes into every bias, or stops before them all.

Where the shift goes (the first case that applies):

1. No scale-only node and a layer that does not pad (or a ``Gemm``): into the layer's bias
   (``W (a z + b) = (W a) z + W b``).
2. *Back into a producer's bias*: the Add the shift would need is ``x + b/a`` on the BN's input ``x``
   (full nodes commute with a shift, and ``a x + b = a (x + b/a)``). When ``x`` is made by a ``Conv`` /
   ``Gemm``, or by an ``Add`` one of whose terms is such a layer read only by that ``Add``, the layer's
   bias takes ``b/a``. Every other reader of ``x`` must then be an ``Add(x, u)`` whose ``u`` is such a
   layer read only there: its bias takes ``-b/a`` (``(x + s) + (u - s) = x + u``; exact in real
   arithmetic, in float off by the rounding of ``s``, so this is done only where every ``|a| >= 1/8``,
   i.e. ``|s| <= 8 |b|``). A reader that is a graph output, or any other op, keeps the shift out of the
   producer (the Add of case 4 stays).
3. *Through a Relu*, when it is the only scale-only node and the layer after it takes a bias:
   ``relu(a z + b) = a * max(z, -b/a) + b`` (``a > 0``; ``= 0 * z + relu(b)`` for ``a = 0``): the ``Relu``
   becomes ``Max(z, t)`` with a per-channel ``t`` and the shift goes on into the bias. The Max rounds
   nothing; ``b`` enters the bias as in any fold. One pass where the Relu was (a broadcasting Max runs
   at about 1.5x a Relu in onnxruntime; an Add before the Relu is a second pass).
4. Otherwise ONE per-channel ``Add`` of ``b / a`` before the first node that stops it
   (``a*z + b = a*(z + b/a)``, which needs ``a != 0`` wherever ``b != 0``).

*Blocked channels* (a negative scale where a Relu / LeakyRelu / MaxPool follows, a zero scale with a
non-zero shift where the shift must stop) keep their affine: a per-channel ``Mul`` (``a`` for blocked
channels, 1 for the others) and an ``Add`` (``b`` for blocked channels; ``b/a`` for the others when their
shift stops, else 0) go before the first node that blocks or stops, where only full nodes precede
them; the scale of the movable channels goes on alone. ``relu(a x + b) = |a| relu(sign(a) x + b/|a|)``
would move ``|a|`` too but still needs a per-channel multiply by ``sign(a)`` and an Add: no less work,
so it is not used. When every channel is blocked the BN is kept (nothing would move) and its verdict
says how many channels blocked it; otherwise the verdict is ``propagated`` and says how many kept their
affine.

No approximation is made: all values are computed in float64 and cast once to the layer's dtype; a
result that is not finite refuses the BN. In an If / Loop / Scan body the pass runs on the body with
the body's own initializers (a BN or layer reading a constant of an enclosing graph is refused, its
verdict kept). This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from bnfold.fold_math.propagation import ELIGIBLE, Blocked
from bnfold.fold_math.subnormal import flush_written
from bnfold.records import Direction, Site, Skip, Verdict

from .graph import GraphIndex, attr, is_bn, read_lazy_tensor, text
from .plan import enforced_rank
from .rewrite import Names

__all__ = ["propagate_graph"]


_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}
_MAX_CHAIN = 32
_MIN_COMPENSATED_SCALE = 0.125
"""Case 2 with other readers: each of them sees ``(x + s) - s``, off by the rounding of ``s = b/a``;
``|a| >= 1/8`` keeps that within 8 roundings of ``|b|`` (a realistic BN has ``|a|`` around 0.3 to 3)."""
_DEFAULT = ("", "ai.onnx")

Arr = np.ndarray[Any, Any]
Layout = int | str
"""The channel's place in a tensor of the chain: its axis, or once flattened "repeat" (channel ``c`` is
the block ``c*r .. c*r + r - 1`` of the features), "tile" (every ``C``-th feature from ``c``) or
"inner:<n>" (runs of ``n`` features, ``C * n`` apart: a channel in the middle, e.g. after a permute)."""


@dataclass(slots=True)
class _Edit:
    """Input ``slot`` of node ``node`` (appended when missing) becomes a new initializer of ``value``."""

    node: int
    slot: int
    value: Arr
    dtype: Any
    suffix: str


@dataclass(slots=True)
class _Plan:
    bn: int
    x: str
    chain: list[int]
    """Node indices from the BN's consumer up to, not including, the layer."""
    layers: list[int]
    """The layers reading the end of the chain as their data input (one, or several where it forks)."""
    edits: list[_Edit] = field(default_factory=list)
    inserts: list[tuple[int, str, Arr]] = field(default_factory=list)
    """(position in ``chain`` or ``len(chain)`` for the layers, ``Mul`` or ``Add``, constant): nodes put
    before that position (before every layer, for the last one)."""
    max_at: int | None = None
    """Position in ``chain`` of the Relu that becomes ``Max`` (case 3), with its threshold ``max_t``."""
    max_t: Arr | None = None
    touched: set[int] = field(default_factory=set)
    shift: str = "no shift"
    kept: str = ""
    dtype: Any = np.float32


class _Refuse(Exception):
    pass


class _Busy(Exception):
    """The plan reads a node another plan of this pass has edited: plan it again in the next pass."""


def _static(index: GraphIndex, name: str) -> Arr:
    if not name or name not in index.initializers or index.is_overridable(name) or name in index.shadowed:
        raise _Refuse(f"'{name}' is not a constant initializer")
    t = index.tensor(name)  # a placeholder copy reads the original's bytes
    if t.data_location == TensorProto.EXTERNAL and not t.raw_data:
        lazy = read_lazy_tensor(t)  # left in its file by a lazy load
        if lazy is None:
            raise _Refuse(f"external data of '{name}' is not loaded")
        return np.asarray(lazy)
    return np.asarray(numpy_helper.to_array(t))


def _ints(node: NodeProto, name: str, opset: int) -> list[int]:
    return [int(v) for v in attr(node, name, [], opset) or []]


def _pool_pads(node: NodeProto, opset: int) -> bool:
    """True when the pool pads (explicitly or by ``auto_pad``)."""
    ap = text(attr(node, "auto_pad", "NOTSET", opset))
    return ap not in ("NOTSET", "VALID") or any(_ints(node, "pads", opset))


def _bn_affine(index: GraphIndex, n: NodeProto, opset: int) -> tuple[Arr, Arr]:
    if len([o for o in n.output if o]) != 1 or len(n.input) != 5:
        raise _Refuse("it uses optional outputs")
    if int(attr(n, "training_mode", 0, opset)) != 0 or int(attr(n, "spatial", 1, opset)) != 1:
        raise _Refuse("training mode or spatial=0")
    p = [_static(index, v).astype(np.float64) for v in n.input[1:5]]
    if any(t.ndim != 1 or t.shape != p[0].shape for t in p):
        raise _Refuse("BN parameters are not per-channel vectors")
    eps = float(attr(n, "epsilon", 1e-5, opset))
    gamma, beta, mean, var = p
    with np.errstate(all="ignore"):
        a = gamma / np.sqrt(var + eps)
        b = beta - mean * a
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise _Refuse("its scale or shift is not finite")
    return a, b


def _rank_of(n: NodeProto, opset: int) -> int | None:
    k = _ints(n, "kernel_shape", opset)
    return len(k) + 2 if k else None


def _one_rank(ranks: set[int]) -> int:
    if len(ranks) != 1:
        raise _Refuse("the rank of the BN's input is not known")
    return next(iter(ranks))


def _over(b: Arr, a: Arr) -> Arr:
    """``b / a``, 0 where ``a == 0`` (used only where ``b == 0`` there or the channel keeps its affine)."""
    return np.where(a == 0, 0.0, b / np.where(a == 0, 1.0, a))


@dataclass(slots=True)
class _Fit:
    """How layer ``node`` takes a per-channel scale of its input (``scale_w``: its new float64 weight)
    and a per-channel shift (``bias_of``: the float64 term added to its bias, where ``takes_shift``)."""

    node: int
    where: str
    dtype: Any
    rep: int
    takes_shift: bool
    why: str
    scale_w: Callable[[Arr], Arr]
    bias_of: Callable[[Arr], Arr]


def _fit_layer(index: GraphIndex, L: int, layout: Layout, ranks: set[int], C: int, opset: int) -> _Fit:
    layer = index.nodes[L]
    op = layer.op_type
    where = f"{op} '{index.label(L)}'"
    w = _static(index, layer.input[1] if len(layer.input) > 1 else "")
    if w.dtype.type not in _FLOATS.values():
        raise _Refuse(f"the weight of '{index.label(L)}' is not floating point")
    w64 = w.astype(np.float64)
    rep = 1
    if op == "Conv":
        if layout != 1:
            raise _Refuse(f"{where} does not read the channel on axis 1")
        g = int(attr(layer, "group", 1, opset))
        if w.ndim < 3 or w.shape[1] * g != C or w.shape[0] % g:
            raise _Refuse(f"{where} does not read {C} channels")
        ranks.add(w.ndim)
        M, Cg = w.shape[0], w.shape[1]
        wg = w64.reshape((g, M // g, Cg) + w.shape[2:])

        def scale_w(v: Arr) -> Arr:
            return (wg * v.reshape((g, 1, Cg) + (1,) * (w.ndim - 2))).reshape(w.shape)

        def bias_of(v: Arr) -> Arr:
            return np.asarray(scale_w(v).reshape(M, -1).sum(axis=1))

        takes_shift = text(attr(layer, "auto_pad", "NOTSET", opset)) in ("NOTSET", "VALID") and not any(
            _ints(layer, "pads", opset)
        )
        why = f"{where} (it pads with zeros)"
    else:  # Gemm, MatMul
        if w.ndim != 2:
            raise _Refuse(f"{op} '{index.label(L)}' has a weight of rank {w.ndim}")
        trans_b = op == "Gemm" and int(attr(layer, "transB", 0, opset)) != 0
        if op == "Gemm" and int(attr(layer, "transA", 0, opset)) != 0:
            raise _Refuse(f"Gemm '{index.label(L)}' has transA=1")
        if isinstance(layout, int):
            if op == "Gemm" and (layout != 1 or not ranks <= {2}):
                raise _Refuse(f"Gemm '{index.label(L)}' does not read the channel on axis 1 of a matrix")
            if op == "MatMul" and layout != _one_rank(ranks) - 1:
                raise _Refuse(f"MatMul '{index.label(L)}' may not contract the channel axis")
            if op == "Gemm":
                ranks.add(2)
        K = w.shape[1] if trans_b else w.shape[0]
        if K % C or (isinstance(layout, int) and K != C):
            raise _Refuse(f"{op} '{index.label(L)}' does not read {C} channels")
        rep = K // C
        beta = float(attr(layer, "beta", 1.0, opset)) if op == "Gemm" else 0.0
        alpha = float(attr(layer, "alpha", 1.0, opset)) if op == "Gemm" else 1.0

        def scale_w(v: Arr) -> Arr:
            return w64 * (v[None, :] if trans_b else v[:, None])

        def bias_of(v: Arr) -> Arr:
            return alpha * (w64 @ v if trans_b else v @ w64) / beta

        takes_shift = op == "Gemm" and beta != 0
        why = where
    return _Fit(L, where, w.dtype, rep, takes_shift, why, scale_w, bias_of)


def _plan_bn(index: GraphIndex, i: int, opset: int, busy: set[int]) -> _Plan:
    bn = index.nodes[i]
    if index.ir_version < 4:
        raise _Refuse("IR version below 4 (initializers are graph inputs)")
    a, b = _bn_affine(index, bn, opset)
    C = a.size
    plan = _Plan(bn=i, x=bn.input[0], chain=[], layers=[])
    cur = bn.output[0]
    ranks: set[int] = set(index.ranks(bn.input[0]))
    layout: Layout = 1
    layouts: list[Layout] = []
    kinds: list[str] = []
    labels: list[str] = []
    sign_pos: int | None = None
    stops: list[int] = []

    def flat_mode(value: str) -> str:
        """The layout after flattening ``value`` from axis 1: "repeat" (channel on axis 1), "tile"
        (nothing but size-1 axes after the channel), else "inner:<n>" (``n``: the static size after it)."""
        if layout == 1:
            return "repeat"
        rank = _one_rank(ranks)
        if layout == rank - 1:
            return "tile"
        vt = index.value_type(value)
        dims = None if vt is None else vt.shape
        after = [] if dims is None or len(dims) != rank else list(dims[int(layout) + 1 :])
        if not after or not all(isinstance(d, int) and d > 0 for d in after):
            raise _Refuse(f"{label} flattens a tensor whose sizes after the channel axis are not known")
        inner = int(np.prod([int(d) for d in after]))  # type: ignore[arg-type]
        return "tile" if inner == 1 else f"inner:{inner}"

    for _ in range(_MAX_CHAIN):
        j = index.single_consumer(cur)
        if j is None:
            readers = _layer_readers(index, cur)
            if readers is None:
                raise _Refuse(f"'{cur}' is read by {index.n_uses(cur)} readers (or is a graph output)")
            if set(readers) & busy:
                raise _Busy
            plan.layers = readers
            break
        if j in busy:
            raise _Busy
        n = index.nodes[j]
        op = n.op_type if n.domain in _DEFAULT else ""
        if op in ("Conv", "Gemm", "MatMul") and n.input and n.input[0] == cur and cur not in n.input[1:]:
            plan.layers = [j]
            break
        if not n.output or len([o for o in n.output if o]) != 1 or n.input[0] != cur:
            raise _Refuse(f"{text(op or n.op_type)} '{index.label(j)}' cannot carry the scale")
        pos = len(plan.chain)
        label = f"{op} '{index.label(j)}'"
        layouts.append(layout)
        flat = isinstance(layout, str)
        if op in ("Relu", "LeakyRelu"):
            sign_pos = pos if sign_pos is None else sign_pos
            stops.append(pos)
        elif op in ("MaxPool", "GlobalMaxPool") and layout == 1:
            sign_pos = pos if sign_pos is None else sign_pos
            r = _rank_of(n, opset) if op == "MaxPool" else None
            if r is not None:
                ranks.add(r)
        elif op == "GlobalAveragePool" and layout == 1:
            pass
        elif op == "AveragePool" and layout == 1:
            r = _rank_of(n, opset)
            if r is not None:
                ranks.add(r)
            counts_pad = int(attr(n, "count_include_pad", 0, opset)) != 0
            if counts_pad and (_pool_pads(n, opset) or int(attr(n, "ceil_mode", 0, opset))):
                stops.append(pos)
        elif op == "Identity":
            pass
        elif op == "ReduceMean" and layout == 1:
            if _reduce_spatial(index, n, opset, _one_rank(ranks), label):  # keepdims=0: (N, C)
                layout = "repeat"
        elif op == "Flatten" and not flat:
            if int(attr(n, "axis", 1, opset)) != 1:
                raise _Refuse(f"{label} does not flatten from the channel axis")
            layout = flat_mode(cur)
        elif op == "Reshape" and not flat:
            _check_flattening_reshape(index, j, opset)
            layout = flat_mode(cur)
        elif op == "Pad" and not flat:
            _check_pad(index, j, opset, ranks, int(layout))
            stops.append(pos)
        elif op == "Transpose" and not flat:
            perm = _ints(n, "perm", opset) or list(range(_one_rank(ranks)))[::-1]
            if sorted(perm) != list(range(len(perm))) or int(layout) >= len(perm):
                raise _Refuse(f"{label} has an invalid perm")
            ranks.add(len(perm))
            layout = perm.index(int(layout))
        else:
            raise _Refuse(f"{text(n.op_type)} '{index.label(j)}' cannot carry the scale")
        plan.chain.append(j)
        kinds.append(op)
        labels.append(label)
        cur = n.output[0]
    else:
        raise _Refuse("the chain is too long")
    layouts.append(layout)

    # ---- the layers: how each takes a per-channel scale of its input, and a shift into its bias -----
    if isinstance(layout, int) and any(index.nodes[L].op_type == "MatMul" for L in plan.layers):
        # A MatMul takes any rank: which axis it contracts rests on a rank the runtime enforces, not on
        # a value_info entry (never checked by onnxruntime).
        enforced = enforced_rank(index, plan.x)
        if enforced is None:
            raise _Refuse(f"the rank of '{plan.x}' is only declared, not enforced by the model")
        ranks.add(enforced)
    fits = [_fit_layer(index, L, layout, ranks, C, opset) for L in plan.layers]
    rep = fits[0].rep
    if any(f.rep != rep or f.dtype != fits[0].dtype for f in fits):
        raise _Refuse("the layers reading the tensor differ in width or dtype")
    plan.dtype = fits[0].dtype
    pos_layer = len(plan.chain)
    takes_shift = all(f.takes_shift for f in fits)
    why = next((f.why for f in fits if not f.takes_shift), fits[0].why)
    where = ", ".join(f.where for f in fits)

    def shaped(v: Arr, lay: Layout) -> Arr:
        if lay == "repeat":
            return np.repeat(v, rep)
        if lay == "tile":
            return np.tile(v, rep)
        if isinstance(lay, str):  # "inner:<n>": each channel a run of n features, the runs C apart
            n = int(lay.split(":")[1])
            if rep % n:
                raise _Refuse("the features do not split into the channel's runs")
            return np.tile(np.repeat(v, n), rep // n)
        return v.reshape((C,) + (1,) * (_one_rank(ranks) - 1 - int(lay)))

    if not takes_shift:
        stops.append(pos_layer)
    stop_labels = labels + [why]

    # ---- which channels keep their affine, and where the shift goes -------------------------------
    S = stops[0] if stops else None
    neg = (a < 0) if sign_pos is not None else np.zeros(C, bool)
    relu_only = S is not None and S < pos_layer and kinds[S] == "Relu" and len(stops) == 1
    use_max = relu_only and not neg.any() and opset >= 8
    zero = (a == 0) & (b != 0) if (S is not None and not use_max) else np.zeros(C, bool)
    blocked = neg | zero
    held = Blocked.of(neg, zero, labels, sign_pos, stop_labels, S)
    whole = held.whole()
    if whole is not None:
        raise _Refuse(whole)
    am = np.where(blocked, 1.0, a)
    to_bias: Arr | None = None  # the shift that reaches the layer, per channel
    plan.touched = {i, *plan.layers, *plan.chain}
    # blocked channels: one Mul and one Add where the first of them blocks (or the shift stops)
    if held.count:
        firsts = [p for p in (sign_pos if neg.any() else None, S) if p is not None]
        q = min(firsts)
        if opset < 7:
            raise _Refuse("opset below 7 (no broadcasting Mul / Add)")
        m = np.where(blocked, a, 1.0)
        if S is not None:
            t = np.where(blocked, b, _over(b, a))
            plan.shift = f"shift in that Add before {stop_labels[q]}"
        else:
            t = np.where(blocked, b, 0.0)
            to_bias = np.where(blocked, 0.0, b)
            plan.shift = f"shift into the bias of {where}"
        plan.inserts += [(q, "Mul", shaped(m, layouts[q])), (q, "Add", shaped(t, layouts[q]))]
        plan.kept = held.kept(stop_labels[q])
    elif S is None:  # Case 1: nothing stops the shift
        to_bias = b
        plan.shift = f"shift into the bias of {where}"
    else:
        s = _over(b, a)
        # Case 2; not where a zero scale meets a non-zero shift (only the Max of case 3 carries relu(b))
        zero_shift = bool(((a == 0) & (b != 0)).any())
        back = None if zero_shift else _producer_shift(index, i, plan.x, s, a, C, opset, busy)
        if back is not None:
            edits, touched, desc = back
            plan.edits += edits
            plan.touched |= touched
            plan.shift = desc
        elif use_max:  # Case 3
            plan.max_at = S
            plan.max_t = shaped(np.where(a > 0, -s, 0.0), layouts[S])
            to_bias = np.where(a > 0, b, np.maximum(b, 0.0))
            plan.shift = f"shift through {stop_labels[S]} (now a Max) into the bias of {where}"
        else:  # Case 4
            if opset < 7:
                raise _Refuse("opset below 7 (no broadcasting Add)")
            plan.inserts.append((S, "Add", shaped(s, layouts[S])))
            plan.shift = f"shift as one Add before {stop_labels[S]}"

    # ---- the layer's new weight and bias --------------------------------------------------------
    expand = (lambda v: shaped(v, layout)) if isinstance(layout, str) else (lambda v: v)
    for f in fits:
        layer = index.nodes[f.node]
        plan.edits.append(_Edit(f.node, 1, f.scale_w(expand(am)), f.dtype, "propagated"))
        if to_bias is None or not (to_bias != 0).any():
            continue
        old = layer.input[2] if len(layer.input) > 2 and layer.input[2] else ""
        add = f.bias_of(expand(to_bias))
        if old:
            base = _static(index, old)
            if base.dtype != f.dtype:
                raise _Refuse("the bias dtype differs from the weight's")
            if layer.op_type == "Gemm" and base.shape != add.shape:
                base = np.broadcast_to(base, np.broadcast_shapes(base.shape, add.shape))
            add = base.astype(np.float64) + add
        plan.edits.append(_Edit(f.node, 2, add, f.dtype, "propagated_bias"))
    for e in plan.edits:
        if not _finite_in(e.value, e.dtype):
            raise _Refuse(f"a propagated value would not be finite in {e.dtype}")
    for _, _, v in plan.inserts:
        if not _finite_in(v, plan.dtype):
            raise _Refuse(f"a propagated value would not be finite in {plan.dtype}")
    if plan.max_t is not None and not _finite_in(plan.max_t, plan.dtype):
        raise _Refuse(f"a propagated value would not be finite in {plan.dtype}")
    return plan


def _finite_in(value: Arr, dtype: Any) -> bool:
    """True when ``value`` stays finite cast to ``dtype`` (an overflow is the answer, not a warning)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(value.astype(dtype)).all())


def _layer_readers(index: GraphIndex, value: str) -> list[int] | None:
    """The readers of ``value`` when there are several and each is a Conv / Gemm / MatMul reading it as
    its data input only (the scale forks into each; a shift either goes into every bias or stops)."""
    readers = index.consumers.get(value, [])
    if value in index.graph_outputs or len(readers) < 2 or len(set(readers)) != len(readers):
        return None
    for k in readers:
        n = index.nodes[k]
        if n.domain not in _DEFAULT or n.op_type not in ("Conv", "Gemm", "MatMul"):
            return None
        if not n.input or n.input[0] != value or value in n.input[1:]:
            return None
    return sorted(readers)


def _bias_target(index: GraphIndex, j: int, C: int, rank: int, opset: int) -> tuple[Arr, Any, float] | None:
    """The bias of node ``j`` (float64, per output channel), its dtype and the factor a shift of its
    output is multiplied by to go into it, when ``j`` is a Conv / Gemm whose output has ``C`` channels
    on axis 1 of a tensor of rank ``rank``; else None."""
    n = index.nodes[j]
    if n.domain not in _DEFAULT or n.op_type not in ("Conv", "Gemm") or len(n.input) < 2:
        return None
    try:
        w = _static(index, n.input[1])
    except _Refuse:
        return None
    if w.dtype.type not in _FLOATS.values():
        return None
    factor = 1.0
    if n.op_type == "Conv":
        if w.ndim != rank or w.shape[0] != C:
            return None
    else:
        trans_b = int(attr(n, "transB", 0, opset)) != 0
        beta = float(attr(n, "beta", 1.0, opset))
        if rank != 2 or w.ndim != 2 or (w.shape[0] if trans_b else w.shape[1]) != C or beta == 0:
            return None
        factor = 1.0 / beta
    old = n.input[2] if len(n.input) > 2 and n.input[2] else ""
    if not old:
        return np.zeros(C), w.dtype, factor
    try:
        bias = _static(index, old)
    except _Refuse:
        return None
    if bias.shape != (C,) or bias.dtype != w.dtype:
        return None
    return bias.astype(np.float64), w.dtype, factor


def _producer_shift(
    index: GraphIndex, i: int, x: str, s: Arr, a: Arr, C: int, opset: int, busy: set[int]
) -> tuple[list[_Edit], set[int], str] | None:
    """Case 2 of the module docstring: the edits that add ``s`` to ``x`` through a producer's bias and
    take it back out of every other reader of ``x``; None when that is not possible. Raises
    :class:`_Busy` when a node it would read was edited by another plan of this pass."""
    ranks = index.ranks(x)
    p = index.producer.get(x)
    if p is None or len(ranks) != 1 or x in index.graph_outputs:
        return None
    near = {p, *index.consumers.get(x, [])}
    for v in [*index.nodes[p].input, *(o for k in near for o in index.nodes[k].input)]:
        near.add(index.producer.get(v, p))
    if near & busy:
        raise _Busy
    rank = next(iter(ranks))
    pn = index.nodes[p]
    target: int | None = None
    if pn.output[0] == x and _bias_target(index, p, C, rank, opset) is not None:
        target = p
    elif pn.op_type == "Add" and pn.domain in _DEFAULT and len(pn.input) == 2 and pn.input[0] != pn.input[1]:
        for u in pn.input:
            q = index.producer.get(u)
            if (
                q is not None
                and index.single_consumer(u) == p
                and index.nodes[q].output[0] == u
                and _bias_target(index, q, C, rank, opset) is not None
            ):
                target = q
                break
    if target is None:
        return None
    touched = {p, target}
    moves = [(target, 1.0)]
    readers = [k for k in index.consumers.get(x, []) if k != i]
    if readers and (np.abs(a) < _MIN_COMPENSATED_SCALE).any():
        return None
    for k in readers:
        kn = index.nodes[k]
        if (
            kn.op_type != "Add"
            or kn.domain not in _DEFAULT
            or len(kn.input) != 2
            or list(kn.input).count(x) != 1
        ):
            return None
        y = kn.input[1] if kn.input[0] == x else kn.input[0]
        q = index.producer.get(y)
        if q is None or q in touched or index.single_consumer(y) != k or index.nodes[q].output[0] != y:
            return None
        if _bias_target(index, q, C, rank, opset) is None:
            return None
        touched |= {k, q}
        moves.append((q, -1.0))
    edits = []
    for q, sign in moves:
        got = _bias_target(index, q, C, rank, opset)
        assert got is not None
        bias, dtype, factor = got
        edits.append(_Edit(q, 2, bias + sign * factor * s, dtype, "propagated_bias"))
    desc = f"shift into the bias of {index.nodes[target].op_type} '{index.label(target)}'"
    if len(moves) > 1:
        others = ", ".join(f"{index.nodes[q].op_type} '{index.label(q)}'" for q, _ in moves[1:])
        desc += f" (taken back out of the other readers of its output through the bias of {others})"
    return edits, touched, desc


def _check_flattening_reshape(index: GraphIndex, j: int, opset: int) -> None:
    """Refuse unless Reshape ``j`` is ``Flatten(axis=1)``: ``(N, C, ...) -> (N, C * prod(...))``, told by
    a constant target shape of two entries and the input's static non-batch dimensions."""
    n = index.nodes[j]
    label = f"Reshape '{index.label(j)}'"
    if len(n.input) < 2:
        raise _Refuse(f"{label} has no shape")
    shape = [int(v) for v in _static(index, n.input[1]).reshape(-1)]
    vt = index.value_type(n.input[0])
    dims = None if vt is None else vt.shape
    if len(shape) != 2 or dims is None or len(dims) < 2 or any(not isinstance(d, int) for d in dims[1:]):
        raise _Refuse(f"{label} is not known to flatten from the channel axis")
    size = 1
    for d in dims[1:]:
        size *= int(d)  # type: ignore[arg-type]
    allowzero = int(attr(n, "allowzero", 0, opset)) != 0
    batch_kept = (shape[0] == 0 and not allowzero) or (isinstance(dims[0], int) and shape[0] == dims[0])
    if not ((batch_kept and shape[1] in (size, -1)) or (shape[0] == -1 and shape[1] == size)):
        raise _Refuse(f"{label} is not known to flatten from the channel axis")


def _reduce_spatial(index: GraphIndex, n: NodeProto, opset: int, rank: int, label: str) -> bool:
    """Refuse unless ``ReduceMean`` ``n`` averages over spatial axes only (a mean commutes with a
    per-channel affine); True when it drops them all (``keepdims=0``: the result is ``(N, C)``)."""
    if opset >= 18:
        axes_in = n.input[1] if len(n.input) > 1 else ""
        axes = [int(v) for v in _static(index, axes_in).reshape(-1)] if axes_in else []
    else:
        axes = _ints(n, "axes", opset)
    axes = sorted({v + rank if v < 0 else v for v in axes})
    if not axes or axes[0] < 2 or axes[-1] >= rank:
        raise _Refuse(f"{label} does not average over spatial axes only")
    if int(attr(n, "keepdims", 1, opset)):
        return False
    if axes != list(range(2, rank)):
        raise _Refuse(f"{label} drops some spatial axes only")
    return True


def _check_pad(index: GraphIndex, j: int, opset: int, ranks: set[int], axis: int) -> None:
    n = index.nodes[j]
    label = f"Pad '{index.label(j)}'"
    if text(attr(n, "mode", "constant", opset)) != "constant":
        raise _Refuse(f"{label} is not a constant pad")
    if opset < 11:
        pads = _ints(n, "pads", opset)
        if float(attr(n, "value", 0.0, opset)) != 0.0:
            raise _Refuse(f"{label} pads with a non-zero value")
    else:
        if len(n.input) > 3 and n.input[3]:
            raise _Refuse(f"{label} has axes")
        pads = [int(v) for v in _static(index, n.input[1]).reshape(-1)]
        if len(n.input) > 2 and n.input[2] and (_static(index, n.input[2]) != 0).any():
            raise _Refuse(f"{label} pads with a non-zero value")
    r = len(pads) // 2
    if r < 2 or len(pads) != 2 * r or axis >= r or pads[0] or pads[r] or pads[axis] or pads[r + axis]:
        raise _Refuse(f"{label} pads the batch or channel axis")
    ranks.add(r)


def _describe(index: GraphIndex, p: _Plan) -> str:
    layers = ", ".join(f"{index.nodes[k].op_type} '{index.label(k)}'" for k in p.layers)
    through = ", ".join(index.nodes[j].op_type for j in p.chain) or "nothing"
    out = f"scale into the input channels of {layers} through {through}; {p.shift}"
    return f"{out}; {p.kept}" if p.kept else out


def propagate_graph(
    graph: GraphProto,
    index_of: Callable[[], GraphIndex],
    opset: int,
    names: Names,
    labels: dict[str, str],
    final: dict[str, Verdict],
    flush: bool = False,
) -> tuple[set[str], int]:
    """Propagate each BN of ``graph`` whose verdict is a :data:`~bnfold.fold_math.propagation.ELIGIBLE` skip; return the names of
    the initializers it may have left unread (for :func:`~bnfold.onnx.rewrite.remove_dead`) and the
    number of subnormal values set to zero in the tensors written (``flush``, as the folds do)."""
    candidates: set[str] = set()
    flushed = [0]

    def store(value: Arr, name: str) -> None:
        if flush:
            value, n = flush_written(value)
            flushed[0] += n
        graph.initializer.append(numpy_helper.from_array(value, name))

    tried: set[str] = set()
    while True:  # one pass per index; a plan touching a node another plan of the pass edits waits
        index = index_of()
        touched: set[int] = set()
        removed: set[int] = set()
        inserts: dict[int, list[NodeProto]] = {}
        for i, n in enumerate(index.nodes):
            if not is_bn(n) or not n.output or n.output[0] in tried:
                continue
            key = n.output[0]
            prev = final.get(key)
            if not isinstance(prev, Skip) or prev.reason not in ELIGIBLE:
                continue
            try:
                with np.errstate(all="ignore"):  # an overflow is refused by the finiteness checks
                    plan = _plan_bn(index, i, opset, touched)
            except _Busy:
                continue
            except _Refuse as e:
                tried.add(key)
                if "channels" in str(e):  # the verdict says how many channels blocked it
                    final[key] = replace(prev, detail=f"{prev.detail}; not propagated: {e}", pattern=None)
                continue
            if plan.touched & touched:
                continue
            touched |= plan.touched
            tried.add(key)
            final[key] = Site(
                labels.get(key, index.label(i)),
                index.label(plan.layers[0]),
                index.nodes[plan.layers[0]].op_type,
                Direction.PROPAGATED,
                _describe(index, plan),
                "scale-propagation",
            )
            dead, adds = _apply(graph, index, plan, names, store)
            candidates |= dead
            removed.add(i)
            for k, node in adds:
                inserts.setdefault(k, []).append(node)
        if not removed:
            return candidates, flushed[0]
        new: list[NodeProto] = []
        for k, n in enumerate(index.nodes):
            new.extend(inserts.get(k, ()))
            if k not in removed:
                c = NodeProto()
                c.CopyFrom(n)
                new.append(c)
        del graph.node[:]
        graph.node.extend(new)


def _apply(
    graph: GraphProto,
    index: GraphIndex,
    p: _Plan,
    names: Names,
    store: Callable[[Arr, str], None],
) -> tuple[set[str], list[tuple[int, NodeProto]]]:
    """Edit the nodes of ``p`` in place and store its tensors; return the initializers it may leave
    unread and the nodes to insert, each with the index of the node it goes before (the caller inserts
    them, in order)."""
    bn = index.nodes[p.bn]
    base = text(bn.name) or "bn"
    dead = {v for v in bn.input[1:] if v}
    # The first reader of the BN's output reads its input instead.
    for k in p.chain[:1] or p.layers:
        index.nodes[k].input[0] = p.x
    for e in p.edits:
        node = index.nodes[e.node]
        old = node.input[e.slot] if len(node.input) > e.slot else ""
        stem = old if e.slot == 1 else (text(node.name) or "bias")
        name = names.fresh(f"{stem}_{e.suffix}")
        store(e.value.astype(e.dtype), name)
        if old:
            dead.add(old)
        while len(node.input) < e.slot:
            node.input.append("")
        if len(node.input) > e.slot:
            node.input[e.slot] = name
        else:
            node.input.append(name)
    if p.max_at is not None and p.max_t is not None:
        relu = index.nodes[p.chain[p.max_at]]
        t_name = names.fresh(f"{base}_threshold")
        store(p.max_t.astype(p.dtype), t_name)
        relu.op_type = "Max"
        relu.input.append(t_name)
    added: list[tuple[int, NodeProto]] = []
    for pos, op, value in p.inserts:
        readers = [p.chain[pos]] if pos < len(p.chain) else p.layers
        before = min(readers)
        target = index.nodes[before]
        kind = "scale" if op == "Mul" else "shift"
        c_name = names.fresh(f"{base}_{kind}")
        out = names.fresh(f"{base}_{'scaled' if op == 'Mul' else 'shifted'}")
        store(value.astype(p.dtype), c_name)
        node = helper.make_node(
            op, [target.input[0], c_name], [out], name=names.fresh(f"{base}_{kind}_{op.lower()}")
        )
        for k in readers:
            index.nodes[k].input[0] = out
        added.append((before, node))
    return dead, added
