"""Copies of an ``nn.Module``: a shadow to trace, and the result a fold is written into.

Rules:

1. :func:`copy_model` is ``copy.deepcopy`` with the same result: a module whose class copies the
   standard way (``nn.Module``'s ``__getstate__``, no ``__deepcopy__`` / ``__reduce_ex__`` of its own,
   nothing in ``copyreg``) is rebuilt as deepcopy rebuilds it (``cls.__new__``, the copied
   ``__dict__``, ``__setstate__``), but without deepcopy's round trip per value: booleans, numbers,
   strings, tuples of those and empty containers (the hook dicts) are taken or made directly, and
   everything else goes through ``copy.deepcopy`` with the one shared memo, so an object reachable
   twice is copied once. Any other class is copied by ``copy.deepcopy`` itself.
2. Tensors: with ``share_tensors`` every parameter, buffer and cached tensor is the caller's own
   object (a shadow for tracing, which reads them and never writes them); otherwise each is copied
   (``copy.deepcopy``: a new storage, ``requires_grad`` and Python attributes kept), except those in
   ``keep``: tensors the fold replaces right away, so the result never holds them (one that a
   Python attribute of a module also holds is copied all the same).
3. Tensors a forward cached in Python attributes (LeViT's attention-bias cache) may be non-leaf,
   which autograd refuses to deep-copy: they are copied detached.
"""

from __future__ import annotations

import copy
import copyreg
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["copy_model", "shadow"]

_ATOMS = (bool, int, float, complex, str, bytes, type(None))
_EMPTY = (OrderedDict, dict, set, list)
_STD_REDUCE = object.__reduce_ex__
_MODULE_GETSTATE = nn.Module.__getstate__


def _cached_tensors(obj: Any, out: list[torch.Tensor], depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            _cached_tensors(v, out, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple, set)):
        for v in obj:
            _cached_tensors(v, out, depth + 1)


def _standard(cls: type) -> bool:
    """Rule 1: deepcopy would rebuild an instance of ``cls`` from its ``__getstate__`` dict."""
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is _STD_REDUCE  # type: ignore[comparison-overlap]
        and cls.__reduce__ is object.__reduce__  # type: ignore[comparison-overlap]
        and getattr(cls, "__getstate__", None) is _MODULE_GETSTATE
        and cls not in copyreg.dispatch_table
        and not any("__slots__" in k.__dict__ for k in cls.__mro__ if k is not object)
    )


def _atomic(v: Any) -> bool:
    t = type(v)
    return t in _ATOMS or (t is tuple and all(type(x) in _ATOMS for x in v))


class _Copier:
    def __init__(self, memo: dict[int, Any], share: bool) -> None:
        self.memo = memo
        self.share = share
        self.standard: dict[type, bool] = {}

    def module(self, m: nn.Module) -> Any:
        got = self.memo.get(id(m))
        if got is not None:
            return got
        cls = type(m)
        ok = self.standard.get(cls)
        if ok is None:
            ok = self.standard[cls] = _standard(cls)
        if not ok:
            return copy.deepcopy(m, self.memo)
        new = cls.__new__(cls)
        self.memo[id(m)] = new
        # deepcopy keeps the original alive in the memo (it may be reached again by id)
        self.memo.setdefault(id(self.memo), []).append(m)
        state: dict[str, Any] = {}
        for k, v in m.__getstate__().items():  # type: ignore[no-untyped-call]
            if k == "_modules":
                state[k] = type(v)((n, None if c is None else self.module(c)) for n, c in v.items())
            elif k in ("_parameters", "_buffers"):
                state[k] = type(v)((n, None if t is None else self.tensor(t)) for n, t in v.items())
            elif _atomic(v):
                state[k] = v
            elif type(v) in _EMPTY and not v:
                state[k] = type(v)()
            else:
                state[k] = copy.deepcopy(v, self.memo)
        new.__setstate__(state)  # type: ignore[no-untyped-call]
        return new

    def tensor(self, t: torch.Tensor) -> Any:
        got = self.memo.get(id(t))
        if got is not None:
            return got
        if self.share:
            self.memo[id(t)] = t
            return t
        return copy.deepcopy(t, self.memo)


def copy_model(
    module: nn.Module, *, share_tensors: bool = False, keep: Sequence[torch.Tensor] = ()
) -> nn.Module:
    """``copy.deepcopy(module)`` (Rule 1) that shares tensors on request (Rule 2) and copes with
    tensors cached by a forward (Rule 3).

    Args:
        module: the model (not changed).
        share_tensors: parameters, buffers and cached tensors are shared, not copied (a shadow for
            tracing, which reads them and never writes them).
        keep: tensors shared, not copied (weights the fold replaces by new ones right after).

    Returns:
        The copy.
    """
    found: list[torch.Tensor] = []
    for m in module.modules():
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules") and not _atomic(v):
                _cached_tensors(v, found)
    # A kept tensor that a Python attribute also holds would stay in the copy: copy that one.
    cached = {id(t) for t in found}
    memo: dict[int, Any] = {id(t): t for t in keep if id(t) not in cached}
    for t in found:
        if id(t) not in memo and not t.is_leaf:
            memo[id(t)] = t.detach() if share_tensors else t.detach().clone()
        elif share_tensors:
            memo[id(t)] = t
    out: nn.Module = _Copier(memo, share_tensors).module(module)
    return out


def shadow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its tensors (tracing reads them, never writes them).

    Tracing runs the model's Python code, which may store fx ``Proxy`` objects in Python-side
    caches (LeViT's attention-bias cache) or set ``_tensor_constant`` attributes: on this copy, the
    caller's object stays as it was.
    """
    return copy_model(module, share_tensors=True)
