"""Subnormal floats in arrays: count them, flush them to zero (pure NumPy, no model involved).

A float is subnormal when its exponent bits are all zero and its mantissa is not: ``0 < |x| < tiny``.
:func:`flush_written` is the rule a fold applies to each tensor it is about to store (float32,
float64, bfloat16; float16 kept), checked on the bits without a float conversion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "count_subnormal",
    "flush_array",
    "flush_written",
    "has_subnormal_bits",
    "BITS",
    "BF16_TINY",
    "F16_TINY",
]


def _is_floating(dtype: np.dtype[Any]) -> bool:
    return bool(dtype.kind == "f" or dtype.name == "bfloat16")


F16_TINY = float(np.finfo(np.float16).tiny)  # 6.10e-05
BF16_TINY = float(np.finfo(np.float32).tiny)  # bfloat16 has float32's exponent range


def _tiny(dtype: np.dtype[Any]) -> float:
    if dtype.name == "bfloat16":
        return BF16_TINY
    return float(np.finfo(dtype).tiny)


def _subnormal_mask(a: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    mag = np.abs(a.astype(np.float64) if a.dtype.name == "bfloat16" else a)
    mask: npt.NDArray[np.bool_] = (mag > 0) & (mag < _tiny(a.dtype))
    return mask


def count_subnormal(a: npt.NDArray[Any]) -> int:
    """Number of subnormal values of ``a`` in its own dtype (0 for non-float arrays)."""
    if not _is_floating(a.dtype):
        return 0
    return int(np.count_nonzero(_subnormal_mask(a)))


def flush_array(a: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    """``a`` with its subnormal values set to zero (a new array when any changed), and their count."""
    if not _is_floating(a.dtype):
        return a, 0
    mask = _subnormal_mask(a)
    n = int(np.count_nonzero(mask))
    if not n:
        return a, 0
    out = np.array(a, copy=True)
    out[mask] = 0
    return out, n


# Bit patterns: a value is subnormal when its exponent bits are all 0 and its mantissa is not, i.e.
# when ``(bits & ~sign) - 1 < mantissa mask`` in unsigned arithmetic (0 wraps around to the maximum).
BITS: dict[int, tuple[Any, int, int]] = {
    1: (np.uint32, 0x7FFFFFFF, 0x007FFFFF),  # FLOAT
    10: (np.uint16, 0x7FFF, 0x03FF),  # FLOAT16
    16: (np.uint16, 0x7FFF, 0x007F),  # BFLOAT16
    11: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x000FFFFFFFFFFFFF),  # DOUBLE
}


_CHUNK = 1 << 16  # values per step: the temporaries stay in cache (about 2x faster than whole arrays)


# NumPy dtype -> ONNX element type (bfloat16 is looked up by name), for the bit check of arrays.
_ELEM = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def has_subnormal_bits(bits: npt.NDArray[Any], spec: tuple[Any, int, int]) -> bool:
    """True when a value of ``bits`` (the unsigned view of a float array) is subnormal; chunked."""
    ut, nosign_bits, mant_bits = spec
    nosign, one, mant = ut(nosign_bits), ut(1), ut(mant_bits)
    bits = bits.reshape(-1)
    buf: npt.NDArray[Any] = np.empty(min(_CHUNK, bits.size), dtype=bits.dtype)
    for i in range(0, bits.size, _CHUNK):
        c = bits[i : i + _CHUNK]
        b = buf[: c.size]
        np.bitwise_and(c, nosign, out=b)
        np.subtract(b, one, out=b)  # zero wraps around to the maximum: only subnormals fall below mant
        if b.min() < mant:
            return True
    return False


def flush_written(a: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    """A tensor a fold is about to store, with its subnormal values set to zero, and their count.

    The rule of the model post-pass (float32, float64 and bfloat16; float16 and non-float arrays are
    returned as they are), applied before the tensor is stored, so nothing is read back out of the
    model. The check runs on the bits (no float conversion); ``a`` itself is returned, uncopied, when
    it holds no subnormal value (the usual case).
    """
    elem = _ELEM.get(a.dtype)
    if elem is None and a.dtype.kind == "V" and a.dtype.name == "bfloat16":
        elem = 16
    if elem is None or elem == 10 or not a.size:
        return a, 0
    spec = BITS[elem]
    arr = np.ascontiguousarray(a)
    if not has_subnormal_bits(arr.view(np.dtype(spec[0]).newbyteorder(arr.dtype.byteorder)), spec):
        return a, 0
    return flush_array(arr)
