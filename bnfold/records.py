"""Plain records that the core returns: verdicts per BatchNorm and reports.

Every BatchNorm a matcher sees gets exactly one verdict: a :class:`Site` (it will be / was folded into a
neighbouring layer, or turned into an affine Mul+Add) or a :class:`Skip` (it stays, with a
:class:`SkipReason` and one sentence the user can act on). Nothing in this module prints; reports turn
into JSON-ready dictionaries with ``to_dict()``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "SkipReason",
    "Direction",
    "Site",
    "Skip",
    "Verdict",
    "OutputCheck",
    "RuntimeUse",
    "TensorCheck",
    "LocateReport",
    "VerifyReport",
    "FoldReport",
    "RangeCounts",
    "BnHealth",
    "HealthReport",
    "count_labels",
]


class SkipReason(str, enum.Enum):
    """Why a BatchNorm was left in the model."""

    NO_PRODUCER = "no_producer"
    """Nothing foldable before it (input, Add, Concat, activation, ...) and nothing exact after it."""
    OTHER_CONSUMERS = "other_consumers"
    """The layer's output is also read elsewhere (or is a graph output): that reader needs it unscaled."""
    GRAPH_OUTPUT = "graph_output"
    """The layer's output is a graph output, which must keep its unscaled value."""
    NON_CONSTANT = "non_constant"
    """A weight, bias or BN parameter is computed from model inputs at run time."""
    SHARED_WEIGHT = "shared_weight"
    """The layer's weight is shared with another use and cannot be cloned for this call site."""
    SHARED_MODULE = "shared_module"
    """The layer module is called at several places and cannot be split safely."""
    TRAINING_MODE = "training_mode"
    """The BN normalises with batch statistics (training mode, optional outputs used)."""
    NO_RUNNING_STATS = "no_running_stats"
    """``track_running_stats=False``: the BN uses batch statistics even in eval mode."""
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    """Not a floating-point tensor, or parameters whose dtype differs from the data."""
    OVERFLOW = "overflow"
    """A folded weight or bias would not be finite in the layer's dtype."""
    PADDING = "padding"
    """Backward fold into a convolution that pads with zeros: the padded zeros would not be shifted."""
    LAYOUT = "layout"
    """The BN channel axis is not the layer's output (or input) feature axis."""
    QUANTIZED = "quantized"
    """The weight comes from a quantized representation (DequantizeLinear)."""
    SPATIAL = "spatial"
    """Opset 6/7 BatchNormalization with ``spatial=0`` whose per-element statistics do not fit."""
    CUSTOM_BN = "custom_bn"
    """A BatchNorm subclass that adds behaviour bnfold cannot keep."""
    UNSUPPORTED_LAYER = "unsupported_layer"
    """The neighbouring layer is of a kind (or has attributes) that cannot absorb the BN exactly."""
    NOT_TRACEABLE = "not_traceable"
    """The model could not be traced, and the BN is not in a place that is provably safe to fold."""
    IN_SUBGRAPH = "in_subgraph"
    """The BN reads a value from an enclosing graph it cannot be folded across."""
    UNFOLDABLE_BRANCH = "unfoldable_branch"
    """BN on a sum or concatenation where one branch is not a foldable layer (e.g. a residual identity)."""
    VERIFICATION = "verification"
    """Folding this BN made verification fail (found by culprit bisection): it is left in place."""


class Direction(str, enum.Enum):
    """Where a BN goes when it is removed."""

    FORWARD = "forward"
    """layer -> BN: scale the layer's output channels, shift its bias."""
    BACKWARD = "backward"
    """BN -> layer: scale the layer's input channels, add the shift's image to its bias."""
    AFFINE = "affine"
    """BN -> Mul + Add with constant operands (nothing to fold into)."""


@dataclass(frozen=True, slots=True)
class Site:
    """A BatchNorm that is folded.

    Attributes:
        bn: node or module name of the BatchNorm.
        target: node or module name of the layer it folds into ("" for an affine replacement).
        target_kind: "Conv", "ConvTranspose", "Gemm", "MatMul", "Linear", "Conv2d", ...
        direction: forward, backward or affine.
        detail: optional remark (e.g. "cloned shared weight").
    """

    bn: str
    target: str
    target_kind: str
    direction: Direction = Direction.FORWARD
    detail: str = ""

    @property
    def folded(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn": self.bn,
            "status": "folded" if self.direction is not Direction.AFFINE else "affine",
            "target": self.target,
            "target_kind": self.target_kind,
            "direction": self.direction.value,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Skip:
    """A BatchNorm that is left in the model, and why."""

    bn: str
    reason: SkipReason
    detail: str

    @property
    def folded(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"bn": self.bn, "status": "left", "reason": self.reason.value, "detail": self.detail}


Verdict = Site | Skip


@dataclass(frozen=True, slots=True)
class OutputCheck:
    """Comparison of one graph output on one sample."""

    name: str
    sample: int
    dtype: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    """max |candidate - reference| / max |reference| (the output's scale)."""
    mismatches: int
    """elements outside ``atol + rtol * scale``."""
    atol: float
    rtol: float
    passed: bool
    error_stat: str = "max"
    """The statistic of ``|candidate - reference|`` judged against ``atol + rtol * scale``."""
    error_value: float = 0.0
    """Its value (for "max": ``max_abs_error``)."""
    cosine: float = 1.0
    """Cosine similarity of candidate and reference (finite elements)."""
    snr_db: float | None = None
    """Signal-to-noise ratio in dB (None: no error at all)."""
    nan: int = 0
    """Elements NaN in the candidate where the reference is finite."""
    inf: int = 0
    """Elements infinite in the candidate where the reference is finite."""
    failure: str = ""
    """Why it failed: "nan", "inf", "tolerance", "cosine", "snr" ("" when it passed)."""
    worst_index: tuple[int, ...] = ()
    """Index of the largest error (empty when there is no error)."""
    worst_channels: tuple[tuple[int, float], ...] = ()
    """Channels (axis 1) with the largest errors, as ``(channel, max abs error)``."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        d["worst_channels"] = [{"channel": c, "max_abs_error": e} for c, e in self.worst_channels]
        return d


@dataclass(frozen=True, slots=True)
class RuntimeUse:
    """Which runtime ran one side of a verification, and why (when it is not onnxruntime)."""

    role: str
    """"reference" or "candidate" (or "golden" for outputs read from a file)."""
    runtime: str
    """"onnxruntime", "onnx.reference" (the ONNX reference evaluator), "torch" or "file"."""
    reason: str = ""
    """Why the fallback was used (onnxruntime's error), or the file the outputs came from."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TensorCheck:
    """Comparison of one intermediate tensor present in both models (``verify --locate``)."""

    name: str
    producer: str
    """op type and node name of the node that computes it in the reference."""
    matched_as: str
    """How it was matched: "name" (same name in both) or the fold it stands for."""
    max_abs_error: float
    max_rel_error: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class LocateReport:
    """Intermediate tensors compared in graph order, and the first one whose error passes the tolerance."""

    tensors: tuple[TensorCheck, ...]
    first_divergence: str | None
    compared: int
    only_in_reference: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "first_divergence": self.first_divergence,
            "compared": self.compared,
            "only_in_reference": self.only_in_reference,
            "tensors": [t.to_dict() for t in self.tensors],
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Result of running reference and candidate on the same inputs."""

    checks: tuple[OutputCheck, ...]
    samples: int
    optimization_level: str
    extra: tuple[VerifyReport, ...] = ()
    """Further runs (e.g. with the user's optimisation level as a second check)."""
    runtimes: tuple[RuntimeUse, ...] = ()
    """Which runtime ran each side (onnxruntime, or the ONNX reference evaluator where it could not)."""
    comparator: dict[str, Any] = field(default_factory=dict)
    """The comparison settings used (see :class:`bnfold.compare.Comparator`)."""
    locate: LocateReport | None = None
    """With ``locate=True``: the intermediate tensors compared and the first divergence."""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(e.passed for e in self.extra)

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((c.max_rel_error for c in self.checks), default=0.0)

    def worst(self) -> OutputCheck | None:
        """The check with the largest error relative to its tolerance (a failing one first)."""
        if not self.checks:
            return None
        return max(self.checks, key=lambda c: (not c.passed, c.max_rel_error))

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "optimization_level": self.optimization_level,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "outputs": [c.to_dict() for c in self.checks],
            "extra": [e.to_dict() for e in self.extra],
            "runtimes": [r.to_dict() for r in self.runtimes],
            "comparator": dict(self.comparator),
            "failures": sorted({c.failure for c in self.checks if c.failure}),
            "locate": None if self.locate is None else self.locate.to_dict(),
        }


@dataclass(slots=True)
class FoldReport:
    """What a fold (or a dry run) did to a model: one verdict per BatchNorm, plus figures.

    ``bn_before``/``bn_after`` count BatchNorm layers (nodes or modules) before and after.
    """

    backend: str
    """"onnx", "module", "fx", "export"."""
    verdicts: list[Verdict] = field(default_factory=list)
    bn_before: int = 0
    bn_after: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    dry_run: bool = False
    verification: VerifyReport | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    flushed_denormals: int | None = None
    """Subnormal values set to zero in the folded layers (``flush_denormals=True``); None: not asked."""
    health: HealthReport | None = None
    """The BN health audit (:func:`bnfold.health`), when asked for."""

    @property
    def sites(self) -> list[Site]:
        return [v for v in self.verdicts if isinstance(v, Site)]

    @property
    def skips(self) -> list[Skip]:
        return [v for v in self.verdicts if isinstance(v, Skip)]

    @property
    def folded(self) -> int:
        return len(self.sites)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "dry_run": self.dry_run,
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "folded": self.folded,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": self.seconds,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "verification": None if self.verification is None else self.verification.to_dict(),
            "notes": list(self.notes),
            **({"extra": self.extra} if self.extra else {}),
            **({"flushed_denormals": self.flushed_denormals} if self.flushed_denormals is not None else {}),
            **({"health": self.health.to_dict()} if self.health is not None else {}),
        }


# ------------------------------------------------------------------------------------------- health
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
            out.append("overflows in " + "/".join(
                n for n, c in (("float16", r.fp16_overflow), ("bfloat16", r.bf16_overflow)) if c
            ))
        if r.fp16_subnormal or r.bf16_subnormal:
            out.append("underflows in " + "/".join(
                n for n, c in (("float16", r.fp16_subnormal), ("bfloat16", r.bf16_subnormal)) if c
            ))
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
        }
