"""Correct rounding from float64 to a layer's dtype, once: the edge where fold math goes back.

NumPy casts float64 straight to float32 and float16 with correct rounding (to nearest, ties to even).
A cast to bfloat16 goes through float32 and could round twice; :func:`cast_exact` rounds the float32
step to odd, which makes the second rounding correct. :func:`fits_dtype` says whether values stay
finite after that rounding (an overflow check that agrees with the cast that is done).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def is_bfloat16(dtype: Any) -> bool:
    """True for ``ml_dtypes.bfloat16`` (by name: no import of ml_dtypes needed to say no)."""
    try:
        return bool(np.dtype(dtype).name == "bfloat16")
    except TypeError:
        return False


def is_floating(dtype: Any) -> bool:
    """True for NumPy float16/32/64 and bfloat16 (whose kind is ``"V"``, not ``"f"``)."""
    dt = np.dtype(dtype)
    return bool(dt.kind == "f" or dt.name == "bfloat16")


__all__ = ["F64", "ArrayLike", "f64", "cast_exact", "fits_dtype", "is_bfloat16", "is_floating"]

F64 = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike


def f64(a: ArrayLike) -> F64:
    """``a`` as a float64 array (no copy when it is one already)."""
    return np.asarray(a).astype(np.float64, copy=False)


def cast_exact(x: ArrayLike, dtype: Any) -> npt.NDArray[Any]:
    """Round float64 values to ``dtype`` correctly (to nearest, ties to even), once.

    NumPy casts float64 straight to float32 and float16 with correct rounding. bfloat16 casts go
    through float32 and could round twice; here the float32 step rounds to odd, which makes the
    second rounding correct.

    Args:
        x: float64 values.
        dtype: a NumPy dtype (``ml_dtypes.bfloat16`` for bfloat16).
    """
    a = f64(x)
    dt = np.dtype(dtype)
    if not is_bfloat16(dt):
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
    a = f64(x)
    if not np.all(np.isfinite(a)):
        return False
    return bool(np.all(np.isfinite(cast_exact(a, dtype).astype(np.float64))))
