"""One verdict per batch-norm op in an unlifted ``torch.export`` graph: an :class:`ExportCandidate` or a ``Skip``.

The matcher stage of the ``torch.export`` backend (driver: :mod:`bnfold.fx.export`); it reads the
graph and never edits it. Op arguments are read by name through the op's schema (as
``torch/ao/quantization/pt2e/utils.py`` does), never by position; tensor ranks and sizes come from
the ``val`` every exported node records. Items 1 and 2 (what a layer and a BN are) are cited as
"Case n"; the folds are the patterns of :data:`bnfold.patterns.CATALOGUE`, cited by id, as in the fx
and ONNX matchers:

1. Layers: ``aten.conv1d/2d/3d`` (also the ``.padding`` overloads), ``aten.conv_transpose1d/2d/3d``,
   ``aten.convolution`` (its ``transposed`` argument), ``aten.linear``, and a decomposed linear
   ``addmm(bias, x, permute(weight, [1, 0]))`` / ``mm(x, permute(weight, [1, 0]))`` (or ``t(weight)``),
   or ``bmm(x, view(expand(permute(weight, [1, 0]))))`` (a linear on a non-contiguous 3-D input),
   whose weight and bias (if any) are model attributes (``NON_CONSTANT`` otherwise; a non-float
   weight is ``UNSUPPORTED_DTYPE``). A convolution counts only on a batched input (its output has
   the weight's rank, channels at dim 1).
2. BN: ``aten.batch_norm`` with ``training=False`` (pre-dispatch graphs) or
   ``aten._native_batch_norm_legit_no_training`` whose only used output is item 0 (decomposed graphs),
   with statistics and affine parameters that are model attributes. Training-mode BN ops, or used
   mean/var outputs: ``TRAINING_MODE``.
``conv-bn``, ``gemm-bn``, ``linear-norm``:
   Forward fold (layer -> BN): the BN input is the layer's output, through eval no-ops (dropout with
   ``train=False``, clone, contiguous, alias) and reshapes that keep each element's channel: for a
   convolution, a view/reshape/flatten that keeps dims 0 and 1; for a linear (channels on the last
   dim), one that keeps the last dim. Every node on the way has that one user, and the layer's
   output is read by nothing else (reads of its shape only, as ``reshape_as(y, x)``, do not count;
   ``OTHER_CONSUMERS`` otherwise).
``gemm-bn``, ``bn-gemm``, ``linear-norm``:
   Linear meets BN (channels on dim 1) only where the tensor the BN reads is 2-D ``(N, C)``: directly,
   or after a reshape to ``(tokens, C)`` -- LeViT's LinearNorm, ``linear(x) -> flatten(0, 1) ->
   batch_norm -> reshape_as(x)`` (``LAYOUT`` otherwise).
``concat-split``, ``branch-sum``:
   Channel routes: a BN on ``cat([...], dim=1)`` of convolution outputs is split per slice, each
   slice folded into its producer; a BN on a sum (``add`` without ``alpha``, nested) of convolution
   outputs of the sum's own shape scales every branch and puts the shift into the first branch's
   bias. Every branch's output is read by nothing else; a linear branch (channels last) or any other
   input leaves the BN.
``bn-conv``, ``bn-gemm``, ``bn-flatten-gemm``:
   Backward fold (BN -> layer), when nothing before the BN folds: through eval no-ops, copying pads
   (``pad`` with mode reflect/replicate/circular: each padded value is a BN output) and at most one
   flatten to ``(N, C * k)``, the BN output has one user, a convolution or linear reading it as its
   input. Exact only when the layer reads no zero padding, its own or a pad op's before it
   (``PADDING`` otherwise); a transposed
   convolution cannot absorb an input shift (``UNSUPPORTED_LAYER``); a linear needs a 2-D input
   (``bn-gemm``), after a flatten each channel covers ``in_features / C`` consecutive features.

Names: a BN is reported by the module path the program records for it (``nn_module_stack``, else
the owner of its running mean), ``path#2`` for a second call of the same module; a layer by the
owner of its weight. Graph node names only where the program records neither.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import fx

from bnfold.fold_math import WeightLayout
from bnfold.records import Direction, Site, Skip, SkipReason

from .layers import fetch_attr

__all__ = [
    "ExportCandidate",
    "ExportMatched",
    "ExportPart",
    "find_export_sites",
    "schema_args",
    "layer_weight",
    "weight_path",
]

aten = torch.ops.aten

# layer op -> layer kind; the layout comes from the ``groups`` / ``transposed`` arguments (Case 1)
_CONV: dict[Any, str] = {
    aten.conv1d.default: "Conv1d",
    aten.conv2d.default: "Conv2d",
    aten.conv3d.default: "Conv3d",
    aten.conv1d.padding: "Conv1d",
    aten.conv2d.padding: "Conv2d",
    aten.conv3d.padding: "Conv3d",
    aten.conv_transpose1d.default: "ConvTranspose1d",
    aten.conv_transpose2d.input: "ConvTranspose2d",
    aten.conv_transpose3d.input: "ConvTranspose3d",
    aten.convolution.default: "Convolution",
    aten.linear.default: "Linear",
}
_BN = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
_BN_TRAIN = (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default)
# eval-mode identities (forward and backward patterns); dropout only with train=False (checked below)
_NOOPS = (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default)
_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)
# ops that read only the shape of an argument (at that position)
_SHAPE_READS: dict[Any, tuple[int, ...]] = {
    aten.sym_size.int: (0,),
    aten.sym_numel.default: (0,),
    aten.sym_stride.int: (0,),
    aten.reshape_as.default: (1,),
    aten.view_as.default: (1,),
    aten.expand_as.default: (1,),
}
_COPY_PADS = ("reflect", "replicate", "circular")


@dataclass(frozen=True, slots=True)
class ExportPart:
    """One layer a BN folds into, and which BN channels it takes.

    Attributes:
        producer: the conv/linear node, or the ``addmm``/``mm`` of a decomposed linear.
        weight, bias: the layer's ``get_attr`` nodes (``bias`` None: the fold creates one).
        layout: the weight's channel axes.
        lo, hi: the BN channels ``[lo, hi)`` this layer's channels stand for.
        with_shift: the BN's shift goes into this layer's bias (one branch of a sum takes it).
    """

    producer: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    layout: WeightLayout
    lo: int
    hi: int
    with_shift: bool = True


@dataclass(slots=True)
class ExportCandidate:
    """A BN op that folds into the layer(s) next to it (Cases 1-2 and its pattern hold).

    Attributes:
        site: the verdict as the report lists it (its direction says forward or backward).
        bn: the batch-norm node.
        bn_args: the BN's arguments by schema name (``weight``, ``bias``, ``running_mean``,
            ``running_var``, ``eps``, ...).
        parts: the layers it folds into (several for a channel route).
        repeat: backward through a flatten: each BN channel covers ``repeat`` consecutive inputs.
    """

    site: Site
    bn: fx.Node
    bn_args: dict[str, Any]
    parts: list[ExportPart] = field(default_factory=list)
    repeat: int = 1


ExportMatched = Union[ExportCandidate, Skip]
"""One matcher verdict per batch-norm op."""


def schema_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of an ATen op call by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _is_attr(a: Any) -> bool:
    return isinstance(a, fx.Node) and a.op == "get_attr"


def _val(n: Any) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_dim(a: Any, b: Any) -> bool:
    """Two sizes that are provably equal: equal ints, or the same symbolic expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return bool(a.node.expr == b.node.expr)
    return False


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) else None


def _bn_outputs_ok(bn: fx.Node) -> bool:
    if bn.target is aten.batch_norm.default:
        return True
    return all(u.target is operator.getitem and u.args[1] == 0 for u in bn.users)


def _bn_output(bn: fx.Node) -> fx.Node | None:
    """The node carrying the BN's normalised output (the op, or its ``getitem(_, 0)``)."""
    if bn.target is aten.batch_norm.default:
        return bn
    users = list(bn.users)
    return users[0] if len(users) == 1 else None


def _value_users(n: fx.Node) -> list[fx.Node]:
    """The users that read ``n``'s values, not only its shape (forward patterns)."""
    out = []
    for u in n.users:
        shape_at = _SHAPE_READS.get(u.target)
        if (
            shape_at is not None
            and all(a is not n for i, a in enumerate(u.args) if i not in shape_at)
            and not any(v is n for v in u.kwargs.values())
        ):
            continue
        out.append(u)
    return out


def weight_path(node: fx.Node) -> list[fx.Node]:
    """The nodes that turn a decomposed linear's weight into its operand, operand first.

    ``permute(w, [1, 0])`` (or ``t(w)``) for ``addmm``/``mm``; for ``bmm`` also the ``expand`` to the
    batch and the ``view`` after it. Empty when the operand is not the transposed weight alone.
    """
    p = node.args[1] if node.target is not aten.addmm.default else node.args[2]
    path: list[fx.Node] = []
    if node.target is aten.bmm.default:
        while isinstance(p, fx.Node) and p.target in (
            aten.view.default,
            aten.expand.default,
            aten._unsafe_view.default,
        ):
            if len(p.users) != 1:
                return []
            path.append(p)
            p = p.args[0]
    if not (isinstance(p, fx.Node) and len(p.users) == 1 and p.args and _is_attr(p.args[0])):
        return []
    ok = (p.target is aten.permute.default and list(p.args[1]) == [1, 0]) or (  # type: ignore[arg-type]
        p.target in (aten.t.default, aten.numpy_T.default)
    )
    return [*path, p] if ok else []


def _decomposed_linear(node: Any) -> tuple[fx.Node, fx.Node | None, fx.Node] | None:
    """``(weight, bias, input)`` of a decomposed linear (Case 1), else None.

    ``addmm(bias, x, permute(w, [1, 0]))``, ``mm(x, permute(w, [1, 0]))``, or -- a linear on a 3-D
    input that is not contiguous -- ``bmm(x, view(expand(permute(w, [1, 0]), [B, C, O])))``, whose
    operand is the transposed weight repeated over the batch (checked on the recorded shapes).
    """
    if not (isinstance(node, fx.Node) and node.op == "call_function" and not node.kwargs):
        return None
    if node.target is aten.addmm.default and len(node.args) == 3 and _is_attr(node.args[0]):
        bias: fx.Node | None = node.args[0]  # type: ignore[assignment]
        x = node.args[1]
    elif node.target in (aten.mm.default, aten.bmm.default) and len(node.args) == 2:
        bias, x = None, node.args[0]
    else:
        return None
    path = weight_path(node)
    if not path or not isinstance(x, fx.Node):
        return None
    w: fx.Node = path[-1].args[0]  # type: ignore[assignment]
    if node.target is aten.bmm.default:
        wv, operand, xv = _val(w), _val(node.args[1]), _val(x)
        if wv is None or operand is None or xv is None or operand.dim() != 3 or xv.dim() != 3:
            return None
        if not (_same_dim(operand.shape[1], wv.shape[1]) and _same_dim(operand.shape[2], wv.shape[0])):
            return None
    return w, bias, x


def addmm_weight(node: Any) -> fx.Node | None:
    """The weight of a decomposed linear (``addmm``/``mm``/``bmm`` of a transposed weight), else None."""
    got = _decomposed_linear(node)
    return None if got is None else got[0]


def layer_weight(node: Any) -> tuple[str, fx.Node, fx.Node | None, fx.Node, dict[str, Any]] | None:
    """``(kind, weight, bias, input, args)`` of a layer op (Case 1), else None."""
    dec = _decomposed_linear(node)
    if dec is not None:
        return "Linear", dec[0], dec[1], dec[2], {}
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CONV):
        return None
    a = schema_args(node)
    return _CONV[node.target], a["weight"], a["bias"], a["input"], a


def _layout(kind: str, a: dict[str, Any]) -> WeightLayout:
    if kind == "Linear":
        return WeightLayout.linear()
    groups = int(a.get("groups", 1) or 1)
    return WeightLayout.conv_transpose(groups) if _transposed(kind, a) else WeightLayout.conv(groups)


def _transposed(kind: str, a: dict[str, Any]) -> bool:
    return bool(a.get("transposed", False)) if kind == "Convolution" else kind.startswith("ConvTranspose")


def _bn_verdict(bn: fx.Node, name: str) -> dict[str, Any] | Skip | None:
    """Case 2: the BN's arguments, a Skip, or None for a node that is no batch norm."""
    if bn.target in _BN_TRAIN:
        return Skip(name, SkipReason.TRAINING_MODE, "the batch norm op uses batch statistics")
    if bn.target not in _BN:
        return None
    a = schema_args(bn)
    if a.get("training", False) is not False:
        return Skip(name, SkipReason.TRAINING_MODE, "the batch norm op uses batch statistics")
    if not _bn_outputs_ok(bn):
        return Skip(name, SkipReason.TRAINING_MODE, "the batch norm's mean/var outputs are used")
    stats = (a["running_mean"], a["running_var"])
    if not (
        all(_is_attr(p) for p in stats) and all(a[k] is None or _is_attr(a[k]) for k in ("weight", "bias"))
    ):
        return Skip(name, SkipReason.NON_CONSTANT, "a batch norm parameter is computed at run time")
    return a


# ------------------------------------------------------------------------------------------- names
def _owner(attr: Any) -> str:
    """The module path owning a ``get_attr`` target (``stem.1.weight`` -> ``stem.1``)."""
    return str(attr.target).rpartition(".")[0] if _is_attr(attr) else ""


def bn_path(bn: fx.Node, a: dict[str, Any] | None) -> str:
    """The module path the program records for a batch-norm op (see "Names"), or its node name."""
    stack = bn.meta.get("nn_module_stack")
    if isinstance(stack, dict) and stack:
        path = list(stack.values())[-1]
        if isinstance(path, tuple) and path and isinstance(path[0], str) and path[0]:
            return path[0]
    if a is not None:
        owner = _owner(a.get("running_mean"))
        if owner:
            return owner
    return bn.name


def _layer_name(weight: fx.Node, node: fx.Node) -> str:
    return _owner(weight) or node.name


# ---------------------------------------------------------------------------------------- matching
def _is_noop(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in _NOOPS:
        return True
    if n.target in _DROPOUTS:
        return schema_args(n).get("train") is False
    return False


def _keeps_channel(n: fx.Node, axis: str) -> bool:
    """A reshape that keeps each element's channel: dims 0, 1 (``axis="dim1"``) or the last dim (conv-bn, linear-norm)."""
    if n.op != "call_function" or n.target not in _RESHAPES:
        return False
    vin, vout = _val(n.args[0]), _val(n)
    if vin is None or vout is None or vin.dim() < 2 or vout.dim() < 2:
        return False
    if axis == "last":
        return _static(vin.shape[-1]) is not None and _same_dim(vin.shape[-1], vout.shape[-1])
    return (
        _static(vin.shape[1]) is not None
        and _same_dim(vin.shape[1], vout.shape[1])
        and _same_dim(vin.shape[0], vout.shape[0])
    )


def _walk_back(src: Any) -> tuple[Any, list[fx.Node], str]:
    """From a BN input back through no-ops and reshapes: ``(producer, nodes passed, why-not)``."""
    p: Any = src
    passed: list[fx.Node] = []
    while isinstance(p, fx.Node) and p.op == "call_function" and p.args and isinstance(p.args[0], fx.Node):
        if not (_is_noop(p) or (p.target in _RESHAPES)):
            break
        if len(_value_users(p)) != 1:
            return p, passed, f"'{p.name}' between the layer and the batch norm is also read elsewhere"
        passed.append(p)
        p = p.args[0]
    return p, passed, ""


def _attr_ok(gm: fx.GraphModule, name: str, kind: str, w: Any, b: Any) -> Skip | None:
    if not (_is_attr(w) and (b is None or _is_attr(b))):
        return Skip(name, SkipReason.NON_CONSTANT, f"the {kind} weight is computed at run time")
    if not fetch_attr(gm, str(w.target)).is_floating_point():
        return Skip(name, SkipReason.UNSUPPORTED_DTYPE, "the weight is not floating point")
    return None


def _batched_conv(node: fx.Node, gm: fx.GraphModule, w: fx.Node) -> bool:
    """Case 1: a convolution on a batched input (channels at dim 1 of its output)."""
    v = _val(node)
    return v is not None and v.dim() == fetch_attr(gm, str(w.target)).dim()


def _route_leaves(src: fx.Node) -> tuple[str, list[Any]] | None:
    """concat-split / branch-sum: ``("cat", inputs)`` for a cat on dim 1, ``("sum", branches)`` for a tree of adds."""
    if src.op != "call_function":
        return None
    if src.target is aten.cat.default:
        a = schema_args(src)
        v = _val(src)
        dim = a.get("dim", 0)
        if v is not None and isinstance(dim, int) and dim % max(v.dim(), 1) == 1:
            return "cat", list(a["tensors"])
        return None
    if src.target is aten.add.Tensor and schema_args(src).get("alpha", 1) == 1:
        leaves: list[Any] = []

        def walk(n: Any, top: bool) -> bool:
            if (
                isinstance(n, fx.Node)
                and n.op == "call_function"
                and n.target is aten.add.Tensor
                and schema_args(n).get("alpha", 1) == 1
                and (top or len(n.users) == 1)
            ):
                return all(walk(x, False) for x in n.args[:2])
            leaves.append(n)
            return True

        walk(src, True)
        return "sum", leaves
    return None


def _match_route(
    gm: fx.GraphModule,
    name: str,
    how: str,
    src: fx.Node,
    leaves: list[Any],
    nf: int | None,
    c: ExportCandidate,
) -> ExportMatched:
    none = Skip(
        name, SkipReason.NO_PRODUCER, f"its input is a {how} whose inputs are not all convolution outputs"
    )
    if len(_value_users(src)) != 1:
        return none
    out = _val(src)
    lo = 0
    names: list[str] = []
    kinds: set[str] = set()
    for i, leaf in enumerate(leaves):
        got = layer_weight(leaf)
        if got is None or got[0] == "Linear":  # a linear's channels are last, the route's on dim 1
            return none
        kind, w, b, _, pa = got
        why = _attr_ok(gm, name, kind, w, b)
        if why is not None:
            return why
        if leaves.count(leaf) > 1 or len(_value_users(leaf)) != 1:
            return Skip(
                name,
                SkipReason.OTHER_CONSUMERS,
                f"the output of '{_layer_name(w, leaf)}' is also read elsewhere",
            )
        v = _val(leaf)
        if not _batched_conv(leaf, gm, w) or v is None or _static(v.shape[1]) is None:
            return none
        if how == "sum" and (out is None or tuple(v.shape) != tuple(out.shape)):
            return Skip(
                name, SkipReason.LAYOUT, f"the branch '{_layer_name(w, leaf)}' is broadcast in the sum"
            )
        ch = int(v.shape[1])
        if how == "cat":
            c.parts.append(ExportPart(leaf, w, b, _layout(kind, pa), lo, lo + ch))
            lo += ch
        else:
            if nf is not None and ch != nf:
                return Skip(
                    name, SkipReason.LAYOUT, f"{ch} channels in '{_layer_name(w, leaf)}' for {nf} BN features"
                )
            c.parts.append(ExportPart(leaf, w, b, _layout(kind, pa), 0, ch, with_shift=i == 0))
        names.append(_layer_name(w, leaf))
        kinds.add(kind)
    if how == "cat" and nf is not None and lo != nf:
        return Skip(name, SkipReason.LAYOUT, f"the concatenation has {lo} channels for {nf} BN features")
    detail = f"{'split per concatenated input' if how == 'cat' else 'scaled per summed branch'}: {', '.join(names)}"
    pattern = "concat-split" if how == "cat" else "branch-sum"
    c.site = Site(name, names[0], "+".join(sorted(kinds)), Direction.FORWARD, detail, pattern)
    return c


def _match_forward(
    gm: fx.GraphModule, name: str, a: dict[str, Any], nf: int | None, c: ExportCandidate
) -> ExportMatched:
    none = Skip(name, SkipReason.NO_PRODUCER, "its input is not a convolution or linear op")
    src, passed, why_not = _walk_back(a["input"])
    if not isinstance(src, fx.Node):
        return none
    got = layer_weight(src)
    if got is None:
        route = _route_leaves(src) if not passed or all(_is_noop(p) for p in passed) else None
        if route is not None:
            return _match_route(gm, name, route[0], src, route[1], nf, c)
        return none
    kind, w, b, _, pa = got
    why = _attr_ok(gm, name, kind, w, b)
    if why is not None:
        return why
    if why_not:
        return Skip(name, SkipReason.OTHER_CONSUMERS, why_not)
    if len(_value_users(src)) != 1:  # conv-bn / gemm-bn: a residual tap needs the unscaled value
        return Skip(
            name, SkipReason.OTHER_CONSUMERS, f"the output of '{_layer_name(w, src)}' is also used elsewhere"
        )
    axis = "last" if kind == "Linear" else "dim1"
    if kind != "Linear" and not _batched_conv(src, gm, w):
        return Skip(
            name, SkipReason.LAYOUT, "the convolution has an unbatched input: its channels are not on dim 1"
        )
    if not all(_is_noop(p) or _keeps_channel(p, axis) for p in passed):
        return Skip(
            name, SkipReason.LAYOUT, "a reshape between the layer and the batch norm moves the channel axis"
        )
    via = "through a reshape" if any(not _is_noop(p) for p in passed) else ""
    if kind == "Linear":  # gemm-bn on (N, C), linear-norm through a reshape to (tokens, C)
        v = _val(a["input"])
        if not (isinstance(v, torch.Tensor) and v.dim() == 2):
            return Skip(name, SkipReason.LAYOUT, "linear meets batch norm on a tensor that is not 2-D (N, C)")
        if via:
            via = "through a reshape to (tokens, channels)"
    c.parts.append(ExportPart(src, w, b, _layout(kind, pa), 0, nf or 0))
    pattern = "conv-bn" if kind != "Linear" else "linear-norm" if via else "gemm-bn"
    c.site = Site(name, _layer_name(w, src), kind, Direction.FORWARD, via, pattern)
    return c


def _zero_pad(n: fx.Node) -> bool:
    """A pad that adds constants (``F.pad`` default mode, as timm's ``Conv2dSame`` does)."""
    if n.op != "call_function":
        return False
    if n.target is aten.constant_pad_nd.default:
        return True
    return n.target is aten.pad.default and schema_args(n).get("mode") in ("constant", None)


def _zero_padding(kind: str, pa: dict[str, Any]) -> bool:
    """bn-conv: the convolution reads no padded zeros."""
    pad = pa.get("padding", 0)
    if isinstance(pad, str):
        return pad == "valid"
    if isinstance(pad, int):
        return pad == 0
    return all(p == 0 for p in pad)


def _match_backward(
    gm: fx.GraphModule, name: str, bn: fx.Node, a: dict[str, Any], nf: int | None, c: ExportCandidate
) -> ExportMatched | None:
    """bn-conv, bn-gemm, bn-flatten-gemm; None when the BN output does not lead to a layer at all."""
    cur = _bn_output(bn)
    if cur is None:
        return None
    flat = 0
    while True:
        users = list(cur.users)
        if len(users) != 1 or len(_value_users(cur)) != 1:
            return None
        u = users[0]
        if u.op != "call_function" or not u.args or u.args[0] is not cur:
            if layer_weight(u) is not None and layer_weight(u)[3] is cur:  # type: ignore[index]
                break  # a decomposed linear reads its input as a later argument
            return None
        if _is_noop(u):
            cur = u
            continue
        if u.target is aten.pad.default and schema_args(u).get("mode") in _COPY_PADS and not flat:
            cur = u
            continue
        if _zero_pad(u) and len(u.users) == 1:
            nxt = next(iter(u.users))
            got = layer_weight(nxt)
            if got is not None and got[3] is u and got[0] != "Linear":
                return Skip(
                    name,
                    SkipReason.PADDING,
                    f"'{_layer_name(got[1], nxt)}' reads zeros padded at run "
                    "time, which the batch norm shift would not reach",
                )
            return None
        if u.target in _RESHAPES and not flat:
            vin, vout = _val(cur), _val(u)
            if (
                vin is None
                or vout is None
                or vin.dim() < 2
                or vout.dim() != 2
                or not _same_dim(vin.shape[0], vout.shape[0])
            ):
                return None
            flat = 1 if vin.dim() == 2 else 2
            cur = u
            continue
        break
    got = layer_weight(u)
    if got is None or got[3] is not cur:
        return None
    kind, w, b, _, pa = got
    why = _attr_ok(gm, name, kind, w, b)
    if why is not None:
        return why
    if kind != "Linear" and _transposed(kind, pa):
        return Skip(
            name,
            SkipReason.UNSUPPORTED_LAYER,
            "a transposed convolution cannot absorb a batch norm before it (the shift does not map to a bias)",
        )
    if kind != "Linear" and not _zero_padding(kind, pa):
        return Skip(
            name,
            SkipReason.PADDING,
            f"'{_layer_name(w, u)}' pads with zeros, which the batch norm shift would not reach",
        )
    weight = fetch_attr(gm, str(w.target))
    v_in = _val(cur)
    repeat = 1
    if kind == "Linear":
        if v_in is None or v_in.dim() != 2:  # bn-gemm needs (N, C)
            return Skip(name, SkipReason.LAYOUT, "batch norm -> linear is exact only on a 2-D (N, C) tensor")
        if flat == 2:
            in_f = int(weight.shape[1])
            if nf is None or in_f % nf:
                return Skip(
                    name, SkipReason.LAYOUT, f"{in_f} features after the flatten for {nf} BN channels"
                )
            repeat = in_f // nf
    elif flat or v_in is None or v_in.dim() != weight.dim():
        return Skip(
            name, SkipReason.LAYOUT, "the convolution does not read the batch norm's channels on dim 1"
        )
    c.parts.append(ExportPart(u, w, b, _layout(kind, pa), 0, (nf or 0) * repeat))
    c.repeat = repeat
    via = f"through flatten: each channel covers {repeat} features" if repeat > 1 else ""
    pattern = "bn-conv" if kind != "Linear" else "bn-flatten-gemm" if flat == 2 else "bn-gemm"
    c.site = Site(name, _layer_name(w, u), kind, Direction.BACKWARD, via, pattern)
    return c


def _match_one(gm: fx.GraphModule, bn: fx.Node, name: str, a: dict[str, Any]) -> ExportMatched:
    mean = fetch_attr(gm, str(a["running_mean"].target))
    nf = int(mean.numel())
    fwd = _match_forward(gm, name, a, nf, ExportCandidate(Site(name, "", "", Direction.FORWARD), bn, a))
    if isinstance(fwd, ExportCandidate):
        return fwd
    back = _match_backward(
        gm, name, bn, a, nf, ExportCandidate(Site(name, "", "", Direction.BACKWARD), bn, a)
    )
    if isinstance(back, ExportCandidate) or (back is not None and fwd.reason is SkipReason.NO_PRODUCER):
        return back
    return fwd


def find_export_sites(gm: fx.GraphModule) -> list[ExportMatched]:
    """One verdict per batch-norm op of an unlifted exported graph (``ep.module()``), in graph order.

    Args:
        gm: the unlifted module (read, not changed).

    Returns:
        An :class:`ExportCandidate` or a ``Skip`` with the reason, per batch-norm op.
    """
    out: list[ExportMatched] = []
    seen: Counter[str] = Counter()
    for bn in gm.graph.nodes:
        if bn.op != "call_function" or (bn.target not in _BN and bn.target not in _BN_TRAIN):
            continue
        path = bn_path(bn, schema_args(bn))
        seen[path] += 1
        name = path if seen[path] == 1 else f"{path}#{seen[path]}"
        a = _bn_verdict(bn, name)
        if a is None:
            continue
        out.append(a if isinstance(a, Skip) else _match_one(gm, bn, name, a))
    return out
