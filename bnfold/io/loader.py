"""Loading a model file: one sniff, one parse, a :class:`Loaded` record.

Rules:
    * ONNX: the parse from format detection gets its external data (each data file checked to be a
      regular file first), or, with ``lazy_external_data``, keeps its weights in their files (absolute
      locations, byte ranges checked against the file and the shape); then :mod:`.checks` runs;
    * PyTorch files go to :mod:`.torch_load` (torch is imported only for them, never for an ONNX file);
      a TorchScript archive is refused, never handed to ``torch.jit.load``;
    * :class:`Loaded` carries what the file jobs need besides the model (format, example inputs from
      a factory, the data files read, the size on disk), so nothing is stuck on the model object.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .checks import SUBBYTE_TYPES, check_onnx
from .datafiles import data_refs
from .paths import external_refs, total_size
from .sniff import file_kind, format_error, sniff_file

__all__ = ["Loaded", "load", "load_file", "load_with_format"]


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
    for ref in external_refs(model, base):  # what this parse reads (the file may have changed since)
        try:
            st = os.stat(ref)
        except OSError as e:
            raise format_error(
                path,
                f"cannot load the ONNX model's external data ({os.path.basename(ref)}: {e.strerror or e})",
            ) from e
        if not stat.S_ISREG(st.st_mode):
            raise format_error(
                path,
                f"external data {os.path.basename(ref)} is not a regular file ({file_kind(st.st_mode)})",
            )
    if lazy and any(uses_external_data(t) for t in model.graph.initializer) and not _nested_external(model):
        _make_lazy(path, model, base)
    elif any(uses_external_data(t) for t in model.graph.initializer):
        try:
            load_external_data_for_model(model, base)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise format_error(path, f"cannot load the ONNX model's external data ({msg})") from e
    elif _has_nested_external_data(model):
        try:
            model = onnx.load_model(path, load_external_data=True)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise format_error(path, f"cannot load the ONNX model or its external data ({msg})") from e
    check_onnx(path, model)
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
            fd = _open_external_data_fd(
                base, info.location, t.name, True
            )  # onnx's checks: no escape from base
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise format_error(path, f"cannot load the ONNX model's external data ({msg})") from e
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
        if t.data_type in SUBBYTE_TYPES:
            need = length
        if offset < 0 or offset + length > st.st_size or length != need:
            raise format_error(
                path,
                f"external data of tensor '{t.name}' ({info.location}, offset {offset}, length "
                f"{length}) does not fit its file ({st.st_size} bytes) or its shape ({need} bytes)",
            )
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
    locations), read by the fold when needed and copied by :func:`save`; for a job that hands the
    model to nothing but the fold and the writer (``fold`` and ``inspect``: onnxruntime reads files).
    """
    loaded = load_file(
        path, model_factory=model_factory, trust_pickle=trust_pickle, lazy_external_data=lazy_external_data
    )
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
            locations), read by the fold when needed and copied by :func:`save`; for a job that hands
            the model to nothing but the fold and the writer.

    Returns:
        The :class:`Loaded` record.

    Raises:
        ModelFormatError: unreadable or unknown file, checker rejection, a state_dict without a factory
            or that does not fit it, a pickled module without ``trust_pickle``.
        OptionError: a factory string that does not resolve, or a factory that fails.
    """
    p = os.fspath(path)
    fmt, parsed = sniff_file(p)
    data_files: tuple[str, ...] = ()
    if fmt == "onnx":
        # remembered by the sniff (no second walk), before the load replaces the locations
        data_files = tuple(r for r in data_refs(p) if os.path.isfile(r))
    if fmt == "onnx" and lazy_external_data:
        model = _load_onnx(p, parsed, lazy=True)
    else:
        model = _load_as(p, fmt, parsed, model_factory, trust_pickle)
    examples = None
    if fmt == "state_dict" or (fmt == "pickled_module" and model_factory is not None):  # the factory's shapes
        from .torch_load import factory_examples

        examples = factory_examples(model_factory)
    return Loaded(
        model=model,
        format=fmt,
        path=p,
        example_inputs=examples,
        data_files=data_files,
        size=total_size([os.path.abspath(p), *data_files]) if os.path.exists(p) else None,
    )


def _load_as(
    p: str, fmt: str, parsed: Any, model_factory: str | Callable[[], Any] | None, trust_pickle: bool
) -> Any:
    if fmt == "onnx":
        return _load_onnx(p, parsed)
    if fmt == "torchscript":
        # Recognised from the zip's member names; never handed to torch.jit.load, which runs the
        # archive's code. Its graph is compiled, so there is nothing bnfold could fold into anyway.
        raise format_error(
            p,
            "a TorchScript archive (torch.jit.save): bnfold does not load TorchScript (loading runs "
            "code from the file); save the nn.Module (state_dict with --model, torch.export.save, or "
            "ONNX) and fold that",
        )
    from .torch_load import load_torch

    return load_torch(p, fmt, model_factory, trust_pickle)
