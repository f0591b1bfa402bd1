"""Drop constant channels of a folded PyTorch model, moving their constant into the next layer's bias.

A BN with gamma = 0 folds into a layer ``A`` whose output channel ``c`` has an all-zero weight slice:
that channel is the constant ``bias_A[c]`` at every position (a zero weight times any finite input is 0,
zero padding included). Through pointwise activations ``f`` it stays the constant ``k_c = f(bias_A[c])``.
When the next layer ``B`` reads it, its contribution to output ``o`` is::

    Linear:  W_B[o, c] * k_c
    Conv:    sum_{kernel} W_B[o, c, ...] * k_c      (every position, if no input position is padding)

so channel ``c`` can be removed from ``A`` (a row of ``W_A`` and ``b_A``) and from ``B`` (a column of
``W_B``) with that contribution added to ``b_B`` (float64, cast once).

Rules -- a pair ``A -> f* -> B`` is pruned only when all hold (otherwise it is left, with the reason):

1. ``A`` is ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (groups = 1), ``B`` is the same family (Linear ->
   Linear on the last axis, Conv -> Conv of the same rank on axis 1), both called exactly once, with
   weights used by no other module;
2. between them only pointwise modules/functions from :data:`POINTWISE` (ReLU, GELU, SiLU, ...), each
   read once: nothing else sees ``A``'s output;
3. ``B`` has no padding (``padding = 0`` or ``"valid"``) -- padded zeros are not the constant -- unless
   every ``k_c`` is 0, when the channel contributes nothing anywhere;
4. at least one channel of ``A`` is kept.

Exact for finite inputs (an infinite input makes ``0 * inf`` NaN in the original). The model is traced
with ``torch.fx`` to prove rule 2; a model that does not trace is left unchanged. The model given is
edited (call this on the folded copy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = ["POINTWISE", "PrunedChannels", "prune_constant_channels"]

log = logging.getLogger(__name__)

POINTWISE = (
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "ELU",
    "GELU",
    "SiLU",
    "Sigmoid",
    "Tanh",
    "Hardswish",
    "Hardsigmoid",
    "Mish",
    "Identity",
)
"""``torch.nn`` module classes that act on each element alone (also their ``torch``/``F`` functions)."""


@dataclass(frozen=True, slots=True)
class PrunedChannels:
    """Channels dropped from ``layer`` (and from ``next_layer``'s input), or why none were."""

    layer: str
    next_layer: str
    channels: tuple[int, ...]
    pruned: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "next_layer": self.next_layer,
            "channels": list(self.channels),
            "pruned": self.pruned,
            "detail": self.detail,
        }


def _pointwise_funcs() -> set[Any]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    return {
        torch.relu,
        F.relu,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.gelu,
        F.silu,
        torch.sigmoid,
        F.sigmoid,
        torch.tanh,
        F.tanh,
        F.hardswish,
        F.hardsigmoid,
        F.mish,
    }


def _is_pointwise(node: Any, root: Any, funcs: set[Any]) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)).__name__ in POINTWISE and type(
            root.get_submodule(node.target)
        ).__module__.startswith("torch.nn")
    if node.op == "call_function":
        return node.target in funcs and all(not hasattr(a, "op") for a in node.args[1:])
    if node.op == "call_method":
        return node.target in ("relu", "sigmoid", "tanh") and len(node.args) == 1
    return False


def _apply_pointwise(node: Any, root: Any, x: Any) -> Any:
    import torch

    if node.op == "call_module":
        return root.get_submodule(node.target)(x)
    if node.op == "call_function":
        kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        return node.target(x, *node.args[1:], **kwargs)
    return getattr(torch, node.target)(x)


def _family(m: Any) -> str | None:
    from torch import nn

    # Exact classes: a subclass may override forward; a module with hooks may change its output.
    if m._forward_hooks or m._forward_pre_hooks:
        return None
    if type(m) is nn.Linear:
        return "linear"
    if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.groups == 1:
        return f"conv{m.weight.dim() - 2}d"
    return None


def _no_padding(m: Any) -> bool:
    from torch import nn

    if isinstance(m, nn.Linear):
        return True
    if isinstance(m.padding, str):
        return m.padding == "valid"
    return all(int(p) == 0 for p in m.padding)


def prune_constant_channels(model: Any) -> list[PrunedChannels]:
    """Drop the constant channels of ``model`` (edited in place) where that is exact (module docstring).

    Returns:
        One record per layer with constant channels: pruned, or left with the reason.
    """
    import torch
    from torch import fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - a model that does not trace is left as it is
        log.debug("prune: symbolic_trace failed: %s", e)
        return []
    funcs = _pointwise_funcs()
    # Calls per module object (one module may be registered under two names), and the parameters
    # read directly (``F.linear(x, self.fc.weight)``): pruning would change what those see.
    calls: dict[int, int] = {}
    read_attrs: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "call_module":
            key = id(model.get_submodule(n.target))
            calls[key] = calls.get(key, 0) + 1
        elif n.op == "get_attr":
            read_attrs.add(str(n.target).rsplit(".", 1)[0])
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    out: list[PrunedChannels] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        a = model.get_submodule(node.target)
        fam = _family(a)
        if fam is None:
            continue
        with torch.no_grad():
            w = a.weight.detach()
            zero = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
        channels = tuple(int(i) for i in torch.nonzero(zero).flatten())
        if not channels:
            continue

        def left(b_name: str, why: str, name: str = node.target, ch: tuple[int, ...] = channels) -> None:
            out.append(PrunedChannels(name, b_name, ch, False, why))

        if len(channels) == w.shape[0]:
            left("", "every channel is constant: at least one is kept")
            continue
        if calls.get(id(a), 0) != 1 or node.target in read_attrs:
            left("", "the layer is called at several places, or its weights are read directly")
            continue
        chain, cur = [], node
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.args and user.args[0] is cur and _is_pointwise(user, model, funcs):
                chain.append(user)
                cur = user
                continue
            break
        users = list(cur.users)
        if len(users) != 1:
            left("", "its output (or an activation of it) is read by more than one node")
            continue
        bn_ = users[0]
        b = model.get_submodule(bn_.target) if bn_.op == "call_module" else None
        b_name = str(bn_.target) if b is not None else bn_.name
        if b is None or _family(b) != fam or len(bn_.args) != 1 or bn_.kwargs or bn_.args[0] is not cur:
            left(b_name, "the next reader is not a Linear/Conv of the same kind (groups = 1) taking it alone")
            continue
        if calls.get(id(b), 0) != 1 or b_name in read_attrs:
            left(b_name, "the next layer is called at several places, or its weights are read directly")
            continue
        if any(owners.get(id(p), 0) != 1 for p in (a.weight, a.bias, b.weight, b.bias) if p is not None):
            left(b_name, "a weight is shared with another module")
            continue
        idx = torch.tensor(channels)
        with torch.no_grad():
            base = a.bias.detach()[idx] if a.bias is not None else torch.zeros(len(channels), dtype=w.dtype)
            shape = (1, len(channels)) if fam == "linear" else (1, len(channels), *([1] * (w.dim() - 2)))
            k = base.reshape(shape).clone()
            for step in chain:
                k = _apply_pointwise(step, model, k)
            k64 = k.reshape(-1).double()
        if not bool(torch.isfinite(k64).all()):
            left(b_name, "the constant is not finite")
            continue
        if not _no_padding(b) and bool((k64 != 0).any()):
            left(b_name, "the next conv pads with zeros, which are not the constant")
            continue
        _prune(a, b, channels, k64)
        # _prune puts new Parameters on both layers: record them as singly owned, or a later layer
        # pruned against these would be refused as "shared" depending on whether a freed id got reused.
        for p in (a.weight, a.bias, b.weight, b.bias):
            if p is not None:
                owners[id(p)] = 1
        out.append(
            PrunedChannels(node.target, b_name, channels, True, f"{len(chain)} pointwise op(s) between")
        )
    return out


def _prune(a: Any, b: Any, channels: tuple[int, ...], k64: Any) -> None:
    import torch
    from torch import nn

    n_out = a.weight.shape[0]
    drop = set(channels)
    keep = torch.tensor([i for i in range(n_out) if i not in drop])
    idx = torch.tensor(channels)
    with torch.no_grad():
        wb = b.weight.detach().double()
        cols = wb[:, idx].reshape(wb.shape[0], len(channels), -1).sum(dim=2)  # sum over the kernel
        delta = cols @ k64
        bias64 = (
            b.bias.detach().double() if b.bias is not None else torch.zeros(wb.shape[0], dtype=torch.float64)
        )
        new_bias = (bias64 + delta).to(b.weight.dtype)
        new_wb = b.weight.detach()[:, keep].clone()
        new_wa = a.weight.detach()[keep].clone()
        new_ba = a.bias.detach()[keep].clone() if a.bias is not None else None
    a.weight = nn.Parameter(new_wa, requires_grad=a.weight.requires_grad)
    if new_ba is not None:
        a.bias = nn.Parameter(new_ba, requires_grad=a.bias.requires_grad)
    b.weight = nn.Parameter(new_wb, requires_grad=b.weight.requires_grad)
    b.bias = nn.Parameter(new_bias, requires_grad=b.weight.requires_grad)
    if isinstance(a, nn.Linear):
        a.out_features, b.in_features = len(keep), len(keep)
    else:
        a.out_channels, b.in_channels = len(keep), len(keep)
