"""Rule 3 of :mod:`bnfold.fx.custom`: a BatchNorm subclass that overrides ``forward``, proved by a trace.

The subclass is traced on its own (its children stay leaves) on a deep copy in eval mode. Accepted
only when the graph is exactly: the input goes straight into one ``F.batch_norm`` with
``training=False``, constant statistics and affine parameters that are attributes of the module;
every node from that call to the output reads only that output, other nodes or module attributes
other than the BN's own tensors; every other node is a side-effect-free check. The tail is that
graph from the BN output to the output. What a trace proves depends only on the class and its
plain configuration, so it is cached per :func:`signature`.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .bnspec import NO_STATS, BnSpec
from .tracing import ThreadSafeTracer, first_line

__all__ = ["trace_subclass", "signature", "make_probe", "tail_ops", "SubTracer", "checked_ranks"]


_CHECK_FUNCS: set[Any] = {
    torch._assert,
    getattr,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.not_,
    operator.and_,
    operator.or_,
    operator.getitem,
    operator.truth,
    len,
    isinstance,
}
_CHECK_METHODS = {"size", "dim"}
_BN_SLOTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


_TORCH_DIM_CHECKS = {
    getattr(c, k, None)
    for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    for k in ("_check_input_dim", "_check_non_zero_input_channels")
} - {None}


def checked_ranks(cls: type) -> frozenset[int] | None:
    """The input ranks a BN class's ``_check_input_dim`` lets through (torch's or bnfold.nn's BatchNorm1d/2d/3d,
    inherited unchanged), None when it may let any rank >= 2 through (SyncBatchNorm, an override)."""
    from bnfold.nn import batchnorm as bnb

    check = getattr(cls, "_check_input_dim", None)
    for one, two, three in (
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
        (bnb.BatchNorm1d, bnb.BatchNorm2d, bnb.BatchNorm3d),
    ):
        if check is one._check_input_dim:
            return frozenset((2, 3))
        if check is two._check_input_dim:
            return frozenset((4,))
        if check is three._check_input_dim:
            return frozenset((5,))
    return None


def _asserted_ranks(nodes: list[fx.Node], x: fx.Node) -> frozenset[int] | None:
    """The input rank a traced forward asserts (``torch._assert(x.ndim == 4, ...)``, ``x.dim() == 4``), else None."""
    for n in nodes:
        if not (n.op == "call_function" and n.target is torch._assert and n.args):
            continue
        cond = n.args[0]
        if not (isinstance(cond, fx.Node) and cond.op == "call_function" and cond.target is operator.eq):
            continue
        a, k = cond.args[0], cond.args[1]
        if isinstance(a, int) and not isinstance(a, bool):
            a, k = k, a
        if not (isinstance(k, int) and not isinstance(k, bool) and isinstance(a, fx.Node)):
            continue
        ndim = a.op == "call_function" and a.target is getattr and a.args[:2] == (x, "ndim")
        dim = a.op == "call_method" and a.target == "dim" and a.args == (x,)
        if ndim or dim:
            return frozenset((k,))
    return None


class SubTracer(ThreadSafeTracer):
    """Traces a BN subclass's own forward: its children stay leaves (they end up in the tail)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@dataclass(frozen=True)
class _Traced:
    """What a subclass trace proved, independent of the instance's tensors."""

    slots: tuple[str | None, str | None, str, str]  # attribute names of weight, bias, mean, var
    eps: float
    tail_graph: fx.Graph | None
    tail_names: tuple[str, ...]
    ranks: frozenset[int] | None = None


_TRACED: dict[Any, _Traced | str] = {}


def signature(m: nn.Module) -> Any:
    """What a subclass's traced graph can depend on: its class, its plain attributes, its children."""
    plain = tuple(
        sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None))))
    )
    kids = tuple((n, type(c)) for n, c in m.named_children())
    tensors = tuple((k, t is None) for k, t in [*m._parameters.items(), *m._buffers.items()])
    return (type(m), plain, kids, tensors)


def trace_subclass(m: nn.Module) -> BnSpec | str:
    """Rule 3, cached per class and configuration (a model holds many identical BN layers)."""
    try:
        key = signature(m)
        hash(key)
    except TypeError:
        key = None
    got = _TRACED.get(key) if key is not None else None
    if got is None:
        got = _trace_subclass_uncached(m)
        if key is not None:
            _TRACED[key] = got
    if isinstance(got, str):
        return got
    w, b, mean, var = (None if n is None else _fetch(m, n) for n in got.slots)
    if not (isinstance(mean, Tensor) and isinstance(var, Tensor)):
        return "no_running_stats: " + NO_STATS
    return BnSpec(
        w,
        b,
        mean,
        var,
        got.eps,
        int(mean.numel()),
        "traced",
        tail_graph=got.tail_graph,
        tail_names=got.tail_names,
        ranks=got.ranks,
    )


_CHECKED = "_bnfold_checked_inputs"


def make_probe(m: nn.Module, *, train: bool) -> nn.Module:
    """A deep copy of ``m`` in train or eval mode to trace, without torch's input-shape checks."""
    probe = copy.deepcopy(m)
    if train:  # the methods, not train(flag): a subclass may override either
        probe.train()
    else:
        probe.eval()
    checked: list[Any] = []  # what the rank check was called on (the forward's input: its ranks hold)
    object.__setattr__(probe, _CHECKED, checked)
    for check in ("_check_input_dim", "_check_non_zero_input_channels"):
        if getattr(type(m), check, None) in _TORCH_DIM_CHECKS:
            # torch's shape checks only raise (on a Proxy they cannot even decide): skip them here.
            stub = checked.append if check == "_check_input_dim" else (lambda x: None)
            object.__setattr__(probe, check, stub)
    return probe


def _trace_subclass_uncached(m: nn.Module) -> _Traced | str:
    name = type(m).__name__
    probe = make_probe(m, train=False)
    try:
        graph = SubTracer().trace(probe)
    except Exception as e:  # noqa: BLE001 - a forward that does not trace is simply not proven
        return f"{name} overrides BatchNorm.forward and its forward does not trace ({first_line(e)})"
    # Writes the trace does not record (fx does not proxy in-place ops on buffers read directly):
    # the forward ran once on the probe, so any change to its tensors or attributes shows here.
    for (k, a), (_, b) in zip(
        [*m.named_parameters(), *m.named_buffers()], [*probe.named_parameters(), *probe.named_buffers()]
    ):
        if a.shape != b.shape or not torch.equal(a.detach(), b.detach()):
            return f"{name} overrides BatchNorm.forward and its forward writes '{k}' in eval mode"
    nodes = list(graph.nodes)
    phs = [n for n in nodes if n.op == "placeholder"]
    bns = [n for n in nodes if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)]
    why_prefix = f"{name} overrides BatchNorm.forward"
    if len(phs) != 1:
        return f"{why_prefix} with {len(phs)} inputs"
    if len(bns) != 1 or bns[0].target is not F.batch_norm:
        return f"{why_prefix} and does not call F.batch_norm exactly once"
    bn = bns[0]
    args = dict(_BN_DEFAULTS)
    args.update(zip(_BN_SLOTS, bn.args))
    args.update(bn.kwargs)
    if args["input"] is not phs[0]:
        return f"{why_prefix} and changes the input before normalising it"
    if args["training"] is not False:
        return f"{why_prefix} and normalises with batch statistics in eval mode"
    if not isinstance(args["eps"], (int, float)):
        return f"{why_prefix} with a computed eps"
    tensors: dict[str, Tensor | None] = {}
    targets: dict[str, str | None] = {}
    own: set[str] = set()
    for key in ("running_mean", "running_var", "weight", "bias"):
        v = args[key]
        if v is None and key in ("weight", "bias"):
            tensors[key] = None
            targets[key] = None
            continue
        if not (isinstance(v, fx.Node) and v.op == "get_attr"):
            return f"{why_prefix} and its F.batch_norm {key} is not an attribute of the layer"
        try:
            t = _fetch(m, str(v.target))
        except AttributeError:  # a tensor computed in forward (``self.running_var * 2``): a traced constant
            return f"{why_prefix} and its F.batch_norm {key} is computed, not an attribute of the layer"
        if not isinstance(t, Tensor):
            return f"{why_prefix} and its F.batch_norm {key} is not a tensor"
        tensors[key] = t
        targets[key] = str(v.target)
        own.add(str(v.target))
    # The tail: every node between the BN call and the output.
    out = next(n for n in nodes if n.op == "output")
    down = _reach(bn, lambda n: n.users)
    if out not in down and out.args[0] is not bn:
        return f"{why_prefix} and its output is not computed from the normalised value"
    up = _reach(out, lambda n: n.all_input_nodes)
    tail = [n for n in nodes if n in down and n in up and n is not out]
    for n in tail:
        for a in n.all_input_nodes:
            if a is bn or a in tail:
                continue
            if (
                a.op == "get_attr"
                and str(a.target) not in own
                and str(a.target) not in ("num_batches_tracked",)
            ):
                continue
            return f"{why_prefix} and its output reads more than the normalised value ({a.name})"
    if not isinstance(out.args[0], fx.Node):
        return f"{why_prefix} and returns a structure, not a tensor"
    # Everything else must be a side-effect-free check (Rule 3).
    keep = set(tail) | {bn, out, *phs}
    for n in nodes:
        if n in keep or n.op == "get_attr":
            continue
        if n in down:
            return f"{why_prefix} and uses the normalised value outside its output ({n.name})"
        if n.op == "call_function" and n.target in _CHECK_FUNCS:
            continue
        if n.op == "call_method" and n.target in _CHECK_METHODS:
            continue
        return f"{why_prefix} and does more than normalise and post-process ({n.op} {n.target})"
    tail_graph: fx.Graph | None = None
    names: tuple[str, ...] = ()
    if tail:
        tail_graph = fx.Graph()
        x = tail_graph.placeholder("x")
        env: dict[fx.Node, fx.Node] = {bn: x}
        for n in nodes:
            if n in tail:
                env[n] = tail_graph.node_copy(
                    n, lambda a: env[a] if a in env else _copy_attr(a, env, tail_graph)
                )
        tail_graph.output(env[out.args[0]])
        names = tuple(str(n.target) for n in tail if n.op == "call_module")
    mean_t, var_t = targets["running_mean"], targets["running_var"]
    assert mean_t is not None and var_t is not None
    return _Traced(
        (targets["weight"], targets["bias"], mean_t, var_t),
        float(args["eps"]),
        tail_graph,
        names,
        _asserted_ranks(nodes, phs[0]) or _checked(probe, m, phs[0]),
    )


def _checked(probe: nn.Module, m: nn.Module, x: fx.Node) -> frozenset[int] | None:
    """The ranks torch's ``_check_input_dim`` (stubbed in the probe) lets through, where the traced forward
    called it on its input (``super().forward(x)``)."""
    seen = getattr(probe, _CHECKED, [])
    return checked_ranks(type(m)) if any(getattr(a, "node", None) is x for a in seen) else None


def _reach(start: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from ``start`` by repeating ``step`` (users: downstream; inputs: upstream),
    ``start`` itself excluded unless a cycle leads back to it."""
    seen: set[fx.Node] = set()
    todo = [start]
    while todo:
        for u in step(todo.pop()):
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def tail_ops(graph: fx.Graph) -> list[tuple[str, Any]] | None:
    """``(op, target)`` of every node between the one BN call and the output, in order."""
    nodes = list(graph.nodes)
    bns = [n for n in nodes if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)]
    out = [n for n in nodes if n.op == "output"]
    if len(bns) != 1 or len(out) != 1:
        return None
    down = _reach(bns[0], lambda n: n.users)
    return [(n.op, n.target) for n in nodes if n in down and n.op != "output"]


def _copy_attr(a: fx.Node, env: dict[fx.Node, fx.Node], g: fx.Graph) -> fx.Node:
    assert a.op == "get_attr", a  # the tail check admits only get_attr from outside the tail
    env[a] = g.get_attr(str(a.target))
    return env[a]


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
