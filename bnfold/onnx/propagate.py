"""Scale propagation: split a BatchNormalization that no exact fold removed into its scale and its shift.

A BN left after the folds is ``y = a * x + b`` per channel (``a = gamma / sqrt(var + eps)``,
``b = beta - mean * a``, float64). This pass follows ``y`` forward, through nodes that each read the
previous tensor alone, and moves the BN's parts with exact identities (per channel ``c``):

* *full* nodes commute with the whole affine: ``MaxPool`` / ``GlobalMaxPool`` (``a >= 0``; max pads with
  -inf and a non-decreasing map commutes with max), ``GlobalAveragePool``, ``AveragePool`` whose divisor
  counts only real elements (``count_include_pad=0``, or no padding and no ceil mode), ``Flatten``
  (``axis=1``: channel ``c`` becomes a block of features), a ``Reshape`` to a constant 2-D shape that is
  that flatten (the input's non-batch dimensions static), ``Identity``;
* *scale-only* nodes commute with a per-channel scale but not with a shift: ``Relu`` and ``LeakyRelu``
  (``a >= 0``: ``relu(a*z) = a*relu(z)``), ``Pad`` with constant zeros off the batch and channel axes and an
  ``AveragePool`` that counts padded zeros (``pad0(a*z) = a*pad0(z)``);
* the walk ends at a *layer* reading the tensor as its data input: ``Conv`` (any padding, group-aware),
  ``Gemm`` (``transA=0``) or ``MatMul`` (2-D data): the scale multiplies the layer's input channels.

The shift crosses full nodes unchanged. Where it cannot go further (before the first scale-only node,
or before a layer that pads, or a ``MatMul``) it becomes ONE per-channel ``Add`` of ``b / a`` on the
tensor at that point, ``a*z + b = a*(z + b/a)``, which needs ``a != 0`` wherever ``b != 0``; when it
reaches a layer that does not pad it goes into the layer's bias (``W (a z + b) = (W a) z + W b``).

The shift never moves back into a producer's bias here: a producer that could take it (a layer, or a
sum of layers, read only by the BN) has already absorbed the whole BN in the exact folds.

A BN is propagated only when every channel's scale can move; otherwise (a negative scale before a
Relu / LeakyRelu / MaxPool, a zero scale with a non-zero shift where the shift must stop) the whole BN
is kept with its verdict, whose detail says how many channels blocked it. No approximation is made:
all values are computed in float64 and cast once to the layer's dtype; a result that is not finite
refuses the BN. Only the main graph is handled. This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from bnfold.fold_math.subnormal import flush_written
from bnfold.records import Direction, Site, Skip, SkipReason, Verdict

from .graph import GraphIndex, attr, is_bn, read_lazy_tensor, text
from .rewrite import Names

__all__ = ["propagate_graph", "ELIGIBLE"]

ELIGIBLE = frozenset(
    {
        SkipReason.NO_PRODUCER,
        SkipReason.OTHER_CONSUMERS,
        SkipReason.GRAPH_OUTPUT,
        SkipReason.PADDING,
        SkipReason.UNFOLDABLE_BRANCH,
        SkipReason.UNSUPPORTED_LAYER,
    }
)
"""Skip reasons of the BNs this pass tries (never training mode, verification, non-constant, ...)."""

_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}
_MAX_CHAIN = 32

Arr = np.ndarray[Any, Any]


@dataclass(slots=True)
class _Plan:
    bn: int
    x: str
    chain: list[int]
    """Node indices from the BN's consumer up to, not including, the layer."""
    layer: int
    a: Arr
    b: Arr
    shift_at: int | None = None
    """Position in ``chain + [layer]`` before which the Add of the shift goes (None: no Add)."""
    shift: Arr | None = None
    """The Add's constant (already shaped)."""
    weight: Arr | None = None
    bias: Arr | None = None
    bias_slot: int = 2
    steps: list[str] = field(default_factory=list)


class _Refuse(Exception):
    pass


def _static(index: GraphIndex, name: str) -> Arr:
    if not name or name not in index.initializers or index.is_overridable(name):
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


def _positive(a: Arr, what: str) -> None:
    bad = int((a < 0).sum())
    if bad:
        raise _Refuse(f"{bad} of {a.size} channels have a negative scale before {what}")


def _rank_of(index: GraphIndex, n: NodeProto, opset: int) -> int | None:
    if n.op_type in ("MaxPool", "AveragePool"):
        k = _ints(n, "kernel_shape", opset)
        return len(k) + 2 if k else None
    return None


def _plan_bn(index: GraphIndex, i: int, opset: int) -> _Plan:
    bn = index.nodes[i]
    if index.ir_version < 4:
        raise _Refuse("IR version below 4 (initializers are graph inputs)")
    a, b = _bn_affine(index, bn, opset)
    C = a.size
    plan = _Plan(bn=i, x=bn.input[0], chain=[], layer=-1, a=a, b=b)
    cur = bn.output[0]
    flattened = False
    shift_live = bool((b != 0).any())
    ranks: set[int] = set(index.ranks(bn.input[0]))

    def stop_shift(pos: int, before: str) -> None:
        nonlocal shift_live
        if not shift_live:
            return
        blocked = int(((a == 0) & (b != 0)).sum())
        if blocked:
            raise _Refuse(f"{blocked} of {C} channels have a zero scale and a non-zero shift before {before}")
        plan.shift_at = pos
        shift_live = False

    for _ in range(_MAX_CHAIN):
        j = index.single_consumer(cur)
        if j is None:
            raise _Refuse(f"'{cur}' is read by {index.n_uses(cur)} readers (or is a graph output)")
        n = index.nodes[j]
        op = n.op_type if n.domain in ("", "ai.onnx") else ""
        if op in ("Conv", "Gemm", "MatMul") and n.input and n.input[0] == cur:
            plan.layer = j
            break
        if not n.output or len([o for o in n.output if o]) != 1 or n.input[0] != cur:
            raise _Refuse(f"{text(op or n.op_type)} '{index.label(j)}' cannot carry the scale")
        pos = len(plan.chain)
        label = f"{op} '{index.label(j)}'"
        if op in ("Relu", "LeakyRelu"):
            _positive(a, label)
            stop_shift(pos, label)
        elif op in ("MaxPool", "GlobalMaxPool") and not flattened:
            _positive(a, label)
            r = _rank_of(index, n, opset)
            if r is not None:
                ranks.add(r)
        elif op == "GlobalAveragePool" and not flattened:
            pass
        elif op == "AveragePool" and not flattened:
            r = _rank_of(index, n, opset)
            if r is not None:
                ranks.add(r)
            counts_pad = int(attr(n, "count_include_pad", 0, opset)) != 0
            if counts_pad and (_pool_pads(n, opset) or int(attr(n, "ceil_mode", 0, opset))):
                stop_shift(pos, label)
        elif op == "Identity":
            pass
        elif op == "Flatten" and not flattened:
            if int(attr(n, "axis", 1, opset)) != 1:
                raise _Refuse(f"{label} does not flatten from the channel axis")
            flattened = True
        elif op == "Reshape" and not flattened:
            _check_flattening_reshape(index, j, opset)
            flattened = True
        elif op == "Pad" and not flattened:
            _check_pad(index, j, opset, ranks)
            stop_shift(pos, label)
        else:
            raise _Refuse(f"{text(n.op_type)} '{index.label(j)}' cannot carry the scale")
        plan.chain.append(j)
        plan.steps.append(op)
        cur = n.output[0]
    else:
        raise _Refuse("the chain is too long")

    layer = index.nodes[plan.layer]
    op = layer.op_type
    pos = len(plan.chain)
    w = _static(index, layer.input[1] if len(layer.input) > 1 else "")
    if w.dtype.type not in _FLOATS.values():
        raise _Refuse(f"the weight of '{index.label(plan.layer)}' is not floating point")
    w64 = w.astype(np.float64)
    bias_add: Arr | None = None
    if op == "Conv":
        if flattened:
            raise _Refuse("a Conv after Flatten")
        g = int(attr(layer, "group", 1, opset))
        if w.ndim < 3 or w.shape[1] * g != C or w.shape[0] % g:
            raise _Refuse(f"Conv '{index.label(plan.layer)}' does not read {C} channels")
        ranks.add(w.ndim)
        M, Cg = w.shape[0], w.shape[1]
        wg = w64.reshape((g, M // g, Cg) + w.shape[2:])
        ag = a.reshape((g, 1, Cg) + (1,) * (w.ndim - 2))
        plan.weight = (wg * ag).reshape(w.shape)
        pads = not (
            text(attr(layer, "auto_pad", "NOTSET", opset)) in ("NOTSET", "VALID")
            and not any(_ints(layer, "pads", opset))
        )
        if shift_live and not pads:
            bg = b.reshape((g, 1, Cg) + (1,) * (w.ndim - 2))
            bias_add = (wg * bg).reshape(w.shape).reshape(M, -1).sum(axis=1)
        elif shift_live:
            stop_shift(pos, f"Conv '{index.label(plan.layer)}' (it pads with zeros)")
    else:  # Gemm, MatMul
        if w.ndim != 2:
            raise _Refuse(f"{op} '{index.label(plan.layer)}' has a weight of rank {w.ndim}")
        trans_b = op == "Gemm" and int(attr(layer, "transB", 0, opset)) != 0
        if op == "Gemm" and int(attr(layer, "transA", 0, opset)) != 0:
            raise _Refuse(f"Gemm '{index.label(plan.layer)}' has transA=1")
        if op == "MatMul" and not flattened and ranks != {2}:
            raise _Refuse(f"MatMul '{index.label(plan.layer)}' may not contract the channel axis")
        if not flattened:
            ranks.add(2)
        K = w.shape[1] if trans_b else w.shape[0]
        if K % C or (not flattened and K != C):
            raise _Refuse(f"{op} '{index.label(plan.layer)}' does not read {C} channels")
        rep = K // C
        af, bf = np.repeat(a, rep), np.repeat(b, rep)
        plan.a, plan.b = af, bf
        plan.weight = w64 * (af[None, :] if trans_b else af[:, None])
        beta = float(attr(layer, "beta", 1.0, opset)) if op == "Gemm" else 0.0
        if shift_live and op == "Gemm" and beta != 0:
            alpha = float(attr(layer, "alpha", 1.0, opset))
            bias_add = alpha * (w64 @ bf if trans_b else bf @ w64) / beta
        elif shift_live:
            stop_shift(pos, f"{op} '{index.label(plan.layer)}'")
    dtype = w.dtype
    if bias_add is not None:
        old = layer.input[2] if len(layer.input) > 2 and layer.input[2] else ""
        base = _static(index, old).astype(np.float64) if old else np.zeros(bias_add.shape)
        if old and _static(index, old).dtype != dtype:
            raise _Refuse("the bias dtype differs from the weight's")
        plan.bias = base + bias_add
    if plan.shift_at is not None:
        s = np.where(a == 0, 0.0, b / np.where(a == 0, 1.0, a))  # a == 0 only where b == 0 here
        if "Flatten" in plan.steps[: plan.shift_at]:
            s = np.repeat(s, plan.a.size // C)
        else:
            if len(ranks) != 1:
                raise _Refuse("the rank of the BN's input is not known")
            s = s.reshape((C,) + (1,) * (next(iter(ranks)) - 2))
        plan.shift = s
    for v in (plan.weight, plan.bias, plan.shift):
        if v is not None and not np.isfinite(v.astype(dtype)).all():
            raise _Refuse(f"a propagated value would not be finite in {dtype}")
    return plan


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


def _check_pad(index: GraphIndex, j: int, opset: int, ranks: set[int]) -> None:
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
    if r < 2 or len(pads) != 2 * r or pads[0] or pads[1] or pads[r] or pads[r + 1]:
        raise _Refuse(f"{label} pads the batch or channel axis")
    ranks.add(r)


def _describe(index: GraphIndex, p: _Plan) -> str:
    layer = index.nodes[p.layer]
    through = ", ".join(index.nodes[j].op_type for j in p.chain) or "nothing"
    where = f"{layer.op_type} '{index.label(p.layer)}'"
    if p.bias is not None:
        shift = f"shift into the bias of {where}"
    elif p.shift is not None:
        at = (p.chain + [p.layer])[p.shift_at or 0]
        shift = f"shift as one Add before {index.nodes[at].op_type} '{index.label(at)}'"
    else:
        shift = "no shift"
    return f"scale into the input channels of {where} through {through}; {shift}"


def propagate_graph(
    graph: GraphProto,
    index_of: Callable[[], GraphIndex],
    opset: int,
    names: Names,
    labels: dict[str, str],
    final: dict[str, Verdict],
    flush: bool = False,
) -> tuple[set[str], int]:
    """Propagate each BN of ``graph`` whose verdict is a :data:`ELIGIBLE` skip; return the names of
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
        inserts: dict[int, NodeProto] = {}
        for i, n in enumerate(index.nodes):
            if not is_bn(n) or not n.output or n.output[0] in tried:
                continue
            key = n.output[0]
            prev = final.get(key)
            if not isinstance(prev, Skip) or prev.reason not in ELIGIBLE:
                continue
            try:
                plan = _plan_bn(index, i, opset)
            except _Refuse as e:
                tried.add(key)
                if "channels" in str(e):  # the verdict says how many channels blocked it
                    final[key] = Skip(prev.bn, prev.reason, f"{prev.detail}; not propagated: {e}")
                continue
            nodes = {i, plan.layer, *plan.chain}
            if nodes & touched:
                continue
            touched |= nodes
            tried.add(key)
            final[key] = Site(
                labels.get(key, index.label(i)),
                index.label(plan.layer),
                index.nodes[plan.layer].op_type,
                Direction.PROPAGATED,
                _describe(index, plan),
                "scale-propagation",
            )
            dead, add = _apply(graph, index, plan, names, store)
            candidates |= dead
            removed.add(i)
            if add is not None:
                inserts[add[0]] = add[1]
        if not removed:
            return candidates, flushed[0]
        new: list[NodeProto] = []
        for k, n in enumerate(index.nodes):
            if k in inserts:
                new.append(inserts[k])
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
) -> tuple[set[str], tuple[int, NodeProto] | None]:
    """Edit the nodes of ``p`` in place and store its tensors; return the initializers it may leave
    unread and the Add of the shift with the index of the node it goes before (the caller inserts it)."""
    bn = index.nodes[p.bn]
    layer = index.nodes[p.layer]
    dtype = _static(index, layer.input[1]).dtype
    dead = {v for v in bn.input[1:] if v}
    # The first reader of the BN's output reads its input instead.
    first = index.nodes[(p.chain + [p.layer])[0]]
    first.input[0] = p.x
    w_name = names.fresh(f"{layer.input[1]}_propagated")
    dead.add(layer.input[1])
    if p.weight is None:  # pragma: no cover - every plan scales a weight
        raise ValueError("a propagation plan without a weight")
    store(p.weight.astype(dtype), w_name)
    layer.input[1] = w_name
    if p.bias is not None:
        b_name = names.fresh(f"{text(layer.name) or 'bias'}_propagated_bias")
        store(p.bias.astype(dtype), b_name)
        if len(layer.input) > 2:  # a bias, or an empty name for an absent one
            if layer.input[2]:
                dead.add(layer.input[2])
            layer.input[2] = b_name
        else:
            layer.input.append(b_name)
    add: tuple[int, NodeProto] | None = None
    if p.shift is not None and p.shift_at is not None:
        before = (p.chain + [p.layer])[p.shift_at]
        target = index.nodes[before]
        s_name = names.fresh(f"{text(bn.name) or 'bn'}_shift")
        out = names.fresh(f"{text(bn.name) or 'bn'}_shifted")
        store(p.shift.astype(dtype), s_name)
        node = helper.make_node(
            "Add", [target.input[0], s_name], [out], name=names.fresh(f"{text(bn.name) or 'bn'}_shift_add")
        )
        target.input[0] = out
        add = (before, node)
    return dead, add
