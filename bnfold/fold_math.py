"""The math of folding BatchNorm, in float64, with every weight layout stated explicitly.

Eval-mode BatchNorm is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta  =  scale * x + shift
    scale = gamma / sqrt(var + eps)          shift = beta - mean * scale

Forward fold (layer -> BN), for a layer ``z = W * x + b`` whose output channel ``o`` is computed
from the weight slice of ``o``::

    W'[o] = scale[o] * W[o]          b'[o] = scale[o] * b[o] + shift[o]

Backward fold (BN -> layer), exact only when every input element the layer reads is a BN output (no
zero padding, which BN would not have shifted)::

    W'[.., i, ..] = W[.., i, ..] * scale[i]      b'[o] = b[o] + sum_{i,k} W[o, i, k] * shift[i]

The channel axes of a weight are given by :class:`WeightLayout`, never guessed from its shape. Grouped
weights: one axis spans every channel of its side (the *full* axis: axis 0 for both Conv
``[C_out, C_in/g, *k]`` and ConvTranspose ``[C_in, C_out/g, *k]``), the other holds the channels of one
group only, and the group of an element is given by its index on the full axis. For ConvTranspose,
output channel ``g * (C_out/g) + j`` is column ``j`` of rows ``g*C_in/g ... (g+1)*C_in/g - 1``.

All functions take and return NumPy arrays; results are float64 and are cast back once, at the edge,
with :func:`cast_exact` (correct rounding, also for bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "WeightLayout",
    "bn_affine",
    "channel_factor",
    "fold_forward",
    "fold_backward",
    "fold_gemm_forward",
    "fold_gemm_backward",
    "cast_exact",
    "fits_dtype",
    "F64",
]

F64 = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike


@dataclass(frozen=True, slots=True)
class WeightLayout:
    """Where the channels of a weight tensor are.

    Attributes:
        out_axis: axis of the weight that indexes the layer's output channels (per group if grouped).
        in_axis: axis that indexes the layer's input channels (per group if grouped).
        groups: number of groups (1 for dense layers).
        transposed: True for ConvTranspose (``[C_in, C_out/groups, *k]``): the full axis is ``in_axis``.
    """

    out_axis: int
    in_axis: int
    groups: int = 1
    transposed: bool = False

    @classmethod
    def conv(cls, groups: int = 1) -> WeightLayout:
        """Conv weight ``[C_out, C_in/groups, *k]``."""
        return cls(out_axis=0, in_axis=1, groups=groups, transposed=False)

    @classmethod
    def conv_transpose(cls, groups: int = 1) -> WeightLayout:
        """ConvTranspose weight ``[C_in, C_out/groups, *k]``."""
        return cls(out_axis=1, in_axis=0, groups=groups, transposed=True)

    @classmethod
    def linear(cls) -> WeightLayout:
        """torch Linear weight ``[out, in]`` (also ONNX Gemm with ``transB=1``)."""
        return cls(out_axis=0, in_axis=1)

    @classmethod
    def gemm(cls, trans_b: bool) -> WeightLayout:
        """ONNX Gemm B: ``[K, N]``, or ``[N, K]`` when ``transB=1``."""
        return cls.linear() if trans_b else cls(out_axis=1, in_axis=0)

    @classmethod
    def matmul(cls) -> WeightLayout:
        """MatMul right operand ``[..., K, N]``: out axis -1, in axis -2."""
        return cls(out_axis=-1, in_axis=-2)

    @property
    def full_axis(self) -> int:
        return self.in_axis if self.transposed else self.out_axis


def _f64(a: ArrayLike) -> F64:
    return np.asarray(a).astype(np.float64, copy=False)


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
    m = _f64(mean)
    v = _f64(var)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_std = 1.0 / np.sqrt(v + float(eps))
        scale = inv_std if gamma is None else _f64(gamma) * inv_std
        scale = np.broadcast_to(scale, np.broadcast_shapes(scale.shape, m.shape)).copy()
        shift = -m * scale if beta is None else _f64(beta) - m * scale
    return scale, shift


def channel_factor(values: ArrayLike, shape: tuple[int, ...], layout: WeightLayout, side: str) -> F64:
    """A per-channel vector laid out so that it broadcasts against a weight of ``shape``.

    ``values[c]`` lands on every weight element that belongs to channel ``c`` of the layer's output
    (``side="out"``) or input (``side="in"``) side, groups included.

    Args:
        values: one value per channel of that side (length ``C``).
        shape: the weight's shape.
        layout: where the channels are.
        side: ``"out"`` or ``"in"``.

    Returns:
        A float64 array broadcastable to ``shape``.
    """
    v = _f64(values).reshape(-1)
    ndim = len(shape)
    axis = (layout.out_axis if side == "out" else layout.in_axis) % ndim
    full = layout.full_axis % ndim
    g = layout.groups
    if axis == full or g == 1:
        expected = shape[axis] if axis == full else shape[axis] * g
        if v.shape[0] != expected:
            raise ValueError(f"{v.shape[0]} channel values for a weight axis of {expected} channels")
        if axis != full:  # g == 1
            v = v[: shape[axis]]
        target = [1] * ndim
        target[axis] = shape[axis]
        return v.reshape(target)
    # The channel lives on a per-group axis; its group is set by the index on the full axis.
    n_full = shape[full]
    per_group_full = n_full // g
    per_group = shape[axis]
    if v.shape[0] != per_group * g or n_full % g:
        raise ValueError(f"{v.shape[0]} channel values do not fit {g} groups of {per_group}")
    group_of_full = np.arange(n_full) // per_group_full  # [n_full]
    idx = group_of_full[:, None] * per_group + np.arange(per_group)[None, :]  # [n_full, per_group]
    fac: F64 = v[idx]
    # Arrange the two axes in the weight's order, other axes as 1.
    if full > axis:
        fac = fac.T
    target = [1] * ndim
    target[full] = n_full
    target[axis] = per_group
    return fac.reshape(target)


def fold_forward(
    weight: ArrayLike,
    bias: ArrayLike | None,
    scale: ArrayLike,
    shift: ArrayLike,
    layout: WeightLayout,
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
    w = _f64(weight)
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    w_new = w * channel_factor(s, w.shape, layout, "out")
    b = np.zeros_like(s) if bias is None else _f64(bias).reshape(-1)
    return w_new, b * s + t


def fold_backward(
    weight: ArrayLike,
    bias: ArrayLike | None,
    scale: ArrayLike,
    shift: ArrayLike,
    layout: WeightLayout,
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
    w = _f64(weight)
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    w_new = w * channel_factor(s, w.shape, layout, "in")
    contrib = w * channel_factor(t, w.shape, layout, "in")
    out_axis = layout.out_axis % w.ndim
    summed = np.moveaxis(contrib, out_axis, 0).reshape(w.shape[out_axis], -1).sum(axis=1)
    b = np.zeros(w.shape[out_axis]) if bias is None else _f64(bias).reshape(-1)
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
    b = _f64(b_weight)
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    b_new = b * channel_factor(s, b.shape, WeightLayout.gemm(trans_b), "out")
    if c is None:
        return b_new, t.copy()
    return b_new, float(beta) * _f64(c) * s + t


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
    layout = WeightLayout.gemm(trans_b)
    b = _f64(b_weight)
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    b_new = b * channel_factor(s, b.shape, layout, "in")
    bk = b.T if trans_b else b  # [K, N]
    c_new = float(alpha) * (t @ bk)
    if c is not None:
        c_new = c_new + float(beta) * _f64(c)
    return b_new, c_new


def _bf16_dtype() -> Any:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes ships with onnx
        return None
    return ml_dtypes.bfloat16


def _is_bf16(dtype: Any) -> bool:
    bf = _bf16_dtype()
    return bf is not None and np.dtype(dtype) == np.dtype(bf)


def cast_exact(x: ArrayLike, dtype: Any) -> npt.NDArray[Any]:
    """Round float64 values to ``dtype`` correctly (to nearest, ties to even), once.

    NumPy casts float64 straight to float32 and float16 with correct rounding. bfloat16 casts go
    through float32 and could round twice; here the float32 step rounds to odd, which makes the
    second rounding correct.

    Args:
        x: float64 values.
        dtype: a NumPy dtype (``ml_dtypes.bfloat16`` for bfloat16).
    """
    a = _f64(x)
    dt = np.dtype(dtype)
    if not _is_bf16(dt):
        with np.errstate(over="ignore", invalid="ignore"):
            return a.astype(dt)
    with np.errstate(over="ignore", invalid="ignore"):
        f = a.astype(np.float32)
    inexact = np.isfinite(f) & (f.astype(np.float64) != a)
    bits = f.view(np.uint32)
    even = (bits & 1) == 0
    fix = inexact & even
    if np.any(fix):
        toward = np.nextafter(f, np.where(a > f.astype(np.float64), np.inf, -np.inf).astype(np.float32))
        f = np.where(fix, toward, f).astype(np.float32)
    return f.astype(dt)


def fits_dtype(x: ArrayLike, dtype: Any) -> bool:
    """True when every value is finite in float64 and stays finite after :func:`cast_exact`."""
    a = _f64(x)
    if not np.all(np.isfinite(a)):
        return False
    return bool(np.all(np.isfinite(cast_exact(a, dtype).astype(np.float64))))
