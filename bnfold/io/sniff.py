"""Format detection from a file's content: a bounded sniff, pickle scanning, the ONNX wire check.

Formats (:func:`detect_format`, from the bytes, never from the extension alone):
    1. ``"onnx"``: a protobuf that parses as an ``onnx.ModelProto`` with a graph;
    2. ``"pt2"``: a zip archive written by ``torch.export.save`` (it holds ``*/archive_format`` or
       ``*/models/*.json``);
    3. ``"torchscript"``: a zip archive with ``*/code/`` or ``*/constants.pkl`` (``torch.jit.save``);
    4. ``"state_dict"``: a ``torch.save`` file (zip with ``*/data.pkl``, or a legacy pickle stream)
       whose pickle names only tensor-rebuilding globals (``collections.OrderedDict``,
       ``torch._utils._rebuild_tensor_v2``, storages, dtypes, ...); or a ``.safetensors`` file
       (8-byte header length, then a JSON header: see :mod:`.safetensors`);
    5. ``"pickled_module"``: a ``torch.save`` file whose pickle names any other class (a whole
       ``nn.Module`` saved with ``torch.save(model)``). The pickle is *read* with ``pickletools``, never
       executed, to decide this.

Rules: only regular files are read (a FIFO, socket or device is refused from ``stat``); the format is
decided from a bounded read (the zip directory, the first pickle ops, or the top-level protobuf tags
of an ONNX file, each field skipped with a seek); every unusable file raises
:class:`~bnfold.errors.ModelFormatError` with one line naming the file. An ONNX file is parsed once
here (without its external data) and the parse is handed on to the loader.
"""

from __future__ import annotations

import errno
import io as _io
import os
import pickletools
import stat
import zipfile
from collections.abc import Iterable
from typing import Any

from bnfold.errors import ModelFormatError
from bnfold.hints import Hint

from .datafiles import FileBytes, fields
from .paths import remember_refs

__all__ = [
    "FORMATS",
    "check_zip_sizes",
    "detect_format",
    "format_error",
    "file_kind",
    "not_a_file",
    "sniff_file",
]

FORMATS = ("onnx", "pt2", "state_dict", "pickled_module", "torchscript")
"""What :func:`detect_format` can return."""


_ZIP_MAGIC = b"PK\x03\x04"
# Globals that a plain tensor checkpoint (state_dict, optimizer state, epoch counters) may name.
_SAFE_GLOBAL_MODULES = {
    "collections",
    "builtins",
    "__builtin__",
    "_codecs",
    "torch",
    "torch._utils",
    "torch.storage",
    "torch._tensor",
    "numpy",
    "numpy.core.multiarray",
    "numpy._core.multiarray",
}
_SAFE_TORCH_NAMES_PREFIX = ("_rebuild_", "Size", "device", "dtype")


def format_error(path: str | os.PathLike[str], problem: str, hints: Iterable[Hint] = ()) -> ModelFormatError:
    return ModelFormatError(f"{os.fspath(path)}: {problem}", hints=hints)


def _check_readable(path: str) -> int:
    """The size of a regular, readable, non-empty file; refuse anything else before reading a byte.

    A FIFO, socket or device is refused from ``stat`` alone (opening a FIFO blocks until a writer
    comes); the file is then opened non-blocking and checked again on the descriptor, so a path swapped
    for a FIFO between the two calls cannot hang the read either.
    """
    try:
        os.lstat(path)
    except FileNotFoundError as e:
        raise format_error(path, "no such file") from e
    except OSError:
        pass  # a name too long, a folder on the path that is a file: stat below says which
    try:
        st = os.stat(path)
    except OSError as e:
        raise format_error(path, f"cannot read ({e.strerror or e})") from e
    if stat.S_ISDIR(st.st_mode):
        raise format_error(path, "is a directory, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise format_error(
            path, f"is not a regular file ({file_kind(st.st_mode)}); bnfold reads model files only"
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise format_error(path, f"cannot read ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise format_error(
            path, f"is not a regular file ({file_kind(st.st_mode)}); bnfold reads model files only"
        )
    if st.st_size == 0:
        raise format_error(path, "empty file")
    return st.st_size


def file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


def not_a_file(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not an existing regular file (None: it is one), for a data option's one line:
    "no such file", a folder, a FIFO or a device, or what ``stat`` says (a name too long, a link loop)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return "no such file" if e.errno == errno.ENOENT else f"cannot read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return f"is {file_kind(st.st_mode)}, not a file"
    return None


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at the end of the head
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\n\r\f" for ch in text)


def _globals_of(data: bytes, max_pickles: int = 1) -> set[str] | None:
    """The ``module name`` globals named by the first pickles in ``data``; None if not a pickle."""
    found: set[str] = set()
    stream = _io.BytesIO(data)
    memo: dict[int, Any] = {}
    for _ in range(max_pickles):
        if stream.tell() >= len(data):
            break
        strings: list[str] = []
        last: str | None = None  # the string just pushed, for MEMOIZE / PUT
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name == "GLOBAL":
                    found.add(str(arg).replace("\n", " ").strip())
                elif name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                    last = str(arg)
                    continue
                elif name == "MEMOIZE":
                    memo[len(memo)] = last
                    continue
                elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = last  # type: ignore[arg-type]
                    continue
                elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):  # type: ignore[arg-type]
                    strings.append(memo[int(arg)])  # type: ignore[arg-type]
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]} {strings[-1]}")
                last = None
        except Exception:
            if not found and stream.tell() <= 2:
                return None
            break
    return found


def _is_safe_global(g: str) -> bool:
    module, _, name = g.partition(" ")
    if module not in _SAFE_GLOBAL_MODULES:
        return False
    if module == "torch":
        return (
            name.endswith("Storage")
            or name.startswith(_SAFE_TORCH_NAMES_PREFIX)
            or name
            in (
                "float32",
                "float64",
                "float16",
                "bfloat16",
                "int64",
                "int32",
                "int8",
                "uint8",
                "bool",
            )
        )
    return True


def _classify_pickle(path: str, data: bytes, max_pickles: int) -> str:
    globs = _globals_of(data, max_pickles)
    if globs is None:
        raise format_error(
            path, "unknown format: not ONNX, not a PyTorch file (torch.save, torch.export, TorchScript)"
        )
    return "state_dict" if all(_is_safe_global(g) for g in globs) else "pickled_module"


# ModelProto's fields and their wire types (0 varint, 2 length-delimited), from onnx.proto.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_MAX_TOP_FIELDS = 100_000  # metadata_props / opset_import entries: far more than any real model


def _onnx_wire_problem(path: str, size: int) -> str | None:
    """Why ``path`` cannot be an ONNX ModelProto, from its top-level protobuf tags only; None if it can.

    The top level of a model is a handful of fields (ir_version, opset_import, producer, graph...):
    each tag is read and each length-delimited field is skipped (:func:`.datafiles.fields`), so a
    multi-GB file is judged from a few hundred bytes, and a file of zeros (tag 0) or random bytes is
    refused before ``onnx.load`` reads it whole. A model needs a graph; a length that runs past the
    end of the file means a truncated file.
    """
    seen: set[int] = set()
    with open(path, "rb") as f:
        try:
            for count, (number, wire, _value, _at) in enumerate(fields(FileBytes(f), 0, size)):
                want = _MODEL_FIELDS.get(number)
                if want is not None and wire != want:
                    return "not a protobuf ModelProto"
                if count >= _MAX_TOP_FIELDS:
                    return "not a protobuf ModelProto (too many top-level fields)"
                seen.add(number)
        except ValueError as e:
            if "past the end" in str(e):
                return "truncated file (a field runs past the end)"
            return "truncated file" if "truncated" in str(e) else "not a protobuf ModelProto"
    if 7 not in seen:
        return "no graph"
    return None


ZIP_FREE_BYTES = 64 << 20
"""Uncompressed bytes a zip archive may declare whatever its size (64 MiB: a batch of 128 RGB 224x224
float32 images)."""
ZIP_MAX_RATIO = 16
"""Past :data:`ZIP_FREE_BYTES`, how many times its own size a zip archive may declare uncompressed."""


def zip_overdeclared(infos: list[zipfile.ZipInfo], size: int) -> tuple[int, int] | None:
    """``(declared, limit)`` when the members ``infos`` of a zip of ``size`` bytes declare more than
    :data:`ZIP_FREE_BYTES` or :data:`ZIP_MAX_RATIO` times ``size`` uncompressed, whichever is larger
    (a possible compression bomb: ``.pt`` / ``.pt2`` archives, ``.npz`` inputs); else None."""
    declared = sum(int(i.file_size) for i in infos)
    limit = max(ZIP_FREE_BYTES, ZIP_MAX_RATIO * size)
    return (declared, limit) if declared > limit else None


def check_zip_sizes(path: str, z: zipfile.ZipFile, size: int) -> None:
    """A zip archive (torch.save, torch.export.save: members stored uncompressed) that
    :func:`zip_overdeclared` flags is refused before torch reads a member (the sniff of every file
    runs it): a small file must not cost gigabytes."""
    over = zip_overdeclared(z.infolist(), size)
    if over is not None:
        declared, limit = over
        raise format_error(
            path,
            f"its zip members declare {declared} bytes uncompressed, more than {limit} (64 MiB or 16 times "
            "the file's size); refused as a possible compression bomb (torch writes its archives uncompressed)",
        )


def sniff_file(path: str) -> tuple[str, Any]:
    """(format, parsed ONNX model or None). Raises ModelFormatError."""
    size = _check_readable(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as z:
                check_zip_sizes(path, z, size)
                names = z.namelist()
                if any(
                    n.endswith("/archive_format") or "/models/" in n and n.endswith(".json") for n in names
                ):
                    return "pt2", None
                if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
                    return "torchscript", None
                pkls = [n for n in names if n.endswith("data.pkl")]
                if pkls:
                    return _classify_pickle(path, z.read(pkls[0]), 1), None
        except zipfile.BadZipFile as e:
            raise format_error(path, f"a truncated or corrupt zip archive ({e})") from e
        raise format_error(
            path, "a zip archive that is not a PyTorch file (no data.pkl, no torch.export archive)"
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # legacy torch.save: magic number, protocol, system info, then the object, each a pickle
        with open(path, "rb") as f:
            data = f.read(min(size, 64 * 2**20))
        return _classify_pickle(path, data, 4), None
    from .safetensors import looks_like_safetensors

    if looks_like_safetensors(head, size):
        return "state_dict", None  # weights only, read without pickle (bnfold.io.safetensors)
    if _looks_like_text(head):
        raise format_error(path, "a text file, not a model")
    problem = _onnx_wire_problem(path, size)
    if problem is not None:
        raise format_error(path, f"unknown format: not ONNX ({problem}), not a PyTorch file")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise format_error(path, "unknown format or truncated file: not ONNX, not a PyTorch file") from e
    except Exception as e:
        raise format_error(path, f"unknown format: not ONNX, not a PyTorch file ({type(e).__name__})") from e
    if (
        not model.HasField("graph")
        or model.ir_version <= 0
        or not model.graph.node
        and not model.graph.output
    ):
        raise format_error(path, "unknown format: not ONNX (no graph), not a PyTorch file")
    remember_refs(path, model)
    return "onnx", model


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a model file, from its content.

    Args:
        path: the file.

    Returns:
        One of :data:`FORMATS`: "onnx", "pt2", "state_dict", "pickled_module", "torchscript".

    Raises:
        ModelFormatError: missing path, directory, empty, text, random bytes, truncated or unknown file
            (one line naming the file).
    """
    return sniff_file(os.fspath(path))[0]
