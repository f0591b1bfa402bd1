"""Forward folds in an fx graph (layer -> BN): conv-bn, gemm-bn, linear-norm (:mod:`bnfold.fx.match`).

The BN input is walked back through eval no-ops and at most one flatten to the producing layer
call; a ``cat`` or sum there is a channel route (concat-split, branch-sum: :mod:`bnfold.fx.match_routes`).
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from bnfold.records import Direction, Site, Skip, SkipReason

from .layers import LAYER_TYPES, fetch_attr, forward_layer_kind
from .match_routes import match_route, route_kind
from .shapes import flatten_dims, is_noop, rank_of, unbatched_why, value_users
from .sites import UNPROVEN_RANK, Candidate, Index, clone_detail, layout_skip

__all__ = ["match_forward", "walk_back"]


def walk_back(src: Any, root: nn.Module) -> tuple[Any, tuple[Any, Any] | None, str]:
    """From a BN input back through eval no-ops and at most one flatten to the producer.

    Returns ``(producer, flatten dims or None, why-not)``; every node passed has one value user.
    """
    p = src
    fl: tuple[Any, Any] | None = None
    while isinstance(p, fx.Node) and p.args and isinstance(p.args[0], fx.Node):
        dims = flatten_dims(p, root) if fl is None else None
        if not (is_noop(p, root) or dims is not None):
            break
        if len(value_users(p)) != 1:
            return p, fl, f"'{p.name}' between the layer and the BN is also read elsewhere"
        if dims is not None:
            fl = dims
        p = p.args[0]
    return p, fl, ""


def match_forward(
    node: fx.Node,
    src: Any,
    root: nn.Module,
    idx: Index,
    shown: str,
    nf: int | None,
    bn_why: str,
    q: Any,
    ranks: frozenset[int] | None = None,
) -> tuple[Skip, Candidate | None]:
    """conv-bn, gemm-bn, linear-norm or a channel route; ``ranks``: the input ranks the BN accepts (None: any)."""
    none = Skip(shown, SkipReason.NO_PRODUCER, "its input is not a Conv/ConvTranspose/Linear module output")
    src, fl, why_not = walk_back(src, root)
    if not isinstance(src, fx.Node):
        return none, None
    if src.op != "call_module" and not (fl is None and route_kind(src) is not None):
        if src.op == "call_function" and getattr(src.target, "__name__", "") in (
            "conv1d",
            "conv2d",
            "conv3d",
            "linear",
        ):
            return Skip(
                shown, SkipReason.UNSUPPORTED_LAYER, "produced by a functional layer (F.conv/F.linear)"
            ), None
        return none, None
    if fl is None and route_kind(src) is not None:
        return match_route(node, src, root, idx, shown, nf, bn_why, q, ranks)
    target = str(src.target)
    layer = fetch_attr(root, target)
    kind, note = forward_layer_kind(layer)
    if kind is None:
        if isinstance(layer, LAYER_TYPES):
            return (
                Skip(
                    shown,
                    SkipReason.UNSUPPORTED_LAYER,
                    f"'{q(target)}' changes the layer's behaviour (subclass, hook, parametrization)",
                ),
                None,
            )
        return none, None
    if why_not:
        return Skip(shown, SkipReason.OTHER_CONSUMERS, why_not), None
    # conv-bn / gemm-bn: a residual tap (or a graph output) needs the unscaled value.
    users = value_users(src)
    if len(users) != 1:
        return (
            Skip(
                shown,
                SkipReason.OTHER_CONSUMERS,
                f"the output of '{q(target)}' is also used by {len(users) - 1} other node(s)",
            ),
            None,
        )
    out_ch = layer.out_features if kind == "Linear" else layer.out_channels
    if nf is not None and out_ch != nf:
        return Skip(shown, SkipReason.LAYOUT, f"{out_ch} layer channels for {nf} BN features"), None
    via = ""
    if kind == "Linear":
        rank = rank_of(src, root)
        if fl is not None:
            # linear-norm: Linear on (B, N, C) -> flatten(0, -2) -> BN1d on (B*N, C): C stays the BN channel.
            start, end = fl
            if rank is None and end != -2:
                return layout_skip(shown, UNPROVEN_RANK), None
            if not (start == 0 and (end == -2 or (rank is not None and end == rank - 2))):
                return Skip(
                    shown,
                    SkipReason.LAYOUT,
                    f"flatten({start}, {end}) moves the Linear's output axis off dim 1",
                ), None
            rank = 2
            via = "through flatten to (tokens, channels)"
        if rank is None:  # gemm-bn: the rank is not proven
            return layout_skip(shown, UNPROVEN_RANK), None
        if rank != 2:  # gemm-bn needs (N, C)
            return (
                Skip(
                    shown,
                    SkipReason.LAYOUT,
                    f"Linear acts on the last dim and BN on dim 1: not the same axis on a {rank}-D tensor",
                ),
                None,
            )
    elif (unbatched := unbatched_why(src, len(layer.kernel_size), ranks, root, fl)) != "":
        return layout_skip(shown, unbatched), None
    elif fl is not None:
        start = fl[0]
        if not (isinstance(start, int) and start >= 2):  # flatten(2) of (N, C, H, W) keeps C at dim 1
            return Skip(
                shown, SkipReason.LAYOUT, f"flatten{fl} moves the layer's channel axis off dim 1"
            ), None
        via = "through a spatial flatten"
    why = idx.shared_why(target)
    detail = "; ".join(d for d in (clone_detail(why), note, via) if d)
    pattern = "conv-bn" if kind != "Linear" else "gemm-bn" if fl is None else "linear-norm"
    site = Site(shown, q(target), kind, Direction.FORWARD, detail, pattern)
    both = "; ".join(w for w in (why, bn_why) if w)
    return none, Candidate(site, node, src, bool(both), both)
