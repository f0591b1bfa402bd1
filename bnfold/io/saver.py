"""Saving: stage every file next to the destination, let the caller check it, then commit.

Rules:
    * :func:`staged_save` writes temporary files only; :meth:`Staged.commit` renames them into place;
      leaving the block without it (or by any exception: Ctrl-C, a signal turned into one) removes
      them all. :func:`save` is ``staged_save`` + ``commit``;
    * ONNX with external data: the data file is ``<out>.<16 hex>.data``, named after the SHA-256 of
      its bytes (:func:`.paths.data_name`); the model gets a record of it (name, size, SHA-256: the
      proof that bnfold wrote it, :mod:`.paths`). The staged
      pair lives in a temporary folder with the data already under its final name, so the staged
      model loads as it is; the commit moves the data into place before the model and removes the
      replaced model's data after (only data bnfold proves it wrote, that nothing in sight reads),
      under an exclusive lock on the folder: two bnfold saves never interleave;
    * the same model saved to the same name gives the same bytes (no random name, no time stamp);
    * a model over protobuf's 2 GiB needs external data; ``protect`` names files never to write.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

from bnfold.errors import OptionError, OutputError

from .atomic import (
    check_folder,
    check_target,
    discard,
    file_identity,
    folder_lock,
    output_error,
    remove_created,
    signals_deferred,
    temp_file,
    temp_folder,
    umask_mode,
)
from .datafiles import RECORD_KEY, data_refs
from .paths import (
    after_replace,
    data_name,
    input_file_error,
    is_protected,
    make_record,
    note_digest,
    owned_old_data,
    remember_saved,
    sha256_file,
)
from .stream import PartTooLarge, field_header, read_in_nested_lazy, weight_bytes, write_onnx_stream

__all__ = ["EXTERNAL_DATA_THRESHOLD", "Staged", "save", "staged_save"]

log = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""ONNX models larger than this (bytes) are saved with external data (protobuf stops at 2 GiB)."""


def _stage_onnx(
    model: Any, dst: str, external_data: bool | None, protect_ids: set[tuple[int, int]], created: list[str]
) -> Staged:
    """Write an ONNX model to temporary files next to ``dst`` (each noted in ``created`` as it is made).

    Inline: one temporary ``.<name>.*.tmp.onnx``. With external data: a temporary folder
    ``.<name>.*.tmp/`` holding ``model.onnx`` and its data under the final name (``<name>.<16
    hex>.data``, the hex from the SHA-256 of the data: :func:`.paths.data_name`), so that the
    temporary model loads (in onnxruntime too) as it is, and the commit only moves the two files.
    """
    size = weight_bytes(model)
    use_external = bool(external_data) if external_data is not None else size > EXTERNAL_DATA_THRESHOLD
    if not use_external and size >= 2**31:
        raise OutputError(
            f"{dst}: the model is {size / 2**30:.1f} GiB, over protobuf's 2 GiB limit; save it "
            "with external data"
        )
    folder = check_folder(dst)
    if is_protected(dst, protect_ids):
        raise input_file_error(dst, dst, "the output")
    read_in_nested_lazy(model)
    if not use_external:
        tmp = temp_file(dst, folder, created)
        try:
            with open(tmp, "wb") as f, _without_record(model):
                write_onnx_stream(model, f, None, "")
        except OSError as e:
            raise output_error(dst, e) from e
        except PartTooLarge as e:
            raise OutputError(f"{dst}: {e}") from e

        def commit_inline() -> tuple[str, ...]:
            os.chmod(tmp, umask_mode())
            with folder_lock(folder):
                check_target(dst)
                old_refs = data_refs(dst) if os.path.lexists(dst) else ()
                owned, notes = owned_old_data(dst, protect_ids)
                with signals_deferred():
                    os.replace(tmp, dst)
                notes = after_replace(dst, old_refs, (), owned, notes)
                remember_saved(dst, ())
            return tuple(notes)

        return Staged(tmp, (), _commit=commit_inline, _target=dst)
    work, data = _write_pair_staged(model, dst, folder, created)
    tmp_model = os.path.join(work, "model.onnx")

    def commit_pair() -> tuple[str, ...]:
        notes = _commit_pair(dst, folder, tmp_model, data, protect_ids)
        remove_created(created)  # the folder, now empty
        return notes

    return Staged(tmp_model, (data.path,) if data else (), _commit=commit_pair, _target=dst)


@contextlib.contextmanager
def _without_record(model: Any) -> Iterator[None]:
    """Leave out a record the model carries from an earlier save (it describes another file) while
    it is written; the caller's model is put back as it was."""
    props = model.metadata_props
    if not any(p.key == RECORD_KEY for p in props):
        yield
        return
    saved = [(p.key, p.value) for p in props]
    kept = [kv for kv in saved if kv[0] != RECORD_KEY]
    del props[:]
    for k, v in kept:
        props.add(key=k, value=v)
    try:
        yield
    finally:
        del props[:]
        for k, v in saved:
            props.add(key=k, value=v)


class _Hashing:
    """A write-only file that hashes what goes through it (the data file's SHA-256: its name, its record)."""

    def __init__(self, f: Any) -> None:
        self._f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self._f.write(b)  # type: ignore[no-any-return]

    def tell(self) -> int:
        return self._f.tell()  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class _StagedData:
    path: str  # in the temporary folder, under the final name
    name: str
    nbytes: int
    sha256: str


def _write_pair_staged(
    model: Any, dst: str, folder: str, created: list[str]
) -> tuple[str, _StagedData | None]:
    """Write model + data into a new temporary folder next to ``dst`` (noted in ``created``).

    The folder holds ``model.onnx`` and (when a tensor of 1 KiB or more exists) its data under its
    final name, chosen once the data is written (:func:`.paths.data_name`: from its SHA-256), so the
    model loads from there as it is. The model ends with bnfold's record of the data file (a
    ``metadata_props`` entry appended: protobuf concatenates repeated fields), which later proves
    that bnfold wrote that file for this model.
    """
    import onnx

    work = temp_folder(dst, folder, created)
    tmp_model, tmp_data = os.path.join(work, "model.onnx"), os.path.join(work, "data.tmp")
    named: list[str] = []
    try:
        with open(tmp_model, "wb") as f, open(tmp_data, "wb") as raw, _without_record(model):
            data = _Hashing(raw)

            def location() -> str:
                named.append(data_name(os.path.basename(dst), folder, data.sha.hexdigest()))
                return named[0]

            write_onnx_stream(model, f, data, location)
            if named:
                entry = onnx.StringStringEntryProto(
                    key=RECORD_KEY, value=make_record(named[0], data.nbytes, data.sha.hexdigest())
                )
                body = entry.SerializeToString()
                f.write(field_header(_METADATA_PROPS, len(body)))
                f.write(body)
        if not named:
            os.unlink(tmp_data)
            return work, None
        final = os.path.join(work, named[0])
        os.replace(tmp_data, final)
    except OSError as e:
        raise output_error(dst, e) from e
    except PartTooLarge as e:
        raise OutputError(f"{dst}: {e}") from e
    return work, _StagedData(final, named[0], data.nbytes, data.sha.hexdigest())


_METADATA_PROPS = 14  # ModelProto field number


def _same_content(path: str, nbytes: int, sha256: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_size != nbytes:
        return False
    return sha256_file(path) == sha256


def _commit_pair(
    dst: str, folder: str, tmp_model: str, data: _StagedData | None, protect_ids: set[tuple[int, int]]
) -> tuple[str, ...]:
    """Move a staged pair into place: the data first, then the model, then remove the old data.

    Under the folder lock: the moment ``dst`` is the new model, its data is there; if the model
    cannot be moved, the data moved before it is removed again. A data file already at the final
    name with the same bytes (the same model saved again) is left as it is: nothing is written over.
    """
    mode = umask_mode()
    with folder_lock(folder):
        check_target(dst)
        final = os.path.join(folder, data.name) if data is not None else None
        keep_existing = False
        if data is not None and final is not None and os.path.lexists(final):
            if not _same_content(final, data.nbytes, data.sha256):
                raise OutputError(
                    f"{dst}: {final} exists and does not hold this model's data (bnfold names a data "
                    "file after its content); move it away or choose another output name"
                )
            keep_existing = True
        old_refs = data_refs(dst) if os.path.lexists(dst) else ()
        owned, notes = owned_old_data(dst, protect_ids)
        moved: str | None = None
        try:
            os.chmod(tmp_model, mode)
            with signals_deferred():  # the two renames and the note of what moved: one step
                if data is not None and final is not None and not keep_existing:
                    os.chmod(data.path, mode)
                    os.replace(data.path, final)
                    moved = final
                    note_digest(final, data.sha256)
                os.replace(tmp_model, dst)
                moved = None
        except BaseException:
            discard(moved)
            raise
        new_refs = (final,) if final is not None else ()
        out = after_replace(dst, old_refs, new_refs, owned, notes)
        remember_saved(dst, new_refs)
    return tuple(out)


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
    _commit: Callable[[], tuple[str, ...]] = _field(repr=False, compare=False)
    _target: str = _field(default="", repr=False, compare=False)
    committed: bool = False
    notes: tuple[str, ...] = ()
    """After :meth:`commit`: what the user should know (data files kept, and why)."""

    def commit(self) -> None:
        """Rename the staged files into place (the guarantees of :func:`save`). Once only.

        Raises:
            OutputError: committed twice, or the rename failed.
        """
        if self.committed:
            raise OutputError(f"{self._target or self.path}: already committed")
        try:
            self.notes = self._commit()
        except OSError as e:
            raise output_error(self._target or self.path, e) from e
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
    external data lives in a temporary folder with its data already under its final name
    (``<path>.<16 hex>.data``). After the commit, ``staged.notes`` says which files were kept. Leaving the block without ``commit()``, or by any exception, removes
    every temporary file; ``path`` and its data are then as they were.

    Example::

        with staged_save(model, "out.onnx", external_data=True) as staged:
            check(staged.path)  # e.g. run it in onnxruntime
            staged.commit()
    """
    dst = os.fspath(path)
    protect_ids = {i for f in protect if (i := file_identity(os.fspath(f))) is not None}
    created: list[str] = []  # every temporary, noted the moment it exists (see atomic.temp_file)
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
            remove_created(created)


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
            ``<name>.<16 hex>.data`` next to the model; default: only when the model exceeds :data:`EXTERNAL_DATA_THRESHOLD`.
        fmt: nn.Module only: ``"module"`` (default: ``torch.save(model)``, architecture included, since a
            folded model's weights no longer fit the original architecture) or ``"state_dict"``.
        protect: files that must not be written or removed (pass :func:`files_read_by` of the input):
            neither the output nor its data file may be one of them.

    ONNX with external data: the weights go to ``<path>.<16 hex>.data``, the hex from the SHA-256 of
    the data (the same model: the same name and bytes; another model: another name, so a model is
    never paired with another write's data); the model carries a record of that file (name, size,
    SHA-256). The data file is moved into place before the model, and the data of the
    replaced model is removed after (only if bnfold proves it wrote it for that model and no other
    model in sight reads it: :mod:`bnfold.io.paths`), under an exclusive lock on the folder, so two
    bnfold saves to one path never interleave. The same model saved to the same path gives the same
    bytes. The notes of the commit (files kept) are logged at INFO level.

    Raises:
        OutputError: missing folder, not writable, disk errors (one line naming the path).
        OptionError: an unknown ``fmt`` or an object that is not a model.
    """
    with staged_save(model, path, external_data=external_data, fmt=fmt, protect=protect) as staged:
        staged.commit()
    for note in staged.notes:
        log.info("%s", note)


def _stage_torch(
    model: Any, dst: str, fmt: str | None, protect_ids: set[tuple[int, int]], created: list[str]
) -> Staged:
    """Write a PyTorch model to a temporary file next to ``dst`` (noted in ``created``)."""
    if "torch" not in sys.modules:
        raise OptionError(f"cannot save a {type(model).__name__}: not an ONNX or PyTorch model")
    import torch

    writer: Callable[[str], None]
    # Written through an open file, never a path: torch names the archive's top folder after a
    # path's file name (here a random temporary name), which would make every save's bytes differ.
    if isinstance(model, torch.export.ExportedProgram):

        def writer(t: str) -> None:
            with open(t, "wb") as f:
                torch.export.save(model, f)
    elif isinstance(model, torch.jit.ScriptModule):

        def writer(t: str) -> None:
            with open(t, "wb") as f:
                torch.jit.save(model, f)
    elif isinstance(model, torch.nn.Module):
        kind = fmt or "module"
        if kind not in ("module", "state_dict"):
            raise OptionError(f"unknown save format {fmt!r} (choose module or state_dict)")
        obj = model if kind == "module" else model.state_dict()

        def writer(t: str) -> None:
            with open(t, "wb") as f:
                torch.save(obj, f)
    else:
        raise OptionError(f"cannot save a {type(model).__name__}: not an ONNX or PyTorch model")
    folder = check_folder(dst)
    if is_protected(dst, protect_ids):
        raise input_file_error(dst, dst, "the output")
    tmp = temp_file(dst, folder, created)
    try:
        writer(tmp)
    except OSError as e:
        raise output_error(dst, e) from e
    except RuntimeError as e:
        # torch's zip writer reports a failed write (disk full, file size limit) as
        # "RuntimeError: [enforce fail at inline_container.cc] ... unexpected pos"
        msg = " ".join(str(e).split())
        if "enforce fail" in msg or "write" in msg.lower() or "file" in msg.lower():
            raise OutputError(
                f"{dst}: cannot write (the write failed: disk full or a file size limit?); "
                "free space and retry"
            ) from e
        raise

    def commit() -> tuple[str, ...]:
        os.chmod(tmp, umask_mode())
        check_target(dst)
        with signals_deferred():
            os.replace(tmp, dst)
        return ()

    return Staged(tmp, (), _commit=commit, _target=dst)
