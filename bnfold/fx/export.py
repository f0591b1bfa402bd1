"""Fold BatchNorm in a ``torch.export`` program: the driver of the export backend.

Stages, as in the module and ONNX backends: :mod:`bnfold.fx.export_match` (structure -> one
``ExportCandidate | Skip`` per batch-norm op, by schema), :mod:`bnfold.fx.export_plan`
(float64 numbers -> new tensors, or ``Skip(OVERFLOW)``), :mod:`bnfold.fx.export_rewrite` (apply
only). The rewritten unlifted module is exported again (non-strict) with the program's own example
inputs; dynamic dimensions (plain symbols on positional inputs) are carried over, and when they
cannot be re-derived the program is exported with static shapes and a note says so.

A dry run predicts ``bn_after`` and ``params_after`` by counting what the rewrite removes and adds
(:func:`_predict_params`); ``nodes_after`` stays ``nodes_before``: the re-export decides the node
count (it may add ``getitem`` nodes to a batch norm that is left, for one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
from torch import fx

from bnfold.errors import UnsupportedModelError
from bnfold.records import FoldReport, Merge, Site, Verdict

from .export_match import ExportCandidate, find_export_sites, layer_weight
from .export_merge import conv_ops, merge_exported_graph
from .export_plan import plan_export_sites
from .export_rewrite import apply_exported

__all__ = ["fold_exported"]

log = logging.getLogger(__name__)


def fold_exported(
    ep: torch.export.ExportedProgram,
    *,
    dry_run: bool = False,
    merge_branches: bool = False,
    exclude_merges: frozenset[str] = frozenset(),
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """Fold every exactly-foldable BN of an exported program; return a new program and the report.

    Args:
        ep: the program (not changed).
        dry_run: decide only; ``ep`` comes back as given.
        merge_branches: first merge sums of branches of one tensor into one convolution
            (:mod:`bnfold.fx.export_merge`, from the original weights and BN statistics, rounded once);
            ``report.merges`` lists each sum, merged or refused.
        exclude_merges: sum labels to leave unmerged (culprit bisection).

    Returns:
        ``(program, report)``: the program runs, re-exports and saves with ``torch.export.save``.

    Raises:
        UnsupportedModelError: the program carries no example inputs to export it again with.
    """
    t0 = time.perf_counter()
    if dry_run and merge_branches:  # predict: the real merge and fold on a copy
        _, full = fold_exported(ep, merge_branches=True, exclude_merges=exclude_merges)
        if any(m.merged for m in full.merges):
            return ep, replace(full, dry_run=True, seconds=time.perf_counter() - t0)
    gm = ep.module()
    merges: tuple[Merge, ...] = ()
    absorbed: list[Site] = []
    convs_before = conv_ops(gm)
    if merge_branches:
        mres = merge_exported_graph(gm, exclude=exclude_merges)
        merges, absorbed = tuple(mres.merges), mres.absorbed
    applied = sum(1 for m in merges if m.merged)
    matched, writes = plan_export_sites(gm, find_export_sites(gm))
    folds = [c for c in matched if isinstance(c, ExportCandidate)]
    verdicts: list[Verdict] = [*absorbed, *(c.site if isinstance(c, ExportCandidate) else c for c in matched)]
    nodes_before = sum(1 for _ in ep.graph.nodes)
    notes: tuple[str, ...] = ()
    if applied:
        notes = (
            f"{applied} sum(s) of branches merged into one conv each "
            f"({sum(m.branches_merged for m in merges if m.merged)} branches)",
        )
    report = FoldReport(
        backend="export",
        verdicts=verdicts,
        dry_run=dry_run,
        nodes_before=nodes_before,
        params_before=sum(t.numel() for t in ep.state_dict.values()),
        bn_before=len(verdicts),
        bn_after=len(verdicts) - len(folds) - len(absorbed),
        merges=merges,
        notes=notes,
        convs_before=convs_before,
        convs_after=conv_ops(gm),  # merged or not: the folds that follow leave the convs
    )
    if dry_run or not (folds or applied):
        return ep, replace(
            report,
            nodes_after=nodes_before,
            params_after=_predict_params(ep, gm, folds, writes),
            seconds=time.perf_counter() - t0,
        )
    apply_exported(gm, folds, writes)
    if ep.example_inputs is None:
        raise UnsupportedModelError(
            "the exported program has no example inputs to export the folded graph with"
        )
    args_in, kwargs_in = ep.example_inputs
    dynamic = _dynamic_shapes(ep) if any(True for _ in ep.range_constraints) else None
    new_ep = None
    if dynamic is not None:
        try:
            new_ep = torch.export.export(
                gm, tuple(args_in), dict(kwargs_in), dynamic_shapes=dynamic, strict=False
            )
        except Exception as e:  # the dims could not be re-derived: fall back to static shapes, say so
            log.debug("re-export with dynamic shapes failed: %s", e)
    if new_ep is None:
        new_ep = torch.export.export(gm, tuple(args_in), dict(kwargs_in), strict=False)
        if any(True for _ in ep.range_constraints):
            notes = (
                *notes,
                "the folded program was exported again with static shapes (its dynamic dims could not "
                "be carried over)",
            )
    return new_ep, replace(
        report,
        notes=notes,
        nodes_after=sum(1 for _ in new_ep.graph.nodes),
        params_after=sum(t.numel() for t in new_ep.state_dict.values()),
        seconds=time.perf_counter() - t0,
    )


def _dynamic_shapes(ep: torch.export.ExportedProgram) -> tuple[Any, ...] | None:
    """``dynamic_shapes`` for exporting again with the program's own dynamic dims, or None.

    Each user input's placeholder carries a fake tensor whose symbolic dims name the program's range
    constraints; a plain symbol becomes one ``torch.export.Dim`` with the same bounds (shared where the
    symbol is shared). Only positional tensor inputs and plain symbols are handled.
    """
    import sympy

    if ep.example_inputs is None or ep.example_inputs[1]:
        return None
    user = set(ep.graph_signature.user_inputs)
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    dims: dict[str, Any] = {}
    spec: list[Any] = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        entry: dict[int, Any] = {}
        for i, d in enumerate(val.shape):
            if isinstance(d, int):
                continue
            expr = d.node.expr
            if not isinstance(expr, sympy.Symbol) or str(expr) not in ranges:
                return None
            name = str(expr)
            if name not in dims:
                vr = ranges[name]
                lo, hi = int(vr.lower), vr.upper
                hi_i = _finite_int(hi)
                dims[name] = (
                    torch.export.Dim(f"d_{name}", min=lo, max=hi_i)
                    if hi_i is not None
                    else (torch.export.Dim(f"d_{name}", min=lo))
                )
            entry[i] = dims[name]
        spec.append(entry or None)
    return tuple(spec)


def _finite_int(v: Any) -> int | None:
    """``int(v)`` for a finite bound; None for sympy's ``oo`` and torch's ``int_oo`` (whose
    ``is_finite`` is True although it is unbounded)."""
    if getattr(v, "is_infinite", False) or "Infinity" in type(v).__name__:
        return None
    try:
        return int(v)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _predict_params(
    ep: torch.export.ExportedProgram,
    gm: fx.GraphModule,
    folds: list[ExportCandidate],
    writes: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]],
) -> int:
    """The parameter count of the program a fold would export, counted without rewriting.

    A tensor whose reads all go (the folded BNs' four, each written layer's old weight and bias, and
    tensors no node read: :func:`~bnfold.fx.export_rewrite.apply_exported` drops unread attributes)
    leaves the program; each written layer adds its new weight and bias.
    """
    readers: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers[str(n.target)] = readers.get(str(n.target), 0) + len(n.users)
    reads: list[object] = [
        c.bn_args[k] for c in folds for k in ("weight", "bias", "running_mean", "running_var")
    ]
    for node in writes:
        got = layer_weight(node)
        assert got is not None
        reads += [got[1], got[2]]
    for r in reads:
        if isinstance(r, fx.Node):
            readers[str(r.target)] -= 1
    kept: int = sum(int(t.numel()) for name, t in ep.state_dict.items() if readers.get(name, 1) > 0)
    return kept + sum(w.numel() + b.numel() for w, b in writes.values())
