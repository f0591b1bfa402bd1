"""Every attribute of every module of a model, to show that folding or freezing left it as it was.

A ``state_dict`` comparison misses Python-side state (caches filled by forward, flags, lists of
tensors, attributes fx tracing may add); this records all of it, tensors by identity and value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["snapshot", "assert_unchanged"]


def _freeze(v: Any, depth: int = 0) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v.dtype, tuple(v.shape), v.detach().clone(), v.requires_grad)
    if isinstance(v, nn.Module):
        return ("module", id(v))
    if depth < 5 and isinstance(v, dict):
        return ("dict", tuple((k, _freeze(x, depth + 1)) for k, x in v.items()))
    if depth < 5 and isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_freeze(x, depth + 1) for x in v))
    if isinstance(v, (int, float, str, bool, type(None), torch.dtype, torch.device)):
        return ("value", v)
    return ("object", type(v).__qualname__, id(v))


def snapshot(model: nn.Module) -> dict[str, Any]:
    """``{module name: {attribute: frozen value}}`` over every module, params and buffers included."""
    out: dict[str, Any] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        attrs: dict[str, Any] = {"__class__": type(m)}
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules"):
                attrs[k] = tuple((n, _freeze(x)) for n, x in v.items())
            else:
                attrs[k] = _freeze(v)
        out[name] = attrs
    return out


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    """Fail, naming the first difference, unless ``model`` is exactly as ``before`` recorded it."""
    after = snapshot(model)
    assert before.keys() == after.keys(), f"modules changed: {set(before) ^ set(after)}"
    for name, attrs in before.items():
        now = after[name]
        assert attrs.keys() == now.keys(), f"'{name}': attributes changed: {set(attrs) ^ set(now)}"
        for k, v in attrs.items():
            assert _equal(v, now[k]), f"'{name}'.{k} changed"
    for m in model.modules():  # no fx Proxy left anywhere (a traced cache)
        for v in vars(m).values():
            items = v.values() if isinstance(v, dict) else [v]
            assert not any(type(x).__name__ in ("Proxy", "Attribute") for x in items)
