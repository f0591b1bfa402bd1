"""Records of the BatchNorm health audit (:func:`bnfold.health`): range counts, one row per BN, the report.

Re-exported from :mod:`bnfold.records`; nothing here prints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RangeCounts", "BnHealth", "LayerQuant", "HealthReport", "count_labels", "QUANT_RATIO_FLAG"]

QUANT_RATIO_FLAG = 16.0
"""A layer is flagged when its largest per-output-channel weight range is at least this many times its
median one (>= 4 bits lost): the median channel is then left fewer than 8 of int8's 127 levels per sign,
coarser than per-channel int4."""


@dataclass(frozen=True, slots=True)
class RangeCounts:
    """How many nonzero finite values leave the normal range of float16 and bfloat16 when cast there.

    ``*_overflow``: the value rounds to infinity; ``*_subnormal``: it rounds to a subnormal or to zero
    (magnitude below the type's smallest normal number: precision is lost, and CPUs slow down).
    """

    fp16_overflow: int = 0
    fp16_subnormal: int = 0
    bf16_overflow: int = 0
    bf16_subnormal: int = 0

    def __add__(self, other: RangeCounts) -> RangeCounts:
        return RangeCounts(
            self.fp16_overflow + other.fp16_overflow,
            self.fp16_subnormal + other.fp16_subnormal,
            self.bf16_overflow + other.bf16_overflow,
            self.bf16_subnormal + other.bf16_subnormal,
        )

    @property
    def any(self) -> bool:
        return bool(self.fp16_overflow or self.fp16_subnormal or self.bf16_overflow or self.bf16_subnormal)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def count_labels(*counts: tuple[int, str]) -> list[str]:
    """``"N what"`` for each ``(N, what)`` with N non-zero, in order: the parts of a health line."""
    return [f"{n} {what}" for n, what in counts if n]


@dataclass(frozen=True, slots=True)
class BnHealth:
    """The health of one BatchNorm: its statistics, and what folding it writes into its target.

    Attributes:
        bn: the BN's name, as in the fold report's verdicts.
        status: "folded", "affine" or "left" (the fold's verdict).
        target: the layer it folds into ("" when left or affine).
        channels: number of channels (0 when the parameters are not constant).
        eps: the BN's epsilon.
        constant_channels: channels with gamma exactly 0: their output is the constant beta.
        near_zero_gamma: channels with 0 < |gamma| below float32's smallest normal number or below
            ``1e-6 * max |gamma|``: their output is nearly constant.
        small_var: channels with var <= eps: eps dominates the denominator, scale ~ gamma / sqrt(eps).
        max_abs_scale: max |gamma / sqrt(var + eps)|.
        scale_range: the per-channel scales cast to float16 / bfloat16.
        folded_values: values the fold writes into the target (its changed weight and bias tensors).
        subnormal: of those, values that are subnormal in their own dtype (float32 for a float32 model).
        folded_range: the folded values cast to float16 / bfloat16.
        note: why some figures are missing (e.g. parameters computed at run time).
    """

    bn: str
    status: str
    target: str = ""
    channels: int = 0
    eps: float = 0.0
    constant_channels: tuple[int, ...] = ()
    near_zero_gamma: tuple[int, ...] = ()
    small_var: tuple[int, ...] = ()
    max_abs_scale: float = 0.0
    scale_range: RangeCounts = field(default_factory=RangeCounts)
    folded_values: int = 0
    subnormal: int = 0
    folded_range: RangeCounts = field(default_factory=RangeCounts)
    note: str = ""

    @property
    def issues(self) -> tuple[str, ...]:
        """Short labels of what is wrong (empty for a healthy BN)."""
        out = count_labels(
            (len(self.constant_channels), "constant channel(s)"),
            (len(self.near_zero_gamma), "near-zero gamma"),
            (len(self.small_var), "var <= eps"),
            (self.subnormal, "subnormal folded value(s)"),
        )
        r = self.scale_range + self.folded_range
        if r.fp16_overflow or r.bf16_overflow:
            out.append(
                "overflows in "
                + "/".join(n for n, c in (("float16", r.fp16_overflow), ("bfloat16", r.bf16_overflow)) if c)
            )
        if r.fp16_subnormal or r.bf16_subnormal:
            out.append(
                "underflows in "
                + "/".join(n for n, c in (("float16", r.fp16_subnormal), ("bfloat16", r.bf16_subnormal)) if c)
            )
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn": self.bn,
            "status": self.status,
            "target": self.target,
            "channels": self.channels,
            "eps": self.eps,
            "constant_channels": list(self.constant_channels),
            "near_zero_gamma": list(self.near_zero_gamma),
            "small_var": list(self.small_var),
            "max_abs_scale": self.max_abs_scale,
            "scale_range": self.scale_range.to_dict(),
            "folded_values": self.folded_values,
            "subnormal": self.subnormal,
            "folded_range": self.folded_range.to_dict(),
            "issues": list(self.issues),
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class LayerQuant:
    """Quantisation readiness of one layer a fold writes, from its folded weight (float64).

    Folding multiplies each output channel by its own BN scale; per-tensor symmetric int8 takes one
    scale, ``max |w| / 127``, for the whole tensor, so every channel whose range is smaller loses
    resolution. ``range`` of a channel is its ``max |w|`` (what symmetric quantisation scales by).

    Attributes:
        layer: the layer's name, as in the fold report's targets.
        kind: its type ("Conv", "Gemm", "Linear", "Conv2d", ...).
        channels: number of output channels.
        max_range: the largest per-channel range.
        median_range: the median range over the channels with a nonzero weight (an all-zero channel
            quantises exactly at any scale); 0 when every channel is zero.
        worst_channel: the output channel with the largest range.
        ratio: ``max_range / median_range`` (1 when every channel is zero).
        ratio_before: the same ratio of the weight before the fold (what the fold changed); 0 if unknown.
    """

    layer: str
    kind: str
    channels: int
    max_range: float
    median_range: float
    worst_channel: int
    ratio: float
    ratio_before: float = 0.0

    @property
    def bits_lost(self) -> float:
        """``log2(ratio)``: of int8's 8 bits, how many the median channel loses under one per-tensor scale."""
        return math.log2(self.ratio) if self.ratio > 1 else 0.0

    @property
    def flagged(self) -> bool:
        return self.ratio >= QUANT_RATIO_FLAG

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "channels": self.channels,
            "max_range": self.max_range,
            "median_range": self.median_range,
            "worst_channel": self.worst_channel,
            "ratio": self.ratio,
            "bits_lost": self.bits_lost,
            "ratio_before": self.ratio_before,
            "flagged": self.flagged,
        }


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The BN health audit of a model (see :func:`bnfold.health`).

    ``changed_values``, ``subnormal`` and ``folded_range`` count every tensor the fold writes (each
    once, even when two BNs fold into one layer); the per-BN records attribute them to their BN.
    """

    backend: str
    bns: tuple[BnHealth, ...]
    changed_values: int = 0
    subnormal: int = 0
    folded_range: RangeCounts = field(default_factory=RangeCounts)
    quant: tuple[LayerQuant, ...] = ()
    """One record per layer the fold writes a weight into (forward and backward folds), model order."""

    @property
    def quant_flagged(self) -> tuple[LayerQuant, ...]:
        """The layers that lose >= 4 bits under per-tensor int8 (:data:`QUANT_RATIO_FLAG`)."""
        return tuple(q for q in self.quant if q.flagged)

    @property
    def constant_channels(self) -> int:
        return sum(len(b.constant_channels) for b in self.bns)

    @property
    def near_zero_gamma(self) -> int:
        return sum(len(b.near_zero_gamma) for b in self.bns)

    @property
    def small_var(self) -> int:
        return sum(len(b.small_var) for b in self.bns)

    @property
    def scale_range(self) -> RangeCounts:
        total = RangeCounts()
        for b in self.bns:
            total = total + b.scale_range
        return total

    @property
    def flagged(self) -> tuple[BnHealth, ...]:
        """The BNs with at least one issue."""
        return tuple(b for b in self.bns if b.issues)

    @property
    def healthy(self) -> bool:
        return not self.flagged and not self.subnormal and not self.folded_range.any

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "healthy": self.healthy,
            "bn_count": len(self.bns),
            "flagged": len(self.flagged),
            "constant_channels": self.constant_channels,
            "near_zero_gamma": self.near_zero_gamma,
            "small_var": self.small_var,
            "changed_values": self.changed_values,
            "subnormal": self.subnormal,
            "scale_range": self.scale_range.to_dict(),
            "folded_range": self.folded_range.to_dict(),
            "bns": [b.to_dict() for b in self.bns],
            "quant_ratio_flag": QUANT_RATIO_FLAG,
            "quant_flagged": len(self.quant_flagged),
            "quant": [q.to_dict() for q in self.quant],
        }
