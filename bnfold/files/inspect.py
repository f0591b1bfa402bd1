"""``bnfold inspect`` on a file: the verdict ``fold`` would give every BatchNorm; nothing is written.

Rules:
    * every option that decides a verdict in ``fold`` is taken here too (``affine`` for ONNX;
      ``eval_semantics`` and the shapes that prove where a Linear meets a BatchNorm1d for PyTorch);
    * every backend's dry run plans the rewrite and predicts the counts after it; a torch.export
      program predicts BNs and parameters but not nodes (the re-export adds ``getitem`` nodes to a BN
      that stays), and the report says so in ``predicted_counts`` (a typed field, set once, here).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnfold.records import FileInfo, FoldReport
from bnfold.verification.inputs import torch_examples

from .load import ProgressFn, load, noop
from .settings import InspectSettings, VerifySettings, check_batch_stats, check_inputs, refuse
from .verify import check_onnx_shapes, io_signature, prepare

__all__ = ["inspect_file"]


def inspect_file(
    src: str | os.PathLike[str],
    settings: InspectSettings | None = None,
    progress: ProgressFn | None = None,
    *,
    output_format: str | None = None,
) -> FoldReport:
    """The verdict for every BatchNorm of the model in ``src``, as ``fold`` would give it; nothing written.

    ``settings.options.health`` also audits the BNs (:func:`bnfold.health`) into ``report.health``.
    ``output_format``: the format of ``fold``'s OUT the verdicts are for: ``None`` (the source's own:
    ``.pt``/``.pt2`` for PyTorch), or ``"onnx"``: a PyTorch model is then folded, exported and folded
    again in memory (:func:`bnfold.export.export_folded`, the default export settings), as
    ``fold MODEL OUT.onnx`` does, so BNs the exporter or the ONNX fold remove are counted as folded.

    Returns:
        A dry-run :class:`FoldReport`; for a torch.export program
        ``predicted_counts`` is ``("bn", "params")`` (nodes are not predicted); ``files`` holds the path, format and file size (external
        data included).
    """
    t0 = time.perf_counter()
    s = settings or InspectSettings()
    prog = progress or noop
    src_p = Path(src)
    check_inputs(s.inputs)
    opts = s.options
    check_batch_stats(opts.batch_stats)
    prep = prepare(s.inputs, VerifySettings(), src_p)
    # The dry run reads only the weights it folds, from their files (ONNX external data).
    loaded = load(src_p, s.load, prog, lazy_external_data=True)
    model = loaded.model
    prog("fold", 0, 1)
    from bnfold.api import fold_with_options

    dry = replace(opts, health=False)  # the audit runs once, below

    examples: Any = None
    if loaded.format == "onnx":
        refuse(
            {"--eval-semantics": opts.eval_semantics},
            "applies only to PyTorch models (MODEL is an ONNX model)",
        )
        check_onnx_shapes(model, prep.shapes, src_p)
        from bnfold.io.stream import spilling

        # The dry run folds a copy: the weights it writes go to an unnamed temporary file, not memory.
        with spilling(None if opts.health else tempfile.gettempdir()):
            _, report = fold_with_options(model, dry, dry_run=True)
        report = report.with_job(signature=io_signature(model))
    else:
        import torch

        from .fold_torch import eval_if

        to_onnx = output_format == "onnx"
        if not to_onnx:
            refuse(
                {"--affine": opts.affine},
                "applies only to ONNX models (Mul + Add are ONNX nodes); with a "
                "PyTorch MODEL, together with --to onnx",
            )
        model = eval_if(model, opts.eval_semantics)
        if to_onnx or isinstance(model, torch.export.ExportedProgram):
            refuse(
                {"--batch-stats": opts.batch_stats},
                "applies to ONNX models and nn.Modules folded as "
                "PyTorch (not with --to onnx, nor to a torch.export program)",
            )
        if to_onnx:
            from bnfold.export import ExportSettings, export_folded

            own = (
                loaded.example_inputs
                if loaded.example_inputs is not None
                else getattr(model, "example_inputs", None)
            )
            examples = torch_examples(model, prep.shapes, prep.arrays, prep.seed, src_p, own)
            onnx_model, report = export_folded(
                model, examples, export=ExportSettings(), progress=lambda *a: None, options=dry
            )
            report = replace(report, dry_run=True).with_job(signature=io_signature(onnx_model))
            del onnx_model
        elif isinstance(model, torch.export.ExportedProgram):
            _, report = fold_with_options(model, dry, dry_run=True)
        else:
            own = (
                loaded.example_inputs
                if loaded.example_inputs is not None
                else getattr(model, "example_inputs", None)
            )
            if prep.shapes or prep.arrays or own is not None:
                examples = torch_examples(model, prep.shapes, prep.arrays, prep.seed, src_p, own)
            _, report = fold_with_options(model, dry, dry_run=True, example_inputs=examples)
        if isinstance(model, torch.export.ExportedProgram) and not to_onnx:
            report = report.with_job(predicted_counts=("bn", "params"))
    if opts.health:
        from bnfold.api import health as audit_model

        if loaded.format == "onnx":
            audit = audit_model(model, affine=opts.affine)
        else:
            audit = audit_model(model, eval_semantics=opts.eval_semantics, example_inputs=examples)
        report = report.with_post(health=audit)
    prog("fold", 1, 1)
    files = FileInfo(
        source=str(src_p),
        source_format=loaded.format,
        size_before=loaded.size,
        total_seconds=time.perf_counter() - t0,
    )
    return report.with_job(files=files)
