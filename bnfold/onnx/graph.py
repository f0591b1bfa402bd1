"""A read-only index over one ONNX graph: who produces and who reads each value.

Built in one pass over the nodes (O(nodes + edges)); the matcher asks it questions in O(1):

* ``producer[value]`` -- index of the node that writes ``value`` in *this* graph (absent for graph
  inputs, initializers and values of an enclosing graph);
* ``consumers[value]`` -- one entry per use: the index of each node that reads ``value``. A node whose
  subgraphs (If/Loop/Scan bodies) read ``value`` counts as a reader once, so a value read inside a
  subgraph is never treated as having a single consumer;
* ``initializers``, ``graph_inputs``, ``graph_outputs``, and the declared ``types`` of values (inputs,
  outputs, value_info, initializers) for ranks, static shapes and element types;
* ``label(i)`` -- the name a verdict gives node ``i``: its name, or ``<op_type>_<k>`` for an unnamed
  node, where ``k`` is its index in the graph *as given to the fold* (:func:`node_labels`, computed
  once; rewrites shift indices, not labels);
* ``sources`` -- for a functional fold, the original tensor of each initializer whose bytes were not
  copied (yet): the copy is a placeholder with name, type and dims, the values are read from the
  original (:meth:`GraphIndex.tensor`).

Nothing here edits the model; the index is rebuilt after each rewrite pass.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto

from bnfold.errors import ModelFormatError

__all__ = [
    "GraphIndex",
    "attr",
    "ValueType",
    "subgraph_reads",
    "node_subgraphs",
    "all_graphs",
    "node_labels",
    "shadowed_names",
    "BN_OP",
    "is_bn",
    "read_lazy_tensor",
    "text",
    "name_of",
    "value_info_type",
]

BN_OP = "BatchNormalization"


def read_lazy_tensor(t: TensorProto) -> np.ndarray[Any, Any] | None:
    """The values of an initializer that :func:`bnfold.io.load_with_format` left in its file (its
    ``location`` is then an absolute path, checked at load); None for any other external tensor.

    Read when the fold asks for it, so that weights nobody folds never enter memory. The array is a
    view over the bytes read (no second copy).
    """
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if t.data_location != TensorProto.EXTERNAL or not os.path.isabs(loc):
        return None
    offset, length = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)
    with open(loc, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    dims = tuple(int(d) for d in t.dims)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        dtype = None
    if (
        dtype is None
        or dtype.kind in "OSU"
        or len(raw) != dtype.itemsize * int(np.prod(dims, dtype=np.int64))
    ):
        tmp = TensorProto()  # packed or unusual types: onnx's own conversion
        tmp.data_type = t.data_type
        tmp.dims.extend(dims)
        tmp.raw_data = raw
        return onnx.numpy_helper.to_array(tmp)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(dims)


def text(value: str | bytes) -> str:
    """A name from the model as ``str``. protobuf gives a string field that is not valid UTF-8 (onnx
    accepts such names) as ``bytes``; it is decoded with ``surrogateescape`` (PEP 383), which is
    lossless: byte ``0xNN`` becomes the lone surrogate ``U+DCNN`` and ``.encode("utf-8",
    "surrogateescape")`` gives the original bytes back. Renderers show such a character as ``\\xNN``.
    """
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def name_of(item: Any) -> str:
    """``item.name`` (a node, tensor or value) as ``str`` (see :func:`text`)."""
    return text(item.name)


def attr(node: NodeProto, name: str, default: Any, opset: int | None = None) -> Any:
    """The value of attribute ``name`` of ``node``, read as the operator schema types it.

    The one place attributes are read. A present attribute has its stored type (a FLOAT attribute is a
    float32: ``1e-5`` reads as ``9.99999974737875e-06``). An absent one takes the default of the
    operator's schema in force at ``opset`` (the model's opset of the node's domain; None: the newest
    version), which is what a runtime uses -- BatchNormalization's ``epsilon`` is float32(1e-5), not the
    double 1e-5; opset-6's ``is_test`` is 0. ``default`` serves only where that schema gives none (an
    attribute without a default or not in that version, an operator of another domain); it is then
    rounded to the schema's type (FLOAT: float32).

    Raises:
        ModelFormatError: the attribute is present with another type than the schema's (``epsilon``
            as a string: the model is invalid, onnx.checker and onnxruntime reject it).
    """
    for a in node.attribute:
        if a.name == name:
            spec = _schema_attribute(text(node.domain), text(node.op_type), name, opset)
            if spec is not None and a.type != int(spec.type):  # what onnx.checker rejects, as one typed error
                kind = onnx.AttributeProto.AttributeType.Name
                raise ModelFormatError(
                    f"{text(node.op_type)} '{name_of(node)}': attribute '{name}' is of type "
                    f"{kind(a.type)}, the operator takes {kind(int(spec.type))}"
                )
            return onnx.helper.get_attribute_value(a)
    spec = _schema_attribute(text(node.domain), text(node.op_type), name, opset)
    if spec is None:
        return default
    if spec.default_value.name:  # the schema gives a default
        return onnx.helper.get_attribute_value(spec.default_value)
    if spec.type == onnx.AttributeProto.FLOAT and isinstance(default, (int, float)):
        return float(np.float32(default))
    if spec.type == onnx.AttributeProto.FLOATS and isinstance(default, (list, tuple)):
        return [float(np.float32(v)) for v in default]
    return default


@functools.lru_cache(maxsize=1024)
def _schema_attribute(domain: str, op_type: str, name: str, opset: int | None) -> Any:
    """The schema entry (``OpSchema.Attribute``) of attribute ``name`` of the operator version in force
    at ``opset`` (None: the newest); None where no schema knows the operator or that attribute."""
    domain = "" if domain == "ai.onnx" else domain
    try:
        schema = (
            onnx.defs.get_schema(op_type, domain)
            if opset is None
            else onnx.defs.get_schema(op_type, max(int(opset), 1), domain)
        )
    except onnx.defs.SchemaError:
        return None
    return schema.attributes.get(name)


def is_bn(node: NodeProto) -> bool:
    """True for a standard-domain BatchNormalization node."""
    return node.op_type == BN_OP and node.domain in ("", "ai.onnx")


@dataclass(frozen=True, slots=True)
class ValueType:
    """Element type and (possibly partial) shape of a value; ``shape`` is None when the rank is unknown."""

    elem_type: int
    shape: tuple[int | None, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        if self.shape is None or any(d is None for d in self.shape):
            return None
        return tuple(int(d) for d in self.shape if d is not None)


def value_info_type(vi: onnx.ValueInfoProto) -> ValueType | None:
    t = vi.type
    if t.WhichOneof("value") != "tensor_type":
        return None
    tt = t.tensor_type
    shape: tuple[int | None, ...] | None = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    return ValueType(tt.elem_type, shape)


def node_subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    """The subgraphs held by a node's attributes, as ``(attribute name, graph)``."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def all_graphs(graph: GraphProto) -> list[GraphProto]:
    """``graph`` and every subgraph nested in it (If/Loop/Scan bodies, at any depth)."""
    out, stack = [], [graph]
    while stack:
        g = stack.pop()
        out.append(g)
        for n in g.node:
            stack.extend(sub for _, sub in node_subgraphs(n))
    return out


def subgraph_reads(graph: GraphProto) -> set[str]:
    """Every value name read anywhere inside ``graph`` (nested subgraphs included).

    Names are unique across scopes (SSA), so the names not produced inside are reads of an enclosing
    graph; the caller intersects with its own names.
    """
    reads: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        for n in g.node:
            reads.update(n.input)
            for _, sub in node_subgraphs(n):
                stack.append(sub)
        reads.update(o.name for o in g.output)
    reads.discard("")
    return reads


def shadowed_names(graph: GraphProto) -> frozenset[str]:
    """The names a subgraph defines again (initializer, node output) though an enclosing graph defines them.

    Which of the two tensors a reader then gets is not settled: onnxruntime 1.2x reads the outer
    weight of a Conv when another branch reads it too and the branch's own otherwise, onnx's reference
    evaluator the outer one. A fold that reads such a name, or changes who reads it, can change what
    the model computes: none of them is ever a constant to the fold.
    """
    out: set[str] = set()
    stack: list[tuple[GraphProto, frozenset[str]]] = [(graph, frozenset())]
    while stack:
        g, enclosing = stack.pop()
        own = {t.name for t in g.initializer} | {v.name for v in g.input}
        own.update(o for n in g.node for o in n.output if o)
        out.update(own & enclosing)
        inner = enclosing | own
        for n in g.node:
            stack.extend((sub, inner) for _, sub in node_subgraphs(n))
    return frozenset(out)


def node_labels(graph: GraphProto) -> dict[str, str]:
    """``{first output name: label}`` of the unnamed nodes of ``graph``, label ``<op_type>_<index>``.

    Computed once, before any rewrite: the label of a node then stays what it was in the graph the
    user gave, however many nodes a fold removes before it. A node's first output identifies it
    across passes (value names are unique); the rewriter moves the entry when it renames an output.
    """
    out: dict[str, str] = {}
    for i, n in enumerate(graph.node):
        if not n.name and n.output and n.output[0]:
            out[n.output[0]] = f"{text(n.op_type)}_{i}"
    return out


@dataclass(slots=True)
class GraphIndex:
    """Producer/consumer index of one graph (see the module docstring).

    Attributes:
        graph: the graph indexed.
        nodes: the graph's nodes, in order (references into ``graph.node``).
        outer: the index of the enclosing graph, for a subgraph.
        ir_version: the model's IR version (below 4, initializers are listed as graph inputs).
    """

    graph: GraphProto
    outer: GraphIndex | None = None
    ir_version: int = 10
    nodes: list[NodeProto] = field(default_factory=list)
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    types: dict[str, ValueType] = field(default_factory=dict)
    has_subgraphs: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    """Stable labels of unnamed nodes by first output (:func:`node_labels`); shared across passes."""
    sources: dict[str, TensorProto] = field(default_factory=dict)
    """Original tensors of placeholder initializers (functional fold); shared across passes."""
    shadowed: frozenset[str] = frozenset()
    """The model's :func:`shadowed_names`: never a constant anywhere; shared across passes and subgraphs."""
    inferred: Any = None
    """Types from shape inference (a :class:`bnfold.onnx.shapes.LazyTypes`, or anything with
    ``get(name, default)``), used where no shape is declared; shared across passes and subgraphs."""

    @classmethod
    def build(
        cls,
        graph: GraphProto,
        outer: GraphIndex | None = None,
        ir_version: int = 10,
        *,
        labels: dict[str, str] | None = None,
        sources: dict[str, TensorProto] | None = None,
        inferred: Any = None,
        shadowed: frozenset[str] | None = None,
    ) -> GraphIndex:
        """Index ``graph`` in one pass (``labels``, ``sources`` and ``inferred`` are kept by reference;
        ``shadowed`` defaults to the enclosing graph's)."""
        idx = cls(graph=graph, outer=outer, ir_version=ir_version)
        if shadowed is not None:
            idx.shadowed = shadowed
        elif outer is not None:
            idx.shadowed = outer.shadowed
        if labels is not None:
            idx.labels = labels
        if sources is not None:
            idx.sources = sources
        if inferred is not None:
            idx.inferred = inferred
        elif outer is not None:
            idx.inferred = outer.inferred
        idx.nodes = list(graph.node)
        producer = idx.producer
        consumers = idx.consumers
        for i, n in enumerate(idx.nodes):
            for v in n.input:
                if v:
                    consumers.setdefault(v, []).append(i)
            for v in n.output:
                if v:
                    producer[v] = i
            if n.attribute:
                subs = list(node_subgraphs(n))
                if subs:
                    idx.has_subgraphs = True
                    reads: set[str] = set()
                    for _, g in subs:
                        reads |= subgraph_reads(g)
                    for v in reads - set(n.input):
                        consumers.setdefault(v, []).append(i)
        idx.initializers = {t.name: t for t in graph.initializer}
        idx.graph_inputs = {v.name for v in graph.input}
        idx.graph_outputs = {v.name for v in graph.output}
        types = idx.types
        for t in graph.initializer:
            types[t.name] = ValueType(t.data_type, tuple(int(d) for d in t.dims))
        for coll in (graph.input, graph.value_info, graph.output):
            for vi in coll:
                vt = value_info_type(vi)
                if vt is not None and (vi.name not in types or types[vi.name].shape is None):
                    types[vi.name] = vt
        return idx

    # ---- queries -------------------------------------------------------------------------------
    def label(self, i: int) -> str:
        """The verdict label of node ``i``: its name, else its stable ``<op_type>_<index>`` label."""
        n = self.nodes[i]
        if n.name:
            return text(n.name)
        if n.output and n.output[0] in self.labels:
            return self.labels[n.output[0]]
        return f"{text(n.op_type)}_{i}"

    def tensor(self, name: str) -> TensorProto:
        """The initializer ``name`` holding its values: the original for a placeholder copy."""
        src = self.sources.get(name)
        return self.initializers[name] if src is None else src

    def n_uses(self, value: str) -> int:
        """Number of reads of ``value`` in this graph, a graph output counting as one more."""
        return len(self.consumers.get(value, ())) + (1 if value in self.graph_outputs else 0)

    def single_consumer(self, value: str) -> int | None:
        """The index of the only node reading ``value``, or None (no reader, several, or a graph output)."""
        cons = self.consumers.get(value, ())
        if len(cons) != 1 or value in self.graph_outputs:
            return None
        return cons[0]

    def declared_type(self, value: str) -> ValueType | None:
        """Declared type of ``value`` here or in an enclosing graph."""
        idx: GraphIndex | None = self
        while idx is not None:
            vt = idx.types.get(value)
            if vt is not None:
                return vt
            idx = idx.outer
        return None

    def value_type(self, value: str) -> ValueType | None:
        """Type of ``value``: the declared one when it has a shape, else the inferred one (if any)."""
        vt = self.declared_type(value)
        if vt is not None and vt.shape is not None:
            return vt
        if self.inferred is None:
            return vt
        got: ValueType | None = self.inferred.get(value, vt)
        return got

    def ranks(self, value: str) -> set[int]:
        """Every rank known for ``value``, declared and inferred (two when they disagree)."""
        out = set()
        inferred = None if self.inferred is None else self.inferred.get(value)
        for vt in (self.declared_type(value), inferred):
            if vt is not None and vt.rank is not None:
                out.add(vt.rank)
        return out

    def is_local(self, value: str) -> bool:
        """True when ``value`` is defined in this graph (node output, input or initializer)."""
        return value in self.producer or value in self.initializers or value in self.graph_inputs

    def is_overridable(self, name: str) -> bool:
        """An initializer that is also a graph input (IR >= 4) can be fed by the user: not a constant."""
        return self.ir_version >= 4 and name in self.graph_inputs

    def is_real_input(self, name: str) -> bool:
        """A graph input a user feeds (below IR 4, initializers are listed as inputs too: not those)."""
        return name in self.graph_inputs and not (self.ir_version < 4 and name in self.initializers)

    def all_names(self) -> set[str]:
        """Every value name of this graph and its enclosing graphs (for fresh names)."""
        names: set[str] = set()
        idx: GraphIndex | None = self
        while idx is not None:
            names.update(idx.producer)
            names.update(idx.initializers)
            names.update(idx.graph_inputs)
            names.update(idx.consumers)
            idx = idx.outer
        return names
