"""Fold the BatchNorms of an ``nn.Module``: trace with ``torch.fx``, or fall back to what is provably safe.

Rules:

0. The caller's model is never traced: tracing runs the model's Python code (a forward may store fx
   Proxies in a cache, fx adds ``_tensor_constant`` attributes), so it runs on a shadow copy that
   shares the tensors (:func:`bnfold.fx.copying.shadow`). Stages, as in the ONNX backend: match on
   the shadow's graph (:mod:`bnfold.fx.match`), plan on the shadow (:mod:`bnfold.fx.plan`: new
   tensors, OVERFLOW refusals), then copy the result -- leaving out of the copy exactly the tensors
   the plan replaces -- (or take the model itself with ``inplace=True``) and apply the plan to it by
   name (:mod:`bnfold.fx.rewrite`). The result shares no tensor with the caller. Traces hold one
   process-wide lock (fx patches global state), so folds from several threads are safe.
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
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from bnfold.errors import InputError, ModelStateError, UnsupportedModelError
from bnfold.hints import EVAL_SEMANTICS
from bnfold.options import FoldOptions
from bnfold.records import FoldReport, Merge, Site, Skip, SkipReason, Verdict

from .copying import copy_model, shadow
from .layers import Tracer, fetch_attr, is_bn_module
from .match import find_sites
from .plan import Plan, plan_sites
from .rewrite import apply_graph_mode, apply_module_mode, tail_of
from .safety import direct_pairs, unsafe_use
from .sites import Candidate, Matched
from .tracing import TRACE_LOCK, first_line

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
            "uses the running statistics of inference; call model.eval() first",
            hints=[EVAL_SEMANTICS],
        )


def _check_global_hooks() -> None:
    """Forward hooks registered for every module (``register_module_forward_hook`` and ``_pre_hook``) run
    on each call of each layer: removing a BN or changing a conv changes what they see and return, and no
    fold can keep that exact."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise UnsupportedModelError(
            "global module forward hooks are registered (torch.nn.modules.module.register_module_forward_hook "
            "or register_module_forward_pre_hook): they run on every layer, so folding a BN would change what "
            "they compute; remove them before folding"
        )


def _count(module: nn.Module) -> tuple[int, int]:
    """``(modules, parameters)``; ``nn.Identity`` is not counted (a folded BN becomes one: no op)."""
    mods = sum(1 for m in module.modules() if not isinstance(m, nn.Identity))
    params = sum(t.numel() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    return mods, params


def _trace(root: nn.Module) -> fx.Graph:
    """The fx graph of ``root``, without string annotations: a postponed annotation
    (``from __future__ import annotations``) on ``forward`` would make every GraphModule built from it
    (graph-mode folds, merged branches, propagated BNs) fail ``torch.save``."""
    g = Tracer().trace(root)
    for n in g.nodes:
        if isinstance(n.type, str):
            n.type = None
    return g


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` hold the same bytes (NaN equal to the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    try:
        return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
    except (RuntimeError, TypeError):  # a dtype without a byte view (quantized): copy it back anyway
        return False


def _shape_prop(root: nn.Module, graph: fx.Graph, example_inputs: tuple[Any, ...]) -> None:
    """Record the shapes of one run on ``example_inputs`` into ``graph``.

    ``root`` may share the caller's tensors (the shadow copy): a forward that writes a buffer (a
    ``torch.batch_norm`` / ``F.batch_norm`` call with ``training=True`` updates its running statistics)
    would change the caller's model, so every buffer the run changed gets its value back.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm = fx.GraphModule(root, graph)
    saved = [(b, b.detach().clone()) for b in {id(b): b for b in root.buffers()}.values()]
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as e:  # noqa: BLE001 - the model rejected the inputs the user gave
        raise InputError(f"the model does not run on example_inputs: {first_line(e)}") from e
    finally:
        with torch.no_grad():
            for b, before in saved:
                if not _same_bits(b, before):
                    b.copy_(before)
    for a, b in zip(graph.nodes, gm.graph.nodes):
        if "tensor_meta" in b.meta:
            a.meta["tensor_meta"] = b.meta["tensor_meta"]


def _demote(c: Candidate) -> Skip:
    return Skip(
        c.site.bn,
        SkipReason.SHARED_MODULE,
        f"{c.graph_why}: folding needs a GraphModule (call with graph=True and inplace=False)",
        c.site.pattern,
    )


def _replaced(module: nn.Module, a: _Analysis, plan: Plan) -> list[torch.Tensor]:
    """Tensors of ``module`` the fold replaces in the result and no other module reads (owned by
    one name): the result's copy need not copy them, as it never holds them."""
    owners = Counter(
        id(t)
        for _, t in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
    )
    cloned = {n for c in plan.folds if c.site.detail.startswith("cloned:") for n in _layer_nodes(c)}
    out: list[torch.Tensor] = []
    for node in plan.writes:
        if a.use_graph and node in cloned:
            continue  # the clone copies them; the shared module keeps the originals' values
        layer = fetch_attr(module, str(node.target))
        out.extend(
            t for t in (layer.weight, layer.bias) if isinstance(t, torch.Tensor) and owners[id(t)] == 1
        )
    return out


def _layer_nodes(c: Candidate) -> list[fx.Node]:
    return [p[0] for p in c.parts] if c.parts else [c.layer_node]


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
        setattr(
            parent, attr, value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        )


def _bn_names(module: nn.Module) -> set[str]:
    return {n for n, m in module.named_modules() if is_bn_module(m)}


# The whole analysis (traces, shape propagation) holds the trace lock: see bnfold.fx.custom.
_TRACE_LOCK = TRACE_LOCK

_DIRECT = FoldOptions(merge_branches=False)
"""The options of a direct call without any: no branch merge (the module keeps its call graph)."""


def fold_module(
    module: nn.Module,
    *,
    options: FoldOptions | None = None,
    inplace: bool = False,
    dry_run: bool = False,
    graph: bool | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
    **choices: Any,
) -> tuple[nn.Module, FoldReport]:
    """Fold every exactly-foldable BatchNorm of ``module``.

    Args:
        module: the model. It is not changed unless ``inplace=True`` (and is never traced itself).
        options: the rewrite choices (:class:`~bnfold.options.FoldOptions`); this backend reads
            ``eval_semantics`` and ``merge_branches`` (the post-fold steps are :mod:`bnfold.postfold`'s).
            None: the defaults of ``bnfold.fold`` without the branch merge (a direct call keeps the
            module's call graph).
        inplace: fold into ``module`` itself (module mode only: it keeps its class and forward).
        dry_run: decide only; ``module`` comes back as given, and the report predicts the BN,
            module and parameter counts of the result.
        graph: None: return a ``torch.fx.GraphModule`` only when a fold needs one (a module called
            at several places, functional BN); False: never (those BNs are left); True: always when
            the model traces.
        example_inputs: optional positional inputs; used to record shapes (proves Linear -> BN1d
            on 2-D input).
        exclude: BN names (as in the report's verdicts) to leave in place, with reason
            ``SkipReason.VERIFICATION`` (used by culprit bisection).
        choices: :class:`~bnfold.options.FoldOptions` fields that replace those of ``options``
            (``fold_module(m, eval_semantics=True)``). What they do here:

            * ``eval_semantics``: fold a model in ``train()`` mode with its inference semantics;
            * ``merge_branches``: after the folds, merge sums of branches of one tensor into one conv module
              (:mod:`bnfold.fx.merge`; the result is then a ``torch.fx.GraphModule``) and fold again (a
              BN on the sum). Not with ``inplace`` or ``graph=False`` (a merge changes the call graph).
            * ``propagate``: after the folds (and merges), split each BN left into scale and shift and move
              them through ReLU, pooling, flatten and zero padding into the next Conv / Linear
              (:mod:`bnfold.fx.propagate`; the result is then a ``torch.fx.GraphModule``). Not with
              ``inplace``, ``graph=False`` or a model that does not trace whole.

    Returns:
        ``(model, report)``; ``report.result`` says "module" or "graph_module".

    Raises:
        ModelStateError: the model is in ``train()`` mode and ``eval_semantics`` is False.
        UnsupportedModelError: a lazy module is not initialised, or the module is TorchScript.
        TypeError: a name in ``choices`` that is not an option.
    """
    opts = (options or _DIRECT).given(choices)
    eval_semantics = opts.eval_semantics
    if isinstance(module, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "a TorchScript module (torch.jit.script/trace) cannot be folded: its BatchNorms are compiled "
            "code; fold the nn.Module first (bnfold.fold(model)), then script or trace the result"
        )
    t0 = time.perf_counter()
    _check_lazy(module)
    _check_mode(module, eval_semantics)
    _check_global_hooks()
    from .batch_stats import constant_layers

    consts = [c for c in constant_layers(module) if c.site.bn not in exclude]
    if consts:  # weight standardisation: evaluated once, the plain layers then fold as any
        return _fold_constants(module, consts, inplace, dry_run, opts, graph, example_inputs, exclude)
    nodes_before, params_before = _count(module)
    if inplace:
        graph = False
    with _TRACE_LOCK:
        # Tracing runs on a shadow copy (tensors shared, Python state not) and the plan is made on
        # it; the result is the given model (inplace) or a fresh copy of it, so no trace state ever
        # reaches either.
        traced = shadow(module)
        if eval_semantics:
            traced.eval()
        analysis = _analyse(traced, graph, example_inputs)
        plans: list[tuple[str, Plan]] = []  # (prefix, plan) per traced part, for the dry-run figures
        if isinstance(analysis, str):
            plan = None
        else:
            if exclude:
                analysis = _exclude(analysis, frozenset(exclude))
            plan = plan_sites(traced, analysis.matched)
            plans.append(("", plan))
        if dry_run:
            result = module
        elif inplace:
            result = module
        else:
            # The tensors the fold replaces are not copied: the result never holds them.
            keep = [] if plan is None or isinstance(analysis, str) else _replaced(module, analysis, plan)
            result = copy_model(module, keep=keep)
        flags = {id(m): m.training for m in result.modules()}
        if eval_semantics:
            result.eval()
        try:
            if isinstance(analysis, str):
                report, out = _fold_fallback(traced, result, dry_run, analysis, plans)
            else:
                assert plan is not None
                report, out = _apply(result, analysis, plan, dry_run, traced)
        finally:
            for m in result.modules():
                if id(m) in flags:
                    m.training = flags[id(m)]
    if opts.merge_branches and not dry_run and graph is not False and not isinstance(analysis, str):
        out, report = _merge_and_refold(module, out, report, opts, example_inputs, frozenset(exclude))
    traces = not isinstance(analysis, str)
    if opts.propagate and not dry_run and graph is not False and traces:
        out, report = _propagate(out, report, opts.eval_semantics, example_inputs)
    if (
        dry_run
        and graph is not False
        and (opts.merge_branches or (opts.propagate and traces and _movable(report)))
    ):
        # predict: the real fold, merge and propagation on a copy
        _, full = fold_module(
            module, options=opts, graph=graph, example_inputs=example_inputs, exclude=exclude
        )
        if any(m.merged for m in full.merges) or full.verdicts != report.verdicts:
            return module, replace(full, dry_run=True, seconds=time.perf_counter() - t0)
        if opts.merge_branches:
            report = replace(
                report, merges=full.merges, convs_before=full.convs_before, convs_after=full.convs_after
            )
    if dry_run:
        out = module
        # What the rewrite would remove (or add), counted without rewriting (see _predict).
        if isinstance(analysis, str) or not analysis.use_graph:
            nodes_after, params_after = _predict(module, plans)
        else:
            nodes_after, params_after = _predict_graph(module, analysis, plans[0][1], traced)
    else:
        nodes_after, params_after = _count(out)
    from .merge import conv_modules

    return out, replace(
        report,
        # counted as the ONNX backend does, merged or not (a fold or a dry run leaves the convs)
        convs_before=conv_modules(module) if report.convs_before is None else report.convs_before,
        convs_after=conv_modules(out) if report.convs_after is None else report.convs_after,
        nodes_before=nodes_before,
        params_before=params_before,
        bn_before=len(report.verdicts),
        dry_run=dry_run,
        bn_after=len(report.skips),
        nodes_after=nodes_after,
        params_after=params_after,
        seconds=time.perf_counter() - t0,
    )


def _fold_constants(
    module: nn.Module,
    consts: list[Any],
    inplace: bool,
    dry_run: bool,
    options: FoldOptions,
    graph: bool | None,
    example_inputs: tuple[Any, ...] | None,
    exclude: frozenset[str] | set[str],
) -> tuple[nn.Module, FoldReport]:
    """Fold ``module`` with the constant layers (:func:`bnfold.fx.batch_stats.constant_layers`) swapped in:
    into ``module`` itself with ``inplace``, else into a shadow (the caller's module tree untouched)."""
    from .batch_stats import swap_in

    t0 = time.perf_counter()
    nodes_before, params_before = _count(module)
    work = module if inplace and not dry_run else shadow(module)
    swap_in(work, consts)
    out, report = fold_module(
        work,
        options=options,
        inplace=inplace and not dry_run,
        dry_run=dry_run,
        graph=graph,
        example_inputs=example_inputs,
        exclude=exclude,
    )
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    sites = [c.site for c in consts]
    ids = {id(s) for s in sites}
    verdicts = sorted(
        [*sites, *report.verdicts],
        key=lambda v: order.get(v.target if id(v) in ids else v.bn.split("#")[0], len(order)),
    )
    return module if dry_run else out, replace(
        report,
        verdicts=verdicts,
        bn_before=report.bn_before + len(sites),
        nodes_before=nodes_before,
        params_before=params_before,
        seconds=time.perf_counter() - t0,
    )


def _merge_and_refold(
    module: nn.Module,
    out: nn.Module,
    report: FoldReport,
    options: FoldOptions,
    example_inputs: tuple[Any, ...] | None,
    exclude: frozenset[str] = frozenset(),
) -> tuple[nn.Module, FoldReport]:
    """Merge the branch sums of ``out`` (the folded copy) and fold again, a few rounds (a merged conv may make
    another sum mergeable, or a BN on the sum foldable); ``report`` updated."""
    from .merge import conv_modules, exact_folds, merge_graph_module

    applied: list[Merge] = []
    refused: list[Merge] = []
    fixed: dict[str, Site] = {}
    cur = out
    exact = exact_folds(module, report)  # the folded convs in float64: each merge rounds once
    for _ in range(4):
        with _TRACE_LOCK:
            try:
                g = _trace(cur)
            except Exception as e:  # noqa: BLE001 - a model that does not trace keeps its branches
                log.debug("merge: trace failed: %s", e)
                break
            if example_inputs is not None and any(is_bn_module(m) for m in cur.modules()):
                _eval_shapes(cur, g, example_inputs)  # a BN branch merges only where x is batched
            gm = fx.GraphModule(cur, g, type(cur).__name__)
            try:
                res = merge_graph_module(
                    gm, eval_semantics=options.eval_semantics, exact=exact, exclude=exclude
                )
            except Exception as e:  # noqa: BLE001 - an unforeseen form: keep the branches (gm is discarded)
                log.debug("merge failed: %s", e)
                report = replace(report, notes=(*report.notes, f"branch merging stopped: {first_line(e)}"))
                break
        applied += [m for m in res.merges if m.merged]
        refused = [m for m in res.merges if not m.merged]
        fixed.update(res.absorbed)
        if not res.applied:
            break
        cur, again = fold_module(
            gm,
            options=replace(options, merge_branches=False),
            inplace=True,
            example_inputs=example_inputs,
            exclude=exclude,
        )
        fixed.update({v.bn: v for v in again.verdicts if isinstance(v, Site)})
    if not applied:
        return out, replace(
            report, merges=tuple(refused), convs_before=conv_modules(module), convs_after=conv_modules(out)
        )
    verdicts: list[Verdict] = [fixed.get(v.bn, v) if isinstance(v, Skip) else v for v in report.verdicts]
    notes = tuple(n for n in report.notes if "GraphModule" not in n) + (
        "returned a torch.fx.GraphModule: branches were merged into one conv",
    )
    return cur, replace(
        report,
        verdicts=verdicts,
        merges=tuple(applied + refused),
        result="graph_module",
        notes=notes,
        convs_before=conv_modules(module),
        convs_after=conv_modules(cur),
    )


def _movable(report: FoldReport) -> bool:
    """Whether propagation may change ``report``: a BN left with a reason the pass tries."""
    from bnfold.fold_math.propagation import ELIGIBLE

    return any(isinstance(v, Skip) and v.reason in ELIGIBLE for v in report.verdicts)


def _eval_shapes(out: nn.Module, g: fx.Graph, example_inputs: tuple[Any, ...]) -> None:
    """Shapes of one eval-mode run into ``g`` (none where it does not run): a BatchNorm1d's rank (2-D or
    3-D), whether a conv's input is batched, are known only from them."""
    flags = {m: m.training for m in out.modules()}
    out.eval()  # a train()-mode BN (eval_semantics) would update its statistics
    try:
        _shape_prop(out, g, example_inputs)
    except InputError:
        pass
    finally:
        for m, t in flags.items():
            m.training = t


def _propagate(
    out: nn.Module, report: FoldReport, eval_semantics: bool, example_inputs: tuple[Any, ...] | None
) -> tuple[nn.Module, FoldReport]:
    """Scale propagation (:mod:`bnfold.fx.propagate`) on ``out`` (the folded copy); ``report`` updated."""
    from .propagate import propagate_graph_module

    if not _movable(report):
        return out, report
    with _TRACE_LOCK:
        try:
            g = _trace(out)
        except Exception as e:  # noqa: BLE001 - the folded model keeps its BNs
            log.debug("propagate: trace failed: %s", e)
            return out, report
        if example_inputs is not None and any(isinstance(m, nn.BatchNorm1d) for m in out.modules()):
            _eval_shapes(out, g, example_inputs)  # no shapes: a BatchNorm1d is then not propagated
        gm = fx.GraphModule(out, g, type(out).__name__)
        verdicts, n = propagate_graph_module(gm, list(report.verdicts), eval_semantics=eval_semantics)
    if not n:
        return out, replace(report, verdicts=verdicts)
    note = "returned a torch.fx.GraphModule: BNs were split into scale and shift and moved (propagated)"
    return gm, replace(report, verdicts=verdicts, result="graph_module", notes=(*report.notes, note))


@dataclass
class _Analysis:
    graph: fx.Graph
    matched: list[Matched]
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
    matched = _add_uncalled(root, find_sites(g, root))
    use_graph = graph is True or (
        graph is None and any(isinstance(c, Candidate) and c.needs_graph for c in matched)
    )
    if not use_graph:
        matched = _demote_all(matched)
    return _Analysis(g, matched, use_graph)


def _demote_all(matched: list[Matched]) -> list[Matched]:
    """Rule 2 without a GraphModule: folds that need one become ``SHARED_MODULE`` skips."""
    return [_demote(c) if isinstance(c, Candidate) and c.needs_graph else c for c in matched]


def _exclude(a: _Analysis, names: frozenset[str]) -> _Analysis:
    """The analysis with the BNs in ``names`` left in place (reason: verification)."""
    matched: list[Matched] = [
        Skip(_name(v), SkipReason.VERIFICATION, "left in place: excluded from folding")
        if _name(v) in names
        else v
        for v in a.matched
    ]
    return _Analysis(a.graph, matched, a.use_graph)


def _name(v: Matched) -> str:
    return v.site.bn if isinstance(v, Candidate) else v.bn


def _apply(
    work: nn.Module, a: _Analysis, plan: Plan, dry_run: bool, traced: nn.Module
) -> tuple[FoldReport, nn.Module]:
    """Apply ``plan`` (made on ``traced``, the copy the graph came from) to ``work``: a fresh copy, or
    the caller's model for ``inplace`` (module mode only); the plan refers to modules by name."""
    report = FoldReport(
        backend="fx", verdicts=plan.report(), result="graph_module" if a.use_graph else "module"
    )
    if dry_run:
        return report, work
    if a.use_graph:
        _copy_trace_constants(a.graph, traced, work)
        gm = fx.GraphModule(work, a.graph, type(work).__name__)
        apply_graph_mode(gm, plan)
        return replace(
            report, notes=("returned a torch.fx.GraphModule: some folds needed a change of the call graph",)
        ), gm
    apply_module_mode(work, plan)
    return report, work


def _predict(module: nn.Module, plans: list[tuple[str, Plan]]) -> tuple[int, int]:
    """``(modules, parameters)`` of the result of applying ``plans`` in module mode, counted on
    ``module`` without rewriting it: each folded BN's subtree leaves the module tree (its tail or an
    ``nn.Identity()`` takes its place) and a layer that had no bias gets one. ``plans`` holds
    ``(prefix, plan)`` per traced part (the whole model: prefix "")."""
    gone: dict[str, tuple[nn.Module, Candidate]] = {}
    new_bias = 0
    for prefix, plan in plans:
        part = module.get_submodule(prefix) if prefix else module
        for c in plan.folds:
            gone[_join(prefix, str(c.bn_node.target))] = (part, c)
        for node, (_, b) in plan.writes.items():
            if fetch_attr(part, str(node.target)).bias is None:
                new_bias += b.numel()
    tails = {name: tail_of(part, c) for name, (part, c) in gone.items()}
    mods = 0
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", module)]
    while stack:
        name, m = stack.pop()
        m = tails.get(name, m)
        if id(m) in seen:
            continue
        seen.add(id(m))
        mods += not isinstance(m, nn.Identity)  # as _count: a folded BN's Identity is no op
        stack.extend((_join(name, n), c) for n, c in m._modules.items() if c is not None)
    params = sum(
        t.numel()
        for k, t in module.state_dict().items()
        if isinstance(t, torch.Tensor) and not _under(k, gone)
    )
    params += sum(
        t.numel()
        for tail in tails.values()
        for t in tail.state_dict().values()
        if isinstance(t, torch.Tensor)
    )
    return mods, params + new_bias


def _predict_graph(module: nn.Module, a: _Analysis, plan: Plan, traced: nn.Module) -> tuple[int, int]:
    """The figures of the GraphModule a fold would return. Which modules a GraphModule keeps is fx's
    business, so the plan is applied to a second shadow (tensors shared and never written: the
    rewrite only rebinds attributes and clones) built on the analysis graph, which a dry run
    discards anyway; that is counted."""
    work = shadow(module)
    _copy_trace_constants(a.graph, traced, work)
    gm = fx.GraphModule(work, a.graph, type(work).__name__)
    apply_graph_mode(gm, plan)
    return _count(gm)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _under(key: str, names: dict[str, Any]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def _add_uncalled(root: nn.Module, verdicts: list[Matched], prefix: str = "") -> list[Matched]:
    seen = {_name(v).split("#")[0] for v in verdicts}
    extra: list[Matched] = []
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


def _fold_direct_pairs(
    work: nn.Module, result: nn.Module, dry_run: bool, done: set[str], plans: list[tuple[str, Plan]]
) -> list[Verdict]:
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
            if _ancestors_reach_in(work, q) or _ancestors_reach_in(
                work, f"{path}.{layer}" if path else layer
            ):
                continue
            g = fx.Graph()
            x = g.placeholder("x")
            g.output(g.call_module(bn, (g.call_module(layer, (x,)),)))
            matched = [
                _demote_site(c) if isinstance(c, Candidate) and c.needs_graph else c
                for c in find_sites(g, u, whole=work, prefix=path)
            ]
            plan = plan_sites(u, matched)
            plans.append((path, plan))
            if not dry_run:
                apply_module_mode(result.get_submodule(path) if path else result, plan)
            vs = plan.report()
            verdicts.extend(vs)
            done.update(v.bn for v in vs)
    return verdicts


def _demote_site(c: Candidate) -> Skip:
    return Skip(
        c.site.bn, SkipReason.SHARED_MODULE, "the layer or BN is shared: folding would change its other uses"
    )


def _fold_fallback(
    work: nn.Module, result: nn.Module, dry_run: bool, err: str, plans: list[tuple[str, Plan]]
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
        matched = _demote_all(_add_uncalled(sub, find_sites(g, sub, whole=work, prefix=name), prefix=name))
        plan = plan_sites(sub, matched)
        plans.append((name, plan))
        if not dry_run:
            apply_module_mode(result.get_submodule(name), plan)
        vs = plan.report()
        verdicts.extend(vs)
        done.update(v.bn.split("#")[0] for v in vs)
    verdicts.extend(_fold_direct_pairs(work, result, dry_run, done, plans))
    for n in sorted(_bn_names(work)):
        if n not in done:
            verdicts.append(
                Skip(n, SkipReason.NOT_TRACEABLE, f"not inside a part of the model that traces ({err})")
            )
    note = f"the model does not trace with torch.fx ({err}); folded inside the parts that do"
    return FoldReport(backend="module", verdicts=verdicts, result="module", notes=(note,)), result
