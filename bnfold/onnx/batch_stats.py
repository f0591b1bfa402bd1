"""BatchNormalization nodes that normalise with their batch (training mode): constants and InstanceNorm.

A BN in training mode (``training_mode=1`` from opset 14, ``is_test=0`` in opset 6, the optional
outputs produced in opsets 7-13) computes ``Y = (X - m) / sqrt(v + eps) * scale + B`` with ``m`` and
``v`` the mean and biased variance of ``X`` over every axis but the channel axis 1 (batch included),
as the operator's reference implementation does. Two rewrites, run before the folds of a graph:

1. **Constant input** (weight standardisation: a BN on a weight): ``Y`` is a constant. It is evaluated
   once, in float64 and cast once to ``X``'s dtype, and the BN becomes a ``Constant`` node with the same
   output (by default; the layer that reads it may then fold further BNs).
2. **InstanceNorm, on request** (``batch_stats="instance"``): at batch 1 the statistics above are the
   per-sample, per-channel statistics over the spatial axes, biased, with the same ``eps``: exactly
   ``InstanceNormalization(X, scale, B, epsilon)`` (opset 6 schema: ``scale`` and ``B`` of shape [C]).
   At batch > 1 the InstanceNorm normalises each sample on its own: the model computes something
   else, which the verdict says. Refused: data of rank 2 (N, C) (at batch 1 the BN's variance is 0; an
   InstanceNorm needs spatial axes), unknown rank, ``spatial=0`` (per-element statistics), ``scale``/``B``
   of another dtype than ``X`` (InstanceNormalization takes one type), running-statistic outputs read
   by a node or a graph output.

Without the option a training-mode BN keeps the verdict :func:`bnfold.onnx.match.bn_params` gives it,
whose detail names the option. This module never imports torch.
"""

from __future__ import annotations

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from bnfold.records import Direction, Site, Skip, SkipReason, Verdict

from .const import ConstEvaluator, is_float
from .graph import GraphIndex, attr, is_bn
from .plan import FLOAT_TYPES, trace_type

__all__ = ["BATCH_STATS_MODES", "is_training_bn", "batch_stats_pass", "batch_stat_bn", "NOTE"]

BATCH_STATS_MODES = ("instance",)
"""The values ``batch_stats`` takes (None: leave batch-statistics BNs as they are)."""

INSTANCE_DETAIL = (
    "normalises with its batch: replaced by InstanceNormalization (batch_stats='instance'), exact at "
    "batch 1; at batch > 1 each sample is normalised on its own (the model computes something else)"
)
NOTE = (
    "{n} batch-statistics BN(s) replaced by InstanceNorm (batch_stats='instance'): equal at batch 1 only; "
    "at batch > 1 the model now normalises each sample on its own"
)


def is_training_bn(node: NodeProto, opset: int) -> bool:
    """True when the BN normalises with the statistics of its input (see the module docstring)."""
    if int(attr(node, "training_mode", 0, opset)) == 1:
        return True
    if opset < 7:
        return int(attr(node, "is_test", 1, opset)) == 0
    return opset < 14 and any(node.output[1:])


def batch_stat_bn(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """``Y`` of a training-mode BN in float64: statistics over every axis but 1, biased variance."""
    x64 = np.asarray(x, dtype=np.float64)
    axes = tuple(a for a in range(x64.ndim) if a != 1)
    shape = (1, -1) + (1,) * (x64.ndim - 2)
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    s = np.asarray(scale, dtype=np.float64).reshape(shape)
    b = np.asarray(bias, dtype=np.float64).reshape(shape)
    out: np.ndarray = (x64 - mean) / np.sqrt(var + np.float64(np.float32(eps))) * s + b
    return out


def _read_outputs(index: GraphIndex, node: NodeProto) -> list[str]:
    return [o for o in node.output[1:] if o and index.n_uses(o)]


def _constant(index: GraphIndex, ev: ConstEvaluator, node: NodeProto, label: str, opset: int) -> Site | None:
    """bn-constant: the BN's ``Y`` as a constant, written into ``node`` (which becomes a Constant), or None."""
    x, _, _ = ev.resolve(node.input[0])
    if x is None or not is_float(x) or x.ndim < 2 or x.size == 0 or len(node.input) < 3:
        return None
    if opset < 9 and int(attr(node, "spatial", 1, opset)) == 0:
        return None
    s, _, _ = ev.resolve(node.input[1])
    b, _, _ = ev.resolve(node.input[2])
    if s is None or b is None or s.shape != (x.shape[1],) or b.shape != (x.shape[1],):
        return None
    eps = float(attr(node, "epsilon", 1e-5, opset))
    with np.errstate(all="ignore"):
        y = batch_stat_bn(x, s, b, eps).astype(x.dtype)
    if not np.all(np.isfinite(y)):
        return None
    y_name = node.output[0]
    value = numpy_helper.from_array(np.ascontiguousarray(y), name=y_name)
    new = helper.make_node("Constant", [], [y_name], name=node.name, value=value)
    node.CopyFrom(new)
    return Site(
        label,
        node.name or y_name,
        "constant",
        Direction.FORWARD,
        "batch statistics of a constant input: evaluated once (float64), the BN is a constant",
        "bn-constant",
    )


def _instance(index: GraphIndex, node: NodeProto, label: str, opset: int) -> Verdict:
    """bn-instance: replace ``node`` by an InstanceNormalization (in place), or say why not."""
    if opset < 9 and int(attr(node, "spatial", 1, opset)) == 0:
        return Skip(label, SkipReason.SPATIAL, "spatial=0: per-element batch statistics are no InstanceNorm")
    x, y = node.input[0], node.output[0]
    elem, rank = trace_type(index, x, y)
    ranks = index.ranks(x) | index.ranks(y)
    if rank is not None:
        ranks.add(rank)
    if len(ranks) != 1:
        shown = "unknown" if not ranks else " or ".join(map(str, sorted(ranks)))
        return Skip(
            label,
            SkipReason.TRAINING_MODE,
            f"normalises with its batch, on data of rank {shown}: an InstanceNorm needs a known rank >= 3",
        )
    r = next(iter(ranks))
    if r < 3:
        return Skip(
            label,
            SkipReason.TRAINING_MODE,
            f"normalises with its batch, on data of rank {r} (N, C): at batch 1 its variance is 0, "
            "and an InstanceNorm needs spatial axes; not converted",
        )
    vt = index.value_type(x)
    batch = None if vt is None or not vt.shape else vt.shape[0]
    if batch is not None and batch > 1:
        return Skip(
            label,
            SkipReason.TRAINING_MODE,
            f"normalises with its batch, and the model fixes its batch at {batch}: an InstanceNorm (equal "
            "at batch 1 only) would compute something else for every input the model takes; not converted",
        )
    if elem not in FLOAT_TYPES:
        return Skip(
            label,
            SkipReason.UNSUPPORTED_DTYPE,
            "normalises with its batch; its data type is unknown or not a float type: not converted",
        )
    if elem == TensorProto.BFLOAT16 and opset < 22:
        return Skip(
            label,
            SkipReason.UNSUPPORTED_DTYPE,
            "normalises with its batch, in bfloat16: "
            f"InstanceNormalization takes bfloat16 from opset 22 (the model has opset {opset}); not converted",
        )
    for k, what in ((1, "scale"), (2, "B")):
        vt = index.value_type(node.input[k]) if k < len(node.input) and node.input[k] else None
        if vt is None or vt.elem_type != elem:
            return Skip(
                label,
                SkipReason.UNSUPPORTED_DTYPE,
                f"normalises with its batch; BN {what} has another (or an unknown) type than the data: "
                "InstanceNormalization takes one type; not converted",
            )
    eps = float(attr(node, "epsilon", 1e-5, opset))
    new = helper.make_node(
        "InstanceNormalization", [x, node.input[1], node.input[2]], [y], name=node.name, epsilon=eps
    )
    node.CopyFrom(new)
    return Site(
        label, node.name or y, "InstanceNormalization", Direction.CONVERTED, INSTANCE_DETAIL, "bn-instance"
    )


def batch_stats_pass(
    graph: GraphProto,
    index: GraphIndex,
    ev: ConstEvaluator,
    labels: dict[str, str],
    prefix: str,
    opset: int,
    mode: str | None,
    exclude: frozenset[str] = frozenset(),
) -> dict[str, Verdict]:
    """Rewrite the training-mode BNs of ``graph`` (one pass, in place); verdicts by BN output name.

    Only BNs rewritten or refused *because of the option* get a verdict here; the others are left to
    the matcher (whose reason for a training-mode BN names the option).
    """
    out: dict[str, Verdict] = {}
    for i, node in enumerate(index.nodes):
        if not is_bn(node) or not is_training_bn(node, opset) or len(node.input) < 3:
            continue
        key = node.output[0]
        label = labels.get(key, prefix + index.label(i))
        if label in exclude:  # left in place (e.g. the conversion failed verification): the matcher says so
            continue
        read = _read_outputs(index, node)
        if read:
            if mode is not None:
                out[key] = Skip(
                    label,
                    SkipReason.TRAINING_MODE,
                    f"its running-statistic outputs ({', '.join(read)}) are read: not converted",
                )
            continue
        site = _constant(index, ev, node, label, opset)
        if site is not None:
            out[key] = site
            continue
        if mode == "instance":
            out[key] = _instance(index, node, label, opset)
    return out
