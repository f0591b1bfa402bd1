"""BN health audit: statistics that make a fold (or the BN itself) numerically fragile.

For every BatchNorm (eval mode, ``scale = gamma / sqrt(var + eps)``) the audit reports:

1. *constant channels*: ``gamma == 0`` exactly. The channel's output is the constant ``beta``
   whatever the input (a dead or pruned channel);
2. *near-zero gamma*: ``0 < |gamma| < finfo(float32).tiny`` (a subnormal gamma) or
   ``|gamma| <= 1e-6 * max |gamma|`` (:data:`NEAR_ZERO_GAMMA_REL`): the output is nearly constant, and
   folding writes weights that are (nearly) subnormal;
3. *small variance*: ``var <= eps``: eps dominates the denominator and the scale is blown up towards
   ``gamma / sqrt(eps)`` (316 x gamma for eps = 1e-5) -- a channel that saw a constant input;
4. the scales, and the values the fold writes into the target layer, cast to float16 and bfloat16:
   how many overflow (round to inf) or underflow (round to a subnormal or to zero);
5. how many of the values the fold writes are subnormal in their own dtype (float32 for a float32
   model): each makes CPU inference slower unless flushed (``fold(..., flush_denormals=True)``).

And for every layer the fold writes a weight into (Conv / ConvTranspose / Gemm / MatMul in ONNX,
convolutions and Linear in PyTorch), its quantisation readiness (:class:`~bnfold.health_records.LayerQuant`):
the ratio of the largest per-output-channel weight range (``max |w|``) to the median one, computed on
the folded weight in float64, and ``log2`` of it, the bits the median channel loses under per-tensor
symmetric int8. Folding multiplies each channel by its own BN scale, so one channel with a tiny
variance can set the whole tensor's scale (MobileNetV2: 71.7% -> 0.1% top-1 with per-tensor int8 after
folding, Nagel et al. 2019). Per-channel weight quantisation, or cross-layer equalisation before a
per-tensor quantiser, removes the loss. It costs one ``max |w|`` pass over each written weight, and
runs with the audit only (the audit is what knows which tensors the fold wrote). A weight that comes
through ``DequantizeLinear`` (QDQ graphs) counts as the weight it dequantizes to: per output channel
``max |q - z| * |s|`` from the integers' extremes (:func:`dq_channel_ranges`; no runtime, no float copy
where the scale is per tensor or on the output axis).

Which layer each BN folds into comes from the backends' own matchers: the audit folds a copy of the
model (:func:`bnfold.health` = :func:`bnfold.api.health` folds a copy, then calls :func:`audit`) and reads the tensors the fold wrote (those that differ
from the original, :func:`bnfold.denormals.changed_tensors`). The BN parameters are read from the
original model. Nothing is changed; ``torch.export`` programs are not audited (fold them as the
``nn.Module`` they came from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .dtypes import to_float64
from .errors import UnsupportedModelError
from .health_records import BnHealth, HealthReport, LayerQuant, RangeCounts
from .records import Direction, FoldReport, Site, Verdict

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import numpy.typing as npt

    F64 = npt.NDArray[np.float64]

# NumPy and the backends are imported inside the functions (an ONNX user never imports torch).

__all__ = ["NEAR_ZERO_GAMMA_REL", "audit", "channel_ranges", "dq_channel_ranges", "fold_quant", "layer_quant"]

NEAR_ZERO_GAMMA_REL = 1e-6
"""A gamma at most this fraction of the BN's largest |gamma| counts as near zero (a pruned channel)."""

_F32_TINY = 1.1754943508222875e-38
"""``numpy.finfo(numpy.float32).tiny``: the smallest normal float32."""


@dataclass(frozen=True, slots=True)
class _Params:
    gamma: F64
    var: F64
    eps: float


def audit(original: Any, folded: Any, report: FoldReport, before: Any = None) -> HealthReport:
    """The health report of a fold already done: ``folded`` and ``report`` came from ``original``.

    Args:
        original: the model before the fold (still holding its BatchNorms; not changed).
        folded: the folded model (not a dry run).
        report: the fold's report (its verdicts name each BN's target).
        before: :func:`bnfold.denormals.snapshot` of ``original`` taken before the fold; default: taken
            now (right when ``original`` was not folded in place).
    """
    from .denormals import changed_tensors, range_counts, snapshot, tensor_values
    from .fold_math.subnormal import count_subnormal
    from .kinds import model_kind

    kind = model_kind(original)
    if kind == "export":
        raise UnsupportedModelError(
            "the health audit reads nn.Module and ONNX models, not torch.export programs"
        )
    if before is None:
        before = snapshot(original)
    changed = changed_tensors(folded, before) if folded is not original else []
    values = {name: tensor_values(t) for name, t in changed}
    by_id = {id(t): name for name, t in changed}
    if kind == "onnx":
        params = _onnx_params(original)
        targets = _onnx_targets(folded, set(values))
    else:
        params = _torch_params(original)
        targets = _torch_targets(folded, by_id)
    records = tuple(
        _record(v, params.get(v.bn, params.get(v.bn.split("#")[0])), targets, values) for v in report.verdicts
    )
    total_range = RangeCounts()
    for a in values.values():
        total_range = total_range + range_counts(a)
    return HealthReport(
        backend=report.backend,
        bns=records,
        changed_values=int(sum(a.size for a in values.values())),
        subnormal=sum(count_subnormal(a) for a in values.values()),
        folded_range=total_range,
        quant=_quant(original, folded, report, kind),
    )


# ------------------------------------------------------------------------------- quantisation
def channel_ranges(weight: Any, kind: str, *, groups: int = 1, trans_b: bool = False) -> F64:
    """``max |w|`` of each output channel of a layer's weight, in float64.

    ``kind``: the layer type. Output channels are axis 0 of a convolution's and of a Linear's weight
    (and of a Gemm's B with ``transB=1``); a transposed convolution's weight is ``(C_in, C_out / groups,
    ...)``; a MatMul's (and a Gemm's with ``transB=0``) is ``(..., K, N)``, output channels last.
    """
    import numpy as np

    hi, lo = _channel_extremes(weight, kind, groups=groups, trans_b=trans_b)
    out: F64 = np.maximum(hi, -lo)
    return out


def _channel_extremes(weight: Any, kind: str, *, groups: int = 1, trans_b: bool = False) -> tuple[F64, F64]:
    """``(max w, min w)`` of each output channel (see :func:`channel_ranges`), in float64; an integer
    weight is read in its own dtype (no float copy)."""
    import numpy as np

    w = np.asarray(weight)
    if w.dtype not in (np.float16, np.float32, np.float64) and w.dtype.kind not in "iu":
        w = w.astype(np.float64)
    k = kind.lower()
    if "transpose" in k:
        g = max(int(groups), 1)
        w = w.reshape(g, w.shape[0] // g, *w.shape[1:])  # (g, Cin/g, Cout/g, ...)
        w = np.moveaxis(w, 2, 1).reshape(g * w.shape[2], -1)
    elif k == "matmul" or (k == "gemm" and not trans_b):
        w = np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)
    else:
        w = w.reshape(w.shape[0], -1)
    if not w.size:
        zero = np.zeros(w.shape[0], dtype=np.float64)
        return zero, zero
    # exact in the weight's own dtype: no float64 copy of the weight
    return w.max(axis=1).astype(np.float64), w.min(axis=1).astype(np.float64)


def dq_channel_ranges(
    q: Any, scale: Any, zero_point: Any, axis: int, kind: str, *, groups: int = 1, trans_b: bool = False
) -> F64 | None:
    """``max |w|`` per output channel of ``w = DequantizeLinear(q, scale, zero_point, axis)``, in float64.

    A per-tensor scale, or per-channel scales on the output-channel axis: ``max |q - z| * |s|`` from
    each channel's integer extremes (no dequantized copy). Scales on another axis: the weight is
    dequantized in float64 once. None where the scales fit neither (blocked quantization).
    """
    import numpy as np

    q = np.asarray(q)
    s = np.asarray(scale, dtype=np.float64)
    z = np.zeros_like(s) if zero_point is None else np.asarray(zero_point).astype(np.float64)
    if q.ndim < 2 or z.shape != s.shape or s.ndim > 1:
        return None
    k = kind.lower()
    out_axis = 0 if k == "conv" or (k == "gemm" and trans_b) else (1 if "transpose" in k else q.ndim - 1)
    axis = axis + q.ndim if axis < 0 else axis
    if s.size != 1 and (axis >= q.ndim or s.size != q.shape[axis]):
        return None
    if s.size == 1 or (axis == out_axis and ("transpose" not in k or max(int(groups), 1) == 1)):
        hi, lo = _channel_extremes(q, kind, groups=groups, trans_b=trans_b)
        zc, sc = z.reshape(-1), np.abs(s.reshape(-1))  # one value, or one per output channel
        out: F64 = np.maximum(hi - zc, zc - lo) * sc
        return out
    shape = [1] * q.ndim
    shape[axis] = -1
    w = (q.astype(np.float64) - z.reshape(shape)) * s.reshape(shape)
    return channel_ranges(w, kind, groups=groups, trans_b=trans_b)


def _ratio(ranges: F64) -> tuple[float, float]:
    """``(max / median over the nonzero channels, that median)``; ``(1, 0)`` when all are zero."""
    import numpy as np

    nz = ranges[ranges > 0]
    if not nz.size:
        return 1.0, 0.0
    med = float(np.median(nz))
    return float(ranges.max()) / med, med


def layer_quant(layer: str, kind: str, folded: F64, original: F64 | None = None) -> LayerQuant:
    """The :class:`LayerQuant` record of one layer from its per-channel ranges (:func:`channel_ranges`)."""
    import numpy as np

    ratio, med = _ratio(folded)
    before = _ratio(original)[0] if original is not None and original.shape == folded.shape else 0.0
    return LayerQuant(
        layer=layer,
        kind=kind,
        channels=int(folded.size),
        max_range=float(folded.max()) if folded.size else 0.0,
        median_range=med,
        worst_channel=int(np.argmax(folded)) if folded.size else 0,
        ratio=ratio,
        ratio_before=before,
    )


def fold_quant(folded: Any, report: FoldReport) -> tuple[LayerQuant, ...]:
    """The quantisation-readiness records of a fold already done, without the rest of the audit:
    the per-channel weight ranges of the layers the fold wrote into, read from ``folded`` alone (no
    snapshot, no original, no runtime; ``ratio_before`` is 0). One ``max |w|`` pass over each of
    those weights -- what ``bnfold fold`` adds to every fold for its summary line. A weight the fold
    left in a spill file (:func:`bnfold.io.stream.spilling`) or a lazy external file is read from it.
    """
    from .kinds import model_kind

    kind = model_kind(folded)
    if report.dry_run or kind not in ("onnx", "module", "fx"):
        return ()
    return _quant(None, folded, report, kind)


def _quant(original: Any, folded: Any, report: FoldReport, kind: str) -> tuple[LayerQuant, ...]:
    """One record per distinct layer a forward or backward fold wrote into (skipped: layers whose
    weight is not a constant the audit can read). ``original`` None: no ``ratio_before``."""
    seen: dict[str, str] = {}
    for v in report.verdicts:
        if isinstance(v, Site) and v.direction is not Direction.AFFINE and v.target:
            seen.setdefault(v.target, v.target_kind)
    if folded is original or not seen:
        return ()
    read = _onnx_weights if kind == "onnx" else _torch_weights
    now = read(folded, set(seen))
    then = read(original, set(seen)) if original is not None else {}
    out: list[LayerQuant] = []
    for name in seen:
        if name not in now:
            continue
        op, ranges = now[name]
        out.append(layer_quant(name, op, ranges, then[name][1] if name in then else None))
    return tuple(out)


def _onnx_weights(model: Any, names: set[str]) -> dict[str, tuple[str, F64]]:
    """Node label -> (op type, per-channel ranges) of the named Conv/ConvTranspose/Gemm/MatMul nodes
    whose weight is an initializer, or a DequantizeLinear of initializers (integer weights, float
    scales: :func:`dq_channel_ranges`)."""
    from onnx import helper, numpy_helper

    from .onnx.graph import read_lazy_tensor, text

    out: dict[str, tuple[str, F64]] = {}
    for g, prefix, _ in _onnx_walk(model):
        inits = {t.name: t for t in g.initializer}
        dqs = {
            n.output[0]: n
            for n in g.node
            if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx") and n.output
        }
        for i, n in enumerate(g.node):
            name = text(n.name)  # a name that is not UTF-8 comes as bytes: labelled as the fold labels it
            labels = {prefix + name, f"{prefix}{n.op_type}_{i}"} if name else {f"{prefix}{n.op_type}_{i}"}
            hit = labels & names
            if not hit or n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(n.input) < 2:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Gemm" and attrs.get("transA", 0):
                continue
            groups, trans_b = int(attrs.get("group", 1)), bool(attrs.get("transB", 0))
            if n.input[1] not in inits:  # a quantized weight: DequantizeLinear of int initializers
                dq = _dq_ranges(dqs.get(n.input[1]), inits, n.op_type, groups, trans_b)
                if dq is not None:
                    for label in hit:
                        out[label] = (n.op_type, dq)
                continue
            t = inits[n.input[1]]
            lazy = read_lazy_tensor(t) if t.data_location == t.EXTERNAL else None
            w = lazy if lazy is not None else numpy_helper.to_array(t)
            if w.ndim < 2 or w.dtype.kind != "f":
                continue
            ranges = channel_ranges(w, n.op_type, groups=groups, trans_b=trans_b)
            for label in hit:
                out[label] = (n.op_type, ranges)
    return out


def _dq_ranges(dq: Any, inits: dict[str, Any], kind: str, groups: int, trans_b: bool) -> F64 | None:
    """The per-channel ranges of a weight that DequantizeLinear ``dq`` makes from initializers, or None."""
    if dq is None or not 2 <= len(dq.input) <= 3 or any(i and i not in inits for i in dq.input):
        return None
    from onnx import helper, numpy_helper

    from .onnx.graph import read_lazy_tensor

    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    if int(attrs.get("block_size", 0)):
        return None
    t = inits[dq.input[0]]
    lazy = read_lazy_tensor(t) if t.data_location == t.EXTERNAL else None
    q = lazy if lazy is not None else numpy_helper.to_array(t)
    s = numpy_helper.to_array(inits[dq.input[1]])
    z = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
    if q.dtype.kind not in "iu" or s.dtype.kind != "f" or (z is not None and z.dtype.kind not in "iu"):
        return None
    return dq_channel_ranges(q, s, z, int(attrs.get("axis", 1)), kind, groups=groups, trans_b=trans_b)


def _torch_weights(model: Any, names: set[str]) -> dict[str, tuple[str, F64]]:
    """Module name -> (class name, per-channel ranges) of the named convolutions and Linear layers."""
    import torch
    from torch import nn

    out: dict[str, tuple[str, F64]] = {}
    for name, m in model.named_modules():
        if name not in names or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or not w.is_floating_point():
            continue
        kind = type(m).__name__
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            kind = "ConvTranspose"
        out[name] = (kind, channel_ranges(to_float64(w), kind, groups=int(getattr(m, "groups", 1))))
    return out


def _record(
    v: Verdict,
    p: _Params | str | None,
    targets: dict[str, list[str]],
    values: dict[str, npt.NDArray[Any]],
) -> BnHealth:
    import numpy as np

    from .denormals import range_counts
    from .fold_math.subnormal import count_subnormal

    status = "left"
    target = ""
    if isinstance(v, Site):
        status = "affine" if v.direction is Direction.AFFINE else "folded"
        target = v.target
    if not isinstance(p, _Params):
        return BnHealth(v.bn, status, target, note=p or "parameters not found")
    g, var, eps = p.gamma, p.var, p.eps
    mag = np.abs(g)
    gmax = float(mag.max()) if mag.size else 0.0
    near = (mag > 0) & ((mag < _F32_TINY) | (mag <= NEAR_ZERO_GAMMA_REL * gmax))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = g / np.sqrt(var + eps)
    finite = scale[np.isfinite(scale)]
    names: list[str] = []
    if isinstance(v, Site):
        key = f"affine:{v.bn}" if v.direction is Direction.AFFINE else v.target
        names = targets.get(key, [])
    arrays = [values[n] for n in names]
    folded_range = RangeCounts()
    for a in arrays:
        folded_range = folded_range + range_counts(a)
    note = ""
    if isinstance(v, Site) and not names:
        note = "the tensors written into the target were not found (figures cover the whole model only)"
    return BnHealth(
        bn=v.bn,
        status=status,
        target=target,
        channels=int(g.size),
        eps=eps,
        constant_channels=tuple(int(i) for i in np.flatnonzero(g == 0)),
        near_zero_gamma=tuple(int(i) for i in np.flatnonzero(near)),
        small_var=tuple(int(i) for i in np.flatnonzero(var <= eps)),
        max_abs_scale=float(np.max(np.abs(finite))) if finite.size else float("inf"),
        scale_range=range_counts(finite),
        folded_values=int(sum(a.size for a in arrays)),
        subnormal=sum(count_subnormal(a) for a in arrays),
        folded_range=folded_range,
        note=note,
    )


# ------------------------------------------------------------------------------------------ ONNX
def _onnx_walk(model: Any) -> list[tuple[Any, str, Any]]:
    """``(graph, prefix, outer graph)`` for the main graph and every subgraph, with the label prefixes
    :func:`bnfold.onnx.fold.fold_model` gives the BNs inside them."""
    from .onnx.graph import node_subgraphs, text

    out: list[tuple[Any, str, Any]] = []
    stack: list[tuple[Any, str, Any]] = [(model.graph, "", None)]
    while stack:
        g, prefix, outer = stack.pop()
        out.append((g, prefix, outer))
        for i, n in enumerate(g.node):
            for attr, sub in node_subgraphs(n):
                stack.append((sub, f"{prefix}{text(n.name) or f'{n.op_type}_{i}'}/{attr}/", g))
    return out


def _onnx_params(model: Any) -> dict[str, _Params | str]:
    """BN label (as in the fold's verdicts) -> its gamma, var and eps, read with the constant evaluator."""
    from .onnx.const import ConstEvaluator
    from .onnx.graph import GraphIndex, is_bn

    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    ir = int(model.ir_version)
    out: dict[str, _Params | str] = {}
    indexes: dict[int, tuple[Any, Any]] = {}
    for g, prefix, outer in _onnx_walk(model):
        outer_index, outer_ev = indexes.get(id(outer), (None, None)) if outer is not None else (None, None)
        index = GraphIndex.build(g, outer_index, ir)
        ev = ConstEvaluator(index, opset, outer_ev)
        indexes[id(g)] = (index, ev)
        seen: dict[str, int] = {}
        for i, n in enumerate(g.node):
            if not is_bn(n):
                continue
            label = prefix + (n.name or f"BatchNormalization_{i}")
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}#{seen[label]}"
            out[label] = _onnx_bn(n, ev)
    return out


def _onnx_bn(node: Any, ev: Any) -> _Params | str:
    import numpy as np

    if len(node.input) < 5:
        return "BatchNormalization with fewer than 5 inputs"
    arrays: list[F64] = []
    for k, what in ((1, "scale"), (4, "var")):
        v, _reason, detail = ev.resolve(node.input[k])
        if v is None:
            return f"BN {what} is not a constant ({detail})"
        arrays.append(np.asarray(v).astype(np.float64).reshape(-1))
    from bnfold.onnx.graph import attr

    eps = float(attr(node, "epsilon", 1e-5, getattr(ev, "opset", None)))  # float32(1e-5) when absent
    return _Params(arrays[0], arrays[1], eps)


def _onnx_targets(folded: Any, changed: set[str]) -> dict[str, list[str]]:
    """Node label -> the changed initializers it reads; ``affine:<bn>`` -> the Mul/Add constants."""
    out: dict[str, list[str]] = {}
    for g, prefix, _ in _onnx_walk(folded):
        for i, n in enumerate(g.node):
            reads = [x for x in n.input if x in changed]
            if not reads:
                continue
            if n.name:
                out.setdefault(prefix + n.name, []).extend(reads)
            out.setdefault(f"{prefix}{n.op_type}_{i}", []).extend(reads)
    for name in changed:  # affine replacement: initializers "<bn>.scale" / "<bn>.shift" (+ suffix)
        for tag in (".scale", ".shift"):
            if tag in name:
                out.setdefault("affine:" + name.rsplit(tag, 1)[0], []).append(name)
    return out


# --------------------------------------------------------------------------------------- PyTorch
def _torch_params(model: Any) -> dict[str, _Params | str]:
    """BN module name -> gamma, var, eps (the names of the fold's verdicts; ``name#2`` for a 2nd call)."""
    import numpy as np
    import torch
    from torch.nn.modules.batchnorm import _NormBase

    out: dict[str, _Params | str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, _NormBase):
            continue
        var = getattr(m, "running_var", None)
        if not isinstance(var, torch.Tensor):
            out[name] = "no running statistics (track_running_stats=False)"
            continue
        w = getattr(m, "weight", None)
        gamma = to_float64(w) if isinstance(w, torch.Tensor) else np.ones(var.shape[0], dtype=np.float64)
        out[name] = _Params(gamma.reshape(-1), to_float64(var).reshape(-1), float(m.eps))
    return out


def _torch_targets(folded: Any, changed: dict[int, str]) -> dict[str, list[str]]:
    """Module name -> the names of its own changed parameters and buffers."""
    out: dict[str, list[str]] = {}
    for mname, m in folded.named_modules():
        for _, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if id(t) in changed:
                out.setdefault(mname, []).append(changed[id(t)])
    return out
