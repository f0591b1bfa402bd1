"""Fold the BatchNorms of an ``nn.Module``: trace with ``torch.fx``, or fall back to what is provably safe.

Rules:

1. Inference semantics only. A model (or a BN in it) in ``train()`` mode is refused with
   :class:`~bnfold.errors.ModelStateError` unless ``eval_semantics=True``; then the copy is traced in
   eval mode and every module gets its ``training`` flag back afterwards. Uninitialised lazy modules
   raise :class:`~bnfold.errors.UnsupportedModelError`.
2. The whole model traces (``torch.fx`` with BN and layers as leaves): every BN call gets a verdict
   (:mod:`bnfold.fx.match`). When every fold can be written into the modules (each layer and BN is
   called once and read nowhere else) the result is the model's own class: weights folded, BN
   replaced by ``nn.Identity()``, so its ``state_dict`` loads into the same architecture with BN
   replaced by Identity. When a fold needs a different call graph (a module called at several
   places, cloned per call site; functional ``F.batch_norm``) the result is a
   ``torch.fx.GraphModule`` (``graph=None``, the default), or those BNs are left with
   ``SHARED_MODULE`` (``graph=False``, and always with ``inplace=True``, which must keep the object).
3. The model does not trace (Python control flow on tensor values, as in detection heads): each
   submodule is traced on its own, top down; folds inside a submodule that traces are applied in
   module mode (BN -> Identity), but only when the code of every untraceable ancestor calls that
   submodule whole and never reaches into it (:mod:`bnfold.fx.safety` reads that code). BNs in no
   traceable submodule, or in one an ancestor reaches into: ``NOT_TRACEABLE`` with the reason.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import InputError, ModelStateError, UnsupportedModelError
from bnfold.records import FoldReport, Skip, SkipReason, Verdict

from .match import Candidate, Tracer, fetch_attr, find_sites, is_bn_module
from .rewrite import apply_graph_mode, apply_module_mode, plan_sites
from .safety import unsafe_use

__all__ = ["fold_module"]

log = logging.getLogger(__name__)


def _check_lazy(module: nn.Module) -> None:
    from torch.nn.modules.lazy import LazyModuleMixin
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    for name, m in module.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[misc]
            raise UnsupportedModelError(
                f"'{name or type(m).__name__}' is a lazy module that is not initialised yet: "
                "run one forward pass before folding"
            )
    for t in [*module.parameters(), *module.buffers()]:
        if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
            raise UnsupportedModelError(
                "the model holds uninitialised lazy parameters: run one forward pass first"
            )


def _check_mode(module: nn.Module, eval_semantics: bool) -> None:
    if eval_semantics:
        return
    names = [n or "<root>" for n, m in module.named_modules() if m.training and (not n or is_bn_module(m))]
    if names:
        raise ModelStateError(
            f"the model is in train() mode ({', '.join(names[:3])}{'...' if len(names) > 3 else ''}): folding "
            "uses the running statistics of inference; call model.eval() first, or pass eval_semantics=True"
        )


def _count(module: nn.Module) -> tuple[int, int]:
    mods = sum(1 for _ in module.modules())
    params = sum(t.numel() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    return mods, params


def _trace(root: nn.Module) -> fx.Graph:
    return Tracer().trace(root)


def _shape_prop(root: nn.Module, graph: fx.Graph, example_inputs: tuple[Any, ...]) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.GraphModule(root, graph)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001 - the model rejected the inputs the user gave
        msg = str(e).splitlines()[-1] if str(e) else type(e).__name__
        raise InputError(f"the model does not run on example_inputs: {msg}") from e
    for a, b in zip(graph.nodes, gm.graph.nodes):
        if "tensor_meta" in b.meta:
            a.meta["tensor_meta"] = b.meta["tensor_meta"]


def _demote(c: Candidate) -> Skip:
    return Skip(
        c.site.bn,
        SkipReason.SHARED_MODULE,
        f"{c.graph_why}: folding needs a GraphModule (call with graph=True and inplace=False)",
    )


def _drop_trace_constants(module: nn.Module, before: dict[int, set[str]]) -> None:
    """Remove the ``_tensor_constant*`` attributes fx tracing set on the user's modules.

    The copy (or GraphModule) that needs them was made before; the given model must come back as it
    was (in module mode the model's own ``forward`` never reads them).
    """
    for m in module.modules():
        known = before.get(id(m))
        if known is None:
            continue
        for k in [k for k in vars(m) if k not in known and k.startswith("_tensor_constant")]:
            delattr(m, k)


def _bn_names(module: nn.Module) -> set[str]:
    return {n for n, m in module.named_modules() if is_bn_module(m)}


def fold_module(
    module: nn.Module,
    *,
    inplace: bool = False,
    dry_run: bool = False,
    eval_semantics: bool = False,
    graph: bool | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> tuple[nn.Module, FoldReport]:
    """Fold every exactly-foldable BatchNorm of ``module``.

    Args:
        module: the model. It is not changed unless ``inplace=True``.
        inplace: fold into ``module`` itself (module mode only: it keeps its class and forward).
        dry_run: decide only; ``module`` comes back as given.
        eval_semantics: fold a model in ``train()`` mode with its inference semantics.
        graph: None: return a ``torch.fx.GraphModule`` only when a fold needs one (a module called
            at several places, functional BN); False: never (those BNs are left); True: always when
            the model traces.
        example_inputs: optional positional inputs; used to record shapes (proves Linear -> BN1d
            on 2-D input).
        exclude: BN names (as in the report's verdicts) to leave in place, with reason
            ``SkipReason.VERIFICATION`` (used by culprit bisection).

    Returns:
        ``(model, report)``; ``report.extra["result"]`` says "module" or "graph_module".

    Raises:
        ModelStateError: the model is in ``train()`` mode and ``eval_semantics`` is False.
        UnsupportedModelError: a lazy module is not initialised, or the module is TorchScript.
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "a TorchScript module (torch.jit.script/trace) cannot be folded: its BatchNorms are compiled "
            "code; fold the nn.Module first (bnfold.fold(model)), then script or trace the result"
        )
    _check_lazy(module)
    _check_mode(module, eval_semantics)
    nodes_before, params_before = _count(module)
    if inplace:
        graph = False
    # Analyse on the model itself when nothing changes it (no eval() needed): the copy made
    # afterwards can then skip the weights the fold replaces anyway.
    late_copy = not (inplace or dry_run or eval_semantics)
    work: nn.Module | None = module if (inplace or dry_run) else None
    if work is None and not late_copy:
        work = copy.deepcopy(module)
    seen = work if work is not None else module
    flags = {id(m): m.training for m in seen.modules()}
    attrs_before = {id(m): set(vars(m)) for m in module.modules()}
    if eval_semantics:
        seen.eval()
    try:
        analysis = _analyse(seen, graph, example_inputs)
        if exclude and not isinstance(analysis, str):
            analysis = _exclude(analysis, frozenset(exclude))
        if isinstance(analysis, str):
            work = work if work is not None else copy.deepcopy(module)
            report, out = _fold_fallback(work, dry_run, analysis)
        else:
            shared: list[nn.Module] = []
            if work is None:
                work, shared = _copy_skipping_folded(module, analysis)
            report, out = _apply(work, analysis, dry_run)
            originals = {id(q) for q in module.parameters()} if shared else set()
            for layer in shared:  # a layer whose fold was refused late must not share the original's weights
                for pname in ("weight", "bias"):
                    p = getattr(layer, pname)
                    if p is not None and id(p) in originals:
                        setattr(layer, pname, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    finally:
        for m in seen.modules():
            if id(m) in flags:
                m.training = flags[id(m)]
        if work is not None:
            for m in work.modules():
                if id(m) in flags:
                    m.training = flags[id(m)]
        _drop_trace_constants(module, attrs_before)
    if dry_run:
        out = module
    report.nodes_before, report.params_before = nodes_before, params_before
    report.nodes_after, report.params_after = _count(out) if not dry_run else (nodes_before, params_before)
    report.bn_before = len(report.verdicts)
    report.bn_after = len(report.skips) if not dry_run else report.bn_before
    report.dry_run = dry_run
    return out, report


@dataclass
class _Analysis:
    graph: fx.Graph
    verdicts: list[Verdict]
    cands: list[Candidate]
    use_graph: bool


def _analyse(root: nn.Module, graph: bool | None, example_inputs: tuple[Any, ...] | None) -> _Analysis | str:
    """Trace and decide (Rule 2); the trace error as a string when the model does not trace."""
    try:
        g = _trace(root)
    except Exception as e:  # noqa: BLE001 - any trace failure means "fall back"
        log.debug("symbolic_trace failed: %s", e)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if example_inputs is not None:
        _shape_prop(root, g, example_inputs)
    verdicts, cands = find_sites(g, root)
    verdicts = _add_uncalled(root, verdicts)
    use_graph = graph is True or (graph is None and any(c.needs_graph for c in cands))
    if not use_graph:
        demoted = {c.site.bn: _demote(c) for c in cands if c.needs_graph}
        verdicts = [demoted.get(v.bn, v) for v in verdicts]
        cands = [c for c in cands if not c.needs_graph]
    return _Analysis(g, verdicts, cands, use_graph)


def _exclude(a: _Analysis, names: frozenset[str]) -> _Analysis:
    """The analysis with the BNs in ``names`` left in place (reason: verification)."""
    keep = [c for c in a.cands if c.site.bn not in names]
    verdicts: list[Verdict] = [
        Skip(v.bn, SkipReason.VERIFICATION, "left in place: excluded from folding") if v.bn in names else v
        for v in a.verdicts
    ]
    return _Analysis(a.graph, verdicts, keep, a.use_graph)


def _copy_skipping_folded(module: nn.Module, a: _Analysis) -> tuple[nn.Module, list[nn.Module]]:
    """``deepcopy`` that does not copy the weights the fold replaces by new tensors anyway.

    Only weights used by exactly one module are skipped; the copy's layers get new Parameters when
    the fold is applied (and :func:`fold_module` clones any that end up not folded).
    """
    owners = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    memo: dict[int, Any] = {}
    names: list[str] = []
    for c in a.cands:
        if a.use_graph and c.site.detail.startswith("cloned:"):
            continue
        target = str(c.layer_node.target)
        layer = fetch_attr(module, target)
        for p in (layer.weight, layer.bias):
            if p is not None and owners[id(p)] == 1:
                memo[id(p)] = p
        names.append(target)
    work = copy.deepcopy(module, memo)
    return work, [fetch_attr(work, n) for n in names]


def _apply(work: nn.Module, a: _Analysis, dry_run: bool) -> tuple[FoldReport, nn.Module]:
    report = FoldReport(backend="fx", verdicts=a.verdicts)
    if a.use_graph:
        gm = fx.GraphModule(work, a.graph, type(work).__name__)
        # The GraphModule refers to the same submodules as work: plan on it, then apply.
        state, kept, report.verdicts = plan_sites(gm, a.cands, a.verdicts)
        report.extra["result"] = "graph_module"
        if dry_run:
            return report, work
        clones = {str(c.layer_node.target) for c in kept if c.site.detail.startswith("cloned:")}
        apply_graph_mode(gm, state, kept, clones)
        report.notes.append("returned a torch.fx.GraphModule: some folds needed a change of the call graph")
        return report, gm
    state, kept, report.verdicts = plan_sites(work, a.cands, a.verdicts)
    report.extra["result"] = "module"
    if not dry_run:
        apply_module_mode(work, state, kept)
    return report, work


def _add_uncalled(root: nn.Module, verdicts: list[Verdict], prefix: str = "") -> list[Verdict]:
    seen = {v.bn.split("#")[0] for v in verdicts}
    extra: list[Verdict] = []
    for n in sorted(_bn_names(root)):
        q = f"{prefix}.{n}" if prefix else n
        if q not in seen:
            extra.append(Skip(q, SkipReason.NO_PRODUCER, "the module is never called by forward"))
    return verdicts + extra


def _ancestors_reach_in(work: nn.Module, name: str) -> str:
    """Why an untraceable ancestor of ``work.<name>`` might use its internals (rule 3); "" if none does."""
    parts = name.split(".")
    for i in range(len(parts)):
        anc_path = ".".join(parts[:i])
        ancestor = work.get_submodule(anc_path) if anc_path else work
        why = unsafe_use(ancestor, ".".join(parts[i:]))
        if why:
            return why
    return ""


def _fold_fallback(work: nn.Module, dry_run: bool, err: str) -> tuple[FoldReport, nn.Module]:
    """Rule 3: trace submodules on their own; apply what is safe in module mode."""
    verdicts: list[Verdict] = []
    done: set[str] = set()
    todo: list[tuple[str, nn.Module]] = list(work.named_children())
    while todo:
        name, sub = todo.pop(0)
        if not any(is_bn_module(m) for m in sub.modules()):
            continue
        if is_bn_module(sub):
            continue  # a BN child called directly by the untraceable forward
        try:
            g = _trace(sub)
        except Exception:  # noqa: BLE001
            todo.extend((f"{name}.{n}", m) for n, m in sub.named_children())
            continue
        why = _ancestors_reach_in(work, name)
        if why:
            for n in sorted(_bn_names(sub)):
                q = f"{name}.{n}"
                verdicts.append(Skip(q, SkipReason.NOT_TRACEABLE, f"'{name}' traces, but {why}"))
                done.add(q)
            continue
        vs, cands = find_sites(g, sub, whole=work, prefix=name)
        vs = _add_uncalled(sub, vs, prefix=name)
        demoted = {c.site.bn: _demote(c) for c in cands if c.needs_graph}
        vs = [demoted.get(v.bn, v) for v in vs]
        cands = [c for c in cands if not c.needs_graph]
        state, kept, vs = plan_sites(sub, cands, vs)
        if not dry_run:
            apply_module_mode(sub, state, kept)
        verdicts.extend(vs)
        done.update(v.bn.split("#")[0] for v in vs)
    for n in sorted(_bn_names(work)):
        if n not in done:
            verdicts.append(
                Skip(n, SkipReason.NOT_TRACEABLE, f"not inside a part of the model that traces ({err})")
            )
    report = FoldReport(backend="module", verdicts=verdicts)
    report.extra["result"] = "module"
    report.notes.append(f"the model does not trace with torch.fx ({err}); folded inside the parts that do")
    return report, work
