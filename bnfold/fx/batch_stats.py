"""PyTorch BatchNorms without running statistics -> InstanceNorm, on request (``batch_stats="instance"``).

``nn.BatchNorm{1,2,3}d(track_running_stats=False)`` computes ``F.batch_norm(x, None, None, weight, bias,
training=True, eps=eps)`` in train and eval mode alike: statistics over every axis but the channel axis 1,
batch included, biased variance. At batch 1 these are the per-sample, per-channel statistics over the
spatial axes, with the same ``eps``: exactly ``nn.InstanceNorm{1,2,3}d(C, eps, affine, track_running_stats=False)``
with the BN's weight and bias. The conversion is a module swap (same name, same parameters, same device and
dtype, same ``training`` flag); at batch > 1 the model then normalises each sample on its own, which the
verdict says. Only the three plain classes are swapped (a subclass may compute something else); a BN with
running statistics is never touched (in ``train()`` mode it is refused as before).

Constants, by default (:func:`constant_layers`): a batch-statistics ``F.batch_norm`` applied to a module's own
weight (weight standardisation: timm ``StdConv2d`` / ``ScaledStdConv2d``, NF-ResNets) computes the same
constant in every call. A leaf module whose forward is ``F.conv*``/``F.linear`` of its input with such a
weight is replaced by the plain layer holding the evaluated weight (float64, one cast), so the BN after it
folds as after any conv.

A BatchNorm1d on 2-D data (N, C) has no spatial axes: at batch 1 the original raises (one value per
channel), and the InstanceNorm1d that replaces an affine BN raises as well (it reads (1, C) as an unbatched
(C=1, L) input whose channel count does not match), so nothing is silently changed there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.records import Direction, FoldReport, Site

__all__ = [
    "convertible",
    "convert_batch_stats",
    "copy_for",
    "with_conversions",
    "INSTANCE_DETAIL",
    "NOTE",
    "ConstantLayer",
    "constant_layers",
    "swap_in",
    "CONSTANT_DETAIL",
]

INSTANCE_DETAIL = (
    "track_running_stats=False: replaced by InstanceNorm (batch_stats='instance'), exact at batch 1; at "
    "batch > 1 each sample is normalised on its own (the model computes something else)"
)

_PAIRS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nn.InstanceNorm1d,
    nn.BatchNorm2d: nn.InstanceNorm2d,
    nn.BatchNorm3d: nn.InstanceNorm3d,
}


def convertible(m: nn.Module) -> bool:
    """A plain BatchNorm{1,2,3}d that normalises with its batch in every mode."""
    return type(m) in _PAIRS and (
        not getattr(m, "track_running_stats", True)
        and getattr(m, "running_mean", None) is None
        and getattr(m, "running_var", None) is None
    )


def _instance(bn: Any) -> nn.Module:
    cls = _PAIRS[type(bn)]
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=False)
    if bn.affine:
        new.weight = bn.weight  # the parameter objects themselves (the model given is a copy, or in place)
        new.bias = bn.bias
    new.train(bn.training)
    return new


def convert_batch_stats(
    module: nn.Module, *, dry_run: bool = False, exclude: frozenset[str] | set[str] = frozenset()
) -> tuple[nn.Module, list[Site]]:
    """Swap every convertible BN of ``module`` (in place) for an InstanceNorm; the verdicts, in module order.

    ``dry_run``: change nothing, return the verdicts only. The root module itself is swapped into a new one.
    ``exclude``: BN names to leave as they are (a conversion that failed verification, culprit search).
    """
    names = [
        name for name, m in module.named_modules() if convertible(m) and (name or "<root>") not in exclude
    ]
    sites = [
        Site(
            name or "<root>",
            name or "<root>",
            f"InstanceNorm{type(module.get_submodule(name)).__name__[-2:]}",
            Direction.CONVERTED,
            INSTANCE_DETAIL,
            "bn-instance",
        )
        for name in names
    ]
    if dry_run or not names:
        return module, sites
    if names == [""]:
        return _instance(module), sites
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, attr, _instance(parent.get_submodule(attr)))
    return module, sites


def copy_for(module: nn.Module, inplace: bool) -> nn.Module:
    """The module to convert: ``module`` itself with ``inplace``, else a deep copy."""
    return module if inplace else copy.deepcopy(module)


NOTE = (
    "{n} batch-statistics BN(s) replaced by InstanceNorm (batch_stats='instance'): equal at batch 1 only; "
    "at batch > 1 the model now normalises each sample on its own"
)


def with_conversions(report: FoldReport, sites: list[Site], original: nn.Module, dry_run: bool) -> FoldReport:
    """``report`` of the fold of the converted model, with the conversions' verdicts and note.

    A dry run folded the model as given: its verdicts for the converted BNs (left, no running statistics)
    are replaced. A fold saw InstanceNorms instead: the verdicts are added and counted as BNs before.
    """
    if not sites:
        return report
    names = {s.bn for s in sites}
    order = {name or "<root>": i for i, (name, _) in enumerate(original.named_modules())}
    verdicts = sorted(
        [v for v in report.verdicts if v.bn not in names] + list(sites),
        key=lambda v: order.get(v.bn, len(order)),
    )
    extra = 0 if dry_run else len(sites)
    return replace(
        report,
        verdicts=verdicts,
        bn_before=report.bn_before + extra,
        notes=(*report.notes, NOTE.format(n=len(sites))),
    )


# ------------------------------------------------------------------ batch-statistics BN on constants
CONSTANT_DETAIL = "batch statistics of a constant input: evaluated once (float64), the BN is a constant"

_LAYER_FNS: dict[Any, tuple[str, tuple[str, ...]]] = {
    # F.convNd / F.linear: argument names in positional order, after the input
    F.conv1d: ("Conv1d", ("weight", "bias", "stride", "padding", "dilation", "groups")),
    F.conv2d: ("Conv2d", ("weight", "bias", "stride", "padding", "dilation", "groups")),
    F.conv3d: ("Conv3d", ("weight", "bias", "stride", "padding", "dilation", "groups")),
    F.linear: ("Linear", ("weight", "bias")),
}
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


@dataclass(frozen=True)
class ConstantLayer:
    """A module whose forward is one conv/linear of its input with a weight computed from constants
    by a batch-statistics ``F.batch_norm`` (weight standardisation), and the plain layer equal to it."""

    name: str
    layer: nn.Module
    site: Site


def _args(node: fx.Node, names: tuple[str, ...], skip: int = 0) -> dict[str, Any]:
    out = dict(zip(names[skip:], node.args[skip:]))
    out.update(node.kwargs)
    return out


def _constant_layer(m: nn.Module, name: str) -> ConstantLayer | None:
    """The plain layer equal to ``m`` (module docstring of this section), or None if ``m`` is not one."""
    from .copying import shadow

    try:
        graph = fx.Tracer().trace(shadow(m))
    except Exception:  # noqa: BLE001 - a module that does not trace is not one of these
        return None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    x = inputs[0]
    varying = {x}
    for n in nodes:
        if n.op != "placeholder" and any(a in varying for a in n.all_input_nodes):
            varying.add(n)
    outs = [n for n in nodes if n.op == "output"]
    layer_calls = [n for n in varying if n.op == "call_function" and n.target in _LAYER_FNS]
    if len(outs) != 1 or len(layer_calls) != 1 or varying != {x, layer_calls[0], outs[0]}:
        return None
    call = layer_calls[0]
    if outs[0].args != (call,) or not call.args or call.args[0] is not x:
        return None
    bns = [n for n in nodes if n.op == "call_function" and n.target is F.batch_norm]
    if not bns or any(n in varying for n in bns):
        return None
    for bn in bns:
        a = _args(bn, _BN_ARGS)
        if (
            not a.get("training", False)
            or a.get("running_mean") is not None
            or a.get("running_var") is not None
        ):
            return None  # an inference BN, or one that updates running statistics (a side effect)
    kind, names = _LAYER_FNS[call.target]
    args = _args(call, ("input", *names), skip=1)
    if any(isinstance(v, fx.Node) for k, v in args.items() if k not in ("weight", "bias")):
        return None
    values = _evaluate(m, nodes, varying)
    if values is None:
        return None
    w = _value(args.get("weight"), values)
    b = _value(args.get("bias"), values)
    if not isinstance(w, torch.Tensor) or not (b is None or isinstance(b, torch.Tensor)):
        return None
    dtype = next((t.dtype for t in m.parameters() if t.is_floating_point()), w.dtype)
    if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
        return None
    device = w.device
    new: nn.Module
    if kind == "Linear":
        if w.dim() != 2:
            return None
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device, dtype=dtype)
    else:
        dims = int(kind[-2])
        groups = int(args.get("groups", 1))
        if w.dim() != dims + 2:
            return None
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        kernel: Any = tuple(w.shape[2:])
        new = cls(
            w.shape[1] * groups,
            w.shape[0],
            kernel,
            stride=args.get("stride", 1),
            padding=args.get("padding", 0),
            dilation=args.get("dilation", 1),
            groups=groups,
            bias=b is not None,
            device=device,
            dtype=dtype,
        )
    grad = any(t.requires_grad for t in m.parameters())
    with torch.no_grad():
        new.weight = nn.Parameter(w.to(dtype), requires_grad=grad)  # one cast from float64
        if b is not None:
            new.bias = nn.Parameter(b.to(dtype), requires_grad=grad)
    new.train(m.training)
    label = f"{name}.{bns[0].name}"
    return ConstantLayer(
        name, new, Site(label, name, "constant", Direction.FORWARD, CONSTANT_DETAIL, "bn-constant")
    )


def _value(v: Any, values: dict[fx.Node, Any]) -> Any:
    return values[v] if isinstance(v, fx.Node) else v


def _evaluate(m: nn.Module, nodes: list[fx.Node], varying: set[fx.Node]) -> dict[fx.Node, Any] | None:
    """The value of every constant node, floating tensors in float64 (the fold's math), or None."""
    values: dict[fx.Node, Any] = {}

    def arg(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: values[n])

    with torch.no_grad():
        for n in nodes:
            if n in varying or n.op == "output":
                continue
            try:
                if n.op == "get_attr":
                    t: Any = m
                    for part in str(n.target).split("."):
                        t = getattr(t, part)
                    if not isinstance(t, torch.Tensor):
                        return None
                    values[n] = t.detach().to(torch.float64) if t.is_floating_point() else t.detach()
                elif n.op == "call_function":
                    values[n] = n.target(*arg(n.args), **arg(n.kwargs))  # type: ignore[operator]
                elif n.op == "call_method":
                    self_, *rest = arg(n.args)
                    values[n] = getattr(self_, str(n.target))(*rest, **arg(n.kwargs))
                else:
                    return None  # call_module: a submodule (the module is a leaf, so none expected)
            except Exception:  # noqa: BLE001 - a computation that fails is no constant to evaluate
                return None
    return values


def constant_layers(module: nn.Module) -> list[ConstantLayer]:
    """Every submodule (not the root) that is a conv/linear with a weight standardised by batch
    statistics (timm ``StdConv2d`` / ``ScaledStdConv2d``, NF-ResNets), with its plain replacement.

    Only leaf modules of classes outside ``torch.nn``, with no hooks and no parametrizations, whose
    forward names ``batch_norm`` in its own code and traces to ``F.conv*``/``F.linear`` of the input with a weight (and bias) computed from the
    module's own tensors through at least one ``F.batch_norm(..., None, None, training=True)``, and whose
    ancestors call them whole (:func:`bnfold.fx.safety.unsafe_use`). The constant is evaluated in
    float64 and cast once to the layer's dtype.
    """
    from .safety import unsafe_use

    found: list[ConstantLayer] = []
    for name, m in module.named_modules():
        if not name or next(iter(m.children()), None) is not None:
            continue
        cls = type(m)
        if cls.__module__.startswith("torch.") or not any(True for _ in m.parameters(recurse=False)):
            continue
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "parametrizations", None) is not None:
            continue
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        if code is None or "batch_norm" not in code.co_names:
            continue  # cheap: only a forward that names batch_norm itself is traced
        c = _constant_layer(m, name)
        if c is None:
            continue
        parts = name.split(".")
        if not any(
            unsafe_use(module.get_submodule(".".join(parts[:i])), ".".join(parts[i:]))
            for i in range(len(parts))
        ):
            found.append(c)
    return found


def swap_in(root: nn.Module, layers: list[ConstantLayer]) -> None:
    """Put each plain layer in place of its module in ``root`` (changed in place)."""
    for c in layers:
        parent_name, _, attr = c.name.rpartition(".")
        setattr(root.get_submodule(parent_name), attr, c.layer)
