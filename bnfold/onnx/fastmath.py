"""Scale a large weight by per-channel float64 factors and round once, in cache-sized blocks.

``scale_cast(w, f, dtype) == cast_exact(w.astype(float64) * f, dtype)`` bit for bit: each block of rows
(axis 0) is multiplied in float64 into a small reusable buffer and rounded to ``dtype`` once (NumPy's
float64 -> float32/float16 cast rounds to nearest even; bfloat16 goes through
:func:`bnfold.fold_math.cast_exact`). The factors come from :func:`bnfold.fold_math.channel_factor`
(the layout is explicit, never guessed). Working block by block keeps the float64 intermediate in
cache and never allocates a float64 copy of the whole weight, which makes the fold of a ResNet-50
several times faster than the whole-array form with the same result.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt

from bnfold.fold_math import cast_exact

__all__ = ["scale_cast", "Scratch"]

_BLOCK = 1 << 15  # float64 elements per block (256 KiB)


def scale_cast(
    weight: npt.NDArray[Any],
    factor: npt.NDArray[np.float64],
    dtype: Any,
    out: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[Any], bool]:
    """``cast_exact(weight * factor, dtype)`` computed in float64, block by block along axis 0.

    Args:
        weight: the weight (any float dtype).
        factor: float64 factors broadcastable to ``weight.shape`` with the same rank (as returned by
            ``channel_factor``); its axis 0 has length 1 or ``weight.shape[0]``.
        dtype: the dtype of the result.
        out: an array of ``weight.shape`` and ``dtype`` to write into (a reused scratch buffer saves
            allocating and faulting in fresh memory for every weight).

    Returns:
        ``(result, finite)``: the scaled weight in ``dtype`` and whether every value of it is finite
        (checked block by block while the block is in cache).
    """
    dt = np.dtype(dtype)
    exact_cast = dt.name == "bfloat16"
    if weight.ndim == 0 or weight.size == 0 or factor.ndim != weight.ndim:
        res = cast_exact(np.asarray(weight, np.float64) * factor, dt)
        return res, bool(np.all(np.isfinite(res)))
    if out is None:
        out = np.empty(weight.shape, dt)
    n = weight.shape[0]
    step = max(1, _BLOCK // max(1, weight[0].size))
    per_row = factor.shape[0] == n and n > 1

    def run(lo: int, hi: int) -> bool:
        tmp = np.empty((min(step, hi - lo),) + weight.shape[1:], np.float64)
        ok = True
        with np.errstate(over="ignore", invalid="ignore"):
            for i in range(lo, hi, step):
                j = min(hi, i + step)
                t = tmp[: j - i]
                np.multiply(weight[i:j], factor[i:j] if per_row else factor, out=t)
                blk = out[i:j]
                blk[...] = cast_exact(t, dt) if exact_cast else t
                if ok and not np.isfinite(blk).all():
                    ok = False
        return ok

    workers = _workers()
    if weight.size < _PARALLEL_MIN or workers < 2 or n < 2 * step:
        return out, run(0, n)
    # NumPy releases the GIL in these loops: split the rows between threads (results are per element,
    # so the split does not change a single bit).
    chunk = -(-n // workers)
    chunk = -(-chunk // step) * step
    pool = _pool(workers)
    futures = [pool.submit(run, lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    finite = all([f.result() for f in futures])
    return out, finite


_PARALLEL_MIN = 1 << 18  # elements: below this, threads cost more than they save
_POOL: Any = None


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


def _pool(workers: int) -> Any:
    global _POOL
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
        dt = np.dtype(dtype)
        size = 1
        for d in shape:
            size *= int(d)
        buf = self._buf.get(dt.str + dt.name)
        if buf is None or buf.size < size:
            buf = np.empty(size, dt)
            self._buf[dt.str + dt.name] = buf
        return buf[:size].reshape(shape)
