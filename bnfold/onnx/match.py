"""One verdict per BatchNormalization node: fold it (and how), or leave it (and why).

The matcher reads the graph through a :class:`~bnfold.onnx.graph.GraphIndex` and constants through a
:class:`~bnfold.onnx.const.ConstEvaluator`; it never edits the model. A fold is returned as a
:class:`~bnfold.onnx.plan.Fold` plan whose new tensors are already computed (float64 math in
:mod:`bnfold.fold_math`, cast back once with ``cast_exact``; the large products through its blocked
``scale_cast``), so that an overflow is a refusal, never an inf in the model.

Eval-mode BN is ``y = scale * x + shift`` per channel (axis 1). The patterns, each an id of
:data:`bnfold.patterns.CATALOGUE` (``Site.pattern``) cited where it is handled (``# conv-bn``):

Forward (:mod:`~bnfold.onnx.match_forward`; the layer output is read by the BN's route alone):
    conv-bn: Conv -> BN (with or without conv bias): scale output channels of W ``[C_out, C_in/g, *k]``.
    conv-bn: ConvTranspose -> BN: W ``[C_in, C_out/g, *k]``, output channel ``g*C_out/g + j`` (grouped).
    gemm-bn: Gemm -> BN: ``alpha A'B' + beta C`` becomes ``alpha A'(B' s) + (beta C s + t)``, beta = 1;
       a broadcast C grows to ``broadcast(C, [N])``.
    gemm-bn: MatMul -> BN, product (N, C) with a constant 2-D right operand: becomes ``Gemm(A, W s, t)``.
    gemm-bn: MatMul -> Add(bias) -> BN, product (N, C): scale W and the bias (``b s + t``).
    linear-norm: LinearNorm (:mod:`~bnfold.onnx.match_linear_norm`): MatMul (.., K)x(K, D) [-> Add(bias)] ->
       Reshape to a constant ``[a, D, 1, ..]``, Flatten, or a Transpose with ``perm[1]`` last -> BN:
       the BN channel is the MatMul's output axis throughout; scale W, shift into the bias, or the
       BN becomes one ``Add(x, t)``. A chain of those (``MatMul -> Reshape -> Transpose -> BN``) folds
       when the output axis provably arrives intact at axis 1 (a stride proof on static shapes); a
       Gemm before the route folds with the Gemm math of gemm-bn.
    const-add-bn: Conv/ConvTranspose/Gemm -> Add(constant per channel) -> BN: the constant joins the bias.
Routes (:mod:`~bnfold.onnx.match_routes`):
    concat-split: Concat on the channel axis of layers: the BN split per slice, each slice folded into
       its producer.
    branch-sum: Add / Sum of layer branches: every branch scaled, the shift into one bias; a branch that
       is not a layer (a residual identity) is refused (UNFOLDABLE_BRANCH).
Backward (:mod:`~bnfold.onnx.match_backward`; the BN output is read by one node and is no graph output):
    bn-conv: BN -> Conv with all pads zero (auto_pad NOTSET/VALID): scale input channels, bias += W t.
    bn-gemm: BN -> Gemm (transA = 0) and BN -> MatMul on a rank-2 input (becomes Gemm).
    bn-flatten-gemm: BN -> Flatten(axis=1) (or a Reshape that provably flattens) -> Gemm/MatMul: scale
       and shift repeated over the K/C spatial positions.
Either direction (no pattern of its own: the site keeps the pattern of its fold, the detail says "through"):
    Identity and inference Dropout between the BN and its neighbour are walked
        (:mod:`~bnfold.onnx.noops`).
Quantized weights (:mod:`~bnfold.onnx.match_qdq`):
    qdq-bn: Conv / ConvTranspose (group 1) / Gemm / MatMul whose weight is ``DequantizeLinear(w_q, s, z)``
        per output channel or per tensor (opset >= 13): the scales become ``s |a|`` (integers kept;
        negated around the zero point where ``a < 0`` and that fits), a float bias takes the shift;
        an int32 bias through DequantizeLinear is rescaled exactly and the shift kept as one Add
        (requantised on request, :func:`~bnfold.onnx.match_qdq.requantize_int32_bias`). Backward
        (BN -> such a layer, no padding): with one BN scale for all channels or a weight quantized
        per input channel (:func:`~bnfold.onnx.match_qdq.match_qdq_backward`); a shared weight
        DequantizeLinear is copied for the folded layer.
Other plans:
    bn-affine: on request, when nothing can absorb the BN: ``Mul(x, scale) -> Add(_, shift)``, constants
        shaped ``[C, 1, ..., 1]`` (or the per-element statistics of opset-7 ``spatial=0``).
    frozen-bn: a per-channel Mul then Add with constant operands after Conv/ConvTranspose/Gemm folds
        as conv-bn / gemm-bn (:mod:`~bnfold.onnx.match_frozen`).

Ranks and static shapes come from the file's declarations and from shape inference on a light copy
(:mod:`~bnfold.onnx.shapes`); a fold that needs a rank refuses when any two known ranks disagree.
Attributes are read with the types and defaults of the operator schema (:func:`~bnfold.onnx.graph.attr`).

Refusals: training mode or optional outputs (TRAINING_MODE); non-constant weights or statistics
(NON_CONSTANT; a quantized weight qdq-bn cannot fold, or a quantized activation, is QUANTIZED); non-float tensors (UNSUPPORTED_DTYPE); a folded
tensor that is not finite in its dtype (OVERFLOW); zero padding (PADDING); channel not on the layer's
feature axis (LAYOUT); per-element statistics (SPATIAL); a producer output read elsewhere
(OTHER_CONSUMERS) or a graph output (GRAPH_OUTPUT); a producer in an enclosing graph (IN_SUBGRAPH); a
route branch that is not a layer (UNFOLDABLE_BRANCH).

BN parameters whose dtype differs from the data (opset 15) are computed in float64 and cast to the
layer's weight dtype: the folded layer is exact up to the rounding of that dtype.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, helper

from bnfold.errors import ModelFormatError
from bnfold.fold_math import bn_affine, bn_nonfinite_reason
from bnfold.hints import BATCH_STATS_INSTANCE
from bnfold.records import Direction, Site, Skip, SkipReason

from .const import Array, ConstEvaluator, is_float
from .graph import GraphIndex, attr, is_bn
from .match_backward import match_backward
from .match_forward import match_forward
from .plan import FLOAT_TYPES, BnParams, Fold, finish, trace_type

__all__ = [
    "bn_params",
    "match_bn",
    "match_affine",
]


def bn_params(index: GraphIndex, ev: ConstEvaluator, node: NodeProto, label: str) -> BnParams | Skip:
    """Read a BN's attributes and constant parameters; refuse what is not an inference BN."""
    opset = ev.opset
    if int(attr(node, "training_mode", 0, opset)) == 1:
        return Skip(
            label,
            SkipReason.TRAINING_MODE,
            "training_mode=1: it normalises with batch statistics",
            hints=(BATCH_STATS_INSTANCE,),
        )
    if int(attr(node, "is_test", 1, opset)) == 0:
        return Skip(
            label,
            SkipReason.TRAINING_MODE,
            "is_test=0 (opset 6): it normalises with batch statistics",
            hints=(BATCH_STATS_INSTANCE,),
        )
    extra = [o for o in node.output[1:] if o]
    if extra:
        return Skip(
            label,
            SkipReason.TRAINING_MODE,
            f"its optional outputs ({', '.join(extra)}) are produced: this is a training-mode BN",
            hints=(BATCH_STATS_INSTANCE,) if opset < 14 else (),
        )
    if len(node.input) < 5:
        return Skip(label, SkipReason.UNSUPPORTED_LAYER, "BatchNormalization with fewer than 5 inputs")
    vals: list[Array] = []
    for k, what in zip(range(1, 5), ("scale", "bias", "mean", "var")):
        v, reason, detail = ev.resolve(node.input[k])
        if v is None:
            return Skip(label, reason or SkipReason.NON_CONSTANT, f"BN {what} is not a constant: {detail}")
        if not is_float(v):
            return Skip(
                label, SkipReason.UNSUPPORTED_DTYPE, f"BN {what} has dtype {v.dtype}, not a float type"
            )
        vals.append(v)
    gamma, beta, mean, var = vals
    shapes = [tuple(int(d) for d in v.shape) for v in vals]
    per_element_stats = opset < 9 and int(attr(node, "spatial", 1, opset)) == 0
    if (
        len(set(shapes)) > 1
        or not shapes[0]
        or (len(shapes[0]) != 1 and not per_element_stats)
        or 0 in shapes[0]
    ):
        # The same rule as for initializers (bnfold.io.checks), for parameters the evaluator computed:
        # a BN whose parameters do not share one channel axis has no semantics (the runtime refuses it).
        raise ModelFormatError(
            f"BatchNormalization '{label}': scale, B, mean and var have shapes "
            f"{', '.join(str(list(d)) for d in shapes)}; they must be 1-D and of one length (the channels)"
        )
    eps = float(attr(node, "epsilon", 1e-5, opset))  # float32(1e-5) when absent, as the schema says
    scale, shift = bn_affine(gamma, beta, mean, var, eps)
    why = bn_nonfinite_reason(gamma, beta, mean, var, eps)
    if why is not None:
        return Skip(label, SkipReason.OVERFLOW, why)
    per_element = False
    if opset < 9 and int(attr(node, "spatial", 1, opset)) == 0 and scale.ndim <= 1:
        # spatial=0 wants statistics of shape [C, D1, ...] (the data's shape but the batch axis):
        # 1-D statistics fit only 2-D data; on other data the runtime refuses the BN (no semantics).
        ranks = index.ranks(node.input[0]) | index.ranks(node.output[0])
        if ranks != {2}:
            shown = "unknown" if not ranks else " or ".join(map(str, sorted(ranks)))
            return Skip(
                label,
                SkipReason.SPATIAL,
                f"spatial=0 with 1-D statistics on data of rank {shown}: per-element statistics "
                "need the data's shape [C, D1, ...]",
            )
    if scale.ndim > 1:
        # Opset 6/7/8 with spatial=0 on rank > 2 data: statistics per element [C, D1, ...]. They fold as
        # per-channel values only when constant over the spatial positions.
        flat_s = scale.reshape(scale.shape[0], -1)
        flat_t = shift.reshape(shift.shape[0], -1)
        if np.all(flat_s == flat_s[:, :1]) and np.all(flat_t == flat_t[:, :1]):
            scale, shift = flat_s[:, 0].copy(), flat_t[:, 0].copy()
        else:
            per_element = True
    return BnParams(scale, shift, per_element, np.dtype(gamma.dtype))


def match_bn(index: GraphIndex, ev: ConstEvaluator, bi: int, label: str) -> Fold | Skip:
    """The verdict for the BN at node index ``bi``: a fold plan, or a skip with its reason.

    Forward (cases 1-9) is tried first, then backward (cases 10-12); when both refuse, the refusal that
    names a foldable layer (e.g. OTHER_CONSUMERS of a Conv) is reported rather than a generic
    NO_PRODUCER.
    """
    node = index.nodes[bi]
    assert is_bn(node)
    prm = bn_params(index, ev, node, label)
    if isinstance(prm, Skip):
        return prm
    fwd, fwd_specific = match_forward(index, ev, bi, label, prm)
    if isinstance(fwd, Fold):
        return fwd
    bwd, bwd_specific = match_backward(index, ev, bi, label, prm)
    if isinstance(bwd, Fold):
        return bwd
    if fwd_specific or not bwd_specific:
        return fwd
    return bwd


def match_affine(index: GraphIndex, ev: ConstEvaluator, bi: int, label: str, opset: int) -> Fold | None:
    """bn-affine: plan ``BN -> Mul + Add`` for a BN nothing can absorb, or None when that is not possible."""
    node = index.nodes[bi]
    prm = bn_params(index, ev, node, label)
    if isinstance(prm, Skip):
        return None
    x, y = node.input[0], node.output[0]
    elem, rank = trace_type(index, x, y)
    if not elem and opset < 15:
        elem = int(helper.np_dtype_to_tensor_dtype(prm.param_dtype))
    if elem not in FLOAT_TYPES:
        return None
    if prm.per_element:
        rank = 1 + prm.scale.ndim
    if rank is None or rank < 2:
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    s, t = prm.scale, prm.shift
    if not prm.per_element:
        shape = (prm.channels,) + (1,) * (rank - 2)
        s, t = s.reshape(shape), t.reshape(shape)
    res = finish([s, t], dtype, label, "scale or shift")
    if isinstance(res, Skip):
        return None
    site = Site(label, "", "Mul+Add", Direction.AFFINE, "BN replaced by one Mul and one Add", "bn-affine")
    return Fold(site=site, remove=(bi,), affine=(res[0], res[1]))
