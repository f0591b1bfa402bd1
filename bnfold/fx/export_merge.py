"""Merge parallel branches of one tensor into one convolution in a ``torch.export`` graph (aten level).

The ``torch.export`` counterpart of :mod:`bnfold.fx.merge` (read :mod:`bnfold.onnx.merge` for the rules).
It runs on the unlifted graph (``ep.module()``) *before* the BN folds, so every kernel is computed from
the original parameters: a sum (``aten.add.Tensor`` / ``aten.sub.Tensor`` without ``alpha``, nested, a
constant scale of an inner sum) of branches that all read the same node ``x``, each branch one of

* ``conv1d/2d/3d`` (or ``convolution`` not transposed) on ``x``, optionally followed by an eval-mode
  batch norm (``batch_norm(training=False)`` or ``_native_batch_norm_legit_no_training`` item 0), with
  the merged conv's stride, dilation and groups, its kernel centred in the largest one;
* ``Conv kxk(Conv 1x1(x))`` (ungrouped; the kxk unpadded or the 1x1 without bias), its BN as above;
* ``x`` itself (identity), an eval-mode batch norm on ``x`` alone;
* ``avg_pool1d/2d/3d`` that counts padded zeros (or has none), no ``ceil_mode``, no ``divisor_override``;
* any of these times a per-tensor or per-channel constant (a model attribute or a Python number);

becomes one ``aten.conv*d`` with new attributes ``_bnfold_m<k>_weight`` / ``_bnfold_m<k>_bias``. Constant
leaves of the sum go into the bias; an eval-mode batch norm that alone reads the sum is folded in too.
All of it is summed in float64 and rounded once to the weight dtype (also float16). Every branch not
merged gets a :class:`~bnfold.records.MergeReason`; forms not listed are refused with the reason. The caller folds the BNs that are left, then exports again.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.dtypes import numpy_dtype
from bnfold.fold_math import cast_exact
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
    pick_reference,
    refuse_odd,
    refuse_open,
    scale_branch,
    sum_kernels,
)
from bnfold.records import Direction, Merge, MergeReason, Site

from .export_match import bn_path, schema_args
from .export_rewrite import drop_unread_attrs
from .layers import constant_arg, constant_slot
from .merge import NONLINEAR_NAMES, avg_pool_kernel, channel_vector

__all__ = ["ExportMergeResult", "merge_exported_graph", "conv_ops"]

aten = torch.ops.aten

_CONV_OPS = (
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv1d.padding,
    aten.conv2d.padding,
    aten.conv3d.padding,
    aten.convolution.default,
)
_ALL_CONVS = (
    *_CONV_OPS,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
)
_NEW_CONV = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_POOL_OPS = (aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
_BN_OPS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
_SUMS = (aten.add.Tensor, aten.sub.Tensor)
_MULS = (aten.mul.Tensor, aten.mul.Scalar)
_NONLINEAR = (*NONLINEAR_NAMES, "max_pool", "prelu", "glu")  # prefixes of aten op names
_MAX_WALK = 4


def conv_ops(gm: fx.GraphModule) -> int:
    """Convolution ops in the graph."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in _ALL_CONVS)


@dataclass(slots=True)
class ExportMergeResult:
    merges: list[Merge] = field(default_factory=list)
    absorbed: list[Site] = field(default_factory=list)
    """A :class:`~bnfold.records.Site` per batch norm a merge took in (its own verdict in the report)."""
    applied: int = 0


@dataclass(slots=True)
class _Branch:
    leaf: Any
    sign: int
    factors: tuple[fx.Node, ...]  # the chain's scales of inner sums
    kind: str = "other"  # conv | identity | bn | avgpool | other
    muls: list[fx.Node] = field(default_factory=list)
    base: fx.Node | None = None  # the conv / bn / pool op
    post: fx.Node | None = None  # the BN op after a conv
    pre: fx.Node | None = None  # the 1x1 conv before the conv of a ``seq`` branch
    value: Any = None  # the leaf without its scales
    path: list[fx.Node] = field(default_factory=list)  # nodes the merge removes (each read once)
    src: Any = None  # the node the base reads
    blockers: list[fx.Node] = field(default_factory=list)
    label: str = ""
    reason: MergeReason | None = None
    detail: str = ""


def _is_sum(n: Any) -> bool:
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in _SUMS and len(n.args) == 2):
        return False
    alpha = n.kwargs.get("alpha", 1)
    return bool(alpha == 1) and set(n.kwargs) <= {"alpha"}


def _mul_slot(gm: fx.GraphModule, n: Any) -> int | None:
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in _MULS and len(n.args) == 2):
        return None
    if n.kwargs:
        return None
    return constant_slot(gm, n)


def _expandable(gm: fx.GraphModule, n: Any) -> bool:
    if not isinstance(n, fx.Node) or len(n.users) != 1:
        return False
    if _is_sum(n):
        return True
    k = _mul_slot(gm, n)
    if k is None:
        return False
    inner = n.args[1 - k]
    return isinstance(inner, fx.Node) and _is_sum(inner) and len(inner.users) == 1


def _chain(gm: fx.GraphModule, top: fx.Node) -> tuple[list[fx.Node], list[_Branch]]:
    nodes: list[fx.Node] = []
    leaves: list[_Branch] = []

    def walk(n: fx.Node, sign: int, factors: tuple[fx.Node, ...], depth: int) -> None:
        nodes.append(n)
        k = None if _is_sum(n) else _mul_slot(gm, n)
        if k is not None:
            walk(n.args[1 - k], sign, (*factors, n), depth + 1)  # type: ignore[arg-type]
            return
        for slot, arg in enumerate(n.args):
            s = -sign if n.target is aten.sub.Tensor and slot == 1 else sign
            if depth < 256 and isinstance(arg, fx.Node) and _expandable(gm, arg):
                walk(arg, s, factors, depth + 1)
            else:
                leaves.append(_Branch(arg, s, factors))

    walk(top, 1, (), 0)
    return nodes, leaves


def _is_top(gm: fx.GraphModule, n: fx.Node) -> bool:
    users = list(n.users)
    if len(users) != 1:
        return True
    u = users[0]
    if _is_sum(u):
        return False
    k = _mul_slot(gm, u)
    return not (k is not None and len(u.users) == 1 and _is_sum(next(iter(u.users))))


def _bn_of(v: Any) -> fx.Node | None:
    """The eval-mode batch-norm op whose normalised output ``v`` is, else None."""
    if not isinstance(v, fx.Node) or v.op != "call_function":
        return None
    if v.target is aten.batch_norm.default:
        return v
    if v.target is operator.getitem and v.args[1] == 0:
        bn = v.args[0]
        if (
            isinstance(bn, fx.Node)
            and bn.target is aten._native_batch_norm_legit_no_training.default
            and len(bn.users) == 1
        ):
            return bn
    return None


def _with_pre(b: _Branch) -> None:
    """A conv branch whose conv reads another conv read by nothing else: ``Conv kxk(Conv 1x1(x))``."""
    inner = b.src
    if (
        isinstance(inner, fx.Node)
        and inner.op == "call_function"
        and inner.target in _CONV_OPS
        and len(inner.users) == 1
    ):
        b.kind, b.pre, b.src = "seq", inner, inner.args[0]
        b.path.append(inner)


def _decompose(gm: fx.GraphModule, b: _Branch) -> None:
    v = b.leaf
    while isinstance(v, fx.Node) and _mul_slot(gm, v) is not None:
        b.muls.append(v)
        v = v.args[1 - _mul_slot(gm, v)]  # type: ignore[operator]
    b.path = list(b.muls)
    b.value = v
    bn = _bn_of(v)
    if bn is not None:
        inp = bn.args[0]
        b.path += [v] if v is bn else [v, bn]
        if isinstance(inp, fx.Node) and inp.op == "call_function" and inp.target in _CONV_OPS:
            b.kind, b.base, b.post, b.src = "conv", inp, bn, inp.args[0]
            b.path.append(inp)
            _with_pre(b)
        else:
            b.kind, b.base, b.src = "bn", bn, inp
        return
    if isinstance(v, fx.Node) and v.op == "call_function" and v.target in _CONV_OPS:
        b.kind, b.base, b.src = "conv", v, v.args[0]
        b.path.append(v)
        _with_pre(b)
    elif isinstance(v, fx.Node) and v.op == "call_function" and v.target in _POOL_OPS:
        b.kind, b.base, b.src = "avgpool", v, v.args[0]
        b.path.append(v)
    else:
        b.kind, b.src = "value", v


def _reaches(v: Any, x: fx.Node) -> list[fx.Node] | None:
    """The nodes between ``x`` and ``v`` along first tensor arguments (at most a few), or None."""
    out: list[fx.Node] = []
    for _ in range(_MAX_WALK):
        if not isinstance(v, fx.Node) or v.op != "call_function":
            return None
        out.append(v)
        nxt = next((a for a in v.args if isinstance(a, fx.Node)), None)
        if nxt is x:
            return out
        v = nxt
    return None


def _name(n: fx.Node) -> str:
    return str(n.name)


def _label(b: _Branch, x: fx.Node) -> str:
    if b.kind in ("conv", "seq", "avgpool") and b.base is not None:
        w = b.base.args[1] if b.kind != "avgpool" else None
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return str(w.target).rpartition(".")[0] or b.base.name
        return b.base.name
    if b.kind == "bn" and b.base is not None:
        return bn_path(b.base, schema_args(b.base))
    for n in b.blockers[-1:]:
        w = n.args[1] if n.target in _CONV_OPS and len(n.args) > 1 else None
        if isinstance(w, fx.Node) and w.op == "get_attr":
            return str(w.target).rpartition(".")[0] or n.name
        return _name(n)
    for n in b.muls[-1:]:
        return _name(n)
    return x.name


def _bn_affine(gm: fx.GraphModule, bn: fx.Node, what: str) -> tuple[F64, F64]:
    a = schema_args(bn)
    if a.get("training", False) is not False:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: the batch norm uses batch statistics")
    vals: dict[str, F64 | None] = {}
    for k in ("weight", "bias", "running_mean", "running_var"):
        p = a.get(k)
        if p is None and k in ("weight", "bias"):
            vals[k] = None
            continue
        c = constant_arg(gm, p) if isinstance(p, fx.Node) else None
        if c is None:
            raise MergeRefusal(MergeReason.NON_CONSTANT, f"{what}: batch norm {k} is not a model attribute")
        vals[k] = c.detach().cpu().double().numpy().reshape(-1)
    mean, var = vals["running_mean"], vals["running_var"]
    assert mean is not None and var is not None
    gamma = np.ones_like(mean) if vals["weight"] is None else vals["weight"]
    beta = np.zeros_like(mean) if vals["bias"] is None else vals["bias"]
    scale = gamma / np.sqrt(var + float(a["eps"]))
    return scale, beta - mean * scale


def _read_conv(gm: fx.GraphModule, n: fx.Node, what: str) -> ConvRead:
    a = schema_args(n)
    if n.target is aten.convolution.default and (
        a.get("transposed") or any(int(p) for p in a.get("output_padding") or [])
    ):
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: a transposed convolution")
    wt = constant_arg(gm, a["weight"]) if isinstance(a["weight"], fx.Node) else None
    bt = None if a.get("bias") is None else constant_arg(gm, a["bias"])
    if wt is None or (a.get("bias") is not None and bt is None):
        raise MergeRefusal(MergeReason.NON_CONSTANT, f"{what}: weight or bias is not a model attribute")
    if not wt.is_floating_point() or wt.dtype == torch.bfloat16:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: weight dtype {wt.dtype}")
    r = wt.dim() - 2

    def tup(v: Any) -> list[int]:
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return [int(e) for e in (v * r if len(v) == 1 else v)]

    dil = tup(a["dilation"])
    pad = a["padding"]
    if isinstance(pad, str):
        if pad == "same":
            total = [d * (int(k) - 1) for d, k in zip(dil, wt.shape[2:])]
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        elif pad == "valid":
            pads = [0] * (2 * r)
        else:
            raise MergeRefusal(MergeReason.PADDING, f"{what}: padding={pad!r}")
    else:
        p = tup(pad)
        pads = p + p
    return ConvRead(
        wt.cpu().double().numpy(),
        None if bt is None else bt.cpu().double().numpy(),
        wt.dtype,
        tup(a["stride"]),
        dil,
        pads,
        int(a["groups"]),
    )


def _branch_conv(gm: fx.GraphModule, b: _Branch) -> ConvRead:
    """A conv branch's conv (before its BN); for ``seq`` the product of the 1x1 and the kxk (exact only when
    the kxk reads no padded zeros or the 1x1 has no bias)."""
    assert b.base is not None
    cr = _read_conv(gm, b.base, b.label)
    if b.pre is None:
        return cr
    what = f"{b.pre.name} -> {b.label}"
    p = _read_conv(gm, b.pre, what)
    if (
        any(s != 1 for s in p.strides)
        or any(p.pads)
        or p.w.ndim != cr.w.ndim
        or any(k != 1 for k in p.w.shape[2:])
    ):
        raise MergeRefusal(
            MergeReason.UNSUPPORTED, f"{what}: the first conv is not a 1x1, stride 1, unpadded"
        )
    if p.group != 1 or cr.group != 1 or p.w.shape[0] != cr.w.shape[1]:
        raise MergeRefusal(MergeReason.GROUPS, f"{what}: grouped convs in sequence")
    if p.dtype != cr.dtype:
        raise MergeRefusal(MergeReason.UNSUPPORTED, f"{what}: weight dtypes differ")
    w, bias = compose_pointwise(cr.w, cr.bias, p.w, p.bias, cr.pads, what)
    return ConvRead(w, bias, cr.dtype, cr.strides, cr.dilations, cr.pads, cr.group)


def _factor(gm: fx.GraphModule, n: fx.Node, ref: MergeRef) -> F64:
    k = _mul_slot(gm, n)
    assert k is not None
    c = constant_arg(gm, n.args[k])
    assert c is not None
    return channel_vector(c, ref, f"'{n.name}': scale", not isinstance(n.args[k], fx.Node))


def _branch_kernel(gm: fx.GraphModule, ref: MergeRef, b: _Branch) -> tuple[F64, F64]:
    what = b.label
    col = (-1,) + (1,) * (ref.rank + 1)
    if b.kind in ("conv", "seq"):
        assert b.base is not None
        cr = _branch_conv(gm, b)
        w64 = embed(ref, cr.w, check_conv(ref, cr, what, any_one_tap_dilation=False))
        b64 = np.zeros(ref.c_out) if cr.bias is None else cr.bias.copy()
        if b.post is not None:
            scale, shift = _bn_affine(gm, b.post, what)
            if scale.shape[0] != ref.c_out:
                raise MergeRefusal(
                    MergeReason.GROUPS, f"{what}: {scale.shape[0]} BN channels, the conv {ref.c_out}"
                )
            w64 = w64 * scale.reshape(col)
            b64 = b64 * scale + shift
    elif b.kind == "identity":
        w64, b64 = identity_kernel(ref, what), np.zeros(ref.c_out)
    elif b.kind == "bn":
        assert b.base is not None
        if not _batched(b.base.args[0], ref.rank):
            raise MergeRefusal(
                MergeReason.UNSUPPORTED,
                f"{what}: the input is unbatched (C, ...): the convs' channels are dim 0, the batch norm's dim 1",
            )
        scale, shift = _bn_affine(gm, b.base, what)
        if scale.shape[0] != ref.c_out:
            raise MergeRefusal(
                MergeReason.GROUPS, f"{what}: {scale.shape[0]} BN channels, the merged conv {ref.c_out}"
            )
        w64 = identity_kernel(ref, what, scale)
        b64 = shift
    elif b.kind == "avgpool":
        assert b.base is not None
        a = schema_args(b.base)
        r = ref.rank

        def tup(v: Any, default: list[int]) -> list[int]:
            v = list(v) if isinstance(v, (list, tuple)) else [v]
            if not v:
                return default
            return [int(e) for e in (v * r if len(v) == 1 else v)]

        k = tuple(tup(a["kernel_size"], []))
        stride = tup(a.get("stride") or [], list(k))
        pad = tup(a.get("padding") or [0], [0] * r)
        w64, b64 = avg_pool_kernel(
            ref,
            what,
            k,
            stride,
            pad,
            bool(a.get("ceil_mode")),
            a.get("divisor_override"),
            bool(a.get("count_include_pad", True)),
        )
    else:  # pragma: no cover
        raise AssertionError(b.kind)
    return scale_branch(ref, w64, b64, (_factor(gm, n, ref) for n in (*b.muls, *b.factors)), b.sign)


def _record(top: fx.Node, x: str, target: str, branches: list[_Branch]) -> Merge:
    return merge_record(top.name, x, target, branches)


def _nonlinear(n: fx.Node) -> bool:
    name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
    return any(name.startswith(a) for a in _NONLINEAR)


def _batched(n: Any, rank: int) -> bool:
    """True when ``n``'s recorded value is a batched ``(N, C, ...)`` input of a conv with ``rank`` spatial axes
    (a conv also runs on an unbatched ``(C, ...)``, where its channels are not the batch norm's dim 1)."""
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == rank + 2


def _post_bn(gm: fx.GraphModule, top: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(bn op, output node)`` of an eval-mode batch norm that alone reads ``top``, else None."""
    users = list(top.users)
    if len(users) != 1:
        return None
    u = users[0]
    if u.target is aten.batch_norm.default and u.args[0] is top:
        return u, u
    if u.target is aten._native_batch_norm_legit_no_training.default and u.args[0] is top:
        outs = list(u.users)
        if len(outs) == 1 and outs[0].target is operator.getitem and outs[0].args[1] == 0:
            return u, outs[0]
    return None


def _fresh(gm: fx.GraphModule, k: int) -> str:
    while hasattr(gm, f"_bnfold_m{k}_weight"):
        k += 1
    return f"_bnfold_m{k}"


def merge_exported_graph(gm: fx.GraphModule, *, exclude: frozenset[str] = frozenset()) -> ExportMergeResult:
    """Merge every sum of branches of one node into one convolution; edit ``gm`` (graph and attributes).

    Args:
        gm: an unlifted exported graph (``ep.module()``), edited in place.
        exclude: sum labels (node names, as in ``Merge.sum``) to leave with reason ``VERIFICATION``.

    Returns:
        The merges done and refused, the batch norms taken in (one ``Site`` each).
    """
    res = ExportMergeResult()
    graph = gm.graph
    done: set[fx.Node] = set()
    seen: Counter[str] = Counter()
    tops = [n for n in graph.nodes if _is_sum(n) and _is_top(gm, n)]
    for top in tops:
        if top in done:
            continue
        chain_nodes, leaves = _chain(gm, top)
        chain = set(chain_nodes)
        for b in leaves:
            _decompose(gm, b)
        srcs = Counter(b.src for b in leaves if b.kind in ("conv", "seq") and isinstance(b.src, fx.Node))
        if not srcs:
            continue
        x: fx.Node = srcs.most_common(1)[0][0]
        branches: list[_Branch] = []
        rest: list[_Branch] = []
        for b in leaves:
            if b.value is x:  # x itself (also where x is a BN or conv output)
                b.kind, b.path, b.base, b.post, b.pre = "identity", list(b.muls), None, None, None
                branches.append(b)
            elif b.kind in ("conv", "seq", "bn", "avgpool") and b.src is x:
                branches.append(b)
            else:
                blk = _reaches(b.leaf, x)
                if blk is not None:
                    b.kind, b.blockers, b.muls = "other", blk, []
                    branches.append(b)
                else:
                    rest.append(b)
        for b in branches:
            b.label = _label(b, x)
        if len(branches) < 2:
            continue
        label = top.name
        if label in exclude:
            for b in branches:
                b.reason, b.detail = MergeReason.VERIFICATION, "left in place: excluded from merging"
            res.merges.append(_record(top, x.name, "", branches))
            continue
        for b in branches:
            if b.kind == "other":
                ops = ", ".join(f"'{n.name}'" for n in b.blockers)
                why = blocker_refusal(ops, any(_nonlinear(n) for n in b.blockers), x.name)
                b.reason, b.detail = why.reason, why.detail
                continue
            for n in b.path:
                if len(n.users) != 1:
                    b.reason, b.detail = (
                        MergeReason.OTHER_CONSUMERS,
                        f"'{n.name}' inside the branch is also read elsewhere",
                    )
                    break
        ref = pick_reference(
            [b for b in branches if b.kind in ("conv", "seq") and b.reason is None],
            lambda b: (b.base, _branch_conv(gm, b)),
        )
        if ref is None:
            res.merges.append(_record(top, x.name, "", branches))
            continue
        w_sum, b_sum = sum_kernels(ref, branches, partial(_branch_kernel, gm, ref))
        ok = [b for b in branches if b.reason is None]
        if len(ok) < 2 or not any(b.base is ref.node for b in ok):
            res.merges.append(_record(top, x.name, "", branches))
            continue
        b_sum, kept_b, odd_b = absorb_constants(
            b_sum,
            [(b, b.sign, b.factors) for b in [*rest, *(b for b in branches if b.reason is not None)]],
            partial(_constant_leaf, gm, ref),
        )
        kept: list[Any] = [b.leaf for b in kept_b]
        odd = [b.leaf.name if isinstance(b.leaf, fx.Node) else repr(b.leaf) for b in odd_b]
        if odd:
            refuse_odd(ok, odd, x.name)
            res.merges.append(_record(top, x.name, "", branches))
            continue
        end = top
        post = None if kept or not _batched(top, ref.rank) else _post_bn(gm, top)
        absorbed_post: fx.Node | None = None
        if post is not None:
            try:
                scale, shift = _bn_affine(gm, post[0], bn_path(post[0], schema_args(post[0])))
                if scale.shape[0] == ref.c_out:
                    w_sum = w_sum * scale.reshape((-1,) + (1,) * (ref.rank + 1))
                    b_sum = b_sum * scale + shift
                    end, absorbed_post = post[1], post[0]
            except MergeRefusal:
                pass
        np_dtype = numpy_dtype(ref.dtype)
        wc, bc = cast_exact(w_sum, np_dtype), cast_exact(b_sum, np_dtype)
        if not (np.all(np.isfinite(wc)) and np.all(np.isfinite(bc))):
            refuse_open(ok, MergeReason.OVERFLOW, f"the merged weight or bias is not finite in {ref.dtype}")
            res.merges.append(_record(top, x.name, "", branches))
            continue
        # rewrite
        ref_w = schema_args(ref.node)["weight"]
        dev = constant_arg(gm, ref_w).device  # type: ignore[union-attr]
        name = _fresh(gm, res.applied)
        gm.register_parameter(
            f"{name}_weight",
            nn.Parameter(torch.from_numpy(np.ascontiguousarray(wc)).to(dev), requires_grad=False),
        )
        gm.register_parameter(
            f"{name}_bias",
            nn.Parameter(torch.from_numpy(np.ascontiguousarray(bc)).to(dev), requires_grad=False),
        )
        r = ref.rank
        with graph.inserting_before(end):
            wn = graph.get_attr(f"{name}_weight")
            bn_ = graph.get_attr(f"{name}_bias")
            if ref.pads[:r] == ref.pads[r:]:
                cur = graph.call_function(
                    _NEW_CONV[r],
                    (x, wn, bn_, list(ref.strides), list(ref.pads[:r]), list(ref.dilations), ref.group),
                )
            else:  # padding="same" with an even kernel: torch's own asymmetric padding
                cur = graph.call_function(
                    getattr(aten, f"conv{r}d").padding,
                    (x, wn, bn_, list(ref.strides), "same", list(ref.dilations), ref.group),
                )
            cur.meta = {
                k: v
                for k, v in ref.node.meta.items()
                if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")
            }
            for leaf in kept:
                cur = graph.call_function(aten.add.Tensor, (cur, leaf))
                cur.meta = {k: v for k, v in top.meta.items() if k in ("val", "tensor_meta")}
        end.replace_all_uses_with(cur)
        erase: list[fx.Node] = [*chain, *(n for b in ok for n in b.path)]
        if absorbed_post is not None:
            erase += [post[0], post[1]] if post is not None else []
        for n in sorted(set(erase), key=_order(graph), reverse=True):
            if not n.users:
                graph.erase_node(n)
        done |= chain
        for b in ok:
            for bn_node in (b.post, b.base if b.kind == "bn" else None):
                if bn_node is None:
                    continue
                path = bn_path(bn_node, schema_args(bn_node))
                seen[path] += 1
                res.absorbed.append(
                    Site(
                        path,
                        name,
                        "Conv",
                        Direction.FORWARD,
                        f"merged with the other branches of '{top.name}'",
                        "branch-merge",
                    )
                )
        if absorbed_post is not None:
            res.absorbed.append(
                Site(
                    bn_path(absorbed_post, schema_args(absorbed_post)),
                    name,
                    "Conv",
                    Direction.FORWARD,
                    f"batch norm on the sum '{top.name}' folded into its merged conv",
                    "conv-bn",  # the merged conv is a conv: the same pattern as ONNX's next pass
                )
            )
        res.applied += 1
        res.merges.append(_record(top, x.name, name, branches))
    if res.applied:
        drop_unread_attrs(gm, aliases=True)
    return res


def _constant_leaf(gm: fx.GraphModule, ref: MergeRef, b: _Branch, factors: Sequence[fx.Node]) -> F64 | None:
    """A constant leaf ``b`` of a sum as a per-channel vector (its chain scales ``factors`` applied), or
    None where it is not a constant."""
    c = constant_arg(gm, b.leaf) if not b.muls else None
    if c is None:
        return None
    vec = channel_vector(c, ref, "constant", not isinstance(b.leaf, fx.Node))
    for m in factors:
        vec = vec * _factor(gm, m, ref)
    return vec


def _order(graph: fx.Graph) -> Any:
    pos = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: pos[n]
