"""What a BatchNorm-like module computes in eval mode, and which Conv subclasses only change their input.

A BN-like module is described by a :class:`BnSpec`: its eval map ``y = scale * x + shift`` per channel
(dim 1) followed by a *tail* that reads only that output (``tail(bn(x))``; no tail: ``bn(x)``).
Folding removes the ``bn`` part and keeps the tail as it was; freezing keeps the tail after a frozen
affine. Rules (cited as "Rule n"):

1. Plain BN (``torch.nn`` BatchNorm1d/2d/3d, SyncBatchNorm, ``bnfold.nn``'s, or a subclass that does
   not override ``forward``): its own statistics, no tail.
2. A class declared with :func:`register_bn_like`: the user's statement of its statistics and tail.
3. A subclass that overrides ``forward`` (timm's ``BatchNormAct2d``: ``F.batch_norm`` with its own
   statistics, then dropout and an activation) is traced on its own with ``torch.fx`` in eval mode.
   Accepted only when the graph is exactly: the input goes straight into one ``F.batch_norm`` with
   ``training=False``, constant statistics and affine parameters that are attributes of the module;
   every node on the way from that call to the output reads only that output, other nodes or module
   attributes other than the BN's own tensors; every other node is a side-effect-free check
   (``_assert``, ``x.ndim``, ``x.shape``). The tail is that graph from the BN output to the output.
   Anything else (pre-processing of the input, a residual, in-place buffer writes, a second BN call,
   a forward that does not trace) is ``CUSTOM_BN`` with the reason.
4. Hooks on a BN-like module: ``CUSTOM_BN`` (a fold would drop them).

Input-side Conv subclasses (Rule 5, in :mod:`bnfold.fx.convs`): a ``ConvNd`` subclass whose ``forward`` changes only the input
(timm's ``Conv2dSame`` pads it by an amount computed at run time) and then calls ``F.convNd`` with its
*own current* weight and bias, returning that result untouched. Scaling output channels commutes with
anything done to the input, so the forward fold (conv -> BN) is exact. The proof is run twice on a
copy, at two input sizes, with fresh parameters swapped in (so a cached weight is caught) and the bias
present: under a torch-function mode every op that reads the weight or bias is recorded; accepted when
the only ones are metadata reads and exactly one ``conv1d/2d/3d`` reading them as weight and bias, whose
result is what ``forward`` returns and what nothing else reads. Backward folds into such a layer stay
refused (the padded zeros would not be shifted).
"""

from __future__ import annotations

import copy
import operator
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.fold_math import F64, bn_affine

__all__ = [
    "BnSpec",
    "describe_bn",
    "register_bn_like",
    "registered_bn_like",
    "first_line",
    "ThreadSafeTracer",
    "TRACE_LOCK",
    "tail_same_in_train",
]

StatsFn = Callable[[nn.Module], tuple[Tensor | None, Tensor | None, Tensor, Tensor, float]]
TailFn = Callable[[nn.Module], nn.Module | None]


@dataclass(frozen=True)
class _Registered:
    stats: StatsFn | None
    tail: TailFn | None


_REGISTRY: dict[type, _Registered] = {}


def register_bn_like(cls: type, *, stats: StatsFn | None = None, tail: TailFn | None = None) -> None:
    """Declare that instances of ``cls`` compute, in eval mode, ``tail(bn(x))`` (Rule 2).

    After this, ``bnfold.fold`` folds the BN part of such layers into their neighbours (keeping the
    tail) and ``bnfold.freeze`` turns them into a frozen affine followed by the tail. This is a
    statement by the user that bnfold does not check: register only classes whose eval-mode forward
    is exactly that.

    Args:
        cls: an ``nn.Module`` class (subclasses of it are covered too).
        stats: ``stats(m) -> (weight, bias, running_mean, running_var, eps)`` of an instance
            (weight/bias may be None); default: the attributes of those names.
        tail: ``tail(m) -> nn.Module | None``, the module applied to the BN output (for example
            ``lambda m: m.act``); default: nothing after the normalisation.

    Example:
        >>> bnfold.register_bn_like(MyBNAct, tail=lambda m: m.act)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_bn_like expects an nn.Module class, got {cls!r}")
    _REGISTRY[cls] = _Registered(stats, tail)


def registered_bn_like(m: nn.Module) -> bool:
    """True when ``m``'s class (or a base) was declared with :func:`register_bn_like`."""
    return _lookup(type(m)) is not None


def _lookup(cls: type) -> _Registered | None:
    for k in cls.__mro__:
        if k in _REGISTRY:
            return _REGISTRY[k]
    return None


def first_line(e: BaseException) -> str:
    """``"Type: first line of the message"``: torch puts the cause first and advice last."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _t64(t: Tensor | None) -> F64 | None:
    return None if t is None else t.detach().cpu().to(torch.float64).numpy()


@dataclass
class BnSpec:
    """What a BN-like module computes in eval mode: ``tail(scale * x + shift)``.

    Attributes:
        weight, bias, mean, var, eps: the statistics the normalisation uses (weight/bias may be None).
        num_features: channels.
        tail_graph: the fx graph of the tail (Rule 3; input placeholder = the BN output), or None.
        tail_fn: the registered tail factory (Rule 2), or None.
        kind: "plain", "registered" or "traced".
    """

    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor | None
    var: Tensor | None
    eps: float
    num_features: int
    kind: str = "plain"
    tail_graph: fx.Graph | None = None
    tail_fn: TailFn | None = None
    tail_names: tuple[str, ...] = field(default=())
    frozen: tuple[Tensor, Tensor] | None = None

    def affine64(self) -> tuple[F64, F64]:
        """The eval map as float64 ``(scale, shift)``."""
        if self.frozen is not None:
            s, t = _t64(self.frozen[0]), _t64(self.frozen[1])
            assert s is not None and t is not None
            return s.reshape(-1), t.reshape(-1)
        mean, var = _t64(self.mean), _t64(self.var)
        assert mean is not None and var is not None
        return bn_affine(_t64(self.weight), _t64(self.bias), mean, var, self.eps)

    @property
    def has_tail(self) -> bool:
        return self.tail_graph is not None or self.tail_fn is not None

    def make_tail(self, module: nn.Module) -> nn.Module | None:
        """The tail as a module, built from ``module`` (the layer itself, or a copy of it)."""
        if self.tail_fn is not None:
            return self.tail_fn(module)
        if self.tail_graph is None:
            return None
        return fx.GraphModule(module, copy.deepcopy(self.tail_graph), f"{type(module).__name__}Tail")


def _plain_bn_forwards() -> set[Any]:
    fwds: set[Any] = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
    try:
        from bnfold.nn import batchnorm as bnb
        from bnfold.nn import sync

        fwds.add(bnb._BnfoldBatchNorm.forward)
        fwds.add(sync.SyncBatchNorm.forward)
    except (ImportError, AttributeError):  # pragma: no cover - depends on bnfold.nn's layout
        pass
    return fwds


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


_NO_STATS = "track_running_stats=False: the layer normalises with batch statistics even in eval mode"


def describe_bn(m: nn.Module) -> BnSpec | str:
    """The :class:`BnSpec` of a BN-like module, or why it cannot be described (a ``CUSTOM_BN`` reason).

    ``"no_running_stats: ..."`` marks a BN without running statistics.
    """
    if _has_hooks(m):
        return "the BatchNorm has forward hooks, which a fold would drop"
    reg = _lookup(type(m))
    if reg is not None:  # Rule 2
        mean: Tensor | None
        var: Tensor | None
        if reg.stats is not None:
            w, b, mean, var, eps = reg.stats(m)
        else:
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            eps = float(getattr(m, "eps", 1e-5))
        if mean is None or var is None:
            return "no_running_stats: " + _NO_STATS
        return BnSpec(w, b, mean, var, float(eps), int(mean.numel()), "registered", tail_fn=reg.tail)
    frozen = _frozen_spec(m)
    if frozen is not None:
        return frozen
    if not isinstance(m, _BatchNorm):
        return f"{type(m).__name__} is not a BatchNorm"
    if type(m).forward in _plain_bn_forwards():  # Rule 1
        if not m.track_running_stats or m.running_mean is None or m.running_var is None:
            return "no_running_stats: " + _NO_STATS
        return BnSpec(m.weight, m.bias, m.running_mean, m.running_var, float(m.eps), int(m.num_features))
    return _trace_subclass(m)  # Rule 3


def _frozen_spec(m: nn.Module) -> BnSpec | str | None:
    """A ``bnfold.nn.FrozenBatchNorm`` (its scale/shift are read directly; its tail, if any, kept)."""
    from bnfold.nn.frozen import FrozenBatchNorm

    if not isinstance(m, FrozenBatchNorm):
        return None
    if type(m).forward is not FrozenBatchNorm.forward:
        return f"{type(m).__name__} overrides forward (extra behaviour kept)"
    def frozen_tail(mod: nn.Module) -> nn.Module | None:
        t = getattr(mod, "tail", None)
        return t if isinstance(t, nn.Module) else None

    return BnSpec(
        None, None, None, None, m.eps, m.num_features, "frozen",
        tail_fn=None if m.tail is None else frozen_tail, frozen=(m.scale, m.shift),
    )


_CHECK_FUNCS: set[Any] = {torch._assert, getattr, operator.eq, operator.ne, operator.lt, operator.le,
                          operator.gt, operator.ge, operator.not_, operator.and_, operator.or_, operator.getitem,
                          operator.truth, len, isinstance}
_CHECK_METHODS = {"size", "dim"}
_BN_SLOTS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: dict[str, Any] = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


_TORCH_DIM_CHECKS = {
    getattr(c, k, None)
    for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    for k in ("_check_input_dim", "_check_non_zero_input_channels")
} - {None}


# torch.fx tracing patches module-level state (``nn.Module.__call__``, wrapped functions) while it
# runs and restores it afterwards: two traces in two threads would undo each other's patches.
# Every trace bnfold runs holds this lock.
TRACE_LOCK = threading.RLock()


class ThreadSafeTracer(fx.Tracer):
    """An fx tracer that lets other threads run modules normally while it traces.

    fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process during a trace; a
    forward running at the same time in another thread would otherwise be recorded by (or fail in)
    this trace. Calls from any thread but the tracing one go straight to the module.
    """

    _owner: int | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with TRACE_LOCK:
            self._owner = threading.get_ident()
            return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._owner:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class _SubTracer(ThreadSafeTracer):
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


_TRACED: dict[Any, _Traced | str] = {}


def _signature(m: nn.Module) -> Any:
    """What a subclass's traced graph can depend on: its class, its plain attributes, its children."""
    plain = tuple(
        sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None))))
    )
    kids = tuple((n, type(c)) for n, c in m.named_children())
    tensors = tuple((k, t is None) for k, t in [*m._parameters.items(), *m._buffers.items()])
    return (type(m), plain, kids, tensors)


def _trace_subclass(m: nn.Module) -> BnSpec | str:
    """Rule 3, cached per class and configuration (a model holds many identical BN layers)."""
    try:
        key = _signature(m)
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
        return "no_running_stats: " + _NO_STATS
    return BnSpec(
        w, b, mean, var, got.eps, int(mean.numel()), "traced", tail_graph=got.tail_graph, tail_names=got.tail_names
    )


def _probe(m: nn.Module, *, train: bool) -> nn.Module:
    """A deep copy of ``m`` in train or eval mode to trace, without torch's input-shape checks."""
    probe = copy.deepcopy(m)
    if train:  # the methods, not train(flag): a subclass may override either
        probe.train()
    else:
        probe.eval()
    for check in ("_check_input_dim", "_check_non_zero_input_channels"):
        if getattr(type(m), check, None) in _TORCH_DIM_CHECKS:
            # torch's shape checks only raise (on a Proxy they cannot even decide): skip them here.
            object.__setattr__(probe, check, lambda x: None)
    return probe


def _trace_subclass_uncached(m: nn.Module) -> _Traced | str:
    name = type(m).__name__
    probe = _probe(m, train=False)
    try:
        graph = _SubTracer().trace(probe)
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
        t = _fetch(m, str(v.target))
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
            if a.op == "get_attr" and str(a.target) not in own and str(a.target) not in (
                "num_batches_tracked",
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
                env[n] = tail_graph.node_copy(n, lambda a: env[a] if a in env else _copy_attr(a, env, tail_graph))
        tail_graph.output(env[out.args[0]])
        names = tuple(str(n.target) for n in tail if n.op == "call_module")
    mean_t, var_t = targets["running_mean"], targets["running_var"]
    assert mean_t is not None and var_t is not None
    return _Traced((targets["weight"], targets["bias"], mean_t, var_t), float(args["eps"]), tail_graph, names)


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


def _tail_ops(graph: fx.Graph) -> list[tuple[str, Any]] | None:
    """``(op, target)`` of every node between the one BN call and the output, in order."""
    nodes = list(graph.nodes)
    bns = [n for n in nodes if n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm)]
    out = [n for n in nodes if n.op == "output"]
    if len(bns) != 1 or len(out) != 1:
        return None
    down = _reach(bns[0], lambda n: n.users)
    return [(n.op, n.target) for n in nodes if n in down and n.op != "output"]


_SAME_IN_TRAIN: dict[Any, bool] = {}


def tail_same_in_train(m: nn.Module) -> bool:
    """True when a traced subclass runs the same post-processing in ``train()`` as in ``eval()``.

    A frozen layer keeps the tail traced in eval mode; a forward that post-processes differently in
    train mode (``if self.training: ...``) would make the frozen layer wrong in train mode.
    """
    spec = describe_bn(m)
    if not isinstance(spec, BnSpec) or spec.kind != "traced":
        return True
    key = _signature(m)
    if key in _SAME_IN_TRAIN:
        return _SAME_IN_TRAIN[key]
    probe = _probe(m, train=True)
    try:
        train_ops = _tail_ops(_SubTracer().trace(probe))
    except Exception:  # noqa: BLE001 - not traceable in train mode: not proven
        train_ops = None
    eval_ops = [] if spec.tail_graph is None else [
        (n.op, n.target) for n in spec.tail_graph.nodes if n.op not in ("placeholder", "output")
    ]
    same = train_ops is not None and [o for o in train_ops if o[0] != "get_attr"] == [
        o for o in eval_ops if o[0] != "get_attr"
    ]
    _SAME_IN_TRAIN[key] = same
    return same


def _copy_attr(a: fx.Node, env: dict[fx.Node, fx.Node], g: fx.Graph) -> fx.Node:
    assert a.op == "get_attr", a  # the tail check admits only get_attr from outside the tail
    env[a] = g.get_attr(str(a.target))
    return env[a]


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
