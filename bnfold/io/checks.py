"""Consistency checks of ONNX model data, before anything reads the weights.

Rules (:func:`check_model_data`, in every graph and subgraph): initializer names are unique; every
initializer and Constant tensor holds exactly as many values as its shape and type need (packed
sub-byte types and external tensors are checked where their bytes are read); the four parameters of a
BatchNormalization that are initializers are 1-D and of one length. ``onnx.checker`` runs on a light
copy whose initializers are graph inputs of their type and shape (no weight is serialised for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bnfold.errors import ModelFormatError

from .datafiles import walk_graphs
from .sniff import format_error
from .stream import copy_field

__all__ = ["check_model_data", "SUBBYTE_TYPES", "check_onnx"]


def check_onnx(path: str, model: Any) -> None:
    """``onnx.checker.check_model`` on the model's structure, without re-reading or copying its weights.

    The checker validates nodes, types, opsets and graph wiring; weights matter to it by name, type and
    shape, and by a size that fits them. So it runs on a copy where each initializer is a graph input
    of its type and shape, and the sizes are checked here; not on the path (a third parse of the file)
    nor on the model (a full serialisation of every weight).
    """
    import onnx

    light = onnx.ModelProto()
    for field, _ in model.ListFields():
        if field.name != "graph":
            copy_field(model, light, field)
    g = light.graph
    for field, _ in model.graph.ListFields():
        if field.name != "initializer":
            copy_field(model.graph, g, field)
    declared = {v.name for v in g.input}
    check_model_data(model, path)
    for t in model.graph.initializer:
        if (
            t.name not in declared and model.ir_version < 4
        ):  # the checker's own rule, which the copy would hide
            raise format_error(
                path,
                f"rejected by onnx.checker: {t.name} in initializer but not in graph input "
                f"(IR version {model.ir_version} < 4 lists every initializer as an input)",
            )
        if t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        onnx.checker.check_model(light)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise format_error(path, f"rejected by onnx.checker: {msg}") from e


def _tensor_problem(t: Any) -> str | None:
    """Why tensor ``t``'s stored values do not fit its shape and type (what ``to_array`` would trip on)."""
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in SUBBYTE_TYPES:
        return None
    n = 1
    for d in t.dims:
        if int(d) < 0:
            return f"tensor '{t.name}' has a negative dimension {list(t.dims)}"
        n *= int(d)
    if t.HasField("raw_data"):
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return None
        got = len(t.raw_data)
        if got != n * item:
            return f"tensor '{t.name}' holds {got} bytes, its shape {list(t.dims)} and type need {n * item}"
        return None
    field = _TYPED_FIELD.get(t.data_type)
    if field is None:
        return None
    per = 2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
    got = len(getattr(t, field))
    if got != n * per:
        return f"tensor '{t.name}' holds {got} values in {field}, its shape {list(t.dims)} needs {n * per}"
    return None


# Where a tensor without raw_data keeps its values, by TensorProto.DataType (onnx.proto).
_TYPED_FIELD = {
    1: "float_data",
    14: "float_data",  # FLOAT, COMPLEX64
    2: "int32_data",
    3: "int32_data",
    4: "int32_data",
    5: "int32_data",
    6: "int32_data",
    9: "int32_data",
    10: "int32_data",
    16: "int32_data",
    17: "int32_data",
    18: "int32_data",
    19: "int32_data",
    20: "int32_data",
    7: "int64_data",  # INT64
    8: "string_data",  # STRING
    11: "double_data",
    15: "double_data",  # DOUBLE, COMPLEX128
    12: "uint64_data",
    13: "uint64_data",  # UINT32, UINT64
}


SUBBYTE_TYPES = frozenset({21, 22, 23, 25, 26})  # UINT4, INT4, FLOAT4E2M1 and 2-bit types: packed


def _bn_param_problem(graph: Any, inits: Mapping[str, Any]) -> str | None:
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        dims = [tuple(int(d) for d in inits[i].dims) for i in node.input[1:5] if i in inits]
        # Opsets 6-8 with spatial=0 keep statistics per element [C, D1, ...]: valid, of any rank >= 1.
        per_element = any(a.name == "spatial" and a.i == 0 for a in node.attribute)
        if len(dims) == 4 and (
            len({d for d in dims}) > 1 or (len(dims[0]) != 1 and not per_element) or not dims[0]
        ):
            label = node.name or node.output[0] if node.output else node.name
            return (
                f"BatchNormalization '{label}': scale, B, mean and var have shapes "
                f"{', '.join(str(list(d)) for d in dims)}; they must be 1-D and of one length (the channels)"
            )
    return None


def _value_name_problem(graph: Any) -> str | None:
    """A value name that is not valid UTF-8 (protobuf gives it as bytes): onnxruntime cannot run such a
    model (its Python API decodes input and output names), nor can a report name it as text. Node and
    graph names may be any bytes (the ONNX backend carries them, surrogate-escaped)."""
    values = [v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)]
    for node in graph.node:
        values.extend(node.input)
        values.extend(node.output)
    for v in values:
        if isinstance(v, bytes):
            shown = v.decode("utf-8", "surrogateescape")
            return (
                f"graph '{graph.name if isinstance(graph.name, str) else graph.name.decode('utf-8', 'surrogateescape')}'"
                f": the value name '{shown}' is not valid UTF-8; rename it (node and graph names may be any bytes)"
            )
    return None


def check_model_data(model: Any, where: str = "model") -> None:
    """Refuse an ONNX model whose data is inconsistent, before anything reads its weights.

    Checked in every graph and subgraph: initializer names are unique (a second ``W`` would silently
    replace the first, depending on who reads the list); every initializer and Constant tensor holds
    exactly as many values as its shape needs; the four parameters of a BatchNormalization (when they
    are initializers) are 1-D tensors of one length (of one shape ``[C, D1, ...]`` with ``spatial=0``).

    Raises:
        ModelFormatError: one line naming ``where`` and the tensor or node.
    """
    for graph in walk_graphs(model.graph):
        problem = _value_name_problem(graph)
        if problem:
            raise ModelFormatError(f"{where}: {problem}")
        inits: dict[str, Any] = {}
        for t in graph.initializer:
            if t.name in inits:
                raise ModelFormatError(
                    f"{where}: initializer '{t.name}' is defined twice in graph "
                    f"'{graph.name}'; each name must be unique"
                )
            inits[t.name] = t
            problem = _tensor_problem(t)
            if problem:
                raise ModelFormatError(f"{where}: {problem}")
        for node in graph.node:
            for attr in node.attribute:
                for t in ([attr.t] if attr.HasField("t") else []) + list(attr.tensors):
                    problem = _tensor_problem(t)
                    if problem:
                        raise ModelFormatError(f"{where}: {node.op_type} '{node.name}': {problem}")
        problem = _bn_param_problem(graph, inits)
        if problem:
            raise ModelFormatError(f"{where}: {problem}")
