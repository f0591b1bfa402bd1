"""Reading ``.safetensors`` weights as a state_dict, without pickle and without trusting the header.

The format (huggingface/safetensors): 8 bytes little-endian ``N``, ``N`` bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data,
each tensor's bytes at ``8 + N + begin``, little-endian, C order.

Rules: the ``safetensors`` package is used when it is installed; otherwise this module reads the file
itself. Either way the header is checked first (its size against the file, each tensor's dtype,
shape, and offsets against the data: inside it, of the size shape and dtype need, not overlapping),
so a crafted header can neither make bnfold read past the file nor allocate more than the file
holds. Nothing here unpickles or runs code.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from bnfold.errors import ModelFormatError

__all__ = ["looks_like_safetensors", "read_safetensors", "MAX_HEADER"]

MAX_HEADER = 100 * 2**20
"""The largest header accepted (the safetensors package's own limit)."""

_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


def looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file starting with ``head`` (at least 9 bytes) of ``size`` bytes is safetensors."""
    if len(head) < 9 or size < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(size - 8, MAX_HEADER) and head[8:9] == b"{"


def _fail(path: str, problem: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: a .safetensors file with {problem}")


def _header(path: str, f: Any, size: int) -> tuple[int, dict[str, tuple[str, list[int], int, int]]]:
    """``(data start, {name: (torch dtype name, shape, begin, end)})``, every entry checked."""
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= min(size - 8, MAX_HEADER):
        raise _fail(path, f"a header of {n} bytes in a file of {size}")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"a header that is not JSON ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise _fail(path, "a header that is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, tuple[str, list[int], int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _fail(path, f"a bad entry for {name!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise _fail(path, f"an unknown dtype {dtype!r} for {name!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(path, f"a bad shape for {name!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _fail(path, f"bad data_offsets for {name!r}")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end <= data_len or end - begin != count * _DTYPES[dtype][1]:
            raise _fail(
                path,
                f"data_offsets {offsets} for {name!r} that do not fit its shape {shape} and "
                f"dtype {dtype} inside the {data_len} bytes of data",
            )
        out[name] = (_DTYPES[dtype][0], shape, begin, end)
    spans = sorted((b, e, k) for k, (_, _, b, e) in out.items() if e > b)
    for (_, e1, k1), (b2, _, k2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise _fail(path, f"tensors {k1!r} and {k2!r} that overlap")
    return 8 + n, out


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The tensors of a ``.safetensors`` file, ``{name: torch.Tensor}`` (see the module rules).

    Raises:
        ModelFormatError: a header that does not describe the file (one line naming it).
    """
    import torch

    p = os.fspath(path)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start, entries = _header(p, f, size)
        try:
            from safetensors.torch import load_file  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            load_file = None
        if load_file is not None:  # the header is checked: the package reads what was described
            return dict(load_file(p, device="cpu"))
        out: dict[str, Any] = {}
        for name, (dtype_name, shape, begin, end) in entries.items():
            dtype = getattr(torch, dtype_name, None)
            if dtype is None:
                raise _fail(p, f"dtype {dtype_name} for {name!r}, which this torch does not have")
            if end == begin:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            f.seek(start + begin)
            data = bytearray(f.read(end - begin))
            if len(data) != end - begin:
                raise _fail(p, f"data for {name!r} cut short (the file is truncated)")
            t = torch.frombuffer(data, dtype=dtype).reshape(shape)
            if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - little-endian hosts
                t = t.view(torch.uint8).reshape(*shape, t.element_size()).flip(-1).contiguous().view(dtype)
                t = t.reshape(shape)
            out[name] = t
    return out
