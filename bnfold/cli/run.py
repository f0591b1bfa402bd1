"""How a CLI command runs: signals, one-line usage errors, errors -> exit codes, progress, JSON output.

The one place where errors become exit codes (see :mod:`bnfold.cli.commands` for the rules): a
:class:`~bnfold.errors.BnfoldError` prints ``bnfold: error: <message>`` (one line) on stderr and exits
with its ``exit_code``; any other exception prints one line too and exits 2; ``--debug`` shows the
traceback; Ctrl-C exits 130, SIGTERM 143 and SIGHUP 129; a reader of stdout that went away (``| head``)
ends the command quietly with 141 (128 + SIGPIPE). ``--json`` and ``-q`` are also taken before the
command; usage errors are reworded out of the validation library's phrasing. Only the CLI imports this
module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer import core as _typer_core
from typer.core import TyperGroup

from bnfold.errors import BnfoldError, OptionError, with_context

from .jsonout import error_document, finite_json, json_document
from .text import clean

__all__ = [
    "Group",
    "STATE",
    "COMMANDS",
    "guarded",
    "fail",
    "progress_bar",
    "json_guard",
    "show",
    "emit_json",
    "check_common",
    "tolerances",
    "split_names",
    "one_output",
]

# typer vendors its own copy of click: its exceptions are the ones raised (not the `click` package's).
click: Any = getattr(_typer_core, "_click")  # noqa: B009

COMMANDS = ("fold", "inspect", "verify", "freeze", "bench", "recalibrate")


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


class Group(TyperGroup):
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
        argv = _globals_after_command(list(sys.argv[1:] if args is None else args))
        plain_coercion(self.params)
        try:
            with _signals(), _pipe_guard():
                rv = super().main(
                    args=argv,
                    prog_name=prog_name or "bnfold",
                    complete_var=complete_var,
                    standalone_mode=False,
                    windows_expand_args=windows_expand_args,
                    **extra,
                )
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(2)
        except click.ClickException as e:
            command = next((a for a in argv if a in COMMANDS), "bnfold")
            hint = f" (see bnfold {command if command != 'bnfold' else ''} --help)".replace("  ", " ")
            _usage_fail(
                command,
                clean(plain_usage(e.format_message(), argv)) + hint,
                e.exit_code,
                json_mode="--json" in argv,
            )
        except typer.Abort:
            sys.stderr.write("bnfold: interrupted\n")
            sys.exit(130)
        except KeyboardInterrupt as e:  # raised outside a command (while parsing)
            code = 128 + e.signum if isinstance(e, _Terminated) else 130
            sys.stderr.write("bnfold: interrupted\n")
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        plain_coercion([option])
        return option

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:  # its help option is made here (typer caches it): the one it parses with
            plain_coercion([*command.params, command.get_help_option(ctx)])
        return command

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _pipe_guard():  # the root's --help is printed while parsing
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _pipe_guard():  # a command's --help, and every report, are printed from here
            return super().invoke(ctx)


# ------------------------------------------------------------------------------ option values, fast
# typer (0.2x) turns every option value into its type through a pydantic TypeAdapter built for each
# parameter of the command, defaults included: importing pydantic and building ~20 adapters is most of
# what the CLI adds to a short job. The plain cases (a value that already has its type, a string for a
# str or list[str] option, a non-empty string for a Path) are converted here exactly as typer converts
# them; every other value (a number to parse, a choice, an empty path) goes to typer's own converter,
# built on first use, so its checks and its error messages are unchanged.
try:
    from typer._coercion import RuntimeParam as _RuntimeParam
    from typer._coercion import build_runtime_param as _build_runtime_param
    from typer._param_types import coerce_cli_path as _coerce_cli_path
except ImportError:  # pragma: no cover - another typer: its own conversion, unchanged
    _RuntimeParam = None  # type: ignore[assignment,misc]

if _RuntimeParam is not None:

    @dataclasses.dataclass(frozen=True)
    class _PlainParam(_RuntimeParam):
        """typer's conversion of one parameter, with its plain cases done without pydantic."""

        descriptor: Any = None
        built: list[Any] = dataclasses.field(default_factory=list)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            kind, info = self.annotation, self.parameter_info
            if kind in (str, int, float) and type(value) is kind:
                return value
            if kind == list[str] and all(type(v) is str for v in value):
                return list(value)
            if (
                kind is Path
                and type(value) is str
                and value
                and "\0" not in value
                and getattr(info, "parser", None) is None
                and getattr(info, "path_type", None) is None
            ):
                return _coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
            if not self.built:
                self.built.append(_build_runtime_param(self.descriptor))
            return self.built[0]._coerce_value(value, param=param, ctx=ctx)


def plain_coercion(params: Sequence[Any]) -> None:
    """Give each typer parameter of a command the fast conversion above (see there); a no-op where
    typer has no such internals."""
    if _RuntimeParam is None:
        return  # pragma: no cover
    for p in params:
        descriptor = getattr(p, "type_descriptor", None)
        if descriptor is None or getattr(p, "_runtime_param", True) is not None:
            continue  # not typer's parameter, or its converter is already built
        if getattr(descriptor, "file_annotation", None) is not None:
            continue  # typer opens files itself
        p._runtime_param = _PlainParam(
            parameter_info=descriptor.parameter_info, annotation=descriptor.annotation, descriptor=descriptor
        )


_LIBRARY_WORDING = (
    # typer validates option values with pydantic: its phrases, in bnfold's words
    (re.compile(r"\bValue error, "), ""),
    (re.compile(r"Input should be a valid integer(, [^.()]*)?"), "expected an integer"),
    (re.compile(r"Input should be a valid number(, [^.()]*)?"), "expected a number"),
    (re.compile(r"Input should be a valid boolean(, [^.()]*)?"), "expected true or false"),
    (re.compile(r"Input should be "), "expected "),
)


def plain_usage(message: str, argv: Sequence[str]) -> str:
    """A usage error in bnfold's words: no validation-library phrasing, and the value that was given."""
    text = " ".join(str(message).split())
    for pattern, repl in _LIBRARY_WORDING:
        text = pattern.sub(repl, text)
    m = re.match(r"Invalid value for '(-[^']+)'", text)
    if m is not None and "expected" in text:
        flags = re.findall(r"'(-[^']+)'", text.split(":", 1)[0])
        for i, a in enumerate(argv):
            flag, eq, val = a.partition("=")
            if flag in flags:
                given = val if eq else (argv[i + 1] if i + 1 < len(argv) else None)
                if given is not None:
                    text += f" (got {given!r})"
                break
    return text


_GLOBAL_FLAGS = ("--json", "-q", "--quiet")
"""Per-command flags also accepted before the command (``bnfold --json inspect m.onnx``)."""


def _globals_after_command(argv: list[str]) -> list[str]:
    """``--json``/``-q`` given before the command move after it: they mean the same in either place."""
    at = next((i for i, a in enumerate(argv) if a in COMMANDS or a == "--"), None)
    if at is None or argv[at] == "--":
        return argv
    before = [a for a in argv[:at] if a in _GLOBAL_FLAGS]
    if not before:
        return argv
    return [a for a in argv[:at] if a not in _GLOBAL_FLAGS] + [argv[at], *before] + argv[at + 1 :]


PIPE_CLOSED = 128 + 13
"""Exit code when the reader of stdout went away (``| head``): 128 + SIGPIPE, as the shell reports it."""


@contextmanager
def _pipe_guard() -> Iterator[None]:
    """A reader that stops early (``bnfold inspect m.onnx -v | head -1``) ends the command quietly.

    Like a Unix tool killed by SIGPIPE: no traceback, no message; stdout is pointed at the null
    device so that the interpreter's final flush of what is still buffered cannot fail again.
    """
    try:
        yield
    except BrokenPipeError:
        _silence_stdout()
        raise SystemExit(PIPE_CLOSED) from None


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test runner's buffer)
        pass


STATE: dict[str, Any] = {"debug": False, "json": False, "command": "bnfold"}


# ------------------------------------------------------------------------------------- error handling
def _debug() -> bool:
    return bool(STATE["debug"]) or os.environ.get("BNFOLD_DEBUG", "") not in ("", "0")


def _usage_fail(command: str, message: str, code: int, *, json_mode: bool) -> NoReturn:
    line = clean(" ".join(str(message).split()))
    if json_mode:
        emit_json(error_document(command, "UsageError", line, code))
    sys.stderr.write(f"bnfold: error: {line}\n")
    sys.stderr.flush()
    sys.exit(code)


def fail(message: str, code: int, error_type: str = "Error") -> NoReturn:
    line = clean(" ".join(str(message).split()))  # one line; what is left of control characters escaped
    if STATE["json"] and not STATE.get("emitted"):
        emit_json(error_document(STATE["command"], error_type, line, code))
    sys.stderr.write(f"bnfold: error: {line}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


@contextmanager
def json_guard(json_mode: bool) -> Iterator[None]:
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
def progress_bar(quiet: bool, stages: tuple[str, ...]) -> Iterator[Callable[[str, int, int], None]]:
    """The progress callback for a job: a stage line on stderr (terminals only), library logs quiet.

    With ``quiet`` nothing is drawn, and rich is not even imported.
    """
    with contextlib.ExitStack() as stack:
        bar: Callable[[str, int, int], None] = _no_bar
        if not quiet:
            from .render import make_console, progress_callback

            bar = stack.enter_context(progress_callback(make_console(stderr=True), stages=stages))
        seen: set[str] = set()

        def update(stage: str, done: int, total: int) -> None:
            for mod in ("torch", "onnxruntime"):
                if mod not in seen and mod in sys.modules:
                    seen.add(mod)
                    _quiet_libraries()
            if stage == "bench":  # verification runs onnxruntime in a child process whose log is captured
                _ort_quiet()
            bar(stage, done, total)

        yield update


def _no_bar(stage: str, done: int, total: int) -> None:
    return None


def _ort_quiet() -> None:
    if not _debug():
        import onnxruntime

        onnxruntime.set_default_logger_severity(4)


@contextmanager
def guarded(
    command: str, *paths: Path | str, json_out: bool = False, quiet: bool = False, debug: bool = False
) -> Iterator[None]:
    """Map every exception to one stderr line and an exit code (see the module docstring); first refuse
    ``-q`` with ``--json`` (the flags every command has)."""
    STATE.update(command=command, json=json_out, emitted=False, debug=STATE["debug"] or debug)
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
            check_common(quiet, json_out)
            yield
    except (typer.Exit, typer.Abort, SystemExit, BrokenPipeError):
        raise  # a closed stdout pipe ends quietly (Group's pipe guard)
    except KeyboardInterrupt as e:
        code = 128 + e.signum if isinstance(e, _Terminated) else 130
        what = signal.Signals(e.signum).name if isinstance(e, _Terminated) else "Ctrl-C"
        sys.stderr.write(f"bnfold: interrupted ({what}); no partial or temporary file is left\n")
        raise typer.Exit(code) from None
    except BnfoldError as e:
        if _debug():
            traceback.print_exc(file=sys.stderr)
        # Every error line names the file (errors.with_context: the one way context is added), and
        # its hints are worded as the CLI flags (bnfold.hints).
        fail(with_context(e, *(str(p) for p in paths)).text("cli"), e.exit_code, type(e).__name__)
    except Exception as e:  # last resort: a bad file must never show a traceback
        if _debug():
            traceback.print_exc(file=sys.stderr)
        where = ", ".join(str(p) for p in paths)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        fail(
            f"{where}: {type(e).__name__}{': ' + msg if msg else ''} (run with --debug for the traceback)",
            2,
            type(e).__name__,
        )
    finally:
        logging.disable(previous)


def emit_json(data: Any) -> None:
    """One JSON document on stdout: strict JSON (``inf``/``nan`` become strings, see :func:`finite_json`)."""
    sys.stdout.write(json.dumps(finite_json(data), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def show(
    command: str,
    result: Any,
    json_out: bool,
    quiet: bool,
    render: Callable[[Any], None],
    *,
    exit_code: int = 0,
    **files: Any,
) -> None:
    """The one way a command reports: one JSON document on stdout, or the rendering, or nothing."""
    if json_out:
        emit_json(json_document(command, result, exit_code=exit_code, **files))
        STATE["emitted"] = True
    elif not quiet:
        from .render import make_console

        render(make_console())


def check_common(quiet: bool, json_out: bool) -> None:
    if quiet and json_out:
        raise OptionError("-q/--quiet and --json: choose one (--json already prints the JSON document alone)")


def tolerances(atol: list[str] | None, rtol: list[str] | None) -> tuple[Any, Any]:
    """``--atol 1e-4 --atol out=1e-3`` -> the comparator's tolerance mappings (checked once, by flag)."""
    if not atol and not rtol:
        return None, None  # the per-dtype defaults (parse_tolerances' answer to no value); nothing to import
    from bnfold.verification.compare import parse_tolerances

    return parse_tolerances("--atol", atol), parse_tolerances("--rtol", rtol)


def split_names(values: list[str] | None) -> tuple[str, ...]:
    """``--input-names a,b --input-names c`` -> ``("a", "b", "c")``."""
    return tuple(n.strip() for v in values or () for n in v.split(",") if n.strip())


def one_output(positional: Path | None, option: Path | None) -> Path:
    if positional is not None and option is not None and positional != option:
        raise OptionError(f"OUT given twice ({positional} and -o {option}): give one")
    out = positional or option
    if out is None:
        raise OptionError("missing OUT: give it as the second argument or with -o/--output")
    return out
