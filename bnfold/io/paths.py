"""Which files a model reads, and which outputs would damage them.

Rules:
    * the external-data files of an ONNX file come from :mod:`.datafiles`' header walker (every tensor,
      nested graphs and node attributes included, no payload read); those of a model just loaded or
      saved by this process are remembered (keyed by path, inode, size and mtime), so a check after a
      load costs nothing;
    * the input is never modified: the output may not be the input model nor any file it reads,
      compared by inode and resolved path; writing over the model needs ``in_place=True``;
    * only the data files bnfold itself names (``<out>.data``, ``<out>.<8 hex>.data``) are ever removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

from bnfold.errors import OutputError

from .atomic import _check_folder, _identity
from .datafiles import absolute, data_refs, file_key, model_locations, remember

__all__ = ["files_read_by", "file_size_with_data", "check_output_path"]


def _external_refs(model: Any, base: str) -> tuple[str, ...]:
    """Absolute paths of the external-data files the tensors of the parsed ``model`` point at."""
    return absolute(base, model_locations(model))


def _remember_refs(path: str, parsed: Any) -> None:
    """Note which external files the ONNX file ``path`` reads, while its tensors still say so."""
    remember(file_key(path), _external_refs(parsed, os.path.dirname(os.path.abspath(path))))


def _remember_saved(dst: str, refs: tuple[str, ...]) -> None:
    """What the file just written reads (so a size or a check after the save does not walk it)."""
    remember(file_key(dst), refs)


def files_read_by(path: str | os.PathLike[str]) -> list[str]:
    """The files that loading the model at ``path`` reads: the file itself, then (ONNX) every
    external-data file its tensors reference, as absolute paths (the data files need not exist).

    Cheap after :func:`load` / :func:`detect_format` of the same unchanged file (remembered then);
    otherwise the field headers of an ONNX file are walked (its payloads are not read).
    """
    p = os.path.abspath(os.fspath(path))
    return [p, *(r for r in data_refs(p) if r != p)]


def file_size_with_data(path: str | os.PathLike[str]) -> int | None:
    """Bytes on disk of a model: the file plus every distinct external-data file it references.

    Returns:
        The total, or None if ``path`` does not exist. Missing data files count 0.
    """
    p = os.path.abspath(os.fspath(path))
    if not os.path.exists(p):
        return None
    return _total_size([p, *data_refs(p)])


def _total_size(files: Iterable[str]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _plain_data_name(dst: str) -> str:
    return os.path.abspath(dst) + ".data"


def check_output_path(
    src: str | os.PathLike[str] | None,
    dst: str | os.PathLike[str],
    *,
    in_place: bool = False,
    input_files: Iterable[str | os.PathLike[str]] | None = None,
) -> None:
    """Refuse a bad output before any work: missing folder, a directory, unwritable, the input itself,
    or a file the input model reads.

    Files are compared by identity (device and inode, after resolving links) and by resolved path, so
    ``./a/../b.onnx``, a symlink or a hard link to an input file are caught too. Besides ``dst``,
    ``<dst>.data`` may not be an input file either (``a.onnx`` keeping its weights in ``b.onnx.data``
    is not written as ``b.onnx``: the pair would be easy to mistake for each other).

    Args:
        src: the input model (None: no input to protect).
        dst: the output path.
        in_place: allow ``dst`` to be ``src`` (its own data files are then replaced with it).
        input_files: every file the input reads (:func:`files_read_by`). Without it, the field
            headers of an ONNX ``src`` are walked for its data files (cheap: no payload is read).

    Raises:
        OutputError: one line naming ``dst``.
    """
    d = os.fspath(dst)
    folder = _check_folder(d)
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{d}: cannot write to folder {folder} (permission denied)")
    if src is None:
        return
    same_as_src = _identity(d) is not None and _identity(d) == _identity(os.fspath(src))
    if same_as_src:
        if not in_place:
            raise OutputError(f"{d}: is the input model; choose another output or pass --in-place to overwrite it")
        return
    s = os.path.abspath(os.fspath(src))
    files = ([os.fspath(f) for f in input_files] if input_files is not None
             else [s, *data_refs(s)])
    _refuse_input_files(d, files)


def _refuse_input_files(dst: str, files: list[str]) -> None:
    ids = {i: f for f in files if (i := _identity(f)) is not None}
    names = {os.path.realpath(f) for f in files}
    data = _plain_data_name(dst)
    for path, what in ((dst, "the output"), (data, "the output's external data")):
        if _identity(path) in ids or os.path.realpath(path) in names:
            raise OutputError(
                f"{dst}: {what} {path} is a file the input model reads; writing it would damage the input. "
                "Choose another output name"
            )




def _protected(path: str, protect_ids: set[tuple[int, int]]) -> bool:
    return _identity(path) in protect_ids


def _input_file_error(dst: str, path: str, what: str) -> OutputError:
    return OutputError(f"{dst}: {what} {path} is a file the input model reads; writing it would damage the "
                       "input. Choose another output name")


def _is_our_data_name(dst: str, path: str) -> bool:
    """``<dst>.data`` or ``<dst>.<8 hex>.data`` in dst's folder: the only names :func:`save` writes."""
    if os.path.dirname(os.path.abspath(path)) != os.path.dirname(os.path.abspath(dst)):
        return False
    name, other = os.path.basename(dst), os.path.basename(path)
    if other == f"{name}.data":
        return True
    mid = other[len(name) + 1: -len(".data")] if other.startswith(f"{name}.") and other.endswith(".data") else ""
    return len(mid) == 8 and all(c in "0123456789abcdef" for c in mid)


def _remove_old_data(dst: str, old_refs: Iterable[str], keep: str | None, protect_ids: set[tuple[int, int]]) -> None:
    """After ``dst`` was replaced: remove the data files only the old ``dst`` read, that bnfold wrote."""
    keep_id = _identity(keep) if keep else None
    for ref in old_refs:
        if not _is_our_data_name(dst, ref) or _protected(ref, protect_ids):
            continue
        ident = _identity(ref)
        if ident is None or ident == keep_id:
            continue
        with contextlib.suppress(OSError):
            os.unlink(ref)
