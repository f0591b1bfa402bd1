"""Fold the BatchNorms of an ``nn.Module``: trace with ``torch.fx``, or fall back to what is provably safe.

Rules:

0. The caller's model is never traced: tracing runs the model's Python code (a forward may store fx
   Proxies in a cache, fx adds ``_tensor_constant`` attributes), so it runs on a shadow copy that
   shares the tensors; the result is a fresh copy (or the model itself with ``inplace=True``) that
   the fold is applied to by name. Traces hold one process-wide lock (fx patches global state), so
   folds from several threads are safe.
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
   submodule whole and never reaches into it (:mod:`bnfold.fx.safety` reads that code). A BN child
   called by an untraceable forward itself folds when that code provably runs it only as
   ``bn(layer(...))`` (:func:`bnfold.fx.safety.direct_pairs`). BNs in no traceable submodule, or in one
   an ancestor reaches into: ``NOT_TRACEABLE`` with the reason.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import InputError, ModelStateError, UnsupportedModelError
from bnfold.records import FoldReport, Skip, SkipReason, Verdict

from .custom import TRACE_LOCK, first_line
from .match import Candidate, Tracer, fetch_attr, find_sites, is_bn_module
from .rewrite import apply_graph_mode, apply_module_mode, plan_sites
from .safety import direct_pairs, unsafe_use

__all__ = ["fold_module", "copy_model"]

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
        raise InputError(f"the model does not run on example_inputs: {first_line(e)}") from e
    for a, b in zip(graph.nodes, gm.graph.nodes):
        if "tensor_meta" in b.meta:
            a.meta["tensor_meta"] = b.meta["tensor_meta"]


def _demote(c: Candidate) -> Skip:
    return Skip(
        c.site.bn,
        SkipReason.SHARED_MODULE,
        f"{c.graph_why}: folding needs a GraphModule (call with graph=True and inplace=False)",
    )


def _replaced_weights(module: nn.Module, a: _Analysis) -> list[torch.Tensor]:
    """Weights of layers the fold rewrites in place (used by that one layer only): not worth copying."""
    owners = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    out: list[torch.Tensor] = []
    for c in a.cands:
        if a.use_graph and c.site.detail.startswith("cloned:"):
            continue  # the clone copies them; the shared module keeps the originals' values
        for node in [p[0] for p in c.parts] if c.parts else [c.layer_node]:
            layer = fetch_attr(module, str(node.target))
            for prm in (layer.weight, layer.bias):
                if isinstance(prm, torch.Tensor) and owners[id(prm)] == 1:
                    out.append(prm)
    return out


def _copy_trace_constants(graph: fx.Graph, traced: nn.Module, work: nn.Module) -> None:
    """Give ``work`` (a fresh copy) the ``_tensor_constant`` attributes the trace set on ``traced``."""
    for n in graph.nodes:
        if n.op != "get_attr":
            continue
        target = str(n.target)
        try:
            fetch_attr(work, target)
            continue
        except AttributeError:
            pass
        value = fetch_attr(traced, target)
        parent_name, _, attr = target.rpartition(".")
        parent = work.get_submodule(parent_name) if parent_name else work
        setattr(parent, attr, value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value))


def _bn_names(module: nn.Module) -> set[str]:
    return {n for n, m in module.named_modules() if is_bn_module(m)}


def _cached_tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            _cached_tensors(v, out, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple, set)):
        for v in obj:
            _cached_tensors(v, out, depth + 1)


def copy_model(module: nn.Module, *, share_tensors: bool = False, keep: Sequence[torch.Tensor] = ()) -> nn.Module:
    """``copy.deepcopy`` that also copes with tensors cached by a forward (non-leaf, with a grad_fn).

    ``share_tensors``: parameters, buffers and cached tensors are shared, not copied (a shadow for
    tracing, which reads them and never writes them). ``keep``: tensors shared, not copied (weights
    the fold replaces by new ones anyway). Cached tensors that autograd refuses to
    deep-copy (LeViT's eval-mode attention-bias cache) are copied detached.
    """
    memo: dict[int, Any] = {id(t): t for t in keep}  # tensors the caller replaces right after
    if share_tensors:
        for t in [*module.parameters(), *module.buffers()]:
            memo[id(t)] = t
    found: list[torch.Tensor] = []
    for m in module.modules():
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                _cached_tensors(v, found)
    for t in found:
        if id(t) not in memo and not t.is_leaf:
            memo[id(t)] = t.detach() if share_tensors else t.detach().clone()
        elif share_tensors:
            memo[id(t)] = t
    return copy.deepcopy(module, memo)


def _shadow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its tensors (tracing reads them, never writes them).

    Tracing runs the model's Python code, which may store fx ``Proxy`` objects in Python-side
    caches (LeViT's attention-bias cache) or set ``_tensor_constant`` attributes: on this copy, the
    caller's object stays as it was.
    """
    return copy_model(module, share_tensors=True)


# The whole analysis (traces, shape propagation) holds the trace lock: see bnfold.fx.custom.
_TRACE_LOCK = TRACE_LOCK


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
        module: the model. It is not changed unless ``inplace=True`` (and is never traced itself).
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
        ``(model, report)``; ``report.result`` says "module" or "graph_module".

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
    with _TRACE_LOCK:
        # Tracing runs on a shadow copy (tensors shared, Python state not); the result is the given
        # model (inplace) or a fresh copy of it, so no trace state ever reaches either.
        shadow = _shadow(module)
        if eval_semantics:
            shadow.eval()
        analysis = _analyse(shadow, graph, example_inputs)
        if exclude and not isinstance(analysis, str):
            analysis = _exclude(analysis, frozenset(exclude))
        keep = [] if isinstance(analysis, str) else _replaced_weights(module, analysis)
        result = module if (inplace or dry_run) else copy_model(module, keep=keep)
        flags = {id(m): m.training for m in result.modules()}
        if eval_semantics:
            result.eval()
        try:
            if isinstance(analysis, str):
                report, out = _fold_fallback(shadow, result, dry_run, analysis)
            else:
                report, out = _apply(result, analysis, dry_run, shadow)
            if keep and not (inplace or dry_run):
                # a weight kept for a fold that was refused late (overflow) must not stay shared
                kept = {id(t) for t in keep}
                for m in out.modules():
                    for pname, prm in list(m._parameters.items()):
                        if prm is not None and id(prm) in kept:
                            m._parameters[pname] = nn.Parameter(prm.detach().clone(), requires_grad=prm.requires_grad)
        finally:
            for m in result.modules():
                if id(m) in flags:
                    m.training = flags[id(m)]
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
        return first_line(e)
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


def _apply(work: nn.Module, a: _Analysis, dry_run: bool, traced: nn.Module) -> tuple[FoldReport, nn.Module]:
    """Plan on ``traced`` (the copy the graph came from), apply to ``work`` (the same copy, or the
    caller's model for ``inplace``: module mode only, by name)."""
    report = FoldReport(backend="fx", verdicts=a.verdicts)
    if a.use_graph:
        if dry_run:
            _, _, report.verdicts = plan_sites(traced, a.cands, a.verdicts)
            report.result = "graph_module"
            return report, work
        _copy_trace_constants(a.graph, traced, work)
        gm = fx.GraphModule(work, a.graph, type(work).__name__)
        # The GraphModule refers to the same submodules as work: plan on it, then apply.
        state, kept, report.verdicts = plan_sites(gm, a.cands, a.verdicts)
        report.result = "graph_module"
        if dry_run:
            return report, work
        clones = {str(c.layer_node.target) for c in kept if c.site.detail.startswith("cloned:")}
        apply_graph_mode(gm, state, kept, clones)
        report.notes.append("returned a torch.fx.GraphModule: some folds needed a change of the call graph")
        return report, gm
    state, kept, report.verdicts = plan_sites(traced, a.cands, a.verdicts)
    report.result = "module"
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


def _fold_direct_pairs(work: nn.Module, result: nn.Module, dry_run: bool, done: set[str]) -> list[Verdict]:
    """Rule 3, BN children of an untraceable module: ``bn(layer(...))`` pairs its code provably runs
    (:func:`bnfold.fx.safety.direct_pairs`), decided on a two-node graph like any traced pair."""
    verdicts: list[Verdict] = []
    for path, u in work.named_modules():
        if is_bn_module(u) or not any(is_bn_module(c) for c in u.children()):
            continue
        for layer, bn in direct_pairs(u):
            q = f"{path}.{bn}" if path else bn
            if q in done or not is_bn_module(getattr(u, bn, nn.Identity())):
                continue
            if _ancestors_reach_in(work, q) or _ancestors_reach_in(work, f"{path}.{layer}" if path else layer):
                continue
            g = fx.Graph()
            x = g.placeholder("x")
            g.output(g.call_module(bn, (g.call_module(layer, (x,)),)))
            vs, cands = find_sites(g, u, whole=work, prefix=path)
            cands = [c for c in cands if not c.needs_graph]
            vs = [v if any(c.site.bn == v.bn for c in cands) or isinstance(v, Skip) else _demote_site(v) for v in vs]
            state, kept, vs = plan_sites(u, cands, vs)
            if not dry_run:
                apply_module_mode(result.get_submodule(path) if path else result, state, kept)
            verdicts.extend(vs)
            done.update(v.bn for v in vs)
    return verdicts


def _demote_site(v: Verdict) -> Skip:
    return Skip(v.bn, SkipReason.SHARED_MODULE, "the layer or BN is shared: folding would change its other uses")


def _fold_fallback(
    work: nn.Module, result: nn.Module, dry_run: bool, err: str
) -> tuple[FoldReport, nn.Module]:
    """Rule 3: trace submodules of ``work`` (the shadow) on their own; apply what is safe to ``result``."""
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
            apply_module_mode(result.get_submodule(name), state, kept)
        verdicts.extend(vs)
        done.update(v.bn.split("#")[0] for v in vs)
    verdicts.extend(_fold_direct_pairs(work, result, dry_run, done))
    for n in sorted(_bn_names(work)):
        if n not in done:
            verdicts.append(
                Skip(n, SkipReason.NOT_TRACEABLE, f"not inside a part of the model that traces ({err})")
            )
    report = FoldReport(backend="module", verdicts=verdicts)
    report.result = "module"
    report.notes.append(f"the model does not trace with torch.fx ({err}); folded inside the parts that do")
    return report, result
