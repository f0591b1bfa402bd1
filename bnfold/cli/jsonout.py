"""The ``--json`` documents (schema ``bnfold/schemas/report-v1.json``): one per command, and one for errors.

Rules: a document is built from the record a job returned, never from printed text; keys are only
added within schema 1 (a removal or rename bumps :data:`SCHEMA_VERSION`); the top-level counts of the
0.1.0 documents stay as aliases of ``summary.*``. Nothing here prints or imports rich.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from bnfold.records import Direction, FoldReport, Site, Skip

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "counts",
    "json_document",
    "error_document",
    "finite_json",
    "NON_FINITE",
]

SCHEMA = "bnfold.report"
SCHEMA_VERSION = 1
"""Bumped on any change that removes or renames a key (new keys do not bump it)."""


NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
"""How a number JSON cannot hold is written: the strings ``"inf"``, ``"-inf"``, ``"nan"`` (schema ``real``)."""


def finite_json(value: Any) -> Any:
    """``value`` with every float that JSON cannot hold (inf, -inf, nan) replaced by its string.

    ``json.dumps`` would write the bare ``Infinity``/``NaN`` tokens, which are not JSON: a strict
    parser (``jq``, JavaScript's ``JSON.parse``) rejects the whole document. Numpy scalars become
    Python numbers; containers are copied, never changed in place.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float) or (
        hasattr(value, "dtype")
        and getattr(value, "ndim", None) == 0
        and getattr(value.dtype, "kind", "") == "f"
    ):
        f = float(value)
        if math.isfinite(f):
            return f
        return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _mul_add(report: FoldReport) -> int:
    """Per-channel Mul+Add pairs folded into a layer (ONNX frozen BN): folds like any BN."""
    return len(report.mul_add)


def counts(report: FoldReport) -> dict[str, Any]:
    affine = sum(1 for s in report.sites if s.direction is Direction.AFFINE)
    converted = report.converted  # batch_stats="instance": counted apart, not as folds
    by_kind = Counter(
        s.target_kind for s in report.sites if s.direction not in (Direction.AFFINE, Direction.CONVERTED)
    )
    if _mul_add(report):
        by_kind["Mul+Add"] += _mul_add(report)
    return {
        "bn_before": report.bn_before,
        "bn_after": report.bn_after,
        "folded": report.folded - affine - converted + _mul_add(report),
        "affine": affine,
        "converted": converted,
        # scale propagation: BNs removed by moving their scale and shift (in "folded" too)
        "propagated": sum(1 for s in report.sites if s.direction is Direction.PROPAGATED),
        "mul_add_folded": _mul_add(report),
        "left": len(report.skips),
        "by_target_kind": dict(sorted(by_kind.items())),
        "by_reason": dict(sorted(Counter(s.reason.value for s in report.skips).items())),
        "nodes_before": report.nodes_before,
        "nodes_after": report.nodes_after,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "predicted": report.dry_run,
        # branch merging (bnfold.onnx.merge): sums merged into one Conv, their branches, Convs before/after
        "merges": sum(1 for m in report.merges if m.merged),
        "branches_merged": sum(m.branches_merged for m in report.merges if m.merged),
        "convs_before": report.convs_before,
        "convs_after": report.convs_after,
    }


def _head(command: str, exit_code: int) -> dict[str, Any]:
    from bnfold import __version__

    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "ok": exit_code == 0,
        "exit_code": exit_code,
        "bnfold_version": __version__,
    }


def _file(path: Any, fmt: Any = None, size: Any = None, data_files: Any = (), **more: Any) -> dict[str, Any]:
    return {
        "path": None if path is None else str(path),
        "format": fmt,
        "size_bytes": size,
        "data_files": [str(f) for f in data_files or ()],
        **more,
    }


def _verdict_json(v: Site | Skip) -> dict[str, Any]:
    if isinstance(v, Site):
        return {
            "bn": v.bn,
            "status": v.status,
            "target": v.target,
            "target_kind": v.target_kind,
            "direction": v.direction.value,
            "reason": None,
            "detail": v.detail,
            "pattern": v.pattern,
        } | (
            {}
            if v.bias_rounding is None
            else {"bias_rounding": {"value": v.bias_rounding[0], "bound": v.bias_rounding[1]}}
        )
    return {
        "bn": v.bn,
        "status": "left",
        "target": None,
        "target_kind": None,
        "direction": None,
        "reason": v.reason.value,
        "detail": v.detail,
        "pattern": v.pattern,
    }


def _fold_body(report: FoldReport) -> dict[str, Any]:
    f = report.files
    out = None
    if f is not None and f.output:
        out = _file(f.output, f.output_format, f.size_after, f.output_data_files, written=f.written)
    return {
        "model": _file(None, None, None)
        if f is None
        else _file(f.source, f.source_format, f.size_before, f.source_data_files),
        "output": out,
        "backend": report.backend,
        "dry_run": report.dry_run,
        "summary": counts(report),
        "signature": report.signature,
        "verdicts": [_verdict_json(v) for v in report.verdicts],
        "mul_add": [m.to_dict() for m in report.mul_add],
        "merges": [m.to_dict() for m in report.merges],
        "verification": None
        if report.verification is None
        else {
            **report.verification.to_dict(),
            "inputs": report.verified_on,
        },
        "culprits": None if report.culprits is None else report.culprits.to_dict(),
        "flushed_denormals": report.flushed_denormals,
        "pruned_channels": None
        if report.pruned_channels is None
        else [p.to_dict() for p in report.pruned_channels],
        "health": None if report.health is None else report.health.to_dict(),
        "quant": _quant_json(report),
        "notes": list(report.notes),
        "seconds": float(report.total_seconds),
    }


_LEGACY_COUNTS = (
    "bn_before",
    "bn_after",
    "folded",
    "nodes_before",
    "nodes_after",
    "params_before",
    "params_after",
)
"""Top-level keys of the 0.1.0 documents, kept in schema 1 as aliases of ``summary.*`` (removed in 2)."""
_LEGACY_VERIFY = ("passed", "samples", "max_abs_error", "max_rel_error", "outputs")
"""Top-level keys of 0.1.0's ``verify --json``, kept in schema 1 as aliases of ``verification.*``."""


def _quant_json(report: FoldReport) -> dict[str, Any]:
    """Per-tensor int8 readiness of the layers the fold wrote (empty for a dry run)."""
    from bnfold.health_records import QUANT_RATIO_FLAG

    return {
        "ratio_flag": QUANT_RATIO_FLAG,
        "flagged": sum(1 for q in report.quant if q.flagged),
        "layers": [q.to_dict() for q in report.quant],
    }


def json_document(command: str, result: Any, *, exit_code: int = 0, **files: Any) -> dict[str, Any]:
    """The ``--json`` document of ``command`` (schema ``bnfold/schemas/report-v1.json``).

    Args:
        command: "fold", "inspect", "verify", "freeze" or "bench".
        result: the record the job returned (``FoldReport``, ``VerifyReport``, ``BenchReport``, freeze dict).
        exit_code: the exit code the command ends with (``ok`` is ``exit_code == 0``).
        files: ``verify`` only: ``reference=`` and ``candidate=`` paths.
    """
    doc = _head(command, exit_code)
    if command in ("fold", "inspect"):
        doc.update(_fold_body(result))
        doc.update({k: doc["summary"][k] for k in _LEGACY_COUNTS})
    elif command == "verify":
        doc.update(
            reference=_file(files.get("reference")),
            candidate=_file(files.get("candidate")),
            verification={**result.to_dict(), "inputs": None},
        )
        doc.update({k: doc["verification"][k] for k in _LEGACY_VERIFY})
    elif command == "freeze":
        f = result.files
        doc.update(
            model=_file(f.source, f.source_format, f.size_before),
            output=_file(f.output, f.output_format, f.size_after, written=f.written),
            learnable=result.learnable,
            frozen=[{"module": n, "kind": k} for n, k in result.frozen],
            left=[{"module": s.bn, "reason": s.reason.value, "detail": s.detail} for s in result.left],
            seconds=float(result.seconds),
        )
    elif command == "bench":
        doc.update(
            model=_file(result.model, result.format),
            runs=result.runs,
            warmup=result.warmup,
            threads=result.threads,
            input_shapes={k: list(v) for k, v in result.input_shapes.items()},
            timings=[t.to_dict() for t in result.timings],
            summary=counts(result.fold),
            notes=list(result.notes),
        )
        doc.update({k: doc["summary"][k] for k in ("bn_before", "bn_after", "folded")})
    elif command == "recalibrate":
        doc.update(result.to_dict())
    else:  # pragma: no cover - the CLI names its commands
        raise ValueError(f"unknown command {command!r}")
    return doc


def error_document(command: str, error_type: str, message: str, exit_code: int) -> dict[str, Any]:
    """The ``--json`` document of a command that failed: the common head and an ``error`` object."""
    doc = _head(command, exit_code)
    doc["error"] = {"type": error_type, "message": message, "exit_code": exit_code}
    return doc
