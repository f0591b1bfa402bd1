"""The protobuf wire-format writer for ONNX models: one initializer at a time, never the whole model.

Protobuf lets a message's fields come in any order and concatenates repeated fields, so a model is
written as every ModelProto field but ``graph``, then ``graph`` as its fields but ``initializer``,
then each initializer. The graph's length, needed first, is written as a fixed-width varint (padded
with continuation bytes, which is valid protobuf) and filled in at the end. Nothing here calls
``ByteSize()`` or serialises a whole model (protobuf stops at 2 GiB, and upb serialises to size).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

from .datafiles import walk_graphs

__all__ = [
    "tensor_nbytes",
    "spilling",
    "spillable",
    "spill_tensor",
    "PartTooLarge",
    "copy_field",
    "field_header",
    "read_in_nested_lazy",
    "weight_bytes",
    "write_onnx_stream",
]


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


def field_header(number: int, size: int) -> bytes:
    return _varint((number << 3) | 2) + _varint(size)


def copy_field(src: Any, dst: Any, field: Any) -> None:
    """Copy one field of protobuf message ``src`` into ``dst`` (same message type)."""
    if field.is_repeated:
        getattr(dst, field.name).extend(getattr(src, field.name))
    elif field.message_type is not None:
        getattr(dst, field.name).CopyFrom(getattr(src, field.name))
    else:
        value = getattr(src, field.name)
        if isinstance(value, bytes) and field.type == field.TYPE_STRING:
            # Not valid UTF-8 (protobuf then gives bytes; onnx accepts such names): a setter would
            # decode it, so the field is merged in as its wire encoding.
            dst.MergeFromString(field_header(field.number, len(value)) + value)
        else:
            setattr(dst, field.name, value)


def _single_field(msg: Any, field: Any) -> Any:
    """A message of ``msg``'s type holding only ``field`` (a small copy: no weights are in it)."""
    part = type(msg)()
    copy_field(msg, part, field)
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


_RAW_DATA_FIELD = 9  # TensorProto.raw_data


def _write_lazy_inline(t: Any, f: Any) -> int:
    """Write lazily loaded tensor ``t`` to ``f`` as one ``initializer`` record with its bytes inline;
    returns the bytes written.

    The same bytes as serialising :func:`_inline_tensor`'s copy (protobuf writes fields in number
    order: dims, data_type, name, then raw_data, then doc_string), but the values go from their file to
    ``f`` in chunks, never through a bytes object and a protobuf message.
    """
    import onnx

    src, offset, length = _lazy_source(t)  # type: ignore[misc]
    head = onnx.TensorProto()
    head.name, head.data_type = t.name, t.data_type
    head.dims.extend(t.dims)
    head_bytes = _serialise(head, f"initializer '{t.name}'")
    raw_header = field_header(_RAW_DATA_FIELD, length)
    tail = b""
    if t.doc_string:
        doc = onnx.TensorProto()
        doc.doc_string = t.doc_string
        tail = _serialise(doc, f"initializer '{t.name}'")
    size = len(head_bytes) + len(raw_header) + length + len(tail)
    record = field_header(_INITIALIZER_FIELD, size)
    f.write(record)
    f.write(head_bytes)
    f.write(raw_header)
    _copy_range(src, offset, length, f)
    f.write(tail)
    return len(record) + size


def tensor_nbytes(t: Any) -> int:
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
        raise PartTooLarge(
            f"cannot write {what}: one protobuf message over 2 GiB ({type(e).__name__}); "
            "large constants must be initializers to go to external data"
        ) from e


class PartTooLarge(Exception):
    """A part of the model that protobuf cannot serialise (becomes an OutputError naming the path)."""


def write_onnx_stream(model: Any, f: Any, data: Any | None, location: str | Callable[[], str]) -> None:
    """Serialise ``model`` to file ``f`` one initializer at a time, without one big bytes copy.

    Protobuf lets a message's fields come in any order and concatenates repeated fields, so the
    model is written as: every ModelProto field but ``graph``; then ``graph`` as its fields but
    ``initializer``, followed by each initializer. The file parses to the same ModelProto. Peak memory
    is the model plus one tensor (``SerializeToString`` would hold a second copy of every weight).
    With ``data`` (an open file), initializers of 1 KiB or more go there as external data; a callable
    ``location`` is asked for the data file's name once all of the data is written (so the name can
    be a hash of the data: :mod:`bnfold.io.saver`).
    """
    for field, _ in model.ListFields():
        if field.number != _GRAPH_FIELD:
            f.write(_single_field(model, field).SerializeToString())
    if not model.HasField("graph"):
        return
    graph = model.graph
    inits = []
    moved = []
    for t in graph.initializer:
        if data is not None and (
            _lazy_source(t) is not None or t.data_location != t.EXTERNAL and tensor_nbytes(t) >= 1024
        ):
            t = _external_tensor(t, data, location if isinstance(location, str) else "")
            moved.append(t)
        inits.append(t)
    if moved and not isinstance(location, str):
        name = location()
        for t in moved:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = name
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
                hdr = field_header(field.number, len(b))
                f.write(hdr)
                f.write(b)
                total += len(hdr) + len(b)
        else:
            b = _serialise(_single_field(graph, field), field.name)
            f.write(b)
            total += len(b)
    for t in inits:
        if _lazy_source(t) is not None:  # saved without external data: copied in, one tensor at a time
            total += _write_lazy_inline(t, f)
            continue
        b = _serialise(t, f"initializer '{t.name}'")
        hdr = field_header(_INITIALIZER_FIELD, len(b))
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


def weight_bytes(model: Any) -> int:
    """The initializers' size from their shapes and dtypes (upb's ByteSize() would serialise them)."""

    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def read_in_nested_lazy(model: Any) -> None:
    """Lazily loaded tensors that a rewrite moved out of the main graph's initializers (the streamed
    writer's scope) get their bytes read in, so that no absolute location is ever written."""
    from onnx.external_data_helper import _get_all_tensors

    main = sum(1 for t in model.graph.initializer if _lazy_source(t) is not None)
    if sum(1 for t in _get_all_tensors(model) if _lazy_source(t) is not None) == main:
        return
    for i, g in enumerate(walk_graphs(model.graph)):  # the main graph comes first
        tensors = [a.t for n in g.node for a in n.attribute if a.HasField("t")]
        tensors += [t for n in g.node for a in n.attribute for t in a.tensors]
        if i:
            tensors += list(g.initializer)
        for t in tensors:
            if _lazy_source(t) is not None:
                t.CopyFrom(_inline_tensor(t))


# --- Spilling: the tensors a fold writes go to an unnamed temporary file instead of memory ----------
#
# A fold that rewrites every weight would otherwise hold all the new weights in memory until the save
# (with upb, in the model's arena, which never shrinks). Inside ``spilling(folder)``, each tensor of
# :data:`SPILL_MIN_BYTES` or more that the ONNX rewriter writes is appended to one file opened with
# ``O_TMPFILE`` in ``folder`` (no name: nothing to clean up, even after SIGKILL) and the tensor points
# at it like a lazily loaded one (absolute location ``/proc/self/fd/N``): the fold reads it back when a
# later pass needs it, and the streamed writer copies it in chunks. Such a model is valid only inside
# the ``with`` block. Where the file system or platform has no ``O_TMPFILE`` (or no ``/proc``), nothing
# is spilled and the tensors stay in memory as before.

SPILL_MIN_BYTES = 1 << 20

_SPILL: contextvars.ContextVar[_Spill | None] = contextvars.ContextVar("bnfold_spill", default=None)


class _Spill:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.location = f"/proc/self/fd/{fd}"
        self.end = 0
        self.failed = False
        """A write failed (e.g. the disk is full): nothing more is spilled, tensors stay in memory."""

    def put(self, t: Any, value: Any) -> bool:
        import numpy as np
        import onnx

        arr = np.ascontiguousarray(value)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        view = arr.reshape(-1).view(np.uint8).data  # the bytes, no copy
        offset, done = self.end, 0
        try:
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError:
            self.failed = True
            return False
        self.end = offset + done
        for f in (
            "raw_data",
            "float_data",
            "int32_data",
            "string_data",
            "int64_data",
            "double_data",
            "uint64_data",
            "external_data",
        ):
            if len(getattr(t, f)):
                t.ClearField(f)
        del t.dims[:]
        t.dims.extend(int(d) for d in arr.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", self.location), ("offset", str(offset)), ("length", str(done))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val
        return True


@contextlib.contextmanager
def spilling(folder: str | os.PathLike[str] | None) -> Iterator[bool]:
    """Within the block, :func:`spill_tensor` moves large written tensors to an unnamed file in ``folder``.

    Yields whether spilling is on (False where ``O_TMPFILE`` or ``/proc/self/fd`` is not available,
    or ``folder`` is None); the file is closed, and its space freed, when the block ends.
    """
    fd = -1
    if folder is not None and hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.open(os.fspath(folder), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            fd = -1
    if fd < 0:
        yield False
        return
    token = _SPILL.set(_Spill(fd))
    try:
        yield True
    finally:
        _SPILL.reset(token)
        os.close(fd)


def spillable(value: Any) -> bool:
    """True when a spill is active and :func:`spill_tensor` would take ``value`` (a plain numeric
    array of :data:`SPILL_MIN_BYTES` or more)."""
    spill = _SPILL.get()
    return (
        spill is not None
        and not spill.failed
        and value.nbytes >= SPILL_MIN_BYTES
        and value.dtype.kind in "fiub"
    )


def spill_tensor(t: Any, value: Any) -> bool:
    """Write ``value`` into tensor ``t`` (its ``data_type`` already that of ``value``) through the active
    spill file; False (nothing done) unless :func:`spillable`."""
    spill = _SPILL.get()
    if spill is None or not spillable(value):
        return False
    return spill.put(t, value)
