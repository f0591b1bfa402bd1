"""Apply fold plans to a graph: write tensors, rename values, remove nodes; never decide eligibility.

Rules:

* **Names.** A forward fold renames the producer's output to the BN's output name (so a BN output that
  is a graph output keeps its name, and every reader keeps reading the same name); a backward fold
  makes the layer read the BN's input. The value that disappears loses its ``value_info`` entry.
  Everything else (node names, doc strings, metadata, opset imports, inputs, outputs) is left as is.

  Before::                                After::

      x -> Conv(W, b) -> t -> BN -> y          x -> Conv(W', b') -> y

* **Shared weights.** An initializer is overwritten in place only when this node is its single
  reader in this graph (not a graph input or output, not read in a subgraph); otherwise the folded
  tensor is written to a new initializer with a fresh name and the old one is left to its readers.
  Weights computed by constant subgraphs (Constant, Shape/Expand/CastLike...) also get a new
  initializer; the constant nodes that end up unread are removed. A DequantizeLinear read by other
  nodes too (``Fold.clone``) is copied for the folded layer (inserted right after it, its integer
  initializer still shared); what the fold writes goes to the copy's new initializers.
* **Memory.** Only the tensors written are converted; an in-place write replaces ``raw_data`` of the
  same TensorProto (the old bytes are released), so the weights are never held twice.
* **Order.** Removed nodes are deleted by index from the end (no re-scan, no copy of the node list); the
  two nodes of an affine replacement take the BN's place, so the graph stays topologically sorted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from bnfold.fold_math.subnormal import flush_written
from bnfold.io.stream import spill_tensor, spillable
from bnfold.records import Site

from .const import PURE_OPS
from .graph import GraphIndex, node_subgraphs, text
from .plan import Fold

__all__ = ["Names", "PassRewriter", "remove_dead", "write_tensor"]

_DATA_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


class Names:
    """Fresh value, node and initializer names, unique across the whole model (all subgraphs)."""

    def __init__(self, model: ModelProto) -> None:
        used: set[str] = set()
        stack = [model.graph]
        while stack:
            g = stack.pop()
            used.update(t.name for t in g.initializer)
            used.update(v.name for v in g.input)
            used.update(v.name for v in g.output)
            for n in g.node:
                used.update(n.output)
                used.update(n.input)
                used.add(n.name)
                stack.extend(sub for _, sub in node_subgraphs(n))
        self._used = used

    def fresh(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... whichever is unused; the name is then taken.

        A byte of ``base`` that is not UTF-8 (a surrogate-escaped name, see
        :func:`~bnfold.onnx.graph.text`) is written ``\\xNN``: a new name is always valid UTF-8."""
        base = base.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


def write_tensor(tensor: TensorProto, value: npt.NDArray[Any]) -> None:
    """Overwrite ``tensor``'s data (and dims) with ``value``, keeping its name and doc string.

    External-data fields are cleared: the tensor's bytes now live in the model (the saver decides
    where they go).
    """
    for f in _DATA_FIELDS:
        if len(getattr(tensor, f)):
            tensor.ClearField(f)
    if tensor.data_location == TensorProto.EXTERNAL:
        tensor.ClearField("external_data")
        tensor.data_location = TensorProto.DEFAULT
    del tensor.dims[:]
    tensor.dims.extend(int(d) for d in value.shape)
    if spill_tensor(tensor, value):  # inside bnfold.io.stream.spilling: to a temporary file, not memory
        return
    tensor.raw_data = _raw_bytes(value)


def _raw_bytes(value: npt.NDArray[Any]) -> bytes:
    """Little-endian bytes of ``value``; an array that is a whole view over a ``bytes`` object (as the
    matcher produces for large weights) gives that object back without a copy."""
    base = value.base
    while isinstance(base, np.ndarray):
        base = base.base
    if (
        isinstance(base, bytes)
        and value.flags.c_contiguous
        and value.nbytes == len(base)
        and value.dtype.byteorder != ">"
    ):
        return base
    arr = np.ascontiguousarray(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def _sole_reader(index: GraphIndex, name: str, same_shape: bool) -> bool:
    """True when one node reads the values of ``name``; Shape/Size readers only need its (unchanged) shape."""
    cons = index.consumers.get(name, ())
    if same_shape:
        cons = [c for c in cons if index.nodes[c].op_type not in ("Shape", "Size")]
    return len(cons) == 1


def _onnx_type(value: npt.NDArray[Any]) -> int:
    return int(helper.np_dtype_to_tensor_dtype(value.dtype))


class PassRewriter:
    """Apply non-overlapping fold plans of one pass, each as soon as it is matched.

    Tensor writes, renames and op changes happen in :meth:`apply` (so a new weight is stored, and the
    old bytes released, before the next BN is matched: at most one extra weight in memory); node
    removals and value_info drops wait for :meth:`finish`, so that the node indices of ``index`` stay
    valid for the whole pass. Plans never touch the same node twice in one pass (the caller locks
    the nodes a plan edits).

    Args:
        graph: the graph to edit.
        index: its index, built at the start of the pass.
        names: the model's name allocator.
        add_inputs: also list new initializers as graph inputs (IR version < 4).
        flush: set the subnormal values of every float tensor written to zero as it is stored
            (:func:`bnfold.denormals.flush_written`: float32/float64/bfloat16, never float16); the
            count is in :attr:`flushed`.
    """

    def __init__(
        self,
        graph: GraphProto,
        index: GraphIndex,
        names: Names,
        *,
        add_inputs: bool = False,
        flush: bool = False,
    ) -> None:
        self.graph = graph
        self.index = index
        self.names = names
        self.add_inputs = add_inputs
        self.flush = flush
        self.flushed = 0
        """Subnormal values set to zero in the tensors written (with ``flush``)."""
        self.candidates: set[str] = set()
        """Value names that may have become unread (for :func:`remove_dead`)."""
        self._removed: dict[int, list[onnx.NodeProto]] = {}
        self._after: dict[int, list[onnx.NodeProto]] = {}
        self._dropped: set[str] = set()

    def _flushed(self, value: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``value``, its subnormal values set to zero when the fold flushes (counted)."""
        if not self.flush:
            return value
        out, n = flush_written(value)
        self.flushed += n
        return out

    def _new_initializer(self, name: str, value: npt.NDArray[Any]) -> None:
        value = self._flushed(value)
        t = TensorProto()
        if spillable(value):  # inside bnfold.io.stream.spilling: to a temporary file, not memory
            t.name, t.data_type = name, _onnx_type(value)
        if not spill_tensor(t, value):
            t = numpy_helper.from_array(np.ascontiguousarray(value), name)
            if value.base is not None:  # a bytes-backed weight from the matcher: no second copy
                t.raw_data = _raw_bytes(value)
        self.graph.initializer.append(t)
        if self.add_inputs:
            self.graph.input.append(helper.make_tensor_value_info(name, _onnx_type(value), list(value.shape)))

    def _redeclare(self, name: str, shape: tuple[int, ...]) -> None:
        """An initializer rewritten in place with a new shape: its graph-input entry (IR < 4) takes
        that shape and its value_info entries are dropped (they would contradict it)."""
        for v in self.graph.input:
            if v.name == name and v.type.HasField("tensor_type"):
                dims = v.type.tensor_type.shape.dim
                del dims[:]
                for d in shape:
                    dims.add().dim_value = int(d)
        self._dropped.add(name)

    def apply(self, f: Fold) -> Site:
        """Apply one plan now (removals deferred); return its final :class:`Site`."""
        index, nodes, names = self.index, self.index.nodes, self.names
        notes: list[str] = []
        copy: onnx.NodeProto | None = None
        if f.clone is not None:  # a shared DequantizeLinear: the layer gets its own copy, after it
            dq, layer, slot = f.clone
            copy = onnx.NodeProto()
            copy.CopyFrom(nodes[dq])
            copy.name = names.fresh(f"{text(nodes[dq].name) or 'DequantizeLinear'}_bnfold")
            del copy.output[:]
            copy.output.append(names.fresh(f"{text(nodes[dq].output[0])}_bnfold"))
            nodes[layer].input[slot] = copy.output[0]
            self._after.setdefault(dq, []).append(copy)
            notes.append(f"new DequantizeLinear for shared '{text(nodes[dq].output[0])}'")

        def target(i: int) -> onnx.NodeProto:
            return copy if copy is not None and f.clone is not None and i == f.clone[0] else nodes[i]

        for w in f.writes:
            node = target(w.node)
            old = node.input[w.slot] if w.slot < len(node.input) else ""
            t = index.initializers.get(old) if old else None
            if (
                node is not copy
                and t is not None
                and _sole_reader(index, old, tuple(int(d) for d in t.dims) == w.value.shape)
                and not index.is_real_input(old)
                and old not in index.graph_outputs
                and t.data_type == _onnx_type(w.value)
            ):
                reshaped = tuple(int(d) for d in t.dims) != w.value.shape
                write_tensor(t, self._flushed(w.value))
                index.sources.pop(old, None)  # a placeholder copy now holds its own (new) values
                if reshaped:  # a per-tensor quantization scale made per channel: its declarations follow
                    self._redeclare(old, w.value.shape)
                continue
            base = text(old) or f"{text(node.name) or node.op_type}.bias"
            new = names.fresh(f"{base}_bnfold" if old else base)
            self._new_initializer(new, w.value)
            while len(node.input) <= w.slot:
                node.input.append("")
            node.input[w.slot] = new
            if old:
                self.candidates.add(old)
                if old in index.initializers and node is not copy:
                    notes.append(f"new initializer for shared '{old}'")
        w_list = f.writes
        f.writes = []  # release the new tensors as soon as they are stored
        del w_list
        if f.to_gemm is not None:
            nodes[f.to_gemm].op_type = "Gemm"
        for gi in f.beta_one:
            for a in nodes[gi].attribute:
                if a.name == "beta":
                    a.f = 1.0
        for ni, aname, aval in f.set_int_attrs:
            attrs = [a for a in target(ni).attribute if a.name == aname]
            if attrs:
                attrs[0].i = aval
            else:
                target(ni).attribute.append(helper.make_attribute(aname, aval))
        if f.rename_output is not None:
            ni, new_name = f.rename_output
            label = index.labels.pop(nodes[ni].output[0], None)
            if label is not None:  # the node keeps its stable label under its new output name
                index.labels[new_name] = label
            nodes[ni].output[0] = new_name
        if f.rename_input is not None:
            ni, slot, new_name = f.rename_input
            nodes[ni].input[slot] = new_name
        for ri in f.remove:
            self.candidates.update(v for v in nodes[ri].input if v)
            self._removed[ri] = []
        if f.shift is not None:
            # linear-norm without a bias: the BN becomes Add(its input, shift), keeping its output name.
            bn = nodes[f.remove[0]]
            shift_name = names.fresh(f"{f.site.bn}.shift")
            self._new_initializer(shift_name, f.shift)
            add = helper.make_node(
                "Add", [bn.input[0], shift_name], [bn.output[0]], name=names.fresh(f"{f.site.bn}_shift")
            )
            self._removed[f.remove[0]] = [add]
        if f.affine is not None:
            bn = nodes[f.remove[0]]
            label = f.site.bn
            scale_name = names.fresh(f"{label}.scale")
            shift_name = names.fresh(f"{label}.shift")
            self._new_initializer(scale_name, f.affine[0])
            self._new_initializer(shift_name, f.affine[1])
            mid = names.fresh(f"{bn.output[0]}_scaled")
            mul = helper.make_node("Mul", [bn.input[0], scale_name], [mid], name=names.fresh(f"{label}_mul"))
            add = helper.make_node("Add", [mid, shift_name], [bn.output[0]], name=names.fresh(f"{label}_add"))
            self._removed[f.remove[0]] = [mul, add]
        self._dropped.update(f.dropped)
        if not notes:
            return f.site
        return replace(f.site, detail="; ".join(filter(None, [f.site.detail, *notes])))

    def finish(self) -> None:
        """Remove the nodes of the applied plans (from the end: indices stay valid) and stale value_info."""
        graph = self.graph
        for i in sorted(self._removed.keys() | self._after.keys(), reverse=True):
            for k, n in enumerate(self._after.get(i, ())):  # copies of a node, right after it
                graph.node.insert(i + 1 + k, n)
            if i in self._removed:
                del graph.node[i]
                for k, n in enumerate(self._removed[i]):
                    graph.node.insert(i + k, n)
        if self._dropped:
            for k in range(len(graph.value_info) - 1, -1, -1):
                if graph.value_info[k].name in self._dropped:
                    del graph.value_info[k]
        self._removed.clear()
        self._after.clear()
        self._dropped.clear()


def remove_dead(graph: GraphProto, candidates: set[str], outer: GraphIndex | None, ir_version: int) -> None:
    """Remove what the folds left unread: initializers named in ``candidates`` and the pure constant
    nodes (Constant, Shape, Expand, ...) that only fed them. Graph inputs and outputs are kept."""
    if not candidates:
        return
    index = GraphIndex.build(graph, outer, ir_version)
    uses = {v: len(c) for v, c in index.consumers.items()}
    keep = index.graph_outputs | {v for v in index.graph_inputs if index.is_real_input(v)}
    dead_nodes: set[int] = set()
    dead_inits: set[str] = set()
    work = list(candidates)
    while work:
        v = work.pop()
        if uses.get(v, 0) > 0 or v in keep:
            continue
        if v in index.initializers:
            dead_inits.add(v)
            continue
        p = index.producer.get(v)
        if p is None or p in dead_nodes:
            continue
        n = index.nodes[p]
        if n.op_type not in PURE_OPS or n.domain not in ("", "ai.onnx"):
            continue
        if any(uses.get(o, 0) > 0 or o in keep for o in n.output if o):
            continue
        dead_nodes.add(p)
        for i in n.input:
            if i:
                uses[i] = uses.get(i, 0) - 1
                work.append(i)
    gone = set(dead_inits)
    for i in sorted(dead_nodes, reverse=True):
        gone.update(index.nodes[i].output)
        del graph.node[i]
    if gone:
        for k in range(len(graph.value_info) - 1, -1, -1):
            if graph.value_info[k].name in gone:
                del graph.value_info[k]
    if dead_inits:
        for k in range(len(graph.initializer) - 1, -1, -1):
            if graph.initializer[k].name in dead_inits:
                del graph.initializer[k]
        if index.graph_inputs & dead_inits:  # IR < 4: the initializer was also listed as an input
            for k in range(len(graph.input) - 1, -1, -1):
                if graph.input[k].name in dead_inits:
                    del graph.input[k]
