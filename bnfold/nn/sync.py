"""SyncBatchNorm: batch statistics reduced across processes with ``torch.distributed``.

Forward, in training with an initialised process group of world size > 1 (any backend, CPU included):

1. Each process computes, per channel, its count ``n_i``, local mean ``m_i`` and *centred* sum of
   squares ``M2_i = sum((x - m_i)^2)`` (the same two-pass kernel as :class:`bnfold.nn.BatchNorm2d`).
2. It packs ``[n_i * m_i, M2_i + n_i * m_i^2, n_i]`` as float64 into ONE ``(3, C)`` tensor and
   all-reduces it (sum): ``S1 = sum n_i m_i``, ``S2 = sum (M2_i + n_i m_i^2)``, ``N = sum n_i``.
3. ``mean = S1 / N`` and ``M2 = S2 - S1^2 / N`` in float64. Numerics: the subtraction only cancels
   the *between-process* spread of the local means, never the raw ``sum(x^2)``; in float64 the
   relative error of the variance stays near 1e-16 * (mean / std)^2, far below float32 rounding
   unless |mean| > 1e4 std. The naive float32 ``E[x^2] - E[x]^2`` would lose everything at
   |mean| > 1e3 std.
4. Normalise locally with the global ``mean`` and biased variance ``M2 / N``; the running statistics
   get the global unbiased variance ``M2 / (N - 1)``.

Backward: the per-channel ``sum(g)`` and ``sum(g * (x - mean))`` are packed into ONE ``(2, C)``
all-reduce, so the input gradient equals that of a single process that sees the whole batch. Weight
and bias gradients stay local (as in ``torch.nn.SyncBatchNorm``): data-parallel training all-reduces
parameter gradients itself.

Without a process group, with world size 1, or in eval mode the layer is :class:`BatchNorm2d`-like
for any input rank >= 2.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import bn_forward
from .kernel import (
    LOW_PRECISION,
    batch_norm_train,
    batch_stats,
    compute_dtype,
    grad_input,
    grad_sums,
    like_x,
    normalize,
)

__all__ = ["SyncBatchNorm"]


class _SyncBatchNormFunction(torch.autograd.Function):
    """``apply(x, weight, bias, eps, group) -> (y, mean, var_sum, count)``; the last three are
    non-differentiable global statistics (``count`` a float64 scalar tensor)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        group: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xc, w, b = compute_dtype(x, weight, bias)
        c = xc.shape[1]
        n_local = xc.numel() // max(1, c)
        pack = torch.zeros((3, c), dtype=torch.float64, device=x.device)
        if n_local > 0:
            mean_l, m2_l = batch_stats(xc)
            mean64 = mean_l.double()
            pack[0] = mean64 * n_local
            pack[1] = m2_l.double() + mean64 * mean64 * n_local
        pack[2] = n_local
        dist.all_reduce(pack, group=group)
        count = pack[2, 0]
        total = int(count.item())
        if total <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {x.size()} "
                f"({total} value(s) per channel across all processes)"
            )
        mean64 = pack[0] / total
        var_sum64 = (pack[1] - pack[0] * mean64).clamp_(min=0.0)
        mean = mean64.to(xc.dtype)
        var_sum = var_sum64.to(xc.dtype)
        invstd = torch.rsqrt(var_sum64 / total + eps).to(xc.dtype)
        y = normalize(xc, mean, invstd, w, b).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.has_bias = bias is not None
        ctx.group = group
        ctx.total = total
        ctx.mark_non_differentiable(mean, var_sum, count)
        return y, mean, var_sum, count

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_y: torch.Tensor, *_: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        xc = x.float() if x.dtype in LOW_PRECISION else x
        g = like_x(grad_y.to(xc.dtype), xc)
        buf = torch.empty_like(xc)  # x - mean, then the input gradient
        sum_g, sum_gxm = grad_sums(g, xc, mean, buf)
        dw = db = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (sum_gxm * invstd).to(weight.dtype)  # local, before the all-reduce
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = sum_g.to(weight.dtype if weight is not None else x.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            pack = torch.stack([sum_g, sum_gxm])
            dist.all_reduce(pack, group=ctx.group)
            w = weight.to(xc.dtype) if weight is not None else None
            dx = grad_input(g, buf, invstd, w, pack[0], pack[1], ctx.total).to(x.dtype)
        return dx, dw, db, None, None


def _sync_stats(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *, group: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The batch statistics of every process in ``group`` (:class:`_SyncBatchNormFunction`)."""
    y, mean, var_sum, count = _SyncBatchNormFunction.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, eps, group
    )
    return y, mean, var_sum, int(count.item())


class SyncBatchNorm(_BatchNorm):
    """Batch normalisation whose training statistics span all processes of a group.

    Args:
        num_features: number of channels ``C`` (dimension 1 of an input of rank >= 2).
        eps: added to the variance before the square root.
        momentum: running-statistics factor; ``None`` for a cumulative moving average.
        affine: learnable ``weight`` and ``bias``.
        track_running_stats: keep running statistics (else batch statistics in eval too).
        process_group: the group to reduce over; ``None`` is the default (world) group.
        device: as for torch layers.
        dtype: as for torch layers.
        bias: learnable bias when ``affine``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group(self) -> Any | None:
        """The process group to reduce over, or None when no reduction is needed."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        group = self._group() if self.training else None
        if group is None:
            return bn_forward(self, input)
        kernel = functools.partial(_sync_stats, group=group)
        return bn_forward(self, input, functools.partial(batch_norm_train, kernel=kernel))

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any | None = None
    ) -> torch.nn.Module:
        """Replace every BatchNorm layer (torch's or bnfold's) in ``module`` by a bnfold SyncBatchNorm.

        Parameters and buffers are shared with the original layers (not copied), as in
        ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

        Args:
            module: a model, or a BatchNorm layer.
            process_group: the group the new layers reduce over (default: world).

        Returns:
            The model with the layers replaced (a new object when ``module`` itself is a BN layer).
        """
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
            )
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
