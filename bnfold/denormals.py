"""Subnormal (denormal) values: count them, check float16/bfloat16 range, and flush them to zero.

Why: folding multiplies weights by ``gamma / sqrt(var + eps)``. A tiny gamma (say 1e-39, or a channel
pruned towards zero) makes folded float32 weights *subnormal* (nonzero, below ``finfo.tiny`` =
1.18e-38). Most x86 CPUs take a micro-code assist on every multiply with a subnormal operand unless
flush-to-zero is on, which onnxruntime and PyTorch leave off by default: a convolution with such
weights ran 30-80x slower on the machine this was written on (see ``benchmarks/bench_denormals.py``).

Rules:

* a value ``x`` is *subnormal* in its dtype when ``0 < |x| < finfo(dtype).tiny``;
* flushing sets exactly those values to +0 (sign dropped). The change per value is below
  ``finfo.tiny``, so each product ``w * x`` moves by less than ``tiny * |x|``: far below any
  tolerance, and verification still runs on the flushed model;
* the model post-pass flushes float32, float64 and bfloat16 tensors (tiny <= 1.2e-38), never float16:
  float16 subnormals reach 6.1e-5, which is not negligible, and CPUs compute float16 in float32, where
  they are normal numbers (no slowdown);
* the post-pass touches only the tensors the fold wrote, found by comparing with a snapshot taken
  before the fold (:func:`snapshot`): for ONNX the initializers that are new or whose bytes changed,
  for PyTorch the parameters and buffers that are new tensor objects. The fold backends are not
  involved; the original model is never changed (a functional fold writes new tensors);
* the ONNX fold can instead flush each tensor as it writes it (``fold_model(...,
  flush_denormals=True)``, through :func:`flush_written`): the same rule on the same tensors, with no
  second read of the weights out of the model; :func:`flush_targets` then reads nothing.

The range check casts float64 values with correct rounding (:func:`bnfold.fold_math.cast_exact`) to
float16 and bfloat16; a nonzero finite value *overflows* when it rounds to infinity and *underflows*
when it rounds to a subnormal or to zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from ._dtypes import bfloat16, is_floating, to_numpy
from .fold_math import cast_exact
from .records import FoldReport, RangeCounts

__all__ = [
    "count_subnormal",
    "flush_array",
    "range_counts",
    "snapshot",
    "changed_tensors",
    "flush_model",
    "flush_written",
    "fold_targets",
    "flush_targets",
]

_F16_TINY = float(np.finfo(np.float16).tiny)  # 6.10e-05
_BF16_TINY = float(np.finfo(np.float32).tiny)  # bfloat16 has float32's exponent range




def _tiny(dtype: np.dtype[Any]) -> float:
    if dtype.name == "bfloat16":
        return _BF16_TINY
    return float(np.finfo(dtype).tiny)




def _subnormal_mask(a: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    mag = np.abs(a.astype(np.float64) if a.dtype.name == "bfloat16" else a)
    mask: npt.NDArray[np.bool_] = (mag > 0) & (mag < _tiny(a.dtype))
    return mask


def count_subnormal(a: npt.NDArray[Any]) -> int:
    """Number of subnormal values of ``a`` in its own dtype (0 for non-float arrays)."""
    if not is_floating(a.dtype):
        return 0
    return int(np.count_nonzero(_subnormal_mask(a)))


def flush_array(a: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], int]:
    """``a`` with its subnormal values set to zero (a new array when any changed), and their count."""
    if not is_floating(a.dtype):
        return a, 0
    mask = _subnormal_mask(a)
    n = int(np.count_nonzero(mask))
    if not n:
        return a, 0
    out = np.array(a, copy=True)
    out[mask] = 0
    return out, n


def range_counts(values: npt.ArrayLike) -> RangeCounts:
    """Overflow / underflow counts of ``values`` (any float dtype) cast to float16 and bfloat16."""
    a = np.asarray(values)
    a = a.astype(np.float64).reshape(-1)
    a = a[np.isfinite(a) & (a != 0)]
    if not a.size:
        return RangeCounts()
    out: list[int] = []
    for dt, tiny in ((np.dtype(np.float16), _F16_TINY), (np.dtype(bfloat16()), _BF16_TINY)):
        c = np.abs(cast_exact(a, dt).astype(np.float64))
        out += [int(np.count_nonzero(np.isinf(c))), int(np.count_nonzero(c < tiny))]
    return RangeCounts(*out)


# ------------------------------------------------------------------------------- model post-pass
def _kind(model: Any) -> str:
    from .kinds import model_kind

    return model_kind(model)


def _onnx_graphs(model: Any) -> list[Any]:
    from .onnx.graph import all_graphs

    return all_graphs(model.graph)


def _onnx_float_initializers(model: Any) -> Iterator[Any]:
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    for g in _onnx_graphs(model):
        for t in g.initializer:
            if t.data_type in floats:
                yield t


def _onnx_key(t: Any) -> int:
    # The serialised tensor holds name, dims, type and data: any change of the data changes it.
    return hash(t.SerializeToString(deterministic=True))


# Bit patterns: a value is subnormal when its exponent bits are all 0 and its mantissa is not, i.e.
# when ``(bits & ~sign) - 1 < mantissa mask`` in unsigned arithmetic (0 wraps around to the maximum).
_BITS: dict[int, tuple[Any, int, int]] = {
    1: (np.uint32, 0x7FFFFFFF, 0x007FFFFF),  # FLOAT
    10: (np.uint16, 0x7FFF, 0x03FF),  # FLOAT16
    16: (np.uint16, 0x7FFF, 0x007F),  # BFLOAT16
    11: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x000FFFFFFFFFFFFF),  # DOUBLE
}


_CHUNK = 1 << 16  # values per step: the temporaries stay in cache (about 2x faster than whole arrays)


def _onnx_has_subnormal(t: Any) -> bool:
    """Fast check on the raw bytes (no float conversion); other storage goes through NumPy."""
    spec = _BITS.get(int(t.data_type))
    raw = t.raw_data
    if spec is None or not raw:
        return count_subnormal(tensor_values(t)) > 0
    return _has_subnormal_bits(np.frombuffer(raw, dtype=np.dtype(spec[0]).newbyteorder("<")), spec)


# NumPy dtype -> ONNX element type (bfloat16 is looked up by name), for the bit check of arrays.
_ELEM = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def _has_subnormal_bits(bits: npt.NDArray[Any], spec: tuple[Any, int, int]) -> bool:
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
    spec = _BITS[elem]
    arr = np.ascontiguousarray(a)
    if not _has_subnormal_bits(arr.view(np.dtype(spec[0]).newbyteorder(arr.dtype.byteorder)), spec):
        return a, 0
    return flush_array(arr)


def _torch_has_subnormal(t: Any) -> bool:
    import torch

    d = t.detach()
    return bool(((d != 0) & (d.abs() < torch.finfo(d.dtype).tiny)).any())


def _torch_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        yield from model.state_dict.items()
        yield from model.constants.items()
        return
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def snapshot(model: Any, *, full: bool = True) -> dict[str, Any]:
    """What the model holds before a fold, to tell afterwards which tensors the fold wrote.

    ONNX: ``{name: hash of the serialised tensor}`` of every float initializer (all subgraphs); with
    ``full=False`` only of those that already hold a subnormal value (a fast scan of the raw bytes):
    enough for :func:`flush_model`, which only looks at tensors holding one after the fold.
    PyTorch: ``{name: tensor}`` of every parameter and buffer (references, not copies: a functional
    fold leaves them as they are; with ``inplace=True`` the fold puts new tensors in their place).
    """
    if _kind(model) == "onnx":
        return {
            t.name: _onnx_key(t)
            for t in _onnx_float_initializers(model)
            if full or _onnx_has_subnormal(t)
        }
    return dict(_torch_tensors(model))


def _same_torch(old: Any, new: Any) -> bool:
    import torch

    if old is new:
        return True
    return bool(old.shape == new.shape and old.dtype == new.dtype and torch.equal(old.detach(), new.detach()))


def _unchanged(name: str, t: Any, before: dict[str, Any] | None, onnx_model: bool) -> bool:
    if before is None or name not in before:
        return False
    return bool(before[name] == _onnx_key(t)) if onnx_model else _same_torch(before[name], t)


def _float_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    if _kind(model) == "onnx":
        for t in _onnx_float_initializers(model):
            yield t.name, t
        return
    seen: set[int] = set()
    for name, t in _torch_tensors(model):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            yield name, t


def changed_tensors(model: Any, before: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The float tensors of ``model`` that the (full) snapshot ``before`` does not hold: what the fold
    wrote.

    A tensor is unchanged when the snapshot has one of the same name with the same values (ONNX: the
    same serialised bytes); a deep copy of an untouched layer is therefore not counted.
    ``before=None`` means every float tensor (used where no snapshot can tell old from new, such as
    a PyTorch model exported to ONNX, whose initializers are all written anew).

    Returns:
        ``(name, tensor)`` pairs: ONNX ``TensorProto`` or ``torch.Tensor``, each tensor once.
    """
    onnx_model = _kind(model) == "onnx"
    return [(n, t) for n, t in _float_tensors(model) if not _unchanged(n, t, before, onnx_model)]


def tensor_values(t: Any) -> npt.NDArray[Any]:
    """A NumPy view (or copy) of an ONNX ``TensorProto`` or a ``torch.Tensor``."""
    if type(t).__name__ == "TensorProto":
        from onnx import numpy_helper

        return np.asarray(numpy_helper.to_array(t))
    return to_numpy(t)


def _flush_onnx_tensor(t: Any) -> int:
    from onnx import TensorProto, numpy_helper

    if t.data_type == TensorProto.FLOAT16:
        return 0  # see the module docstring

    new, n = flush_array(tensor_values(t))
    if n:
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), t.name))
    return n


def _flush_torch_tensor(t: Any) -> int:
    import torch

    d = t.detach()
    if d.dtype == torch.float16:
        return 0  # see the module docstring
    tiny = torch.finfo(d.dtype).tiny
    mask = (d != 0) & (d.abs() < tiny)
    n = int(mask.sum())
    if n:
        with torch.no_grad():
            d.masked_fill_(mask, 0.0)
    return n


def flush_model(model: Any, before: dict[str, Any] | None) -> int:
    """Set the subnormal values of the tensors the fold wrote to zero, in ``model``; return how many.

    Only tensors holding a subnormal value are compared with the snapshot, so a light snapshot
    (``snapshot(model, full=False)``) is enough.

    Args:
        model: the folded model (``onnx.ModelProto``, ``nn.Module`` or ``ExportedProgram``); edited.
        before: :func:`snapshot` of the model taken before the fold, or None for every float tensor.
    """
    total = 0
    onnx_model = _kind(model) == "onnx"
    for name, t in _float_tensors(model):
        has = _onnx_has_subnormal(t) if onnx_model else _torch_has_subnormal(t)
        if not has or _unchanged(name, t, before, onnx_model):
            continue
        total += _flush_onnx_tensor(t) if onnx_model else _flush_torch_tensor(t)
    return total


def fold_targets(model: Any, report: FoldReport) -> list[Any]:
    """ONNX: the float initializers read by the layers a fold wrote into (each once).

    The targets are the report's sites (``Site.target`` is the layer's node name, or
    ``<op_type>_<index>`` for an unnamed node, its index in the model the fold was given: the node
    at that index of ``model`` must have that op type; nodes removed before it shift it, so such a
    target can be missed or another unnamed node of its type taken -- a fold with
    ``flush_denormals=True`` flushes as it writes and needs no lookup), the per-channel
    Mul+Add folds in ``report.mul_add``, and the ``<bn>.scale`` / ``<bn>.shift`` constants of
    affine replacements.
    """
    from .records import Direction

    wanted: dict[str, str] = {}
    affine: set[str] = set()
    for v in report.sites:
        if v.direction is Direction.AFFINE:
            affine.add(v.bn)
        else:
            wanted[v.target] = v.target_kind
    for d in report.mul_add:
        wanted[d.target] = d.target_kind
    names: set[str] = set()
    for g in _onnx_graphs(model):
        for i, n in enumerate(g.node):
            if n.name:
                hit = n.name in wanted
            else:  # an unnamed node: its label is its index in the model the fold was given
                kind = wanted.get(f"{n.op_type}_{i}")
                hit = kind == n.op_type or (kind == "MatMul" and n.op_type == "Gemm")
            if hit:
                names.update(x for x in n.input if x)
    out: list[Any] = []
    seen: set[int] = set()
    for t in _onnx_float_initializers(model):
        stem = t.name.rsplit(".scale", 1)[0] if ".scale" in t.name else t.name.rsplit(".shift", 1)[0]
        if (t.name in names or (stem in affine and stem != t.name)) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def flush_targets(model: Any, report: FoldReport) -> int:
    """ONNX: flush the subnormal values of the initializers of the fold targets (:func:`fold_targets`).

    Needs no snapshot from before the fold (so an in-place fold costs one scan of the written layers).
    A report whose ``flushed_denormals`` is already set comes from a fold that flushed each tensor as
    it wrote it (``fold_model(..., flush_denormals=True)``): its count is returned, nothing is read.
    """
    if report.flushed_denormals is not None:
        return report.flushed_denormals
    total = 0
    for t in fold_targets(model, report):
        if _onnx_has_subnormal(t):
            total += _flush_onnx_tensor(t)
    return total
