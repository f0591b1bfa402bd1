"""The ``bnfold`` command line: a thin typer layer over :mod:`bnfold.files` and :mod:`bnfold.bench`.

Rules:
    * every command runs inside :func:`_errors`, the one place where errors become exit codes:
      a :class:`~bnfold.errors.BnfoldError` prints ``bnfold: error: <message>`` (one line) on stderr and
      exits with its ``exit_code`` (2 input, 1 verification); any other exception (a decoder, zip or
      pickle error from a bad file, an OSError) prints one line too and exits 2; ``--debug`` (or
      ``BNFOLD_DEBUG=1``) shows the traceback instead; Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129
      (outputs are written atomically, so no partial or temporary file is left);
    * usage errors (an unknown option, a missing argument) are one line too, exit 2 (see :class:`_Group`);
    * human output goes to stdout; with ``--json`` stdout holds one JSON document (schema
      ``bnfold/schemas/report-v1.json``), also on failure (an ``error`` object); progress and warnings go
      to stderr; ``-q`` prints nothing but errors; ``-q`` with ``--json`` is refused;
    * every string from a model is shown escaped, never as terminal control or rich markup (see
      :mod:`bnfold._render`), so rendering cannot fail on a model's strings after OUT was written;
    * library log records and warnings are off while a command runs (``--debug`` shows them), and
      onnxruntime's logger is set to FATAL: a failure is bnfold's one line;
    * the same flag means the same on every command (``-q``, ``--json``, ``--debug``, ``-V``, ``-v``);
      options are declared once, below, and each command is one function;
    * this module imports neither torch nor anything that imports torch: an ONNX-only run never pays
      for it, and ``bnfold --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer import core as _typer_core
from typer.core import TyperGroup

from . import __version__
from ._render import clean, error_document, json_document, make_console
from .errors import BnfoldError, FoldVerificationError, OptionError, with_context

__all__ = ["app", "main"]

# typer vendors its own copy of click: its exceptions are the ones raised (not the `click` package's).
click: Any = getattr(_typer_core, "_click")  # noqa: B009

_HELP = "Fold BatchNorm into the layers around it in PyTorch and ONNX models, exactly, and prove it."


class _Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP: unwinds like Ctrl-C (temporary files are removed on the way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame: object) -> None:
    raise _Terminated(signum)


@contextmanager
def _signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`_Terminated` while a command runs (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.signal(s, _on_signal) for s in wanted}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Group(TyperGroup):
    """typer's group with one-line usage errors (and a JSON error document under ``--json``)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            with _signals():
                rv = super().main(args=argv, prog_name=prog_name or "bnfold", complete_var=complete_var,
                                  standalone_mode=False, windows_expand_args=windows_expand_args, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(2)
        except click.ClickException as e:
            command = next((a for a in argv if a in _COMMANDS), "bnfold")
            hint = f" (see bnfold {command if command != 'bnfold' else ''} --help)".replace("  ", " ")
            _usage_fail(command, clean(e.format_message()) + hint, e.exit_code, json_mode="--json" in argv)
        except click.exceptions.Abort:
            sys.stderr.write("bnfold: interrupted\n")
            sys.exit(130)
        except KeyboardInterrupt as e:  # raised outside a command (while parsing)
            code = 128 + e.signum if isinstance(e, _Terminated) else 130
            sys.stderr.write("bnfold: interrupted\n")
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


_COMMANDS = ("fold", "inspect", "verify", "freeze", "bench")

app = typer.Typer(
    name="bnfold",
    cls=_Group,
    help=_HELP,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["--help", "-h"], "max_content_width": 80},
)

_STATE: dict[str, Any] = {"debug": False, "json": False, "command": "bnfold"}


class OptLevel(str, Enum):
    """onnxruntime graph optimisation levels for the second verification run."""

    disable = "disable"
    basic = "basic"
    extended = "extended"
    all = "all"


# ------------------------------------------------------------------------------------- error handling
def _debug() -> bool:
    return bool(_STATE["debug"]) or os.environ.get("BNFOLD_DEBUG", "") not in ("", "0")


def _usage_fail(command: str, message: str, code: int, *, json_mode: bool) -> NoReturn:
    line = clean(" ".join(str(message).split()))
    if json_mode:
        _emit_json(error_document(command, "UsageError", line, code))
    sys.stderr.write(f"bnfold: error: {line}\n")
    sys.stderr.flush()
    sys.exit(code)


def _fail(message: str, code: int, error_type: str = "Error") -> NoReturn:
    line = clean(" ".join(str(message).split()))  # one line; what is left of control characters escaped
    if _STATE["json"] and not _STATE.get("emitted"):
        _emit_json(error_document(_STATE["command"], error_type, line, code))
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
    """Keep library log chatter off the terminal unless ``--debug``: bnfold's one line comes alone.

    torch sets its loggers' levels when it is imported, so this runs again from the progress callback
    once torch is loaded; onnxruntime's logger is set to FATAL once onnxruntime is imported (its
    coloured error lines would otherwise print before bnfold's own line).
    """
    if _debug():
        return
    for name in ("torch", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "set_default_logger_severity"):
        ort.set_default_logger_severity(4)


@contextmanager
def _progress(quiet: bool, stages: tuple[str, ...]) -> Iterator[Callable[[str, int, int], None]]:
    """The progress callback for a job: a stage line on stderr (terminals only), library logs quiet."""
    from ._render import progress_callback

    with progress_callback(make_console(stderr=True), enabled=not quiet, stages=stages) as bar:
        seen: set[str] = set()

        def update(stage: str, done: int, total: int) -> None:
            for mod in ("torch", "onnxruntime"):
                if mod not in seen and mod in sys.modules:
                    seen.add(mod)
                    _quiet_libraries()
            if stage in ("verify", "bench"):
                _ort_quiet()
            bar(stage, done, total)

        yield update


def _ort_quiet() -> None:
    if not _debug():
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)


@contextmanager
def _errors(command: str, *paths: Path | str, json_out: bool = False, debug: bool = False) -> Iterator[None]:
    """Map every exception to one stderr line and an exit code (see the module docstring)."""
    _STATE.update(command=command, json=json_out, emitted=False, debug=_STATE["debug"] or debug)
    _quiet_libraries()
    # Libraries log through `logging` (torch.export prints a whole traceback as warnings when an archive
    # does not load): bnfold's own line says what failed, so their records are off unless --debug.
    # Off for the command only: logging.disable is process-wide and CliRunner runs in-process.
    previous = logging.root.manager.disable
    if not _debug():
        logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            if not _debug():
                warnings.simplefilter("ignore")
            yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt as e:
        code = 128 + e.signum if isinstance(e, _Terminated) else 130
        what = signal.Signals(e.signum).name if isinstance(e, _Terminated) else "Ctrl-C"
        sys.stderr.write(f"bnfold: interrupted ({what}); no partial or temporary file is left\n")
        raise typer.Exit(code) from None
    except BnfoldError as e:
        if _debug():
            traceback.print_exc(file=sys.stderr)
        # Every error line names the file (errors.with_context: the one way context is added).
        _fail(str(with_context(e, *(str(p) for p in paths))), e.exit_code, type(e).__name__)
    except Exception as e:  # last resort: a bad file must never show a traceback
        if _debug():
            traceback.print_exc(file=sys.stderr)
        where = ", ".join(str(p) for p in paths)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(
            f"{where}: {type(e).__name__}{': ' + msg if msg else ''} (run with --debug for the traceback)",
            2, type(e).__name__,
        )
    finally:
        logging.disable(previous)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _show(command: str, result: Any, json_out: bool, quiet: bool, render: Callable[[Any], None],
          *, exit_code: int = 0, **files: Any) -> None:
    """The one way a command reports: one JSON document on stdout, or the rendering, or nothing."""
    if json_out:
        _emit_json(json_document(command, result, exit_code=exit_code, **files))
        _STATE["emitted"] = True
    elif not quiet:
        render(make_console())


def _check_common(quiet: bool, json_out: bool) -> None:
    if quiet and json_out:
        raise OptionError("-q/--quiet and --json: choose one (--json already prints the JSON document alone)")


def _tolerances(atol: list[str] | None, rtol: list[str] | None) -> tuple[Any, Any]:
    """``--atol 1e-4 --atol out=1e-3`` -> the comparator's tolerance mappings (checked once, by flag)."""
    from .compare import parse_tolerances

    return parse_tolerances("--atol", atol), parse_tolerances("--rtol", rtol)


def _names(values: list[str] | None) -> tuple[str, ...]:
    """``--input-names a,b --input-names c`` -> ``("a", "b", "c")``."""
    return tuple(n.strip() for v in values or () for n in v.split(",") if n.strip())


def _one_output(positional: Path | None, option: Path | None) -> Path:
    if positional is not None and option is not None and positional != option:
        raise OptionError(f"OUT given twice ({positional} and -o {option}): give one")
    out = positional or option
    if out is None:
        raise OptionError("missing OUT: give it as the second argument or with -o/--output")
    return out


# ------------------------------------------------------------------------------------------ options
# Declared once; each command lists the ones it takes. Another engineer's option is one more alias.
def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit(0)


ModelPath = Annotated[Path, typer.Argument(metavar="MODEL", help="Model file: .onnx, .pt2, or a PyTorch checkpoint.",
                                           show_default=False)]
OutArg = Annotated[Path | None, typer.Argument(metavar="OUT", help="Output file (or -o OUT).",
                                               show_default=False)]
ModelFactory = Annotated[
    str | None,
    typer.Option("--model", "-m", metavar="MODULE:FACTORY",
                 help="Builds the architecture of a state_dict checkpoint, e.g. models.lenet:lenet5."),
]
TrustPickle = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow loading a pickled module (runs code from the file).")
]
EvalSemantics = Annotated[
    bool, typer.Option("--eval-semantics",
                       help="Fold a module saved in train() mode with its inference (running-stats) semantics."),
]
InputShape = Annotated[
    list[str] | None,
    typer.Option("--input-shape", "-s", metavar="NAME=1x3x224x224",
                 help="Shape of an input to verify on (repeatable); fixes symbolic dimensions."),
]
InputsNpz = Annotated[
    Path | None, typer.Option("--inputs", metavar="DATA.npz", help="Real inputs: one array per input name.")
]
Samples = Annotated[int, typer.Option("--samples", "-n", help="Random input samples to compare on.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the random inputs (>= 0).")]
Atol = Annotated[list[str] | None, typer.Option("--atol", metavar="[OUTPUT=]VALUE", show_default=False,
                                                help="Absolute tolerance [default: per dtype]; OUTPUT=VALUE for "
                                                "one output (repeatable).")]
Rtol = Annotated[list[str] | None, typer.Option("--rtol", metavar="[OUTPUT=]VALUE", show_default=False,
                                                help="Tolerance relative to each output's scale [default: per "
                                                "dtype]; OUTPUT=VALUE for one output (repeatable).")]
Opt = Annotated[
    OptLevel | None,
    typer.Option("--opt-level", help="Also compare at this onnxruntime optimisation level.", show_default=False),
]
Affine = Annotated[bool, typer.Option("--affine", help="Turn BNs left over into one Mul + one Add (ONNX).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (nothing else).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="List every BatchNorm, not only those left.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback on errors (also BNFOLD_DEBUG=1).")]
Output = Annotated[Path | None, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                             help="Output file; its extension picks the format.")]
InPlace = Annotated[bool, typer.Option("--in-place", help="Allow OUT to be MODEL (overwrite the input).")]
Version = Annotated[
    bool | None,
    typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
]
Opset = Annotated[int | None, typer.Option("--opset", help="ONNX opset of a PyTorch model exported to .onnx.",
                                           show_default=False)]
StaticBatch = Annotated[bool, typer.Option("--static-batch",
                                           help="Export with the verification batch size fixed, not dynamic.")]
InputNames = Annotated[list[str] | None, typer.Option("--input-names", metavar="A,B",
                                                      help="ONNX input names of an export [default: forward's].")]
OutputNames = Annotated[list[str] | None, typer.Option("--output-names", metavar="A,B",
                                                       help="ONNX output names of an export [default: output].")]
ExternalData = Annotated[
    bool | None,
    typer.Option("--external-data/--no-external-data", show_default=False,
                 help="Write ONNX weights to OUT.data / inline [default: as the input]."),
]
FlushDenormals = Annotated[bool, typer.Option(
    "--flush-denormals/--keep-denormals",
    help="Set subnormal values of the folded weights to zero (they slow CPUs down many times).",
)]
AllOrNothing = Annotated[bool, typer.Option(
    "--all-or-nothing", help="When verification fails, refuse the whole model instead of leaving only the "
    "BNs whose fold fails it.")]
FailIfLeft = Annotated[bool, typer.Option("--fail-if-left", help="Exit 1 when any BatchNorm would be left.")]


@app.callback()
def _root(version: Version = None, debug: Debug = False) -> None:
    """Fold BatchNorm into the layers around it in PyTorch and ONNX models, exactly, and prove it."""
    _STATE["debug"] = debug


# ------------------------------------------------------------------------------------------ commands
@app.command(short_help="Fold every exactly-foldable BatchNorm, verify, write OUT.")
def fold(
    model: ModelPath,
    out: OutArg = None,
    output: Output = None,
    affine: Affine = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Verify before writing OUT.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Write OUT even when verification fails (exit 1).")] = False,
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
    flush_denormals: FlushDenormals = True,
    health: Annotated[bool, typer.Option("--health", help="Also audit the BatchNorms (see inspect --health).")] = False,
    prune_constant_channels: Annotated[bool, typer.Option(
        "--prune-constant-channels",
        help="PyTorch: drop channels that are constant after the fold (gamma = 0) where exact.",
    )] = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Fold every exactly-foldable BatchNorm of MODEL, verify, and write OUT.

    Example: bnfold fold model.onnx model.folded.onnx
    """
    with _errors("fold", model, json_out=json_out, debug=debug):
        _check_common(quiet, json_out)
        dst = _one_output(out, output)
        from . import files

        atol_v, rtol_v = _tolerances(atol, rtol)
        stages = ("load", "fold", *(("verify",) if verify else ()), "save")
        settings = files.FoldSettings(
            affine=affine, verify=verify, force=force, in_place=in_place, eval_semantics=eval_semantics,
            external_data=external_data, flush_denormals=flush_denormals, health=health,
            prune_constant_channels=prune_constant_channels, all_or_nothing=all_or_nothing,
            load=files.LoadSettings(model_factory, trust_pickle),
            inputs=files.InputSettings(tuple(input_shape or ()), inputs, seed),
            verification=files.VerifySettings(samples, atol_v, rtol_v, opt_level.value if opt_level else None),
            export=files.ExportSettings(opset=opset, dynamic_batch=not static_batch,
                                        input_names=_names(input_names), output_names=_names(output_names)),
        )
        try:
            with _json_guard(json_out), _progress(quiet, stages) as progress:
                report = files.fold_file(model, dst, settings, progress)
        except FoldVerificationError as e:
            failed = e.fold_report
            _show("fold", failed, json_out, quiet, lambda c: _show_fold(c, failed, f"{model}: verification FAILED",
                                                                       verbose), exit_code=1)
            raise
        _show("fold", report, json_out, quiet, lambda c: _show_fold(c, report, str(model), verbose))


def _show_fold(console: Any, report: Any, title: str, verbose: bool) -> None:
    from ._render import render_fold_report, render_verify_report

    render_fold_report(console, report, title=title, verbose=verbose)
    if report.health is not None:
        from ._render import render_health

        render_health(console, report.health, verbose=verbose)
    if report.verification is not None and not report.verification.passed:
        render_verify_report(console, report.verification, title="verification")


@app.command(short_help="What fold would do to every BatchNorm; writes nothing.")
def inspect(
    model: ModelPath,
    affine: Annotated[bool, typer.Option("--affine", help="The verdicts fold --affine would give.")] = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    eval_semantics: EvalSemantics = False,
    input_shape: InputShape = None,
    inputs: InputsNpz = None,
    seed: Seed = 0,
    fail_if_left: FailIfLeft = False,
    health: Annotated[bool, typer.Option(
        "--health", help="Audit the BatchNorms: dead channels, var ~ 0, float16/bfloat16 range, subnormals."
    )] = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Show what fold would do to every BatchNorm of MODEL, without writing anything.

    Example: bnfold inspect model.onnx --fail-if-left
    """
    with _errors("inspect", model, json_out=json_out, debug=debug):
        _check_common(quiet, json_out)
        from . import files
        from ._render import render_fold_report, render_health

        settings = files.InspectSettings(
            affine=affine, eval_semantics=eval_semantics, health=health,
            load=files.LoadSettings(model_factory, trust_pickle),
            inputs=files.InputSettings(tuple(input_shape or ()), inputs, seed),
        )
        with _json_guard(json_out), _progress(quiet, ("load", "fold")) as progress:
            report = files.inspect_file(model, settings, progress)
        code = 1 if fail_if_left and report.bn_after else 0

        def render(c: Any) -> None:
            render_fold_report(c, report, title=str(model), verbose=verbose)
            if report.health is not None:
                render_health(c, report.health, verbose=verbose)

        _show("inspect", report, json_out, quiet, render, exit_code=code)
        if code:
            _fail(f"{model}: {report.bn_after} BatchNorm would be left (--fail-if-left)", 1, "BatchNormLeft")


@app.command(short_help="Does CANDIDATE compute what REFERENCE does? (exit 0/1/2)")
def verify(
    reference: Annotated[Path | None, typer.Argument(metavar="REFERENCE", show_default=False,
                                                     help="The reference model file (omitted with --load-outputs).")] = None,
    candidate: Annotated[Path | None, typer.Argument(metavar="CANDIDATE", show_default=False,
                                                     help="The model file to check against it.")] = None,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    inputs: InputsNpz = None,
    samples: Samples = 1,
    seed: Seed = 0,
    atol: Atol = None,
    rtol: Rtol = None,
    opt_level: Opt = None,
    error_stat: Annotated[str, typer.Option("--error-stat", metavar="max|mean|median|qQ",
                                            help="Error statistic judged against the tolerance: max (every "
                                            "element), mean, median or a quantile (q0.99, p99).")] = "max",
    min_cosine: Annotated[float | None, typer.Option("--min-cosine", show_default=False,
                                                     help="Also fail an output whose cosine similarity is "
                                                     "below this.")] = None,
    min_snr: Annotated[float | None, typer.Option("--min-snr", metavar="DB", show_default=False,
                                                  help="Also fail an output whose signal-to-noise ratio is "
                                                  "below this many dB.")] = None,
    save_outputs: Annotated[Path | None, typer.Option("--save-outputs", metavar="GOLDEN.npz", show_default=False,
                                                      help="Write the inputs and both models' outputs to this "
                                                      "file.")] = None,
    load_outputs: Annotated[Path | None, typer.Option("--load-outputs", metavar="GOLDEN.npz", show_default=False,
                                                      help="Check CANDIDATE against outputs saved earlier (no "
                                                      "model: re-check the saved comparison).")] = None,
    locate: Annotated[bool, typer.Option("--locate", help="ONNX: compare the intermediate tensors both models "
                                         "have and name the first that diverges.")] = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Check that CANDIDATE computes what REFERENCE does (exit 0 yes, 1 no, 2 cannot compare).

    Example: bnfold verify model.onnx model.folded.onnx --samples 4
    """
    paths = [p for p in (reference, candidate, load_outputs) if p is not None]
    with _errors("verify", *paths, json_out=json_out, debug=debug):
        _check_common(quiet, json_out)
        from . import files
        from ._render import render_verify_report

        if load_outputs is not None:
            if candidate is not None:
                raise OptionError("--load-outputs stands for the reference: give at most one model (the candidate)")
            reference, candidate = None, reference
        elif reference is None or candidate is None:
            raise OptionError("verify needs REFERENCE and CANDIDATE (or --load-outputs GOLDEN.npz [CANDIDATE])")
        atol_v, rtol_v = _tolerances(atol, rtol)
        settings = files.CompareSettings(
            load=files.LoadSettings(model_factory, trust_pickle),
            inputs=files.InputSettings(tuple(input_shape or ()), inputs, seed),
            verification=files.VerifySettings(
                samples, atol_v, rtol_v, opt_level.value if opt_level else None, error_stat=error_stat,
                min_cosine=min_cosine, min_snr_db=min_snr, save_outputs=save_outputs, load_outputs=load_outputs,
                locate=locate,
            ),
        )
        with _json_guard(json_out), _progress(quiet, ("load", "verify")) as progress:
            report = files.verify_files(reference, candidate, settings, progress)
        against = reference if reference is not None else load_outputs
        shown = candidate if candidate is not None else "saved outputs"

        def render(c: Any) -> None:
            render_verify_report(c, report, title=f"{shown} vs {against}")
            _show_verify_details(c, report)

        _show("verify", report, json_out, quiet, render,
              exit_code=0 if report.passed else 1, reference=reference, candidate=candidate)
        if not report.passed:
            from .verification import describe_failure

            worst = report.worst()
            where = f" ({describe_failure(worst)})" if worst else ""
            _fail(f"{shown}: not equivalent to {against}{where}", 1, "VerificationError")


def _show_verify_details(console: Any, report: Any) -> None:
    """Which runtime ran what (when not onnxruntime), where the errors are, and the first divergence.

    Model-provided names go out as plain ``Text`` (never as markup).
    """
    from rich.text import Text

    for r in report.runtimes:
        if r.runtime != "onnxruntime":
            console.print(Text(f"{r.role}: ran with {r.runtime}" + (f" ({r.reason})" if r.reason else "")))
    for c in report.checks:
        if not c.passed:
            chans = ", ".join(f"{ch} ({e:.2e})" for ch, e in c.worst_channels)
            console.print(Text(
                f"{c.name} (sample {c.sample}): failed on {c.failure}; largest error at {list(c.worst_index)}"
                + (f"; worst channels: {chans}" if chans else "")
                + f"; cosine {c.cosine:.6f}" + (f", SNR {c.snr_db:.1f} dB" if c.snr_db is not None else "")
            ))
    loc = report.locate
    if loc is not None:
        if loc.first_divergence is None:
            console.print(Text(f"locate: {loc.compared} intermediate tensor(s) compared, none diverges"))
        else:
            t = next(t for t in loc.tensors if t.name == loc.first_divergence)
            console.print(Text(
                f"locate: first divergence at {t.name} (computed by {t.producer}; matched by {t.matched_as}): "
                f"max abs error {t.max_abs_error:.3g}, {t.max_rel_error:.3g} of its scale "
                f"({loc.compared} tensor(s) compared)"
            ))


@app.command(short_help="Turn BatchNorm into frozen affine layers (PyTorch files).")
def freeze(
    model: ModelPath,
    out: OutArg = None,
    output: Output = None,
    learnable: Annotated[bool, typer.Option("--learnable", help="Make scale and shift trainable.")] = False,
    in_place: InPlace = False,
    model_factory: ModelFactory = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every frozen layer.")] = False,
    debug: Debug = False,
    version: Version = None,
) -> None:
    """Turn every BatchNorm of a PyTorch MODEL into a frozen affine layer; save in the same format.

    Example: bnfold freeze ckpt.pt ckpt.frozen.pt --model models.resnet:resnet18
    """
    with _errors("freeze", model, json_out=json_out, debug=debug):
        _check_common(quiet, json_out)
        dst = _one_output(out, output)
        from . import files
        from ._render import render_freeze_report

        settings = files.FreezeSettings(learnable, in_place, files.LoadSettings(model_factory, trust_pickle))
        with _json_guard(json_out), _progress(quiet, ("load", "freeze", "save")) as progress:
            result = files.freeze_file(model, dst, settings, progress)
        _show("freeze", result, json_out, quiet, lambda c: render_freeze_report(c, result, verbose=verbose))


@app.command(short_help="Latency of the original and the folded model.")
def bench(
    model: ModelPath,
    runs: Annotated[int, typer.Option("--runs", "-r", help="Timed runs per measurement (median shown).")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", "-w", help="Untimed runs before timing.")] = 3,
    threads: Annotated[int, typer.Option("--threads", "-t", help="Intra-op threads (0: the default).")] = 0,
    affine: Annotated[bool, typer.Option("--affine", help="Fold with --affine (ONNX).")] = False,
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
    with _errors("bench", model, json_out=json_out, debug=debug):
        _check_common(quiet, json_out)
        from . import bench as bench_mod
        from ._render import render_bench_report

        def notice(text: str) -> None:
            if not quiet and not json_out:
                sys.stderr.write(f"bnfold: note: {clean(text)}\n")
                sys.stderr.flush()

        with _json_guard(json_out), _progress(quiet, ("load", "bench")) as progress:
            report = bench_mod.bench_file(
                model, runs=runs, warmup=warmup, threads=threads, affine=affine, model_factory=model_factory,
                trust_pickle=trust_pickle, input_shapes=input_shape or [], seed=seed, progress=progress,
                notice=notice,
            )
        _show("bench", report, json_out, quiet, lambda c: render_bench_report(c, report))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``bnfold``)."""
    app(args=argv, prog_name="bnfold")


if __name__ == "__main__":  # pragma: no cover
    main()
