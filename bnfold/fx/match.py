"""One verdict per BatchNorm in a ``torch.fx`` graph: a :class:`~bnfold.records.Site` or a
:class:`~bnfold.records.Skip`.

Rules 1 and 5 (cited as "Rule n") say what a BN is and when a layer may change; the others are fold
patterns, cited by their id in :data:`bnfold.patterns.CATALOGUE` (the ids of the ONNX matcher):

1. A BN is a call of a BN-like module whose eval map :func:`bnfold.fx.custom.describe_bn` knows
   (plain torch/bnfold BatchNorm and SyncBatchNorm, a ``bnfold.nn.FrozenBatchNorm``, a subclass whose
   traced forward is "``F.batch_norm`` with its own statistics, then ops on that output only" -- the
   *tail*, kept in place of the BN -- or a class declared with ``register_bn_like``), or a call of
   ``F.batch_norm`` whose statistics and affine parameters are attributes of the model and
   ``training=False``. Anything else, or hooks: ``CUSTOM_BN`` with the reason; no running
   statistics: ``NO_RUNNING_STATS``. A BN with a tail never folds backward (it cannot move past
   its activation).
``conv-bn``, ``gemm-bn``:
   Forward fold (layer -> BN): the BN input is, through eval no-ops (Identity, Dropout,
   ``dropout(training=False)``, ``contiguous``), a call of a plain Conv1d/2d/3d, ConvTranspose1d/2d/3d
   or Linear module (``forward`` not overridden, no hooks, not parametrized), or of a Conv subclass
   that changes only its input (timm's ``Conv2dSame``, proved by
   :func:`bnfold.fx.convs.input_side_conv`), whose output has exactly this one value user
   (``OTHER_CONSUMERS`` otherwise: a residual tap needs the unscaled value; reads of its shape only,
   as ``reshape_as(x)``, do not count). A flatten on the way is allowed when it keeps the layer's
   channel axis at dim 1: ``flatten(2)`` after a conv, ``flatten(0, -2)`` after a Linear on tokens
   (LeViT's LinearNorm, ``linear-norm``).
``bn-conv``, ``bn-gemm``, ``bn-flatten-gemm``:
   Backward fold (BN -> layer): through eval no-ops and at most one ``flatten(1, -1)``, the BN output
   has exactly one user, a plain Conv or Linear that reads it as its input; after the flatten each
   channel covers ``in_features / C`` consecutive features. A Conv that pads with zeros is refused
   (``PADDING``: the padded zeros would not be shifted), as is one that pads at run time;
   ``padding_mode`` reflect/replicate/circular copies BN outputs and stays exact. ConvTranspose
   cannot absorb an input shift (``UNSUPPORTED_LAYER``).
``gemm-bn``, ``bn-gemm``, ``linear-norm``:
   Linear acts on the last dim and BN on dim 1: they meet only when the tensor between them is 2-D
   ``(N, C)``. The rank is read from recorded shapes (``ShapeProp`` with example inputs) or from the
   graph (:func:`rank_of`: BatchNorm2d/3d inputs, flatten, view/reshape sizes, reductions, ...).
   Another rank: ``LAYOUT``. Unknown rank (an MLP whose first Linear reads the model input, with no
   example inputs given): also ``LAYOUT`` -- a fold that is exact only for some input ranks is not a
   fold; the detail says to pass ``example_inputs``.
5. A layer module called at several places, read as an attribute in ``forward``, or registered
   under several names, is folded per call site on a clone (``needs_graph``: only a GraphModule
   can call a clone); the same holds for a BN module called at several places and for functional BN.
``concat-split``, ``branch-sum``:
   Channel routes: a BN on ``torch.cat([...], dim=1)`` of layer outputs is split per slice, each
   slice folded into its producer; a BN on a sum of layer outputs scales every branch and puts the
   shift into the first branch's bias. Every branch must be a Conv-kind layer (not Linear: its
   channel axis is last) whose output is read nowhere else, called once (``OTHER_CONSUMERS`` /
   ``SHARED_MODULE`` otherwise); any other input (an identity branch) leaves the BN.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from torch import fx, nn

from bnfold.records import Site, Skip, SkipReason

from .bnspec import BnSpec
from .custom import describe_bn
from .layers import (
    fetch_attr,
    is_bn_module,
    spec_skip,
)
from .match_backward import match_backward
from .match_forward import match_forward
from .shapes import record_ranks
from .sites import BN_FUNCS, Index, Matched, functional_bn_args

__all__ = [
    "find_sites",
    "match_bn",
    "is_bn_node",
]


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
            why = (SkipReason.CUSTOM_BN, f"'{name}' is called with more than one input", ())
        if why is not None or not isinstance(spec, BnSpec):
            assert why is not None
            return name, None, Skip(name, why[0], why[1], hints=why[2]), None
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
    eps = a["eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return (
            name,
            None,
            Skip(name, SkipReason.NON_CONSTANT, "F.batch_norm's eps is computed at run time"),
            None,
        )
    if a["training"] is not False:
        return (
            name,
            None,
            Skip(name, SkipReason.TRAINING_MODE, "F.batch_norm is called with training=True"),
            None,
        )
    mean = fetch_attr(root, str(a["running_mean"].target))
    return name, int(mean.numel()), None, None


def is_bn_node(node: fx.Node, root: nn.Module) -> bool:
    """True for a call of a BN module or of ``F.batch_norm``."""
    if node.op == "call_module":
        return is_bn_module(fetch_attr(root, str(node.target)))
    return node.op == "call_function" and node.target in BN_FUNCS


def find_sites(
    graph: fx.Graph, root: nn.Module, whole: nn.Module | None = None, prefix: str = ""
) -> list[Matched]:
    """One verdict per BN call in ``graph`` (traced from ``root``), in graph order; never edits it.

    Args:
        graph: a graph traced with :class:`Tracer` from ``root``.
        root: the module the graph was traced from.
        whole: the whole model ``root`` belongs to (for registration counts); default ``root``.
        prefix: qualified name of ``root`` inside ``whole`` (for the names in the verdicts).

    Returns:
        A :class:`~bnfold.fx.sites.Candidate` (which layer call absorbs the BN, and whether only a
        GraphModule can express it) or a ``Skip`` with the reason, per BN call.
    """
    idx = Index(graph, root, whole if whole is not None else root)
    record_ranks(graph, root)
    seen_bn: Counter[str] = Counter()
    specs: dict[int, BnSpec | str] = {}
    out: list[Matched] = []
    for node in graph.nodes:
        if is_bn_node(node, root):
            out.append(match_bn(node, root, idx, prefix, seen_bn, specs))
    return out


def match_bn(
    node: fx.Node,
    root: nn.Module,
    idx: Index,
    prefix: str,
    seen_bn: Counter[str],
    specs: dict[int, BnSpec | str],
) -> Matched:
    """The verdict for one BN call (the counterpart of :func:`bnfold.onnx.match.match_bn`).

    Rule 1 first (what the BN computes), then the forward patterns, then the backward
    patterns when nothing before the BN folds. ``seen_bn`` counts calls per BN module (a
    second call is shown as ``name#2``); ``specs`` caches :func:`describe_bn` per module.
    """

    def q(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    name, nf, skip, spec = _bn_info(node, root, specs)
    seen_bn[name] += 1
    shown = q(name) if seen_bn[name] == 1 else f"{q(name)}#{seen_bn[name]}"
    if skip is not None:
        return replace(skip, bn=shown, pattern=None)
    if node.op == "call_function":
        bn_graph_why = "functional F.batch_norm is removed from the graph"
    else:
        bn_graph_why = idx.shared_why(name)
    src = node.args[0] if node.args else None
    ranks = spec.ranks if spec is not None else None
    verdict, cand = match_forward(node, src, root, idx, shown, nf, bn_graph_why, q, ranks)
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
            bverdict, bcand = match_backward(node, root, idx, shown, nf, bn_graph_why, q, ranks)
            if bcand is not None or (verdict.reason is SkipReason.NO_PRODUCER and bverdict is not None):
                verdict, cand = bverdict, bcand  # type: ignore[assignment]
    if cand is None:
        return verdict
    cand.spec = spec
    if spec is not None and spec.has_tail:
        cand.site = Site(
            cand.site.bn,
            cand.site.target,
            cand.site.target_kind,
            cand.site.direction,
            "; ".join(d for d in (cand.site.detail, "its activation/dropout kept") if d),
            cand.site.pattern,
        )
    return cand
