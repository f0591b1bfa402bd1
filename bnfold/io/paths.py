"""Which files a model reads, which outputs would damage them, and which data files bnfold may remove.

Rules:
    * the external-data files of an ONNX file come from :mod:`.datafiles`' header walker (every tensor,
      nested graphs and node attributes included, no payload read); those of a model just loaded or
      saved by this process are remembered (keyed by path, inode, size and mtime), so a check after a
      load costs nothing;
    * the input is never modified: an output may not be the input model nor any file a command reads
      (models, their data files, ``--inputs``, golden files), compared by device and inode after
      resolving links and by resolved path; writing over the model needs ``in_place=True``; an output
      that exists and is not a regular file (folder, FIFO, device, socket) is refused;
    * **the deletion rule**: bnfold writes over or removes only files it created in this run, and a data
      file it can *prove* it wrote for the output it replaces. The proof is a record bnfold writes
      into every model with external data (``metadata_props`` entry :data:`~.datafiles.RECORD_KEY`:
      the data file's name, size and SHA-256). It counts only when the model file still has the name
      the data file was named after (a copy or a rename of the model owns nothing: its name no longer
      matches), the model reads that file, the model file has no other hard link, and the data file is
      a regular file with one link and exactly the recorded size and SHA-256. Even then the file is
      kept when another model bnfold can see reads it (any file, whatever its name, in the data
      file's folder, its sub-folders and its parent folder; links followed, files compared by device
      and inode), or when a folder cannot be listed. Every file kept that the old model read and the
      new one does not is named in a note;
    * the data file of OUT is ``<OUT name>.<16 hex>.data``, the hex the start of the SHA-256 of its
      bytes: the same model gives the same name and bytes (outputs are reproducible byte for byte),
      another model another name (a reader that opened the old model never gets the new data under
      the old name). A name over the file system's limit is shortened with a hash of the whole name.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bnfold.errors import OutputError
from bnfold.hints import IN_PLACE

from .atomic import check_folder, file_identity, fit_name, name_max
from .datafiles import absolute, data_refs, file_key, model_locations, read_record, remember

__all__ = [
    "files_read_by",
    "file_size_with_data",
    "check_output_path",
    "data_name",
    "owned_data",
    "readers_of",
    "owned_old_data",
    "make_record",
    "after_replace",
    "external_refs",
    "input_file_error",
    "is_protected",
    "remember_refs",
    "remember_saved",
    "total_size",
]


def external_refs(model: Any, base: str) -> tuple[str, ...]:
    """Absolute paths of the external-data files the tensors of the parsed ``model`` point at."""
    return absolute(base, model_locations(model))


def remember_refs(path: str, parsed: Any) -> None:
    """Note which external files the ONNX file ``path`` reads, while its tensors still say so."""
    remember(file_key(path), external_refs(parsed, os.path.dirname(os.path.abspath(path))))


def remember_saved(dst: str, refs: tuple[str, ...]) -> None:
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
    return total_size([p, *data_refs(p)])


def total_size(files: Iterable[str]) -> int:
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


def check_output_path(
    src: str | os.PathLike[str] | None,
    dst: str | os.PathLike[str],
    *,
    in_place: bool = False,
    input_files: Iterable[str | os.PathLike[str]] | None = None,
) -> None:
    """Refuse a bad output before any work: missing folder, not a regular file (a directory, a FIFO,
    a device), unwritable, the input itself, or a file the command reads.

    Files are compared by identity (device and inode, after resolving links) and by resolved path, so
    ``./a/../b.onnx``, a symlink or a hard link to an input file are caught too. Besides ``dst``,
    ``<dst>.data`` may not be an input file either (``a.onnx`` keeping its weights in ``b.onnx.data``
    is not written as ``b.onnx``: the pair would be easy to mistake for each other).

    Args:
        src: the input model (None: no input model; ``input_files`` still protected).
        dst: the output path.
        in_place: allow ``dst`` to be ``src`` (its own data files are then replaced with it).
        input_files: every file the command reads (:func:`files_read_by` of each model, ``--inputs``,
            a golden file...). Without it, the field headers of an ONNX ``src`` are walked for its
            data files (cheap: no payload is read).

    Raises:
        OutputError: one line naming ``dst``.
    """
    d = os.fspath(dst)
    folder = check_folder(d)
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{d}: cannot write to folder {folder} (permission denied)")
    files = [os.fspath(f) for f in input_files] if input_files is not None else []
    if src is not None:
        s = os.fspath(src)
        if file_identity(d) is not None and file_identity(d) == file_identity(s):
            if not in_place:
                raise OutputError(f"{d}: is the input model", hints=[IN_PLACE])
            files = [f for f in files if file_identity(f) != file_identity(s)]
            _refuse_input_files(d, files, data_too=False)
            return
        if input_files is None:
            s = os.path.abspath(s)
            files = [s, *data_refs(s)]
    _refuse_input_files(d, files)


def _refuse_input_files(dst: str, files: list[str], *, data_too: bool = True) -> None:
    ids = {i: f for f in files if (i := file_identity(f)) is not None}
    names = {os.path.realpath(f) for f in files}
    checks = [(dst, "the output")]
    if data_too:
        checks.append((os.path.abspath(dst) + ".data", "the output's external data"))
    for path, what in checks:
        if file_identity(path) in ids or os.path.realpath(path) in names:
            raise input_file_error(dst, path, what)


def is_protected(path: str, protect_ids: set[tuple[int, int]]) -> bool:
    return file_identity(path) in protect_ids


def input_file_error(dst: str, path: str, what: str) -> OutputError:
    return OutputError(
        f"{dst}: {what} {path} is a file the input model reads or another input of this command; "
        "writing it would damage the input. Choose another output name"
    )


# ------------------------------------------------------------------------- which data bnfold owns

_DIGEST_HEX = 16  # characters of the SHA-256 in a data file's name (64 bits)


def data_name(model_name: str, folder: str, sha256: str) -> str:
    """The name bnfold gives the data file of a model called ``model_name`` whose data has this SHA-256:
    ``<name>.<16 hex>.data`` (the name shortened with a hash where over the file system's limit, a byte
    that is not UTF-8 replaced by U+FFFD)."""
    suffix = f".{sha256[:_DIGEST_HEX]}.data"
    # The name is stored in the model (a protobuf string: UTF-8 only); a byte of a model name that is
    # not UTF-8 (a surrogate-escaped ``\xff``) becomes U+FFFD there.
    model_name = os.fsencode(model_name).decode("utf-8", "replace")
    return fit_name(model_name, name_max(folder) - len(suffix)) + suffix


@dataclass(frozen=True, slots=True)
class _Record:
    location: str
    nbytes: int
    sha256: str


def make_record(location: str, nbytes: int, sha256: str) -> str:
    """The record's text (canonical JSON: the same data gives the same bytes)."""
    return json.dumps(
        {"bytes": nbytes, "location": location, "sha256": sha256}, sort_keys=True, separators=(",", ":")
    )


def _parse_record(text: str | None) -> _Record | None:
    if text is None:
        return None
    try:
        doc = json.loads(text)
        rec = _Record(str(doc["location"]), int(doc["bytes"]), str(doc["sha256"]))
    except (ValueError, TypeError, KeyError):
        return None
    return rec if len(rec.sha256) == 64 else None


_DIGESTS: dict[Any, str] = {}  # file_key -> SHA-256 of files this process wrote or hashed (a few)


def note_digest(path: str, sha256: str) -> None:
    """Remember the SHA-256 of the file ``path`` as it is now (a data file just written)."""
    key = file_key(path)
    if key is not None:
        while len(_DIGESTS) >= 16:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = sha256


def sha256_file(path: str) -> str | None:
    """The SHA-256 of the file ``path`` (remembered per file version); None if it cannot be read."""
    key = file_key(path)
    if key in _DIGESTS:
        return _DIGESTS[key]
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(8 * 2**20):
                h.update(chunk)
    except OSError:
        return None
    note_digest(path, h.hexdigest())
    return h.hexdigest()


def owned_data(model_path: str | os.PathLike[str]) -> str | None:
    """The data file that the ONNX file ``model_path`` provably got from bnfold (absolute), else None.

    The proof (see the module's rules): bnfold's record in the model names one of the data names of
    *this* model's name, the model reads it, the model file (not a link) has one hard link, and the
    data file is a regular file with one link and the recorded size and SHA-256.
    """
    m = os.path.abspath(os.fspath(model_path))
    try:
        mst = os.lstat(m)
    except OSError:
        return None
    if not stat.S_ISREG(mst.st_mode) or mst.st_nlink != 1:
        return None
    rec = _parse_record(read_record(m))
    folder = os.path.dirname(m)
    if rec is None or rec.location != data_name(os.path.basename(m), folder, rec.sha256):
        return None
    data = os.path.join(folder, rec.location)
    if data not in data_refs(m):
        return None
    try:
        st = os.lstat(data)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != rec.nbytes:
        return None
    return data if sha256_file(data) == rec.sha256 else None


# The first byte of an ONNX file is the tag of a ModelProto field (ir_version, producer_name, ...,
# graph, opset_import, metadata_props, training_info, functions): a photo or an archive is passed over
# after one byte, not read whole.
_MODEL_FIRST_BYTES = frozenset((0x08, 0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA))


def _may_be_onnx(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 1)[:1] in {
            bytes([b]) for b in _MODEL_FIRST_BYTES
        }
    except OSError:
        return False
    finally:
        os.close(fd)


_SCAN_LIMIT = 10_000  # folder entries looked at; past it bnfold cannot tell, and keeps the file


def readers_of(data: str, besides: str) -> list[str] | None:
    """Files other than ``besides`` (and its links) that read ``data``: any file, whatever its name,
    in ``data``'s folder (as named and resolved), its sub-folders and its parent folder.

    Returns:
        The readers found (empty: none), or None when bnfold cannot tell (a folder it cannot list, or
        more than :data:`_SCAN_LIMIT` entries).
    """
    target = file_identity(data)
    if target is None:
        return []
    skip = os.path.realpath(besides)
    bases = list(
        dict.fromkeys((os.path.dirname(os.path.abspath(data)), os.path.dirname(os.path.realpath(data))))
    )
    folders: dict[str, None] = {}
    for base in bases:
        folders.setdefault(base, None)
        folders.setdefault(os.path.dirname(base), None)
    seen = 0
    found: list[str] = []
    queue = list(folders)
    subs_of = set(bases)
    while queue:
        folder = queue.pop(0)
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except FileNotFoundError:
            continue  # gone meanwhile (another save's temporary folder): it holds no reader
        except OSError:
            return None
        for e in entries:
            seen += 1
            if seen > _SCAN_LIMIT:
                return None
            try:
                if e.is_dir():
                    if folder in subs_of and e.path not in folders:
                        folders[e.path] = None
                        queue.append(e.path)
                    continue
                if not e.is_file() or os.path.realpath(e.path) == skip or file_identity(e.path) == target:
                    continue
            except OSError:
                continue
            if _may_be_onnx(e.path) and any(file_identity(r) == target for r in data_refs(e.path)):
                found.append(e.path)
    return found


def owned_old_data(dst: str, protect_ids: set[tuple[int, int]]) -> tuple[str | None, list[str]]:
    """Before ``dst`` is replaced: the data file bnfold may remove with it (proven its own, not an input,
    read by no other model in sight), or None; and a note for an owned file that must be kept."""
    owned = owned_data(dst) if os.path.lexists(dst) else None
    if owned is None or is_protected(owned, protect_ids):
        return None, []
    readers = readers_of(owned, dst)
    if readers is None:
        return None, [
            f"kept {owned}: bnfold wrote it for {dst} but cannot tell whether another model reads it"
        ]
    if readers:
        return None, [f"kept {owned}: bnfold wrote it for {dst}, and {readers[0]} reads it too"]
    return owned, []


def after_replace(
    dst: str, old_refs: Iterable[str], new_refs: Iterable[str], owned: str | None, notes: Iterable[str] = ()
) -> list[str]:
    """After ``dst`` was replaced: remove ``owned`` (see :func:`owned_old_data`) if the new model does
    not read it; return ``notes`` and a note for every other file the old ``dst`` read that the new one
    does not read, which is kept."""
    out = list(notes)
    said = " ".join(out)
    new_ids = {i for r in new_refs if (i := file_identity(r)) is not None}
    me = os.path.realpath(dst)
    for ref in old_refs:
        ident = file_identity(ref)
        if ident is None or ident in new_ids or os.path.realpath(ref) == me:
            continue
        if ref == owned:
            try:
                os.unlink(ref)
            except OSError as e:
                out.append(
                    f"could not remove {ref}, which bnfold wrote for the replaced model ({e.strerror or e})"
                )
            continue
        if ref in said:
            continue
        out.append(
            f"kept {ref}: the replaced {os.path.basename(dst)} read it and the new one does not; bnfold "
            "cannot prove it wrote it for this output, so another model may read it (remove it yourself "
            "if nothing does)"
        )
    return out
