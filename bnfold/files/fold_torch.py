"""The PyTorch side of ``bnfold fold``: a module or program folded to ``.pt``/``.pt2``, or exported to ``.onnx``.

Rules:
    * the reference is always the PyTorch original, run eagerly on the example inputs (which carry
      shapes and data: :meth:`~bnfold.files.verify.Prepared.carried_by_examples`);
    * ``.onnx``: :func:`bnfold.export.export_folded` folds, exports and folds what the exporter left,
      returning the ``ModelProto``; with a dynamic batch the claim is checked at one more batch;
    * ``.pt``/``.pt2``: verified in memory (reloading a pickle would need trust), and when verification
      fails the folds that make it fail are found and left in place (:mod:`bnfold.culprit`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError, OptionError, VerificationError
from bnfold.export import export_folded
from bnfold.hints import STATIC_BATCH
from bnfold.options import FoldOptions
from bnfold.records import FoldReport, VerifyReport
from bnfold.verification.inputs import torch_examples

from .load import ProgressFn
from .settings import FoldSettings, refuse
from .verify import Prepared, run_verify

__all__ = ["fold_torch", "without_culprits", "check_other_batch", "verify_on_examples", "eval_if"]


def eval_if(model: Any, eval_semantics: bool) -> Any:
    """With ``eval_semantics`` a loaded module is put in eval mode (bnfold owns what it loaded)."""
    if eval_semantics:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise OptionError("--eval-semantics: applies only to an nn.Module (not a torch.export program)")
        model.eval()
    return model


def fold_torch(
    src: Path,
    model: Any,
    default_examples: tuple[Any, ...] | None,
    out_fmt: str,
    prep: Prepared,
    settings: FoldSettings,
    progress: ProgressFn,
) -> tuple[FoldReport, Any, tuple[Any, ...] | None]:
    """Fold (and for ``.onnx`` export) ``model``; returns ``(report, result, example inputs)``; nothing verified."""
    import torch

    from bnfold.api import fold_with_options

    options = settings.options
    is_ep = isinstance(model, torch.export.ExportedProgram)
    needs_examples = settings.verify or out_fmt in ("onnx", "pt2")
    examples = (
        torch_examples(model, prep.shapes, prep.arrays, prep.seed, src, default_examples)
        if needs_examples
        else None
    )
    if out_fmt == "onnx" or is_ep:
        refuse(
            {"--batch-stats": options.batch_stats},
            "applies to ONNX models and nn.Modules written as "
            ".pt/.pth/.pt2 (not to a PyTorch model written as .onnx, nor to a torch.export program)",
        )
    if out_fmt == "onnx":
        # each fold runs the post-fold steps (bnfold.postfold): the audit and flush of what bnfold wrote
        result, report = export_folded(
            model, examples, export=settings.export, progress=progress, options=options
        )
        return report, result, examples
    progress("fold", 0, 1)
    # Example inputs prove where a Linear meets a BatchNorm1d on 2-D data (see bnfold.fold).
    result, report = fold_with_options(model, options, example_inputs=None if is_ep else examples)
    progress("fold", 1, 1)
    if out_fmt == "pt2" and not is_ep:
        progress("export", 0, 1)
        result = torch.export.export(result, tuple(examples or ()))
        progress("export", 1, 1)
    return report, result, examples


def without_culprits(
    src: Path,
    model: Any,
    out_fmt: str,
    examples: tuple[Any, ...],
    prep: Prepared,
    report: FoldReport,
    result: Any,
    *,
    options: FoldOptions,
    progress: ProgressFn,
) -> tuple[FoldReport, Any]:
    """An ``nn.Module`` written as ``.pt``/``.pt2``: bisect over its folds (``fold_module(exclude=...)``).

    The re-folds take ``options`` (:meth:`~bnfold.options.FoldOptions.refold`), merging where the first fold
    merged (a merged sum is bisected like a fold, by its label); ``batch_stats="instance"``: the conversions
    too, as the first fold made them (excluded ones are left).
    """
    import torch

    from bnfold.culprit import fold_without_culprits
    from bnfold.fx.batch_stats import convert_batch_stats, copy_for, with_conversions
    from bnfold.fx.module import fold_module

    merge = any(m.merged for m in report.merges)  # a merged sum is bisected like a fold (by its label)
    again = replace(options.refold(), merge_branches=merge)

    def fold(excluded: frozenset[str]) -> tuple[Any, FoldReport]:
        if again.batch_stats is not None:
            work, sites = convert_batch_stats(copy_for(model, False), exclude=excluded)
            out, rep = fold_module(work, options=again, example_inputs=examples, exclude=excluded)
            rep = with_conversions(rep, sites, model, False)
        else:
            out, rep = fold_module(model, options=again, example_inputs=examples, exclude=excluded)
        if out_fmt == "pt2":
            return torch.export.export(out, tuple(examples)), rep
        return out, rep

    def check(candidate: Any) -> VerifyReport:
        return verify_on_examples(model, candidate, examples, prep, progress, src)

    folded, new, search = fold_without_culprits(report, fold, check)
    return (new, folded) if search.resolved else (new, result)  # unresolved: the search is reported


def verify_on_examples(
    model: Any,
    candidate: Any,
    examples: tuple[Any, ...] | None,
    prep: Prepared,
    progress: ProgressFn,
    src: Path,
) -> VerifyReport:
    """A PyTorch ``model`` and ``candidate`` compared on the example tensors (which carry the shapes and
    the data; the job's other settings as ``prep``); errors name ``src``."""
    return run_verify(
        model,
        candidate,
        prep.carried_by_examples(),
        example_inputs=examples,
        progress=progress,
        where=str(src),
    )


def check_other_batch(
    model: Any, candidate: Any, examples: tuple[Any, ...], prep: Prepared, progress: ProgressFn, src: Path
) -> None:
    """A dynamic batch is a claim: check it at a batch size the export did not see (one more).

    A model that bakes its batch size in (``x.reshape(2, -1)``) exports with a ``batch`` dimension
    that only works at the traced size; it is refused with the way out instead of shipped.
    """
    import torch

    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.is_floating_point() for t in examples):
        return  # integer inputs (indices) may not take random rows: the traced batch was checked
    batch = int(examples[0].shape[0])
    g = torch.Generator().manual_seed(prep.seed + 1)
    other = tuple(torch.randn((batch + 1, *t.shape[1:]), generator=g, dtype=t.dtype) for t in examples)
    why = ""
    try:
        rep = verify_on_examples(model, candidate, other, prep, progress, src)
        if not rep.passed:
            why = f"max abs error {rep.max_abs_error:.3g}"
    except BnfoldError as e:
        why = str(e)
    if why:
        raise VerificationError(
            f"{src}: the exported ONNX model is right at batch {batch} but not at batch {batch + 1} ({why})",
            hints=[STATIC_BATCH],
        )
