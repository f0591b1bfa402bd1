"""Scale propagation in a traced ``nn.Module``: split a BatchNorm no exact fold removed into scale and shift.

The PyTorch counterpart of :mod:`bnfold.onnx.propagate` (same identities, same verdicts). A BN left
after the folds is ``y = a * x + b`` per channel (``a = gamma / sqrt(var + eps)``, ``b = beta - mean * a``,
float64). This pass follows ``y`` forward through nodes that each read the previous tensor alone
(a ``.size()`` read aside) and moves the BN's parts with exact identities (per channel ``c``):

* *full* nodes commute with the whole affine: ``nn.MaxPool{1,2,3}d`` / ``nn.AdaptiveMaxPool{1,2,3}d``
  (``a >= 0``; any padding and ceil mode: max pads with -inf), ``nn.AdaptiveAvgPool{1,2,3}d``,
  their functional forms ``F.adaptive_{avg,max}_pool{1,2,3}d``, ``nn.AvgPool{1,2,3}d`` whose divisor counts only real elements (``count_include_pad=False``, or no
  padding and no ceil mode; no ``divisor_override``), ``nn.Flatten`` / ``torch.flatten`` /
  ``x.view(x.size(0), -1)`` from dim 1 (channel ``c`` becomes a block of features), ``nn.Identity``,
  ``nn.Dropout`` in eval mode (or with ``eval_semantics``);
* *scale-only* nodes commute with a per-channel scale but not with a shift: ``ReLU`` and ``LeakyReLU``
  (module, ``torch.relu``, ``F.relu``, ``F.leaky_relu``, ``x.relu()``; ``a >= 0``), zero padding
  (``nn.ZeroPad*d``, ``nn.ConstantPad*d`` with 0, ``F.pad`` constant 0 off the batch and channel
  axes), an ``nn.AvgPool`` that counts padded zeros or has a ``divisor_override``, ``nn.Dropout`` in
  train mode;
* the walk ends at a plain ``nn.Conv{1,2,3}d`` (its rank that of the BN; any padding, group-aware) or
  ``nn.Linear`` (after a flatten, or on a tensor proven 2-D) reading the tensor: the scale multiplies
  the layer's input channels. The last tensor may fork into several such layers (a pre-activation
  block's projection shortcut and first conv): each takes the scale, and the shift goes into every
  bias, or stops before them all.

Where the shift goes (the ONNX cases 1 and 4; this backend has no producer-bias or Max case):

1. No scale-only node and no layer that pads: into the layers' biases (``W (a z + b) = (W a) z + W b``).
2. Otherwise ONE per-channel add of ``b / a`` (a registered buffer) before the first node that stops
   it, ``a*z + b = a*(z + b/a)``, which needs ``a != 0`` wherever ``b != 0``.

*Blocked channels* (a negative scale where a ReLU / LeakyReLU / MaxPool follows, a zero scale with a
non-zero shift where the shift must stop) keep their affine: one per-channel multiply (``a`` for blocked
channels, 1 for the others) and one add (``b`` for blocked channels; ``b/a`` for the others when their
shift stops, else 0) go before the first node that blocks or stops, where only full nodes precede them;
the scale of the movable channels goes on alone. When every channel is blocked the BN is kept and its
verdict's detail says how many channels blocked it; otherwise the verdict is ``propagated`` and its
detail says how many kept their affine (the ONNX wording). Only plain ``nn.BatchNorm{1,2,3}d`` modules
called once are tried (no hooks; a BatchNorm1d needs its input's rank recorded by ``example_inputs``).
Chain modules with hooks, in-place reads of the BN's input and tensors shared with anything but layers
refuse. All values are computed in float64 and cast once to the layer's dtype; a
result that is not finite refuses the BN. Each layer gets a new module (same type, new tensors); the
model's other tensors are not touched.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.fold_math import bn_affine
from bnfold.fold_math.propagation import ELIGIBLE, Blocked
from bnfold.hints import EXAMPLE_INPUTS, Hint
from bnfold.records import Direction, Site, Skip, Verdict

from .layers import called_module, fresh_attr, layer_kind
from .shapes import rank_of

__all__ = ["propagate_graph_module"]


_BNS: dict[type[nn.Module], int] = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.BatchNorm1d: -1}
_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_MAXPOOLS: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
}
_AVGPOOLS: dict[type[nn.Module], int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_AVG: dict[type[nn.Module], int] = {
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
}
_PADS: dict[type[nn.Module], int] = {
    nn.ZeroPad1d: 1,
    nn.ZeroPad2d: 2,
    nn.ZeroPad3d: 3,
    nn.ConstantPad1d: 1,
    nn.ConstantPad2d: 2,
    nn.ConstantPad3d: 3,
}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_RELU_FUNCS = (torch.relu, F.relu, torch.relu_)
_FLATTEN_FUNCS = (torch.flatten,)
_ADAPTIVE_AVG_FUNCS: dict[Any, int] = {
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
}
_ADAPTIVE_MAX_FUNCS: dict[Any, int] = {
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}
_MAX_CHAIN = 32
_PREFIX = "not propagated: "


class _Refuse(Exception):
    """Why a BN's scale cannot move; ``hints``: the options that would let it (:mod:`bnfold.hints`)."""

    def __init__(self, message: str, hints: tuple[Hint, ...] = ()) -> None:
        super().__init__(message)
        self.hints = hints


@dataclass(slots=True)
class _Fit:
    """How layer ``node`` takes a per-channel scale of its input (``scale_w``: its new float64 weight) and
    a per-channel shift (``bias_of``: the float64 term added to its bias, where ``takes_shift``)."""

    node: fx.Node
    where: str
    kind: str
    label: str
    rep: int
    takes_shift: bool
    why: str
    scale_w: Callable[[torch.Tensor], torch.Tensor]
    bias_of: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass(slots=True)
class _Plan:
    bn: fx.Node
    x: fx.Node
    chain: list[fx.Node]
    fits: list[_Fit] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    inserts: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)
    """(position in ``chain``, or ``len(chain)`` for the layers; ``mul`` or ``add``; constant): nodes put
    on the tensor read at that position (by every layer, for the last one)."""
    shift: str = "no shift"
    kept: str = ""
    dtype: torch.dtype = torch.float32


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None))


def _readers(n: fx.Node) -> list[fx.Node]:
    """The nodes reading ``n``'s value (a ``.size()`` call reads only its shape, which stays)."""
    return [u for u in n.users if not (u.op == "call_method" and u.target == "size")]


def _inplace(gm: fx.GraphModule, n: fx.Node) -> bool:
    """``n`` may write into its first argument."""
    if n.op == "call_module":
        return bool(getattr(called_module(gm, n), "inplace", False))
    if n.op == "call_function":
        if n.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem):
            return True
        name = getattr(n.target, "__name__", "")
        return bool(n.kwargs.get("inplace")) or name.endswith("_") or "out" in n.kwargs
    if n.op == "call_method":
        return str(n.target).endswith("_")
    return False


def _allocates(gm: fx.GraphModule, n: fx.Node) -> bool:
    """``n``'s value is a new tensor, never its input nor a view of it (conservative: False if unsure)."""
    if _inplace(gm, n):
        return False
    m = called_module(gm, n)
    if m is not None:
        t = type(m)
        return (
            t in _CONVS
            or t is nn.Linear
            or t in _BNS
            or t in _MAXPOOLS
            or t in _AVGPOOLS
            or t
            in (
                nn.ReLU,
                nn.LeakyReLU,
            )
        )
    if n.op == "call_function":
        return n.target in (*_RELU_FUNCS, F.leaky_relu, operator.add, operator.mul, torch.add, torch.mul)
    return n.op == "call_method" and n.target == "relu"


def _arg(n: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _only_input(n: fx.Node, cur: fx.Node, allowed: set[str]) -> bool:
    """``cur`` is ``n``'s first argument and no other argument is a node (besides ``size`` reads)."""
    if not n.args or n.args[0] is not cur:
        return False
    others = [*n.args[1:], *n.kwargs.values()]
    nodes = [v for v in others if isinstance(v, fx.Node)]
    return all(v.op == "call_method" and v.target == "size" for v in nodes) and set(n.kwargs) <= allowed


def _is_flatten_view(n: fx.Node, cur: fx.Node) -> bool:
    """``cur.view(cur.size(0), -1)`` / ``cur.reshape(cur.size(0), -1)``."""
    if n.op != "call_method" or n.target not in ("view", "reshape") or len(n.args) != 3 or n.kwargs:
        return False
    size, rest = n.args[1], n.args[2]
    return bool(
        isinstance(size, fx.Node)
        and size.op == "call_method"
        and size.target == "size"
        and size.args == (cur, 0)
        and not size.kwargs
        and rest == -1
    )


def _classify(gm: fx.GraphModule, n: fx.Node, cur: fx.Node, spatial: int | None, eval_semantics: bool) -> str:
    """What ``n`` (reading ``cur``) lets through: "full", "positive_full", "scale", "positive_scale",
    "flatten", "layer"; raises :class:`_Refuse` otherwise."""
    m = called_module(gm, n)
    label = _label(gm, n)
    if m is not None:
        if n.args[:1] != (cur,) or len(n.args) != 1 or n.kwargs:
            raise _Refuse(f"{label} cannot carry the scale")
        if _has_hooks(m):
            raise _Refuse(f"{label} has hooks")
        t = type(m)
        if t in _CONVS or t is nn.Linear:
            if layer_kind(m) is None:
                raise _Refuse(f"{label} is not a plain layer")
            return "layer"
        if t is nn.ReLU or t is nn.LeakyReLU:
            return "positive_scale"
        if t is nn.Identity:
            return "full"
        if t in _DROPOUTS:
            return "full" if (not m.training or eval_semantics) else "scale"
        if t is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise _Refuse(f"{label} does not flatten from the channel axis")
            return "flatten"
        rank = {**_MAXPOOLS, **_AVGPOOLS, **_ADAPTIVE_AVG, **_PADS}.get(t)
        if rank is None:
            raise _Refuse(f"{label} cannot carry the scale")
        if spatial is None or rank != spatial:
            raise _Refuse(f"{label} may not act on the BN's spatial axes")
        if t in _MAXPOOLS:
            if getattr(m, "return_indices", False):
                raise _Refuse(f"{label} returns indices")
            return "positive_full"
        if t in _ADAPTIVE_AVG:
            return "full"
        if t in _AVGPOOLS:
            pads = any(int(p) for p in _tuple(getattr(m, "padding", 0)))
            if getattr(m, "divisor_override", None):
                return "scale"
            counts_pad = bool(getattr(m, "count_include_pad", True))
            return "scale" if counts_pad and (pads or getattr(m, "ceil_mode", False)) else "full"
        if float(getattr(m, "value", 0.0)) != 0.0:
            raise _Refuse(f"{label} pads with a non-zero value")
        return "scale"
    if n.op == "call_function":
        if n.target in _RELU_FUNCS and _only_input(n, cur, {"inplace"}) and len(n.args) <= 2:
            return "positive_scale"
        if n.target is F.leaky_relu and _only_input(n, cur, {"negative_slope", "inplace"}):
            return "positive_scale"
        pool = _ADAPTIVE_AVG_FUNCS.get(n.target) or _ADAPTIVE_MAX_FUNCS.get(n.target)
        if pool is not None and _only_input(n, cur, {"output_size", "return_indices"}):
            if spatial is None or pool != spatial:
                raise _Refuse(f"{label} may not act on the BN's spatial axes")
            if n.target in _ADAPTIVE_AVG_FUNCS:
                return "full"
            if _arg(n, 2, "return_indices", False):
                raise _Refuse(f"{label} returns indices")
            return "positive_full"
        if n.target in _FLATTEN_FUNCS and _only_input(n, cur, {"start_dim", "end_dim"}):
            if _arg(n, 1, "start_dim", 0) != 1 or _arg(n, 2, "end_dim", -1) != -1:
                raise _Refuse(f"{label} does not flatten from the channel axis")
            return "flatten"
        if n.target is F.pad and _only_input(n, cur, {"pad", "mode", "value"}):
            pad = _arg(n, 1, "pad", ())
            mode = _arg(n, 2, "mode", "constant")
            value = _arg(n, 3, "value", None)
            if mode != "constant" or value not in (None, 0, 0.0):
                raise _Refuse(f"{label} is not a zero pad")
            if not isinstance(pad, (tuple, list)) or spatial is None or len(pad) > 2 * spatial:
                raise _Refuse(f"{label} may pad the batch or channel axis")
            return "scale"
    if n.op == "call_method" and n.args[:1] == (cur,):
        if n.target in ("relu", "relu_") and len(n.args) == 1 and not n.kwargs:
            return "positive_scale"
        if n.target == "flatten" and _only_input(n, cur, {"start_dim", "end_dim"}):
            if _arg(n, 1, "start_dim", 0) != 1 or _arg(n, 2, "end_dim", -1) != -1:
                raise _Refuse(f"{label} does not flatten from the channel axis")
            return "flatten"
        if _is_flatten_view(n, cur):
            return "flatten"
    raise _Refuse(f"{label} cannot carry the scale")


def _tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _label(gm: fx.GraphModule, n: fx.Node) -> str:
    m = called_module(gm, n)
    if m is not None:
        return f"{type(m).__name__} '{n.target}'"
    if n.op == "call_function":
        return f"{getattr(n.target, '__name__', str(n.target))} '{n.name}'"
    return f"{n.target} '{n.name}'"


def _kind(gm: fx.GraphModule, n: fx.Node) -> str:
    m = called_module(gm, n)
    if m is not None:
        return type(m).__name__
    return str(getattr(n.target, "__name__", n.target))


def _spatial(gm: fx.GraphModule, bn: nn.Module, x: fx.Node) -> tuple[int | None, bool]:
    """The BN input's spatial rank and whether it is proven. A BatchNorm1d whose input rank the graph does not
    prove (:func:`~bnfold.fx.shapes.rank_of`) has no spatial rank: a Conv1d also reads an unbatched ``(C, L)``,
    where its channels are the BN's dim 0, so neither a Conv1d nor a Linear may take its scale."""
    s = _BNS[type(bn)]
    if s >= 0:
        return s, True
    r = rank_of(x, gm)
    return (None, False) if r is None else (r - 2, True)


def _conv_pads(m: nn.Module) -> bool:
    pad = getattr(m, "padding", 0)
    if isinstance(pad, str):
        if pad == "valid":
            return False
        return any(d * (k - 1) for d, k in zip(_tuple(m.dilation), _tuple(m.kernel_size)))
    return any(int(p) for p in _tuple(pad))


def _fit(
    gm: fx.GraphModule, node: fx.Node, C: int, spatial: int | None, proven: bool, flattened: bool, dtype: Any
) -> _Fit:
    """How the layer of ``node`` takes the BN's scale (per channel) and shift."""
    layer = called_module(gm, node)
    assert layer is not None
    label = _label(gm, node)
    kind = layer_kind(layer) or type(layer).__name__
    where = f"{kind} '{node.target}'"
    w = layer.weight
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise _Refuse(f"the weight of {label} is not floating point")
    if dtype != w.dtype:
        raise _Refuse(f"the BN's dtype differs from the weight's of {label}")
    old = layer.bias
    if isinstance(old, torch.Tensor) and old.dtype != w.dtype:
        raise _Refuse("the bias dtype differs from the weight's")
    w64 = w.detach().cpu().double()
    if type(layer) in _CONVS:
        if flattened:
            raise _Refuse(f"{label} after a flatten")
        if not proven:  # a conv also reads an unbatched (C, ...), its channels on dim 0
            raise _Refuse(
                f"the rank of the BN's input is not known: {label} may read its channels on dim 0 (an unbatched "
                "input)",
                (EXAMPLE_INPUTS,),
            )
        if spatial is None or _CONVS[type(layer)] != spatial:
            raise _Refuse(f"{label} may not read the BN's channel axis")
        g = int(layer.groups)  # type: ignore[arg-type]
        M, Cg = w.shape[0], w.shape[1]
        if Cg * g != C or M % g:
            raise _Refuse(f"{label} does not read {C} channels")
        wg = w64.reshape((g, M // g, Cg) + tuple(w.shape[2:]))
        tail = (1,) * (w.ndim - 2)

        def scale_w(v: torch.Tensor) -> torch.Tensor:
            return (wg * v.reshape((g, 1, Cg) + tail)).reshape(w.shape)

        def bias_of(v: torch.Tensor) -> torch.Tensor:
            return scale_w(v).reshape(M, -1).sum(dim=1)

        return _Fit(
            node,
            where,
            kind,
            label,
            1,
            not _conv_pads(layer),
            f"{label} (it pads with zeros)",
            scale_w,
            bias_of,
        )
    # nn.Linear
    if not proven:
        raise _Refuse(f"the rank of the BN's input is not known before {label}", (EXAMPLE_INPUTS,))
    if not flattened and spatial != 0:
        raise _Refuse(f"{label} may not read the BN's channel axis")
    K = w.shape[1]
    if K % C or (not flattened and K != C):
        raise _Refuse(f"{label} does not read {C} channels")
    rep = K // C

    def scale_lin(v: torch.Tensor) -> torch.Tensor:
        return w64 * v.repeat_interleave(rep)[None, :]

    def bias_lin(v: torch.Tensor) -> torch.Tensor:
        return w64 @ v.repeat_interleave(rep)

    return _Fit(node, where, kind, label, rep, True, label, scale_lin, bias_lin)


def _over(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``b / a``, 0 where ``a == 0`` (used only where ``b == 0`` there or the channel keeps its affine)."""
    return torch.where(a == 0, torch.zeros_like(a), b / torch.where(a == 0, torch.ones_like(a), a))


def _plan(gm: fx.GraphModule, bn_node: fx.Node, eval_semantics: bool) -> _Plan:
    bn = called_module(gm, bn_node)
    if bn is None or type(bn) not in _BNS or _has_hooks(bn):
        raise _Refuse("not a plain BatchNorm module")
    if bn.training and not eval_semantics:
        raise _Refuse("the BN is in train() mode")
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        raise _Refuse("the BN has no running statistics")
    if len(bn_node.args) != 1 or bn_node.kwargs or not isinstance(bn_node.args[0], fx.Node):
        raise _Refuse("the BN call has extra arguments")
    x = bn_node.args[0]
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == bn_node.target) != 1:
        raise _Refuse("the BN is called at several places")
    w_bn = getattr(bn, "weight", None) if getattr(bn, "affine", False) else None
    b_bn = getattr(bn, "bias", None) if getattr(bn, "affine", False) else None
    a_np, b_np = bn_affine(
        None if w_bn is None else w_bn.detach().cpu().double().numpy(),
        None if b_bn is None else b_bn.detach().cpu().double().numpy(),
        mean.detach().cpu().double().numpy(),
        var.detach().cpu().double().numpy(),
        float(bn.eps),  # type: ignore[arg-type]
    )
    a, b = torch.from_numpy(a_np.reshape(-1).copy()), torch.from_numpy(b_np.reshape(-1).copy())
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise _Refuse("its scale or shift is not finite")
    C = a.numel()
    spatial, proven = _spatial(gm, bn, x)
    plan = _Plan(bn=bn_node, x=x, chain=[], dtype=mean.dtype)
    labels: list[str] = []
    sign_pos: int | None = None
    stops: list[int] = []
    flat_at: int | None = None
    layers: list[fx.Node] = []

    cur = bn_node
    for _ in range(_MAX_CHAIN):
        readers = _readers(cur)
        if not readers or any(r.op == "output" for r in readers):
            raise _Refuse(f"'{cur.name}' is read by {len(readers)} readers (or is an output)")
        flattened = flat_at is not None
        if len(readers) > 1:  # a fork: every reader must be a layer reading the tensor alone
            for r in readers:
                try:
                    kind = _classify(gm, r, cur, None if flattened else spatial, eval_semantics)
                except _Refuse:
                    kind = ""
                if kind != "layer":
                    raise _Refuse(f"'{cur.name}' is read by {len(readers)} readers, not all of them layers")
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            layers = sorted(readers, key=order.__getitem__)
            break
        n = readers[0]
        kind = _classify(gm, n, cur, None if flattened else spatial, eval_semantics)
        label = _label(gm, n)
        if kind == "layer":
            layers = [n]
            break
        if flattened and kind not in ("full", "positive_scale", "scale"):
            raise _Refuse(f"{label} after a flatten")
        pos = len(plan.chain)
        if kind.startswith("positive") and sign_pos is None:
            sign_pos = pos
        if kind.endswith("scale"):
            stops.append(pos)
        if kind == "flatten":
            flat_at = pos
        plan.chain.append(n)
        labels.append(label)
        plan.kinds.append(_kind(gm, n))
        cur = n
    else:
        raise _Refuse("the chain is too long")
    flattened = flat_at is not None

    # The BN's input must not be written in place before its last new reader reads it.
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(order[n] for n in (plan.chain[:1] or layers))
    # Any in-place write in between counts unless it writes a tensor made after the BN by an op that
    # allocates: a write through a view of the input (``x.view(...).mul_(2)``, ``x[:, 0].mul_(0)``)
    # changes the input too.
    for u in gm.graph.nodes:
        if not (order[bn_node] < order[u] < last) or not _inplace(gm, u):
            continue
        w = u.kwargs.get("out", u.args[0] if u.args else None)
        if not (isinstance(w, fx.Node) and order[w] > order[bn_node] and _allocates(gm, w)):
            raise _Refuse(f"'{x.name}' may be written in place before the BN's reader runs")

    fits = [_fit(gm, n, C, spatial, proven, flattened, mean.dtype) for n in layers]
    rep = fits[0].rep
    if any(f.rep != rep for f in fits):
        raise _Refuse("the layers reading the tensor differ in width")
    plan.fits = fits
    pos_layer = len(plan.chain)
    if not all(f.takes_shift for f in fits):
        stops.append(pos_layer)
    why = next((f.why for f in fits if not f.takes_shift), fits[0].why)
    stop_labels = labels + [why]
    add_labels = labels + [", ".join(f.label for f in fits)]
    where = ", ".join(f.where for f in fits)

    def shaped(v: torch.Tensor, pos: int) -> torch.Tensor:
        if flat_at is not None and flat_at < pos:
            return v.repeat_interleave(rep)
        if spatial is None:
            raise _Refuse("the rank of the BN's input is not known")
        return v.reshape((C,) + (1,) * spatial)

    # ---- which channels keep their affine, and where the shift goes (the ONNX cases 1, 4) ----------
    S = stops[0] if stops else None
    none = torch.zeros(C, dtype=torch.bool)
    neg = (a < 0) if sign_pos is not None else none
    zero = ((a == 0) & (b != 0)) if S is not None else none
    blocked = neg | zero
    held = Blocked.of(neg, zero, labels, sign_pos, stop_labels, S)
    whole = held.whole()
    if whole is not None:
        raise _Refuse(whole)
    one = torch.ones_like(a)
    am = torch.where(blocked, one, a)
    to_bias: torch.Tensor | None = None
    if held.count:  # one multiply and one add before the first node that blocks (or where the shift stops)
        q = min(p for p in (sign_pos if neg.any() else None, S) if p is not None)
        m = torch.where(blocked, a, one)
        if S is not None:
            t = torch.where(blocked, b, _over(b, a))
            plan.shift = f"shift in that Add before {stop_labels[q]}"
        else:
            t = torch.where(blocked, b, torch.zeros_like(b))
            to_bias = torch.where(blocked, torch.zeros_like(b), b)
            plan.shift = f"shift into the bias of {where}"
        plan.inserts += [(q, "mul", shaped(m, q)), (q, "add", shaped(t, q))]
        plan.kept = held.kept(stop_labels[q])
    elif S is None:
        if bool((b != 0).any()):
            to_bias = b
            plan.shift = f"shift into the bias of {where}"
    elif bool((b != 0).any()):
        plan.inserts.append((S, "add", shaped(_over(b, a), S)))
        plan.shift = f"shift as one Add before {add_labels[S]}"
    # A chain node reading the BN's input itself (or a view of it: Identity, Dropout, flatten return
    # their input or a view) must not write in place: the BN's output was a new tensor, the input is not.
    inserted = {pos for pos, _, _ in plan.inserts}
    aliased = True
    for k, n in enumerate(plan.chain):
        aliased = aliased and k not in inserted
        if aliased and _inplace(gm, n):
            raise _Refuse(f"{labels[k]} would write the BN's input in place")
        aliased = aliased and not _allocates(gm, n)

    dtype = plan.dtype
    values: list[torch.Tensor] = [v for _, _, v in plan.inserts]
    for f in fits:
        f.weight = f.scale_w(am)
        if to_bias is not None and bool((to_bias != 0).any()):
            layer = called_module(gm, f.node)
            old = getattr(layer, "bias", None)
            base = old.detach().cpu().double() if isinstance(old, torch.Tensor) else 0.0
            f.bias = base + f.bias_of(to_bias)
        values += [v for v in (f.weight, f.bias) if v is not None]
    for v in values:
        if not torch.isfinite(v.to(dtype)).all():
            raise _Refuse(f"a propagated value would not be finite in {dtype}")
    return plan


def _describe(p: _Plan) -> str:
    through = ", ".join(p.kinds) or "nothing"
    where = ", ".join(f.where for f in p.fits)
    out = f"scale into the input channels of {where} through {through}; {p.shift}"
    return f"{out}; {p.kept}" if p.kept else out


def _apply_layer(gm: fx.GraphModule, f: _Fit) -> None:
    layer = called_module(gm, f.node)
    assert layer is not None and f.weight is not None
    w = layer.weight
    assert isinstance(w, torch.Tensor)
    dtype, device = w.dtype, w.device
    new = copy.copy(layer)  # a shallow copy: new tensors go in, the old ones stay where they are
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._modules = dict(layer._modules)
    new.weight = nn.Parameter(f.weight.to(dtype).to(device), requires_grad=w.requires_grad)
    if f.bias is not None:
        rg = layer.bias.requires_grad if isinstance(layer.bias, torch.Tensor) else w.requires_grad
        new.bias = nn.Parameter(f.bias.to(dtype).to(device), requires_grad=rg)
    graph = gm.graph
    target = str(f.node.target)
    calls = sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target)
    read = any(
        n.op == "get_attr" and (str(n.target) == target or str(n.target).startswith(target + "."))
        for n in graph.nodes
    )
    if calls == 1 and not read:
        parent, _, attr = target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, new)
    else:
        name = fresh_attr(gm, f"{target}_propagated".replace(".", "_"))
        gm.add_submodule(name, new)
        f.node.target = name


def _apply(gm: fx.GraphModule, p: _Plan) -> None:
    graph = gm.graph
    for f in p.fits:
        _apply_layer(gm, f)
    layer = called_module(gm, p.fits[0].node)
    assert layer is not None and isinstance(layer.weight, torch.Tensor)
    device = layer.weight.device
    p.bn.replace_all_uses_with(p.x)
    graph.erase_node(p.bn)
    layers = [f.node for f in p.fits]
    for pos, op, value in p.inserts:
        readers = [p.chain[pos]] if pos < len(p.chain) else layers
        first = next(n for n in graph.nodes if n in readers)
        name = fresh_attr(gm, f"{p.bn.target}_{'scale' if op == 'mul' else 'shift'}".replace(".", "_"))
        gm.register_buffer(name, value.to(p.dtype).to(device))
        with graph.inserting_before(first):
            c = graph.get_attr(name)
            new = graph.call_function(operator.mul if op == "mul" else operator.add, (first.args[0], c))
        for r in readers:
            r.update_arg(0, new)


def propagate_graph_module(
    gm: fx.GraphModule, verdicts: list[Verdict], *, eval_semantics: bool = False
) -> tuple[list[Verdict], int]:
    """Propagate each BN of ``gm`` (edited in place) whose verdict is an :data:`~bnfold.fold_math.propagation.ELIGIBLE` skip; return the
    verdicts (``Site(direction=PROPAGATED)`` for those moved, the blocked channels counted in the detail of
    those kept) and how many BNs were propagated. ``gm.recompile()`` is called when one was."""
    by_name = {v.bn: i for i, v in enumerate(verdicts)}
    out = list(verdicts)
    done = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or str(n.target) not in by_name:
            continue
        i = by_name[str(n.target)]
        prev = out[i]
        if not isinstance(prev, Skip) or prev.reason not in ELIGIBLE:
            continue
        try:
            plan = _plan(gm, n, eval_semantics)
        except _Refuse as e:
            if "channels" in str(e):
                hints = (*prev.hints, *(h for h in e.hints if h not in prev.hints))
                out[i] = replace(prev, detail=f"{prev.detail}; {_PREFIX}{e}", pattern=None, hints=hints)
            continue
        detail = _describe(plan)
        target, kind = str(plan.fits[0].node.target), plan.fits[0].kind
        _apply(gm, plan)
        out[i] = Site(prev.bn, target, kind, Direction.PROPAGATED, detail, "scale-propagation")
        done += 1
    if done:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return out, done
