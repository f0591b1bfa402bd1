"""The ``bnfold`` command line: a thin typer layer over :mod:`bnfold.files` and :mod:`bnfold.bench`.

Rules:
    * every command runs inside :func:`guarded`, the one place where errors become exit codes:
      a :class:`~bnfold.errors.BnfoldError` prints ``bnfold: error: <message>`` (one line) on stderr and
      exits with its ``exit_code`` (2 input, 1 verification); any other exception (a decoder, zip or
      pickle error from a bad file, an OSError) prints one line too and exits 2; ``--debug`` (or
      ``BNFOLD_DEBUG=1``) shows the traceback instead; Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129
      (outputs are written atomically, so no partial or temporary file is left); a closed stdout pipe
      (``bnfold inspect m.onnx -v | head -1``) ends quietly with 141;
    * usage errors (an unknown option, a missing argument) are one line too, exit 2 (see :class:`Group`);
    * human output goes to stdout; with ``--json`` stdout holds one JSON document (schema
      ``bnfold/schemas/report-v1.json``, strict JSON: inf/nan as strings), also on failure (an ``error``
      object); progress and warnings go
      to stderr; ``-q`` prints nothing but errors; ``-q`` with ``--json`` is refused;
    * every string from a model is shown escaped, never as terminal control or rich markup (see
      :mod:`bnfold.cli.render`), so rendering cannot fail on a model's strings after OUT was written;
    * library log records and warnings are off while a command runs (``--debug`` shows them), and
      onnxruntime's logger is set to FATAL: a failure is bnfold's one line;
    * the same flag means the same on every command (``-q``, ``--json``, ``--debug``, ``-V``, ``-v``);
      options are declared once (:mod:`bnfold.cli.options`), and each command is one function;
    * this module imports neither torch nor anything that imports torch: an ONNX-only run never pays
      for it, and ``bnfold --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bnfold.errors import FoldVerificationError, OptionError

from .options import (
    Affine,
    AffineBench,
    AffinePreview,
    AllOrNothing,
    Atol,
    BatchStats,
    CheckpointPath,
    Debug,
    EvalSemantics,
    ExternalData,
    FailIfLeft,
    FlushDenormals,
    Health,
    HealthAudit,
    InPlace,
    InputNames,
    InputShape,
    InputsNpz,
    JsonFlag,
    MergeBranches,
    MergeBranchesPreview,
    ModelFactory,
    ModelPath,
    Opset,
    Opt,
    OptLevel,
    OutArg,
    Output,
    OutputNames,
    Propagate,
    PropagatePreview,
    Quiet,
    RequantizeBias,
    Rtol,
    Samples,
    Seed,
    StaticBatch,
    TrustPickle,
    Verbose,
    VerboseFrozen,
    Version,
)
from .run import (
    STATE,
    Group,
    fail,
    guarded,
    json_guard,
    one_output,
    progress_bar,
    show,
    split_names,
    tolerances,
)
from .text import clean

__all__ = ["app", "main"]

_HELP = "Fold BatchNorm into the layers around it in PyTorch and ONNX models, exactly, and prove it."


app = typer.Typer(
    name="bnfold",
    cls=Group,
    help=_HELP,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["--help", "-h"], "max_content_width": 80},
)


@app.callback()
def _root(version: Version = None, debug: Debug = False) -> None:
    """Fold BatchNorm into the layers around it in PyTorch and ONNX models, exactly, and prove it."""
    STATE["debug"] = debug


# ------------------------------------------------------------------------------------------ commands
@app.command(short_help="Fold every exactly-foldable BatchNorm, verify, write OUT.")
def fold(
    model: ModelPath,
    out: OutArg = None,
    output: Output = None,
    affine: Affine = False,
    merge_branches: MergeBranches = True,
    batch_stats: BatchStats = None,
    propagate: Propagate = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify before writing OUT.")] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Write OUT even when verification fails (exit 1).")
    ] = False,
    in_place: InPlace = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    eval_semantics: EvalSemantics = False,
    input_shape: InputShape = None,
    inputs: InputsNpz = None,
    samples: Samples = 1,
    seed: Seed = 0,
    atol: Atol = None,
    rtol: Rtol = None,
    opt_level: Opt = None,
    opset: Opset = None,
    static_batch: StaticBatch = False,
    input_names: InputNames = None,
    output_names: OutputNames = None,
    external_data: ExternalData = None,
    all_or_nothing: AllOrNothing = False,
    requantize_bias: RequantizeBias = False,
    flush_denormals: FlushDenormals = True,
    health: Health = False,
    prune_constant_channels: Annotated[
        bool,
        typer.Option(
            "--prune-constant-channels",
            help="PyTorch: drop channels that are constant after the fold (gamma = 0) where exact.",
        ),
    ] = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Fold every exactly-foldable BatchNorm of MODEL, verify, and write OUT.

    Example: bnfold fold model.onnx model.folded.onnx
    """
    with guarded("fold", model, json_out=json_out, quiet=quiet, debug=debug):
        dst = one_output(out, output)
        from bnfold import files

        stages = ("load", "fold", *(("verify",) if verify else ()), "save")
        settings = files.FoldSettings(
            options=files.FoldOptions.from_args(locals()),
            verify=verify,
            force=force,
            in_place=in_place,
            external_data=external_data,
            all_or_nothing=all_or_nothing,
            requantize_bias=requantize_bias,
            **_sources(model_factory, trust_pickle, input_shape, inputs, seed),
            verification=_verify_settings(samples, atol, rtol, opt_level),
            export=files.ExportSettings(
                opset=opset,
                dynamic_batch=not static_batch,
                input_names=split_names(input_names),
                output_names=split_names(output_names),
            ),
        )
        try:
            with json_guard(json_out), progress_bar(quiet, stages) as progress:
                report = files.fold_file(model, dst, settings, progress)
        except FoldVerificationError as e:
            failed = e.fold_report
            show(
                "fold",
                failed,
                json_out,
                quiet,
                lambda c: _show_fold(c, failed, f"{model}: verification FAILED", verbose),
                exit_code=1,
            )
            raise
        show("fold", report, json_out, quiet, lambda c: _show_fold(c, report, str(model), verbose))


def _sources(
    model_factory: str | None,
    trust_pickle: bool,
    input_shape: list[str] | None,
    inputs: Path | None,
    seed: int,
) -> dict[str, Any]:
    """The ``load`` and ``inputs`` settings of a command (how MODEL is loaded, what it is run on)."""
    from bnfold import files

    return {
        "load": files.LoadSettings(model_factory, trust_pickle),
        "inputs": files.InputSettings(tuple(input_shape or ()), inputs, seed),
    }


def _verify_settings(
    samples: int, atol: list[str] | None, rtol: list[str] | None, opt_level: OptLevel | None, **more: Any
) -> Any:
    """``--samples --atol --rtol --opt-level`` (and ``more`` VerifySettings fields) as the VerifySettings."""
    from bnfold import files

    atol_v, rtol_v = tolerances(atol, rtol)
    return files.VerifySettings(samples, atol_v, rtol_v, opt_level.value if opt_level else None, **more)


def _show_fold(console: Any, report: Any, title: str, verbose: bool) -> None:
    from .render import render_fold_report, render_verify_report

    render_fold_report(console, report, title=title, verbose=verbose)
    if report.health is not None:
        from .render import render_health

        render_health(console, report.health, verbose=verbose)
    else:  # the cheap part of the audit: layers flagged for per-tensor int8
        from .render import render_fold_quant

        render_fold_quant(console, report.quant, verbose=verbose)
    if report.verification is not None and not report.verification.passed:
        render_verify_report(console, report.verification, title="verification")


@app.command(short_help="What fold would do to every BatchNorm; writes nothing.")
def inspect(
    model: ModelPath,
    affine: AffinePreview = False,
    merge_branches: MergeBranchesPreview = True,
    batch_stats: BatchStats = None,
    propagate: PropagatePreview = True,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    eval_semantics: EvalSemantics = False,
    input_shape: InputShape = None,
    inputs: InputsNpz = None,
    seed: Seed = 0,
    fail_if_left: FailIfLeft = False,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="onnx",
            show_default=False,
            help="The verdicts of fold with an OUT of this format: onnx (a PyTorch MODEL folded, exported and "
            "folded again in memory) [default: MODEL's own format].",
        ),
    ] = None,
    health: HealthAudit = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Show what fold would do to every BatchNorm of MODEL, without writing anything.

    Example: bnfold inspect model.onnx --fail-if-left
    """
    with guarded("inspect", model, json_out=json_out, quiet=quiet, debug=debug):
        from bnfold import files

        from .render import render_fold_report, render_health

        settings = files.InspectSettings(
            options=files.FoldOptions.from_args(locals()),
            **_sources(model_factory, trust_pickle, input_shape, inputs, seed),
        )
        if to is not None and to.lower().lstrip(".") not in ("onnx", "pt", "pth", "pt2"):
            raise OptionError(f"--to {to}: expected onnx (or pt, pt2: MODEL's own format, the default)")
        with json_guard(json_out), progress_bar(quiet, ("load", "fold")) as progress:
            report = files.inspect_file(
                model,
                settings,
                progress,
                output_format="onnx" if to and to.lower().lstrip(".") == "onnx" else None,
            )
        code = 1 if fail_if_left and report.bn_after else 0

        def render(c: Any) -> None:
            render_fold_report(c, report, title=str(model), verbose=verbose)
            if report.health is not None:
                render_health(c, report.health, verbose=verbose)

        show("inspect", report, json_out, quiet, render, exit_code=code)
        if code:
            fail(f"{model}: {report.bn_after} BatchNorm would be left (--fail-if-left)", 1, "BatchNormLeft")


@app.command(short_help="Does CANDIDATE compute what REFERENCE does? (exit 0/1/2)")
def verify(
    reference: Annotated[
        Path | None,
        typer.Argument(
            metavar="REFERENCE",
            show_default=False,
            help="The reference model file (omitted with --load-outputs).",
        ),
    ] = None,
    candidate: Annotated[
        Path | None,
        typer.Argument(metavar="CANDIDATE", show_default=False, help="The model file to check against it."),
    ] = None,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    inputs: InputsNpz = None,
    samples: Samples = 1,
    seed: Seed = 0,
    atol: Atol = None,
    rtol: Rtol = None,
    opt_level: Opt = None,
    error_stat: Annotated[
        str,
        typer.Option(
            "--error-stat",
            metavar="max|mean|median|qQ",
            help="Error statistic judged against the tolerance: max (every "
            "element), mean, median or a quantile (q0.99, p99).",
        ),
    ] = "max",
    min_cosine: Annotated[
        float | None,
        typer.Option(
            "--min-cosine",
            show_default=False,
            help="Also fail an output whose cosine similarity is below this.",
        ),
    ] = None,
    min_snr: Annotated[
        float | None,
        typer.Option(
            "--min-snr",
            metavar="DB",
            show_default=False,
            help="Also fail an output whose signal-to-noise ratio is below this many dB.",
        ),
    ] = None,
    save_outputs: Annotated[
        Path | None,
        typer.Option(
            "--save-outputs",
            metavar="GOLDEN.npz",
            show_default=False,
            help="Write the inputs and both models' outputs to this file.",
        ),
    ] = None,
    load_outputs: Annotated[
        Path | None,
        typer.Option(
            "--load-outputs",
            metavar="GOLDEN.npz",
            show_default=False,
            help="Check CANDIDATE against outputs saved earlier (no model: re-check the saved comparison).",
        ),
    ] = None,
    locate: Annotated[
        bool,
        typer.Option(
            "--locate",
            help="ONNX: compare the intermediate tensors both models have and name the first that diverges.",
        ),
    ] = False,
    name_map: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            metavar="REF=CAND",
            show_default=False,
            help="CANDIDATE's input or output CAND is REFERENCE's REF (names that differ; repeatable).",
        ),
    ] = None,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Check that CANDIDATE computes what REFERENCE does (exit 0 yes, 1 no, 2 cannot compare).

    Example: bnfold verify model.onnx model.folded.onnx --samples 4
    """
    paths = [p for p in (reference, candidate, load_outputs) if p is not None]
    with guarded("verify", *paths, json_out=json_out, quiet=quiet, debug=debug):
        from bnfold import files

        from .render import render_verify_report

        if load_outputs is not None:
            if candidate is not None:
                raise OptionError(
                    "--load-outputs stands for the reference: give at most one model (the candidate)"
                )
            reference, candidate = None, reference
        elif reference is None or candidate is None:
            raise OptionError(
                "verify needs REFERENCE and CANDIDATE (or --load-outputs GOLDEN.npz [CANDIDATE])"
            )
        settings = files.CompareSettings(
            **_sources(model_factory, trust_pickle, input_shape, inputs, seed),
            verification=_verify_settings(
                samples,
                atol,
                rtol,
                opt_level,
                error_stat=error_stat,
                min_cosine=min_cosine,
                min_snr_db=min_snr,
                save_outputs=save_outputs,
                load_outputs=load_outputs,
                locate=locate,
            ),
        )
        with json_guard(json_out), progress_bar(quiet, ("load", "verify")) as progress:
            report = files.verify_files(reference, candidate, settings, progress, rename=_name_map(name_map))
        against = reference if reference is not None else load_outputs
        shown = candidate if candidate is not None else "saved outputs"

        def render(c: Any) -> None:
            render_verify_report(c, report, title=f"{shown} vs {against}")
            _show_verify_details(c, report)

        show(
            "verify",
            report,
            json_out,
            quiet,
            render,
            exit_code=0 if report.passed else 1,
            reference=reference,
            candidate=candidate,
        )
        if not report.passed:
            from bnfold.verification import failure_message

            fail(f"{shown}: {failure_message(report, against=str(against))}", 1, "VerificationError")


def _name_map(values: list[str] | None) -> dict[str, str]:
    """``--map REF=CAND`` (repeatable, or comma-separated) -> ``{REF: CAND}``."""
    out: dict[str, str] = {}
    for item in (p.strip() for v in values or () for p in v.split(",")):
        if not item:
            continue
        ref, sep, cand = item.partition("=")
        if not sep or not ref.strip() or not cand.strip():
            raise OptionError(f"--map {item}: expected REF=CAND (a reference name = the candidate's name)")
        if ref.strip() in out or cand.strip() in out.values():
            raise OptionError(f"--map {item}: a name mapped twice")
        out[ref.strip()] = cand.strip()
    return out


def _show_verify_details(console: Any, report: Any) -> None:
    """Which runtime ran what (when not onnxruntime), where the errors are, and the first divergence.

    Model-provided names go out as plain ``Text`` (never as markup).
    """
    from rich.text import Text

    for r in report.runtimes:  # from a golden file too: every string is escaped
        if r.runtime != "onnxruntime":
            console.print(
                Text(
                    f"{clean(r.role)}: ran with {clean(r.runtime)}"
                    + (f" ({clean(r.reason)})" if r.reason else "")
                )
            )
    for c in report.checks:
        if not c.passed:
            chans = ", ".join(f"{clean(ch)} ({e:.2e})" for ch, e in c.worst_channels)
            console.print(
                Text(
                    f"{clean(c.name)} (sample {c.sample}): failed on {clean(c.failure)}; largest error at "
                    f"{list(c.worst_index)}"
                    + (f"; worst channels: {chans}" if chans else "")
                    + f"; cosine {c.cosine:.6f}"
                    + (f", SNR {c.snr_db:.1f} dB" if c.snr_db is not None else "")
                )
            )
    loc = report.locate
    if loc is not None:
        if loc.first_divergence is None:
            console.print(Text(f"locate: {loc.compared} intermediate tensor(s) compared, none diverges"))
        else:
            t = next(t for t in loc.tensors if t.name == loc.first_divergence)
            console.print(
                Text(
                    f"locate: first divergence at {clean(t.name)} (computed by {clean(t.producer)}; matched by "
                    f"{clean(t.matched_as)}): max abs error {t.max_abs_error:.3g}, {t.max_rel_error:.3g} of its scale "
                    f"({loc.compared} tensor(s) compared)"
                )
            )


@app.command(short_help="Turn BatchNorm into frozen affine layers (PyTorch files).")
def freeze(
    model: CheckpointPath,
    out: OutArg = None,
    output: Output = None,
    learnable: Annotated[bool, typer.Option("--learnable", help="Make scale and shift trainable.")] = False,
    in_place: InPlace = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    verbose: VerboseFrozen = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Turn every BatchNorm of a PyTorch MODEL into a frozen affine layer; save in the same format.

    Example: bnfold freeze ckpt.pt ckpt.frozen.pt --model models.resnet:resnet18
    """
    with guarded("freeze", model, json_out=json_out, quiet=quiet, debug=debug):
        dst = one_output(out, output)
        from bnfold import files

        from .render import render_freeze_report

        settings = files.FreezeSettings(learnable, in_place, files.LoadSettings(model_factory, trust_pickle))
        with json_guard(json_out), progress_bar(quiet, ("load", "freeze", "save")) as progress:
            result = files.freeze_file(model, dst, settings, progress)
        show("freeze", result, json_out, quiet, lambda c: render_freeze_report(c, result, verbose=verbose))


@app.command(short_help="Latency of the original and the folded model.")
def bench(
    model: ModelPath,
    runs: Annotated[
        int, typer.Option("--runs", "-r", help="Timed runs per measurement (median shown).")
    ] = 20,
    warmup: Annotated[int, typer.Option("--warmup", "-w", help="Untimed runs before timing.")] = 3,
    threads: Annotated[int, typer.Option("--threads", "-t", help="Intra-op threads (0: the default).")] = 0,
    affine: AffineBench = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    seed: Seed = 0,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Latency of the original and the folded MODEL (onnxruntime; PyTorch eager for PyTorch files).

    Example: bnfold bench model.onnx --runs 50 --threads 1
    """
    with guarded("bench", model, json_out=json_out, quiet=quiet, debug=debug):
        from bnfold import bench as bench_mod

        from .render import render_bench_report

        def notice(text: str) -> None:
            if not quiet and not json_out:
                sys.stderr.write(f"bnfold: note: {clean(text)}\n")
                sys.stderr.flush()

        with json_guard(json_out), progress_bar(quiet, ("load", "bench")) as progress:
            report = bench_mod.bench_file(
                model,
                runs=runs,
                warmup=warmup,
                threads=threads,
                affine=affine,
                model_factory=model_factory,
                trust_pickle=trust_pickle,
                input_shapes=input_shape or [],
                seed=seed,
                progress=progress,
                notice=notice,
            )
        show("bench", report, json_out, quiet, lambda c: render_bench_report(c, report))


@app.command(short_help="New BatchNorm statistics from data (ONNX files, PyTorch checkpoints).")
def recalibrate(
    model: ModelPath,
    out: OutArg = None,
    output: Output = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            metavar="FILE.npz",
            show_default=False,
            help="The data, arrays named after the inputs (see cli.md).",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            show_default=False,
            help="Samples per batch [default: the model's fixed batch size, else 32].",
        ),
    ] = None,
    pooled: Annotated[
        bool,
        typer.Option(
            "--pooled", help="Statistics of all values together, not the average of per-batch statistics."
        ),
    ] = False,
    prior: Annotated[
        float | None,
        typer.Option(
            "--prior", metavar="N", show_default=False, help="Keep the file's statistics as N samples."
        ),
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            "--upstream",
            metavar="new|batch",
            show_default=False,
            help="While a BN's input is recorded, the BNs before it use their "
            "new statistics (new, ONNX default) or each batch's own (batch: "
            "PyTorch's train-mode pass, one pass).",
        ),
    ] = None,
    fold_after: Annotated[
        bool, typer.Option("--fold", help="ONNX: fold the recalibrated model (verified) into OUT.")
    ] = False,
    in_place: InPlace = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    external_data: ExternalData = None,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Re-estimate the BatchNorm statistics of MODEL on the data in FILE.npz; write OUT.

    Example: bnfold recalibrate model.onnx model.recal.onnx --data camera.npz --batch-size 64
    """
    with guarded("recalibrate", model, json_out=json_out, quiet=quiet, debug=debug):
        dst = one_output(out, output)
        if data is None:
            raise OptionError("missing --data FILE.npz (the data to estimate the statistics on)")
        from bnfold import files
        from bnfold.files.recalibrate import RecalibrateSettings, recalibrate_file

        settings = RecalibrateSettings(
            data=data,
            batch_size=batch_size,
            pooled=pooled,
            prior=prior,
            fold=fold_after,
            upstream=upstream,
            in_place=in_place,
            external_data=external_data,
            load=files.LoadSettings(model_factory, trust_pickle),
        )
        stages = ("load", "recalibrate", *(("fold", "verify") if fold_after else ()), "save")
        with json_guard(json_out), progress_bar(quiet, stages) as progress:
            report = recalibrate_file(model, dst, settings, progress)
        show("recalibrate", report, json_out, quiet, lambda c: _show_recalibrate(c, report, verbose))


def _show_recalibrate(console: Any, report: Any, verbose: bool) -> None:
    from rich.text import Text

    how = "pooled" if report.pooled else "average of per-batch statistics"
    prior = f", prior {report.prior:g} samples" if report.prior else ""
    console.print(
        Text(
            f"{report.files.source} -> {report.files.output}: {len(report.changes)} BatchNorm recalibrated on "
            f"{report.samples} samples in {report.batches} batches ({how}{prior}; {report.passes} pass(es))"
        )
    )
    shown = report.changes if verbose else sorted(report.changes, key=lambda c: -c.mean_shift)[:5]
    for c in shown:
        console.print(
            Text(
                f"  {c.bn}: mean moved up to {c.mean_shift:.3g} old std, var x{c.var_ratio_min:.3g}..{c.var_ratio_max:.3g}"
                + (" (was training-mode)" if c.training_mode_cleared else "")
            )
        )
    if report.fold is not None:
        console.print(
            Text(
                f"folded: {report.fold.bn_before - report.fold.bn_after} of {report.fold.bn_before} BatchNorm"
            )
        )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``bnfold``)."""
    app(args=argv, prog_name="bnfold")


if __name__ == "__main__":  # pragma: no cover
    main()
