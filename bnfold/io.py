"""Model files: format detection from the content, loading, atomic saving.

Formats (:func:`detect_format`, from the bytes, never from the extension alone):
    1. ``"onnx"``: a protobuf that parses as an ``onnx.ModelProto`` with a graph;
    2. ``"pt2"``: a zip archive written by ``torch.export.save`` (it holds ``*/archive_format`` or
       ``*/models/*.json``);
    3. ``"torchscript"``: a zip archive with ``*/code/`` or ``*/constants.pkl`` (``torch.jit.save``);
    4. ``"state_dict"``: a ``torch.save`` file (zip with ``*/data.pkl``, or a legacy pickle stream)
       whose pickle names only tensor-rebuilding globals (``collections.OrderedDict``,
       ``torch._utils._rebuild_tensor_v2``, storages, dtypes, ...);
    5. ``"pickled_module"``: a ``torch.save`` file whose pickle names any other class (a whole
       ``nn.Module`` saved with ``torch.save(model)``). The pickle is *read* with ``pickletools``, never
       executed, to decide this.

Rules:
    * unpickling runs arbitrary code: a pickled module is loaded only with ``trust_pickle=True``
      (``--trust-pickle``); a state_dict is loaded with ``weights_only=True`` and needs a factory that
      builds the architecture (``--model module.path:factory``); a TorchScript archive is recognised
      from its member names and refused, never handed to ``torch.jit.load``; the current folder is
      *appended* to ``sys.path`` for factories and trusted pickles, never put first;
    * only regular files are read (a FIFO, socket or device is refused from ``stat``), and the format
      is decided from a bounded read: the zip directory, the first pickle ops, or the top-level
      protobuf tags of an ONNX file (each field skipped with a seek);
    * every unusable file raises :class:`~bnfold.errors.ModelFormatError` with one line naming the file;
      inconsistent ONNX data (:func:`check_model_data`) too, for a file as for a model given in memory;
    * outputs are written atomically: a temporary file in the destination folder, then ``os.replace``;
      a failed or interrupted write (any exception: Ctrl-C, a signal turned into one) leaves no partial
      file and no temporary; signals are held back in the few calls that create or rename a file;
    * ONNX with external data: a fresh data name per write (``<out>.<8 hex>.data``), the data renamed
      into place before the model, the replaced model's data removed after, under an exclusive lock
      on the folder: a model is never paired with another write's data, and no existing file is
      overwritten;
    * the input is never modified: the output may not be the input model nor any file it reads
      (:func:`files_read_by`, compared by inode and resolved path); writing over the model needs
      ``in_place=True``;
    * nothing here serialises a whole model or calls ``ByteSize()`` (protobuf stops at 2 GiB, and upb
      serialises to size): the writer streams one initializer at a time;
    * torch is imported only for PyTorch files, never for an ONNX file.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io as _io
import logging
import os
import pickletools
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelFormatError, OptionError, OutputError

__all__ = [
    "FORMATS",
    "EXTERNAL_DATA_THRESHOLD",
    "Loaded",
    "Staged",
    "detect_format",
    "load",
    "load_file",
    "staged_save",
    "load_with_format",
    "save",
    "atomic_path",
    "check_output_path",
    "check_model_data",
    "files_read_by",
    "file_size_with_data",
    "resolve_factory",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2", "state_dict", "pickled_module", "torchscript")
"""What :func:`detect_format` can return."""

EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""ONNX models larger than this (bytes) are saved with external data (protobuf stops at 2 GiB)."""

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


def _fail(path: str | os.PathLike[str], problem: str) -> ModelFormatError:
    return ModelFormatError(f"{os.fspath(path)}: {problem}")


def _check_readable(path: str) -> int:
    """The size of a regular, readable, non-empty file; refuse anything else before reading a byte.

    A FIFO, socket or device is refused from ``stat`` alone (opening a FIFO blocks until a writer
    comes); the file is then opened non-blocking and checked again on the descriptor, so a path swapped
    for a FIFO between the two calls cannot hang the read either.
    """
    if not os.path.lexists(path):
        raise _fail(path, "no such file")
    try:
        st = os.stat(path)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from e
    if stat.S_ISDIR(st.st_mode):
        raise _fail(path, "is a directory, not a model file")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, f"is not a regular file ({_file_kind(st.st_mode)}); bnfold reads model files only")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, f"is not a regular file ({_file_kind(st.st_mode)}); bnfold reads model files only")
    if st.st_size == 0:
        raise _fail(path, "empty file")
    return st.st_size


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a plain file"


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
        return name.endswith("Storage") or name.startswith(_SAFE_TORCH_NAMES_PREFIX) or name in (
            "float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool",
        )
    return True


def _classify_pickle(path: str, data: bytes, max_pickles: int) -> str:
    globs = _globals_of(data, max_pickles)
    if globs is None:
        raise _fail(path, "unknown format: not ONNX, not a PyTorch file (torch.save, torch.export, TorchScript)")
    return "state_dict" if all(_is_safe_global(g) for g in globs) else "pickled_module"


# ModelProto's fields and their wire types (0 varint, 2 length-delimited), from onnx.proto.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_MAX_TOP_FIELDS = 100_000  # metadata_props / opset_import entries: far more than any real model


def _read_varint(f: BinaryIO) -> int | None:
    """One varint from file ``f``; None at a clean end of file. Raises ValueError if malformed."""
    n = shift = 0
    for i in range(10):
        b = f.read(1)
        if not b:
            if i == 0:
                return None
            raise ValueError("truncated varint")
        n |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return n
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _onnx_wire_problem(path: str, size: int) -> str | None:
    """Why ``path`` cannot be an ONNX ModelProto, from its top-level protobuf tags only; None if it can.

    The top level of a model is a handful of fields (ir_version, opset_import, producer, graph...):
    each tag is read and each length-delimited field is skipped with a seek, so a multi-GB file is
    judged from a few hundred bytes, and a file of zeros (tag 0) or random bytes is refused before
    ``onnx.load`` reads it whole. A model needs a graph; a length that runs past the end of the file
    means a truncated file.
    """
    seen: set[int] = set()
    with open(path, "rb") as f:
        for _ in range(_MAX_TOP_FIELDS):
            try:
                tag = _read_varint(f)
                if tag is None:
                    break
                number, wire = tag >> 3, tag & 7
                want = _MODEL_FIELDS.get(number)
                if number == 0 or (want is not None and wire != want):
                    return "not a protobuf ModelProto"
                if wire == 0:
                    if _read_varint(f) is None:
                        return "truncated file"
                elif wire == 2:
                    length = _read_varint(f)
                    if length is None or f.tell() + length > size:
                        return "truncated file (a field runs past the end)"
                    f.seek(length, os.SEEK_CUR)
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                else:
                    return "not a protobuf ModelProto"
            except ValueError:
                return "not a protobuf ModelProto"
            seen.add(number)
        else:
            return "not a protobuf ModelProto (too many top-level fields)"
        if f.tell() > size:
            return "truncated file"
    if 7 not in seen:
        return "no graph"
    return None


def _sniff(path: str) -> tuple[str, Any]:
    """(format, parsed ONNX model or None). Raises ModelFormatError."""
    size = _check_readable(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if any(n.endswith("/archive_format") or "/models/" in n and n.endswith(".json") for n in names):
                    return "pt2", None
                if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
                    return "torchscript", None
                pkls = [n for n in names if n.endswith("data.pkl")]
                if pkls:
                    return _classify_pickle(path, z.read(pkls[0]), 1), None
        except zipfile.BadZipFile as e:
            raise _fail(path, f"a truncated or corrupt zip archive ({e})") from e
        raise _fail(path, "a zip archive that is not a PyTorch file (no data.pkl, no torch.export archive)")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # legacy torch.save: magic number, protocol, system info, then the object, each a pickle
        with open(path, "rb") as f:
            data = f.read(min(size, 64 * 2**20))
        return _classify_pickle(path, data, 4), None
    if _looks_like_text(head):
        raise _fail(path, "a text file, not a model")
    problem = _onnx_wire_problem(path, size)
    if problem is not None:
        raise _fail(path, f"unknown format: not ONNX ({problem}), not a PyTorch file")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise _fail(path, "unknown format or truncated file: not ONNX, not a PyTorch file") from e
    except Exception as e:
        raise _fail(path, f"unknown format: not ONNX, not a PyTorch file ({type(e).__name__})") from e
    if not model.HasField("graph") or model.ir_version <= 0 or not model.graph.node and not model.graph.output:
        raise _fail(path, "unknown format: not ONNX (no graph), not a PyTorch file")
    _remember_refs(path, model)
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
    return _sniff(os.fspath(path))[0]


def _add_cwd_as_fallback() -> None:
    """Let modules in the current folder be found, after every installed package (never first)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


def resolve_factory(spec: str | Callable[[], Any]) -> Callable[[], Any]:
    """``"module.path:factory"`` (or ``"file.py:factory"``) -> the callable; a callable is returned as is.

    The current working directory is *appended* to ``sys.path`` (a fallback, as for the trusted
    pickle path): a ``./onnxruntime.py`` or ``./numpy.py`` in the folder bnfold runs in never shadows
    an installed package.

    Raises:
        OptionError: bad syntax, module or attribute not found, not callable.
    """
    if callable(spec):
        return spec
    mod_name, sep, attr = str(spec).partition(":")
    if not sep or not mod_name or not attr:
        raise OptionError(f"bad model factory {spec!r}: expected module.path:factory (e.g. models.lenet:lenet5)")
    try:
        if mod_name.endswith(".py"):
            file = os.path.abspath(mod_name)
            if not os.path.isfile(file):
                raise OptionError(f"bad model factory {spec!r}: {mod_name} does not exist")
            mspec = importlib.util.spec_from_file_location(Path(file).stem, file)
            assert mspec is not None and mspec.loader is not None
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            _add_cwd_as_fallback()
            module = importlib.import_module(mod_name)
    except OptionError:
        raise
    except Exception as e:
        raise OptionError(f"bad model factory {spec!r}: cannot import {mod_name} ({type(e).__name__}: {e})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"bad model factory {spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OptionError(f"bad model factory {spec!r}: {attr} is not callable")
    return obj  # type: ignore[no-any-return]


def _state_dict_of(path: str, obj: Any) -> Mapping[str, Any]:
    import torch

    def is_sd(d: Any) -> bool:
        return isinstance(d, Mapping) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()
        )

    if is_sd(obj):
        return obj  # type: ignore[no-any-return]
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "module", "net"):
            if is_sd(obj.get(key)):
                return obj[key]  # type: ignore[no-any-return]
    raise _fail(path, "a torch.save checkpoint without a state_dict (a dict of tensors, or one under "
                      "'state_dict' / 'model_state_dict' / 'model')")


def _check_onnx(path: str, model: Any) -> None:
    """``onnx.checker.check_model`` on the model's structure, without re-reading or copying its weights.

    The checker validates nodes, types, opsets and graph wiring; weights matter to it by name, type and
    shape, and by a size that fits them. So it runs on a copy where each initializer is a graph input
    of its type and shape, and the sizes are checked here; not on the path (a third parse of the file)
    nor on the model (a full serialisation of every weight).
    """
    import onnx

    light = onnx.ModelProto()
    for field, _ in model.ListFields():
        if field.name != "graph":
            _copy_field(model, light, field)
    g = light.graph
    for field, _ in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(model.graph, g, field)
    declared = {v.name for v in g.input}
    check_model_data(model, path)
    for t in model.graph.initializer:
        if t.name not in declared:  # IR < 4 lists initializers as inputs already
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        onnx.checker.check_model(light)
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise _fail(path, f"rejected by onnx.checker: {msg}") from e


def _tensor_problem(t: Any) -> str | None:
    """Why tensor ``t``'s stored values do not fit its shape and type (what ``to_array`` would trip on)."""
    import onnx

    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in _SUBBYTE_TYPES:
        return None
    n = 1
    for d in t.dims:
        if int(d) < 0:
            return f"tensor '{t.name}' has a negative dimension {list(t.dims)}"
        n *= int(d)
    if t.HasField("raw_data"):
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            return None
        got = len(t.raw_data)
        if got != n * item:
            return f"tensor '{t.name}' holds {got} bytes, its shape {list(t.dims)} and type need {n * item}"
        return None
    field = _TYPED_FIELD.get(t.data_type)
    if field is None:
        return None
    per = 2 if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1
    got = len(getattr(t, field))
    if got != n * per:
        return (f"tensor '{t.name}' holds {got} values in {field}, its shape {list(t.dims)} needs {n * per}")
    return None


# Where a tensor without raw_data keeps its values, by TensorProto.DataType (onnx.proto).
_TYPED_FIELD = {
    1: "float_data", 14: "float_data",  # FLOAT, COMPLEX64
    2: "int32_data", 3: "int32_data", 4: "int32_data", 5: "int32_data", 6: "int32_data", 9: "int32_data",
    10: "int32_data", 16: "int32_data", 17: "int32_data", 18: "int32_data", 19: "int32_data", 20: "int32_data",
    7: "int64_data",  # INT64
    8: "string_data",  # STRING
    11: "double_data", 15: "double_data",  # DOUBLE, COMPLEX128
    12: "uint64_data", 13: "uint64_data",  # UINT32, UINT64
}


def _graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _bn_param_problem(graph: Any, inits: Mapping[str, Any]) -> str | None:
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        dims = [tuple(int(d) for d in inits[i].dims) for i in node.input[1:5] if i in inits]
        if len(dims) == 4 and (len({d for d in dims}) > 1 or len(dims[0]) != 1):
            label = node.name or node.output[0] if node.output else node.name
            return (f"BatchNormalization '{label}': scale, B, mean and var have shapes "
                    f"{', '.join(str(list(d)) for d in dims)}; they must be 1-D and of one length (the channels)")
    return None


def check_model_data(model: Any, where: str = "model") -> None:
    """Refuse an ONNX model whose data is inconsistent, before anything reads its weights.

    Checked in every graph and subgraph: initializer names are unique (a second ``W`` would silently
    replace the first, depending on who reads the list); every initializer and Constant tensor holds
    exactly as many values as its shape needs; the four parameters of a BatchNormalization (when they
    are initializers) are 1-D tensors of one length.

    Raises:
        ModelFormatError: one line naming ``where`` and the tensor or node.
    """
    for graph in _graphs(model.graph):
        inits: dict[str, Any] = {}
        for t in graph.initializer:
            if t.name in inits:
                raise ModelFormatError(f"{where}: initializer '{t.name}' is defined twice in graph "
                                       f"'{graph.name}'; each name must be unique")
            inits[t.name] = t
            problem = _tensor_problem(t)
            if problem:
                raise ModelFormatError(f"{where}: {problem}")
        for node in graph.node:
            for attr in node.attribute:
                for t in ([attr.t] if attr.HasField("t") else []) + list(attr.tensors):
                    problem = _tensor_problem(t)
                    if problem:
                        raise ModelFormatError(f"{where}: {node.op_type} '{node.name}': {problem}")
        problem = _bn_param_problem(graph, inits)
        if problem:
            raise ModelFormatError(f"{where}: {problem}")


_SUBBYTE_TYPES = frozenset({21, 22, 23, 25, 26})  # UINT4, INT4, FLOAT4E2M1 and 2-bit types: packed


def _load_onnx(path: str, parsed: Any, lazy: bool = False) -> Any:
    """The ONNX model of ``path``: ``parsed`` (from format detection) with its external data loaded.

    With ``lazy``, external tensors are not read: each is checked (a regular file, opened through
    onnx's own path checks, the byte range inside the file and as long as the shape needs) and its
    ``location`` becomes the absolute path of that file. :mod:`bnfold.onnx.const` reads such a tensor
    when the fold asks for it, and :func:`save` copies the ones nobody changed from their file in
    chunks; so only the weights a fold rewrites are ever in memory. Such a model is for the fold job
    only (``onnx.save`` and onnxruntime would not follow absolute locations).
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    model = parsed
    base = os.path.dirname(os.path.abspath(path))
    for ref in _external_refs(model, base):
        try:
            st = os.stat(ref)
        except OSError as e:
            raise _fail(path, f"cannot load the ONNX model's external data ({os.path.basename(ref)}: "
                              f"{e.strerror or e})") from e
        if not stat.S_ISREG(st.st_mode):
            raise _fail(path, f"external data {os.path.basename(ref)} is not a regular file ({_file_kind(st.st_mode)})")
    if lazy and any(uses_external_data(t) for t in model.graph.initializer) and not _nested_external(model):
        _make_lazy(path, model, base)
    elif any(uses_external_data(t) for t in model.graph.initializer):
        try:
            load_external_data_for_model(model, base)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _fail(path, f"cannot load the ONNX model's external data ({msg})") from e
    elif _has_nested_external_data(model):
        try:
            model = onnx.load_model(path, load_external_data=True)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _fail(path, f"cannot load the ONNX model or its external data ({msg})") from e
    _check_onnx(path, model)
    return model


def _make_lazy(path: str, model: Any, base: str) -> None:
    """Point every external tensor of ``model`` at the absolute path of its checked data file."""
    import onnx
    from onnx.external_data_helper import (
        ExternalDataInfo,
        _get_all_tensors,
        _open_external_data_fd,
        uses_external_data,
    )

    for t in _get_all_tensors(model):
        if not uses_external_data(t):
            continue
        info = ExternalDataInfo(t)
        try:
            fd = _open_external_data_fd(base, info.location, t.name, True)  # onnx's checks: no escape from base
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _fail(path, f"cannot load the ONNX model's external data ({msg})") from e
        try:
            st = os.fstat(fd)
            real = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else None
        finally:
            os.close(fd)
        real = real or os.path.realpath(os.path.join(base, info.location))
        offset = int(info.offset or 0)
        length = int(info.length) if info.length is not None else st.st_size - offset
        n = 1
        for d in t.dims:
            n *= int(d)
        try:
            need = n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            need = length
        if t.data_type in _SUBBYTE_TYPES:
            need = length
        if offset < 0 or offset + length > st.st_size or length != need:
            raise _fail(path, f"external data of tensor '{t.name}' ({info.location}, offset {offset}, length "
                              f"{length}) does not fit its file ({st.st_size} bytes) or its shape ({need} bytes)")
        entries = {"location": real, "offset": str(offset), "length": str(length)}
        del t.external_data[:]
        for key, value in entries.items():
            entry = t.external_data.add()
            entry.key, entry.value = key, value


def _nested_external(model: Any) -> bool:
    """External tensors anywhere but in the main graph's initializers (the streamed writer's scope)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    in_main = sum(1 for t in model.graph.initializer if uses_external_data(t))
    return sum(1 for t in _get_all_tensors(model) if uses_external_data(t)) > in_main


def _has_nested_external_data(model: Any) -> bool:
    """External tensors outside the main graph's initializers (Constant nodes, subgraphs)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return any(uses_external_data(t) for t in _get_all_tensors(model))


def load(
    path: str | os.PathLike[str],
    *,
    model_factory: str | Callable[[], Any] | None = None,
    trust_pickle: bool = False,
) -> Any:
    """Load a model file of any supported format (detected from the content).

    Args:
        path: ``.onnx`` (external data next to it), ``.pt2`` (``torch.export.save``), TorchScript, or a
            ``torch.save`` checkpoint.
        model_factory: for a state_dict checkpoint: ``"module.path:factory"`` or a callable with no
            arguments that builds the architecture; the weights are loaded with ``strict=True``.
        trust_pickle: allow loading a whole pickled module (unpickling runs code from the file).

    Returns:
        ``onnx.ModelProto``, ``torch.export.ExportedProgram`` or ``torch.nn.Module`` (in eval mode when
        built from a state_dict).

    Raises:
        ModelFormatError: unreadable or unknown file, checker rejection, a state_dict without a factory
            or that does not fit it, a pickled module without ``trust_pickle``.
        OptionError: a factory string that does not resolve.
    """
    return load_with_format(path, model_factory=model_factory, trust_pickle=trust_pickle)[0]


def load_with_format(
    path: str | os.PathLike[str],
    *,
    model_factory: str | Callable[[], Any] | None = None,
    trust_pickle: bool = False,
    lazy_external_data: bool = False,
) -> tuple[Any, str]:
    """:func:`load`, also returning the detected format (the file is read and parsed once).

    ``lazy_external_data``: ONNX with external data: leave the weights in their files (absolute
    locations), read by the fold when needed and copied by :func:`save`; for a fold-and-save job that
    hands the model to nothing else (the fold job without verification).
    """
    loaded = load_file(path, model_factory=model_factory, trust_pickle=trust_pickle,
                       lazy_external_data=lazy_external_data)
    return loaded.model, loaded.format


@dataclass(frozen=True, slots=True)
class Loaded:
    """A model file after one sniff and one parse (what :func:`load_file` returns).

    Attributes:
        model: ``onnx.ModelProto``, ``torch.export.ExportedProgram`` or ``torch.nn.Module``.
        format: one of :data:`FORMATS`.
        path: the file, as given.
        example_inputs: a seeded batch of 2 from the factory's ``example_input_shape`` (a state_dict
            loaded with ``model_factory``); None otherwise.
        data_files: the external-data files the model reads (ONNX; absolute paths, first use first).
        size: bytes on disk, data files included (None when the file vanished meanwhile).
    """

    model: Any
    format: str
    path: str
    example_inputs: tuple[Any, ...] | None
    data_files: tuple[str, ...]
    size: int | None


def load_file(
    path: str | os.PathLike[str],
    *,
    model_factory: str | Callable[[], Any] | None = None,
    trust_pickle: bool = False,
    lazy_external_data: bool = False,
) -> Loaded:
    """Load a model file of any supported format: one sniff, one parse.

    Args:
        path: ``.onnx`` (external data next to it), ``.pt2`` (``torch.export.save``), or a
            ``torch.save`` checkpoint.
        model_factory: for a state_dict checkpoint: ``"module.path:factory"`` or a callable with no
            arguments that builds the architecture; its ``example_input_shape`` (no batch dimension),
            if any, gives :attr:`Loaded.example_inputs`.
        trust_pickle: allow loading a whole pickled module (unpickling runs code from the file).
        lazy_external_data: ONNX with external data: leave the weights in their files (absolute
            locations), read by the fold when needed and copied by :func:`save`; for a fold-and-save
            job that hands the model to nothing else.

    Returns:
        The :class:`Loaded` record.

    Raises:
        ModelFormatError: unreadable or unknown file, checker rejection, a state_dict without a factory
            or that does not fit it, a pickled module without ``trust_pickle``.
        OptionError: a factory string that does not resolve, or a factory that fails.
    """
    p = os.fspath(path)
    fmt, parsed = _sniff(p)
    data_files: tuple[str, ...] = ()
    if fmt == "onnx":
        # read from the parse before the load replaces the locations (lazy: absolute; eager: gone)
        data_files = tuple(r for r in _external_refs(parsed, os.path.dirname(os.path.abspath(p)))
                           if os.path.isfile(r))
    if fmt == "onnx" and lazy_external_data:
        model = _load_onnx(p, parsed, lazy=True)
    else:
        model = _load_as(p, fmt, parsed, model_factory, trust_pickle)
    examples = None
    if fmt == "state_dict":
        ex = getattr(model, "example_inputs", None)
        examples = tuple(ex) if isinstance(ex, (tuple, list)) else None
    return Loaded(model=model, format=fmt, path=p, example_inputs=examples, data_files=data_files,
                  size=_total_size([os.path.abspath(p), *data_files]) if os.path.exists(p) else None)


def _check_pt2_members(path: str) -> None:
    """A torch.export archive needs ``archive_version`` (torch otherwise logs a traceback and guesses)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except zipfile.BadZipFile as e:
        raise _fail(path, f"a truncated or corrupt zip archive ({e})") from e
    if not any(n == "archive_version" or n.endswith("/archive_version") for n in names):
        raise _fail(path, "a torch.export archive without archive_version: truncated or not written by "
                          "torch.export.save; export the model again")


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Keep a library's warning-level tracebacks off stderr: the failure becomes bnfold's one line."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_as(
    p: str, fmt: str, parsed: Any, model_factory: str | Callable[[], Any] | None, trust_pickle: bool
) -> Any:
    if fmt == "onnx":
        return _load_onnx(p, parsed)
    if fmt == "torchscript":
        # Recognised from the zip's member names; never handed to torch.jit.load, which runs the
        # archive's code. Its graph is compiled, so there is nothing bnfold could fold into anyway.
        raise _fail(p, "a TorchScript archive (torch.jit.save): bnfold does not load TorchScript (loading runs "
                       "code from the file); save the nn.Module (state_dict with --model, torch.export.save, or "
                       "ONNX) and fold that")
    import torch

    if fmt == "pt2":
        from . import pt2_guard

        _check_pt2_members(p)
        if not trust_pickle:
            pt2_guard.check_pt2(p)
        try:
            with _quiet_logger("torch.export"):
                program = torch.export.load(p)  # type: ignore[no-untyped-call]
        except Exception as e:
            raise _fail(p, f"cannot load the torch.export archive ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        if not trust_pickle:
            pt2_guard.check_program(p, program)
        return program
    if fmt == "pickled_module":
        if not trust_pickle:
            raise _fail(
                p,
                "a pickled PyTorch module (torch.save(model)); loading it unpickles, which runs arbitrary code "
                "from the file. If you trust the file, pass --trust-pickle (trust_pickle=True); otherwise save a "
                "state_dict and load it with --model module.path:factory",
            )
        try:
            # Unpickling imports the classes by module name: like `python` itself, find them in the
            # current folder too.
            _add_cwd_as_fallback()
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:
            raise _fail(p, f"cannot unpickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        if isinstance(obj, Mapping):
            obj = next((v for v in obj.values() if isinstance(v, torch.nn.Module)), obj)
        if not isinstance(obj, torch.nn.Module):
            raise _fail(p, f"the pickle holds a {type(obj).__name__}, not a torch.nn.Module")
        return obj
    # state_dict
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _fail(p, f"cannot load the checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    sd = _state_dict_of(p, obj)
    if model_factory is None:
        raise _fail(p, "a state_dict checkpoint (weights only): pass --model module.path:factory to build the "
                       "architecture (model_factory=...)")
    factory = resolve_factory(model_factory)
    try:
        model = factory()
    except Exception as e:
        raise OptionError(f"model factory {model_factory!r} failed ({type(e).__name__}: {e})") from e
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model factory {model_factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    own = set(model.state_dict())
    if not (set(sd) & own) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from DataParallel / DDP
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise _fail(p, f"does not fit the architecture built by {model_factory!r}: {'; '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        raise _fail(p, f"does not fit the architecture built by {model_factory!r}: "
                       f"{' '.join(str(e).split())[:300]}") from e
    shape = getattr(factory, "example_input_shape", None)
    if shape is not None and getattr(model, "example_inputs", None) is None:
        # The factory tells what one input looks like (no batch dimension): a seeded batch of 2, so
        # that jobs needing inputs (export, verification, bench) run without --input-shape.
        g = torch.Generator().manual_seed(0)
        model.example_inputs = (torch.randn(2, *shape, generator=g),)  # type: ignore[assignment]
    return model.eval()


# ---------------------------------------------------------------------------------------------- save


def _output_error(path: str, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({e.strerror or e})")


def _check_folder(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: output folder {folder} does not exist")
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a directory")
    return folder


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path in the destination's folder; move it to ``path`` on success.

    On any exception the temporary file is removed and the exception propagates; ``path`` is either
    left as it was or replaced whole (``os.replace`` is atomic on one file system).

    Raises:
        OutputError: the folder does not exist or is not writable.
    """
    dst = os.fspath(path)
    tmp = _temp_file(dst, _check_folder(dst))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, dst)
    except BaseException:
        _discard(tmp)
        raise


_DEFERRED_SIGNALS = frozenset(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)
)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back for a few system calls that must not be cut in two.

    Creating a temporary and recording its name, moving a data file and noting that it moved, and the
    clean-up itself: a signal handler that raises (as the CLI's do, and Python's for Ctrl-C) would
    otherwise leave a file nobody knows about. A signal that arrives meanwhile is delivered right
    after, where the clean-up of the ``except`` / ``finally`` around it runs.
    """
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or not _DEFERRED_SIGNALS:  # pragma: no cover - not POSIX
        yield
        return
    old = mask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def _discard(path: str | None) -> None:
    """Remove the file ``path`` (None: nothing) if it exists, as one step that a signal cannot cut."""
    with _signals_deferred():
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of an existing file, following links; None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_REFS_CACHE: dict[tuple[str, int, int, int, int], tuple[str, ...]] = {}
_REFS_CACHE_SIZE = 32
_REFS_LOCK = threading.Lock()


def _file_key(path: str) -> tuple[str, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _external_refs(model: Any, base: str) -> tuple[str, ...]:
    """Absolute paths of the external-data files the tensors of ``model`` (not loaded) point at."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    found: dict[str, None] = {}
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            for entry in t.external_data:
                if entry.key == "location":
                    found[os.path.abspath(os.path.join(base, entry.value))] = None
    return tuple(found)


def _remember_refs(path: str, parsed: Any) -> None:
    """Note which external files the ONNX file ``path`` reads, while its tensors still say so."""
    _cache_refs(_file_key(path), _external_refs(parsed, os.path.dirname(os.path.abspath(path))))


def _cache_refs(key: tuple[str, int, int, int, int] | None, refs: tuple[str, ...]) -> None:
    if key is None:
        return
    with _REFS_LOCK:  # loads and saves may run in threads
        while len(_REFS_CACHE) >= _REFS_CACHE_SIZE:
            _REFS_CACHE.pop(next(iter(_REFS_CACHE)))
        _REFS_CACHE[key] = refs


def _onnx_refs(path: str, *, max_parse: int | None = None) -> tuple[str, ...]:
    """External-data files of the ONNX file ``path`` (absolute); () if it is not a readable ONNX file.

    With ``max_parse``, a file larger than that is not parsed (it is then taken to reference nothing).
    """
    key = _file_key(path)
    if key is None:
        return ()
    hit = _REFS_CACHE.get(key)
    if hit is not None:
        return hit
    if max_parse is not None and key[3] > max_parse:
        return ()
    try:
        size = _check_readable(path)
        with open(path, "rb") as f:
            if f.read(4) == _ZIP_MAGIC or _onnx_wire_problem(path, size) is not None:
                return ()
        import onnx

        parsed = onnx.load_model(path, load_external_data=False)
    except Exception:  # not ONNX, unreadable: it reads no other file
        return ()
    refs = _external_refs(parsed, os.path.dirname(os.path.abspath(path)))
    _cache_refs(key, refs)
    return refs


def files_read_by(path: str | os.PathLike[str]) -> list[str]:
    """The files that loading the model at ``path`` reads: the file itself, then (ONNX) every
    external-data file its tensors reference, as absolute paths (the data files need not exist).

    Cheap after :func:`load` / :func:`detect_format` of the same unchanged file (remembered then);
    otherwise an ONNX file is parsed once without its external data.
    """
    p = os.path.abspath(os.fspath(path))
    return [p, *(r for r in _onnx_refs(p) if r != p)]


def file_size_with_data(path: str | os.PathLike[str]) -> int | None:
    """Bytes on disk of a model: the file plus every distinct external-data file it references.

    Returns:
        The total, or None if ``path`` does not exist. Missing data files count 0.
    """
    p = os.path.abspath(os.fspath(path))
    if not os.path.exists(p):
        return None
    # A size is not worth a full parse: see _MAX_OLD_PARSE.
    return _total_size([p, *_onnx_refs(p, max_parse=_MAX_OLD_PARSE)])


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
        input_files: every file the input reads, from :func:`files_read_by` after loading. Without it,
            an ONNX ``src`` is parsed for its data files only when it is small (16 MiB at most) or was
            loaded already, so that this check stays cheap before the load; call it again after
            loading with ``input_files=files_read_by(src)`` for the exact answer.

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
             else [s, *_onnx_refs(s, max_parse=_MAX_OLD_PARSE)])
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


# A file not loaded or saved by this process is parsed for its external-data files only when it is at
# most this large: the protobuf of a model with external data is small (its weights are elsewhere), and
# a larger file is an inline model that reads nothing else; parsing it would be a second full read.
_MAX_OLD_PARSE = 16 * 2**20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer


def _field_header(number: int, size: int) -> bytes:
    return _varint((number << 3) | 2) + _varint(size)


def _copy_field(src: Any, dst: Any, field: Any) -> None:
    """Copy one field of protobuf message ``src`` into ``dst`` (same message type)."""
    if field.is_repeated:
        getattr(dst, field.name).extend(getattr(src, field.name))
    elif field.message_type is not None:
        getattr(dst, field.name).CopyFrom(getattr(src, field.name))
    else:
        setattr(dst, field.name, getattr(src, field.name))


def _single_field(msg: Any, field: Any) -> Any:
    """A message of ``msg``'s type holding only ``field`` (a small copy: no weights are in it)."""
    part = type(msg)()
    _copy_field(msg, part, field)
    return part


def _lazy_source(t: Any) -> tuple[str, int, int] | None:
    """(file, offset, length) of a tensor left in its file by a lazy load (absolute location); else None."""
    if t.data_location != t.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not os.path.isabs(loc):
        return None
    return loc, int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)


_COPY_CHUNK = 64 * 2**20


def _copy_range(src: str, offset: int, length: int, out: Any) -> None:
    """Copy ``length`` bytes at ``offset`` of file ``src`` to ``out``, 64 MiB at a time."""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise OSError(f"{src} is shorter than its tensors say (truncated while folding?)")
            out.write(chunk)
            left -= len(chunk)


def _external_tensor(t: Any, data: Any, location: str) -> Any:
    """A copy of tensor ``t`` without its bytes, pointing at them in ``data`` (written here)."""
    import onnx
    from onnx import numpy_helper

    offset = data.tell()
    lazy = _lazy_source(t)
    if lazy is not None:
        _copy_range(*lazy, data)
        length = lazy[2]
    else:
        raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        data.write(raw)
        length = len(raw)
        del raw
    ext = onnx.TensorProto()
    ext.name = t.name
    ext.dims.extend(t.dims)
    ext.data_type = t.data_type
    if t.doc_string:
        ext.doc_string = t.doc_string
    ext.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = ext.external_data.add()
        entry.key, entry.value = key, value
    return ext


def _inline_tensor(t: Any) -> Any:
    """A lazily loaded tensor with its bytes read in (for a save without external data)."""
    import onnx

    src, offset, length = _lazy_source(t)  # type: ignore[misc]
    out = onnx.TensorProto()
    out.name, out.data_type = t.name, t.data_type
    out.dims.extend(t.dims)
    if t.doc_string:
        out.doc_string = t.doc_string
    with open(src, "rb") as f:
        f.seek(offset)
        out.raw_data = f.read(length)
    return out


def _tensor_nbytes(t: Any) -> int:
    """Bytes of a tensor's values from its shape and type (``ByteSize()`` serialises, and fails at 2 GiB)."""
    import onnx

    n = 1
    for d in t.dims:
        n *= int(d)
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return n * 8


def _serialise(msg: Any, what: str) -> bytes:
    """``msg.SerializeToString()``; a part over protobuf's 2 GiB limit is an :class:`OutputError`."""
    try:
        return msg.SerializeToString()  # type: ignore[no-any-return]
    except Exception as e:  # EncodeError / ValueError from protobuf past 2 GiB
        raise _PartTooLarge(f"cannot write {what}: one protobuf message over 2 GiB ({type(e).__name__}); "
                            "large constants must be initializers to go to external data") from e


class _PartTooLarge(Exception):
    """A part of the model that protobuf cannot serialise (becomes an OutputError naming the path)."""


def _write_onnx_stream(model: Any, f: Any, data: Any | None, location: str) -> None:
    """Serialise ``model`` to file ``f`` one initializer at a time, without one big bytes copy.

    Protobuf lets a message's fields come in any order and concatenates repeated fields, so the
    model is written as: every ModelProto field but ``graph``; then ``graph`` as its fields but
    ``initializer``, followed by each initializer. The file parses to the same ModelProto. Peak memory
    is the model plus one tensor (``SerializeToString`` would hold a second copy of every weight).
    With ``data`` (an open file), initializers of 1 KiB or more go there as external data.
    """
    for field, _ in model.ListFields():
        if field.number != _GRAPH_FIELD:
            f.write(_single_field(model, field).SerializeToString())
    if not model.HasField("graph"):
        return
    graph = model.graph
    inits = []
    for t in graph.initializer:
        if data is not None and (_lazy_source(t) is not None
                                 or t.data_location != t.EXTERNAL and _tensor_nbytes(t) >= 1024):
            t = _external_tensor(t, data, location)
        inits.append(t)
    # The graph's length comes first on the wire but is known only after the initializers are
    # serialised (upb's ByteSize serialises too): write a fixed-width length and fill it in at the end.
    # A varint padded with continuation bytes is valid protobuf and parses to the same value.
    f.write(_varint((_GRAPH_FIELD << 3) | 2))
    at = f.tell()
    f.write(bytes(_LEN_WIDTH))
    total = 0
    for field, _ in graph.ListFields():
        if field.number == _INITIALIZER_FIELD:
            continue
        if field.is_repeated and field.message_type is not None:
            # one record per element (nodes, value_info...): repeated fields concatenate on the wire,
            # and no message larger than one element is ever built
            for item in getattr(graph, field.name):
                b = _serialise(item, field.name)
                hdr = _field_header(field.number, len(b))
                f.write(hdr)
                f.write(b)
                total += len(hdr) + len(b)
        else:
            b = _serialise(_single_field(graph, field), field.name)
            f.write(b)
            total += len(b)
    for t in inits:
        if _lazy_source(t) is not None:  # saved without external data: read in, one tensor at a time
            t = _inline_tensor(t)
        b = _serialise(t, f"initializer '{t.name}'")
        hdr = _field_header(_INITIALIZER_FIELD, len(b))
        f.write(hdr)
        f.write(b)
        total += len(hdr) + len(b)
        del b
    end = f.tell()
    f.seek(at)
    f.write(_padded_varint(total))
    f.seek(end)


_LEN_WIDTH = 5  # bytes: lengths up to 2**35 - 1


def _padded_varint(n: int) -> bytes:
    """``n`` as a varint of exactly :data:`_LEN_WIDTH` bytes (continuation bits on all but the last)."""
    out = bytearray()
    for i in range(_LEN_WIDTH):
        b = (n >> (7 * i)) & 0x7F
        out.append(b | (0x80 if i < _LEN_WIDTH - 1 else 0))
    return bytes(out)


def _weight_bytes(model: Any) -> int:
    """The initializers' size from their shapes and dtypes (upb's ByteSize() would serialise them)."""
    import onnx

    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= int(d)
        try:
            item = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            item = 8
        total += n * item
    return total


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself: bnfold saves into one folder take turns.

    Needed for the model + data pair: deciding the data file's name, the renames and the removal of
    the old data must not interleave with another process saving the same output. The lock is on the
    folder's descriptor, so no lock file is left behind; where ``flock`` is unavailable the save runs
    unlocked (the renames are still ordered so that a reader never sees a model without its data).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("no lock on %s (%s): saving unlocked", folder, e)
        yield
    finally:
        os.close(fd)  # releases the lock


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


def _read_in_nested_lazy(model: Any) -> None:
    """Lazily loaded tensors that a rewrite moved out of the main graph's initializers (the streamed
    writer's scope) get their bytes read in, so that no absolute location is ever written."""
    from onnx.external_data_helper import _get_all_tensors

    main = sum(1 for t in model.graph.initializer if _lazy_source(t) is not None)
    if sum(1 for t in _get_all_tensors(model) if _lazy_source(t) is not None) == main:
        return
    for i, g in enumerate(_graphs(model.graph)):  # the main graph comes first
        tensors = [a.t for n in g.node for a in n.attribute if a.HasField("t")]
        tensors += [t for n in g.node for a in n.attribute for t in a.tensors]
        if i:
            tensors += list(g.initializer)
        for t in tensors:
            if _lazy_source(t) is not None:
                t.CopyFrom(_inline_tensor(t))


def _stage_onnx(model: Any, dst: str, external_data: bool | None,
                protect_ids: set[tuple[int, int]]) -> tuple[Staged, Callable[[], None]]:
    """Write an ONNX model to temporary files next to ``dst``; return them and their clean-up.

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
        tmp = _temp_file(dst, folder)
        try:
            try:
                with open(tmp, "wb") as f:
                    _write_onnx_stream(model, f, None, "")
            except OSError as e:
                raise _output_error(dst, e) from e
            except _PartTooLarge as e:
                raise OutputError(f"{dst}: {e}") from e
        except BaseException:
            _discard(tmp)
            raise

        def commit_inline() -> None:
            os.chmod(tmp, _umask_mode())
            with _folder_lock(folder):
                old_refs = _onnx_refs(dst, max_parse=_MAX_OLD_PARSE) if os.path.lexists(dst) else ()
                with _signals_deferred():
                    os.replace(tmp, dst)
                _remove_old_data(dst, old_refs, None, protect_ids)
                _remember_saved(dst, ())

        return Staged(tmp, (), _commit=commit_inline, _target=dst), lambda: _discard(tmp)
    location = _choose_data_name(dst)
    work = _write_pair_staged(model, dst, folder, location)
    tmp_model, tmp_data = os.path.join(work, "model.onnx"), os.path.join(work, location)
    has_data = os.path.exists(tmp_data)

    def cleanup() -> None:
        with _signals_deferred():
            shutil.rmtree(work, ignore_errors=True)

    def commit_pair() -> None:
        _commit_pair(dst, folder, location, tmp_model, tmp_data if has_data else None, protect_ids)
        cleanup()  # the folder, now empty

    return Staged(tmp_model, (tmp_data,) if has_data else (), _commit=commit_pair, _target=dst), cleanup


def _temp_file(dst: str, folder: str) -> str:
    """A fresh empty temporary file next to ``dst`` (``.<name>.*.tmp<suffix>``), created atomically."""
    name = os.path.basename(dst)
    suffix = "".join(Path(name).suffixes[-1:])
    with _signals_deferred():  # a signal between creating the file and knowing its name leaks it
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
        except OSError as e:
            raise _output_error(dst, e) from e
        os.close(fd)
    return tmp


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


def _remember_saved(dst: str, refs: tuple[str, ...]) -> None:
    """What the file just written reads (so a size or a check after the save does not parse it)."""
    _cache_refs(_file_key(dst), refs)


def _write_pair_staged(model: Any, dst: str, folder: str, location: str) -> str:
    """Write model + data into a new temporary folder next to ``dst``; return the folder.

    The folder holds ``model.onnx`` and (when a tensor of 1 KiB or more exists) its data under the
    final name ``location``, so the model loads from there as it is. On any exception (disk full,
    Ctrl-C, SIGTERM turned into an exception) the folder is removed.
    """
    name = os.path.basename(dst)
    work: str | None = None
    try:
        with _signals_deferred():
            try:
                work = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            except OSError as e:
                raise _output_error(dst, e) from e
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
    except BaseException:
        with _signals_deferred():
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        raise
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
        old_refs = _onnx_refs(dst, max_parse=_MAX_OLD_PARSE) if os.path.lexists(dst) else ()
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
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        staged, cleanup = _stage_onnx(model, dst, external_data, protect_ids)
    else:
        staged, cleanup = _stage_torch(model, dst, fmt, protect_ids)
    try:
        yield staged
    finally:
        if not staged.committed:
            cleanup()


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


def _stage_torch(model: Any, dst: str, fmt: str | None,
                 protect_ids: set[tuple[int, int]]) -> tuple[Staged, Callable[[], None]]:
    """Write a PyTorch model to a temporary file next to ``dst``; return it and its clean-up."""
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
    tmp = _temp_file(dst, folder)
    try:
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
    except BaseException:
        _discard(tmp)
        raise

    def commit() -> None:
        os.chmod(tmp, _umask_mode())
        with _signals_deferred():
            os.replace(tmp, dst)

    return Staged(tmp, (), _commit=commit, _target=dst), lambda: _discard(tmp)
