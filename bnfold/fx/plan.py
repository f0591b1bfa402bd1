"""The numeric stage of the fx backend: float64 numbers -> a :class:`Plan`, or ``Skip(OVERFLOW)``.

Mirrors :mod:`bnfold.onnx.plan`: the matcher (:mod:`bnfold.fx.match`) decides from structure alone,
this stage computes every new tensor and refuses a fold whose result is not finite in the layer's
dtype, and :mod:`bnfold.fx.rewrite` only applies what it is given.

Math (through :mod:`bnfold.fold_math`): the BN's eval map ``y = scale * x + shift`` goes into the
layer's output channels (forward: ``W' = W * s[out]``, ``b' = b * s + t``) or input channels
(backward: ``W' = W * s[in]``, ``b' = b + sum(W * t[in])``), in float64, rounded once to the layer's
dtype. Rules (cited as "Rule n"):

1. A layer that absorbs one forward fold takes the blocked route
   (:func:`bnfold.fold_math.fold_forward_cast`: float64 product and the one rounding per block,
   equal bit for bit to ``cast_exact(fold_forward(...))``).
2. A layer that absorbs several folds (a BN before it and one after, or several routed BNs)
   accumulates them in float64 and is rounded once at the end.
3. A fold whose new weight or bias is not finite in the layer's dtype is refused (``OVERFLOW``); a
   fold that refers to channels the layer does not have is refused (``LAYOUT``). A refused fold
   changes no layer: the layer keeps what the folds before it planned.
4. New tensors keep the layer's dtype, device and memory format (channels_last stays
   channels_last) and share no storage with the model's tensors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from bnfold.dtypes import from_numpy as _from_numpy
from bnfold.dtypes import numpy_dtype, to_float64, to_numpy
from bnfold.fold_math import (
    F64,
    WeightLayout,
    bn_affine,
    bn_nonfinite_reason,
    cast_exact,
    fits_dtype,
    fold_backward,
    fold_forward,
    fold_forward_cast,
)
from bnfold.records import Direction, Skip, SkipReason, Verdict

from .bnspec import BnSpec
from .custom import describe_bn
from .layers import fetch_attr
from .sites import Candidate, Matched, functional_bn_args

__all__ = [
    "Plan",
    "plan_sites",
    "plan_forward",
    "write_forward",
    "round_accumulated",
    "bn_scale_shift",
    "layer_layout",
    "fits",
    "from_numpy",
]


@dataclass(slots=True)
class Plan:
    """What :mod:`bnfold.fx.rewrite` applies (the fx counterpart of :class:`bnfold.onnx.plan.Fold`).

    Attributes:
        verdicts: one entry per BN call, in graph order: a :class:`~bnfold.fx.match.Candidate` that
            folds, or a ``Skip`` (those of the matcher, and ``OVERFLOW`` / ``LAYOUT`` swapped in here).
        writes: the new ``(weight, bias)`` per layer call, final tensors in the layer's dtype.
    """

    verdicts: list[Matched]
    writes: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]]

    @property
    def folds(self) -> list[Candidate]:
        """The candidates that fold, in graph order."""
        return [v for v in self.verdicts if isinstance(v, Candidate)]

    def report(self) -> list[Verdict]:
        """The verdicts as the report lists them (``Site`` or ``Skip``)."""
        return [v.site if isinstance(v, Candidate) else v for v in self.verdicts]


def from_numpy(a: Any, like: torch.Tensor) -> torch.Tensor:
    """An array already in ``like``'s dtype as a tensor on its device, in its memory format (Rule 4)."""
    t: torch.Tensor = _from_numpy(a).to(like.device)
    for rank, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if (
            t.dim() == rank
            and like.dim() == rank
            and like.is_contiguous(memory_format=fmt)
            and not like.is_contiguous()
        ):
            return t.contiguous(memory_format=fmt)
    return t


def fits(a: F64, dtype: torch.dtype) -> bool:
    """``fits_dtype`` on the extremes only: rounding is monotonic, and min/max propagate NaN."""
    if a.size == 0:
        return True
    return fits_dtype(np.array([a.min(), a.max()]), numpy_dtype(dtype))


def layer_layout(layer: nn.Module) -> WeightLayout:
    """The weight layout of a Conv/ConvTranspose/Linear module."""
    if isinstance(layer, nn.Linear):
        return WeightLayout.linear()
    groups = int(layer.groups)  # type: ignore[arg-type]
    if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return WeightLayout.conv_transpose(groups)
    return WeightLayout.conv(groups)


def bn_scale_shift(bn_node: fx.Node, root: nn.Module, spec: BnSpec | None = None) -> tuple[F64, F64]:
    """The eval map of the BN called at ``bn_node`` as float64 ``(scale, shift)``."""
    if bn_node.op == "call_module":
        if spec is None:
            got = describe_bn(fetch_attr(root, str(bn_node.target)))
            assert isinstance(got, BnSpec)  # match refused the others
            spec = got
        return spec.affine64()
    a = functional_bn_args(bn_node)

    def get(key: str) -> F64 | None:
        v = a[key]
        return None if v is None else to_float64(fetch_attr(root, str(v.target)))

    return bn_affine(get("weight"), get("bias"), get("running_mean"), get("running_var"), float(a["eps"]))  # type: ignore[arg-type]


def bn_nonfinite(bn_node: fx.Node, root: nn.Module, spec: BnSpec | None = None) -> str:
    """Why the eval map of the BN at ``bn_node`` is not finite (:func:`bn_nonfinite_reason`)."""
    if bn_node.op == "call_module":
        got = spec if spec is not None else describe_bn(fetch_attr(root, str(bn_node.target)))
        assert isinstance(got, BnSpec)
        if got.frozen is not None:
            return "its frozen scale or shift is not finite: the BN itself yields NaN/inf"
        params: list[F64 | None] = [to_float64(t) for t in (got.weight, got.bias, got.mean, got.var)]
        eps = float(got.eps)
    else:
        a = functional_bn_args(bn_node)
        params = [
            None if a[k] is None else to_float64(fetch_attr(root, str(a[k].target)))
            for k in ("weight", "bias", "running_mean", "running_var")
        ]
        eps = float(a["eps"])
    gamma, beta, mean, var = params
    assert mean is not None and var is not None
    return bn_nonfinite_reason(gamma, beta, mean, var, eps) or "its scale or shift is not finite"


def _overflow(bn: str, dtype: torch.dtype) -> Skip:
    return Skip(bn, SkipReason.OVERFLOW, f"the folded weights would not be finite in {dtype}")


def plan_forward(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: F64, shift: F64, layout: WeightLayout, bn: str
) -> tuple[torch.Tensor, torch.Tensor] | Skip:
    """One forward fold, rounded once to the layer's dtype (Rule 1); ``Skip(OVERFLOW)`` if not finite.

    Shared by the module backend and the ``torch.export`` backend.
    """
    b_like = bias if bias is not None else weight.new_empty(0)
    if bias is not None and bias.dtype != weight.dtype:  # mixed dtypes: two roundings, one per tensor
        w64, b64 = fold_forward(to_numpy(weight), to_float64(bias), scale, shift, layout)
        if not (fits(w64, weight.dtype) and fits(b64, bias.dtype)):
            return _overflow(bn, weight.dtype)
        return (
            from_numpy(cast_exact(w64, numpy_dtype(weight.dtype)), weight),
            from_numpy(cast_exact(b64, numpy_dtype(bias.dtype)), bias),
        )
    try:
        w_new, b_new, finite = fold_forward_cast(
            to_numpy(weight), None if bias is None else to_numpy(bias), scale, shift, layout
        )
    except ValueError as e:
        return Skip(bn, SkipReason.LAYOUT, f"channels do not line up ({e})")
    if not finite:
        return _overflow(bn, weight.dtype)
    return from_numpy(w_new, weight), from_numpy(b_new, b_like)


def write_forward(
    writes: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]],
    node: fx.Node,
    got: tuple[torch.Tensor, torch.Tensor] | Skip,
) -> Skip | None:
    """Record a forward fold's tensors (:func:`plan_forward`) for the layer ``node``; the Skip if refused."""
    if isinstance(got, Skip):
        return got
    writes[node] = got
    return None


def round_accumulated(
    w: F64, b: F64, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's float64 weight and bias accumulated over its folds (Rule 2), rounded once to the dtypes of
    its weight and bias (the weight's where it has no bias)."""
    b_like = bias if bias is not None else weight.new_empty(0)
    return (
        from_numpy(cast_exact(w, numpy_dtype(weight.dtype)), weight),
        from_numpy(cast_exact(b, numpy_dtype(b_like.dtype)), b_like),
    )


def _parts(c: Candidate, channels: int) -> list[tuple[fx.Node, int, int, bool]]:
    # One layer, or the branches of a channel route: a slice of the BN per concatenated input, or
    # the whole BN per summed branch with the shift going into the first branch only.
    return c.parts or [(c.layer_node, 0, channels, True)]


def plan_sites(root: nn.Module, matched: list[Matched]) -> Plan:
    """Compute every folded weight (Rules 1-3); refused folds are swapped for their ``Skip``.

    Args:
        root: the module the matcher's graph was traced from (read, never changed).
        matched: the matcher's verdicts, one per BN call.

    Returns:
        The plan: verdicts with the refusals swapped in, and the new tensors per layer call.
    """
    touches: Counter[fx.Node] = Counter(
        p[0] for c in matched if isinstance(c, Candidate) for p in _parts(c, 0)
    )
    state: dict[fx.Node, tuple[F64, F64]] = {}  # Rule 2: float64 accumulators
    writes: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
    out: list[Matched] = []
    for c in matched:
        if not isinstance(c, Candidate):
            out.append(c)
            continue
        scale, shift = bn_scale_shift(c.bn_node, root, c.spec)
        if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
            reason = bn_nonfinite(c.bn_node, root, c.spec)
            out.append(Skip(c.site.bn, SkipReason.OVERFLOW, reason, c.site.pattern))
            continue
        if c.repeat > 1:  # BN -> Flatten -> Linear: channel c covers features c*k .. c*k + k - 1
            scale, shift = np.repeat(scale, c.repeat), np.repeat(shift, c.repeat)
        parts = _parts(c, scale.shape[0])
        if c.site.direction is Direction.FORWARD and len(parts) == 1 and touches[c.layer_node] == 1:
            layer = fetch_attr(root, str(c.layer_node.target))
            got = plan_forward(layer.weight, layer.bias, scale, shift, layer_layout(layer), c.site.bn)
            why = write_forward(writes, c.layer_node, got)
        else:
            why = _accumulate(root, c, parts, scale, shift, state)
        out.append(c if why is None else replace(why, pattern=c.site.pattern))  # the pattern it was tried as
    for node, (w, b) in state.items():
        layer = fetch_attr(root, str(node.target))
        writes[node] = round_accumulated(w, b, layer.weight, layer.bias)
    return Plan(out, writes)


def _accumulate(
    root: nn.Module,
    c: Candidate,
    parts: list[tuple[fx.Node, int, int, bool]],
    scale: F64,
    shift: F64,
    state: dict[fx.Node, tuple[F64, F64]],
) -> Skip | None:
    """Rule 2: fold ``c`` into the float64 state of its layers; a refusal (Rule 3) changes none."""
    fold = fold_forward if c.site.direction is Direction.FORWARD else fold_backward
    new: dict[fx.Node, tuple[F64, F64]] = {}
    for node, lo, hi, with_shift in parts:
        layer = fetch_attr(root, str(node.target))
        w0: torch.Tensor = layer.weight
        if node in state:
            w, b = state[node]
        else:
            w64 = to_float64(w0)
            assert w64 is not None
            w, b = w64, to_float64(layer.bias)
        t = shift[lo:hi] if with_shift else np.zeros(hi - lo)
        try:
            w_new, b_new = fold(w, b, scale[lo:hi], t, layer_layout(layer))
        except ValueError as e:
            return Skip(c.site.bn, SkipReason.LAYOUT, f"channels do not line up ({e})")
        b_dt = layer.bias.dtype if layer.bias is not None else w0.dtype
        if not (fits(w_new, w0.dtype) and fits(b_new, b_dt)):
            return _overflow(c.site.bn, w0.dtype)
        new[node] = (w_new, b_new)
    state.update(new)
    return None
