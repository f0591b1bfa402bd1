"""Merge parallel branches of one tensor into one ``nn.Conv2d`` in a traced module (fx backend).

The PyTorch counterpart of :mod:`bnfold.onnx.merge` (read its docstring for the cases and the rules):
after bnfold's BN folds, a sum (``+``, ``torch.add``, ``-``, a constant scale of an inner sum) of
branches that all read the same fx node ``x``, each branch one of

* an ``nn.Conv1d/2d/3d`` module call (exact type, ``padding_mode='zeros'``, no hooks) with the merged
  conv's stride, dilation and groups, its kernel centred in the largest one;
* ``x`` itself (identity), an eval-mode ``BatchNorm`` module on ``x`` alone;
* an ``nn.AvgPool1d/2d/3d`` with ``count_include_pad=True`` (or no padding), no ``ceil_mode``, no
  ``divisor_override``;
* ``Conv kxk(Conv 1x1(x))`` (ungrouped; the kxk unpadded or the 1x1 without bias);
* any of these times a per-tensor or per-channel constant (a parameter, buffer or Python number);

becomes one new conv module (float64 sum, one rounding to the weight dtype). The result is a
``torch.fx.GraphModule``. Every branch not merged gets a :class:`~bnfold.records.MergeReason`.
The caller folds again afterwards so that a BN on the sum folds into the merged conv.
The module's own ``reparameterize()``/``fuse()`` methods are never called.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.errors import BnfoldError
from bnfold.fold_math import bn_affine, cast_exact
from bnfold.fold_math.merge import (
    F64,
    ConvRead,
    MergeRef,
    MergeRefusal,
    absorb_constants,
    blocker_refusal,
    check_conv,
    compose_pointwise,
    embed,
    identity_kernel,
    merge_record,
    pick_input,
    pick_reference,
    pool_kernel,
    refuse_odd,
    refuse_open,
    scale_branch,
    sum_kernels,
)
from bnfold.fx.custom import describe_bn
from bnfold.fx.custom_traced import checked_ranks
from bnfold.fx.layers import called_module, constant_arg, constant_slot, fresh_attr
from bnfold.fx.shapes import unbatched_why
from bnfold.records import Direction, FoldReport, Merge, MergeReason, Site

__all__ = [
    "FxMergeResult",
    "merge_graph_module",
    "conv_modules",
    "exact_folds",
    "Exact",
    "channel_vector",
    "avg_pool_kernel",
    "NONLINEAR_NAMES",
]

Exact = dict[str, tuple[F64, F64]]
"""``{conv module name: (weight, bias)}``: a folded conv's parameters in float64, before their rounding."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADDS = (operator.add, operator.iadd, torch.add)
_SUBS = (operator.sub, operator.isub, torch.sub)
_MULS = (operator.mul, operator.imul, torch.mul)
_MAX_WALK = 4
_ACT_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Softplus,
    nn.Softmax,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Hardtanh,
    nn.GLU,
)
NONLINEAR_NAMES = (
    "relu",
    "relu6",
    "silu",
    "gelu",
    "sigmoid",
    "tanh",
    "hardswish",
    "hardsigmoid",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "mish",
    "softplus",
    "softmax",
    "hardtanh",
    "clamp",
    "abs",
    "exp",
    "log",
    "sqrt",
    "pow",
)
"""Functions (by name; aten ops by prefix) that are not linear: a branch through one is refused as such."""
_ACT_FUNCS = {*NONLINEAR_NAMES, "max_pool1d", "max_pool2d", "max_pool3d", "relu_", "sigmoid_", "clip"}


def conv_modules(module: nn.Module) -> int:
    """Conv modules in the module tree."""
    return sum(1 for m in module.modules() if isinstance(m, _CONVS))


def exact_folds(module: nn.Module, report: FoldReport) -> Exact:
    """The float64 weight and bias of every conv that one forward BN fold wrote, from ``module``'s own
    (unfolded) conv and BN: what the fold rounded once. The merge sums these, not the rounded weights, so a
    float16 model's merged conv is rounded once too (:func:`merge_graph_module` checks each against the
    folded conv, bit for bit, before it uses it)."""
    sites = [v for v in report.verdicts if isinstance(v, Site)]
    per_layer: dict[str, int] = {}
    for v in sites:
        per_layer[v.target] = per_layer.get(v.target, 0) + 1
    out: Exact = {}
    for v in sites:
        if v.direction is not Direction.FORWARD or per_layer[v.target] != 1:
            continue
        try:
            conv, bn = module.get_submodule(v.target), module.get_submodule(v.bn)
        except AttributeError:
            continue
        if type(conv) not in _CONVS or type(bn) not in _BNS:
            continue
        assert isinstance(conv, _CONVS) and isinstance(bn, _BNS)
        if bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
            continue
        scale, shift = bn_affine(
            None if bn.weight is None else _np(bn.weight),
            None if bn.bias is None else _np(bn.bias),
            _np(bn.running_mean),
            _np(bn.running_var),
            float(bn.eps),
        )
        w = _np(conv.weight) * scale.reshape((-1,) + (1,) * (conv.weight.dim() - 1))
        b = (np.zeros(conv.out_channels) if conv.bias is None else _np(conv.bias)) * scale + shift
        out[v.target] = (w, b)
    return out


def _np(t: torch.Tensor) -> F64:
    a: F64 = t.detach().cpu().double().numpy()
    return a


def _params(m: nn.Module, name: str, exact: Exact) -> tuple[F64, F64 | None]:
    """A conv module's weight and bias in float64: the exact values of its fold where they round to them."""
    assert isinstance(m, _CONVS)
    w, b = _np(m.weight), None if m.bias is None else _np(m.bias)
    got = exact.get(name)
    if got is None or m.weight.dtype == torch.bfloat16 or b is None or got[0].shape != w.shape:
        return w, b
    dt = torch.empty((), dtype=m.weight.dtype).numpy().dtype
    if np.array_equal(cast_exact(got[0], dt).astype(np.float64), w) and np.array_equal(
        cast_exact(got[1], dt).astype(np.float64), b
    ):
        return got
    return w, b


@dataclass(slots=True)
class FxMergeResult:
    merges: list[Merge] = field(default_factory=list)
    absorbed: dict[str, Site] = field(default_factory=dict)
    """``{BN module name: Site}`` for identity-BN branches merged into a conv."""
    applied: int = 0


@dataclass(slots=True)
class _Branch:
    leaf: Any
    kind: str  # conv | seq | identity | bn | avgpool | other
    base: fx.Node | None
    muls: list[fx.Node]
    blockers: list[fx.Node]
    pre: fx.Node | None = None
    sign: int = 1
    chain_muls: tuple[fx.Node, ...] = ()
    label: str = ""
    reason: MergeReason | None = None
    detail: str = ""


_INPLACE = (operator.iadd, operator.isub, operator.imul)


def _inplace_ok(n: fx.Node) -> bool:
    """An in-place ``+=``/``-=``/``*=`` reads like its out-of-place form only where nothing else reads the
    tensor it overwrites."""
    if n.target not in _INPLACE:
        return True
    a = n.args[0]
    return not isinstance(a, fx.Node) or len(a.users) == 1


def _mutates(gm: fx.GraphModule, n: fx.Node) -> bool:
    """``n`` may write into its first argument (an in-place op)."""
    if n.op == "call_module":
        return bool(getattr(called_module(gm, n), "inplace", False))
    if n.op == "call_method":
        name = str(n.target)
    elif n.op == "call_function":
        if n.target in _INPLACE or n.target in (operator.itruediv, operator.ipow, operator.setitem):
            return True
        name = getattr(n.target, "__name__", "")
    else:
        return False
    return (name.endswith("_") and not name.startswith("_")) or "out" in n.kwargs


def _is_sum(n: fx.Node) -> bool:
    if (
        n.op == "call_method"
    ):  # ``tensor + proxy`` traces as Tensor.add (commutative: the order does not matter)
        return n.target == "add" and len(n.args) == 2 and not n.kwargs
    if n.op != "call_function" or len(n.args) != 2 or n.kwargs:
        return False
    return (n.target in _ADDS or n.target in _SUBS) and _inplace_ok(n)


def _mul_slot(gm: fx.GraphModule, n: fx.Node) -> int | None:
    """The constant operand slot of a plain two-operand multiply whose other operand is a node."""
    if len(n.args) != 2 or n.kwargs:
        return None
    if not (
        (n.op == "call_function" and n.target in _MULS and _inplace_ok(n))
        or (n.op == "call_method" and n.target == "mul")
    ):  # ``tensor * proxy`` traces as Tensor.mul
        return None
    return constant_slot(gm, n)


def _through_identity(gm: fx.GraphModule, v: Any) -> Any:
    """``v``, seen through ``nn.Identity`` module calls read by one node only."""
    while (
        isinstance(v, fx.Node)
        and type(called_module(gm, v)) is nn.Identity
        and len(v.users) == 1
        and v.args
        and isinstance(v.args[0], fx.Node)
    ):
        v = v.args[0]
    return v


def _expandable(gm: fx.GraphModule, p: fx.Node) -> bool:
    if _is_sum(p):
        return True
    k = _mul_slot(gm, p)
    if k is None:
        return False
    q = _through_identity(gm, p.args[1 - k])
    return isinstance(q, fx.Node) and _is_sum(q) and len(q.users) == 1


def _chain(
    gm: fx.GraphModule, top: fx.Node
) -> tuple[list[fx.Node], list[Any], list[tuple[int, tuple[fx.Node, ...]]]]:
    nodes: list[fx.Node] = []
    leaves: list[Any] = []
    coefs: list[tuple[int, tuple[fx.Node, ...]]] = []

    def walk(n: fx.Node, sign: int, factors: tuple[fx.Node, ...], depth: int) -> None:
        nodes.append(n)
        k = _mul_slot(gm, n) if not _is_sum(n) else None
        if k is not None:
            inner = n.args[1 - k]
            while inner is not _through_identity(gm, inner):  # the Identity calls between belong to the chain
                assert isinstance(inner, fx.Node)
                nodes.append(inner)
                inner = inner.args[0]
            assert isinstance(inner, fx.Node)
            walk(inner, sign, (*factors, n), depth + 1)
            return
        for slot, arg in enumerate(n.args):
            v: Any = arg
            s = -sign if n.target in _SUBS and slot == 1 else sign
            inner = _through_identity(gm, v)
            if (
                isinstance(inner, fx.Node)
                and depth < 256
                and _expandable(gm, inner)
                and len(inner.users) == 1
                and (inner is v or len(v.users) == 1)
            ):
                if inner is not v:
                    cur = v
                    while cur is not inner:
                        nodes.append(cur)
                        cur = cur.args[0]
                walk(inner, s, factors, depth + 1)
            else:
                leaves.append(v)
                coefs.append((s, factors))

    walk(top, 1, (), 0)
    return nodes, leaves, coefs


def _is_top(gm: fx.GraphModule, n: fx.Node) -> bool:
    """A sum node that no longer chain absorbs."""
    users = list(n.users)
    if len(users) != 1:
        return True
    c = _through_identity_fwd(gm, users[0])
    if c is None:
        return True
    if _is_sum(c):
        return False
    if _mul_slot(gm, c) is not None and len(c.users) == 1:
        c2 = _through_identity_fwd(gm, next(iter(c.users)))
        return not (c2 is not None and _is_sum(c2))
    return True


def _through_identity_fwd(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    while type(called_module(gm, n)) is nn.Identity:
        if len(n.users) != 1:
            return None
        n = next(iter(n.users))
    return n


def _interpretations(gm: fx.GraphModule, leaf: Any) -> list[tuple[fx.Node, _Branch]]:
    out: list[tuple[fx.Node, _Branch]] = []
    v = leaf
    muls: list[fx.Node] = []
    blockers: list[fx.Node] = []
    for _ in range(_MAX_WALK + 1):
        if not isinstance(v, fx.Node):
            break
        out.append(
            (v, _Branch(leaf, "identity" if not blockers else "other", None, list(muls), list(blockers)))
        )
        k = _mul_slot(gm, v)
        if k is not None:
            muls.insert(0, v)
            v = v.args[1 - k]
            continue
        if (
            v.op not in ("call_module", "call_function", "call_method")
            or not v.args
            or not isinstance(v.args[0], fx.Node)
        ):
            break
        m = called_module(gm, v)
        if (
            (type(m) is nn.Identity or (type(m) is nn.Dropout and not m.training))
            and len(v.args) == 1
            and m is not None
            and not _hooks(m)
        ):
            muls.insert(0, v)
            v = v.args[0]
            continue
        if m is not None and isinstance(m, (*_CONVS, *_BNS, *_POOLS)) and len(v.args) == 1 and not v.kwargs:
            kind = "conv" if isinstance(m, _CONVS) else "bn" if isinstance(m, _BNS) else "avgpool"
            x = v.args[0]
            assert isinstance(x, fx.Node)
            out.append((x, _Branch(leaf, kind if not blockers else "other", v, list(muls), list(blockers))))
            pm = called_module(gm, x)
            if (
                kind == "conv"
                and not blockers
                and isinstance(pm, _CONVS)
                and len(x.args) == 1
                and isinstance(x.args[0], fx.Node)
                and all(int(s) == 1 for s in pm.kernel_size)
            ):
                out.append((x.args[0], _Branch(leaf, "seq", v, list(muls), [], pre=x)))
            break
        if _is_sum(v) or v.target in (torch.cat, torch.matmul, operator.matmul, operator.getitem):
            break
        blockers.insert(0, v)
        muls = []
        v = v.args[0]
    return out


def _is_conv_branch(gm: fx.GraphModule, b: _Branch) -> bool:
    return b.kind in ("conv", "seq") or (
        b.kind == "other" and b.base is not None and isinstance(called_module(gm, b.base), _CONVS)
    )


def _pick_input(
    gm: fx.GraphModule, leaves: list[Any], coefs: list[tuple[int, tuple[fx.Node, ...]]]
) -> tuple[fx.Node, list[_Branch], list[tuple[Any, tuple[int, tuple[fx.Node, ...]]]]] | None:
    return pick_input(leaves, coefs, [_interpretations(gm, v) for v in leaves], partial(_is_conv_branch, gm))


def _path(b: _Branch) -> list[fx.Node]:
    return ([b.pre] if b.pre is not None else []) + ([b.base] if b.base is not None else []) + b.muls


def _exclusive(b: _Branch, chain: set[fx.Node]) -> None:
    path = _path(b)
    for k, node in enumerate(path):
        allowed = {path[k + 1]} if k + 1 < len(path) else chain
        others = [u for u in node.users if u not in allowed]
        if others:
            raise MergeRefusal(
                MergeReason.OTHER_CONSUMERS,
                f"the output of '{node.name}' inside the branch is also "
                f"read by {', '.join(sorted(u.name for u in others))}",
            )


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _tup(v: Any, r: int) -> list[int]:
    return [int(a) for a in v] if isinstance(v, (tuple, list)) else [int(v)] * r


def _conv_geometry(m: nn.Module, what: str) -> tuple[list[int], list[int], list[int], int]:
    if type(m) not in _CONVS:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: a {type(m).__name__}, not a plain conv module")
    assert isinstance(m, _CONVS)
    if m.padding_mode != "zeros":
        raise MergeRefusal(MergeReason.PADDING, f"{what}: padding_mode={m.padding_mode!r}, not zeros")
    if _hooks(m):
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: has forward hooks")
    r = len(m.kernel_size)
    dil = _tup(m.dilation, r)
    if m.padding == "same":  # torch: total d * (k - 1) per axis, the odd one on the end side
        total = [d * (int(k) - 1) for d, k in zip(dil, m.kernel_size)]
        return _tup(m.stride, r), dil, [t // 2 for t in total] + [t - t // 2 for t in total], int(m.groups)
    if isinstance(m.padding, str):
        if m.padding != "valid":
            raise MergeRefusal(MergeReason.PADDING, f"{what}: padding={m.padding!r}")
        p = [0] * r
    else:
        p = _tup(m.padding, r)
    return _tup(m.stride, r), dil, p + p, int(m.groups)


def _read_conv(gm: fx.GraphModule, b: _Branch, exact: Exact) -> ConvRead:
    assert b.base is not None
    m = called_module(gm, b.base)
    assert m is not None
    strides, dil, pads, group = _conv_geometry(m, b.label)
    assert isinstance(m, _CONVS)
    w64, b64 = _params(m, str(b.base.target), exact)
    if b.pre is not None:
        pm = called_module(gm, b.pre)
        assert pm is not None
        s1, d1, p1, g1 = _conv_geometry(pm, b.pre.name)
        assert isinstance(pm, _CONVS)
        if any(s != 1 for s in s1) or any(p1) or pm.weight.dim() != m.weight.dim():
            raise MergeRefusal(
                MergeReason.UNSUPPORTED,
                f"{b.pre.name} -> {b.label}: the first conv is not a 1x1, stride 1, unpadded",
            )
        if g1 != 1 or group != 1:
            raise MergeRefusal(MergeReason.GROUPS, f"{b.pre.name} -> {b.label}: grouped convs in sequence")
        if pm.weight.dtype != m.weight.dtype:
            raise MergeRefusal(MergeReason.UNSUPPORTED, f"{b.pre.name} -> {b.label}: weight dtypes differ")
        w1, b1 = _params(pm, str(b.pre.target), exact)
        w64, b64 = compose_pointwise(w64, b64, w1, b1, pads, f"{b.pre.name} -> {b.label}")
    return ConvRead(w64, b64, m.weight.dtype, strides, dil, pads, group)


def channel_vector(c: torch.Tensor, ref: MergeRef, what: str, python_number: bool = False) -> F64:
    """A constant ``c`` (a scale or a constant leaf of a sum) as a float64 vector over the merged conv's
    output channels, or MergeRefusal where it is not per channel or would change the result's dtype
    (``python_number``: a Python number, which never does)."""
    if not c.is_floating_point():
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what} of dtype {c.dtype}")
    if not python_number and c.dim() > 0 and c.dtype != ref.dtype:
        # a tensor of another dtype promotes the result's dtype: one conv of the model's dtype would not
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what} of dtype {c.dtype}, the merged conv {ref.dtype}")
    full = ref.rank + 2
    if c.dim() > full:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what} of rank {c.dim()} > {full}")
    shape = (1,) * (full - c.dim()) + tuple(c.shape)
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, ref.c_out):
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what} of shape {list(c.shape)} is not per channel")
    return np.broadcast_to(c.detach().cpu().double().numpy().reshape(-1), (ref.c_out,)).copy()


def _factor(gm: fx.GraphModule, n: fx.Node, ref: MergeRef) -> F64:
    k = _mul_slot(gm, n)
    if k is None:  # Identity / Dropout in eval
        return np.ones(ref.c_out)
    c = constant_arg(gm, n.args[k])
    assert c is not None
    return channel_vector(
        c, ref, f"'{n.name}': scale", python_number=not isinstance(n.args[k], (fx.Node, torch.Tensor))
    )


def avg_pool_kernel(
    ref: MergeRef,
    what: str,
    k: tuple[int, ...],
    stride: list[int],
    pad: list[int],
    ceil_mode: bool,
    divisor_override: Any,
    count_include_pad: bool,
) -> tuple[F64, F64]:
    """A torch average pool (an ``nn.AvgPool`` module or an ``aten.avg_pool`` call; ``pad`` per axis, both
    sides) as a kernel of the merged conv and a zero bias, or MergeRefusal why it is not one."""
    if ceil_mode:
        raise MergeRefusal(MergeReason.PADDING, f"{what}: ceil_mode=True (its output size is not a conv's)")
    if divisor_override:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: divisor_override")
    if any(pad) and not count_include_pad:
        raise MergeRefusal(
            MergeReason.PADDING,
            f"{what}: count_include_pad=False with padding: edge windows divide by fewer values than a conv",
        )
    dilated = any(d != 1 for d in ref.dilations)
    return pool_kernel(ref, k, stride, pad + pad, dilated, what), np.zeros(ref.c_out)


def _branch_kernel(
    gm: fx.GraphModule, ref: MergeRef, b: _Branch, eval_semantics: bool, exact: Exact
) -> tuple[F64, F64]:
    what = b.label
    if b.kind in ("conv", "seq"):
        cr = _read_conv(gm, b, exact)
        w64 = embed(ref, cr.w, check_conv(ref, cr, what))
        b64 = np.zeros(ref.c_out) if cr.bias is None else cr.bias
    elif b.kind == "identity":
        w64, b64 = identity_kernel(ref, what), np.zeros(ref.c_out)
    elif b.kind == "bn":
        assert b.base is not None
        m = called_module(gm, b.base)
        if m is not None and type(m) not in _BNS and not _hooks(m):
            return _bn_subclass_kernel(gm, b.base, ref, m, what, eval_semantics)
        if type(m) not in _BNS or _hooks(m):  # type: ignore[arg-type]
            raise MergeRefusal(
                MergeReason.UNSUPPORTED, f"{what}: not a plain BatchNorm module (or it has hooks)"
            )
        assert isinstance(m, _BNS)
        if m.training and not eval_semantics:
            raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: in training mode")
        if m.running_mean is None or m.running_var is None:
            raise MergeRefusal(
                MergeReason.UNSUPPORTED, f"{what}: no running statistics (track_running_stats=False)"
            )
        if m.num_features != ref.c_out:
            raise MergeRefusal(
                MergeReason.GROUPS, f"{what}: {m.num_features} BN channels, the merged conv {ref.c_out}"
            )
        _batched(gm, b.base, ref, checked_ranks(type(m)), what)
        mean = m.running_mean.detach().cpu().double().numpy()
        var = m.running_var.detach().cpu().double().numpy()
        gamma = np.ones(ref.c_out) if m.weight is None else m.weight.detach().cpu().double().numpy()
        beta = np.zeros(ref.c_out) if m.bias is None else m.bias.detach().cpu().double().numpy()
        scale = gamma / np.sqrt(var + float(m.eps))
        w64 = identity_kernel(ref, what, scale)
        b64 = beta - mean * scale
    elif b.kind == "avgpool":
        assert b.base is not None
        m = called_module(gm, b.base)
        if type(m) not in _POOLS or _hooks(m):  # type: ignore[arg-type]
            raise MergeRefusal(
                MergeReason.UNSUPPORTED, f"{what}: not a plain AvgPool module (or it has hooks)"
            )
        assert isinstance(m, _POOLS)
        r = ref.rank
        k = tuple(_tup(m.kernel_size, r))
        stride = _tup(m.stride, r)  # torch sets a stride of None to the kernel size
        pad = _tup(m.padding, r)
        w64, b64 = avg_pool_kernel(
            ref, what, k, stride, pad, m.ceil_mode, getattr(m, "divisor_override", None), m.count_include_pad
        )
    else:  # pragma: no cover
        raise AssertionError(b.kind)
    return scale_branch(ref, w64, b64, (_factor(gm, n, ref) for n in (*b.muls, *b.chain_muls)), b.sign)


def _constant_leaf(gm: fx.GraphModule, ref: MergeRef, leaf: Any, factors: Sequence[fx.Node]) -> F64 | None:
    """A constant ``leaf`` of a sum as a per-channel vector (its chain scales ``factors`` applied), or None
    where it is not a constant."""
    c = constant_arg(gm, leaf)
    if c is None:
        return None
    vec = channel_vector(c, ref, "constant", python_number=not isinstance(leaf, (fx.Node, torch.Tensor)))
    for m in factors:
        vec = vec * _factor(gm, m, ref)
    return vec


def _noop_tail(tail: nn.Module | None) -> bool:
    """The tail of a BN subclass does nothing: absent, ``nn.Identity``, or a graph of ``nn.Identity`` calls
    (timm's ``BatchNormAct2d`` with ``apply_act=False``: ``drop`` and ``act`` are ``nn.Identity``)."""
    if tail is None or type(tail) is nn.Identity:
        return True
    if not isinstance(tail, fx.GraphModule):
        return False
    for n in tail.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if (
            n.op != "call_module"
            or type(called_module(tail, n)) is not nn.Identity
            or _hooks(tail.get_submodule(str(n.target)))
        ):
            return False
    return True


def _batched(gm: fx.GraphModule, bn: fx.Node, ref: MergeRef, ranks: frozenset[int] | None, what: str) -> None:
    """Refuses a BN on the sum's input unless that input is batched (a conv's channel axis is dim 1 only then)."""
    why = unbatched_why(bn.args[0], ref.rank, ranks, gm)
    if why:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: {why}")


def _bn_subclass_kernel(
    gm: fx.GraphModule, bn: fx.Node, ref: MergeRef, m: nn.Module, what: str, eval_semantics: bool
) -> tuple[F64, F64]:
    """A BatchNorm subclass (timm's ``BatchNormAct2d``) on ``x`` alone: merged where bnfold's BN fold reads
    it as a plain BN (its own forward traced) whose output is not post-processed (no tail)."""
    try:
        spec = describe_bn(m)
    except BnfoldError as e:  # a registered BN-like whose stats function fails
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: {e}") from None
    if isinstance(spec, str):
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: {spec}")
    if spec.has_tail and not _noop_tail(spec.make_tail(m)):
        raise MergeRefusal(
            MergeReason.NONLINEAR,
            f"{what}: {type(m).__name__} post-processes its output (e.g. an activation)",
        )
    if m.training and not eval_semantics:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: in training mode")
    if spec.num_features != ref.c_out:
        raise MergeRefusal(
            MergeReason.GROUPS, f"{what}: {spec.num_features} BN channels, the merged conv {ref.c_out}"
        )
    _batched(gm, bn, ref, spec.ranks, what)
    scale, shift = spec.affine64()
    return identity_kernel(ref, what, scale), shift.copy()


def _refused(sum_label: str, x: str, branches: list[_Branch]) -> Merge:
    return merge_record(sum_label, x, "", branches)


def _excluded(sum_label: str, exclude: frozenset[str]) -> bool:
    """``sum_label`` or a sum sharing a branch module with it is excluded (a branch whose BN bisection left
    drops out of the sum's label, the sum stays the one excluded)."""
    if sum_label in exclude:
        return True
    parts = set(sum_label.split("+"))
    return any("+" in e and parts & set(e.split("+")) for e in exclude)


def _module_label(b: _Branch) -> str:
    """The module path that ends a branch (as :func:`_label`), or "" where that is no module call: it stays
    the same whether the branch's own BN was folded or not (bisection leaves some)."""
    for n in (b.base, *(b.muls[-1:]), *(b.blockers[-1:])):
        if n is not None:
            return str(n.target) if n.op == "call_module" else ""
    return ""


def _label(b: _Branch, x: fx.Node) -> str:
    for n in (b.base, *(b.muls[-1:]), *(b.blockers[-1:])):
        if n is not None:
            return str(n.target) if n.op == "call_module" else n.name
    return x.name


def _plan(
    gm: fx.GraphModule,
    x: fx.Node,
    branches: list[_Branch],
    chain: set[fx.Node],
    sum_label: str,
    eval_semantics: bool,
    exclude: frozenset[str],
    exact: Exact,
) -> tuple[MergeRef, F64, F64] | Merge:
    if _excluded(sum_label, exclude):
        for b in branches:
            b.reason, b.detail = MergeReason.VERIFICATION, "left in place: excluded from merging"
        return _refused(sum_label, x.name, branches)
    for b in branches:
        if b.kind == "bn" and b.base is not None and str(b.base.target) in exclude:
            b.reason, b.detail = MergeReason.VERIFICATION, "left in place: excluded from folding"
            continue
        if b.kind == "other":
            ops = ", ".join(f"'{_label(_Branch(None, 'other', n, [], []), x)}'" for n in b.blockers)
            nonlinear = any(
                isinstance(called_module(gm, n), _ACT_MODULES)
                or getattr(n.target, "__name__", str(n.target)) in _ACT_FUNCS
                for n in b.blockers
            )
            r = blocker_refusal(ops, nonlinear, x.name)
            b.reason, b.detail = r.reason, r.detail
            continue
        try:
            _exclusive(b, chain)
        except MergeRefusal as e:
            b.reason, b.detail = e.reason, e.detail
    inside = {n for b in branches for n in _path(b)}
    writers = [u.name for u in x.users if u not in inside and _mutates(gm, u) and u.args and u.args[0] is x]
    if writers:
        refuse_open(
            branches,
            MergeReason.UNSUPPORTED,
            f"'{x.name}' is changed in place by {', '.join(writers)}: the branches may read different values",
        )
        return _refused(sum_label, x.name, branches)
    ref = pick_reference(
        [b for b in branches if b.kind in ("conv", "seq") and b.reason is None],
        lambda b: (b.base, _read_conv(gm, b, exact)),
    )
    if ref is None:
        return _refused(sum_label, x.name, branches)
    w_sum, b_sum = sum_kernels(ref, branches, lambda b: _branch_kernel(gm, ref, b, eval_semantics, exact))
    ok = [b for b in branches if b.reason is None]
    if len(ok) < 2 or not any(b.base is ref.node for b in ok):
        return _refused(sum_label, x.name, branches)
    return ref, w_sum, b_sum


def _post_bn(
    gm: fx.GraphModule, top: fx.Node, ref: MergeRef, eval_semantics: bool
) -> tuple[fx.Node, tuple[F64, F64]] | None:
    """The eval-mode BN module call that alone reads the sum ``top``, with its float64 scale and shift."""
    users = list(top.users)
    if len(users) != 1:
        return None
    u = users[0]
    m = called_module(gm, u)
    if type(m) not in _BNS or _hooks(m) or u.args[:1] != (top,) or len(u.args) != 1 or u.kwargs:  # type: ignore[arg-type]
        return None
    assert isinstance(m, _BNS)
    if (m.training and not eval_semantics) or m.running_mean is None or m.running_var is None:
        return None
    if m.num_features != ref.c_out or unbatched_why(top, ref.rank, checked_ranks(type(m)), gm):
        return None  # the BN stays, with the fold matcher's verdict
    return u, bn_affine(
        None if m.weight is None else _np(m.weight),
        None if m.bias is None else _np(m.bias),
        _np(m.running_mean),
        _np(m.running_var),
        float(m.eps),
    )


def merge_graph_module(
    gm: fx.GraphModule,
    *,
    eval_semantics: bool = False,
    exclude: frozenset[str] = frozenset(),
    exact: Exact | None = None,
) -> FxMergeResult:
    """Merge every sum of branches of one node into one conv module; edit ``gm`` (graph and submodules).

    ``exact``: :func:`exact_folds` of the folds before (the branches' float64 values, rounded once at the
    end). An eval-mode BN module that alone reads a merged sum is folded into the merged conv too."""
    res = FxMergeResult()
    graph = gm.graph
    done: set[fx.Node] = set()
    tops = [n for n in graph.nodes if _is_sum(n) and _is_top(gm, n)]
    for top in tops:
        if top in done:
            continue
        chain_nodes, leaves, coefs = _chain(gm, top)
        if any(c in done for c in chain_nodes):
            continue
        picked = _pick_input(gm, leaves, coefs)
        if picked is None:
            continue
        x, branches, rest = picked
        chain = set(chain_nodes)
        for b in branches:
            b.label = _label(b, x)
        # the label names the conv modules the sum adds (stable when the model is traced again; a node
        # name is not): culprit bisection excludes a merge by it
        sum_label = "+".join(m for m in (_module_label(b) for b in branches) if m) or top.name
        rec = _plan(gm, x, branches, chain, sum_label, eval_semantics, exclude, exact or {})
        if isinstance(rec, Merge):
            res.merges.append(rec)
            continue
        touched = chain | {n for br in branches if br.reason is None for n in _path(br)}
        if touched & done:
            continue
        ref, w_sum, b_sum = rec
        b_sum, kept, odd_leaves = absorb_constants(
            b_sum,
            [
                *((leaf, sign, factors) for leaf, (sign, factors) in rest),
                *((br.leaf, br.sign, br.chain_muls) for br in branches if br.reason is not None),
            ],
            partial(_constant_leaf, gm, ref),
        )
        odd = [leaf.name if isinstance(leaf, fx.Node) else repr(leaf) for leaf in odd_leaves]
        if odd:
            refuse_odd(branches, odd, x.name)
            res.merges.append(_refused(sum_label, x.name, branches))
            continue
        post = None if kept else _post_bn(gm, top, ref, eval_semantics)
        if post is not None and str(post[0].target) in exclude:
            post = None
        if post is not None:
            scale, shift = post[1]
            w_sum = w_sum * scale.reshape((-1,) + (1,) * (ref.rank + 1))
            b_sum = b_sum * scale + shift
        ref_mod = called_module(gm, ref.node)
        assert isinstance(ref_mod, _CONVS)
        dtype = ref_mod.weight.dtype
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else None
        if np_dtype is None:
            refuse_open(branches, MergeReason.UNSUPPORTED, "bfloat16 weights")
            res.merges.append(_refused(sum_label, x.name, branches))
            continue
        wc, bc = cast_exact(w_sum, np_dtype), cast_exact(b_sum, np_dtype)
        if not (np.all(np.isfinite(wc)) and np.all(np.isfinite(bc))):
            refuse_open(branches, MergeReason.OVERFLOW, f"the merged weight or bias is not finite in {dtype}")
            res.merges.append(_refused(sum_label, x.name, branches))
            continue
        conv_cls: Any = type(ref_mod)
        # the reference conv's own padding: symmetric pads, or its padding="same" (the pads it was read as)
        padding: Any = (
            tuple(ref.pads[: ref.rank]) if ref.pads[: ref.rank] == ref.pads[ref.rank :] else ref_mod.padding
        )
        assert padding == "same" or isinstance(padding, tuple)
        new = conv_cls(
            ref.c_in_g * ref.group,
            ref.c_out,
            ref.kernel,
            ref_mod.stride,
            padding,
            ref_mod.dilation,
            ref_mod.groups,
            bias=True,
            padding_mode="zeros",
            device=ref_mod.weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            new.weight.copy_(torch.from_numpy(np.ascontiguousarray(wc)))
            assert new.bias is not None
            new.bias.copy_(torch.from_numpy(np.ascontiguousarray(bc)))
        new.weight.requires_grad_(ref_mod.weight.requires_grad)
        new.bias.requires_grad_(ref_mod.weight.requires_grad)
        new.train(ref_mod.training)
        name = fresh_attr(gm, str(ref.node.target).replace(".", "_") + "_merged", sep="")
        gm.add_submodule(name, new)
        with graph.inserting_before(top):
            cur = graph.call_module(name, (x,))
            for leaf in kept:
                cur = graph.call_function(operator.add, (cur, leaf))
        top.replace_all_uses_with(cur)
        merged = [br for br in branches if br.reason is None]
        erase = list(chain) + [n for br in merged for n in _path(br)]
        if post is not None:
            post[0].replace_all_uses_with(cur)
            erase.append(post[0])
            res.absorbed[str(post[0].target)] = Site(
                str(post[0].target),
                name,
                type(new).__name__,
                Direction.FORWARD,
                f"BN on the sum '{sum_label}' folded into its merged conv",
                "conv-bn",  # the merged conv is a conv: the same pattern as ONNX's next pass
            )
        for br in merged:
            if br.kind == "bn" and br.base is not None:
                res.absorbed[str(br.base.target)] = Site(
                    str(br.base.target),
                    name,
                    type(new).__name__,
                    Direction.FORWARD,
                    f"identity BN branch merged into one conv with the other branches of '{sum_label}'",
                    "branch-merge",
                )
        for n in sorted(set(erase), key=_order(graph), reverse=True):
            if not n.users:
                graph.erase_node(n)
        done |= touched
        res.applied += 1
        res.merges.append(merge_record(sum_label, x.name, name, branches))
    if res.applied:
        graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return res


def _order(graph: fx.Graph) -> Any:
    pos = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: pos[n]
