"""The output side of a file job: refuse a bad OUT early, write it atomically, clean up after ``--in-place``.

Rules:
    * cheap checks first: OUT == MODEL without ``in_place``, a folder, a missing folder, an extension
      that names no format, a source/output pairing that cannot be written, all before any load;
    * MODEL is never modified; OUT is written by :func:`bnfold.io.save` / :func:`bnfold.io.staged_save`
      (temporary file in the same folder, then ``os.replace``), never half-written;
    * bnfold removes only data files it proves it wrote for the output it replaces (the deletion rule,
      :mod:`bnfold.io.paths`); every other file the replaced model read is kept, and a note says so
      (``staged(...).notes`` after the commit).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bnfold.errors import OptionError, OutputError
from bnfold.hints import IN_PLACE

from .load import ProgressFn

__all__ = ["check_output", "same_file", "check_pairing", "save", "staged"]


def check_output(src: Path, dst: Path, *, in_place: bool = False) -> None:
    """Refuse an output path before any heavy work (see :func:`bnfold.io.check_output_path`).

    Raises:
        OutputError: ``dst`` is the input without ``in_place``, a folder, or its folder is missing or
            not writable.
    """
    from bnfold.io import check_output_path

    try:
        same, is_dir = same_file(src, dst), dst.is_dir()
    except (OSError, RuntimeError) as e:  # a name too long, a link loop (pathlib's RuntimeError before 3.13)
        raise OutputError(f"{dst}: cannot write ({getattr(e, 'strerror', None) or e})") from e
    if same and not in_place:
        raise OutputError(f"{dst}: is the input model", hints=[IN_PLACE])
    if is_dir:
        raise OutputError(f"{dst}: is a folder, not a file name")
    check_output_path(src, dst, in_place=in_place)


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (existing files by inode, others by resolved path)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_pairing(src: Path, out_fmt: str, dst: Path) -> None:
    """Refuse a source/output pairing before loading (a sniff of a PyTorch file reads no pickle).

    Writing ``.onnx`` works from every source, so only ``.pt``/``.pt2`` outputs are sniffed here.
    """
    if out_fmt == "onnx":
        return
    from bnfold import io as bio

    fmt = bio.detect_format(src)
    if fmt == "onnx":
        raise OptionError(f"{dst}: an ONNX model can only be written as .onnx")
    if fmt == "pt2" and out_fmt == "torch":
        raise OptionError(f"{dst}: a torch.export program is written as .pt2 or .onnx, not {dst.suffix}")


def save(model: Any, dst: Path, progress: ProgressFn, *, fmt: str | None = None) -> None:
    """:func:`bnfold.io.save` between two progress ticks."""
    from bnfold import io as bio

    progress("save", 0, 1)
    bio.save(model, dst, fmt=fmt)
    progress("save", 1, 1)


class _InMemory:
    """Stands for a staged file when the model is verified in memory: ``path`` is the model itself."""

    notes: tuple[str, ...] = ()

    def __init__(self, model: Any, write: Callable[[], None]) -> None:
        self.path = model
        self._write = write

    def commit(self) -> None:
        self._write()


@contextmanager
def staged(
    model: Any,
    dst: Path,
    progress: ProgressFn,
    *,
    onnx_file: bool,
    external_data: bool | None = None,
    protect: Sequence[str] = (),
) -> Iterator[Any]:
    """Write ``model`` for ``dst`` without putting it in place; yields an object with ``path`` and ``commit()``.

    ``onnx_file``: an ONNX output is staged by :func:`bnfold.io.staged_save` and ``path`` is the
    temporary file, which loads as it is: verifying ``path`` verifies the bytes that ``commit()``
    renames into place. Otherwise (a pickle or a ``.pt2``: reloading one would need trust) ``path`` is
    the model in memory and ``commit()`` saves it atomically.
    Leaving the block without ``commit()`` leaves no file behind.
    """
    from bnfold import io as bio

    progress("save", 0, 1)
    if not onnx_file:
        yield _InMemory(model, lambda: bio.save(model, dst, protect=protect))
    else:
        with bio.staged_save(model, dst, external_data=external_data, protect=protect) as st:
            del model  # written: the caller may free it while the staged file is checked
            yield st
    progress("save", 1, 1)
