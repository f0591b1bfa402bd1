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

from .dtypes import bfloat16, to_numpy
from .fold_math import cast_exact
from .fold_math.subnormal import (
    BF16_TINY,
    BITS,
    F16_TINY,
    count_subnormal,
    flush_array,
    has_subnormal_bits,
)
from .health_records import RangeCounts
from .records import FoldReport

__all__ = [
    "count_subnormal",
    "flush_array",
    "range_counts",
    "snapshot",
    "changed_tensors",
    "flush_model",
    "fold_targets",
    "flush_targets",
]


def range_counts(values: npt.ArrayLike) -> RangeCounts:
    """Overflow / underflow counts of ``values`` (any float dtype) cast to float16 and bfloat16."""
    a = np.asarray(values)
    a = a.astype(np.float64).reshape(-1)
    a = a[np.isfinite(a) & (a != 0)]
    if not a.size:
        return RangeCounts()
    out: list[int] = []
    for dt, tiny in ((np.dtype(np.float16), F16_TINY), (np.dtype(bfloat16()), BF16_TINY)):
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


def _onnx_has_subnormal(t: Any) -> bool:
    """Fast check on the raw bytes (no float conversion); other storage goes through NumPy."""
    spec = BITS.get(int(t.data_type))
    raw = t.raw_data
    if spec is None or not raw:
        return count_subnormal(tensor_values(t)) > 0
    return has_subnormal_bits(np.frombuffer(raw, dtype=np.dtype(spec[0]).newbyteorder("<")), spec)


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
            t.name: _onnx_key(t) for t in _onnx_float_initializers(model) if full or _onnx_has_subnormal(t)
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
