"""Re-estimate the statistics of every BatchNormalization of an ONNX model on data (``bnfold recalibrate``).

The estimators are :func:`bnfold.recalibrate`'s (its module docstring, rules 2 and 3), computed by the
same functions (:mod:`bnfold.fold_math.stats`: ``ChannelStats``, ``target_stats``, ``mix_with_prior``), in float64:

    * default: ``mean = (1/B) sum_b mean_b``, ``var = (1/B) sum_b var_b`` (per-batch unbiased variance);
    * ``pooled``: the statistics of all values together, ``var = M2 / (K - 1)``;
    * ``prior=N``: the statistics in the file count as ``N`` samples, mixed with the new ones.

Rules:
    1. What a BN sees. Each BN's statistics are those of its input in the model *as it will run*:
       every BN upstream of it already carries its new statistics (inference mode). BNs are grouped
       by depth (the largest number of BNs on a path from the graph inputs to the BN's input, ``0``
       for a BN with none upstream); depth ``d`` is estimated in pass ``d + 1`` over the data, after
       depths ``< d`` were written. So a model whose deepest BN has ``D`` BNs upstream costs ``D + 1``
       passes. ``upstream="batch"`` is :func:`bnfold.recalibrate`'s definition instead (the train-mode
       forward of PyTorch, ``torch.optim.swa_utils.update_bn``): every BN normalises with each batch's
       own statistics (``training_mode=1`` in the pass), one pass for all BNs, opset 14 or later. The
       two agree as batches grow.
    2. Each pass runs onnxruntime (graph optimisations off) on the nodes needed for that depth's BN
       inputs, exposed as graph outputs; every other node is left out of the pass. A BN inside an
       ``If`` branch (nested ``If`` too) is exposed through a copy of the ``If`` node made for the pass:
       the branch that holds the BN outputs its input cast to float64 (exact), every other branch an
       empty tensor (:func:`_expose`), so a BN counts exactly the batches on which its branch ran.
    3. What is written: the BN's ``input_mean`` / ``input_var`` initializers, in their own dtype (one
       cast from float64), under their own names; a BN with ``training_mode=1`` becomes an inference
       BN (the attribute removed) with the new statistics. Nothing else changes: after the update every
       other initializer and every node but those attributes is checked byte for byte.
    4. Refused (:class:`~bnfold.errors.UnsupportedModelError`, nothing changed): a BN inside a
       ``Loop``/``Scan`` (or any non-``If``) subgraph, at any nesting (its input exists once per
       iteration), a BN whose mean or variance is not an initializer of its own (a graph input, a
       computed tensor, shared with another node or with its own scale or shift, or a name another graph
       of the model defines too), a training-mode BN whose running-mean /
       running-variance outputs are used, ``spatial=0`` (opsets 7-8).
    5. Bad data (:class:`~bnfold.errors.InputError`): a BN whose input is empty in every batch, or
       whose ``If`` branch ran on no batch ("never runs"), non-finite statistics (inf/nan in the data
       or the activations).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bnfold.errors import InputError, OptionError, UnsupportedModelError
from bnfold.fold_math.stats import NumpyStats, mix_with_prior, target_stats

__all__ = ["BnChange", "RecalibrationResult", "recalibrate_model", "plan_levels", "UPSTREAM"]

UPSTREAM = ("new", "batch")
"""What the BNs upstream of a BN do while its input is recorded (``recalibrate_model(upstream=...)``)."""

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]] | Sequence[Mapping[str, np.ndarray]]
"""The data: a callable that starts one pass (each call yields the batches again, in order), or a
sequence of batches (a list of ``{input name: array}``)."""


@dataclass(frozen=True, slots=True)
class BnChange:
    """What recalibration did to one BN: where it sits and how far its statistics moved.

    ``mean_shift`` is ``max_c |mean_new - mean_old| / sqrt(var_old + eps)`` (the largest move of a
    channel's mean, in the old standard deviations); ``var_ratio_min`` / ``var_ratio_max`` are the
    extremes of ``var_new / var_old`` over the channels.
    """

    bn: str
    depth: int | None  # None: a PyTorch module (upstream BNs run in train mode, no depth passes)
    channels: int
    batches: int
    samples: int
    values: int
    mean_shift: float
    var_ratio_min: float
    var_ratio_max: float
    training_mode_cleared: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn": self.bn,
            "depth": self.depth,
            "channels": self.channels,
            "batches": self.batches,
            "samples": self.samples,
            "values_per_channel": self.values,
            "mean_shift": _json_float(self.mean_shift),
            "var_ratio_min": _json_float(self.var_ratio_min),
            "var_ratio_max": _json_float(self.var_ratio_max),
            "training_mode_cleared": self.training_mode_cleared,
        }


@dataclass(frozen=True, slots=True)
class RecalibrationResult:
    """The changes per BN (graph order), the number of passes over the data and batches per pass."""

    changes: tuple[BnChange, ...]
    passes: int
    batches: int


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True, slots=True)
class _Bn:
    index: int  # node index in its graph
    name: str
    x: str
    mean: str
    var: str
    eps: float
    training: bool
    depth: int
    # Where its graph sits: () for the main graph, else one (If node index, branch attribute) per level.
    path: tuple[tuple[int, str], ...] = ()


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _subgraph_names(node: Any) -> set[str]:
    """Every tensor name a node's subgraphs read (outer-scope references included), recursively."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = list(a.graphs) + ([a.g] if a.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= _subgraph_names(n)
            names.update(o.name for o in g.output)
    return names


def _label(node: Any, index: int) -> str:
    return node.name or f"BatchNormalization#{index}"


_BRANCHES = ("then_branch", "else_branch")


def _is_bn(node: Any) -> bool:
    return bool(node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"))


def _is_if(node: Any) -> bool:
    return bool(node.op_type == "If" and node.domain in ("", "ai.onnx"))


def _subgraphs(node: Any) -> list[tuple[str, Any]]:
    return [(a.name, g) for a in node.attribute for g in [*a.graphs, *([a.g] if a.HasField("g") else [])]]


def _all_graphs(graph: Any) -> Iterable[Any]:
    """``graph`` and every subgraph in it, recursively."""
    yield graph
    for n in graph.node:
        for _, sub in _subgraphs(n):
            yield from _all_graphs(sub)


def _graph_at(model: Any, path: tuple[tuple[int, str], ...]) -> Any:
    g = model.graph
    for index, branch in path:
        g = dict(_subgraphs(g.node[index]))[branch]
    return g


def _node_of(model: Any, b: _Bn) -> Any:
    return _graph_at(model, b.path).node[b.index]


def _refuse_nested(node: Any, blocker: Any = None) -> None:
    """Rule 4: a BN in a subgraph of anything but an ``If`` (``Loop``, ``Scan``, custom ops), at any
    depth of nesting, is refused."""
    blocker = blocker if blocker is not None else (None if _is_if(node) else node)
    for _, sub in _subgraphs(node):
        for n in sub.node:
            if _is_bn(n) and blocker is not None:
                raise UnsupportedModelError(
                    f"a BatchNormalization inside the {blocker.op_type} node "
                    f"{blocker.name or blocker.output[0]!r} cannot be recalibrated: its input exists only while "
                    "that subgraph runs, and only If branches are supported (move the BN out of the subgraph, "
                    "or recalibrate the model before export)"
                )
            _refuse_nested(n, blocker)


def plan_levels(model: Any) -> list[_Bn]:
    """Every BN of the model with its depth (rule 1), in graph order (a BN in an ``If`` branch where the
    ``If`` node stands); refuses what rule 4 names.

    Raises:
        UnsupportedModelError: rule 4.
    """
    g = model.graph
    for node in g.node:
        _refuse_nested(node)
    inits = {t.name for sub in _all_graphs(g) for t in sub.initializer}
    # Names defined in two graphs (a branch initializer shadowing an outer one, or two branches with one
    # name): onnxruntime may read the branch's own while the write, by name, goes to the other one.
    defined: dict[str, int] = {}
    for sub in _all_graphs(g):
        own = {t.name for t in sub.initializer} | {i.name for i in sub.input}
        own.update(o for n in sub.node for o in n.output if o)
        for name in own:
            defined[name] = defined.get(name, 0) + 1
    twice = {n for n, k in defined.items() if k > 1}
    readers: dict[str, int] = {}
    outputs = {o.name for sub in _all_graphs(g) for o in sub.output}
    for sub in _all_graphs(g):
        for node in sub.node:
            for name in set(node.input):
                if name:
                    readers[name] = readers.get(name, 0) + 1
    bns: list[_Bn] = []
    _plan_graph(g, (), {}, bns, inits, readers, outputs, twice)
    names = [b.name for b in bns]
    if len(set(names)) != len(names):  # names need not be unique in ONNX: the report needs them to be
        bns = [replace(b, name=f"{b.name}#{_where(b)}") if names.count(b.name) > 1 else b for b in bns]
    return bns


def _where(b: _Bn) -> str:
    return ".".join([*(f"{i}.{branch}" for i, branch in b.path), str(b.index)])


def _plan_graph(
    g: Any,
    path: tuple[tuple[int, str], ...],
    depth: dict[str, int],  # tensor -> number of BNs on the longest path to it (outer scopes included)
    bns: list[_Bn],
    inits: set[str],
    readers: dict[str, int],
    outputs: set[str],
    twice: set[str],
) -> None:
    for i, node in enumerate(g.node):
        ins = [n for n in (*node.input, *_subgraph_names(node)) if n]
        d = max((depth.get(n, 0) for n in ins), default=0)
        if _is_bn(node):
            label = node.name or f"BatchNormalization#{_where(_Bn(i, '', '', '', '', 0.0, False, 0, path))}"
            if len(node.input) < 5:
                raise UnsupportedModelError(f"{label}: a BatchNormalization without mean and variance inputs")
            x, mean, var = node.input[0], node.input[3], node.input[4]
            for what, name in (("mean", mean), ("variance", var)):
                if name in twice:
                    raise UnsupportedModelError(
                        f"{label}: its {what} {name!r} is defined in two graphs (a subgraph and an enclosing or "
                        "sibling one): the new statistics could go to the one this BN does not read (rename one)"
                    )
                if name not in inits:
                    raise UnsupportedModelError(
                        f"{label}: its {what} {name!r} is not an initializer (a graph input or a computed tensor): "
                        "there are no statistics in the file to replace"
                    )
                # Case: one tensor for two inputs of the BN (mean and scale, variance and B): new
                # statistics would change the BN's affine too.
                if readers.get(name, 0) != 1 or name in outputs or list(node.input).count(name) != 1:
                    raise UnsupportedModelError(
                        f"{label}: its {what} {name!r} is also read elsewhere; new statistics would change that "
                        "reader too"
                    )
            if _attr(node, "spatial", 1) == 0:
                raise UnsupportedModelError(
                    f"{label}: spatial=0 (per-element statistics, opsets 7-8) is not supported"
                )
            training = bool(_attr(node, "training_mode", 0))
            if training and any(o and (readers.get(o, 0) or o in outputs) for o in node.output[1:]):
                raise UnsupportedModelError(
                    f"{label}: a training-mode BatchNormalization whose running-statistics outputs are used"
                )
            bd = depth.get(x, 0)
            bns.append(_Bn(i, label, x, mean, var, float(_attr(node, "epsilon", 1e-5)), training, bd, path))
            d = max(d, bd + 1)
        elif _is_if(node) and any(_is_bn(n) for _, sub in _subgraphs(node) for n in _walk(sub)):
            # Case: BNs in the branches. Each branch sees the outer depths; the If's outputs are as deep
            # as the deepest branch output.
            for branch, sub in _subgraphs(node):
                local = dict(depth)
                _plan_graph(sub, (*path, (i, branch)), local, bns, inits, readers, outputs, twice)
                d = max(d, max((local.get(o.name, 0) for o in sub.output), default=0))
        for o in node.output:
            if o:
                depth[o] = d


def _walk(graph: Any) -> Iterable[Any]:
    for n in graph.node:
        yield n
        for a in n.attribute:
            for sub in [*a.graphs, *([a.g] if a.HasField("g") else [])]:
                yield from _walk(sub)


def _needed(graph: Any, wanted: set[str]) -> list[int]:
    """The indices of the nodes needed to compute ``wanted`` (backward closure), in graph order."""
    need = set(wanted)
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if any(o in need for o in node.output if o):
            keep[i] = True
            need.update(n for n in (*node.input, *_subgraph_names(node)) if n)
    return [i for i, k in enumerate(keep) if k]


Exposure = tuple[str, tuple[tuple[int, str], ...], str, str]
"""(branch attribute, path below that branch, BN input name, output name of the If node)."""


def _expose(node: Any, items: list[Exposure]) -> None:
    """Add one output per item to the ``If`` node ``node`` (a copy, changed in place).

    Before:  If(cond) -> y            then: ... BN(x) ...      else: ...
    After:   If(cond) -> y, out       then: ..., Cast(x) -> out/then_branch (float64)
                                      else: ..., Constant(empty float64) -> out/else_branch

    So ``out`` holds the BN's input (exactly, as float64) on a batch where its branch ran and an empty
    tensor on one where it did not. A BN in a nested ``If`` is exposed through every level.
    """
    from onnx import TensorProto, helper

    for branch, g in _subgraphs(node):
        nested: dict[int, list[Exposure]] = {}
        for b, rest, x, out in items:
            if b == branch and rest:
                nested.setdefault(rest[0][0], []).append((rest[0][1], rest[1:], x, f"{out}/{branch}"))
        for index, sub_items in nested.items():
            _expose(g.node[index], sub_items)
        for b, rest, x, out in items:
            name = f"{out}/{branch}"
            if b == branch and not rest:
                g.node.append(helper.make_node("Cast", [x], [name], to=TensorProto.DOUBLE))
            elif b != branch:
                empty = helper.make_tensor(f"{name}/empty", TensorProto.DOUBLE, [0], [])
                g.node.append(helper.make_node("Constant", [], [name], value=empty))
            g.output.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, None))
    node.output.extend(out for _, _, _, out in items)


def _train_all(graph: Any) -> None:
    """Every BN of ``graph`` and of its subgraphs in training mode (``upstream="batch"``), in place."""
    for k, n in enumerate(graph.node):
        if _is_bn(n):
            graph.node[k].CopyFrom(_train_mode(n))
        for _, sub in _subgraphs(n):
            _train_all(sub)


def _pass_nodes(work: Any, level: list[_Bn], batch_mode: bool) -> tuple[list[Any], dict[str, str]]:
    """The nodes of one pass (rule 2) and, per BN of ``level``, the pass output that holds its input."""
    g = work.graph
    taken = (
        {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    )
    key: dict[str, str] = {}
    exposures: dict[int, list[Exposure]] = {}
    for b in level:
        if not b.path:
            key[b.name] = b.x
            continue
        out = f"bnfold_recal/{_where(b)}"
        while out in taken:
            out += "_"
        taken.add(out)
        key[b.name] = out
        (top, branch), rest = b.path[0], b.path[1:]
        exposures.setdefault(top, []).append((branch, rest, b.x, out))
    wanted = {b.x for b in level if not b.path} | {o for i in exposures for o in g.node[i].output if o}
    nodes: list[Any] = []
    for i in _needed(g, wanted):
        node = g.node[i]
        if i in exposures or (batch_mode and _subgraphs(node)):
            node = _copy(node)
            if batch_mode:
                for _, sub in _subgraphs(node):
                    _train_all(sub)
            if i in exposures:
                _expose(node, exposures[i])
        elif batch_mode and _is_bn(node):
            node = _train_mode(node)
        nodes.append(node)
    return nodes, key


def _hash_tensor(t: Any) -> bytes:
    from onnx import numpy_helper

    return hashlib.sha256(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()).digest()


def fingerprint(model: Any, skip: set[str]) -> dict[str, bytes]:
    """Hashes of every initializer not in ``skip`` and of every node (training_mode attributes ignored),
    in the main graph and in every subgraph (each subgraph hashed on its own)."""
    out: dict[str, bytes] = {}
    _fingerprint_graph(model.graph, "", skip, out)
    return out


def _fingerprint_graph(graph: Any, prefix: str, skip: set[str], out: dict[str, bytes]) -> None:
    out.update({f"{prefix}init:{t.name}": _hash_tensor(t) for t in graph.initializer if t.name not in skip})
    out[f"{prefix}io"] = hashlib.sha256(
        b"".join(v.SerializeToString(deterministic=True) for v in (*graph.input, *graph.output))
    ).digest()
    for i, node in enumerate(graph.node):
        n = _copy(node)
        if _is_bn(n):
            _clear_training(n)
        for a in n.attribute:
            if a.HasField("g"):
                a.ClearField("g")
            del a.graphs[:]
        out[f"{prefix}node:{i}"] = hashlib.sha256(n.SerializeToString(deterministic=True)).digest()
        for k, (name, sub) in enumerate(_subgraphs(node)):
            _fingerprint_graph(sub, f"{prefix}node:{i}/{name}.{k}/", skip, out)


SPILL_BYTES = 1_800_000_000
"""A pass model with more initializer bytes than this is written to a temporary folder with its weights as
external data and onnxruntime reads it from there (a protobuf message stops at 2 GiB)."""


def _init_bytes(model: Any) -> int:
    return sum(
        len(t.raw_data) or (t.ByteSize() if not t.external_data else 0) for t in model.graph.initializer
    )


def _session(model: Any, nodes: list[Any], outputs: Sequence[str]) -> Any:
    """An onnxruntime session (optimisations off) on ``nodes`` with ``outputs`` exposed (rule 2).

    ``model``'s node list and outputs are swapped for the pass while it is serialised (or, past
    :data:`SPILL_BYTES`, written to a temporary folder), then put back: no copy of the weights is made.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    g = model.graph
    old_nodes = list(g.node)
    old_outputs = list(g.output)
    try:
        del g.node[:]
        g.node.extend(nodes)
        del g.output[:]
        g.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
        if _init_bytes(model) <= SPILL_BYTES:
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        from bnfold.io.saver import save

        with tempfile.TemporaryDirectory(prefix="bnfold-recal-") as tmp:
            path = os.path.join(tmp, "pass.onnx")
            save(model, path, external_data=True)
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise UnsupportedModelError(
            f"onnxruntime cannot run the model to recalibrate it ({' '.join(str(e).split())[:300]})"
        ) from e
    finally:
        del g.node[:]
        g.node.extend(old_nodes)
        del g.output[:]
        g.output.extend(old_outputs)


def _find_init(model: Any, name: str) -> tuple[Any, int]:
    """The graph (main or subgraph) that holds initializer ``name``, and its index there."""
    for g in _all_graphs(model.graph):
        for k, t in enumerate(g.initializer):
            if t.name == name:
                return g, k
    raise AssertionError(name)  # pragma: no cover - plan_levels checked it is an initializer


def _set_stat(model: Any, name: str, values: Any) -> None:
    from onnx import numpy_helper

    g, k = _find_init(model, name)
    old = numpy_helper.to_array(g.initializer[k])
    new = numpy_helper.from_array(
        np.asarray(values, dtype=np.float64).astype(old.dtype).reshape(old.shape), name
    )
    g.initializer[k].CopyFrom(new)


def _init_array(model: Any, name: str) -> np.ndarray:
    from onnx import numpy_helper

    g, k = _find_init(model, name)
    return np.asarray(numpy_helper.to_array(g.initializer[k]))


def _train_mode(node: Any) -> Any:
    """A copy of a BN node that normalises with its batch's statistics (``training_mode=1``, 3 outputs)."""
    import onnx

    n = _copy(node)
    _clear_training(n)
    n.attribute.append(onnx.helper.make_attribute("training_mode", 1))
    n.output.extend([f"{n.output[0]}/bnfold_running_mean", f"{n.output[0]}/bnfold_running_var"])
    return n


def _clear_training(node: Any) -> None:
    keep = [a for a in node.attribute if a.name != "training_mode"]
    del node.attribute[:]
    node.attribute.extend(keep)
    out0 = node.output[0]
    del node.output[:]
    node.output.append(out0)


def recalibrate_model(
    model: Any,
    batches: Batches,
    *,
    prior: float | None = None,
    pooled: bool = False,
    progress: ProgressFn | None = None,
    total_batches: int | None = None,
    upstream: str = "new",
) -> RecalibrationResult:
    """Re-estimate every BN's ``input_mean``/``input_var`` of ``model`` (changed in place) on ``batches``.

    Args:
        model: an ``onnx.ModelProto`` with its weights in memory; changed in place.
        batches: a callable that yields the batches (``{input name: array}``) again on every call
            (called once per pass, module docstring rule 1), or a list of batches.
        prior: the statistics in the file count as this many samples (``None``/0: replaced).
        pooled: pooled estimator instead of the average of per-batch statistics.
        progress: ``progress("recalibrate", done, total)`` over all batches of all passes.
        total_batches: the number of batches per pass, when known (for the progress total).
        upstream: ``"new"`` (rule 1: upstream BNs hold their new statistics, one pass per depth) or
            ``"batch"`` (upstream BNs normalise with each batch's own statistics, as in the train-mode
            forward of :func:`bnfold.recalibrate`; one pass; opset 14 or later).

    Returns:
        The :class:`RecalibrationResult` (per BN: depth, batches, distance between old and new).

    Raises:
        UnsupportedModelError: rule 4 (checked before any pass). InputError: rule 5, or a batch
            onnxruntime cannot run. OptionError: no batch, or a bad ``prior``.
        On any error the model is put back as it was.
    """
    if prior is not None and not (math.isfinite(prior) and prior >= 0):
        raise OptionError(f"--prior must be a finite number >= 0, got {prior}")
    if upstream not in UPSTREAM:
        raise OptionError(f"--upstream must be one of {', '.join(UPSTREAM)}, got {upstream!r}")
    if not callable(batches):
        if not isinstance(batches, Sequence):
            raise OptionError(
                "batches must be a list of {input name: array} or a callable that yields them on "
                "every call (a generator is used up after the first pass)"
            )
        data = batches
        batches = lambda: data  # noqa: E731
    bns = plan_levels(model)
    if upstream == "batch":
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 14:
            raise UnsupportedModelError(
                f"--upstream batch runs BatchNormalization in training mode, which needs opset 14 or later "
                f"(the model has opset {opset}); use --upstream new"
            )
    if not bns:
        return RecalibrationResult((), 0, 0)
    stats = {n for b in bns for n in (b.mean, b.var)}
    before = fingerprint(model, stats)
    old = {b.name: (_init_array(model, b.mean), _init_array(model, b.var)) for b in bns}
    # ``model`` is updated depth by depth (each pass sees the new statistics before it): what it held
    # is kept (the statistics and the training-mode nodes, both small) and put back on any failure.
    saved_inits = {
        t.name: _copy(t) for g in _all_graphs(model.graph) for t in g.initializer if t.name in stats
    }
    saved_nodes = {(b.path, b.index): _copy(_node_of(model, b)) for b in bns if b.training}
    try:
        result = _run(model, bns, old, batches, prior, pooled, progress, total_batches, upstream == "batch")
        if fingerprint(model, stats) != before:  # rule 3: an internal invariant, checked on every run
            raise AssertionError("recalibration changed more than the BatchNorm statistics")
    except BaseException:
        for g in _all_graphs(model.graph):
            for k, t in enumerate(g.initializer):
                if t.name in saved_inits:
                    g.initializer[k].CopyFrom(saved_inits[t.name])
        for (path, i), node in saved_nodes.items():
            _graph_at(model, path).node[i].CopyFrom(node)
        raise
    return result


def _copy(proto: Any) -> Any:
    c = type(proto)()
    c.CopyFrom(proto)
    return c


def _run(
    work: Any,
    bns: list[_Bn],
    old: dict[str, tuple[np.ndarray, np.ndarray]],
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    prior: float | None,
    pooled: bool,
    progress: ProgressFn | None,
    total_batches: int | None,
    batch_mode: bool,
) -> RecalibrationResult:

    prog = progress or (lambda stage, done, total: None)
    depths = [-1] if batch_mode else sorted({b.depth for b in bns})
    changes: dict[str, BnChange] = {}
    nbatches = total_batches or 0
    done = 0
    for d in depths:
        level = [b for b in bns if b.depth == d or batch_mode]
        nodes, key = _pass_nodes(work, level, batch_mode)
        xs = list(dict.fromkeys(key.values()))
        session = _session(work, nodes, xs)
        feeds_names = [i.name for i in session.get_inputs()]
        acc_of: dict[str, NumpyStats] = {}
        count = 0
        for batch in batches():
            try:
                outs = session.run(xs, {n: batch[n] for n in feeds_names if n in batch})
            except Exception as e:
                raise InputError(
                    f"onnxruntime failed on batch {count} ({' '.join(str(e).split())[:300]})"
                ) from e
            for x, out in zip(xs, outs):
                a = np.asarray(out)
                if a.size == 0:  # empty, or an If branch that did not run on this batch: nothing to count
                    continue
                if a.ndim < 2:
                    raise InputError(
                        f"the input {x!r} of a BatchNormalization has rank {a.ndim} on batch {count}"
                    )
                if x not in acc_of:
                    acc_of[x] = NumpyStats.new(a.shape[1])
                acc_of[x].add(a)
            count += 1
            done += 1
            prog("recalibrate", done, len(depths) * max(count, nbatches))
        if count == 0:
            raise OptionError("the data holds no batch")
        nbatches = count
        for b in level:
            acc = acc_of.get(key[b.name])
            if (acc is None or acc.batches == 0) and b.path:
                raise InputError(
                    f"{b.name}: the If branch that holds this BatchNormalization ran on no batch of the data "
                    "(the BatchNormalization never runs): there is nothing to estimate its statistics from"
                )
            if acc is None or acc.batches == 0:
                raise InputError(
                    f"{b.name}: its input is empty in every batch (the BatchNormalization never runs)"
                )
            mean_s, var_s = old[b.name]
            c = int(acc.mean.size)
            if mean_s.size != c:
                raise InputError(f"{b.name}: its input has {c} channels, its statistics {mean_s.size}")
            mean_t, var_t = target_stats(acc, pooled)
            if prior:
                mean_t, var_t = mix_with_prior(
                    mean_s.astype(np.float64).ravel(),
                    var_s.astype(np.float64).ravel(),
                    mean_t,
                    var_t,
                    acc,
                    prior,
                )
            m, v = mean_t, var_t
            if not (np.isfinite(m).all() and np.isfinite(v).all()):
                raise InputError(
                    f"{b.name}: the re-estimated statistics are not finite (inf or nan in the data or in the "
                    "activations it produces; a batch of size 1 without spatial axes has no variance)"
                )
            _set_stat(work, b.mean, m)
            _set_stat(work, b.var, v)
            if b.training:
                _clear_training(_node_of(work, b))
            old_m = mean_s.astype(np.float64).ravel()
            old_v = var_s.astype(np.float64).ravel()
            with np.errstate(divide="ignore", invalid="ignore"):
                shift = np.abs(m - old_m) / np.sqrt(old_v + b.eps)
                ratio = v / old_v
            changes[b.name] = BnChange(
                b.name,
                b.depth,
                c,
                acc.batches,
                acc.samples,
                acc.values,
                float(np.max(shift)) if shift.size else 0.0,
                float(np.min(ratio)) if ratio.size else 1.0,
                float(np.max(ratio)) if ratio.size else 1.0,
                b.training,
            )
        log.debug("depth %d: %d BatchNormalization over %d batches", d, len(level), count)
        del session
    return RecalibrationResult(tuple(changes[b.name] for b in bns), len(depths), nbatches)
