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

Layout: :mod:`.cast` (``cast_exact``, ``fits_dtype``), :mod:`.layout` (``WeightLayout``,
``channel_factor``), :mod:`.blocked` (``scale_cast``, ``Scratch``), :mod:`.folds` (``bn_affine`` and the
folds). Nothing here imports torch or onnx.
"""

from __future__ import annotations

from .blocked import Scratch, scale_cast
from .cast import F64, cast_exact, fits_dtype
from .folds import (
    bn_affine,
    bn_nonfinite_reason,
    fold_backward,
    fold_forward,
    fold_forward_cast,
    fold_gemm_backward,
    fold_gemm_forward,
)
from .layout import LayoutError, WeightLayout, channel_factor

__all__ = [
    "WeightLayout",
    "LayoutError",
    "bn_affine",
    "bn_nonfinite_reason",
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
