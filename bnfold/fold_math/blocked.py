"""The one weight product of every fold: ``W * factor`` in float64, block by block, rounded once.

:func:`scale_cast` multiplies in float64 block by block along axis 0 (a cache-sized float64 buffer,
never a float64 copy of the whole weight; rows split between threads for large weights) and rounds
each block once to the requested dtype. With ``dtype=float64`` it is the plain float64 product; with a
narrower dtype it equals ``cast_exact(W.astype(float64) * factor, dtype)`` bit for bit (each element is
one float64 product and one rounding, whatever the blocking or the threads). :class:`Scratch` reuses
one output buffer per dtype across weights.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from .cast import F64, cast_exact, is_bfloat16

__all__ = ["scale_cast", "Scratch"]

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
    exact_cast = is_bfloat16(dt)  # NumPy rounds float64 -> float32/float16 correctly, not -> bfloat16

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
