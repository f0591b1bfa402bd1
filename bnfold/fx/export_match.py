"""One verdict per batch-norm op in an unlifted ``torch.export`` graph: an :class:`ExportCandidate` or a ``Skip``.

The matcher stage of the ``torch.export`` backend (driver: :mod:`bnfold.fx.export`); it reads the
graph and never edits it. Op arguments are read by name through the op's schema (as
``torch/ao/quantization/pt2e/utils.py`` does), never by position. Cases (cited as "Case n"):

1. Producers: ``aten.conv1d/2d/3d`` (also the ``.padding`` overloads), ``aten.conv_transpose1d/2d/3d``,
   ``aten.convolution`` (its ``transposed`` argument), ``aten.linear``, and a decomposed linear
   ``addmm(bias, x, permute(weight, [1, 0]))`` (or ``t(weight)``), whose weight and bias (if any)
   are model attributes (``NON_CONSTANT`` otherwise; a non-float weight is ``UNSUPPORTED_DTYPE``).
2. BN: ``aten.batch_norm`` with ``training=False`` (pre-dispatch graphs) or
   ``aten._native_batch_norm_legit_no_training`` whose only used output is item 0 (decomposed graphs),
   with statistics and affine parameters that are model attributes. Training-mode BN ops, or used
   mean/var outputs: ``TRAINING_MODE``.
3. The producer's output has this one user (``OTHER_CONSUMERS`` otherwise).
4. ``linear`` meets BN only on a 2-D tensor (read from the node's recorded ``val``; ``LAYOUT`` otherwise).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import fx

from bnfold.fold_math import WeightLayout
from bnfold.records import Direction, Site, Skip, SkipReason

from .layers import fetch_attr

__all__ = ["ExportCandidate", "ExportMatched", "find_export_sites", "schema_args"]

aten = torch.ops.aten

# producer op -> layer kind; the layout comes from the ``groups`` / ``transposed`` arguments (Case 1)
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


@dataclass(slots=True)
class ExportCandidate:
    """A BN op that folds into the op producing its input (Case 1-4 hold).

    Attributes:
        site: the verdict as the report lists it.
        bn: the batch-norm node.
        producer: the conv/linear node, or the ``addmm`` of a decomposed linear.
        weight, bias: the producer's ``get_attr`` nodes (``bias`` None: the fold creates one).
        layout: the weight's channel axes.
        bn_args: the BN's arguments by schema name (``weight``, ``bias``, ``running_mean``,
            ``running_var``, ``eps``, ...).
    """

    site: Site
    bn: fx.Node
    producer: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    layout: WeightLayout
    bn_args: dict[str, Any]


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


def _bn_outputs_ok(bn: fx.Node) -> bool:
    if bn.target is aten.batch_norm.default:
        return True
    return all(u.target is operator.getitem and u.args[1] == 0 for u in bn.users)


def addmm_weight(node: Any) -> fx.Node | None:
    """The weight of ``addmm(bias, x, permute(weight, [1, 0]))`` (a decomposed linear), else None."""
    if not (isinstance(node, fx.Node) and node.target is aten.addmm.default and not node.kwargs):
        return None
    if len(node.args) != 3 or not _is_attr(node.args[0]):
        return None
    p = node.args[2]
    if not (isinstance(p, fx.Node) and len(p.users) == 1 and _is_attr(p.args[0])):
        return None
    if p.target is aten.permute.default and list(p.args[1]) == [1, 0]:  # type: ignore[arg-type]
        return p.args[0]  # type: ignore[return-value]
    if p.target in (aten.t.default, aten.numpy_T.default):
        return p.args[0]  # type: ignore[return-value]
    return None


def _layout(kind: str, a: dict[str, Any]) -> WeightLayout:
    if kind == "Linear":
        return WeightLayout.linear()
    groups = int(a.get("groups", 1) or 1)
    transposed = bool(a.get("transposed", False)) if kind == "Convolution" else kind.startswith("ConvTranspose")
    return WeightLayout.conv_transpose(groups) if transposed else WeightLayout.conv(groups)


def _bn_verdict(bn: fx.Node) -> dict[str, Any] | Skip | None:
    """Case 2: the BN's arguments, a Skip, or None for a node that is no batch norm."""
    if bn.target in _BN_TRAIN:
        return Skip(bn.name, SkipReason.TRAINING_MODE, "the batch norm op uses batch statistics")
    if bn.target not in _BN:
        return None
    a = schema_args(bn)
    if a.get("training", False) is not False:
        return Skip(bn.name, SkipReason.TRAINING_MODE, "the batch norm op uses batch statistics")
    if not _bn_outputs_ok(bn):
        return Skip(bn.name, SkipReason.TRAINING_MODE, "the batch norm's mean/var outputs are used")
    stats = (a["running_mean"], a["running_var"])
    if not (all(_is_attr(p) for p in stats) and all(a[k] is None or _is_attr(a[k]) for k in ("weight", "bias"))):
        return Skip(bn.name, SkipReason.NON_CONSTANT, "a batch norm parameter is computed at run time")
    return a


def _match_one(gm: fx.GraphModule, bn: fx.Node, a: dict[str, Any]) -> ExportMatched:
    src = a["input"]
    if addmm_weight(src) is not None:  # Case 1: a decomposed linear, rewritten as linear by the rewrite
        kind, w, b = "Linear", addmm_weight(src), src.args[0]
        pa: dict[str, Any] = {}
    elif isinstance(src, fx.Node) and src.op == "call_function" and src.target in _CONV:
        kind = _CONV[src.target]
        pa = schema_args(src)
        w, b = pa["weight"], pa["bias"]
    else:
        return Skip(bn.name, SkipReason.NO_PRODUCER, "its input is not a convolution or linear op")
    if not (_is_attr(w) and (b is None or _is_attr(b))):
        return Skip(bn.name, SkipReason.NON_CONSTANT, f"the {kind} weight is computed at run time")
    if len(src.users) != 1:  # Case 3
        return Skip(bn.name, SkipReason.OTHER_CONSUMERS, f"the output of {src.name} is also used elsewhere")
    if kind == "Linear":  # Case 4
        val = src.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.dim() == 2):
            return Skip(bn.name, SkipReason.LAYOUT, "linear meets batch norm on a tensor that is not 2-D (N, C)")
    assert isinstance(w, fx.Node)
    if not fetch_attr(gm, str(w.target)).is_floating_point():
        return Skip(bn.name, SkipReason.UNSUPPORTED_DTYPE, "the weight is not floating point")
    site = Site(bn.name, src.name, kind, Direction.FORWARD)
    return ExportCandidate(site, bn, src, w, b, _layout(kind, pa), a)


def find_export_sites(gm: fx.GraphModule) -> list[ExportMatched]:
    """One verdict per batch-norm op of an unlifted exported graph (``ep.module()``), in graph order.

    Args:
        gm: the unlifted module (read, not changed).

    Returns:
        An :class:`ExportCandidate` or a ``Skip`` with the reason, per batch-norm op.
    """
    out: list[ExportMatched] = []
    for bn in gm.graph.nodes:
        if bn.op != "call_function":
            continue
        a = _bn_verdict(bn)
        if a is None:
            continue
        out.append(a if isinstance(a, Skip) else _match_one(gm, bn, a))
    return out
