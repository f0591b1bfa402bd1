"""Swap torch's BatchNorm layers for bnfold's and back, keeping the state.

Mapping (exact types only; subclasses and lazy layers are left as they are)::

    torch.nn.BatchNorm1d/2d/3d   <->  bnfold.nn.BatchNorm1d/2d/3d
    torch.nn.SyncBatchNorm       <->  bnfold.nn.SyncBatchNorm   (process_group kept)

The new layer takes over the old one's parameter and buffer *objects* (so ``requires_grad``, dtype,
device and any optimizer reference carry over), its ``training`` flag, and ``eps``/``momentum``/
``affine``/``track_running_stats``. Without ``inplace`` the model is deep-copied first.
"""

from __future__ import annotations

import copy
from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

__all__ = ["convert"]

_TO_BNFOLD: dict[type[nn.Module], type[_BatchNorm]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
_TO_TORCH: dict[type[nn.Module], type[_BatchNorm]] = {v: k for k, v in _TO_BNFOLD.items()}  # type: ignore[misc]


def _swap(old: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    kwargs = {}
    if issubclass(cls, (SyncBatchNorm, nn.SyncBatchNorm)):
        kwargs["process_group"] = getattr(old, "process_group", None)
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        bias=old.bias is not None,
        device="meta",  # placeholders only: the old tensors are moved in below
        **kwargs,
    )
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)
    for name, child in old.named_children():
        new.add_module(name, child)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def convert(
    model: nn.Module, to: Literal["bnfold", "torch"] = "bnfold", *, inplace: bool = False
) -> nn.Module:
    """Replace torch's BatchNorm layers by bnfold's (``to="bnfold"``) or bnfold's by torch's.

    Args:
        model: any module; it may itself be a BatchNorm layer.
        to: ``"bnfold"`` or ``"torch"``: the family the layers are converted to.
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The new root (a different object when ``model`` is itself a converted layer).

    Raises:
        ValueError: ``to`` is neither ``"bnfold"`` nor ``"torch"``.
    """
    if to not in ("bnfold", "torch"):
        raise ValueError(f"convert: to must be 'bnfold' or 'torch', got {to!r}")
    mapping = _TO_BNFOLD if to == "bnfold" else _TO_TORCH
    root = model if inplace else copy.deepcopy(model)
    target = mapping.get(type(root))
    if target is not None:
        return _swap(root, target)  # type: ignore[arg-type]
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            target = mapping.get(type(child))
            if target is not None:
                setattr(parent, name, _swap(child, target))  # type: ignore[arg-type]
    return root
