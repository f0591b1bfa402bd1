"""The one bridge between torch tensors and NumPy arrays, bfloat16 included.

Rules:
    * NumPy has no bfloat16 of its own: bnfold uses ``ml_dtypes.bfloat16`` (a dependency of onnx, so
      present wherever bnfold runs); :func:`is_bfloat16` recognises it by name, without importing it;
    * :func:`to_numpy` and :func:`from_numpy` are exact: the same bits on both sides (a bfloat16 tensor
      travels as its 16-bit pattern, since ``Tensor.numpy()`` refuses bfloat16);
    * :func:`from_float64` rounds float64 values once, correctly, to a torch dtype
      (:func:`bnfold.fold_math.cast_exact`): the edge where fold math goes back to a layer's dtype;
    * torch is imported only when a function is called with a torch dtype or tensor, never at import,
      so ONNX-only users of the modules importing this one do not pay for it.
"""

from __future__ import annotations

from typing import Any, overload

import numpy as np
import numpy.typing as npt

# The pure NumPy tests live with the fold math (no cycle; the ONNX backend uses them without this bridge).
from .fold_math.cast import is_bfloat16, is_floating

__all__ = [
    "bfloat16",
    "is_bfloat16",
    "is_floating",
    "numpy_dtype",
    "to_numpy",
    "from_numpy",
    "to_float64",
    "from_float64",
]


def bfloat16() -> np.dtype[Any]:
    """NumPy's bfloat16: ``ml_dtypes.bfloat16``."""
    import ml_dtypes

    dt: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    return dt


def numpy_dtype(dtype: Any) -> np.dtype[Any]:
    """The NumPy dtype of a torch dtype (``torch.bfloat16`` -> ``ml_dtypes.bfloat16``)."""
    import torch

    if dtype == torch.bfloat16:
        return bfloat16()
    dt: np.dtype[Any] = torch.empty((), dtype=dtype).numpy().dtype
    return dt


def to_numpy(t: Any) -> npt.NDArray[Any]:
    """A tensor's values as a NumPy array of the same dtype, bit for bit (detached, on the CPU)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return np.asarray(t.view(torch.int16).numpy().view(bfloat16()))
    return np.asarray(t.numpy())


def from_numpy(a: npt.NDArray[Any]) -> Any:
    """A NumPy array as a CPU tensor of the same dtype, bit for bit."""
    import torch

    if is_bfloat16(a.dtype):
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


@overload
def to_float64(t: None) -> None: ...
@overload
def to_float64(t: Any) -> npt.NDArray[np.float64]: ...
def to_float64(t: Any) -> npt.NDArray[np.float64] | None:
    """A tensor as a float64 NumPy array (exact: float64 holds every narrower float); None stays None."""
    if t is None:
        return None
    import torch

    return np.asarray(t.detach().cpu().to(torch.float64).numpy())


def from_float64(a: npt.ArrayLike, dtype: Any, device: Any = None) -> Any:
    """Float64 values rounded once (to nearest, ties to even) to torch ``dtype``, on ``device``."""
    from .fold_math import cast_exact

    t = from_numpy(cast_exact(a, numpy_dtype(dtype)))
    return t if device is None else t.to(device)
