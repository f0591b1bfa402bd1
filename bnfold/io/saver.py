"""Saving: stage every file next to the destination, let the caller check it, then commit.

Rules:
    * :func:`staged_save` writes temporary files only; :meth:`Staged.commit` renames them into place;
      leaving the block without it (or by any exception: Ctrl-C, a signal turned into one) removes
      them all. :func:`save` is ``staged_save`` + ``commit``;
    * ONNX with external data: a fresh data name per write (``<out>.<8 hex>.data``); the staged pair
      lives in a temporary folder with the data already under that name, so the staged model loads
      as it is; the commit moves the data into place before the model and removes the replaced
      model's data after, under an exclusive lock on the folder: a model is never paired with another
      write's data, and no existing file is overwritten;
    * a model over protobuf's 2 GiB needs external data; ``protect`` names files never to write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

from bnfold.errors import OptionError, OutputError

from .atomic import (
    _check_folder,
    _discard,
    _folder_lock,
    _identity,
    _output_error,
    _remove_created,
    _signals_deferred,
    _temp_file,
    _temp_folder,
    _umask_mode,
)
from .datafiles import data_refs
from .paths import _input_file_error, _protected, _remember_saved, _remove_old_data
from .stream import _PartTooLarge, _read_in_nested_lazy, _weight_bytes, _write_onnx_stream

__all__ = ["EXTERNAL_DATA_THRESHOLD", "Staged", "save", "staged_save"]

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""ONNX models larger than this (bytes) are saved with external data (protobuf stops at 2 GiB)."""


def _stage_onnx(model: Any, dst: str, external_data: bool | None, protect_ids: set[tuple[int, int]],
                created: list[str]) -> Staged:
    """Write an ONNX model to temporary files next to ``dst`` (each noted in ``created`` as it is made).

    Inline: one temporary ``.<name>.*.tmp.onnx``. With external data: a temporary folder
    ``.<name>.*.tmp/`` holding ``model.onnx`` and its data under the fresh final name
    ``<name>.<8 hex>.data``, so that the temporary model loads (in onnxruntime too) as it is, and
    the commit only moves the two files.
    """
    size = _weight_bytes(model)
    use_external = bool(external_data) if external_data is not None else size > EXTERNAL_DATA_THRESHOLD
    if not use_external and size >= 2**31:
        raise OutputError(f"{dst}: the model is {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit; save it "
                          "with external data")
    folder = _check_folder(dst)
    if _protected(dst, protect_ids):
        raise _input_file_error(dst, dst, "the output")
    _read_in_nested_lazy(model)
    if not use_external:
        tmp = _temp_file(dst, folder, created)
        try:
            with open(tmp, "wb") as f:
                _write_onnx_stream(model, f, None, "")
        except OSError as e:
            raise _output_error(dst, e) from e
        except _PartTooLarge as e:
            raise OutputError(f"{dst}: {e}") from e

        def commit_inline() -> None:
            os.chmod(tmp, _umask_mode())
            with _folder_lock(folder):
                old_refs = data_refs(dst) if os.path.lexists(dst) else ()
                with _signals_deferred():
                    os.replace(tmp, dst)
                _remove_old_data(dst, old_refs, None, protect_ids)
                _remember_saved(dst, ())

        return Staged(tmp, (), _commit=commit_inline, _target=dst)
    location = _choose_data_name(dst)
    work = _write_pair_staged(model, dst, folder, location, created)
    tmp_model, tmp_data = os.path.join(work, "model.onnx"), os.path.join(work, location)
    has_data = os.path.exists(tmp_data)

    def commit_pair() -> None:
        _commit_pair(dst, folder, location, tmp_model, tmp_data if has_data else None, protect_ids)
        _remove_created(created)  # the folder, now empty

    return Staged(tmp_model, (tmp_data,) if has_data else (), _commit=commit_pair, _target=dst)


def _choose_data_name(dst: str) -> str:
    """A fresh name for this write's data file: ``<dst>.<8 hex>.data`` (a basename in dst's folder).

    Never a name that exists, and never the name of the data of the ``dst`` being replaced: the current
    pair stays whole until the new model replaces it, and a reader that opened the old model can never
    read the new data under the old name (a fixed ``<dst>.data`` reused by the next write would let it).
    An existing ``<dst>.data`` that is not the data of ``dst`` (another model's) is never touched.
    """
    folder, name = os.path.dirname(os.path.abspath(dst)), os.path.basename(dst)
    while True:
        candidate = f"{name}.{secrets.token_hex(4)}.data"
        if not os.path.lexists(os.path.join(folder, candidate)):
            return candidate


def _write_pair_staged(model: Any, dst: str, folder: str, location: str, created: list[str]) -> str:
    """Write model + data into a new temporary folder next to ``dst`` (noted in ``created``); return it.

    The folder holds ``model.onnx`` and (when a tensor of 1 KiB or more exists) its data under the
    final name ``location``, so the model loads from there as it is.
    """
    work = _temp_folder(dst, folder, created)
    tmp_model, tmp_data = os.path.join(work, "model.onnx"), os.path.join(work, location)
    try:
        with open(tmp_model, "wb") as f, open(tmp_data, "wb") as data:
            _write_onnx_stream(model, f, data, location)
    except OSError as e:
        raise _output_error(dst, e) from e
    except _PartTooLarge as e:
        raise OutputError(f"{dst}: {e}") from e
    if not os.path.getsize(tmp_data):
        os.unlink(tmp_data)
    return work


def _commit_pair(dst: str, folder: str, location: str, tmp_model: str, tmp_data: str | None,
                 protect_ids: set[tuple[int, int]]) -> None:
    """Move a staged pair into place: the data first, then the model, then remove the old data.

    Under the folder lock: the moment ``dst`` is the new model, its data is there; if the model
    cannot be moved, the data moved before it is removed again.
    """
    mode = _umask_mode()
    with _folder_lock(folder):
        final = os.path.join(folder, location)
        if tmp_data is not None and os.path.lexists(final):  # another writer drew the same 32 bits
            raise OutputError(f"{dst}: its data file {final} appeared while saving; save again")
        old_refs = data_refs(dst) if os.path.lexists(dst) else ()
        moved: str | None = None
        try:
            os.chmod(tmp_model, mode)
            with _signals_deferred():  # the two renames and the note of what moved: one step
                if tmp_data is not None:
                    os.chmod(tmp_data, mode)
                    os.replace(tmp_data, final)
                    moved = final
                os.replace(tmp_model, dst)
                moved = None
        except BaseException:
            _discard(moved)
            raise
        _remove_old_data(dst, old_refs, final, protect_ids)
        _remember_saved(dst, (final,) if tmp_data is not None else ())


@dataclass(slots=True)
class Staged:
    """A model written to temporary files by :func:`staged_save`, not yet in place.

    Attributes:
        path: the temporary main file; it loads as it is (onnxruntime included), so the caller
            verifies exactly the bytes that :meth:`commit` puts in place.
        data_files: the temporary external-data files ``path`` reads (absolute; ONNX only).
    """

    path: str
    data_files: tuple[str, ...]
    _commit: Callable[[], None] = _field(repr=False, compare=False)
    _target: str = _field(default="", repr=False, compare=False)
    committed: bool = False

    def commit(self) -> None:
        """Rename the staged files into place (the guarantees of :func:`save`). Once only.

        Raises:
            OutputError: committed twice, or the rename failed.
        """
        if self.committed:
            raise OutputError(f"{self._target or self.path}: already committed")
        try:
            self._commit()
        except OSError as e:
            raise _output_error(self._target or self.path, e) from e
        self.committed = True


@contextlib.contextmanager
def staged_save(
    model: Any,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    fmt: str | None = None,
    protect: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[Staged]:
    """Write a model to temporary files next to ``path``; :meth:`Staged.commit` moves them into place.

    Arguments and errors are those of :func:`save` (which is ``staged_save`` + ``commit``). The
    yielded :class:`Staged` names the temporary main file, which loads as it is: an ONNX model with
    external data lives in a temporary folder with its data already under the fresh final name
    ``<path>.<8 hex>.data``. Leaving the block without ``commit()``, or by any exception, removes
    every temporary file; ``path`` and its data are then as they were.

    Example::

        with staged_save(model, "out.onnx", external_data=True) as staged:
            check(staged.path)  # e.g. run it in onnxruntime
            staged.commit()
    """
    dst = os.fspath(path)
    protect_ids = {i for f in protect if (i := _identity(os.fspath(f))) is not None}
    created: list[str] = []  # every temporary, noted the moment it exists (see atomic._temp_file)
    staged: Staged | None = None
    try:  # opened before any file exists: a signal at any point after leaves nothing behind
        if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
            staged = _stage_onnx(model, dst, external_data, protect_ids, created)
        else:
            staged = _stage_torch(model, dst, fmt, protect_ids, created)
        del model  # written: the caller may free it while the staged file is checked
        yield staged
    finally:
        if staged is None or not staged.committed:
            _remove_created(created)


def save(
    model: Any,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    fmt: str | None = None,
    protect: Iterable[str | os.PathLike[str]] = (),
) -> None:
    """Write a model atomically (no partial file on failure, a model never paired with other data).

    Args:
        model: ``onnx.ModelProto`` (-> ONNX), ``torch.export.ExportedProgram`` (-> ``.pt2``),
            TorchScript module (-> ``torch.jit.save``) or ``torch.nn.Module``.
        path: destination; its folder must exist.
        external_data: ONNX only: ``True`` writes the weights (tensors of 1 KiB or more) to
            ``<name>.<8 hex>.data`` next to the model; default: only when the model exceeds :data:`EXTERNAL_DATA_THRESHOLD`.
        fmt: nn.Module only: ``"module"`` (default: ``torch.save(model)``, architecture included, since a
            folded model's weights no longer fit the original architecture) or ``"state_dict"``.
        protect: files that must not be written or removed (pass :func:`files_read_by` of the input):
            neither the output nor its data file may be one of them.

    ONNX with external data: the weights go to a fresh ``<path>.<8 hex>.data`` (a new name on every
    write, so no existing file is ever overwritten); the data file is moved into place before the
    model, and the data of the replaced model is removed after, under an exclusive lock on the folder.
    So two processes saving to one path never leave a model paired with the other run's data, and a
    reader sees the old pair, the new pair, or (old model, data already removed) a missing file.

    Raises:
        OutputError: missing folder, not writable, disk errors (one line naming the path).
        OptionError: an unknown ``fmt`` or an object that is not a model.
    """
    with staged_save(model, path, external_data=external_data, fmt=fmt, protect=protect) as staged:
        staged.commit()


def _stage_torch(model: Any, dst: str, fmt: str | None, protect_ids: set[tuple[int, int]],
                 created: list[str]) -> Staged:
    """Write a PyTorch model to a temporary file next to ``dst`` (noted in ``created``)."""
    if "torch" not in sys.modules:
        raise OptionError(f"cannot save a {type(model).__name__}: not an ONNX or PyTorch model")
    import torch

    writer: Callable[[str], None]
    if isinstance(model, torch.export.ExportedProgram):
        def writer(t: str) -> None:
            torch.export.save(model, t)
    elif isinstance(model, torch.jit.ScriptModule):
        def writer(t: str) -> None:
            torch.jit.save(model, t)
    elif isinstance(model, torch.nn.Module):
        kind = fmt or "module"
        if kind not in ("module", "state_dict"):
            raise OptionError(f"unknown save format {fmt!r} (choose module or state_dict)")
        obj = model if kind == "module" else model.state_dict()

        def writer(t: str) -> None:
            torch.save(obj, t)
    else:
        raise OptionError(f"cannot save a {type(model).__name__}: not an ONNX or PyTorch model")
    folder = _check_folder(dst)
    if _protected(dst, protect_ids):
        raise _input_file_error(dst, dst, "the output")
    tmp = _temp_file(dst, folder, created)
    try:
        writer(tmp)
    except OSError as e:
        raise _output_error(dst, e) from e
    except RuntimeError as e:
        # torch's zip writer reports a failed write (disk full, file size limit) as
        # "RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos"
        msg = " ".join(str(e).split())
        if "enforce fail" in msg or "write" in msg.lower() or "file" in msg.lower():
            raise OutputError(f"{dst}: cannot write (the write failed: disk full or a file size limit?); "
                              "free space and retry") from e
        raise

    def commit() -> None:
        os.chmod(tmp, _umask_mode())
        with _signals_deferred():
            os.replace(tmp, dst)

    return Staged(tmp, (), _commit=commit, _target=dst)
