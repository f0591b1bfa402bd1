"""Ranks and value uses of fx nodes: what the graph proves about the tensors between a BN and a layer.

:func:`rank_of` gives a node's tensor rank when recorded shapes or the graph prove it (BatchNorm2d/3d
refuse other ranks; flatten, view/reshape with explicit sizes, permute, reductions without keepdim,
indexing with ints and slices; layers, activations, transpose keep their input's rank; broadcasting
arithmetic gives the largest operand rank). :func:`value_users` are the users that read values, not
only the shape (``x.size()``, ``reshape_as(x)``). :func:`is_noop` is an eval-mode identity.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import LAYER_TYPES, fetch_attr, is_bn_module
from .sites import UNPROVEN_BATCH

__all__ = [
    "rank_of",
    "record_ranks",
    "flatten_dims",
    "flatten_to_2d",
    "value_users",
    "is_noop",
    "unbatched_why",
]

_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ELU,
    nn.Mish,
    nn.Dropout,
    nn.Identity,
)
_ELEMENTWISE_FUNCS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.dropout}


def flatten_to_2d(start: Any, end: Any) -> bool:
    return bool(start == 1 and end == -1)


def _flatten_rank(r: int | None, start: Any, end: Any) -> int | None:
    """Rank after ``flatten(start, end)`` of a rank-``r`` tensor (None when not proven)."""
    if flatten_to_2d(start, end):
        return 2
    if r is None or not isinstance(start, int) or not isinstance(end, int):
        return None
    s, e = start % r if r else 0, end % r if r else 0
    return r - (e - s) if e >= s else None


def flatten_dims(node: fx.Node, root: nn.Module) -> tuple[Any, Any] | None:
    """``(start_dim, end_dim)`` when ``node`` is a flatten (module, function or method), else None."""
    if node.op == "call_module":
        m = fetch_attr(root, str(node.target))
        if type(m) is nn.Flatten:
            return m.start_dim, m.end_dim
        return None
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start, end
    return None


_ARITH = {
    operator.add,
    operator.mul,
    operator.sub,
    operator.truediv,
    operator.matmul,
    torch.add,
    torch.mul,
    torch.sub,
    torch.matmul,
}
_REDUCE = {"mean", "sum", "amax", "amin"}


def _reduced_rank(node: fx.Node, r: int | None) -> int | None:
    """Rank after ``x.mean(dim)`` (and sum/amax/amin) without keepdim."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if r is None or dim is None or node.kwargs.get("keepdim", False) or len(node.args) > 2:
        return None
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return None
    return r - len({d % r for d in dims})


def _indexed_rank(node: fx.Node, r: int | None) -> int | None:
    """Rank after ``x[idx]`` with ints and plain slices only."""
    idx = node.args[1]
    items = idx if isinstance(idx, tuple) else (idx,)
    if r is None or not all(isinstance(i, (int, slice)) for i in items) or len(items) > r:
        return None
    return r - sum(isinstance(i, int) for i in items)


_SAME_RANK_METHODS = {
    "transpose",
    "contiguous",
    "relu",
    "sigmoid",
    "tanh",
    "float",
    "half",
    "to",
    "mul",
    "add",
    "sub",
    "div",
    "clone",
}


def rank_of(node: Any, root: nn.Module, depth: int = 0) -> int | None:
    """The tensor rank of ``node``'s value when the graph proves it (gemm-bn, bn-gemm need 2-D), else None.

    Facts used: recorded shapes; ``BatchNorm2d``/``3d`` refuse any input but 4-D/5-D; flatten,
    view/reshape with explicit sizes, permute; layers, activations, transpose keep their input's
    rank; broadcasting arithmetic gives the largest rank of its tensor operands.
    """
    if not isinstance(node, fx.Node) or depth > 64:
        return None
    if _RANK in node.meta:
        return node.meta[_RANK]  # type: ignore[no-any-return]
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    first = node.args[0] if node.args else None
    fl = flatten_dims(node, root)
    if fl is not None:
        return _flatten_rank(rank_of(first, root, depth + 1), *fl)
    if node.op == "call_module":
        m = fetch_attr(root, str(node.target))
        if type(m) is nn.BatchNorm2d:
            return 4  # BatchNorm2d._check_input_dim raises on anything else
        if type(m) is nn.BatchNorm3d:
            return 5
        if isinstance(m, (*LAYER_TYPES, *_ELEMENTWISE_MODULES, nn.BatchNorm1d)) or is_bn_module(m):
            return rank_of(first, root, depth + 1)
        return None
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCS or node.target is torch.transpose:
            return rank_of(first, root, depth + 1)
        if node.target is operator.getitem and isinstance(first, fx.Node):
            return _indexed_rank(node, rank_of(first, root, depth + 1))
        if node.target in (torch.mean, torch.sum, torch.amax, torch.amin):
            return _reduced_rank(node, rank_of(first, root, depth + 1))
        if node.target in _ARITH:
            ranks = [rank_of(a, root, depth + 1) for a in node.args if isinstance(a, fx.Node)]
            if ranks and all(r is not None for r in ranks):
                return max(r for r in ranks if r is not None)
        return None
    if node.op == "call_method":
        if node.target in ("view", "reshape", "permute"):
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                sizes = tuple(sizes[0])
            return len(sizes) if sizes else None
        if node.target in ("reshape_as", "view_as") and len(node.args) > 1:
            return rank_of(node.args[1], root, depth + 1)
        if node.target in _REDUCE:
            return _reduced_rank(node, rank_of(first, root, depth + 1))
        if node.target in _SAME_RANK_METHODS:
            return rank_of(first, root, depth + 1)
    return None


_RANK = "bnfold_rank"


def unbatched_why(
    t: Any, d: int, ranks: frozenset[int] | None, root: nn.Module, fl: tuple[Any, Any] | None = None
) -> str:
    """Why the channel axis of a ``d``-D conv may not be dim 1 where a BN reads it ("" when it is).

    ``t`` is the conv's output (a BN after it, through ``flatten`` dims ``fl``) or the BN input (a
    BN before it); ``ranks`` the input ranks the BN accepts (None: any). A ConvNd also runs on an
    unbatched ``(C, ...)`` tensor of rank N + 1, where its channels are dim 0: the fold holds only for
    rank N + 2, proven by the recorded shapes or the graph, or because the BN refuses the other rank.
    """
    r = rank_of(t, root)
    if r == d + 1:
        return f"the {d}-D conv's tensor is {r}-D here (unbatched): its channel axis is dim 0, not the BN's dim 1"
    if r is not None or ranks is None:
        return "" if r is not None else UNPROVEN_BATCH
    u: int | None = d + 1
    if fl is not None:
        start, end = fl
        if not all(isinstance(i, int) and -(d + 1) <= i < d + 1 for i in (start, end)):
            return UNPROVEN_BATCH if not all(isinstance(i, int) for i in (start, end)) else ""
        u = _flatten_rank(d + 1, start, end)
    return "" if u is None or u not in ranks else UNPROVEN_BATCH  # None: the flatten raises on it


def record_ranks(graph: fx.Graph, root: nn.Module) -> None:
    """Rank of every node, in graph order (each from its inputs' ranks: no deep recursion)."""
    for n in graph.nodes:
        n.meta.pop(_RANK, None)
    for n in graph.nodes:
        n.meta[_RANK] = rank_of(n, root)


_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}


def _shape_only(user: fx.Node, n: fx.Node) -> bool:
    """True when ``user`` reads only the shape of ``n`` (folding changes values, not shapes)."""
    if user.op == "call_method" and user.target in ("size", "dim") and user.args[:1] == (n,):
        return n not in user.args[1:] and n not in user.kwargs.values()
    if user.op == "call_function" and user.target is getattr and user.args[:1] == (n,):
        return user.args[1] in _SHAPE_ATTRS
    if user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"):
        return user.args[0] is not n and n not in user.kwargs.values()
    return False


def value_users(n: fx.Node) -> list[fx.Node]:
    """The users of ``n`` that read its values (not only its shape)."""
    return [u for u in n.users if not _shape_only(u, n)]


def is_noop(n: fx.Node, root: nn.Module) -> bool:
    """An identity between a BN and its neighbour: Identity, a Dropout module in eval mode (one left in
    ``train()`` inside an eval model draws a mask: not an identity), dropout(training=False)."""
    if n.op == "call_module":
        m = fetch_attr(root, str(n.target))
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if type(m) is nn.Identity:
            return True
        dropouts = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
        return type(m) in dropouts and not m.training
    if n.op == "call_function" and n.target is F.dropout:
        training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
        return training is False
    return n.op == "call_method" and n.target == "contiguous" and len(n.args) == 1
