"""Which modules bnfold treats as BatchNorm-like and which as layers that can absorb one.

A BN-like module has an eval map :func:`bnfold.fx.custom.describe_bn` knows; a layer is a plain
Conv/ConvTranspose/Linear (``forward`` not overridden, no hooks, not parametrized, floating weight),
or, for a forward fold only, a Conv subclass that changes only its input (Rule 5 of
:mod:`bnfold.fx.custom`). :class:`Tracer` keeps all of them leaves.

The readers of a traced module that the fx passes share live here too: an attribute by its dotted
name, the submodule a node calls, a node argument's constant value, a fresh attribute name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnfold.hints import BATCH_STATS_INSTANCE, Hint
from bnfold.records import SkipReason

from .bnspec import BnSpec
from .convs import input_side_conv
from .custom import describe_bn, has_hooks, registered_bn_like
from .tracing import ThreadSafeTracer

__all__ = [
    "CONV_TYPES",
    "CONVT_TYPES",
    "LAYER_TYPES",
    "is_frozen_bn",
    "is_bn_module",
    "bn_module_skip",
    "spec_skip",
    "layer_kind",
    "forward_layer_kind",
    "Tracer",
    "fetch_attr",
    "called_module",
    "constant_arg",
    "constant_slot",
    "fresh_attr",
]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, *CONVT_TYPES, nn.Linear)


def _frozen_types() -> tuple[type[nn.Module], ...]:
    try:
        from bnfold.nn.frozen import FrozenBatchNorm
    except ImportError:  # pragma: no cover - bnfold.nn is part of the package
        return ()
    return (FrozenBatchNorm,)


def is_frozen_bn(m: nn.Module) -> bool:
    """True for a ``bnfold.nn.FrozenBatchNorm`` (any rank)."""
    return isinstance(m, _frozen_types())


def is_bn_module(m: nn.Module) -> bool:
    """True for every BatchNorm-like module bnfold gives a verdict to (plain, custom, frozen, registered)."""
    return isinstance(m, _BatchNorm) or is_frozen_bn(m) or registered_bn_like(m)


def bn_module_skip(m: nn.Module) -> tuple[SkipReason, str, tuple[Hint, ...]] | None:
    """Rule 1 for a BN module: why it can never be folded, or None when its eval map is known."""
    spec = describe_bn(m)
    return spec_skip(spec)


def spec_skip(spec: BnSpec | str) -> tuple[SkipReason, str, tuple[Hint, ...]] | None:
    """(reason, detail, hints) of a BN whose spec says it can never be folded, else None."""
    if isinstance(spec, BnSpec):
        return None
    if spec.startswith("no_running_stats: "):
        return SkipReason.NO_RUNNING_STATS, spec.removeprefix("no_running_stats: "), (BATCH_STATS_INSTANCE,)
    return SkipReason.CUSTOM_BN, spec, ()


def layer_kind(m: nn.Module) -> str | None:
    """The kind name of a layer that can absorb a BN exactly ("Conv2d", "Linear", ...), else None."""
    for base in LAYER_TYPES:
        if isinstance(m, base):
            t = type(m)
            if t.forward is not base.forward:
                return None
            if hasattr(base, "_conv_forward") and getattr(t, "_conv_forward", None) is not base._conv_forward:
                return None
            if has_hooks(m) or torch.nn.utils.parametrize.is_parametrized(m):
                return None
            if not isinstance(m.weight, torch.Tensor) or not m.weight.is_floating_point():
                return None
            return base.__name__
    return None


def forward_layer_kind(m: nn.Module) -> tuple[str | None, str]:
    """``(kind, note)`` of a layer that can absorb a BN *after* it: a plain layer, or a Conv subclass
    that changes only its input (:func:`bnfold.fx.convs.input_side_conv`, note says so)."""
    kind = layer_kind(m)
    if kind is not None:
        return kind, ""
    kind = input_side_conv(m)
    if kind is not None:
        return kind, f"{type(m).__name__} changes only its input (output channels scale exactly)"
    return None, ""


class Tracer(ThreadSafeTracer):
    """FX tracer that keeps every BN and layer a leaf (bnfold.nn layers are not in ``torch.nn``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_bn_module(m) or isinstance(m, LAYER_TYPES):
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


def fetch_attr(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for target ``"a.b.c"``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def constant_arg(root: nn.Module, v: Any) -> torch.Tensor | None:
    """The constant value of a node's argument (a Python number as a float64 scalar, a tensor, a get_attr
    node's tensor), or None (a bool, another node, anything else)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return torch.tensor(float(v), dtype=torch.float64)
    if isinstance(v, torch.Tensor):
        return v.detach()
    if isinstance(v, fx.Node) and v.op == "get_attr":
        try:
            t = fetch_attr(root, str(v.target))
        except AttributeError:
            return None
        return t.detach() if isinstance(t, torch.Tensor) else None
    return None


def constant_slot(root: nn.Module, n: fx.Node) -> int | None:
    """The argument slot (0 or 1) of a two-operand call that is a constant (:func:`constant_arg`) while the
    other one is a node, or None."""
    c = [k for k in (0, 1) if constant_arg(root, n.args[k]) is not None]
    if len(c) != 1 or not isinstance(n.args[1 - c[0]], fx.Node):
        return None
    return c[0]


def called_module(gm: nn.Module, n: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` fx node calls, or None (another node, or a target no longer there)."""
    if n.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(n.target))
    except AttributeError:
        return None


def fresh_attr(root: nn.Module, name: str, sep: str = "_") -> str:
    """``name``, else ``name<sep>1``, ``name<sep>2``, ...: the first that is not an attribute of ``root``."""
    k = 0
    cand = name
    while hasattr(root, cand):
        k += 1
        cand = f"{name}{sep}{k}"
    return cand
