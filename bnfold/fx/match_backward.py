"""Backward folds in an fx graph (BN -> layer): bn-conv, bn-gemm, bn-flatten-gemm (:mod:`bnfold.fx.match`)."""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from bnfold.records import Direction, Site, Skip, SkipReason

from .convs import input_side_conv
from .layers import fetch_attr, layer_kind
from .shapes import flatten_dims, flatten_to_2d, is_noop, rank_of, unbatched_why, value_users
from .sites import UNPROVEN_RANK, Candidate, Index, clone_detail, layout_skip

__all__ = ["match_backward"]


def _zero_padding(conv: Any) -> bool:
    """True when the conv reads no padded zeros (bn-conv)."""
    if conv.padding_mode != "zeros":
        return True
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "valid" or all(p == 0 for p in conv._reversed_padding_repeated_twice)
    return all(int(p) == 0 for p in pad)


def _sole_input_user(layer_node: fx.Node, bn_node: fx.Node) -> bool:
    """True when the layer's one and only input is the BN output."""
    return len(layer_node.args) == 1 and not layer_node.kwargs and layer_node.args[0] is bn_node


def match_backward(
    node: fx.Node,
    root: nn.Module,
    idx: Index,
    shown: str,
    nf: int | None,
    bn_why: str,
    q: Any,
    ranks: frozenset[int] | None = None,
) -> tuple[Skip | None, Candidate | None]:
    """bn-conv, bn-gemm, bn-flatten-gemm; ``ranks``: the input ranks the BN accepts (None: any)."""
    # Walk forward through eval no-ops and at most one flatten(1, -1) (BN2d -> Flatten -> Linear).
    cur = node
    flat = False
    while True:
        users = value_users(cur)
        if len(users) != 1 or len(cur.users) != 1:
            return None, None
        u = users[0]
        if u.op != "call_module" or not _sole_input_user(u, cur):
            dims = flatten_dims(u, root)
            if not flat and dims is not None and u.args[0] is cur and flatten_to_2d(*dims):
                flat, cur = True, u
                continue
            if is_noop(u, root) and u.args[0] is cur:
                cur = u
                continue
            return None, None
        layer = fetch_attr(root, str(u.target))
        if type(layer) is nn.Flatten and not flat and flatten_to_2d(layer.start_dim, layer.end_dim):
            flat, cur = True, u
            continue
        if is_noop(u, root):
            cur = u
            continue
        break
    target = str(u.target)
    kind = layer_kind(layer)
    if kind is None:
        if input_side_conv(layer) is not None:
            return (
                Skip(
                    shown,
                    SkipReason.PADDING,
                    f"'{q(target)}' pads its input at run time, which the BN shift would not reach",
                ),
                None,
            )
        return None, None
    if kind.startswith("ConvTranspose"):
        return (
            Skip(
                shown,
                SkipReason.UNSUPPORTED_LAYER,
                "a ConvTranspose cannot absorb a BN before it (shift does not map to a bias)",
            ),
            None,
        )
    in_ch = layer.in_features if kind == "Linear" else layer.in_channels
    repeat = 1
    if flat:
        if kind != "Linear" or nf is None or in_ch % nf:
            return Skip(
                shown, SkipReason.LAYOUT, f"{in_ch} features after the flatten for {nf} BN channels"
            ), None
        repeat = in_ch // nf
    elif nf is not None and in_ch != nf:
        return Skip(shown, SkipReason.LAYOUT, f"{in_ch} layer input channels for {nf} BN features"), None
    if kind != "Linear" and not _zero_padding(layer):
        return (
            Skip(
                shown,
                SkipReason.PADDING,
                f"'{q(target)}' pads with zeros, which the BN shift would not reach",
            ),
            None,
        )
    if kind != "Linear" and (unbatched := unbatched_why(node.args[0], len(layer.kernel_size), ranks, root)):
        return layout_skip(shown, unbatched), None
    if not flat:
        rank = rank_of(node.args[0], root) if kind == "Linear" else 2
        if rank is None:  # bn-gemm: the rank is not proven
            return layout_skip(shown, UNPROVEN_RANK), None
        if rank != 2:  # bn-gemm needs (N, C)
            return Skip(
                shown, SkipReason.LAYOUT, f"BN -> Linear is exact only on a 2-D tensor, not {rank}-D"
            ), None
    why = idx.shared_why(target)
    via = f"through flatten: each channel covers {repeat} features" if flat else ""
    pattern = "bn-gemm" if kind == "Linear" else "bn-conv"
    site = Site(
        shown,
        q(target),
        kind,
        Direction.BACKWARD,
        "; ".join(d for d in (clone_detail(why), via) if d),
        "bn-flatten-gemm" if flat else pattern,
    )
    both = "; ".join(w for w in (why, bn_why) if w)
    return None, Candidate(site, node, u, bool(both), both, repeat=repeat)
