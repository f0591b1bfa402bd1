"""Channel routes in an fx graph: concat-split and branch-sum (:mod:`bnfold.fx.match`).

A BN on ``torch.cat([...], dim=1)`` of layer outputs is split per slice, each slice folded into its
producer; a BN on a sum of layer outputs scales every branch and puts the shift into the first
branch's bias. Every branch must be a Conv-kind layer called once whose output is read nowhere else.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from bnfold.records import Direction, Site, Skip, SkipReason

from .layers import fetch_attr, forward_layer_kind
from .shapes import unbatched_why, value_users
from .sites import Candidate, Index, layout_skip

__all__ = ["match_route", "route_kind", "sum_leaves"]


def route_kind(n: fx.Node) -> str | None:
    """ "cat" for ``torch.cat(list, dim=1)``, "sum" for ``a + b`` (torch.add without alpha), else None."""
    if n.op != "call_function":
        return None
    if n.target is torch.cat:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        ok = isinstance(n.args[0], (list, tuple)) and dim == 1 and not (set(n.kwargs) - {"dim"})
        return "cat" if ok else None
    if n.target in (operator.add, torch.add) and len(n.args) == 2 and not n.kwargs:
        return "sum" if all(isinstance(a, fx.Node) for a in n.args) else None
    return None


def sum_leaves(n: fx.Node, top: bool = True) -> list[Any] | None:
    """The branches of a tree of ``+`` whose inner sums are read only by the tree."""
    if route_kind(n) != "sum" or (not top and len(value_users(n)) != 1):
        return [n]
    out: list[Any] = []
    for a in n.args:
        sub = sum_leaves(a, False) if isinstance(a, fx.Node) else None
        if sub is None:
            return None
        out.extend(sub)
    return out


def match_route(
    node: fx.Node,
    src: fx.Node,
    root: nn.Module,
    idx: Index,
    shown: str,
    nf: int | None,
    bn_why: str,
    q: Any,
    ranks: frozenset[int] | None = None,
) -> tuple[Skip, Candidate | None]:
    """concat-split / branch-sum: BN on ``cat`` of layer outputs (a slice per layer) or on a sum of layer outputs."""
    how = route_kind(src)
    leaves = list(src.args[0]) if how == "cat" else sum_leaves(src)  # type: ignore[arg-type]
    none = Skip(
        shown, SkipReason.NO_PRODUCER, f"its input is a {how} whose inputs are not all foldable layer outputs"
    )
    if not leaves or len(value_users(src)) != 1:
        return none, None
    parts: list[tuple[fx.Node, int, int, bool]] = []
    lo = 0
    names: list[str] = []
    kinds: set[str] = set()
    for i, leaf in enumerate(leaves):
        if not (isinstance(leaf, fx.Node) and leaf.op == "call_module"):
            return none, None
        target = str(leaf.target)
        layer = fetch_attr(root, target)
        kind, _ = forward_layer_kind(layer)
        if kind is None or kind == "Linear":  # Linear's channel axis is last, the route's is dim 1
            return none, None
        if leaves.count(leaf) > 1 or len(value_users(leaf)) != 1:
            return Skip(
                shown, SkipReason.OTHER_CONSUMERS, f"the output of '{q(target)}' is also read elsewhere"
            ), None
        why = idx.shared_why(target)
        if why:
            return Skip(
                shown, SkipReason.SHARED_MODULE, f"{why}: a routed fold needs each branch's own layer"
            ), None
        unbatched = unbatched_why(leaf, len(layer.kernel_size), ranks, root)
        if unbatched:
            return layout_skip(shown, unbatched), None
        ch = int(layer.out_channels)
        if how == "cat":
            parts.append((leaf, lo, lo + ch, True))
            lo += ch
        else:
            if nf is not None and ch != nf:
                return Skip(
                    shown, SkipReason.LAYOUT, f"{ch} channels in '{q(target)}' for {nf} BN features"
                ), None
            parts.append((leaf, 0, ch, i == 0))
        names.append(q(target))
        kinds.add(kind)
    if how == "cat" and nf is not None and lo != nf:
        return Skip(
            shown, SkipReason.LAYOUT, f"the concatenation has {lo} channels for {nf} BN features"
        ), None
    detail = f"{'split per concatenated input' if how == 'cat' else 'scaled per summed branch'}: {', '.join(names)}"
    pattern = "concat-split" if how == "cat" else "branch-sum"
    site = Site(shown, names[0], "+".join(sorted(kinds)), Direction.FORWARD, detail, pattern)
    cand = Candidate(site, node, parts[0][0], bool(bn_why), bn_why, parts=parts)
    return none, cand
