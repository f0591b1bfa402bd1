"""Apply a :class:`~bnfold.fx.plan.Plan` (the matcher's sites with their new tensors) to a model the
caller already copied. Nothing here decides: eligibility is :mod:`bnfold.fx.match`'s, numbers and
refusals are :mod:`bnfold.fx.plan`'s.

Two ways to apply:

* module mode: the layer's ``weight``/``bias`` become new ``nn.Parameter`` s and the BN module is
  replaced by its tail or ``nn.Identity()`` in its parent: the model keeps its class and its own
  ``forward``.
* graph mode (a ``torch.fx.GraphModule``): each folded BN node is removed (its users read its input);
  a layer module called at several places is cloned per folded call site (``conv__bnfold1``), so the
  shared module keeps its weights for the other calls::

      Before:  x -> conv -> bn1 -> ...       y -> conv -> bn2 -> ...
      After:   x -> conv__bnfold1 -> ...     y -> conv__bnfold2 -> ...   (conv itself unchanged)
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .layers import fetch_attr
from .plan import Plan
from .sites import Candidate

__all__ = ["apply_module_mode", "apply_graph_mode", "replace_module", "tail_of"]


def _set_layer(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> None:
    w0: torch.Tensor = layer.weight  # type: ignore[assignment]
    b0 = layer.bias  # each parameter keeps its own requires_grad (a frozen bias stays frozen)
    layer.weight = nn.Parameter(w, requires_grad=w0.requires_grad)
    layer.bias = nn.Parameter(b, requires_grad=w0.requires_grad if b0 is None else bool(b0.requires_grad))


def replace_module(root: nn.Module, target: str, new: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def tail_of(root: nn.Module, c: Candidate) -> nn.Module:
    """What replaces a folded BN module: its tail (activation, dropout...) or ``nn.Identity()``."""
    if c.spec is None or not c.spec.has_tail:
        return nn.Identity()
    tail = c.spec.make_tail(fetch_attr(root, str(c.bn_node.target)))
    return nn.Identity() if tail is None else tail


def apply_module_mode(root: nn.Module, plan: Plan) -> None:
    """Write the folded weights into the layers and put its tail or ``nn.Identity()`` in place of each BN.

    ``root`` is the module the plan was made on, or a copy of it with the same module names.
    """
    for node, (w, b) in plan.writes.items():
        _set_layer(fetch_attr(root, str(node.target)), w, b)
    for c in plan.folds:
        replace_module(root, str(c.bn_node.target), tail_of(root, c))


def apply_graph_mode(gm: fx.GraphModule, plan: Plan) -> None:
    """Fold in a GraphModule built on the plan's graph: clone shared layers per call site, drop the BN nodes."""
    clone_targets = {str(c.layer_node.target) for c in plan.folds if c.site.detail.startswith("cloned:")}
    counter = 0
    for node, (w, b) in plan.writes.items():
        target = str(node.target)
        layer = fetch_attr(gm, target)
        if target in clone_targets:
            counter += 1
            new_name = f"{target}__bnfold{counter}"
            while _has_attr(gm, new_name):
                counter += 1
                new_name = f"{target}__bnfold{counter}"
            layer = copy.deepcopy(layer)
            gm.add_submodule(new_name, layer)
            node.target = new_name
        _set_layer(layer, w, b)
    bn_targets: set[str] = set()
    for c in plan.folds:
        bn = c.bn_node
        if bn.op == "call_module" and c.spec is not None and c.spec.has_tail:
            # Keep the call, pointed at the BN's tail (the BN module itself may serve other calls).
            target = str(bn.target)
            new_name = f"{target}__bnfold_tail"
            k = 0
            while _has_attr(gm, new_name):
                k += 1
                new_name = f"{target}__bnfold_tail{k}"
            gm.add_submodule(new_name, tail_of(gm, c))
            bn.target = new_name
            bn_targets.add(target)
            continue
        bn.replace_all_uses_with(bn.args[0])  # type: ignore[arg-type]
        attr_inputs = [n for n in bn.all_input_nodes if n.op == "get_attr"]
        gm.graph.erase_node(bn)
        for n in attr_inputs:
            if not n.users:
                gm.graph.erase_node(n)
        if bn.op == "call_module":
            bn_targets.add(str(bn.target))
    still_called = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for t in bn_targets:
        if t not in still_called and not any(s.startswith(t + ".") for s in still_called):
            gm.delete_submodule(t)
    gm.graph.lint()
    gm.recompile()


def _has_attr(root: nn.Module, target: str) -> bool:
    try:
        fetch_attr(root, target)
    except AttributeError:
        return False
    return True
