"""Shape inference for the matcher, on a light copy of the model; the model itself is never changed.

Several folds need the rank of a value (a MatMul's BN channel is its last axis only at rank 2) or a
static shape (a Reshape that provably flattens). Exporters often leave intermediate values without
``value_info``; :func:`infer_types` runs ``onnx.shape_inference`` to know them anyway:

* on a *light* copy: every field of the model but the weights -- an initializer larger than
  :data:`_SMALL_ELEMENTS` values (or stored in an external file) becomes a graph input of its type and
  shape, which is all inference reads of it; small ones (shape vectors, axes) keep their values so that
  data propagation sees them. No raw weight bytes are copied or serialised;
* without the declared ``value_info`` and with the graph outputs' shapes dropped (their element types
  kept): a wrong declaration (a rank-3 product declared rank 2) would otherwise make inference stop at
  the conflict, or be taken for the truth. Declared and inferred types are both kept, and a fold that
  depends on a rank checks that every known one agrees (:func:`bnfold.onnx.plan.rank2_or_skip`);
* lazily (:class:`LazyTypes`): only when the matcher asks for a type the file does not declare;
* inference failing for any reason (an unknown op, a type error) only means nothing is inferred: the
  fold goes on with the declared types, never fails because of it.

The result is ``{value name: ValueType}`` for the main graph and every subgraph (value names are unique
across scopes). Nothing is written back: the folded model keeps its value_info as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx
from google.protobuf.message import Message
from onnx import GraphProto, ModelProto, TensorProto

from .graph import ValueType, all_graphs, value_info_type

__all__ = ["infer_types", "LazyTypes", "copy_fields"]

log = logging.getLogger(__name__)

_SMALL_ELEMENTS = 1024
"""Initializers up to this many values keep their values in the light copy (shape vectors, axes)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def copy_fields(src: Message, dst: Message, skip: frozenset[str] | set[str]) -> None:
    """Copy every set field of ``src`` but those in ``skip`` into ``dst`` (a message of its type).

    Walks the schema rather than ``ListFields``, which would read (copy) the skipped fields too. A
    string that is not valid UTF-8 (protobuf gives it as bytes; onnx accepts such names) is merged in
    as its wire encoding: a setter would try to decode it.
    """
    for fd in src.DESCRIPTOR.fields:
        name = fd.name
        if name in skip:
            continue
        if fd.is_repeated:
            value = getattr(src, name)
            if len(value):
                getattr(dst, name).extend(value)
        elif src.HasField(name):  # onnx.proto is proto2: every singular field has presence
            if fd.type == fd.TYPE_MESSAGE:
                getattr(dst, name).CopyFrom(getattr(src, name))
            else:
                value = getattr(src, name)
                if isinstance(value, bytes) and fd.type == fd.TYPE_STRING:
                    dst.MergeFromString(_varint((fd.number << 3) | 2) + _varint(len(value)) + value)
                else:
                    setattr(dst, name, value)


def _is_small(t: TensorProto) -> bool:
    if t.data_location == TensorProto.EXTERNAL:
        return False
    n = 1
    for d in t.dims:
        n *= int(d)
    return n <= _SMALL_ELEMENTS


def _light_model(model: ModelProto) -> ModelProto:
    """The model without its weights, declared value_info, or output shapes (see the module docstring)."""
    light = ModelProto()
    copy_fields(model, light, {"graph"})
    src, g = model.graph, light.graph
    copy_fields(src, g, {"initializer", "value_info", "output", "sparse_initializer"})
    declared = {v.name for v in src.input}
    for t in src.initializer:
        if _is_small(t):
            g.initializer.append(t)
        elif t.name not in declared:
            vi = g.input.add()
            vi.name = t.name
            tt = vi.type.tensor_type
            tt.elem_type = t.data_type
            shape = tt.shape
            for d in t.dims:
                shape.dim.add().dim_value = int(d)
    for o in src.output:
        vo = g.output.add()
        vo.name = o.name
        if o.type.WhichOneof("value") == "tensor_type":
            vo.type.tensor_type.elem_type = o.type.tensor_type.elem_type
    return light


def infer_types(model: ModelProto) -> dict[str, ValueType]:
    """Inferred element types and shapes of the model's values (empty when inference fails)."""
    try:
        light = _light_model(model)
        inferred = onnx.shape_inference.infer_shapes(
            light, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as e:  # inference is a help, never a reason to fail a fold
        log.debug("shape inference failed: %s", e)
        return {}
    out: dict[str, ValueType] = {}
    for g in all_graphs(inferred.graph):
        _collect(g, out)
    return out


class LazyTypes:
    """:func:`infer_types` of a model, run the first time a type is asked for (most folds -- Conv -> BN
    -- never ask: their models pay nothing)."""

    def __init__(self, model: ModelProto | None = None) -> None:
        self._model = model
        self._types: dict[str, ValueType] | None = None if model is not None else {}

    def get(self, name: str, default: ValueType | None = None) -> ValueType | None:
        """The inferred type of ``name``, or ``default``."""
        if self._types is None:
            assert self._model is not None
            self._types = infer_types(self._model)
            self._model = None
        return self._types.get(name, default)

    def prime_if_needed(self, model: ModelProto, affine: bool) -> None:
        """Infer now if the matcher may ask later: before an in-place fold starts editing ``model``
        (mid-pass its graph is not one inference can read). The matcher asks for types around the
        ops in :data:`_ASKS` and for affine replacements, for a BN; a model without one is not
        inferred (a lazy inference that fails mid-pass only means less is known: refusals)."""
        if self._types is None:
            ops = {n.op_type for g in all_graphs(model.graph) for n in g.node}
            if "BatchNormalization" in ops and (affine or ops & _ASKS):
                self.get("")


_ASKS = frozenset({"MatMul", "Reshape", "Shape", "Size", "CastLike"})


def _collect(g: GraphProto, out: dict[str, ValueType]) -> None:
    for coll in (g.value_info, g.output, g.input):
        vi: Any
        for vi in coll:
            vt = value_info_type(vi)
            if vt is not None and vt.shape is not None and vi.name not in out:
                out[vi.name] = vt
