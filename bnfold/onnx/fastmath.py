"""Compatibility names: the blocked weight product now lives in :mod:`bnfold.fold_math`.

``scale_cast(w, f, dtype) == cast_exact(w.astype(float64) * f, dtype)`` bit for bit; see
:func:`bnfold.fold_math.scale_cast`. Kept so that code importing ``bnfold.onnx.fastmath`` still works.
"""

from __future__ import annotations

from bnfold.fold_math import Scratch, scale_cast

__all__ = ["scale_cast", "Scratch"]
