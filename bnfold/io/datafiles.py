"""Which external-data files an ONNX model reads: one walker over every tensor, without the payloads.

A ``TensorProto`` can sit in these places of a model (``onnx.proto`` field numbers); the walk follows
exactly this table, on a file (its protobuf field headers, seeking past every payload) or on a parsed
``ModelProto`` (the same fields by name):

    ==================== ==========================================================================
    message              fields walked (number name -> message)
    ==================== ==========================================================================
    ModelProto           7 graph, 20 training_info, 25 functions
    TrainingInfoProto    1 initialization, 2 algorithm (graphs)
    GraphProto           1 node, 5 initializer, 15 sparse_initializer
    FunctionProto        7 node
    NodeProto            5 attribute
    AttributeProto       5 t, 6 g, 10 tensors, 11 graphs, 22 sparse_tensor, 23 sparse_tensors
    SparseTensorProto    1 values, 2 indices (tensors)
    TensorProto          13 external_data (entries: 1 key, 2 value), 14 data_location (1: EXTERNAL)
    ==================== ==========================================================================

Rules:
    * a tensor reads a file when its ``data_location`` is EXTERNAL and an entry names a ``location``
      (what onnx and onnxruntime follow); locations come back once each, in the order protobuf
      writes the fields (a graph's nodes before its initializers), relative to the model's folder;
    * no payload is read: a file up to 8 MiB (the model file of a model with external data) is read
      whole, a larger one (an inline model) in 4 KiB windows around its field headers; either way
      about 10 us per tensor (ResNet-50: ~12 ms, inline or not); a file that is not a well-formed
      protobuf raises ``ValueError``;
    * what a file just loaded or saved by this process reads is remembered (keyed by resolved path,
      device, inode, size and mtime), so that the output checks after a load do not walk it again;
    * a size is the file's plus every distinct existing data file it references.

Nothing here imports onnx, torch or onnxruntime.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_KEY",
    "FileBytes",
    "absolute",
    "data_refs",
    "fields",
    "file_key",
    "model_locations",
    "model_size",
    "onnx_data_files",
    "read_locations",
    "read_record",
    "remember",
    "remembered",
    "walk_graphs",
]

_TENSOR = "Tensor"
# message -> {field number: (field name, message it holds)}; see the module docstring. In field-number
# order, the order protobuf writes them in, so that the walk of a file and of a parsed model agree.
_SCHEMA: dict[str, dict[int, tuple[str, str]]] = {
    "Model": {7: ("graph", "Graph"), 20: ("training_info", "TrainingInfo"), 25: ("functions", "Function")},
    "TrainingInfo": {1: ("initialization", "Graph"), 2: ("algorithm", "Graph")},
    "Graph": {1: ("node", "Node"), 5: ("initializer", _TENSOR), 15: ("sparse_initializer", "Sparse")},
    "Function": {7: ("node", "Node")},
    "Node": {5: ("attribute", "Attribute")},
    "Attribute": {
        5: ("t", _TENSOR),
        6: ("g", "Graph"),
        10: ("tensors", _TENSOR),
        11: ("graphs", "Graph"),
        22: ("sparse_tensor", "Sparse"),
        23: ("sparse_tensors", "Sparse"),
    },
    "Sparse": {1: ("values", _TENSOR), 2: ("indices", _TENSOR)},
}
_EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 13, 14, 1  # TensorProto fields; DataLocation.EXTERNAL
_NOT_ONNX_FIRST_BYTES = (0x50, 0x80)  # "PK" of a zip (torch.save, .pt2), a pickle's PROTO opcode
_WHOLE_FILE = (
    8 * 2**20
)  # bytes: a file up to this size is read whole (the headers of a model with external data)
_MAX_DEPTH = 64  # nested graphs; protobuf's own parser stops at 100 levels of messages


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``buf[pos]``; ValueError if it runs past ``end``."""
    n = shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
    raise ValueError("truncated varint")


def fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value or length, position of the payload)`` of each field of the
    message in ``buf[pos:end]``; a length-delimited payload is ``buf[payload:payload + length]``.

    Raises:
        ValueError: a malformed tag, a group, or a field that runs past ``end``.
    """
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:  # one-byte varints (tags and lengths of small fields): the common case, inline
            pos += 1
        else:
            tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
            continue
        if wire == 2:
            value = buf[pos] if pos < end else 0x80
            if value < 0x80:
                pos += 1
            else:
                value, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            value = 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos + value > end:
            raise ValueError("a field runs past the end")
        yield number, wire, value, pos
        pos += value


def _walk(buf: Any, pos: int, end: int, kind: str, out: dict[str, None], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("graphs nested too deep")
    children = _SCHEMA[kind]
    for number, wire, length, at in fields(buf, pos, end):
        if wire != 2 or number not in children:
            continue
        child = children[number][1]
        if child == _TENSOR:
            _tensor(buf, at, at + length, out)
        else:
            _walk(buf, at, at + length, child, out, depth + 1)


def _tensor(buf: Any, pos: int, end: int, out: dict[str, None]) -> None:
    locations: list[str] = []  # every "location" entry: onnx reads the last, a reader might take the first
    external = False
    for number, wire, value, at in fields(buf, pos, end):
        if number == _DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif number == _EXTERNAL_DATA and wire == 2:
            key = text = ""
            for n, w, length, p in fields(buf, at, at + value):
                if w == 2 and n in (1, 2):
                    s = bytes(buf[p : p + length]).decode("utf-8", "replace")
                    key, text = (s, text) if n == 1 else (key, s)
            if key == "location" and text:
                locations.append(text)
    if external:
        for loc in locations:
            out.setdefault(loc, None)


class FileBytes:
    """``buf[i]`` and ``buf[a:b]`` over an open file, read in small windows where they are asked for.

    The walk touches headers only and jumps over payloads, so a window is read near each header and
    nothing else; a file that shrinks meanwhile gives ``ValueError``, never a crash (as a memory map
    of a truncated file would).
    """

    _WINDOW = 4096

    def __init__(self, f: Any) -> None:
        self._f, self._start, self._data = f, 0, b""

    def _load(self, pos: int, need: int) -> None:
        self._f.seek(pos)
        self._start, self._data = pos, self._f.read(max(self._WINDOW, need))

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            a, b = index.start, index.stop
            if not (self._start <= a and b <= self._start + len(self._data)):
                self._load(a, b - a)
            if b - self._start > len(self._data):
                raise ValueError("the file ended early")
            return self._data[a - self._start : b - self._start]
        i = index - self._start
        if not 0 <= i < len(self._data):
            self._load(index, 1)
            i = 0
            if not self._data:
                raise ValueError("the file ended early")
        return self._data[i]


def read_locations(path: str | os.PathLike[str]) -> list[str]:
    """The ``location`` of every external tensor of the ONNX file ``path``, in first-use order.

    Raises:
        OSError: the file cannot be opened.
        ValueError: not a regular file, or not a well-formed protobuf along the walked fields.
    """
    out: dict[str, None] = {}
    # non-blocking: a FIFO put where a model was must not hang the walk
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        # a model with external data is small: read it whole; a large one is inline, walk it in windows
        buf: Any = f.read() if st.st_size <= _WHOLE_FILE else FileBytes(f)
        size = len(buf) if isinstance(buf, bytes) else st.st_size
        if size and buf[0] in _NOT_ONNX_FIRST_BYTES:
            raise ValueError("a zip archive or a pickle, not ONNX")
        _walk(buf, 0, size, "Model", out, 0)
    return list(out)


RECORD_KEY = "bnfold.external_data"
"""``metadata_props`` key of the record bnfold writes into a model with external data: a JSON object
``{"location": <data file name>, "bytes": <size>, "sha256": <hex digest of its bytes>}`` (see
:mod:`bnfold.io.paths`: the proof that bnfold wrote that data file for that model)."""
_METADATA_PROPS = 14  # ModelProto.metadata_props; StringStringEntryProto: 1 key, 2 value


def read_record(path: str | os.PathLike[str]) -> str | None:
    """The value of the last :data:`RECORD_KEY` entry of the ONNX file ``path``'s ``metadata_props``.

    Only the top-level fields are walked (the graph is skipped whole). None if there is none, or the
    file is not a readable, regular, well-formed protobuf.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            buf: Any = f.read() if st.st_size <= _WHOLE_FILE else FileBytes(f)
            size = len(buf) if isinstance(buf, bytes) else st.st_size
            found: str | None = None
            for number, wire, length, at in fields(buf, 0, size):
                if number != _METADATA_PROPS or wire != 2:
                    continue
                key = value = ""
                for n, w, ln, p in fields(buf, at, at + length):
                    if w == 2 and n in (1, 2):
                        text = bytes(buf[p : p + ln]).decode("utf-8", "replace")
                        key, value = (text, value) if n == 1 else (key, text)
                if key == RECORD_KEY:
                    found = value
            return found
    except (OSError, ValueError):
        return None


def model_locations(model: Any) -> list[str]:
    """:func:`read_locations` for a parsed ``onnx.ModelProto`` (the same table, fields by name)."""
    out: dict[str, None] = {}
    _walk_message(model, "Model", out)
    return list(out)


def _walk_message(msg: Any, kind: str, out: dict[str, None]) -> None:
    for name, child in _SCHEMA[kind].values():
        value = getattr(msg, name)
        items = value if not hasattr(value, "ListFields") else ([value] if msg.HasField(name) else [])
        for item in items:
            if child != _TENSOR:
                _walk_message(item, child, out)
            elif item.data_location == _EXTERNAL:
                for e in item.external_data:
                    if e.key == "location" and e.value:
                        out.setdefault(e.value, None)


def walk_graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from walk_graphs(attr.g)
            for sub in attr.graphs:
                yield from walk_graphs(sub)


# ---------------------------------------------------------------------- remembered answers per file

_Key = tuple[str, int, int, int, int]
_CACHE: dict[_Key, tuple[str, ...]] = {}
_CACHE_SIZE = 32
_LOCK = threading.Lock()


def file_key(path: str) -> _Key | None:
    """(resolved path, device, inode, size, mtime) of an existing file: changes when the file does."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remembered(key: _Key | None) -> tuple[str, ...] | None:
    """The data files noted for the file version ``key``; None if not noted."""
    return None if key is None else _CACHE.get(key)


def remember(key: _Key | None, refs: tuple[str, ...]) -> None:
    """Note that the file version ``key`` reads ``refs`` (absolute paths)."""
    if key is None:
        return
    with _LOCK:  # loads and saves may run in threads
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = refs


def data_refs(path: str) -> tuple[str, ...]:
    """Absolute paths of the external-data files the ONNX file ``path`` reads (existing or not).

    Remembered per file version (a file just loaded or saved is not walked again); () for a file
    that is not a readable, well-formed ONNX protobuf (it reads no other file).
    """
    key = file_key(path)
    if key is None:
        return ()
    hit = remembered(key)
    if hit is not None:
        return hit
    try:
        locations = read_locations(path)
    except (OSError, ValueError):
        return ()
    refs = absolute(os.path.dirname(os.path.abspath(path)), locations)
    remember(key, refs)
    return refs


def absolute(base: str, locations: Iterable[str]) -> tuple[str, ...]:
    """``locations`` (relative to the folder ``base``) as absolute paths, each once."""
    return tuple(dict.fromkeys(os.path.abspath(os.path.join(base, loc)) for loc in locations))


# ------------------------------------------------------------------------- the file layer's answers


def onnx_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file reads (resolved, existing), in first-use order.

    Every tensor counts (nested graphs and node attributes too); only the headers are read. A file
    that is not a well-formed protobuf has none.
    """
    seen: dict[Path, None] = {}
    for ref in data_refs(os.fspath(path)):
        data = Path(ref).resolve()
        if data.is_file():
            seen.setdefault(data, None)
    return list(seen)


def model_size(path: Path, fmt: str | None = None) -> int | None:
    """Bytes on disk of a model: the file plus, for ONNX, every external-data file it references."""
    try:
        total = path.stat().st_size
    except OSError:
        return None
    if fmt == "onnx" or (fmt is None and path.suffix.lower() == ".onnx"):
        total += sum(f.stat().st_size for f in onnx_data_files(path))
    return total
