"""The optional steps after a fold, in their order: health audit, constant-channel pruning, flush.

:func:`run` owns the sequence (snapshot -> backend fold -> these steps) and every entry point goes
through it: ``bnfold.fold`` / ``fold_with_report``, ``files.fold_file`` (ONNX and PyTorch sources,
the culprit re-folds included) and ``bnfold.export_onnx`` / ``export_folded``, where each of the two
folds (PyTorch, then ONNX on what the exporter left) runs it and the report adds their flushes.

Rules:

1. the audit (:mod:`bnfold.health_audit`) sees the fold as the backend wrote it: before pruning and flush;
2. pruning (:mod:`bnfold.constant_channels`, nn.Module only) runs on the folded copy;
3. the denormal flush (:mod:`bnfold.denormals`) comes last, so it also covers the biases pruning wrote;
   ONNX: the initializers of the fold targets; PyTorch: the tensors that differ from the snapshot
   taken before the fold.

:func:`before_fold` takes that snapshot (only when a step needs one); verification, which the caller
runs afterwards, checks the model as it leaves here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .errors import OptionError
from .options import FoldOptions
from .records import FoldReport

__all__ = ["run", "before_fold", "after_fold", "added_flushes"]


def run(
    model: Any,
    kind: str,
    options: FoldOptions,
    fold: Callable[[], tuple[Any, FoldReport]],
    *,
    inplace: bool = False,
) -> tuple[Any, FoldReport]:
    """The fold sequence: :func:`before_fold` on ``model``, ``fold()`` (the backend), :func:`after_fold`.

    ``options``: the steps run are its ``health``, ``prune_constant_channels`` and ``flush_denormals``.
    ``fold`` folds ``model`` (an ONNX fold may flush as it writes: :attr:`FoldOptions.flush_as_written`).

    Returns:
        ``(folded model, report)`` with the steps' results recorded.
    """
    before = before_fold(model, kind, options, inplace=inplace)
    out, report = fold()
    return out, after_fold(model, out, report, before, kind, options)


def added_flushes(a: int | None, b: int | None) -> int | None:
    """The flush count of two folds of one model (None when neither flushed)."""
    return None if a is None and b is None else (a or 0) + (b or 0)


def before_fold(model: Any, kind: str, options: FoldOptions, *, inplace: bool) -> Any:
    """Check the options against the model and return the snapshot the later steps need (or None).

    Raises:
        OptionError: pruning on a model that is not an ``nn.Module``; a health audit of an in-place fold.
    """
    if options.prune_constant_channels and kind != "module":
        raise OptionError("prune_constant_channels works on nn.Module models only")
    if options.health and inplace:
        raise OptionError("health=True needs the original model: it cannot be combined with inplace=True")
    if options.health or (options.flush_denormals and kind != "onnx"):
        from .denormals import snapshot

        return snapshot(model)  # what the fold writes is told apart from what was there
    return None


def after_fold(
    original: Any, out: Any, report: FoldReport, before: Any, kind: str, options: FoldOptions
) -> FoldReport:
    """Run the steps on the folded ``out`` (edited); ``report`` with their results recorded."""
    if options.health:
        from .health_audit import audit

        report = report.with_post(health=audit(original, out, report, before))
    from .health_audit import fold_quant  # the cheap part of the audit, after every fold

    report = report.with_post(
        quant=report.health.quant if report.health is not None else fold_quant(out, report)
    )
    if options.prune_constant_channels:
        from .constant_channels import prune_constant_channels

        pruned = prune_constant_channels(out)
        note = f"{sum(len(p.channels) for p in pruned if p.pruned)} constant channel(s) pruned"
        report = replace(
            report.with_post(pruned_channels=tuple(pruned)),
            notes=(*report.notes, note),
            params_after=sum(t.numel() for t in out.state_dict().values() if hasattr(t, "numel")),
        )
    if options.flush_denormals:
        from .denormals import flush_model, flush_targets

        flushed = flush_targets(out, report) if kind == "onnx" else flush_model(out, before)
        report = report.with_post(flushed_denormals=flushed)
    return report
