"""Records and indexes the fx matcher's cases share (:mod:`bnfold.fx.match` and its case modules).

A :class:`Candidate` is the matcher's positive verdict (the fx counterpart of the ONNX matcher's
``Fold`` before numbers): which BN call folds into which layer call(s), and whether only a
``GraphModule`` can express the fold. The matcher returns one :data:`Matched` per BN call.
:class:`Index` counts calls, attribute reads and registrations over one traced graph (Rule 5 of
:mod:`bnfold.fx.match`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.hints import EXAMPLE_INPUTS
from bnfold.records import Site, Skip, SkipReason

from .bnspec import BnSpec
from .layers import fetch_attr

__all__ = [
    "Candidate",
    "Matched",
    "Index",
    "functional_bn_args",
    "BN_FUNCS",
    "UNPROVEN_RANK",
    "UNPROVEN_BATCH",
    "layout_skip",
    "clone_detail",
]


@dataclass
class Candidate:
    """A BN call that can be folded, with what the rewrite needs.

    ``parts``: for a BN after a channel route (concat-split, branch-sum), ``(layer node, first channel, end, shift?)``
    per branch; ``layer_node`` is then the first branch. ``spec`` is the BN module's eval description (None for functional BN); ``repeat`` > 1 when a
    Flatten sits between the BN and a Linear (each channel covers ``repeat`` consecutive features).
    """

    site: Site
    bn_node: fx.Node
    layer_node: fx.Node
    needs_graph: bool
    graph_why: str = ""
    spec: BnSpec | None = None
    repeat: int = 1
    parts: list[tuple[fx.Node, int, int, bool]] | None = None


Matched = Union[Candidate, Skip]
"""One matcher verdict per BN call: a candidate that folds, or the reason it does not."""


BN_FUNCS = (F.batch_norm, torch.batch_norm)
_BN_FN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_FN_DEFAULTS: dict[str, Any] = {
    "weight": None,
    "bias": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
}


_TORCH_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
"""``torch.batch_norm``'s order (then ``cudnn_enabled``): the affine parameters before the statistics."""


def functional_bn_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ``F.batch_norm`` (or ``torch.batch_norm``) call by name."""
    out = dict(_BN_FN_DEFAULTS)
    names = _TORCH_BN_ARGS if node.target is torch.batch_norm else _BN_FN_ARGS
    for name, a in zip(names, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out


class Index:
    """Counts over one traced graph: calls per module, attribute reads, registrations."""

    def __init__(self, graph: fx.Graph, root: nn.Module, whole: nn.Module) -> None:
        self.root = root
        self.calls: Counter[str] = Counter()
        self.attr_targets: list[str] = []
        for n in graph.nodes:
            if n.op == "call_module":
                self.calls[str(n.target)] += 1
            elif n.op == "get_attr":
                self.attr_targets.append(str(n.target))
        self.registered: Counter[int] = Counter(id(m) for _, m in whole.named_modules(remove_duplicate=False))
        # A buffer read in forward (``self.bn.running_mean.view(...)``) is not proxied by fx: the
        # trace keeps it as a ``_tensor_constant`` get_attr that shares the buffer's storage.
        self.attr_storages: set[int] = set()
        for t in self.attr_targets:
            try:
                v = fetch_attr(root, t)
            except AttributeError:
                continue
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr():
                self.attr_storages.add(v.untyped_storage().data_ptr())

    def shared_why(self, target: str) -> str:
        """Why a module cannot be changed in place (Rule 5), "" when it can."""
        m = fetch_attr(self.root, target)
        if self.calls[target] > 1:
            return f"'{target}' is called at {self.calls[target]} places"
        if any(t == target or t.startswith(target + ".") for t in self.attr_targets):
            return f"a tensor of '{target}' is read directly in forward"
        if isinstance(m, nn.Module) and any(
            t.untyped_storage().data_ptr() in self.attr_storages
            for t in (*m.parameters(), *m.buffers())
            if t.untyped_storage().data_ptr()
        ):
            return f"a tensor of '{target}' is read directly in forward"
        if self.registered[id(m)] > 1:
            return f"'{target}' is registered under {self.registered[id(m)]} names"
        return ""


UNPROVEN_RANK = (
    "Linear acts on the last dim and BN on dim 1, the same axis only for 2-D (N, C) tensors, and "
    "nothing proves this one is 2-D"
)
"""The detail of a Linear/BN pair whose rank is unproven (its Skip carries :data:`bnfold.hints.EXAMPLE_INPUTS`)."""

UNPROVEN_BATCH = (
    "a Conv also takes unbatched (C, ...) input, whose channel axis is dim 0 and not the BN's dim 1, and "
    "nothing proves this one is batched"
)
"""The detail of a Conv/BN pair whose batch axis is unproven (its Skip carries :data:`bnfold.hints.EXAMPLE_INPUTS`)."""


def layout_skip(bn: str, why: str) -> Skip:
    """A LAYOUT refusal; an unproven rank or batch carries the hint that records the shapes."""
    hints = (EXAMPLE_INPUTS,) if why in (UNPROVEN_RANK, UNPROVEN_BATCH) else ()
    return Skip(bn, SkipReason.LAYOUT, why, hints=hints)


def clone_detail(why: str) -> str:
    return f"cloned: {why}" if why else ""
