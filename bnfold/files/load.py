"""One load per file: a :class:`bnfold.io.Loaded` record (model, format, example inputs, data files, size).

Rules:
    * a file is sniffed and parsed once (:func:`bnfold.io.load_file`); later steps read the record,
      never the file's format again;
    * the factory's example inputs travel in the record, not as an attribute stuck on the model;
    * a bad ``--model`` fails even when the file does not need it (the factory is resolved first).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.records import FileInfo

from .settings import LoadSettings

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.io import Loaded

__all__ = ["ProgressFn", "noop", "load", "file_info", "resolve_factory"]

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``."""


def noop(stage: str, done: int, total: int) -> None:
    """The progress callback when none is given."""
    return None


def file_info(loaded: Loaded, src: Path, dst: Path, output_format: str) -> FileInfo:
    """The files of a job that read ``loaded`` from ``src`` and writes ``dst`` (what the write adds comes
    later: sizes after, data files written, time)."""
    return FileInfo(
        source=str(src),
        source_format=loaded.format,
        size_before=loaded.size,
        source_data_files=tuple(loaded.data_files),
        output=str(dst),
        output_format=output_format,
    )


def resolve_factory(spec: str | None) -> Callable[[], Any] | None:
    """``--model module.path:factory`` -> the callable (see :func:`bnfold.io.resolve_factory`)."""
    if spec is None:
        return None
    from bnfold.io import resolve_factory as _resolve

    return _resolve(spec)


def load(
    src: Path, settings: LoadSettings, progress: ProgressFn, *, lazy_external_data: bool = False
) -> Loaded:
    """Load ``src`` once (:func:`bnfold.io.load_file`) between two progress ticks."""
    from bnfold.io import load_file

    factory = resolve_factory(settings.model_factory)
    progress("load", 0, 1)
    loaded = load_file(
        src, model_factory=factory, trust_pickle=settings.trust_pickle, lazy_external_data=lazy_external_data
    )
    progress("load", 1, 1)
    return loaded
