"""BatchNorm1d/2d/3d with torch's arguments, state_dict and numerics, and a readable kernel.

Rules (the same as ``torch.nn.BatchNorm*``):

1. Training, or ``track_running_stats=False`` in either mode: normalise with the batch mean and the
   biased batch variance (:class:`bnfold.nn.kernel.BatchNormFunction`, closed-form backward).
2. Training with ``track_running_stats=True``: ``num_batches_tracked += 1`` and
   ``running = (1 - f) * running + f * batch`` with the *unbiased* batch variance, where
   ``f = momentum``, or ``f = 1 / num_batches_tracked`` (cumulative average) when ``momentum is None``.
3. Eval with running statistics: ``torch.nn.functional.batch_norm(..., training=False)``, so the layer
   exports to ONNX as one ``BatchNormalization`` and bnfold folds it like torch's.
4. A channel with a single value in training raises torch's ``ValueError``.

The classes subclass ``torch.nn.modules.batchnorm._BatchNorm``: parameters, buffers, state_dict keys
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), old-checkpoint
loading and ``isinstance`` checks behave as for torch's layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .kernel import batch_norm_train

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "bn_forward", "BnfoldBatchNorm"]


#: ``(x, weight, bias, running_mean, running_var, factor, eps) -> y``
TrainFn = Callable[..., torch.Tensor]


def bn_forward(module: _BatchNorm, input: torch.Tensor, train_fn: TrainFn = batch_norm_train) -> torch.Tensor:
    """The forward of a bnfold BatchNorm layer (shared with :class:`bnfold.nn.SyncBatchNorm`).

    Args:
        module: the layer (its flags, parameters and buffers are read; buffers updated in training).
        input: ``(N, C, ...)`` tensor.
        train_fn: the batch-statistics kernel, ``(x, weight, bias, running_mean, running_var,
            factor, eps) -> y``; SyncBatchNorm passes its all-reducing one.
    """
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:  # cumulative moving average
            factor = 1.0 / float(module.num_batches_tracked)
    use_batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    if not use_batch_stats:
        # Rule 3: the eval form torch exports as BatchNormalization.
        return F.batch_norm(
            input, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0, module.eps
        )
    track = module.training and module.track_running_stats
    return train_fn(
        input,
        module.weight,
        module.bias,
        module.running_mean if track else None,
        module.running_var if track else None,
        factor,
        module.eps,
    )


class BnfoldBatchNorm(_BatchNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)  # type: ignore[no-untyped-call]
        return bn_forward(self, input)


class BatchNorm1d(BnfoldBatchNorm):
    """Batch normalisation over ``(N, C)`` or ``(N, C, L)`` input; arguments as ``torch.nn.BatchNorm1d``.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance before the square root.
        momentum: running-statistics factor; ``None`` for a cumulative moving average.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta).
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``; when
            False, batch statistics are used in eval mode too.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(BnfoldBatchNorm):
    """Batch normalisation over ``(N, C, H, W)`` input; arguments as ``torch.nn.BatchNorm2d``.

    Args: as :class:`BatchNorm1d`. channels_last input gives channels_last output and gradient.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(BnfoldBatchNorm):
    """Batch normalisation over ``(N, C, D, H, W)`` input; arguments as ``torch.nn.BatchNorm3d``.

    Args: as :class:`BatchNorm1d`.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
