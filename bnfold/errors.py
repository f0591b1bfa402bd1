"""The one error hierarchy of bnfold.

Every error the library raises on purpose is a :class:`BnfoldError`. Each class carries the exit code
the CLI uses for it, so that the mapping from error to exit code lives in exactly one place
(:attr:`BnfoldError.exit_code`), and the CLI (``bnfold/cli/``) only reads it.

Exit codes:
    * 2 -- the input cannot be used (missing or unreadable file, bad option, unsupported model,
      models that cannot be compared);
    * 1 -- verification ran and the models are not equivalent.
"""

from __future__ import annotations

from collections.abc import Iterable

from .hints import Hint, Surface, advise

__all__ = [
    "BnfoldError",
    "InputError",
    "ModelFormatError",
    "UnsupportedModelError",
    "ModelStateError",
    "OptionError",
    "OutputError",
    "NotComparableError",
    "VerificationError",
    "FoldVerificationError",
    "with_context",
]


class BnfoldError(Exception):
    """Base class of every error bnfold raises on purpose.

    Attributes:
        hints: the options that would avoid the error (:mod:`bnfold.hints`), kept apart from the
            reason so that each surface words them: ``str(err)`` for a Python caller,
            ``err.text("cli")`` for the command line.
    """

    exit_code: int = 2
    hints: tuple[Hint, ...] = ()

    def __init__(self, *args: object, hints: Iterable[Hint] = ()) -> None:
        super().__init__(*args)
        if hints:
            self.hints = tuple(hints)

    @property
    def reason(self) -> str:
        """The message without the hints."""
        return str(self.args[0]) if self.args else ""

    def text(self, surface: Surface = "python") -> str:
        """The reason followed by the hints worded for ``surface``."""
        return advise(self.reason, self.hints, surface)

    def __str__(self) -> str:
        return self.text("python")


class InputError(BnfoldError):
    """The input (a file, a model, an option) cannot be used."""

    exit_code = 2


class ModelFormatError(InputError):
    """A file is not a model bnfold can read (unknown format, truncated, rejected by a checker)."""


class UnsupportedModelError(InputError):
    """The model is readable but bnfold cannot work on it (e.g. an uninitialised lazy module)."""


class ModelStateError(InputError):
    """The model is in a state that would make the result wrong (e.g. a module in ``train()`` mode)."""


class OptionError(InputError):
    """An option or argument does not parse or does not fit the model."""


class OutputError(InputError):
    """The output cannot be written (missing folder, not writable, same as the input)."""


class NotComparableError(InputError):
    """Two models cannot be compared (different inputs or outputs, incompatible shapes)."""


class VerificationError(BnfoldError):
    """Verification ran and the candidate does not compute the same as the reference.

    Attributes:
        report: the :class:`~bnfold.records.VerifyReport` that failed, when there is one.
    """

    exit_code = 1

    def __init__(self, message: str, report: object | None = None, *, hints: Iterable[Hint] = ()) -> None:
        super().__init__(message, hints=hints)
        self.report = report


class FoldVerificationError(VerificationError):
    """A fold's verification failed, so its output was not written.

    The one place that policy is stated (the file jobs raise it, the CLI renders ``fold_report`` and
    exits 1); with ``--force`` the output is written and the exit code is still 1.

    Attributes:
        fold_report: the whole :class:`~bnfold.records.FoldReport` of the fold.
    """

    def __init__(self, message: str, fold_report: object) -> None:
        super().__init__(message, report=getattr(fold_report, "verification", None))
        self.fold_report = fold_report


def with_context(err: BnfoldError, *where: str, message: str | None = None) -> BnfoldError:
    """The same error (class, attributes, hints) with ``where: `` prepended: the one way file context is added.

    Nothing is prepended when no ``where`` is given or the message already names one of them (a path or
    its file name, or the first part of ``"a vs b"``). ``message`` replaces the text first, when given.
    Several ``where`` are joined with ", ".
    """
    import os

    msg = err.reason if message is None else message
    places = [w for w in where if w]
    named = any(w in msg or os.path.basename(w) in msg or msg.startswith(w.split(" vs ")[0]) for w in places)
    if places and not named:
        msg = f"{', '.join(places)}: {msg}"
    if msg == err.reason:
        return err
    new = type(err).__new__(type(err))
    Exception.__init__(new, msg)
    new.__dict__.update(err.__dict__)
    return new
