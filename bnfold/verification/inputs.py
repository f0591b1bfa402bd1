"""Inputs for verification: shape specs, symbolic dimensions, seeded random tensors, user data.

Rules:
    * a shape spec is ``name=1x3x224x224`` (``,`` also separates dimensions; ``name=`` is a scalar);
    * a symbolic (or unknown) dimension takes, in this order: the value the user gave for that input,
      the value the same symbol already took in another input, :data:`DEFAULT_BATCH` (= 2, so that a
      batch larger than one is always exercised) when it is the first dimension, else
      :data:`DEFAULT_DIM` (= 8);
    * random data: floating inputs ~ N(0, 1) cast to the input's dtype (float16 / bfloat16 through
      ``ml_dtypes``); integer inputs uniform in ``[0, INT_HIGH)`` (= 10, valid for small vocabularies and
      index inputs; pass real data otherwise); boolean inputs are random bits;
    * user data (a dict of arrays, a list of dicts, or an ``.npz`` path) must name every input and
      nothing else; floating arrays are cast to the input's floating dtype, other kinds must match;
    * an ``.npz`` file is read by :func:`read_npz`, which checks what every entry *declares* before
      anything is decompressed: the zip entry's size must be its ``.npy`` header plus shape x itemsize,
      and the declared sizes together may exceed neither :data:`NPZ_FREE_BYTES` nor
      :data:`NPZ_MAX_RATIO` times the file's own size, whichever is larger (a 2 MB file cannot make
      bnfold allocate 2 GB); where the model is known, each array's declared dtype kind, rank and fixed
      dimensions are checked against the model's input first (:func:`user_inputs`).

Nothing here imports onnxruntime; torch only inside :func:`torch_examples` (for a PyTorch model).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnfold.dtypes import bfloat16, from_numpy
from bnfold.errors import OptionError
from bnfold.fold_math.cast import is_floating
from bnfold.hints import INPUT_SHAPES
from bnfold.io.sniff import ZIP_FREE_BYTES, ZIP_MAX_RATIO, zip_overdeclared

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_DIM",
    "INT_HIGH",
    "InputSpec",
    "parse_input_shapes",
    "parse_shapes_for",
    "resolve_shapes",
    "random_inputs",
    "user_inputs",
    "np_dtype",
    "load_inputs",
    "read_npz",
    "NPZ_FREE_BYTES",
    "NPZ_MAX_RATIO",
    "require_finite",
    "onnx_input_specs",
    "torch_examples",
]

DEFAULT_BATCH = 2
"""Value of a symbolic first (batch) dimension: 2, so that batch > 1 is always covered."""
DEFAULT_DIM = 8
"""Value of any other symbolic dimension (sequence length, spatial size, ...)."""
INT_HIGH = 10
"""Random integer inputs are drawn from ``[0, INT_HIGH)``."""
NPZ_FREE_BYTES = ZIP_FREE_BYTES
"""Uncompressed bytes an ``.npz`` may declare whatever its size (:data:`bnfold.io.sniff.ZIP_FREE_BYTES`)."""
NPZ_MAX_RATIO = ZIP_MAX_RATIO
"""Beyond :data:`NPZ_FREE_BYTES`, the declared bytes may be at most this multiple of the file's size
(real data compresses a few times at most; a file saved with ``numpy.savez`` is never compressed)."""

Dim = int | str | None

_ORT_TYPES: dict[str, str] = {
    "float": "float32",
    "double": "float64",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
}


def np_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype for a dtype name ("float32", "bfloat16", "tensor(float)", ...)."""
    m = re.fullmatch(r"tensor\((\w+)\)", name)
    if m:
        if m.group(1) not in _ORT_TYPES:
            raise OptionError(f"unsupported input/output type {name}")
        name = _ORT_TYPES[m.group(1)]
    return bfloat16() if name == "bfloat16" else np.dtype(name)


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One graph input: its name, numpy dtype and dims (int, or a symbol / None when not fixed)."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[Dim, ...]


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1x3x224x224`` specs into ``{name: (1, 3, 224, 224)}``.

    Args:
        specs: one spec per input; dimensions separated by ``x`` or ``,``; ``name=`` is a scalar.

    Raises:
        OptionError: a spec without ``=``, an empty name, a dimension that is not a positive integer,
            or the same name twice (one-line message quoting the spec).
    """
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise OptionError(f"--input-shape {spec!r}: expected name=1x3x224x224")
        parts = [p.strip() for p in re.split(r"[x,]", dims.strip())] if dims.strip() else []
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise OptionError(
                f"--input-shape {spec!r}: dimensions must be positive integers, e.g. name=1x3x224x224"
            )
        if name in out:
            raise OptionError(f"--input-shape {spec!r}: input {name!r} given twice")
        out[name] = tuple(int(p) for p in parts)
    return out


def parse_shapes_for(
    specs: Sequence[str] | Mapping[str, tuple[int, ...]] | None, where: str | os.PathLike[str]
) -> dict[str, tuple[int, ...]]:
    """:func:`parse_input_shapes` for a job on ``where`` (an error names it); a mapping passes through."""
    from bnfold.errors import BnfoldError, with_context

    if isinstance(specs, Mapping):
        return dict(specs)
    try:
        return parse_input_shapes(list(specs or ()))
    except BnfoldError as e:
        raise with_context(e, os.fspath(where)) from e


def resolve_shapes(
    specs: Sequence[InputSpec], overrides: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every input (see the module rules for symbolic dimensions).

    Raises:
        OptionError: an override names no input, has the wrong rank, or contradicts a fixed dimension.
    """
    overrides = dict(overrides or {})
    names = {s.name for s in specs}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise OptionError(
            f"--input-shape: given for unknown input {unknown[0]!r} (inputs: {', '.join(sorted(names))})"
        )
    symbols: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for s in specs:  # pass 1: user overrides bind symbols
        if s.name not in overrides:
            continue
        shape = tuple(int(d) for d in overrides[s.name])
        _check_shape(
            s,
            shape,
            f"--input-shape: {s.name!r}",
            "{}: dimension {i} is fixed to {want} in the model, got {got}",
        )
        for dim, size in zip(s.dims, shape):
            if isinstance(dim, str) and dim:
                symbols.setdefault(dim, size)
        shapes[s.name] = shape
    for s in specs:  # pass 2: defaults
        if s.name in shapes:
            continue
        dims: list[int] = []
        for i, d in enumerate(s.dims):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif isinstance(d, str) and d and d in symbols:
                dims.append(symbols[d])
            else:
                v = DEFAULT_BATCH if i == 0 else DEFAULT_DIM
                if isinstance(d, str) and d:
                    symbols[d] = v
                dims.append(v)
        shapes[s.name] = tuple(dims)
    return shapes


def random_inputs(
    specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One sample of seeded random inputs (see the module rules for the values)."""
    out: dict[str, np.ndarray] = {}
    for s in specs:
        shape = shapes[s.name]
        kind = s.dtype.kind
        if s.dtype == np.bool_:
            out[s.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif kind in "iu":
            out[s.name] = rng.integers(0, INT_HIGH, size=shape).astype(s.dtype)
        elif kind in "fV" or s.dtype.name == "bfloat16":
            out[s.name] = rng.standard_normal(size=shape).astype(s.dtype)
        else:
            raise OptionError(
                f"cannot generate random data for input {s.name!r} of type {s.dtype}; pass real inputs (--inputs)"
            )
    return out


def _check_shape(
    s: InputSpec,
    shape: Sequence[int],
    subject: str,
    fixed: str = "{} dimension {i} is {got}, the model fixes it to {want}",
) -> None:
    """OptionError unless ``shape`` fits input ``s``: its rank, and the dimensions the model fixes (the
    message ``fixed``, formatted with ``subject``, the axis ``i``, ``want`` and ``got``)."""
    if len(shape) != len(s.dims):
        raise OptionError(f"{subject} has rank {len(shape)}, the model expects rank {len(s.dims)}")
    for i, (want, got) in enumerate(zip(s.dims, shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise OptionError(fixed.format(subject, i=i, want=want, got=got))


def _check_sample(specs: Sequence[InputSpec], sample: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    missing = [n for n in names if n not in sample]
    extra = sorted(set(sample) - set(names))
    if missing:
        raise OptionError(f"{where}: no data for input {missing[0]!r} (inputs: {', '.join(names)})")
    if extra:
        raise OptionError(f"{where}: {extra[0]!r} is not an input of the model (inputs: {', '.join(names)})")
    out: dict[str, np.ndarray] = {}
    for s in specs:
        a = np.asarray(sample[s.name])
        if a.dtype != s.dtype:
            if is_floating(a.dtype) and is_floating(s.dtype):
                a = a.astype(s.dtype)
            elif a.dtype.kind in "iu" and s.dtype.kind in "iu":
                a = a.astype(s.dtype)
            else:
                raise OptionError(f"{where}: input {s.name!r} is {a.dtype}, the model expects {s.dtype}")
        _check_shape(s, a.shape, f"{where}: input {s.name!r}")
        require_finite(a, f"{where}: input {s.name!r}")
        out[s.name] = a
    return out


def require_finite(a: np.ndarray, subject: str) -> None:
    """OptionError when the floating array ``a`` (an input to verify on) holds NaN or inf: outputs
    computed from it are NaN on both sides, and NaN compared with NaN proves nothing."""
    if is_floating(a.dtype) and not bool(np.isfinite(a.astype(np.float32, copy=False)).all()):
        raise OptionError(
            f"{subject} holds NaN or infinite values (in {a.dtype}); outputs computed from them "
            "compare NaN with NaN and prove nothing: give finite data"
        )


def user_inputs(specs: Sequence[InputSpec], inputs: Any) -> list[dict[str, np.ndarray]]:
    """Samples from user data: a dict of arrays (one sample), a list of dicts, or an ``.npz`` path.

    Raises:
        OptionError: unreadable file, missing or extra names, wrong dtype kind or shape, a file that
            declares more data than it may hold (see the module rules).
    """
    if isinstance(inputs, (str, os.PathLike)):
        path = os.fspath(inputs)
        by_name = {s.name: s for s in specs}

        def fits(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
            s = by_name.get(name)
            if s is None:
                return  # _check_sample names it
            _check_shape(s, shape, f"{path}: input {name!r}")
            if is_floating(dtype) != is_floating(s.dtype):
                raise OptionError(f"{path}: input {name!r} is {dtype}, the model expects {s.dtype}")

        data = read_npz(path, "inputs", check=fits)
        return [_check_sample(specs, data, path)]
    if isinstance(inputs, Mapping):
        return [_check_sample(specs, inputs, "inputs")]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(x, Mapping) for x in inputs):
        return [_check_sample(specs, x, f"inputs[{i}]") for i, x in enumerate(inputs)]
    raise OptionError(
        "inputs must be a dict of arrays, a non-empty list of such dicts, or a path to an .npz file"
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


def read_npz(
    path: str | os.PathLike[str],
    what: str,
    *,
    check: Callable[[str, tuple[int, ...], np.dtype[Any]], None] | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, each checked from what it declares before it is decompressed.

    Args:
        path: the file.
        what: the option or role named in errors ("--inputs", "--load-outputs").
        check: ``check(name, shape, dtype)`` on every entry's declared shape and dtype, before any
            entry is decompressed; it raises to refuse.

    Raises:
        OptionError: not a zip of ``.npy`` arrays, an entry whose size does not match its header, an
            object array, or more declared data than the bound (see the module rules). One line.
    """
    import zipfile

    p = os.fspath(path)
    try:
        size = os.stat(p).st_size
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            over = zip_overdeclared(infos, size)
            if over is not None:
                declared, limit = over
                raise OptionError(
                    f"{p}: {what}: declares {_mib(declared)} of uncompressed data in a file of {_mib(size)} "
                    f"(more than {_mib(limit)}); refused as a possible compression bomb (save large arrays "
                    "uncompressed, with numpy.savez)"
                )
            names: list[tuple[str, zipfile.ZipInfo]] = []
            for info in infos:
                name = info.filename.removesuffix(".npy")
                shape, dtype = _npy_header(zf, info, p, what)
                if check is not None:
                    check(name, shape, dtype)
                names.append((name, info))
            out: dict[str, np.ndarray] = {}
            for name, info in names:
                with zf.open(info) as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
            return out
    except OptionError:
        raise
    except Exception as e:  # noqa: BLE001 - a hostile file may fail anywhere in zipfile/zlib/numpy
        first = (str(e).splitlines() or [""])[0]
        raise OptionError(
            f"{p}: {what}: not a readable NumPy .npz archive ({type(e).__name__}: {first})"
        ) from e


def _npy_header(zf: Any, info: Any, p: str, what: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of one ``.npy`` entry, read from its header only; its size must match them."""
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, _fortran, dtype = fmt.read_array_header_2_0(f)
        header = f.tell()
    if dtype.hasobject:
        raise OptionError(
            f"{p}: {what}: entry {info.filename!r} holds Python objects (only plain arrays are read)"
        )
    nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
    if header + nbytes != info.file_size:
        raise OptionError(
            f"{p}: {what}: entry {info.filename!r} declares shape {list(shape)} of {dtype} ({nbytes} bytes) "
            f"but holds {info.file_size - header} bytes"
        )
    return tuple(int(d) for d in shape), dtype


# ------------------------------------------------------------------ inputs for the file jobs and bench
def load_inputs(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Read ``--inputs data.npz`` into ``{name: ndarray}``.

    Raises:
        OptionError: the file is missing, not an ``.npz`` archive, or empty.
    """
    if path is None:
        return None
    from pathlib import Path

    from bnfold.io.sniff import not_a_file

    p = Path(path)
    if (why := not_a_file(p)) is not None:
        raise OptionError(f"{p}: --inputs: {why}")
    arrays = read_npz(p, "--inputs")
    if not arrays:
        raise OptionError(f"{p}: --inputs: the archive holds no array")
    return arrays


def onnx_input_specs(model: Any) -> list[Any]:
    """The graph inputs of an ONNX model (initializers excluded) as :class:`InputSpec`."""
    import onnx

    init = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def torch_examples(
    model: Any,
    shapes: Mapping[str, tuple[int, ...]],
    inputs: Mapping[str, Any] | None,
    seed: int,
    path: str | os.PathLike[str],
    default: tuple[Any, ...] | None = None,
) -> tuple[Any, ...]:
    """Example inputs for a PyTorch model: ``--inputs`` arrays, ``--input-shape`` or the model's own.

    Seeded ``N(0, 1)`` tensors of the given shapes (in argument order); otherwise ``default`` (the
    factory's, from :attr:`bnfold.io.Loaded.example_inputs`) or an ExportedProgram's ``example_inputs``.

    Raises:
        OptionError: none of them is there (names the flags that give them).
    """
    import torch

    if inputs:
        return tuple(from_numpy(a) for a in inputs.values())  # bfloat16 arrays too
    if shapes:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(s, generator=g) for s in shapes.values())
    ex = default if default is not None else getattr(model, "example_inputs", None)
    if ex is not None:
        args = ex[0] if isinstance(ex, tuple) and len(ex) == 2 and isinstance(ex[1], dict) else ex
        return tuple(args)
    raise OptionError(f"{path}: a PyTorch module has no input signature", hints=[INPUT_SHAPES])
