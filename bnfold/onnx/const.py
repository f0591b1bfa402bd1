"""Values that are constant in an ONNX graph, evaluated once with NumPy.

A value is constant when it is

1. an initializer (that is not also a graph input a user could feed, IR >= 4),
2. the output of a ``Constant`` node,
3. the output of a small pure node (Shape, Expand, CastLike, Cast, Reshape, Unsqueeze, Concat, ...)
   all of whose inputs are constant -- or, for ``Shape``/``Size``, whose input has a fully static
   declared shape, and for ``CastLike``, whose second input has a declared element type. This is how
   ``torch.onnx.export(..., dynamo=True, optimize=False)`` builds a missing conv bias at run time
   (``Expand(CastLike(0, input), Shape(weight))``);
4. a constant of an enclosing graph (for If/Loop/Scan bodies).

A value produced by ``DequantizeLinear`` is reported as quantized, and any other node makes the value
depend on model inputs. Only the tensors asked for are converted to NumPy (the matcher asks for the
weights and BN parameters it folds, nothing else).

Memory bound: every value a node computes is kept (one evaluation per value), so what an evaluation
allocates is bounded in *bytes*, in total, by one :class:`ConstBudget` shared by an evaluator and the
evaluators of its subgraphs (an evaluator's bytes return to the budget when it and its cache are
freed, as a fold does between passes): :data:`CONST_BUDGET_BYTES` plus twice the bytes of the model's own
initializers (a float16 weight cast to float32 at run time fits). Each result's size is known from the
input shapes and dtypes *before* NumPy allocates it, and charged then (float64 and complex128 count 8
and 16 bytes an element); views (Reshape, Transpose, Slice, (Un)Squeeze, Identity) cost nothing. A
value that would pass the budget is not a constant: the BN that needs it is left with the reason, and
every other BN of a valid model is still folded (a typed error would refuse the whole model for one
absurd constant). A 600-byte model can therefore not make ``inspect`` or ``fold`` allocate gigabytes.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import NodeProto, TensorProto, helper, numpy_helper

from bnfold.fold_math.cast import is_floating
from bnfold.io.stream import tensor_nbytes
from bnfold.records import Skip, SkipReason

from .graph import GraphIndex, name_of, read_lazy_tensor

__all__ = [
    "CONST_BUDGET_BYTES",
    "ConstBudget",
    "ConstEvaluator",
    "Resolved",
    "PURE_OPS",
    "np_dtype",
    "is_float",
    "resolve_weight",
    "optional_input",
    "weight_and_bias",
]

Array = npt.NDArray[Any]
Resolved = tuple[Array | None, SkipReason | None, str]
"""``(value, None, "")`` for a constant, ``(None, reason, detail)`` otherwise."""


def np_dtype(elem_type: int) -> np.dtype[Any]:
    """NumPy dtype of an ONNX element type (bfloat16 as ``ml_dtypes.bfloat16``)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _attrs(node: NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const_node(node: NodeProto, a: dict[str, Any]) -> Array:
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    raise ValueError("unsupported Constant attribute")


def _fits(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` if a result of that shape may be allocated; checked *before* allocating it.

    A 1 KB model can ask for ``Expand(1.0, [1.5e9])``: the result's size is known from the shapes
    alone, so it is refused here instead of after NumPy allocated gigabytes.
    """
    if math.prod(max(int(d), 0) for d in shape) > _MAX_ELEMENTS:
        raise _NotConstant(
            SkipReason.NON_CONSTANT, f"a constant of shape {list(shape)} is too large to evaluate"
        )
    return shape


def _nbytes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return math.prod(max(int(d), 0) for d in shape) * max(int(dtype.itemsize), 1)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


class ConstBudget:
    """Bytes an evaluation may still allocate (see the module docstring); shared along subgraphs.

    Attributes:
        limit: the bound, in bytes.
        used: bytes charged so far.
    """

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0

    @classmethod
    def for_graph(cls, index: GraphIndex) -> ConstBudget:
        """:data:`CONST_BUDGET_BYTES` plus twice the bytes the graph's initializers hold."""
        return cls(CONST_BUDGET_BYTES + 2 * sum(_held_bytes(index.tensor(n)) for n in index.initializers))

    def release(self, held: list[int]) -> None:
        """Give back the bytes an evaluator held (called when it is freed: its cache goes with it)."""
        self.used -= held[0]
        held[0] = 0

    def charge(self, shape: tuple[int, ...], dtype: np.dtype[Any], what: str) -> int:
        """Account for a result of ``shape`` and ``dtype`` before it is allocated; refuse past the limit."""
        _fits(shape)
        n = _nbytes(shape, dtype)
        if self.used + n > self.limit:
            raise _NotConstant(
                SkipReason.NON_CONSTANT,
                f"{what} would need {_mib(n)} more, past the constant evaluator's budget of {_mib(self.limit)} "
                f"for this model ({_mib(self.used)} used)",
            )
        self.used += n
        return n


def _held_bytes(t: TensorProto) -> int:
    """Bytes a tensor's values take, from its dims and type (:func:`bnfold.io.stream.tensor_nbytes`:
    reading ``raw_data`` would copy every weight, 50 ms a fold on ResNet-50). A tensor whose data does
    not fill its dims is refused before a fold by :func:`bnfold.io.check_model_data`; external data
    counts its stated length."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if info.get("length", "").isdigit():
            return int(info["length"])
    return tensor_nbytes(t)


def _expand(x: Array, out: tuple[int, ...]) -> Array:
    return np.broadcast_to(x, out).copy()


def _reshape(x: Array, shape: Array, allowzero: int) -> Array:
    s = [int(d) for d in shape]
    if not allowzero:
        s = [x.shape[i] if d == 0 else d for i, d in enumerate(s)]
    return x.reshape(s)


def _unsqueeze(x: Array, axes: list[int]) -> Array:
    r = x.ndim + len(axes)
    for ax in sorted(a % r for a in axes):
        x = np.expand_dims(x, ax)
    return x


def _squeeze(x: Array, axes: list[int] | None) -> Array:
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _slice(x: Array, starts: Array, ends: Array, axes: Array | None, steps: Array | None) -> Array:
    sl = [slice(None)] * x.ndim
    ax = list(range(len(starts))) if axes is None else [int(a) % x.ndim for a in axes]
    st = [1] * len(starts) if steps is None else [int(s) for s in steps]
    for a, b, e, s in zip(ax, starts, ends, st):
        sl[a] = slice(int(b), int(e), s)
    return x[tuple(sl)]


_BINARY: dict[str, Callable[[Array, Array], Array]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": lambda a, b: (a // b) if np.issubdtype(a.dtype, np.integer) else np.divide(a, b),
    "Pow": lambda a, b: np.power(a, b).astype(a.dtype),
}
_TO_FLOAT = frozenset({"Sqrt", "Reciprocal"})  # an integer input gives a float result
_UNARY: dict[str, Callable[[Array], Array]] = {
    "Identity": lambda x: x,
    "Neg": np.negative,
    "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal,
    "Abs": np.abs,
}
PURE_OPS = frozenset(
    {
        "Constant",
        "Shape",
        "Size",
        "Cast",
        "CastLike",
        "Expand",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Gather",
        "Transpose",
        "ConstantOfShape",
        "Slice",
        "Flatten",
        *_BINARY,
        *_UNARY,
    }
)
"""Ops this module evaluates; a dead node of these kinds can be removed without changing the model."""

_MAX_ELEMENTS = 1 << 28
_CACHE_LIMIT = 1 << 14  # initializers above this many elements are converted again, not cached
CONST_BUDGET_BYTES = 64 << 20
"""Bytes computed constants may take beyond twice the model's own data (64 MiB: far more than the
biases and shapes exporters compute at run time)."""


class ConstEvaluator:
    """Resolve values of one graph to constants, memoised (one evaluation per value)."""

    def __init__(
        self,
        index: GraphIndex,
        opset: int,
        outer: ConstEvaluator | None = None,
        budget: ConstBudget | None = None,
    ) -> None:
        self.index = index
        self.opset = opset
        self.outer = outer
        self._cache: dict[str, Resolved] = {}
        if budget is None:  # a subgraph shares its enclosing graph's budget
            budget = outer.budget if outer is not None else ConstBudget.for_graph(_root(index))
        assert budget is not None
        self.budget: ConstBudget = budget
        # What this evaluator's cache holds goes back to the budget when it is freed (a fold builds a
        # new evaluator per pass): the budget bounds the bytes alive at once, over the whole evaluation.
        self._held = [0]
        weakref.finalize(self, budget.release, self._held)

    # ---- public --------------------------------------------------------------------------------
    def resolve(self, name: str) -> Resolved:
        """The constant value of ``name``, or why it is not constant."""
        hit = self._cache.get(name)
        if hit is None:
            hit = self._resolve(name)
            v = hit[0]
            # Large initializers are not kept: converting again is cheap, holding every weight of the
            # model in a cache would double the memory of a fold.
            if v is None or v.size <= _CACHE_LIMIT or name not in self.index.initializers:
                self._cache[name] = hit
        return hit

    # ---- internals -----------------------------------------------------------------------------
    def _resolve(self, name: str) -> Resolved:
        idx = self.index
        if not name:
            return None, SkipReason.NON_CONSTANT, "missing input"
        if name in idx.shadowed:
            return (
                None,
                SkipReason.IN_SUBGRAPH,
                f"'{name}' is defined both in this subgraph and in an enclosing graph",
            )
        if name in idx.initializers:
            if idx.is_overridable(name):
                return None, SkipReason.NON_CONSTANT, f"'{name}' is an initializer that is also a graph input"
            t = idx.tensor(name)  # a placeholder copy reads the original's bytes
            if t.data_location == TensorProto.EXTERNAL and not t.raw_data:
                lazy = read_lazy_tensor(t)  # left in its file by a lazy load
                if lazy is None:
                    return None, SkipReason.NON_CONSTANT, f"external data of '{name}' is not loaded"
                return lazy, None, ""
            return numpy_helper.to_array(t), None, ""
        p = idx.producer.get(name)
        if p is None:
            if name in idx.graph_inputs:
                return None, SkipReason.NON_CONSTANT, f"'{name}' is a graph input"
            if self.outer is not None:
                return self.outer.resolve(name)
            return None, SkipReason.NON_CONSTANT, f"'{name}' has no producer"
        node = idx.nodes[p]
        if node.op_type in ("DequantizeLinear", "QLinearConv", "DynamicQuantizeLinear"):
            return None, SkipReason.QUANTIZED, f"'{name}' comes from {node.op_type} '{name_of(node)}'"
        if node.domain not in ("", "ai.onnx") or node.op_type not in PURE_OPS:
            return (
                None,
                SkipReason.NON_CONSTANT,
                f"'{name}' is computed by {node.op_type} '{name_of(node)}' at run time",
            )
        try:
            out = self._eval(node)
        except _NotConstant as e:
            return None, e.reason, e.detail
        except (ValueError, TypeError, IndexError, KeyError) as e:
            return None, SkipReason.NON_CONSTANT, f"cannot evaluate {node.op_type} '{name_of(node)}': {e}"
        if out.size > _MAX_ELEMENTS:
            return None, SkipReason.NON_CONSTANT, f"'{name}' is too large to evaluate"
        return out, None, ""

    def _in(self, node: NodeProto, k: int) -> Array | None:
        if k >= len(node.input) or not node.input[k]:
            return None
        v, reason, detail = self.resolve(node.input[k])
        if v is None:
            raise _NotConstant(reason or SkipReason.NON_CONSTANT, detail)
        return v

    def _req(self, node: NodeProto, k: int) -> Array:
        v = self._in(node, k)
        if v is None:
            raise ValueError(f"input {k} missing")
        return v

    def _elem_type(self, name: str) -> int:
        vt = self.index.value_type(name)
        if vt is not None and vt.elem_type:
            return vt.elem_type
        v, _, _ = self.resolve(name)
        if v is not None:
            return int(helper.np_dtype_to_tensor_dtype(v.dtype))
        raise _NotConstant(SkipReason.NON_CONSTANT, f"element type of '{name}' is unknown")

    def _shape_of(self, name: str) -> tuple[int, ...]:
        t = self.index.initializers.get(name)
        if t is not None:
            return tuple(int(d) for d in t.dims)
        vt = self.index.value_type(name)
        if vt is not None and vt.static_shape is not None:
            return vt.static_shape
        v, reason, detail = self.resolve(name)
        if v is not None:
            return tuple(v.shape)
        raise _NotConstant(reason or SkipReason.NON_CONSTANT, f"shape of '{name}' is not static ({detail})")

    def _alloc(self, node: NodeProto, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> None:
        self._held[0] += self.budget.charge(
            tuple(int(d) for d in shape), np.dtype(dtype), f"{node.op_type} '{node.name}'"
        )

    def _eval(self, node: NodeProto) -> Array:
        op = node.op_type
        a = _attrs(node)
        if op == "Constant":
            return _const_node(node, a)
        if op in ("Shape", "Size"):
            shape = self._shape_of(node.input[0])
            if op == "Size":
                return np.array(int(np.prod(shape)), dtype=np.int64)
            r = len(shape)
            start = a.get("start", 0)
            end = a.get("end", r)
            return np.array(shape[slice(start, end)], dtype=np.int64)
        if op == "CastLike":
            x, to = self._req(node, 0), np_dtype(self._elem_type(node.input[1]))
            self._alloc(node, x.shape, to)
            return x.astype(to)
        if op in _UNARY:
            x = self._req(node, 0)
            if op != "Identity":
                self._alloc(
                    node, x.shape, np.result_type(x.dtype, np.float16) if op in _TO_FLOAT else x.dtype
                )
            return np.asarray(_UNARY[op](x))
        if op in _BINARY:
            x, y = self._req(node, 0), self._req(node, 1)
            shape = np.broadcast_shapes(x.shape, y.shape)
            self._alloc(node, shape, np.result_type(x.dtype, y.dtype))
            if op == "Pow":  # np.power's result, then its cast
                self._alloc(node, shape, x.dtype)
            return np.asarray(_BINARY[op](x, y))
        if op == "Cast":
            x, to = self._req(node, 0), np_dtype(int(a["to"]))
            self._alloc(node, x.shape, to)
            return x.astype(to)
        if op == "Expand":
            x, shape_in = self._req(node, 0), self._req(node, 1)
            out = np.broadcast_shapes(x.shape, tuple(int(d) for d in shape_in))
            self._alloc(node, out, x.dtype)
            return _expand(x, out)
        if op == "Reshape":
            x = self._req(node, 0)
            if not x.flags.c_contiguous:  # a copy
                self._alloc(node, x.shape, x.dtype)
            if "shape" in a:  # opset < 5
                return _reshape(x, np.array(a["shape"]), 0)
            return _reshape(x, self._req(node, 1), int(a.get("allowzero", 0)))
        if op == "Unsqueeze":
            axes = a["axes"] if "axes" in a else [int(v) for v in self._req(node, 1)]
            return _unsqueeze(self._req(node, 0), list(axes))
        if op == "Squeeze":
            if "axes" in a:
                return _squeeze(self._req(node, 0), list(a["axes"]))
            ax = self._in(node, 1)
            return _squeeze(self._req(node, 0), None if ax is None else [int(v) for v in ax])
        if op == "Concat":
            parts = [self._req(node, k) for k in range(len(node.input))]
            self._alloc(node, (sum(int(p.size) for p in parts),), np.result_type(*[p.dtype for p in parts]))
            return np.concatenate(parts, axis=int(a["axis"]))
        if op == "Gather":
            x, ind = self._req(node, 0), self._req(node, 1)
            g_ax = int(a.get("axis", 0)) % max(x.ndim, 1)
            self._alloc(node, (*x.shape[:g_ax], *ind.shape, *x.shape[g_ax + 1 :]), x.dtype)
            return np.take(x, ind, axis=int(a.get("axis", 0)))
        if op == "Transpose":
            return np.transpose(self._req(node, 0), a.get("perm"))
        if op == "Flatten":
            xf = self._req(node, 0)
            if not xf.flags.c_contiguous:  # a copy
                self._alloc(node, xf.shape, xf.dtype)
            axis = int(a.get("axis", 1)) % (xf.ndim + 1) if xf.ndim else 0
            return xf.reshape(int(np.prod(xf.shape[:axis])), -1)
        if op == "ConstantOfShape":
            shape = _fits(tuple(int(d) for d in self._req(node, 0)))
            val = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
            self._alloc(node, shape, val.dtype)
            return np.full(shape, val.reshape(-1)[0], dtype=val.dtype)
        if op == "Slice":
            if "starts" in a:  # opset < 10
                return _slice(
                    self._req(node, 0),
                    np.array(a["starts"]),
                    np.array(a["ends"]),
                    np.array(a["axes"]) if "axes" in a else None,
                    None,
                )
            return _slice(
                self._req(node, 0),
                self._req(node, 1),
                self._req(node, 2),
                self._in(node, 3),
                self._in(node, 4),
            )
        raise ValueError(f"no evaluator for {op}")  # pragma: no cover - PURE_OPS is the guard


def _root(index: GraphIndex) -> GraphIndex:
    while index.outer is not None:
        index = index.outer
    return index


class _NotConstant(Exception):
    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---- a layer's constant inputs, or the refusal naming why not (used by every matcher case) ----
def is_float(a: Array) -> bool:
    """True for float16/32/64 and bfloat16 arrays."""
    return is_floating(a.dtype)


def resolve_weight(ev: ConstEvaluator, node: NodeProto, slot: int, bn: str, what: str) -> Array | Skip:
    """The constant float input ``slot`` of ``node``, or the refusal naming why it is not one."""
    if slot >= len(node.input) or not node.input[slot]:
        return Skip(bn, SkipReason.UNSUPPORTED_LAYER, f"{node.op_type} '{name_of(node)}' has no {what}")
    v, reason, detail = ev.resolve(node.input[slot])
    if v is None:
        r = reason or SkipReason.NON_CONSTANT
        return Skip(bn, r, f"the {what} of {node.op_type} '{name_of(node)}' is not a constant: {detail}")
    if not is_float(v):
        return Skip(bn, SkipReason.UNSUPPORTED_DTYPE, f"the {what} of '{name_of(node)}' has dtype {v.dtype}")
    return v


def optional_input(ev: ConstEvaluator, node: NodeProto, slot: int, bn: str, what: str) -> Array | None | Skip:
    """Like :func:`resolve_weight`, but an absent input is ``None``."""
    if slot >= len(node.input) or not node.input[slot]:
        return None
    return resolve_weight(ev, node, slot, bn, what)


def weight_and_bias(
    ev: ConstEvaluator, node: NodeProto, bn: str, names: tuple[str, str] = ("weight", "bias")
) -> tuple[Array, Array | None] | Skip:
    """The constant weight (input 1) and optional bias (input 2) of a layer, or why not."""
    w = resolve_weight(ev, node, 1, bn, names[0])
    if isinstance(w, Skip):
        return w
    b = optional_input(ev, node, 2, bn, names[1])
    if isinstance(b, Skip):
        return b
    return w, b
