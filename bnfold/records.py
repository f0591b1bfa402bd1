"""Plain records that the core returns: verdicts per BatchNorm and reports.

Every BatchNorm a matcher sees gets exactly one verdict: a :class:`Site` (it will be / was folded into a
neighbouring layer, or turned into an affine Mul+Add) or a :class:`Skip` (it stays, with a
:class:`SkipReason` and one sentence the user can act on). Nothing in this module prints; reports turn
into JSON-ready dictionaries with ``to_dict()``.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .health_records import QUANT_RATIO_FLAG, HealthReport, LayerQuant
from .hints import Hint, Surface, advise

if TYPE_CHECKING:  # pragma: no cover
    from .constant_channels import PrunedChannels
    from .culprit import CulpritSearch

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
    "FileJob",
    "PostFoldResult",
    "FileInfo",
    "ExportCounts",
    "FreezeReport",
    "MergeReason",
    "BranchVerdict",
    "Merge",
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
    CONVERTED = "converted"
    """A batch-statistics BN replaced by another normalisation (InstanceNorm, ``batch_stats="instance"``)."""
    PROPAGATED = "propagated"
    """BN split into scale and shift, moved through activations / pooling / zero padding (exact identities):
    the scale into a later layer's input channels, the shift into its bias or one per-channel Add."""


_STATUS = {Direction.AFFINE: "affine", Direction.CONVERTED: "converted", Direction.PROPAGATED: "propagated"}


@dataclass(frozen=True, slots=True)
class Site:
    """A BatchNorm that is folded.

    Attributes:
        bn: node or module name of the BatchNorm.
        target: node or module name of the layer it folds into ("" for an affine replacement).
        target_kind: "Conv", "ConvTranspose", "Gemm", "MatMul", "Linear", "Conv2d", ...
        direction: forward, backward or affine.
        detail: optional remark (e.g. "cloned shared weight").
        pattern: the id of the fold pattern it was matched as (:data:`bnfold.patterns.CATALOGUE`).
        bias_rounding: ``(value, bound)`` where the fold is not exact because an int32 bias was
            requantised (QDQ graphs, ``--requantize-bias``): the value the layer writes is off by at
            most ``bound`` (half a step of the new bias scale); None for an exact fold.
    """

    bn: str
    target: str
    target_kind: str
    direction: Direction = Direction.FORWARD
    detail: str = ""
    pattern: str | None = None
    bias_rounding: tuple[str, float] | None = None

    @property
    def folded(self) -> bool:
        return True

    @property
    def status(self) -> str:
        """The verdict's status word: folded, affine, converted or propagated."""
        return _STATUS.get(self.direction, "folded")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "bn": self.bn,
            "status": self.status,
            "target": self.target,
            "target_kind": self.target_kind,
            "direction": self.direction.value,
            "reason": None,
            "detail": self.detail,
            "pattern": self.pattern,
            "hints": [],
        }
        if self.bias_rounding is not None:
            d["bias_rounding"] = {"value": self.bias_rounding[0], "bound": self.bias_rounding[1]}
        return d


@dataclass(frozen=True, slots=True)
class Skip:
    """A BatchNorm that is left in the model, and why.

    Attributes:
        bn: node or module name of the BatchNorm.
        reason: the reason class.
        detail: the reason in words (without advice: see ``hints``).
        pattern: the pattern it was tried as, where known (:data:`bnfold.patterns.CATALOGUE`).
        hints: the options that would fold it (:mod:`bnfold.hints`), worded by each surface:
            :meth:`text` for a reader, both wordings in :meth:`to_dict`.
    """

    bn: str
    reason: SkipReason
    detail: str
    pattern: str | None = None
    hints: tuple[Hint, ...] = ()

    @property
    def folded(self) -> bool:
        return False

    def text(self, surface: Surface = "python") -> str:
        """The detail followed by the hints worded for ``surface``."""
        return advise(self.detail, self.hints, surface)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn": self.bn,
            "status": "left",
            "target": None,
            "target_kind": None,
            "direction": None,
            "reason": self.reason.value,
            "detail": self.detail,
            "pattern": self.pattern,
            "hints": [h.to_dict() for h in self.hints],
        }


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
    """The comparison settings used (see :class:`bnfold.verification.compare.Comparator`)."""
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


@dataclass(frozen=True, slots=True)
class PostFoldResult:
    """What the post-fold steps (:mod:`bnfold.postfold`) did; a part of :class:`FoldReport` (``report.post``)."""

    health: HealthReport | None = None
    """The BN health audit (:func:`bnfold.health`), when asked for."""
    pruned_channels: tuple[PrunedChannels, ...] | None = None
    """``prune_constant_channels``: the channels dropped per layer (or why none were)."""
    flushed_denormals: int | None = None
    """Subnormal values set to zero in the folded layers (``flush_denormals=True``); None: not asked."""
    quant: tuple[LayerQuant, ...] = ()
    """After a fold (not a dry run): the per-tensor int8 readiness of every layer it wrote into
    (:func:`bnfold.health_audit.fold_quant`; the audit's own records with ``health``)."""


@dataclass(frozen=True, slots=True)
class FileJob:
    """What a file job (:mod:`bnfold.files`) adds to a fold's report; empty for a fold in memory."""

    files: FileInfo | None = None
    """The files read and written: paths, formats, sizes, total time."""
    signature: dict[str, Any] | None = None
    """An ONNX result's inputs and outputs (:func:`bnfold.files.io_signature`)."""
    verified_on: dict[str, list[int]] | None = None
    """The input shapes verification ran on."""
    predicted_counts: tuple[str, ...] | None = None
    """A dry run that predicts only these counts (torch.export: ``("bn", "params")``); None: every count."""


@dataclass(frozen=True, slots=True)
class FoldReport:
    """What a fold (or a dry run) did to a model: one verdict per BatchNorm, plus figures.

    ``bn_before``/``bn_after`` count BatchNorm layers (nodes or modules) before and after. The results
    of the post-fold steps are one record, ``post`` (:class:`PostFoldResult`), read through
    ``health``, ``pruned_channels``, ``flushed_denormals`` and ``quant``; :meth:`with_post` sets them.
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
    notes: tuple[str, ...] = ()
    post: PostFoldResult = field(default_factory=PostFoldResult)
    """What the post-fold steps did (health audit, pruned channels, flushed denormals)."""
    job: FileJob = field(default_factory=lambda: FileJob())
    """What a file job (:mod:`bnfold.files`) adds: files, signature, the shapes verified on; read through
    ``files``, ``signature``, ``verified_on`` and ``predicted_counts``; :meth:`with_job` sets them."""
    mul_add: tuple[Site, ...] = ()
    """ONNX: per-channel Mul+Add pairs (a frozen BN) folded into the layer before them."""
    culprits: CulpritSearch | None = None
    """The search for the folds that failed verification (:mod:`bnfold.culprit`), when one ran."""
    result: str | None = None
    """fx backend: "module" (the original class, weights edited) or "graph_module" (a traced copy)."""
    export: ExportCounts | None = None
    """PyTorch -> ONNX: who folded what (:mod:`bnfold.export`)."""
    merges: tuple[Merge, ...] = ()
    """Branch merges (structural re-parameterisation, :mod:`bnfold.onnx.merge`): done and refused."""
    convs_before: int | None = None
    """ONNX: Conv nodes before the fold (None: not counted)."""
    convs_after: int | None = None
    """ONNX: Conv nodes after the fold (a merge turns several branch convs into one)."""

    @property
    def health(self) -> HealthReport | None:
        """The BN health audit (:func:`bnfold.health`), when asked for (``post.health``)."""
        return self.post.health

    @property
    def pruned_channels(self) -> tuple[PrunedChannels, ...] | None:
        """``prune_constant_channels``: the channels dropped per layer (``post.pruned_channels``)."""
        return self.post.pruned_channels

    @property
    def flushed_denormals(self) -> int | None:
        """Subnormal values set to zero in the folded layers; None: not asked (``post.flushed_denormals``)."""
        return self.post.flushed_denormals

    @property
    def quant(self) -> tuple[LayerQuant, ...]:
        """The int8 readiness of the layers the fold wrote (``post.quant``)."""
        return self.post.quant

    @property
    def files(self) -> FileInfo | None:
        """A file job's paths, formats, sizes and total time; None in memory (``job.files``)."""
        return self.job.files

    @property
    def signature(self) -> dict[str, Any] | None:
        """An ONNX result's inputs and outputs (``job.signature``)."""
        return self.job.signature

    @property
    def verified_on(self) -> dict[str, list[int]] | None:
        """The input shapes verification ran on (``job.verified_on``)."""
        return self.job.verified_on

    @property
    def predicted_counts(self) -> tuple[str, ...] | None:
        """A dry run that predicts only these counts (``job.predicted_counts``); None: every count."""
        return self.job.predicted_counts

    def with_job(self, **changes: Any) -> FoldReport:
        """The same report with fields of :attr:`job` changed (what the file jobs write)."""
        return replace(self, job=replace(self.job, **changes))

    def with_post(self, **changes: Any) -> FoldReport:
        """This report with fields of :class:`PostFoldResult` replaced (``report.with_post(health=audit)``)."""
        return replace(self, post=replace(self.post, **changes))

    @property
    def sites(self) -> list[Site]:
        return [v for v in self.verdicts if isinstance(v, Site)]

    @property
    def skips(self) -> list[Skip]:
        return [v for v in self.verdicts if isinstance(v, Skip)]

    @property
    def folded(self) -> int:
        """BNs removed: folded, turned affine, propagated or converted (every :class:`Site`)."""
        return len(self.sites)

    @property
    def converted(self) -> int:
        """BNs replaced by another normalisation (``batch_stats="instance"``), counted apart in ``to_dict``."""
        return sum(1 for s in self.sites if s.direction is Direction.CONVERTED)

    def summary(self) -> dict[str, Any]:
        """The counts of the ``--json`` document's ``summary``: by verdict, layer kind and reason; nodes,
        parameters, merges."""
        mul_add = len(self.mul_add)  # per-channel Mul+Add pairs folded into a layer: folds like any BN
        affine = sum(1 for s in self.sites if s.direction is Direction.AFFINE)
        converted = self.converted  # batch_stats="instance": counted apart, not as folds
        by_kind = Counter(
            s.target_kind for s in self.sites if s.direction not in (Direction.AFFINE, Direction.CONVERTED)
        )
        if mul_add:
            by_kind["Mul+Add"] += mul_add
        return {
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "folded": self.folded - affine - converted + mul_add,
            "affine": affine,
            "converted": converted,
            # scale propagation: BNs removed by moving their scale and shift (in "folded" too)
            "propagated": sum(1 for s in self.sites if s.direction is Direction.PROPAGATED),
            "mul_add_folded": mul_add,
            "left": len(self.skips),
            "by_target_kind": dict(sorted(by_kind.items())),
            "by_reason": dict(sorted(Counter(s.reason.value for s in self.skips).items())),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "predicted": self.dry_run,
            # branch merging: sums merged into one Conv, their branches, Convs before/after
            "merges": sum(1 for m in self.merges if m.merged),
            "branches_merged": sum(m.branches_merged for m in self.merges if m.merged),
            "convs_before": self.convs_before,
            "convs_after": self.convs_after,
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as the body of ``bnfold fold --json`` / ``inspect --json`` (schema
        ``bnfold/schemas/report-v1.json``; the CLI adds the common head): the one serialisation."""
        f = self.files
        return {
            **({"model": file_entry(None), "output": None} if f is None else f.to_dict()),
            "backend": self.backend,
            "dry_run": self.dry_run,
            "summary": self.summary(),
            "signature": self.signature,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "mul_add": [m.to_dict() for m in self.mul_add],
            "merges": [m.to_dict() for m in self.merges],
            "verification": None
            if self.verification is None
            else {**self.verification.to_dict(), "inputs": self.verified_on},
            "culprits": None if self.culprits is None else self.culprits.to_dict(),
            "flushed_denormals": self.flushed_denormals,
            "pruned_channels": None
            if self.pruned_channels is None
            else [p.to_dict() for p in self.pruned_channels],
            "health": None if self.health is None else self.health.to_dict(),
            "quant": {
                "ratio_flag": QUANT_RATIO_FLAG,
                "flagged": sum(1 for q in self.quant if q.flagged),
                "layers": [q.to_dict() for q in self.quant],
            },
            "notes": list(self.notes),
            "seconds": float(self.total_seconds),
        }

    @property
    def extra(self) -> MappingProxyType[str, Any]:
        """The typed fields above as the ``extra`` dictionary of earlier versions (read-only view)."""
        x: dict[str, Any] = {}
        if self.mul_add:
            x["mul_add"] = [s.to_dict() for s in self.mul_add]
        if self.culprits is not None:
            x["culprits"] = self.culprits.to_dict()
        if self.pruned_channels is not None:
            x["pruned_channels"] = [p.to_dict() for p in self.pruned_channels]
        if self.result is not None:
            x["result"] = self.result
        if self.export is not None:
            x.update(self.export.to_dict())
        if self.merges:
            x["merges"] = [m.to_dict() for m in self.merges]
        return MappingProxyType(x)

    @property
    def total_seconds(self) -> float:
        """The whole file job's time when there was one, else the fold's."""
        if self.files is not None and self.files.total_seconds is not None:
            return self.files.total_seconds
        return self.seconds


@dataclass(frozen=True, slots=True)
class ExportCounts:
    """A PyTorch -> ONNX fold: BNs folded in PyTorch, removed by the exporter itself, folded in ONNX, left."""

    torch: int
    exporter: int
    onnx: int
    left: int
    exporter_kind: str
    """"legacy" or "dynamo"."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class FileInfo:
    """The files a job read and wrote: paths, formats, sizes on disk (external data included)."""

    source: str
    source_format: str
    size_before: int | None = None
    source_data_files: tuple[str, ...] = ()
    output: str | None = None
    output_format: str | None = None
    size_after: int | None = None
    output_data_files: tuple[str, ...] = ()
    written: bool = False
    total_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """``model`` and ``output`` as the ``--json`` documents write them (``output`` null when none)."""
        return {
            "model": file_entry(self.source, self.source_format, self.size_before, self.source_data_files),
            "output": None
            if not self.output
            else file_entry(
                self.output, self.output_format, self.size_after, self.output_data_files, written=self.written
            ),
        }


def file_entry(
    path: Any, fmt: str | None = None, size: int | None = None, data_files: Any = (), **more: Any
) -> dict[str, Any]:
    """One file of a ``--json`` document: path, format, size on disk, external data files (and ``more``)."""
    return {
        "path": None if path is None else str(path),
        "format": fmt,
        "size_bytes": size,
        "data_files": [str(f) for f in data_files or ()],
        **more,
    }


@dataclass(frozen=True, slots=True)
class FreezeReport:
    """What ``bnfold freeze`` did to a file: the layers frozen (name, class) and the BNs left, with why."""

    files: FileInfo
    learnable: bool
    frozen: tuple[tuple[str, str], ...]
    left: tuple[Skip, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The body of ``bnfold freeze --json`` (the CLI adds the common head): the one serialisation."""
        return {
            **self.files.to_dict(),
            "learnable": self.learnable,
            "frozen": [{"module": n, "kind": k} for n, k in self.frozen],
            "left": [{"module": s.bn, "reason": s.reason.value, "detail": s.detail} for s in self.left],
            "seconds": float(self.seconds),
        }


class MergeReason(str, enum.Enum):
    """Why a branch of a sum was not merged into one convolution (:mod:`bnfold.onnx.merge`)."""

    STRIDE = "stride"
    """Its stride differs from the merged convolution's (or an identity / pool on a strided sum)."""
    DILATION = "dilation"
    """Its dilation differs."""
    GROUPS = "groups"
    """Its groups or channel counts differ (or an identity where C_in != C_out)."""
    PADDING = "padding"
    """Its padding does not centre it in the largest kernel, or ``auto_pad`` SAME_*, or a pool that
    does not count padded zeros."""
    KERNEL = "kernel"
    """Its kernel cannot be centred in the largest one (an odd difference of sizes, or larger on an axis)."""
    OTHER_CONSUMERS = "other_consumers"
    """A tensor inside the branch is also read elsewhere (or is a graph output)."""
    NONLINEAR = "nonlinear"
    """An activation or another non-linear op sits inside the branch."""
    NON_CONSTANT = "non_constant"
    """A weight, BN parameter or scale is not a constant."""
    UNSUPPORTED = "unsupported"
    """A branch form bnfold cannot merge (training-mode BN, per-element scale, another dtype, ...)."""
    OVERFLOW = "overflow"
    """The merged weight or bias would not be finite in the model's dtype."""
    NO_PARTNER = "no_partner"
    """Nothing else in the sum could be merged with it."""
    VERIFICATION = "verification"
    """Left unmerged on request (e.g. its merge failed verification)."""


@dataclass(frozen=True, slots=True)
class BranchVerdict:
    """One branch of a sum: merged, or left and why."""

    branch: str
    """The node that ends the branch (its label), or the shared input's name for an identity."""
    kind: str
    """"conv", "identity", "bn", "avgpool", or "other"."""
    merged: bool
    reason: MergeReason | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "branch": self.branch,
            "kind": self.kind,
            "merged": self.merged,
            "reason": None if self.reason is None else self.reason.value,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Merge:
    """A sum of branches that all read one tensor: merged into one Conv, or refused."""

    sum: str
    """Label of the sum (the last Add of the chain, or the Sum node)."""
    input: str
    """The tensor every branch reads."""
    target: str
    """The merged Conv ("" when refused)."""
    merged: bool
    branches: tuple[BranchVerdict, ...]
    convs_before: int
    """Conv nodes among the branches before the merge."""
    convs_after: int
    """Conv nodes left for them after (1 when merged)."""

    @property
    def branches_merged(self) -> int:
        return sum(1 for b in self.branches if b.merged)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sum": self.sum,
            "input": self.input,
            "target": self.target,
            "merged": self.merged,
            "branches_merged": self.branches_merged,
            "convs_before": self.convs_before,
            "convs_after": self.convs_after,
            "branches": [b.to_dict() for b in self.branches],
        }
