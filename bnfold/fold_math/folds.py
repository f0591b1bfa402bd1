"""The folds: eval-mode BN as an affine map, moved into the weight and bias of the layer next to it.

See :mod:`bnfold.fold_math` for the formulas. Every weight product goes through
:func:`~bnfold.fold_math.blocked.scale_cast` (one blocked routine); results are float64 unless a
function says it rounds (:func:`fold_forward_cast`), and the caller rounds once with
:func:`~bnfold.fold_math.cast.cast_exact`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from .blocked import scale_cast
from .cast import F64, ArrayLike, cast_exact, f64
from .layout import WeightLayout, channel_factor

__all__ = [
    "bn_affine",
    "bn_nonfinite_reason",
    "fold_forward",
    "fold_forward_cast",
    "fold_backward",
    "fold_gemm_forward",
    "fold_gemm_backward",
]


def bn_affine(
    gamma: ArrayLike | None,
    beta: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    eps: float,
) -> tuple[F64, F64]:
    """Eval-mode BN as ``y = scale * x + shift``, in float64.

    Args:
        gamma: the weight (``None`` for ``affine=False``: 1).
        beta: the bias (``None`` for ``affine=False``: 0).
        mean: running mean.
        var: running variance.
        eps: epsilon added to the variance.

    Returns:
        ``(scale, shift)``, float64 arrays of the statistics' shape. Entries may be inf/NaN where
        ``var + eps <= 0``; callers check with :func:`fits_dtype`.
    """
    m = f64(mean)
    v = f64(var)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_std = 1.0 / np.sqrt(v + float(eps))
        scale = inv_std if gamma is None else f64(gamma) * inv_std
        scale = np.broadcast_to(scale, np.broadcast_shapes(scale.shape, m.shape)).copy()
        shift = -m * scale if beta is None else f64(beta) - m * scale
    return scale, shift


def bn_nonfinite_reason(
    gamma: ArrayLike | None, beta: ArrayLike | None, mean: ArrayLike, var: ArrayLike, eps: float
) -> str | None:
    """Why :func:`bn_affine` of these parameters is not finite, naming the first cause and channel:
    a NaN/inf parameter ("gamma has NaN at channel 2"), then ``var + eps <= 0``, then an overflow of
    the scale or shift; None when both are finite. The BN itself yields NaN/inf there."""
    scale, shift = bn_affine(gamma, beta, mean, var, eps)
    bad = ~(np.isfinite(scale) & np.isfinite(shift))
    if not bad.any():
        return None

    def where(mask: Any) -> str:
        idx = np.argwhere(mask)
        first = ", ".join(str(int(i)) for i in idx[0]) if idx.size else "?"
        more = len(idx) - 1
        return f"channel {first}" + (f" (and {more} other channel(s))" if more > 0 else "")

    for name, p in (("gamma", gamma), ("beta", beta), ("running mean", mean), ("running variance", var)):
        if p is None:
            continue
        v = f64(p)
        for what, mask in (("NaN", np.isnan(v)), ("inf", np.isinf(v))):
            if mask.any():
                return f"{name} has {what} at {where(mask)}: the BN itself yields NaN/inf"
    v = f64(var)
    with np.errstate(invalid="ignore", over="ignore"):
        low = ~(v + float(eps) > 0)
    if low.any():
        k = tuple(int(i) for i in np.argwhere(low)[0])
        return (
            f"running variance + epsilon is not positive at {where(low)} (var {float(v[k]):.3g}, "
            f"eps {float(eps):.3g}): the BN itself yields NaN/inf"
        )
    return f"the BN's scale or shift overflows float64 at {where(bad)}"


def _channels(scale: ArrayLike, shift: ArrayLike) -> tuple[F64, F64]:
    """A BN's scale and shift as flat float64 vectors (one entry per channel)."""
    return f64(scale).reshape(-1), f64(shift).reshape(-1)


def _gemm_weight(b_weight: ArrayLike, s: F64, trans_b: bool, side: str) -> F64:
    """Gemm's ``B`` times ``s`` along its N (``side="out"``) or K (``side="in"``) axis, in float64."""
    b = np.asarray(b_weight)
    b_new, _ = scale_cast(b, channel_factor(s, b.shape, WeightLayout.gemm(trans_b), side), np.float64)
    return b_new


def fold_forward(
    weight: ArrayLike, bias: ArrayLike | None, scale: ArrayLike, shift: ArrayLike, layout: WeightLayout
) -> tuple[F64, F64]:
    """Fold ``y = scale * layer(x) + shift`` into the layer: scale output channels, shift the bias.

    Args:
        weight: the layer's weight.
        bias: the layer's bias per output channel, or ``None`` (a bias is created).
        scale: per output channel.
        shift: per output channel.
        layout: the weight's channel axes.

    Returns:
        ``(weight', bias')`` in float64; ``bias'`` has one entry per output channel.
    """
    # the float64 case of the one blocked routine: no rounding, the same products
    w_new, b_new, _ = fold_forward_cast(np.asarray(weight), bias, scale, shift, layout, np.float64)
    return w_new, b_new


def fold_forward_cast(
    weight: npt.NDArray[Any],
    bias: ArrayLike | None,
    scale: ArrayLike,
    shift: ArrayLike,
    layout: WeightLayout,
    dtype: Any = None,
    *,
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], bool]:
    """:func:`fold_forward` rounded once to ``dtype`` (default: the weight's), blocked.

    Equal bit for bit to ``cast_exact`` of each result of :func:`fold_forward`.

    Args:
        weight: the layer's weight.
        bias: per output channel, or ``None``.
        scale: per output channel.
        shift: per output channel.
        layout: the weight's channel axes.
        dtype: the dtype of the results (the weight's when ``None``).
        out: an array of the weight's shape and ``dtype`` to write the weight into (see
            :class:`Scratch`).

    Returns:
        ``(weight', bias', finite)``: both in ``dtype``; ``finite`` is False when a value of either
        is not finite there (an overflow: the caller refuses the fold).
    """
    w = np.asarray(weight)
    dt = np.dtype(w.dtype if dtype is None else dtype)
    s, t = _channels(scale, shift)
    w_new, finite = scale_cast(w, channel_factor(s, w.shape, layout, "out"), dt, out=out)
    b64 = np.zeros_like(s) if bias is None else f64(bias).reshape(-1)
    b_new = cast_exact(b64 * s + t, dt)
    return w_new, b_new, finite and bool(np.all(np.isfinite(b_new)))


def fold_backward(
    weight: ArrayLike, bias: ArrayLike | None, scale: ArrayLike, shift: ArrayLike, layout: WeightLayout
) -> tuple[F64, F64]:
    """Fold ``layer(scale * x + shift)`` into the layer: scale input channels, add the shift's image.

    Exact only when the layer reads no padded zeros (all pads zero, or a padding mode that copies
    input values); the caller decides that. Transposed layouts are refused: a ConvTranspose output
    position sums a varying number of taps, so a constant input shift does not map to a bias.

    Args:
        weight: the layer's weight.
        bias: per output channel, or ``None``.
        scale: per input channel.
        shift: per input channel.
        layout: the weight's channel axes (not transposed).

    Returns:
        ``(weight', bias')`` in float64; ``bias'`` has one entry per output channel.
    """
    if layout.transposed:
        raise ValueError("backward fold into a transposed convolution is not exact")
    w = f64(weight)
    s, t = _channels(scale, shift)
    w_new, _ = scale_cast(w, channel_factor(s, w.shape, layout, "in"), np.float64)
    contrib, _ = scale_cast(w, channel_factor(t, w.shape, layout, "in"), np.float64)
    out_axis = layout.out_axis % w.ndim
    summed = np.moveaxis(contrib, out_axis, 0).reshape(w.shape[out_axis], -1).sum(axis=1)
    b = np.zeros(w.shape[out_axis]) if bias is None else f64(bias).reshape(-1)
    return w_new, b + summed


def fold_gemm_forward(
    b_weight: ArrayLike,
    c: ArrayLike | None,
    alpha: float,
    beta: float,
    scale: ArrayLike,
    shift: ArrayLike,
    trans_b: bool,
) -> tuple[F64, F64]:
    """Fold a BN after ONNX ``Gemm(A, B, C) = alpha * A' @ B' + beta * C`` (channel = column N).

    The result keeps ``alpha`` and uses ``beta = 1``::

        scale * (alpha A B + beta C) + shift = alpha A (B * scale) + (beta * C * scale + shift)

    ``C`` may be any shape that broadcasts to ``[M, N]``; the new C has shape
    ``broadcast(C.shape, [N])``.

    Returns:
        ``(B', C')`` in float64; write the Gemm with ``beta = 1``.
    """
    s, t = _channels(scale, shift)
    b_new = _gemm_weight(b_weight, s, trans_b, "out")
    if c is None:
        return b_new, t.copy()
    return b_new, float(beta) * f64(c) * s + t


def fold_gemm_backward(
    b_weight: ArrayLike,
    c: ArrayLike | None,
    alpha: float,
    beta: float,
    scale: ArrayLike,
    shift: ArrayLike,
    trans_b: bool,
) -> tuple[F64, F64]:
    """Fold a BN on the (untransposed) A input of ONNX Gemm, channel = column K of A.

    ``alpha (s A + t) B + beta C = alpha A (diag(s) B) + (alpha t B + beta C)``.

    Returns:
        ``(B', C')`` in float64; write the Gemm with ``beta = 1``.
    """
    s, t = _channels(scale, shift)
    b_new = _gemm_weight(b_weight, s, trans_b, "in")
    b = f64(b_weight)
    bk = b.T if trans_b else b  # [K, N]
    c_new = float(alpha) * (t @ bk)
    if c is not None:
        c_new = c_new + float(beta) * f64(c)
    return b_new, c_new
