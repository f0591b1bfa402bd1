"""Apply planned folds to an unlifted ``torch.export`` graph (``ep.module()``); nothing here decides.

Rewrite (Before / After)::

    Before:  x -> conv(x, w, b) -> batch_norm(_, g, beta, mean, var) -> y
    After:   x -> conv(x, _bnfold_w0, _bnfold_b0) -> y

    Before:  x -> linear(x, w) -> flatten(0, 1) -> batch_norm -> reshape_as(_, linear) -> y   (LinearNorm)
    After:   x -> linear(x, _bnfold_w0, _bnfold_b0) -> flatten(0, 1) -> reshape_as(_, linear) -> y

    Before:  x -> batch_norm -> dropout(train=False) -> linear(_, w, b) -> y                (backward)
    After:   x -> dropout(train=False) -> linear(_, _bnfold_w0, _bnfold_b0) -> y

Every layer a fold writes gets *new* attributes (``_bnfold_w<k>`` / ``_bnfold_b<k>``), so a weight
shared with another op is never changed; a decomposed linear (``addmm(bias, x, permute(w))``,
``mm(x, permute(w))`` or ``bmm(x, view(expand(permute(w))))``) becomes one ``aten.linear`` with the
new tensors. Each folded batch norm is
removed: its users read its input (the reshapes, no-ops, ``cat`` or sum between the layer and the
BN commute with a per-channel affine, which the layer now computes). Attributes no node reads any
more are dropped. The caller exports the module again.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .export_match import ExportCandidate, layer_weight, weight_path

__all__ = ["apply_exported", "drop_unread_attrs"]

aten = torch.ops.aten


def _as_linear(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``addmm(bias, x, permute(w, [1, 0]))`` / ``mm(x, permute(w))`` as ``aten.linear(x, w, bias)``."""
    got = layer_weight(node)
    assert got is not None
    _, w, b, x, _ = got
    path = weight_path(node)
    with gm.graph.inserting_before(node):
        lin = gm.graph.call_function(aten.linear.default, (x, w, b))
    lin.meta = dict(node.meta)
    node.replace_all_uses_with(lin)
    gm.graph.erase_node(node)
    for p in path:  # the transposed (and expanded) weight, read by nothing else
        gm.graph.erase_node(p)
    return lin


def apply_exported(
    gm: fx.GraphModule, folds: list[ExportCandidate], writes: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Point each written layer at its new tensors, remove the folded BNs, drop what nothing reads."""
    for k, (node, (w_t, b_t)) in enumerate(writes.items()):
        src = (
            _as_linear(gm, node)
            if node.target in (aten.addmm.default, aten.mm.default, aten.bmm.default)
            else node
        )
        wn, bname = f"_bnfold_w{k}", f"_bnfold_b{k}"
        gm.register_parameter(wn, nn.Parameter(w_t, requires_grad=False))
        gm.register_parameter(bname, nn.Parameter(b_t, requires_grad=False))
        with gm.graph.inserting_before(src):
            w_attr = gm.graph.get_attr(wn)
            b_attr = gm.graph.get_attr(bname)
        args = list(src.args)
        while len(args) < 3:
            args.append(None)
        args[1], args[2] = w_attr, b_attr
        src.args, src.kwargs = tuple(args), {k2: v2 for k2, v2 in src.kwargs.items() if k2 != "bias"}
    for c in folds:
        bn = c.bn
        x = bn.args[0]  # the input of both BN ops; read now: a decomposed linear there was replaced
        assert isinstance(x, fx.Node)
        if bn.target is aten.batch_norm.default:
            bn.replace_all_uses_with(x)
        else:
            for u in list(bn.users):  # the getitem(bn, 0) users (the matcher proved there are no others)
                u.replace_all_uses_with(x)
                gm.graph.erase_node(u)
        gm.graph.erase_node(bn)
    drop_unread_attrs(gm, aliases=False)


def drop_unread_attrs(gm: fx.GraphModule, *, aliases: bool) -> None:
    """Erase the ``get_attr`` nodes nothing reads any more, recompile, and delete the parameters and buffers
    only they read.

    ``aliases``: delete every such name (branch merge: the branches' tensors go). Without it, only the
    names ``named_parameters``/``named_buffers`` list (the first name of each tensor): a second name of
    a tied tensor stays (the fold's rewrite)."""
    dropped: set[str] = set()
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            dropped.add(str(n.target))
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    listed = dropped if aliases else {name for name, _ in [*gm.named_parameters(), *gm.named_buffers()]}
    for name in sorted((dropped & listed) - used):
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
