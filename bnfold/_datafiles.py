"""External-data files of ONNX models, and model sizes on disk that count them.

Rules:
    * an ONNX file's external-data files are found from its initializers' ``external_data`` entries
      (``location``), read by walking the protobuf field headers and seeking past every payload: a few
      bytes per tensor are read, never the weights, so a 100 MB inline model costs well under a
      millisecond (a parse or a byte scan would read it all);
    * only the main graph's initializers are walked (bnfold writes external data only there);
    * a size is the file's plus, for ONNX, every distinct existing data file it references.

Nothing here imports onnx, torch or onnxruntime.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["onnx_data_files", "model_size"]


def _varint(f: Any) -> int | None:
    """One protobuf varint from ``f``; None at the end of the file."""
    shift = 0
    result: int = 0
    while True:
        b: bytes = f.read(1)
        if not b:
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(f: Any, end: int) -> Iterator[tuple[int, int, int]]:
    """``(field number, wire type, value or length)`` of each field up to offset ``end``; a
    length-delimited field's bytes are left for the caller to read or skip (``f`` stands at them)."""
    while f.tell() < end:
        tag = _varint(f)
        if tag is None:
            return
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value = _varint(f)
            if value is None:
                return
        elif wire == 1:
            f.seek(8, os.SEEK_CUR)
            value = 0
        elif wire == 5:
            f.seek(4, os.SEEK_CUR)
            value = 0
        elif wire == 2:
            length = _varint(f)
            if length is None:
                return
            value = length
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


_GRAPH, _INITIALIZER, _EXTERNAL_DATA = 7, 5, 13
"""ModelProto.graph, GraphProto.initializer, TensorProto.external_data (onnx.proto field numbers)."""


def _locations(f: Any, size: int) -> list[str]:
    """The ``location`` of every external initializer of the main graph: a walk over the field headers
    that seeks past every payload (weights included), so it reads a few bytes per tensor, not the file."""
    out: list[str] = []
    for number, wire, length in _fields(f, size):
        if wire != 2:
            continue
        start = f.tell()
        if number == _GRAPH:
            for gnum, gwire, glen in _fields(f, start + length):
                gstart = f.tell()
                if gwire == 2 and gnum == _INITIALIZER:
                    for tnum, twire, tlen in _fields(f, gstart + glen):
                        tstart = f.tell()
                        if twire == 2 and tnum == _EXTERNAL_DATA:
                            entry = f.read(tlen)
                            key, value = _entry(entry)
                            if key == "location" and value:
                                out.append(value)
                        if twire == 2:
                            f.seek(tstart + tlen)
                if gwire == 2:
                    f.seek(gstart + glen)
        f.seek(start + length)
    return out


def _entry(data: bytes) -> tuple[str, str]:
    """A StringStringEntryProto's ``(key, value)``."""
    import io as _io

    buf = _io.BytesIO(data)
    key = value = ""
    for number, wire, length in _fields(buf, len(data)):
        if wire == 2:
            text = buf.read(length).decode("utf-8", "replace")
            if number == 1:
                key = text
            elif number == 2:
                value = text
    return key, value


def onnx_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file's initializers reference (resolved, existing), in first-use order.

    Reads the field headers only (see :func:`_locations`): cheap for a 100 MB inline model too. A file
    that is not a well-formed protobuf has none.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            locations = _locations(f, size)
    except (OSError, ValueError):
        return []
    folder = path.resolve().parent
    seen: dict[Path, None] = {}
    for loc in locations:
        data = (folder / loc).resolve()
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

