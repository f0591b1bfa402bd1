"""Training-time BatchNorm layers that bnfold folds, and the frozen affine layer.

``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` match ``torch.nn.BatchNorm*`` (arguments, state_dict keys,
numerics); ``FrozenBatchNorm1d/2d/3d`` are the fixed per-channel affine maps that ``bnfold.freeze``
puts in their place; ``convert`` swaps torch's layers for bnfold's and back.
"""

from __future__ import annotations

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .convert import convert
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "convert",
]
