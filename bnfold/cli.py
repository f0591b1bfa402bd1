"""The ``bnfold`` command line: a thin typer layer over :mod:`bnfold.jobs` and :mod:`bnfold.bench`.

Rules:
    * every command runs inside :func:`_errors`, the one place where errors become exit codes:
      a :class:`~bnfold.errors.BnfoldError` prints ``bnfold: error: <message>`` (one line) on stderr and
      exits with its ``exit_code`` (2 input, 1 verification); any other exception (a decoder, zip or
      pickle error from a bad file, an OSError) prints one line too and exits 2; ``--debug`` (or
      ``BNFOLD_DEBUG=1``) shows the traceback instead; Ctrl-C exits 130 (outputs are written
      atomically, so no partial file is left);
    * human output goes to stdout; with ``--json`` stdout holds the JSON document alone; progress bars
      and warnings go to stderr;
    * this module imports neither torch nor anything that imports torch: an ONNX-only run never pays
      for it, and ``bnfold --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from . import __version__
from .errors import BnfoldError

__all__ = ["app", "main"]

app = typer.Typer(
    name="bnfold",
    help="Fold BatchNorm into the layers around it in PyTorch and ONNX models, exactly, and prove it.",
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["--help", "-h"]},
)

_STATE: dict[str, bool] = {"debug": False}


class OptLevel(str, Enum):
    """onnxruntime graph optimisation levels for the second verification run."""

    disable = "disable"
    basic = "basic"
    extended = "extended"
    all = "all"


# ------------------------------------------------------------------------------------- error handling
def _debug() -> bool:
    return _STATE["debug"] or os.environ.get("BNFOLD_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int) -> NoReturn:
    line = " ".join(str(message).split())  # one line, whatever the message holds
    sys.stderr.write(f"bnfold: error: {line}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


@contextmanager
def _json_guard(json_mode: bool) -> Iterator[None]:
    """With ``--json``, whatever a library prints on stdout during the job goes to stderr instead."""
    if not json_mode:
        yield
        return
    with redirect_stdout(sys.stderr):
        yield


def _quiet_libraries() -> None:
    """Keep library log chatter (torch's exporter warnings) off the terminal unless ``--debug``.

    torch sets its loggers' levels when it is imported, so this runs again from the progress callback
    (see :func:`_progress`) once a PyTorch file has been loaded.
    """
    if not _debug():
        for name in ("torch", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def _progress(quiet: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """The progress callback for a job: rich bars on stderr, and library logs kept quiet."""
    from ._render import progress_callback

    with progress_callback(_err_console(), enabled=not quiet) as bar:
        seen_torch = [False]

        def update(stage: str, done: int, total: int) -> None:
            if not seen_torch[0] and "torch" in sys.modules:
                seen_torch[0] = True
                _quiet_libraries()
            bar(stage, done, total)

        yield update


@contextmanager
def _errors(*paths: Path | str) -> Iterator[None]:
    """Map every exception to one stderr line and an exit code (see the module docstring)."""
    _quiet_libraries()
    try:
        with warnings.catch_warnings():
            if not _debug():
                warnings.simplefilter("ignore")
            yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        sys.stderr.write("bnfold: interrupted\n")
        raise typer.Exit(130) from None
    except BnfoldError as e:
        if _debug():
            traceback.print_exc(file=sys.stderr)
        msg = str(e)
        if paths and not any(str(p) in msg or Path(p).name in msg for p in paths):
            msg = f"{', '.join(str(p) for p in paths)}: {msg}"  # every error line names the file
        _fail(msg, e.exit_code)
    except Exception as e:  # last resort: a bad file must never show a traceback
        if _debug():
            traceback.print_exc(file=sys.stderr)
        where = ", ".join(str(p) for p in paths)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(
            f"{where}: {type(e).__name__}{': ' + msg if msg else ''} (run with --debug for the traceback)",
            2,
        )


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _show(result: Any, json_out: bool, quiet: bool, render: Callable[[Console], None]) -> None:
    """The one way a command reports: JSON alone on stdout, or the rich rendering, or nothing."""
    if json_out:
        _emit_json(result.to_dict() if hasattr(result, "to_dict") else result)
    elif not quiet:
        render(Console(highlight=False))


# ------------------------------------------------------------------------------------------ options
ModelPath = Annotated[Path, typer.Argument(help="Model file: .onnx, torch.export .pt2, or a PyTorch checkpoint.",
                                           show_default=False)]
ModelFactory = Annotated[
    str | None,
    typer.Option("--model", "-m", metavar="MODULE:FACTORY",
                 help="Builds the architecture for a state_dict checkpoint, e.g. models.lenet:lenet5."),
]
TrustPickle = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow loading a whole pickled module (unpickling runs code from the file)."),
]
InputShape = Annotated[
    list[str] | None,
    typer.Option("--input-shape", "-s", metavar="NAME=1x3x224x224",
                 help="Shape of an input (repeatable); fixes symbolic dimensions."),
]
InputsNpz = Annotated[
    Path | None,
    typer.Option("--inputs", metavar="DATA.npz", help="Real inputs: an .npz archive with one array per input name."),
]
Samples = Annotated[int, typer.Option("--samples", "-n", help="Number of random input samples to compare on.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")]
Atol = Annotated[float | None, typer.Option("--atol", help="Absolute tolerance (default: per dtype).",
                                            show_default=False)]
Rtol = Annotated[float | None, typer.Option("--rtol", help="Tolerance relative to each output's scale "
                                            "(default: per dtype).", show_default=False)]
Opt = Annotated[
    OptLevel | None,
    typer.Option("--opt-level", help="Also compare at this onnxruntime optimisation level (a second check).",
                 show_default=False),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout (nothing else).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Output = Annotated[Path, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                      help="Output file; its extension picks the format.")]
InPlace = Annotated[bool, typer.Option("--in-place", help="Allow OUT to be MODEL (overwrite the input).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit(0)


Version = Annotated[
    bool | None,
    typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
]


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback on errors (also BNFOLD_DEBUG=1).")
    ] = False,
) -> None:
    """Fold BatchNorm into the layers around it in PyTorch and ONNX models, exactly, and prove it."""
    _STATE["debug"] = debug


# ------------------------------------------------------------------------------------------ commands
@app.command()
def fold(
    model: ModelPath,
    output: Output,
    affine: Annotated[bool, typer.Option("--affine", help="Turn BNs left over into one Mul + one Add (ONNX).")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="Verify the result with onnxruntime before writing it.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Write OUT even when verification fails.")] = False,
    in_place: InPlace = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    inputs: InputsNpz = None,
    samples: Samples = 1,
    seed: Seed = 0,
    atol: Atol = None,
    rtol: Rtol = None,
    opt_level: Opt = None,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset when a PyTorch model is written "
                                              "to .onnx.", show_default=False)] = None,
    flush_denormals: Annotated[bool, typer.Option(
        "--flush-denormals/--keep-denormals",
        help="Set subnormal values of the folded weights to zero (they slow CPUs down many times).",
    )] = True,
    health: Annotated[bool, typer.Option("--health", help="Also audit the BatchNorms (see inspect --health).")] = False,
    prune_constant_channels: Annotated[bool, typer.Option(
        "--prune-constant-channels",
        help="PyTorch: drop channels that are constant after the fold (gamma = 0) where exact.",
    )] = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    version: Version = None,
) -> None:
    """Fold every exactly-foldable BatchNorm of MODEL, verify, and write OUT."""
    from . import jobs

    with _errors(model):
        try:

            with _json_guard(json_out), _progress(quiet) as progress:
                report = jobs.fold_file(
                    model, output, affine=affine, verify=verify, force=force, in_place=in_place,
                    model_factory=model_factory, trust_pickle=trust_pickle, input_shapes=input_shape or [],
                    inputs=inputs, samples=samples, seed=seed, atol=atol, rtol=rtol,
                    opt_level=opt_level.value if opt_level else None, opset=opset,
                    flush_denormals=flush_denormals, health=health,
                    prune_constant_channels=prune_constant_channels, progress=progress,
                )
        except jobs.FoldVerificationError as e:
            failed = e.fold_report
            _show(failed, json_out, quiet, lambda c: _show_fold(c, failed, title=f"{model}: verification FAILED"))
            raise
        _show(report, json_out, quiet, lambda c: _show_fold(c, report, title=f"{model}"))


def _show_fold(console: Console, report: Any, *, title: str) -> None:
    from ._render import render_fold_report, render_verify_report

    render_fold_report(console, report, title=title)
    if report.health is not None:
        from ._render import render_health

        render_health(console, report.health)
    if report.verification is not None and not report.verification.passed:
        render_verify_report(console, report.verification, title="verification")


@app.command()
def inspect(
    model: ModelPath,
    affine: Annotated[bool, typer.Option("--affine", help="Show the verdicts fold --affine would give.")] = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    health: Annotated[bool, typer.Option(
        "--health", help="Audit the BatchNorms: dead channels, var ~ 0, float16/bfloat16 range, subnormals."
    )] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="With --health: one row per BatchNorm.")] = False,
    json_out: JsonFlag = False,
    version: Version = None,
) -> None:
    """Show what fold would do to every BatchNorm of MODEL, without writing anything."""
    from . import jobs

    with _errors(model):
        from ._render import render_fold_report, render_health

        with _json_guard(json_out), _progress() as progress:
            report = jobs.inspect_file(
                model, affine=affine, model_factory=model_factory, trust_pickle=trust_pickle, health=health,
                progress=progress,
            )

        def render(c: Console) -> None:
            render_fold_report(c, report, title=f"{model}")
            if report.health is not None:
                render_health(c, report.health, verbose=verbose)

        _show(report, json_out, False, render)


@app.command()
def verify(
    reference: Annotated[Path, typer.Argument(help="The reference model file.", show_default=False)],
    candidate: Annotated[Path, typer.Argument(help="The model file to check against it.", show_default=False)],
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    inputs: InputsNpz = None,
    samples: Samples = 1,
    seed: Seed = 0,
    atol: Atol = None,
    rtol: Rtol = None,
    opt_level: Opt = None,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    version: Version = None,
) -> None:
    """Check that CANDIDATE computes the same as REFERENCE (exit 0 equivalent, 1 not, 2 cannot compare)."""
    from . import jobs

    with _errors(reference, candidate):
        from ._render import render_verify_report

        with _json_guard(json_out), _progress(quiet) as progress:
            report = jobs.verify_files(
                reference, candidate, model_factory=model_factory, trust_pickle=trust_pickle,
                input_shapes=input_shape or [], inputs=inputs, samples=samples, seed=seed, atol=atol,
                rtol=rtol, opt_level=opt_level.value if opt_level else None, progress=progress,
            )
        _show(report, json_out, quiet, lambda c: render_verify_report(c, report, title=f"{candidate} vs {reference}"))
        if not report.passed:
            worst = report.worst()
            where = f" (output {worst.name}: max abs error {worst.max_abs_error:.3g})" if worst else ""
            _fail(f"{candidate}: not equivalent to {reference}{where}", 1)


@app.command()
def freeze(
    model: ModelPath,
    output: Output,
    learnable: Annotated[bool, typer.Option("--learnable", help="Make scale and shift trainable parameters.")] = False,
    in_place: InPlace = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    version: Version = None,
) -> None:
    """Turn every BatchNorm of a PyTorch MODEL into a frozen affine layer; save in the same format."""
    from . import jobs

    with _errors(model):
        from ._render import render_freeze_report

        with _json_guard(json_out), _progress(quiet) as progress:
            result = jobs.freeze_file(
                model, output, learnable=learnable, in_place=in_place, model_factory=model_factory,
                trust_pickle=trust_pickle, progress=progress,
            )
        _show(result, json_out, quiet, lambda c: render_freeze_report(c, result))


@app.command()
def bench(
    model: ModelPath,
    runs: Annotated[int, typer.Option("--runs", "-r", help="Timed runs per measurement (the median is shown).")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", "-w", help="Untimed runs before timing.")] = 3,
    threads: Annotated[int, typer.Option("--threads", "-t", help="Intra-op threads (0: the runtime's default).")] = 0,
    affine: Annotated[bool, typer.Option("--affine", help="Fold with --affine (ONNX).")] = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    seed: Seed = 0,
    json_out: JsonFlag = False,
    version: Version = None,
) -> None:
    """Latency of the original and the folded MODEL (onnxruntime, and PyTorch eager for PyTorch files)."""
    from . import bench as bench_mod

    with _errors(model):
        from ._render import render_bench_report

        with _json_guard(json_out), _progress() as progress:
            report = bench_mod.bench_file(
                model, runs=runs, warmup=warmup, threads=threads, affine=affine, model_factory=model_factory,
                trust_pickle=trust_pickle, input_shapes=input_shape or [], seed=seed, progress=progress,
            )
        _show(report, json_out, False, lambda c: render_bench_report(c, report))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``bnfold``)."""
    try:
        app(args=argv, prog_name="bnfold")
    except KeyboardInterrupt:  # pragma: no cover - raised outside a command
        sys.stderr.write("bnfold: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
