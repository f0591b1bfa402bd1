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
   a forward that does not trace) is ``CUSTOM_BN`` with the reason (the proof:
   :mod:`bnfold.fx.custom_traced`).
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

import math
import numbers
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.errors import BnfoldError, OptionError, UnsupportedModelError

from .bnspec import NO_STATS, BnSpec, StatsFn, TailFn
from .custom_traced import SubTracer, checked_ranks, make_probe, signature, tail_ops, trace_subclass

__all__ = [
    "describe_bn",
    "register_bn_like",
    "registered_bn_like",
    "tail_same_in_train",
    "has_hooks",
]


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

    A callback that raises, or returns something else than documented, stops the fold or freeze with
    an :class:`~bnfold.errors.UnsupportedModelError` naming the class, the callback and the error.

    Raises:
        OptionError: ``cls`` is not an ``nn.Module`` class, or ``stats``/``tail`` is not callable.

    Example:
        >>> bnfold.register_bn_like(MyBNAct, tail=lambda m: m.act)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise OptionError(f"register_bn_like expects an nn.Module class, got {type(cls).__name__}")
    for what, fn in (("stats", stats), ("tail", tail)):
        if fn is not None and not callable(fn):
            raise OptionError(
                f"register_bn_like({cls.__name__}): {what} must be callable, got {type(fn).__name__}"
            )
    _REGISTRY[cls] = _Registered(stats, None if tail is None else _checked_tail(cls, tail))


def _failed(cls: type, what: str, e: Exception) -> UnsupportedModelError:
    first = (str(e).splitlines() or [""])[0]
    return UnsupportedModelError(
        f"the {what} function registered for {cls.__name__} (register_bn_like) failed: {type(e).__name__}: {first}"
    )


def _checked_tail(cls: type, tail: TailFn) -> TailFn:
    """``tail`` whose failures and wrong results are typed errors naming the registration."""

    def run(m: nn.Module) -> nn.Module | None:
        try:
            out = tail(m)
        except BnfoldError:
            raise
        except Exception as e:  # noqa: BLE001 - user code: any failure becomes one typed line
            raise _failed(cls, "tail", e) from e
        if out is not None and not isinstance(out, nn.Module):
            raise UnsupportedModelError(
                f"the tail function registered for {cls.__name__} (register_bn_like) must return an nn.Module "
                f"or None, got {type(out).__name__}"
            )
        return out

    return run


def _registered_stats(m: nn.Module, reg: _Registered) -> tuple[Any, Any, Any, Any, float]:
    """``reg.stats(m)`` checked: five values, tensors (weight/bias may be None), a finite float eps."""
    cls = type(m)
    assert reg.stats is not None
    try:
        got: Any = reg.stats(m)
    except BnfoldError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: any failure becomes one typed line
        raise _failed(cls, "stats", e) from e
    shape = "(weight, bias, running_mean, running_var, eps)"
    if not isinstance(got, (tuple, list)) or len(got) != 5:
        raise UnsupportedModelError(
            f"the stats function registered for {cls.__name__} (register_bn_like) must return {shape}, "
            f"got {type(got).__name__}" + (f" of {len(got)}" if isinstance(got, (tuple, list)) else "")
        )
    w, b, mean, var, eps = got
    names = ("weight", "bias", "running_mean", "running_var")
    for name, t in zip(names, (w, b, mean, var)):
        if not (t is None or isinstance(t, Tensor)):  # no mean/var: reported as no running statistics
            raise UnsupportedModelError(
                f"the stats function registered for {cls.__name__} (register_bn_like): {name} must be a tensor "
                f"or None, got {type(t).__name__}"
            )
    if isinstance(eps, Tensor) and eps.numel() == 1:
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= float(eps) < math.inf:
        raise UnsupportedModelError(
            f"the stats function registered for {cls.__name__} (register_bn_like): eps must be a finite number "
            f">= 0, got {type(eps).__name__} {str(eps)[:40]}"
        )
    return w, b, mean, var, float(eps)


def registered_bn_like(m: nn.Module) -> bool:
    """True when ``m``'s class (or a base) was declared with :func:`register_bn_like`."""
    return _lookup(type(m)) is not None


def _lookup(cls: type) -> _Registered | None:
    for k in cls.__mro__:
        if k in _REGISTRY:
            return _REGISTRY[k]
    return None


def _plain_bn_forwards() -> set[Any]:
    fwds: set[Any] = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
    try:
        from bnfold.nn import batchnorm as bnb
        from bnfold.nn import sync

        fwds.add(bnb.BnfoldBatchNorm.forward)
        fwds.add(sync.SyncBatchNorm.forward)
    except (ImportError, AttributeError):  # pragma: no cover - depends on bnfold.nn's layout
        pass
    return fwds


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


def describe_bn(m: nn.Module) -> BnSpec | str:
    """The :class:`BnSpec` of a BN-like module, or why it cannot be described (a ``CUSTOM_BN`` reason).

    ``"no_running_stats: ..."`` marks a BN without running statistics.
    """
    if has_hooks(m):
        return "the BatchNorm has forward hooks, which a fold would drop"
    reg = _lookup(type(m))
    if reg is not None:  # Rule 2
        mean: Tensor | None
        var: Tensor | None
        if reg.stats is not None:
            w, b, mean, var, eps = _registered_stats(m, reg)
        else:
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            eps = float(getattr(m, "eps", 1e-5))
        if mean is None or var is None:
            return "no_running_stats: " + NO_STATS
        return BnSpec(w, b, mean, var, float(eps), int(mean.numel()), "registered", tail_fn=reg.tail)
    frozen = _frozen_spec(m)
    if frozen is not None:
        return frozen
    if not isinstance(m, _BatchNorm):
        return f"{type(m).__name__} is not a BatchNorm"
    if type(m).forward in _plain_bn_forwards():  # Rule 1
        if not m.track_running_stats or m.running_mean is None or m.running_var is None:
            return "no_running_stats: " + NO_STATS
        return BnSpec(
            m.weight,
            m.bias,
            m.running_mean,
            m.running_var,
            float(m.eps),
            int(m.num_features),
            ranks=checked_ranks(type(m)),
        )
    return trace_subclass(m)  # Rule 3


def _frozen_spec(m: nn.Module) -> BnSpec | str | None:
    """A ``bnfold.nn.FrozenBatchNorm`` (its scale/shift are read directly; its tail, if any, kept)."""
    from bnfold.nn.frozen import FrozenBatchNorm, input_ranks

    if not isinstance(m, FrozenBatchNorm):
        return None
    if type(m).forward is not FrozenBatchNorm.forward:
        return f"{type(m).__name__} overrides forward (extra behaviour kept)"

    def frozen_tail(mod: nn.Module) -> nn.Module | None:
        t = getattr(mod, "tail", None)
        return t if isinstance(t, nn.Module) else None

    return BnSpec(
        None,
        None,
        None,
        None,
        m.eps,
        m.num_features,
        "frozen",
        tail_fn=None if m.tail is None else frozen_tail,
        frozen=(m.scale, m.shift),
        ranks=input_ranks(getattr(m, "dim", None)),
    )


_SAME_IN_TRAIN: dict[Any, bool] = {}


def tail_same_in_train(m: nn.Module) -> bool:
    """True when a traced subclass runs the same post-processing in ``train()`` as in ``eval()``.

    A frozen layer keeps the tail traced in eval mode; a forward that post-processes differently in
    train mode (``if self.training: ...``) would make the frozen layer wrong in train mode.
    """
    spec = describe_bn(m)
    if not isinstance(spec, BnSpec) or spec.kind != "traced":
        return True
    key = signature(m)
    if key in _SAME_IN_TRAIN:
        return _SAME_IN_TRAIN[key]
    probe = make_probe(m, train=True)
    try:
        train_ops = tail_ops(SubTracer().trace(probe))
    except Exception:  # noqa: BLE001 - not traceable in train mode: not proven
        train_ops = None
    eval_ops = (
        []
        if spec.tail_graph is None
        else [(n.op, n.target) for n in spec.tail_graph.nodes if n.op not in ("placeholder", "output")]
    )
    same = train_ops is not None and [o for o in train_ops if o[0] != "get_attr"] == [
        o for o in eval_ops if o[0] != "get_attr"
    ]
    _SAME_IN_TRAIN[key] = same
    return same
