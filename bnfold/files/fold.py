"""``bnfold fold`` on files: load once -> fold -> stage OUT -> verify what ships -> commit.

Rules:
    * every option and the output path are checked before anything is loaded (:mod:`.settings`,
      :mod:`.output`);
    * MODEL is loaded once (:func:`.load.load`); an ONNX source with an ONNX output never imports torch;
    * an ONNX output is staged (:func:`bnfold.io.staged_save`: written to its temporary path, loadable
      as it is), *that file* is verified, and only then renamed into place: one serialisation, and what
      was verified is exactly what ships. With ``force`` a failed one is committed too (exit 1 still);
    * when verification fails (without ``all_or_nothing``) the folds that make it fail are found in
      memory and left in place (:mod:`bnfold.culprit`); the model that ships is staged and verified again;
    * a PyTorch output (``.pt``/``.pt2``) is verified in memory: reloading a pickle would need trust;
    * the reference for an ONNX source is the source *file* on disk: the loaded model is folded with
      ``inplace=True`` and onnxruntime reads the untouched file (external data resolved next to it);
      with ``in_place`` the source is only replaced at commit;
    * memory (ONNX source): external weights stay in their files until the fold reads them (a lazy
      load); without the health audit the weights the fold writes wait for the writer in an unnamed
      temporary file next to OUT (:func:`bnfold.io.stream.spilling`); the folded model is freed once
      staged, before onnxruntime loads the source and the staged file.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bnfold.errors import FoldVerificationError
from bnfold.postfold import run
from bnfold.records import FoldReport, Site, VerifyReport

from .load import ProgressFn, file_info, load, noop
from .output import check_output, check_pairing, same_file, staged
from .settings import FoldSettings, check_fold, refuse
from .verify import Prepared, check_onnx_shapes, io_signature, prepare, run_verify, verified_on

__all__ = ["fold_file", "NOTHING_CHANGED"]

_NOT_ONNX = "applies only to PyTorch models (MODEL is an ONNX model)"


def fold_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    settings: FoldSettings | None = None,
    progress: ProgressFn | None = None,
) -> FoldReport:
    """Fold every exactly-foldable BatchNorm of the model in ``src``, verify, and write ``dst``.

    ``dst``'s extension picks the output format: ``.onnx``; ``.pt2`` (torch.export); ``.pt``/``.pth``/
    ``.ckpt``/``.bin`` (a pickled module, since a folded model no longer has the factory's layout).
    A PyTorch source written to ``.onnx`` is folded, exported (dynamic batch, names from the forward
    signature: see :mod:`bnfold.export`), folded again where the exporter left BN, and verified against
    the PyTorch original.

    Args:
        src: the model file (never modified, unless ``settings.in_place`` and ``dst`` is ``src``).
        dst: the output file, written atomically.
        settings: the options (:class:`~bnfold.files.settings.FoldSettings`; defaults when None).
        progress: ``progress(stage, done, total)`` callback.

    Returns:
        The :class:`FoldReport`; ``report.files`` holds paths, formats, file sizes (external data
        included); ``report.verification`` the :class:`VerifyReport` (None with ``verify=False``).

    Raises:
        OutputError, OptionError, ModelFormatError, ...: exit code 2, nothing written.
        FoldVerificationError: verification failed; nothing written unless ``force`` (then
            ``fold_report.files.written`` is True).
    """
    s = settings or FoldSettings()
    with contextlib.ExitStack() as job:  # holds the spill file of an ONNX fold (see below)
        if s.requantize_bias:  # every fold of the job, the culprit search's included
            from bnfold.onnx.match_qdq import requantize_int32_bias

            job.enter_context(requantize_int32_bias(True))
        return _fold_file(src, dst, s, progress or noop, job)


def _fold_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    s: FoldSettings,
    prog: ProgressFn,
    job: contextlib.ExitStack,
) -> FoldReport:
    t0 = time.perf_counter()
    src_p, dst_p = Path(src), Path(dst)
    out_fmt = check_fold(s, dst_p)
    prep = prepare(s.inputs, s.verification, src_p)
    check_output(src_p, dst_p, in_place=s.in_place)
    check_pairing(src_p, out_fmt, dst_p)
    # The folded model goes only to the writer (verification reads the source file and the staged
    # one): ONNX weights stay in their files until the fold reads them (see bnfold.io.load_file).
    loaded = load(src_p, s.load, prog, lazy_external_data=True)
    from bnfold import io as bio
    from bnfold.io.stream import spilling

    # Exact now that the input was read: neither OUT nor its data file may be a file the input reads.
    protect = [] if same_file(src_p, dst_p) else bio.files_read_by(src_p)
    if s.inputs.inputs is not None:
        protect.append(os.fspath(s.inputs.inputs))  # --inputs DATA.npz is read too
    bio.check_output_path(src_p, dst_p, in_place=s.in_place, input_files=protect)
    external_data = s.external_data
    if loaded.format == "onnx":
        refuse({**s.export.flags(), "--eval-semantics": s.options.eval_semantics}, _NOT_ONNX)
        # The weights the fold writes wait for the writer in a file, not in memory (the health audit
        # and its flush read the written tensors from the model: they stay there).
        if not s.options.health:
            job.enter_context(spilling(dst_p.parent))
        report, result = _fold_onnx(src_p, loaded.model, prep, s, prog)
        if s.verify and s.verification.atol is None:
            prep, report = _bias_rounding_tolerance(prep, report, result)
        check: Callable[[Any], VerifyReport] = lambda cand: run_verify(  # noqa: E731
            str(src_p), cand, prep, example_inputs=None, progress=prog, where=str(src_p)
        )
        if external_data is None:
            external_data = bool(loaded.data_files) or None
    else:
        report, result, check = _fold_torch(src_p, loaded, out_fmt, prep, s, prog)
    files = file_info(loaded, src_p, dst_p, out_fmt)
    report = report.with_job(files=files)
    ship = _Ship(dst_p, out_fmt, external_data, protect, prog)
    verify_now = s.verify
    if s.verify and loaded.format == "onnx" and _unchanged(report):
        verify_now = False  # the written model computes what the source computes: nothing to run
        report = replace(report, notes=(*report.notes, NOTHING_CHANGED))
    with ship.stage(result) as st:
        if loaded.format == "onnx":
            # What ships is the staged file and the reference is the source file: the folded model
            # is freed before onnxruntime loads both (only the report is kept).
            loaded, result = replace(loaded, model=None), None
        if verify_now:
            report = replace(report, verification=check(st.path))
        if s.all_or_nothing or report.verification is None or report.verification.passed:
            return _finish(st, src_p, dst_p, report, s, t0, out_fmt, loaded.data_files)
    # Left the block without commit: the failed staged file is gone before the re-folds. An ONNX
    # source is re-read by every re-fold (its failed fold was freed above, and its spill file is
    # closed now: the re-folds are checked in memory): memory stays at one model plus the one verified.
    job.close()
    report, culprit_free, resolved = _without_culprits(src_p, loaded, out_fmt, prep, s, report, result, prog)
    del result
    if culprit_free is None:  # nothing to write: _finish raises before it would commit
        return _finish(None, src_p, dst_p, report, s, t0, out_fmt, loaded.data_files)
    with ship.stage(culprit_free) as st:
        if resolved and st.path is not culprit_free:  # a staged file: verify the bytes that ship
            report = replace(report, verification=check(st.path))
        return _finish(st, src_p, dst_p, report, s, t0, out_fmt, loaded.data_files)


NOTHING_CHANGED = (
    "not verified: nothing changed (no fold, no other edit), the output computes what MODEL computes"
)


def _unchanged(report: FoldReport) -> bool:
    """An ONNX fold that edited nothing: no BN or Mul+Add folded, no value flushed, no channel pruned, same counts."""
    return (
        report.folded == 0
        and not report.mul_add
        and not report.flushed_denormals
        and not any(p.pruned for p in report.pruned_channels or ())
        and report.bn_before == report.bn_after
        and report.nodes_before == report.nodes_after
        and report.params_before == report.params_after
    )


@dataclass(frozen=True, slots=True)
class _Ship:
    """Where and how OUT is staged (see :func:`bnfold.files.output.staged`)."""

    dst: Path
    out_fmt: str
    external_data: bool | None
    protect: list[str]
    progress: ProgressFn

    def stage(self, model: Any) -> Any:
        return staged(
            model,
            self.dst,
            self.progress,
            onnx_file=self.out_fmt == "onnx",
            external_data=self.external_data,
            protect=self.protect,
        )


def _finish(
    st: Any,
    src: Path,
    dst: Path,
    report: FoldReport,
    s: FoldSettings,
    t0: float,
    out_fmt: str,
    src_data: tuple[str, ...],
) -> FoldReport:
    """The verification-failed policy (the one place), then commit and the output's figures."""
    from bnfold.io.datafiles import model_size, onnx_data_files
    from bnfold.verification import failure_message, runtime_notes

    v = report.verification
    if v is not None:
        report = replace(report, notes=(*report.notes, *runtime_notes(v)))
    failed = v is not None and not v.passed
    message = (
        f"{dst}: the folded model is {failure_message(v, against=str(src))}"
        if v is not None and failed
        else ""
    )
    if (
        failed
        and s.options.batch_stats
        and report.verified_on
        and any(d and d[0] != 1 for d in report.verified_on.values())
    ):
        message += " (--batch-stats instance is exact at batch 1 only: verify at batch 1 with -s NAME=1x...)"
    files = report.files
    assert files is not None
    if failed and not s.force:
        report = report.with_job(files=replace(files, total_seconds=time.perf_counter() - t0))
        raise FoldVerificationError(f"{message}; not written (--force writes it anyway)", report)
    if failed:
        report = replace(
            report, notes=(*report.notes, "verification failed; written anyway because of --force")
        )
    st.commit()
    report = replace(report, notes=(*report.notes, *st.notes))  # data files kept (the deletion rule)
    out_data = onnx_data_files(dst) if out_fmt == "onnx" else []
    report = report.with_job(
        files=replace(
            files,
            size_after=model_size(dst, out_fmt),
            written=True,
            total_seconds=time.perf_counter() - t0,
            output_data_files=tuple(str(f) for f in out_data),
        ),
    )
    if failed:
        raise FoldVerificationError(f"{message}; written anyway because of --force", report)
    return report


def _fold_onnx(
    src: Path, model: Any, prep: Prepared, s: FoldSettings, progress: ProgressFn
) -> tuple[FoldReport, Any]:
    from bnfold.onnx import fold_model

    check_onnx_shapes(model, prep.shapes, src)
    progress("fold", 0, 1)
    # The audit reads the original BN parameters: then the fold works on a copy.
    folded, report = run(
        model, "onnx", s.options, lambda: fold_model(model, options=s.options, inplace=not s.options.health)
    )
    progress("fold", 1, 1)
    return report.with_job(
        signature=io_signature(folded),
        verified_on=verified_on(folded, prep, None) if s.verify else None,
    ), folded


def _bias_rounding_tolerance(prep: Prepared, report: FoldReport, folded: Any) -> tuple[Prepared, FoldReport]:
    """Without ``--atol``: the absolute tolerance of every output a requantised int32 bias reaches
    (``--requantize-bias``) widened by the bound its site states, propagated by
    :func:`bnfold.verification.policy.bias_rounding_atol`; a note says which outputs and by how much,
    and which requantised layers reach no output that way (those outputs keep the default). The
    re-folds of a culprit search are checked with the same tolerances."""
    from bnfold.verification.policy import bias_rounding_atol

    sites = [v for v in report.verdicts if isinstance(v, Site) and v.bias_rounding is not None]
    if not sites:
        return prep, report
    notes = list(report.notes)
    atol = bias_rounding_atol(folded, [v.bias_rounding for v in sites if v.bias_rounding is not None])
    if atol:
        widths = ", ".join(f"{k!r} {v:.3g}" for k, v in atol.items())
        notes.append(
            f"verification: atol widened by the requantised int32 bias bound on output(s) {widths} "
            "(--requantize-bias rounds to nearest; give --atol to set it yourself)"
        )
        prep = replace(prep, check=replace(prep.check, atol=atol))
    unbounded = [
        v.target
        for v in sites
        if v.bias_rounding is not None and not bias_rounding_atol(folded, [v.bias_rounding])
    ]
    if unbounded:
        notes.append(
            "verification: the requantised int32 bias of "
            + ", ".join(repr(t) for t in unbounded)
            + " reaches the outputs only through operators that may amplify its rounding: compared at "
            "the default tolerance (give --atol to widen it)"
        )
    return prep, replace(report, notes=tuple(notes))


def _fold_torch(
    src: Path, loaded: Any, out_fmt: str, prep: Prepared, s: FoldSettings, prog: ProgressFn
) -> tuple[FoldReport, Any, Callable[[Any], VerifyReport]]:
    from .fold_torch import check_other_batch, eval_if, fold_torch, verify_on_examples

    if out_fmt != "onnx":
        refuse({"--affine": s.options.affine}, "applies only to ONNX outputs (Mul + Add are ONNX nodes)")
    refuse(
        {"--requantize-bias": s.requantize_bias},
        "applies only to an ONNX model (the int32 biases of its QDQ graph), not to a PyTorch model",
    )
    model = eval_if(loaded.model, s.options.eval_semantics)
    report, result, examples = fold_torch(src, model, loaded.example_inputs, out_fmt, prep, s, prog)
    names: list[str] = []
    if out_fmt == "onnx":
        report = report.with_job(signature=io_signature(result))
        assert report.signature is not None
        names = [i["name"] for i in report.signature["inputs"]]
    if s.verify:
        report = report.with_job(verified_on=verified_on(result, prep, examples, names))
    import torch

    is_module = isinstance(model, torch.nn.Module)

    def check(candidate: Any) -> VerifyReport:
        rep = verify_on_examples(model, candidate, examples, prep, prog, src)
        if out_fmt == "onnx" and s.export.dynamic_batch and is_module and examples:
            check_other_batch(model, candidate, examples, prep, prog, src)
        return rep

    return report, result, check


def _without_culprits(
    src: Path,
    loaded: Any,
    out_fmt: str,
    prep: Prepared,
    s: FoldSettings,
    report: FoldReport,
    result: Any,
    prog: ProgressFn,
) -> tuple[FoldReport, Any, bool]:
    """Bisect over the folds (:func:`bnfold.culprit.fold_without_culprits`) where the backend can exclude.

    Returns ``(report, model, resolved)``: unresolved, the model is the failed fold (an ONNX source is
    folded again for it: ``result`` was freed) and the report carries the search.
    """
    if loaded.format == "onnx":
        from bnfold import io as bio
        from bnfold.culprit import fold_without_culprits
        from bnfold.onnx import fold_model

        again = s.options.refold()  # the audit is the first fold's (a re-fold is in place)

        def fold(excluded: frozenset[str]) -> tuple[Any, FoldReport]:
            m = bio.load(src)
            return run(
                m,
                "onnx",
                again,
                lambda: fold_model(m, options=again, inplace=True, exclude=excluded),
                inplace=True,
            )

        def check(model: Any) -> VerifyReport:
            return run_verify(str(src), model, prep, example_inputs=None, progress=prog, where=str(src))

        model, new, search = fold_without_culprits(report, fold, check)
        if search.resolved:
            return new.with_job(files=report.files), model, True
        # Unresolved: the failed fold is written only with --force (otherwise nothing is staged).
        return new, fold(frozenset())[0] if s.force else None, False
    if out_fmt in ("torch", "pt2") and report.backend in ("fx", "module"):
        from bnfold.verification.inputs import torch_examples

        from .fold_torch import without_culprits

        examples = torch_examples(
            loaded.model, prep.shapes, prep.arrays, prep.seed, src, loaded.example_inputs
        )
        new, folded = without_culprits(
            src, loaded.model, out_fmt, examples, prep, report, result, options=s.options, progress=prog
        )
        return new.with_job(files=report.files), folded, folded is not result
    return report, result, False
