"""One verdict per BatchNorm in a ``torch.fx`` graph: a :class:`~bnfold.records.Site` or a
:class:`~bnfold.records.Skip`.

Rules (cited in the code as "Rule n"):

1. A BN is a call of a BN-like module whose eval map :func:`bnfold.fx.custom.describe_bn` knows
   (plain torch/bnfold BatchNorm and SyncBatchNorm, a ``bnfold.nn.FrozenBatchNorm``, a subclass whose
   traced forward is "``F.batch_norm`` with its own statistics, then ops on that output only" -- the
   *tail*, kept in place of the BN -- or a class declared with ``register_bn_like``), or a call of
   ``F.batch_norm`` whose statistics and affine parameters are attributes of the model and
   ``training=False``. Anything else, or hooks: ``CUSTOM_BN`` with the reason; no running
   statistics: ``NO_RUNNING_STATS``. A BN with a tail never folds backward (it cannot move past
   its activation).
2. Forward fold (layer -> BN): the BN input is, through eval no-ops (Identity, Dropout,
   ``dropout(training=False)``, ``contiguous``), a call of a plain Conv1d/2d/3d, ConvTranspose1d/2d/3d
   or Linear module (``forward`` not overridden, no hooks, not parametrized), or of a Conv subclass
   that changes only its input (timm's ``Conv2dSame``, proved by
   :func:`bnfold.fx.convs.input_side_conv`), whose output has exactly this one value user
   (``OTHER_CONSUMERS`` otherwise: a residual tap needs the unscaled value; reads of its shape only,
   as ``reshape_as(x)``, do not count). A flatten on the way is allowed when it keeps the layer's
   channel axis at dim 1: ``flatten(2)`` after a conv, ``flatten(0, -2)`` after a Linear on tokens
   (LeViT's LinearNorm, Rule 4).
3. Backward fold (BN -> layer): through eval no-ops and at most one ``flatten(1, -1)``, the BN output
   has exactly one user, a plain Conv or Linear that reads it as its input; after the flatten each
   channel covers ``in_features / C`` consecutive features. A Conv that pads with zeros is refused
   (``PADDING``: the padded zeros would not be shifted), as is one that pads at run time;
   ``padding_mode`` reflect/replicate/circular copies BN outputs and stays exact. ConvTranspose
   cannot absorb an input shift (``UNSUPPORTED_LAYER``).
4. Linear acts on the last dim and BN on dim 1: they meet only when the tensor between them is 2-D
   ``(N, C)``. The rank is read from recorded shapes (``ShapeProp`` with example inputs) or from the
   graph (:func:`rank_of`: BatchNorm2d/3d inputs, flatten, view/reshape sizes, reductions, ...).
   Another rank: ``LAYOUT``. Unknown rank (an MLP whose first Linear reads the model input, with no
   example inputs given): also ``LAYOUT`` -- a fold that is exact only for some input ranks is not a
   fold; the detail says to pass ``example_inputs``.
5. A layer module called at several places, read as an attribute in ``forward``, or registered
   under several names, is folded per call site on a clone (``needs_graph``: only a GraphModule
   can call a clone); the same holds for a BN module called at several places and for functional BN.
6. Channel routes: a BN on ``torch.cat([...], dim=1)`` of layer outputs is split per slice, each
   slice folded into its producer; a BN on a sum of layer outputs scales every branch and puts the
   shift into the first branch's bias. Every branch must be a Conv-kind layer (not Linear: its
   channel axis is last) whose output is read nowhere else, called once (``OTHER_CONSUMERS`` /
   ``SHARED_MODULE`` otherwise); any other input (an identity branch) leaves the BN.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.records import Direction, Site, Skip, SkipReason, Verdict

from .convs import input_side_conv
from .custom import BnSpec, describe_bn
from .layers import (
    CONV_TYPES,
    CONVT_TYPES,
    LAYER_TYPES,
    Tracer,
    bn_module_skip,
    fetch_attr,
    forward_layer_kind,
    is_bn_module,
    is_frozen_bn,
    layer_kind,
    spec_skip,
)
from .shapes import flatten_dims, flatten_to_2d, is_noop, rank_of, record_ranks, value_users

__all__ = [
    "Candidate",
    "Tracer",
    "find_sites",
    "layer_kind",
    "bn_module_skip",
    "is_bn_module",
    "is_frozen_bn",
    "fetch_attr",
    "CONV_TYPES",
    "CONVT_TYPES",
]


@dataclass
class Candidate:
    """A BN call that can be folded, with what the rewrite needs.

    ``parts``: for a BN after a channel route (Rule 6), ``(layer node, first channel, end, shift?)``
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


_BN_FUNCS = (F.batch_norm,)
_BN_FN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_FN_DEFAULTS: dict[str, Any] = {
    "weight": None,
    "bias": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
}


def functional_bn_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ``F.batch_norm`` call by name."""
    out = dict(_BN_FN_DEFAULTS)
    for name, a in zip(_BN_FN_ARGS, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out



def _zero_padding(conv: Any) -> bool:
    """True when the conv reads no padded zeros (Rule 3)."""
    if conv.padding_mode != "zeros":
        return True
    pad = conv.padding
    if isinstance(pad, str):
        return pad == "valid" or all(p == 0 for p in conv._reversed_padding_repeated_twice)
    return all(int(p) == 0 for p in pad)


class _Index:
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


def _bn_info(
    node: fx.Node, root: nn.Module, specs: dict[int, BnSpec | str]
) -> tuple[str, int | None, Skip | None, BnSpec | None]:
    """(display name, num_features, skip, spec) for a BN node (Rule 1)."""
    if node.op == "call_module":
        name = str(node.target)
        m = fetch_attr(root, name)
        if id(m) not in specs:
            specs[id(m)] = describe_bn(m)
        spec = specs[id(m)]
        why = spec_skip(spec)
        if why is None and (len(node.args) != 1 or node.kwargs):
            why = (SkipReason.CUSTOM_BN, f"'{name}' is called with more than one input")
        if why is not None or not isinstance(spec, BnSpec):
            assert why is not None
            return name, None, Skip(name, why[0], why[1]), None
        return name, spec.num_features, None, spec
    name = node.name
    a = functional_bn_args(node)
    for key in ("running_mean", "running_var", "weight", "bias"):
        v = a[key]
        if v is None and key in ("weight", "bias"):
            continue
        if not (isinstance(v, fx.Node) and v.op == "get_attr"):
            return (
                name,
                None,
                Skip(name, SkipReason.NON_CONSTANT, f"F.batch_norm's {key} is not a model attribute"),
                None,
            )
    if a["training"] is not False:
        return name, None, Skip(name, SkipReason.TRAINING_MODE, "F.batch_norm is called with training=True"), None
    mean = fetch_attr(root, str(a["running_mean"].target))
    return name, int(mean.numel()), None, None


def is_bn_node(node: fx.Node, root: nn.Module) -> bool:
    """True for a call of a BN module or of ``F.batch_norm``."""
    if node.op == "call_module":
        return is_bn_module(fetch_attr(root, str(node.target)))
    return node.op == "call_function" and node.target in _BN_FUNCS


def _sole_input_user(layer_node: fx.Node, bn_node: fx.Node) -> bool:
    """True when the layer's one and only input is the BN output."""
    return len(layer_node.args) == 1 and not layer_node.kwargs and layer_node.args[0] is bn_node


def find_sites(
    graph: fx.Graph, root: nn.Module, whole: nn.Module | None = None, prefix: str = ""
) -> tuple[list[Verdict], list[Candidate]]:
    """One verdict per BN call in ``graph`` (traced from ``root``), and the candidates behind the sites.

    Args:
        graph: a graph traced with :class:`Tracer` from ``root``.
        root: the module the graph was traced from.
        whole: the whole model ``root`` belongs to (for registration counts); default ``root``.
        prefix: qualified name of ``root`` inside ``whole`` (for the names in the verdicts).

    Returns:
        ``(verdicts, candidates)``; every Site in ``verdicts`` has one candidate.
    """
    idx = _Index(graph, root, whole if whole is not None else root)
    record_ranks(graph, root)
    verdicts: list[Verdict] = []
    cands: list[Candidate] = []
    seen_bn: Counter[str] = Counter()
    specs: dict[int, BnSpec | str] = {}

    def q(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    for node in graph.nodes:
        if not is_bn_node(node, root):
            continue
        name, nf, skip, spec = _bn_info(node, root, specs)
        seen_bn[name] += 1
        shown = q(name) if seen_bn[name] == 1 else f"{q(name)}#{seen_bn[name]}"
        if skip is not None:
            verdicts.append(Skip(shown, skip.reason, skip.detail))
            continue
        bn_graph_why = ""
        if node.op == "call_function":
            bn_graph_why = "functional F.batch_norm is removed from the graph"
        else:
            bn_graph_why = idx.shared_why(name)
        src = node.args[0] if node.args else None
        verdict, cand = _forward(node, src, root, idx, shown, nf, bn_graph_why, q)
        if cand is None:
            if spec is not None and spec.has_tail:
                # Rule 1: layer(tail(bn(x))) -- the BN cannot move past its own activation.
                if verdict.reason is SkipReason.NO_PRODUCER:
                    verdict = Skip(
                        shown,
                        SkipReason.NO_PRODUCER,
                        f"nothing foldable before it, and its own {type(fetch_attr(root, name)).__name__} "
                        "post-processing (activation/dropout) keeps it from folding into the next layer",
                    )
            else:
                bverdict, bcand = _backward(node, root, idx, shown, nf, bn_graph_why, q)
                if bcand is not None or (verdict.reason is SkipReason.NO_PRODUCER and bverdict is not None):
                    verdict, cand = bverdict, bcand  # type: ignore[assignment]
        if cand is not None:
            cand.spec = spec
            if spec is not None and spec.has_tail:
                cand.site = Site(
                    cand.site.bn, cand.site.target, cand.site.target_kind, cand.site.direction,
                    "; ".join(d for d in (cand.site.detail, "its activation/dropout kept") if d),
                )
        verdicts.append(cand.site if cand is not None else verdict)
        if cand is not None:
            cands.append(cand)
    return verdicts, cands


def _walk_back(src: Any, root: nn.Module) -> tuple[Any, tuple[Any, Any] | None, str]:
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


def _forward(
    node: fx.Node, src: Any, root: nn.Module, idx: _Index, shown: str, nf: int | None, bn_why: str, q: Any
) -> tuple[Skip, Candidate | None]:
    none = Skip(shown, SkipReason.NO_PRODUCER, "its input is not a Conv/ConvTranspose/Linear module output")
    src, fl, why_not = _walk_back(src, root)
    if not isinstance(src, fx.Node):
        return none, None
    if src.op != "call_module" and not (fl is None and _route(src) is not None):
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
    if fl is None and _route(src) is not None:
        return _forward_route(node, src, root, idx, shown, nf, bn_why, q)
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
    # Rule 2: a residual tap (or a graph output) needs the unscaled value.
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
            # Rule 4: Linear on (B, N, C) -> flatten(0, -2) -> BN1d on (B*N, C): C stays the BN channel.
            start, end = fl
            if rank is None and end != -2:
                return Skip(shown, SkipReason.LAYOUT, _UNPROVEN_RANK), None
            if not (start == 0 and (end == -2 or (rank is not None and end == rank - 2))):
                return Skip(
                    shown, SkipReason.LAYOUT, f"flatten({start}, {end}) moves the Linear's output axis off dim 1"
                ), None
            rank = 2
            via = "through flatten to (tokens, channels)"
        if rank is None:  # Rule 4: not proven
            return Skip(shown, SkipReason.LAYOUT, _UNPROVEN_RANK), None
        if rank != 2:  # Rule 4
            return (
                Skip(
                    shown,
                    SkipReason.LAYOUT,
                    f"Linear acts on the last dim and BN on dim 1: not the same axis on a {rank}-D tensor",
                ),
                None,
            )
    elif fl is not None:
        start = fl[0]
        if not (isinstance(start, int) and start >= 2):  # flatten(2) of (N, C, H, W) keeps C at dim 1
            return Skip(shown, SkipReason.LAYOUT, f"flatten{fl} moves the layer's channel axis off dim 1"), None
        via = "through a spatial flatten"
    why = idx.shared_why(target)
    detail = "; ".join(d for d in (_detail(why), note, via) if d)
    site = Site(shown, q(target), kind, Direction.FORWARD, detail)
    both = "; ".join(w for w in (why, bn_why) if w)
    return none, Candidate(site, node, src, bool(both), both)


def _route(n: fx.Node) -> str | None:
    """"cat" for ``torch.cat(list, dim=1)``, "sum" for ``a + b`` (torch.add without alpha), else None."""
    if n.op != "call_function":
        return None
    if n.target is torch.cat:
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        ok = isinstance(n.args[0], (list, tuple)) and dim == 1 and not (set(n.kwargs) - {"dim"})
        return "cat" if ok else None
    if n.target in (operator.add, torch.add) and len(n.args) == 2 and not n.kwargs:
        return "sum" if all(isinstance(a, fx.Node) for a in n.args) else None
    return None


def _sum_leaves(n: fx.Node, top: bool = True) -> list[Any] | None:
    """The branches of a tree of ``+`` whose inner sums are read only by the tree."""
    if _route(n) != "sum" or (not top and len(value_users(n)) != 1):
        return [n]
    out: list[Any] = []
    for a in n.args:
        sub = _sum_leaves(a, False) if isinstance(a, fx.Node) else None
        if sub is None:
            return None
        out.extend(sub)
    return out


def _forward_route(
    node: fx.Node, src: fx.Node, root: nn.Module, idx: _Index, shown: str, nf: int | None, bn_why: str, q: Any
) -> tuple[Skip, Candidate | None]:
    """Rule 6: BN on ``cat`` of layer outputs (a slice per layer) or on a sum of layer outputs."""
    how = _route(src)
    leaves = list(src.args[0]) if how == "cat" else _sum_leaves(src)  # type: ignore[arg-type]
    none = Skip(shown, SkipReason.NO_PRODUCER, f"its input is a {how} whose inputs are not all foldable layer outputs")
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
            return Skip(shown, SkipReason.OTHER_CONSUMERS, f"the output of '{q(target)}' is also read elsewhere"), None
        why = idx.shared_why(target)
        if why:
            return Skip(shown, SkipReason.SHARED_MODULE, f"{why}: a routed fold needs each branch's own layer"), None
        ch = int(layer.out_channels)
        if how == "cat":
            parts.append((leaf, lo, lo + ch, True))
            lo += ch
        else:
            if nf is not None and ch != nf:
                return Skip(shown, SkipReason.LAYOUT, f"{ch} channels in '{q(target)}' for {nf} BN features"), None
            parts.append((leaf, 0, ch, i == 0))
        names.append(q(target))
        kinds.add(kind)
    if how == "cat" and nf is not None and lo != nf:
        return Skip(shown, SkipReason.LAYOUT, f"the concatenation has {lo} channels for {nf} BN features"), None
    detail = f"{'split per concatenated input' if how == 'cat' else 'scaled per summed branch'}: {', '.join(names)}"
    site = Site(shown, names[0], "+".join(sorted(kinds)), Direction.FORWARD, detail)
    cand = Candidate(site, node, parts[0][0], bool(bn_why), bn_why, parts=parts)
    return none, cand


_UNPROVEN_RANK = (
    "Linear acts on the last dim and BN on dim 1, the same axis only for 2-D (N, C) tensors, and "
    "nothing proves this one is 2-D: pass example_inputs=(x,) to bnfold.fold to record the shapes"
)


def _detail(why: str) -> str:
    return f"cloned: {why}" if why else ""


def _backward(
    node: fx.Node, root: nn.Module, idx: _Index, shown: str, nf: int | None, bn_why: str, q: Any
) -> tuple[Skip | None, Candidate | None]:
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
            return Skip(shown, SkipReason.LAYOUT, f"{in_ch} features after the flatten for {nf} BN channels"), None
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
    if not flat:
        rank = rank_of(node.args[0], root) if kind == "Linear" else 2
        if rank is None:  # Rule 4: not proven
            return Skip(shown, SkipReason.LAYOUT, _UNPROVEN_RANK), None
        if rank != 2:  # Rule 4
            return Skip(
                shown, SkipReason.LAYOUT, f"BN -> Linear is exact only on a 2-D tensor, not {rank}-D"
            ), None
    why = idx.shared_why(target)
    via = f"through flatten: each channel covers {repeat} features" if flat else ""
    site = Site(shown, q(target), kind, Direction.BACKWARD, "; ".join(d for d in (_detail(why), via) if d))
    both = "; ".join(w for w in (why, bn_why) if w)
    return None, Candidate(site, node, u, bool(both), both, repeat=repeat)
