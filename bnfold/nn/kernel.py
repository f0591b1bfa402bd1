"""The training-mode BatchNorm kernel: batch statistics forward and the closed-form backward.

Notation per channel ``c`` (``n`` values per channel: batch x spatial positions)::

    mean   = sum(x) / n                         (one reduction)
    var    = sum((x - mean)^2) / n              (centred, so no cancellation; biased)
    invstd = 1 / sqrt(var + eps)
    y      = x * scale + shift,   scale = gamma * invstd,   shift = beta - mean * scale

Backward, with ``g = dL/dy`` and ``xmu = x - mean``, from two reductions::

    sum_g   = sum(g)                            -> dL/dbeta  = sum_g
    sum_gxm = sum(g * xmu)                      -> dL/dgamma = sum_gxm * invstd
    dx      = a * g + b * xmu + c,  a = gamma * invstd,
                                    b = -a * invstd^2 * sum_gxm / n,
                                    c = -a * sum_g / n

Only ``x`` (alive anyway), ``gamma``, ``mean`` and ``invstd`` are saved for backward: no normalised copy
of the input is kept. Each pass is one large ATen op (few ops beat many small cache-sized ones on a
busy CPU), and every temporary is written into the buffer that becomes the output (``y`` forward,
``dx`` backward), so no full-size scratch tensor is allocated:

* forward: ``sum(x)``; ``y <- x * x``, ``sum(y)``; ``y <- x * scale + shift`` (:func:`affine`).
* backward: ``sum(g)``; ``dx <- g * x``, ``sum(dx)``; ``dx <- b * x + (c - b * mean)`` (:func:`affine`);
  ``dx += a * g``.

These one-pass (un-centred) forms are used only while every channel has ``|mean| <= 4 std``
(:data:`FAST_MEAN_RATIO`); otherwise the centred forms run, with ``x - mean`` written into the same
buffer first (two more elementwise passes), so no digits are lost to cancellation.

The per-channel coefficients are a handful of small ``(C,)`` ops (``n * mean^2`` as ``mean * sum(x)``,
``shift`` by one ``addcmul``) so the fixed cost per op stays small next to the full-size passes at
small spatial sizes (7x7, 14x14).

``x * scale + shift`` with two per-channel operands: ATen's CPU elementwise loop is vectorised only
when at most one operand is a stride-0 broadcast in the innermost dimension. Channels-last input has
the channel innermost, so one ``addcmul`` is vectorised. For contiguous (NCHW) input both operands
would be stride 0 along ``H*W`` and the loop runs scalar (2-4x slower at 7x7 and 14x14), so
:func:`affine` first writes ``shift`` broadcast to ``(C, H, W)`` into the first batch item of the
output, uses it as the contiguous addend of ``out[1:] = out[0] + x[1:] * scale``, then finishes
``out[0] += x[0] * scale``: one broadcast operand per pass and no extra memory. In place (``out`` is
``x``) it is ``out *= scale; out += shift``.

Outputs and gradients keep the input's memory format (channels_last included). Low-precision inputs
(float16, bfloat16) are computed in float32 and cast back at the edge.

The pieces (``batch_stats``, ``normalize``, ``grad_sums``, ``grad_input``) are public to
:mod:`bnfold.nn.sync`, which all-reduces the per-channel sums between processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "BatchNormFunction",
    "batch_norm_train",
    "local_stats",
    "StatsKernel",
    "batch_stats",
    "compute_dtype",
    "check_batch_size",
    "reduce_dims",
    "channel_view",
    "affine",
    "normalize",
    "grad_sums",
    "grad_input",
    "update_running_stats",
    "LOW_PRECISION",
    "like_x",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Largest |mean| / std of a channel for which the one-pass (un-centred) sums are used. The rounding
#: error of ``sum(x^2) - n mean^2`` grows like ``(mean / std)^2`` ulps and that of
#: ``sum(g x) - mean sum(g)`` like ``|mean| / std`` ulps: at 4 they stay within a few ulps of the
#: centred two-pass result, which is used beyond it.
FAST_MEAN_RATIO = 4.0


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """All dimensions but the channel dimension 1."""
    return (0, *range(2, x.dim()))


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector ``(C,)`` viewed as ``(1, C, 1, ...)`` to broadcast against an ndim input."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def check_batch_size(x: torch.Tensor) -> None:
    """Raise torch's error when a channel has a single value (its variance is undefined).

    Raises:
        ValueError: with the message ``torch.nn.functional.batch_norm`` uses.
    """
    size = x.size()
    per_channel = size[0] * math.prod(size[2:])
    if per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def affine(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out = x * scale + shift`` with per-channel ``scale``, ``shift`` ``(C,)``; returns ``out``.

    ``out`` is shaped and strided like ``x`` and is either ``x`` itself (in place) or a buffer that
    does not overlap it. ATen's CPU elementwise loops are vectorised only when at most one operand
    is a stride-0 broadcast along the innermost dimension. Channels-last (and 2-D) input has the
    channel innermost, so one ``addcmul`` with two ``(1, C, 1, ...)`` views is vectorised. For
    contiguous input with spatial dims (NCHW) both views would be stride 0 along ``H*W``, so:

    * into a separate buffer: ``out[0]`` first holds ``shift`` broadcast to ``(C, *spatial)`` and is
      the (contiguous) addend of ``out[1:] = out[0] + x[1:] * scale``; then ``out[0] += x[0] * scale``.
      One broadcast operand per pass and no extra memory.
    * in place: ``out *= scale; out += shift`` (two vectorised passes).
    """
    nd = x.dim()
    sv, bv = channel_view(scale, nd), channel_view(shift, nd)
    if nd <= 2 or x.stride(1) == 1 or x.shape[0] < 2 or x.numel() == 0 or not x.is_contiguous():
        return torch.addcmul(bv, x, sv, out=out)
    if out.data_ptr() == x.data_ptr():
        return out.mul_(sv).add_(bv)
    head = out[0]
    head.copy_(shift.view(-1, *([1] * (nd - 2))).expand(head.shape))
    torch.addcmul(head, x[1:], sv, out=out[1:])
    head.addcmul_(x[0], sv[0])
    return out


def compute_dtype(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``x``, ``weight`` and ``bias`` in the dtype the statistics are computed in (float16 and
    bfloat16 in float32, as torch's kernels do; other dtypes as they are)."""
    xc = x.float() if x.dtype in LOW_PRECISION else x
    w = weight.to(xc.dtype) if weight is not None else None
    b = bias.to(xc.dtype) if bias is not None else None
    return xc, w, b


def _count(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[1])


def _centred_sq_sum(centred: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``sum(centred^2)`` per channel; squares ``centred`` in place.

    (Measured on a 2-core CPU: an in-place square and a sum beat ``vector_norm`` over the same dims,
    in every layout.)
    """
    return centred.mul_(centred).sum(dims)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and centred sum of squares of ``x`` (uses one output-sized temporary)."""
    dims = reduce_dims(x)
    mean = x.sum(dims).div_(max(_count(x), 1))
    return mean, _centred_sq_sum(x - channel_view(mean, x.dim()), dims)


def forward_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics and output: ``(y, mean, var_sum, invstd)`` (see the module docstring)."""
    dims = reduce_dims(x)
    nd = x.dim()
    n = _count(x)
    sum_x = x.sum(dims)
    mean = sum_x / max(n, 1)
    # Case 1 (fast): var_sum = sum(x^2) - n * mean^2, accurate while mean^2 <= FAST_MEAN_RATIO^2 * var.
    y = torch.mul(x, x)  # y doubles as the scratch buffer
    n_mean2 = mean * sum_x  # n * mean^2
    var_sum = y.sum(dims).sub_(n_mean2)
    if not bool((n_mean2 <= var_sum * FAST_MEAN_RATIO**2).all()):
        # Case 2 (centred): large |mean| / std (or a constant channel): the exact two-pass sum.
        torch.sub(x, channel_view(mean, nd), out=y)
        var_sum = _centred_sq_sum(y, dims)
    invstd = (var_sum / max(n, 1)).add_(eps).rsqrt_()
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else torch.addcmul(bias, mean, scale, value=-1)
    affine(y, x, scale, shift)
    return y, mean, var_sum, invstd


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``y = x * scale + shift`` in one fused elementwise pass (keeps x's memory format)."""
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return affine(torch.empty_like(x), x, scale, shift)


def like_x(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g`` with ``x``'s strides (a copy only when they differ), so the passes stay elementwise-fast."""
    if g.stride() == x.stride():
        return g
    return torch.empty_like(x).copy_(g)


def grad_sums(
    g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, buf: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``sum(g)`` and ``sum(g * (x - mean))``.

    ``buf`` (shaped and strided like ``x``) is the scratch for ``x - mean``; on return it holds
    ``x - mean`` again. ``g`` must have ``x``'s strides.
    """
    dims = reduce_dims(x)
    nd = x.dim()
    m = channel_view(mean, nd)
    if buf is None:
        buf = torch.empty_like(x)
    torch.sub(x, m, out=buf)
    sum_g = g.sum(dims)
    sum_gxm = buf.mul_(g).sum(dims)
    torch.sub(x, m, out=buf)
    return sum_g, sum_gxm


def grad_input(
    g: torch.Tensor,
    xmu: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sum_g: torch.Tensor,
    sum_gxm: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """``dx = a * g + b * xmu + c`` written over ``xmu`` (see the module docstring); returns it."""
    nd = xmu.dim()
    a = invstd if weight is None else invstd * weight
    b = -a * invstd * invstd * sum_gxm / n
    c = -a * sum_g / n
    affine(xmu, xmu, b, c)
    return xmu.addcmul_(g, channel_view(a, nd))


def backward_train(
    g: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    need_dx: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dx, sum_g, sum_gxm)``; ``dx`` is None when not needed."""
    g = like_x(g, x)
    nd = x.dim()
    n = _count(x)
    if not bool((mean.abs() * invstd <= FAST_MEAN_RATIO).all()):
        # Case 2 (centred): large |mean| / std: sums and dx from x - mean.
        dx = torch.empty_like(x)  # the centred scratch buffer, then the gradient
        sum_g, sum_gxm = grad_sums(g, x, mean, dx)
        if not need_dx:
            return None, sum_g, sum_gxm
        return grad_input(g, dx, invstd, weight, sum_g, sum_gxm, n), sum_g, sum_gxm
    # Case 1 (fast): sum(g * (x - mean)) = sum(g * x) - mean * sum(g); dx = a * g + b * x + (c - b * mean).
    dims = reduce_dims(x)
    sum_g = g.sum(dims)
    dx = torch.mul(g, x)  # the scratch buffer, then the gradient
    sum_gxm = dx.sum(dims).sub_(mean * sum_g)
    if not need_dx:
        return None, sum_g, sum_gxm
    a = invstd if weight is None else invstd * weight
    b = (a * invstd).mul_(invstd).mul_(sum_gxm).div_(-n)
    c = torch.addcmul((a * sum_g).div_(-n), b, mean, value=-1)
    affine(dx, x, b, c)
    return dx.addcmul_(g, channel_view(a, nd)), sum_g, sum_gxm


class BatchNormFunction(torch.autograd.Function):
    """Training-mode BN with batch statistics and the closed-form backward.

    ``apply(x, weight, bias, eps)`` returns ``(y, mean, var_sum)``; ``mean`` and the centred sum of
    squares ``var_sum`` are non-differentiable side outputs used to update the running statistics.
    Double backward is not supported (``once_differentiable``): differentiating the gradient raises
    a ``RuntimeError`` that says so.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out_dtype = x.dtype
        xc, w, b = compute_dtype(x, weight, bias)
        y, mean, var_sum, invstd = forward_train(xc, w, b, eps)
        y = y.to(out_dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, var_sum)
        return y, mean, var_sum

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_y: torch.Tensor, _gm: Any, _gv: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        xc = x.float() if x.dtype in LOW_PRECISION else x
        g = grad_y.to(xc.dtype)
        w = weight.to(xc.dtype) if weight is not None else None
        dx, sum_g, sum_gxm = backward_train(g, xc, mean, invstd, w, ctx.needs_input_grad[0])
        dw = db = None
        if dx is not None:
            dx = dx.to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (sum_gxm * invstd).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = sum_g.to(weight.dtype if weight is not None else x.dtype)
        return dx, dw, db, None


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var_sum: torch.Tensor,
    n: int,
    factor: float,
) -> None:
    """``running = (1 - factor) * running + factor * batch`` with the unbiased batch variance.

    Same expression and order as torch's CPU kernel: ``factor * batch + (1 - factor) * running``.
    """
    unbiased = var_sum / (n - 1) if n > 1 else torch.full_like(var_sum, float("nan"))
    running_mean.copy_(mean.to(running_mean.dtype) * factor + running_mean * (1 - factor))
    running_var.copy_(unbiased.to(running_var.dtype) * factor + running_var * (1 - factor))


StatsKernel = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float], tuple[Any, ...]]
"""``(x, weight, bias, eps) -> (y, batch_mean, batch_var_sum, count)``: the normalisation with batch
statistics and what the running statistics are updated from (``count``: values per channel; 0 for an
empty batch, which leaves them as they are)."""


def local_stats(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The batch statistics of this process alone (:class:`BatchNormFunction`).

    Raises:
        ValueError: a channel has a single value (torch's message).
    """
    check_batch_size(x)
    y, mean, var_sum = BatchNormFunction.apply(x, weight, bias, eps)  # type: ignore[no-untyped-call]
    # an empty batch leaves the running statistics as they are, as in torch
    return y, mean, var_sum, _count(x) if x.numel() > 0 else 0


def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    factor: float,
    eps: float,
    kernel: StatsKernel = local_stats,
) -> torch.Tensor:
    """Normalise with batch statistics; update the running statistics when given.

    Args:
        x, weight, bias, eps: as for ``torch.nn.functional.batch_norm``.
        running_mean, running_var: updated in place (None: not tracked).
        factor: the running-statistics factor (momentum, or 1/n for a cumulative average).
        kernel: where the batch statistics come from: :func:`local_stats` (default) or the
            all-reducing one of :class:`bnfold.nn.SyncBatchNorm`.

    Raises:
        ValueError: a channel has a single value (torch's message).
    """
    y, mean, var_sum, count = kernel(x, weight, bias, eps)
    if running_mean is not None and running_var is not None and count > 0:
        update_running_stats(running_mean, running_var, mean, var_sum, count, factor)
    return y  # type: ignore[no-any-return]
