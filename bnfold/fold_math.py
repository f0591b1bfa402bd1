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

One implementation of the weight product: every ``W * factor`` here (forward, backward, Gemm) goes
through :func:`scale_cast`, which multiplies in float64 block by block along axis 0 (a cache-sized
float64 buffer, never a float64 copy of the whole weight; rows split between threads for large
weights) and rounds each block once to the requested dtype. With ``dtype=float64`` it is the plain
float64 product; with a narrower dtype it equals ``cast_exact(W.astype(float64) * factor, dtype)``
bit for bit (each element is one float64 product and one rounding, whatever the blocking).
:func:`fold_forward_cast` is the forward fold already rounded to the layer's dtype, with the
finiteness check fused in: the route the ONNX backend takes for large weights.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "WeightLayout",
    "bn_affine",
    "channel_factor",
    "fold_forward",
    "fold_forward_cast",
    "fold_backward",
    "fold_gemm_forward",
    "fold_gemm_backward",
    "cast_exact",
    "fits_dtype",
    "scale_cast",
    "Scratch",
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
    w = np.asarray(weight)
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    w_new, _ = scale_cast(w, channel_factor(s, w.shape, layout, "out"), np.float64)
    b = np.zeros_like(s) if bias is None else _f64(bias).reshape(-1)
    return w_new, b * s + t


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
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    w_new, finite = scale_cast(w, channel_factor(s, w.shape, layout, "out"), dt, out=out)
    b64 = np.zeros_like(s) if bias is None else _f64(bias).reshape(-1)
    b_new = cast_exact(b64 * s + t, dt)
    return w_new, b_new, finite and bool(np.all(np.isfinite(b_new)))


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
    w_new, _ = scale_cast(w, channel_factor(s, w.shape, layout, "in"), np.float64)
    contrib, _ = scale_cast(w, channel_factor(t, w.shape, layout, "in"), np.float64)
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
    b = np.asarray(b_weight)
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    b_new, _ = scale_cast(b, channel_factor(s, b.shape, WeightLayout.gemm(trans_b), "out"), np.float64)
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
    b_new, _ = scale_cast(b, channel_factor(s, b.shape, layout, "in"), np.float64)
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


# ---- the blocked product ---------------------------------------------------------------------------
_BLOCK = 1 << 15  # float64 elements per block (256 KiB: stays in L2)
_PARALLEL_MIN = 1 << 18  # elements: below this, threads cost more than they save
_POOL: Any = None
_POOL_LOCK = threading.Lock()


def scale_cast(
    weight: npt.NDArray[Any],
    factor: F64,
    dtype: Any,
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], bool]:
    """``cast_exact(weight.astype(float64) * factor, dtype)``, block by block along axis 0.

    Args:
        weight: the weight (any float dtype).
        factor: float64 factors broadcastable to ``weight.shape`` (as returned by
            :func:`channel_factor`); a factor of another rank falls back to the whole-array form.
        dtype: the dtype of the result (``float64``: the plain product, no rounding).
        out: an array of ``weight.shape`` and ``dtype`` to write into (a reused scratch buffer saves
            allocating and faulting in fresh memory for every weight).

    Returns:
        ``(result, finite)``: the product in ``dtype`` and whether every value of it is finite
        (checked block by block while the block is in cache).
    """
    dt = np.dtype(dtype)
    w = np.asarray(weight)
    f = np.asarray(factor, np.float64)
    if w.ndim == 0 or w.size == 0 or f.ndim != w.ndim or np.broadcast_shapes(w.shape, f.shape) != w.shape:
        with np.errstate(over="ignore", invalid="ignore"):
            res = cast_exact(w.astype(np.float64) * f, dt)
        return res, bool(np.all(np.isfinite(res)))
    if out is None:
        out = np.empty(w.shape, dt)
    n = w.shape[0]
    step = max(1, _BLOCK // max(1, w[0].size))
    per_row = f.shape[0] == n and n > 1
    direct = dt == np.float64  # the product lands in ``out`` itself, no rounding step
    exact_cast = _is_bf16(dt)  # NumPy rounds float64 -> float32/float16 correctly, not -> bfloat16

    def run(lo: int, hi: int) -> bool:
        tmp = None if direct else np.empty((min(step, hi - lo),) + w.shape[1:], np.float64)
        ok = True
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(lo, hi, step):
                j = min(hi, i + step)
                blk = out[i:j]
                fi = f[i:j] if per_row else f
                if tmp is None:
                    np.multiply(w[i:j], fi, out=blk)
                else:
                    # Widen (exact), multiply in float64, round once: three SIMD passes over a block in
                    # cache, faster than one mixed-dtype multiply (NumPy's buffered casting loop).
                    t = tmp[: j - i]
                    np.copyto(t, w[i:j])
                    np.multiply(t, fi, out=t)
                    if exact_cast:
                        blk[...] = cast_exact(t, dt)
                    else:
                        np.copyto(blk, t, casting="unsafe")
                if ok and not np.isfinite(blk).all():
                    ok = False
        return ok

    workers = _workers()
    if w.size < _PARALLEL_MIN or workers < 2 or n < 2 * step:
        return out, run(0, n)
    # NumPy releases the GIL in these loops: split the rows between threads (results are per element,
    # so the split does not change a single bit).
    chunk = -(-n // workers)
    chunk = -(-chunk // step) * step
    pool = _pool(workers)
    futures = [pool.submit(run, lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    finite = all([fu.result() for fu in futures])
    return out, finite


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


def _pool(workers: int) -> Any:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bnfold-fold")
        return _POOL


class Scratch:
    """One reusable output buffer per dtype, grown to the largest weight seen.

    The result of :func:`scale_cast` written into it is valid until the next call: the caller turns
    it into bytes (``tobytes``) before asking for the buffer again.
    """

    def __init__(self) -> None:
        self._buf: dict[str, npt.NDArray[Any]] = {}

    def get(self, shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
        """A ``shape``-shaped view of the buffer for ``dtype`` (contents undefined)."""
        dt = np.dtype(dtype)
        size = 1
        for d in shape:
            size *= int(d)
        key = dt.str + dt.name
        buf = self._buf.get(key)
        if buf is None or buf.size < size:
            buf = np.empty(size, dt)
            self._buf[key] = buf
        return buf[:size].reshape(shape)
