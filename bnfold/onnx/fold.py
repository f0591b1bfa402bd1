"""Fold every exactly-foldable BatchNormalization of an ONNX model, to a fixpoint.

Algorithm (linear in the number of nodes per pass; passes repeat only while something folds):

0. Shapes the file does not declare are inferred once, when the matcher first asks for one, on a
   light copy without the weights (:mod:`~bnfold.onnx.shapes`); the model is not changed.
1. Index the graph once (:class:`~bnfold.onnx.graph.GraphIndex`) and match every BN
   (:func:`~bnfold.onnx.match.match_bn`) and every per-channel Mul+Add after a layer, in node order.
   Each plan is applied as soon as it is matched (:class:`~bnfold.onnx.rewrite.PassRewriter`: the new
   weight is stored before the next match, so at most one new weight is in flight); the nodes a plan edits are
   locked for the rest of the pass, and a plan that needs a locked node waits for the next pass, so
   the index built at the start of the pass stays truthful for everything matched in it.
2. Remove the folded nodes (one deletion per node, from the end) and repeat from 1 while a pass
   folded something (``Conv -> BN -> BN`` folds the second BN in the second pass).
2b. With ``propagate=True`` (the default), each BN still left is split into scale and shift, moved by
   exact identities through Relu / pooling / Flatten / zero padding into the next layer
   (:mod:`~bnfold.onnx.propagate`; in subgraphs too, with their own constants).
3. With ``affine=True``, each BN still left (except training-mode ones) becomes one Mul and one Add.
4. Fold the subgraphs (If/Loop/Scan bodies) the same way, with the enclosing graph's constants
   visible; a subgraph never edits an enclosing initializer (it writes its own).
5. Remove the initializers and constant nodes that nothing reads any more.

A functional fold (``inplace=False``) copies the model once: every field, but the large initializers of
the main graph start as *placeholders* (all fields but ``raw_data``) whose values are read from the
original; a weight the fold rewrites is written once with its new values, the others get their bytes
at the end. Labels of unnamed nodes (``<op_type>_<index>``) are computed once, from the graph as
given, so a verdict names the node at that index of the input however many nodes a fold removed
before it. With ``flush_denormals``, each tensor is flushed as it is written (no second pass).

The verdict list holds one entry per BatchNormalization node (subgraph BNs are named
``<node>/<attribute>/<bn>``); per-channel Mul+Add folds are listed in ``report.mul_add``.
This module never imports torch.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from onnx import GraphProto, ModelProto, TensorProto

from bnfold.errors import InputError, ModelFormatError
from bnfold.options import FoldOptions
from bnfold.records import FoldReport, Merge, PostFoldResult, Site, Skip, SkipReason, Verdict

from .batch_stats import NOTE as _BATCH_NOTE
from .batch_stats import batch_stats_pass
from .const import ConstEvaluator
from .graph import GraphIndex, all_graphs, is_bn, node_labels, node_subgraphs, shadowed_names, text
from .match import match_affine, match_bn
from .match_frozen import match_mul_add
from .merge import ExactTable, exact_fold
from .merge import merge_branches as _merge_branches
from .plan import Fold, conv_groups, release_scratch
from .propagate import propagate_graph
from .rewrite import Names, PassRewriter, remove_dead
from .shapes import LazyTypes, copy_fields

__all__ = ["fold_model", "count_bn"]

_MAX_PASSES = 10_000

_DIRECT = FoldOptions(flush_denormals=False)
"""The options of a direct call without any: a direct call writes the exact rounded fold (no flush)."""


@dataclass(slots=True)
class _Ctx:
    opset: int
    affine: bool
    names: Names
    ir_version: int
    mul_add: list[Site] = field(default_factory=list)
    exclude: frozenset[str] = frozenset()
    flush: bool = False
    flushed: int = 0
    sources: dict[str, TensorProto] = field(default_factory=dict)
    """Main graph: the original of each placeholder initializer (see :func:`_copy_model`)."""
    inferred: LazyTypes = field(default_factory=LazyTypes)
    """Inferred types of every graph's values, inferred when first asked (:class:`~bnfold.onnx.shapes.LazyTypes`)."""
    merge: bool = False
    """Merge parallel branches into one Conv (:mod:`bnfold.onnx.merge`) once the folds settle."""
    merges: dict[str, Merge] = field(default_factory=dict)
    """Branch merges by sum label (the last decision for each sum)."""
    exact: ExactTable = field(default_factory=dict)
    """With ``merge``: the float64 values of the convs folds and merges wrote, so each merge rounds once."""
    batch_stats: str | None = None
    """Training-mode BNs: "instance" converts them (:mod:`bnfold.onnx.batch_stats`); None leaves them."""
    converted: int = 0
    shadowed: frozenset[str] = frozenset()
    """Names a subgraph defines again (:func:`~bnfold.onnx.graph.shadowed_names`): never constants."""
    propagate: bool = True
    """Split the BNs left into scale and shift and move them through activations (:mod:`bnfold.onnx.propagate`)."""


def count_bn(model: ModelProto) -> int:
    """Number of BatchNormalization nodes in the model, subgraphs included."""
    return sum(1 for g in all_graphs(model.graph) for n in g.node if is_bn(n))


def _figures(model: ModelProto) -> tuple[int, int, int]:
    bn = nodes = params = 0
    for g in all_graphs(model.graph):
        nodes += len(g.node)
        bn += sum(1 for n in g.node if is_bn(n))
        for t in g.initializer:
            k = 1
            for d in t.dims:
                k *= int(d)
            params += k
    return bn, nodes, params


def _opset(model: ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


# Placeholders are made for initializers of at least this many bytes, counted at 4 bytes a value
# (smaller ones are copied whole: a placeholder saves a copy of the bytes and costs a few field copies).
_PLACEHOLDER_BYTES = 1 << 12


def _has_unknown(msg: Message) -> bool:
    """True when ``msg`` holds fields this protobuf schema does not know (a field copy would drop them)."""
    return len(UnknownFieldSet(msg)) > 0


def _copy_model(model: ModelProto) -> tuple[ModelProto, dict[str, TensorProto]]:
    """A copy of ``model`` in which the large initializers of the main graph are placeholders.

    A placeholder holds every field of its tensor but ``raw_data``; ``sources`` maps its name to the
    original, from which the fold reads the values. A tensor the fold rewrites is written once, with
    its new values; the others get their bytes copied at the end (:func:`_fill_placeholders`). So
    each weight is copied once, instead of a whole-model copy whose weights are then overwritten.
    A plain whole copy is made when no tensor is large enough to pay for a placeholder, when
    initializer names repeat (a placeholder is found by name) or when a message holds fields this
    protobuf schema does not know (a field copy would drop them).
    """
    work = ModelProto()
    graph = model.graph
    big: set[int] = set()
    names: set[str] = set()
    for k, t in enumerate(graph.initializer):
        names.add(t.name)
        size = 1
        for d in t.dims:
            size *= d
        if size * 4 >= _PLACEHOLDER_BYTES and t.HasField("raw_data") and not _has_unknown(t):
            big.add(k)
    if not big or len(names) != len(graph.initializer) or _has_unknown(model) or _has_unknown(graph):
        work.CopyFrom(model)
        return work, {}
    copy_fields(model, work, {"graph"})
    copy_fields(graph, work.graph, {"initializer"})
    sources: dict[str, TensorProto] = {}
    inits = work.graph.initializer
    run: list[TensorProto] = []  # consecutive small tensors, copied in one call (order kept)
    for k, t in enumerate(graph.initializer):
        if k not in big:
            run.append(t)
            continue
        if run:
            inits.extend(run)
            run = []
        copy_fields(t, inits.add(), {"raw_data"})
        sources[t.name] = t
    if run:
        inits.extend(run)
    return work, sources


def _fill_placeholders(work: ModelProto, sources: dict[str, TensorProto]) -> None:
    """Give each placeholder still in the folded model the bytes of its original."""
    if not sources:
        return
    for t in work.graph.initializer:
        src = sources.get(t.name)
        if src is not None:
            t.raw_data = src.raw_data
    sources.clear()


def _fold_graph(
    graph: GraphProto,
    outer: GraphIndex | None,
    outer_ev: ConstEvaluator | None,
    prefix: str,
    ctx: _Ctx,
    main: bool,
) -> list[Verdict]:
    # Labels of unnamed nodes come from the graph as given (indices shift as nodes are removed).
    node_label = node_labels(graph)
    sources = ctx.sources if main else {}
    labels: dict[str, str] = {}
    order: list[str] = []
    seen: dict[str, int] = {}
    for i, n in enumerate(graph.node):
        if is_bn(n):
            key = n.output[0]
            label = prefix + (text(n.name) or node_label.get(key, f"BatchNormalization_{i}"))
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:  # node names need not be unique: keep the verdicts apart
                label = f"{label}#{seen[label]}"
            labels[key] = label
            order.append(key)
    final: dict[str, Verdict] = {}
    candidates: set[str] = set()
    add_inputs = main and ctx.ir_version < 4

    def build() -> GraphIndex:
        return GraphIndex.build(
            graph,
            outer,
            ctx.ir_version,
            labels=node_label,
            sources=sources,
            inferred=ctx.inferred,
            shadowed=ctx.shadowed,
        )

    def rewriter(index: GraphIndex) -> PassRewriter:
        return PassRewriter(graph, index, ctx.names, add_inputs=add_inputs, flush=ctx.flush)

    held: dict[str, Verdict] = {}
    if order:  # training-mode BNs: constants evaluated, InstanceNorm on request (bnfold.onnx.batch_stats)
        index = build()
        held = batch_stats_pass(
            graph,
            index,
            ConstEvaluator(index, ctx.opset, outer_ev),
            labels,
            prefix,
            ctx.opset,
            ctx.batch_stats,
            ctx.exclude,
        )
        final.update(held)
        ctx.converted += sum(1 for v in held.values() if isinstance(v, Site) and v.target_kind != "constant")
    has_subgraphs = False
    for _ in range(_MAX_PASSES):
        index = build()
        has_subgraphs = index.has_subgraphs  # a fold adds no subgraph and removes none that holds one
        ev = ConstEvaluator(index, ctx.opset, outer_ev)
        rw = rewriter(index)
        locked: set[int] = set()
        applied = 0
        for i, n in enumerate(index.nodes):
            plan: Fold | None = None
            if is_bn(n):
                if i in locked:
                    continue
                key = n.output[0]
                label = labels.get(key, prefix + index.label(i))
                if key in held:
                    continue  # refused by the batch-statistics pass, with its own reason
                if label in ctx.exclude:  # the caller keeps this BN (e.g. its fold failed verification)
                    final[key] = Skip(label, SkipReason.VERIFICATION, "left in place: excluded from folding")
                    continue
                v = match_bn(index, ev, i, label)
                if isinstance(v, Skip):
                    final[key] = v
                    continue
                plan = v
            elif n.op_type == "Add" and i not in locked:
                plan = match_mul_add(index, ev, i)
            if plan is None:
                continue
            touched = set(plan.locks) | set(plan.remove)
            if touched & locked:
                continue  # another plan edits this node in this pass: match again in the next one
            locked |= touched
            # Read before applying: applying renames the BN's neighbours.
            bn_key = index.nodes[plan.remove[0]].output[0] if is_bn(index.nodes[plan.remove[0]]) else None
            rec = exact_fold(index, ev, plan, ctx.exact) if ctx.merge else None
            site = rw.apply(plan)
            applied += 1
            if rec is not None:  # recorded under the names the conv reads once the fold is applied
                conv = index.nodes[rec[0]]
                rec[1].bias_name = conv.input[2]
                ctx.exact[conv.input[1]] = rec[1]
            if bn_key is not None:
                final[bn_key] = site
            else:
                ctx.mul_add.append(site)
        rw.finish()
        candidates |= rw.candidates
        ctx.flushed += rw.flushed
        if not applied:
            if ctx.merge and _merge_pass(graph, build(), outer_ev, prefix, ctx, labels, final, candidates):
                continue  # fold again: a BN on a merged sum now folds into the merged conv
            break

    if ctx.propagate:  # If / Loop / Scan bodies too: their own constants only (an outer one refuses)
        dead, flushed = propagate_graph(graph, build, ctx.opset, ctx.names, labels, final, flush=ctx.flush)
        candidates |= dead
        ctx.flushed += flushed

    if ctx.affine:
        index = build()
        ev = ConstEvaluator(index, ctx.opset, outer_ev)
        rw = rewriter(index)
        for i, n in enumerate(index.nodes):
            if not is_bn(n):
                continue
            prev = final.get(n.output[0])
            if isinstance(prev, Skip) and prev.reason in (SkipReason.TRAINING_MODE, SkipReason.VERIFICATION):
                continue
            key = n.output[0]
            plan = match_affine(index, ev, i, labels.get(key, prefix + index.label(i)), ctx.opset)
            if plan is not None:
                final[key] = rw.apply(plan)
        rw.finish()
        candidates |= rw.candidates
        ctx.flushed += rw.flushed

    verdicts = [final[k] for k in order if k in final]
    if has_subgraphs:
        index = build()
        ev = ConstEvaluator(index, ctx.opset, outer_ev)
        for i, n in enumerate(index.nodes):
            for attr, sub in node_subgraphs(n):
                sub_prefix = f"{prefix}{index.label(i)}/{attr}/"
                verdicts.extend(_fold_graph(sub, index, ev, sub_prefix, ctx, main=False))
    remove_dead(graph, candidates, outer, ctx.ir_version)
    return verdicts


def _drop_empty_bn_outputs(model: ModelProto) -> None:
    """A BatchNormalization left in place loses its trailing empty outputs (``["Y", "", "", "", ""]``).

    An empty name is an absent optional output, so nothing changes; onnxruntime (1.2x) takes five
    output slots as training mode and crashes on the empty ones.
    """
    for g in all_graphs(model.graph):
        for n in g.node:
            if is_bn(n) and n.output and not n.output[-1]:
                keep = list(n.output)
                while len(keep) > 1 and not keep[-1]:
                    keep.pop()
                del n.output[len(keep) :]


def _check_groups(model: ModelProto) -> None:
    """Refuse a Conv / ConvTranspose whose initializer weight does not fit its groups (from the dims:
    no weight is read); a computed weight is checked when it is resolved (:func:`~.plan.conv_groups`).
    Refuse a BatchNormalization without an output (its verdict is keyed by its output)."""
    for g in all_graphs(model.graph):
        dims = {t.name: t.dims for t in g.initializer}
        for n in g.node:
            if is_bn(n) and not n.output:
                raise ModelFormatError(f"BatchNormalization '{text(n.name)}' has no output: not a valid node")
            if n.op_type in ("Conv", "ConvTranspose") and n.domain in ("", "ai.onnx") and len(n.input) > 1:
                d = dims.get(n.input[1])
                if d is not None:
                    conv_groups(n, tuple(int(v) for v in d))


def _merge_pass(
    graph: GraphProto,
    index: GraphIndex,
    outer_ev: ConstEvaluator | None,
    prefix: str,
    ctx: _Ctx,
    labels: dict[str, str],
    final: dict[str, Verdict],
    candidates: set[str],
) -> bool:
    """One branch-merge pass (:mod:`bnfold.onnx.merge`); True when something merged."""
    res = _merge_branches(
        graph,
        index,
        ConstEvaluator(index, ctx.opset, outer_ev),
        ctx.names,
        prefix=prefix,
        bn_labels=labels,
        exclude=ctx.exclude,
        add_inputs=index.outer is None and ctx.ir_version < 4,
        flush=ctx.flush,
        exact=ctx.exact,
    )
    for m in res.merges:
        ctx.merges[m.sum] = m
    final.update(res.absorbed)
    candidates |= res.candidates
    ctx.flushed += res.flushed
    return res.applied > 0


def _count_convs(model: ModelProto) -> int:
    return sum(1 for g in all_graphs(model.graph) for n in g.node if n.op_type == "Conv")


def fold_model(
    model: ModelProto,
    *,
    options: FoldOptions | None = None,
    dry_run: bool = False,
    inplace: bool = False,
    exclude: frozenset[str] | set[str] = frozenset(),
    **choices: Any,
) -> tuple[ModelProto, FoldReport]:
    """Fold every exactly-foldable BatchNormalization node of an ONNX model.

    Args:
        model: the model (weights loaded, external data included).
        options: the rewrite choices (:class:`~bnfold.options.FoldOptions`); this backend reads
            ``affine``, ``merge_branches``, ``batch_stats``, ``propagate`` and ``flush_as_written``.
            None: the defaults of ``bnfold.fold`` without the flush (a direct call writes the exact
            rounded fold; ``bnfold.fold`` flushes).
        dry_run: decide only; the model returned is the one given, unchanged.
        inplace: edit ``model`` itself (no copy of the model); otherwise a copy is folded and
            ``model`` is left untouched. Note: with protobuf's upb backend the replaced bytes of a
            rewritten initializer stay in the model's arena until the model is freed, so an in-place
            fold grows the process by the size of the weights it rewrites.
        exclude: labels of BNs to leave in place (their verdict says why).
        choices: :class:`~bnfold.options.FoldOptions` fields that replace those of ``options``
            (``fold_model(m, propagate=False)``). What they do:

            * ``affine``: turn each BN that nothing can absorb into one Mul and one Add with constant operands;
            * ``flush_denormals`` (as written, not with ``health``): set the subnormal values of every
              tensor the fold writes to zero as it is written (float32/float64/bfloat16; see
              :mod:`bnfold.denormals`); ``report.flushed_denormals`` says how many (None when not asked);
            * ``merge_branches``: merge sums of branches that read one tensor (Conv, identity, BN,
              AveragePool, each optionally scaled) into one Conv, and fold a BN on the sum into it
              (:mod:`bnfold.onnx.merge`); ``report.merges`` lists each sum, merged or refused;
            * ``batch_stats``: "instance" replaces each BN that normalises with its batch (training mode)
              by an InstanceNormalization, exact at batch 1 only (:mod:`bnfold.onnx.batch_stats`); None
              leaves them. A training-mode BN on a constant input is evaluated to a constant either way;
            * ``propagate``: split each BN still left into its scale and shift and move them, by exact
              identities, through Relu / LeakyRelu / pooling / Flatten / zero padding into the next
              Conv / Gemm / MatMul (:mod:`bnfold.onnx.propagate`); verdict direction ``propagated``.

    Returns:
        ``(folded model, report)``; the report has one verdict per BatchNormalization node.

    Raises:
        InputError: ``model`` is not an ``onnx.ModelProto``.
        ModelFormatError: a Conv / ConvTranspose weight does not fit the layer's groups (checked
            before anything is edited).
        TypeError: a name in ``choices`` that is not an option.
    """
    opts = (options or _DIRECT).given(choices)
    if not isinstance(model, ModelProto):
        raise InputError(f"expected an onnx.ModelProto, got {type(model).__name__}")
    t0 = time.perf_counter()
    _check_groups(model)  # before anything is edited: an invalid layer stops the fold, not half of it
    sources: dict[str, TensorProto] = {}
    if inplace and not dry_run:
        work = model
    else:
        work, sources = _copy_model(model)  # one copy of each weight (see _copy_model)
    bn_before, nodes_before, params_before = _figures(work)
    convs_before = _count_convs(work)
    ctx = _Ctx(
        _opset(work),
        opts.affine,
        Names(work),
        int(work.ir_version),
        exclude=frozenset(exclude),
        flush=opts.flush_as_written and not dry_run,
        sources=sources,
        merge=opts.merge_branches,
        propagate=opts.propagate,
        inferred=LazyTypes(model),  # the model as given; nothing inferred is written to it
        batch_stats=opts.batch_stats,
        shadowed=shadowed_names(work.graph),
    )
    if work is model:
        ctx.inferred.prime_if_needed(model, opts.affine)
    # The index holds no reference cycles; the cyclic collector would only re-walk every object of a
    # large graph again and again (super-linear time), so it is paused for the fold.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        verdicts = _fold_graph(work.graph, None, None, "", ctx, main=True)
        if not dry_run:
            _fill_placeholders(work, sources)
            _drop_empty_bn_outputs(work)
    finally:
        release_scratch()
        if gc_was_enabled:
            gc.enable()
    bn_after, nodes_after, params_after = _figures(work)
    notes: tuple[str, ...] = (
        (f"{len(ctx.mul_add)} per-channel Mul+Add pair(s) folded into the layer before them",)
        if ctx.mul_add
        else ()
    )
    if ctx.converted:
        notes += (_BATCH_NOTE.format(n=ctx.converted),)
    merges = tuple(ctx.merges.values())
    n_merged = sum(1 for m in merges if m.merged)
    if n_merged:
        notes += (
            f"{n_merged} sum(s) of branches merged into one Conv each "
            f"({sum(m.branches_merged for m in merges if m.merged)} branches)",
        )
    refused = [m for m in merges if not m.merged]
    if refused:
        why = sorted({b.reason.value for m in refused for b in m.branches if b.reason is not None})
        notes += (
            f"{len(refused)} sum(s) of branches of one tensor left unmerged ({', '.join(why)}): "
            "see 'merges' in --json",
        )
    report = FoldReport(
        backend="onnx",
        verdicts=verdicts,
        dry_run=dry_run,
        bn_before=bn_before,
        nodes_before=nodes_before,
        params_before=params_before,
        bn_after=bn_after,
        nodes_after=nodes_after,
        params_after=params_after,
        mul_add=tuple(ctx.mul_add),
        notes=notes,
        post=PostFoldResult(flushed_denormals=ctx.flushed if ctx.flush else None),
        seconds=time.perf_counter() - t0,
        merges=merges,
        convs_before=convs_before,
        convs_after=_count_convs(work),
    )
    return (model if dry_run else work), report
