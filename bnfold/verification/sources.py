"""What verification hands to a runtime: bytes, a file, or a PyTorch model exported to ONNX.

Rules:
    * an ONNX *path* goes to onnxruntime as it is (its external data read next to it): the verified
      file is the file on disk, never parsed nor serialised again here; a PyTorch file is loaded
      (:func:`bnfold.io.load`);
    * an ``onnx.ModelProto`` goes as bytes up to :data:`_FILE_ABOVE_BYTES` of tensor data; above, and
      whenever protobuf cannot serialise it (2 GiB), it is written to a temporary folder with its
      weights in external data by :func:`bnfold.io.save` (tensor by tensor, never one serialised blob)
      and onnxruntime reads that file; the folder is removed when the verification ends;
    * a PyTorch candidate is exported to ONNX in memory with the reference's input and output names
      (``nn.Module``: the TorchScript exporter, ``dynamo=False, do_constant_folding=False``;
      ``ExportedProgram``: the dynamo exporter without its optimiser), so that the export path that
      gets deployed is checked too.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.dtypes import from_numpy
from bnfold.errors import ModelFormatError, NotComparableError, OptionError

from .inputs import InputSpec
from .runners import eval_mode, first_line

__all__: list[str] = ["export_candidate", "is_torch", "onnx_source"]

log = logging.getLogger(__name__)


def is_torch(model: Any) -> bool:
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(model, (torch.nn.Module, torch.export.ExportedProgram))


_FILE_ABOVE_BYTES = 256 * 2**20
"""A proto with more tensor bytes than this goes to onnxruntime as a file with external data: no
serialised copy is held next to the model and onnxruntime's own, and past 2 GiB protobuf cannot
serialise it at all. Smaller ones go as bytes (no disk write)."""


def _weight_bytes(model: Any) -> int:
    """Bytes of tensor data held in the proto: initializers and Constant values, subgraphs too.

    From shapes and types (:func:`bnfold.io.stream.tensor_nbytes`), never ``len(raw_data)`` (upb copies
    the payload to answer) nor ``ByteSize()`` (it serialises, and fails past 2 GiB).
    """
    from onnx import AttributeProto

    from bnfold.io.stream import tensor_nbytes
    from bnfold.onnx.graph import all_graphs

    held = 0
    for g in all_graphs(model.graph):
        tensors = [
            *g.initializer,
            *(a.t for n in g.node for a in n.attribute if a.type == AttributeProto.TENSOR),
        ]
        held += sum(tensor_nbytes(t) for t in tensors if t.HasField("raw_data"))
    return held


def _write_with_external_data(model: Any, folder: str) -> str:
    """Write ``model`` as ``folder/model.onnx`` with its weights in external data; return the path.

    :func:`bnfold.io.save` does it (the one ONNX writer): one initializer at a time, the whole proto
    never serialised (protobuf refuses messages over 2 GiB) nor copied nor changed, tensors of 1 KiB or
    more in the data file next to the model, where onnxruntime finds them.
    """
    from bnfold import io as bio

    path = os.path.join(folder, "model.onnx")
    bio.save(model, path, external_data=True)
    return path


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
"""First bytes of a PyTorch file (a zip archive, a legacy pickle stream); anything else is taken as ONNX."""


def onnx_source(model: Any, label: str, stack: contextlib.ExitStack) -> Any:
    """What onnxruntime loads: bytes, a path, or a torch object (returned unchanged).

    A path to an ONNX file is handed over as it is: onnxruntime reads the file and its external data
    itself, so the file that is verified is the file on disk (no parse, no second serialisation here);
    a file that neither runtime can load is named by :func:`bnfold.io.detect_format`
    (:func:`~bnfold.verification.runners.onnx_runner`). A PyTorch file is loaded with
    :func:`bnfold.io.load` (trusted formats only).
    """
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        from bnfold import io as bio

        path = os.fspath(model)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise IsADirectoryError(path)  # a folder, FIFO or device: never opened (a FIFO would block)
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            bio.detect_format(path)  # raises the ModelFormatError naming the file (missing, a folder, ...)
            raise
        if head.startswith(_TORCH_MAGIC):
            return bio.load(path)
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            # A Linux path is bytes: one that is not UTF-8 (``\xff.onnx``, surrogate-escaped here) is a
            # valid file name that onnxruntime cannot be given; hand it the model parsed (data included).
            import onnx

            try:
                parsed = onnx.load(path)
            except Exception as e:  # noqa: BLE001 - onnx's C++ external-data reader takes UTF-8 only too
                bio.detect_format(path)  # a file that is no model: named as such
                raise ModelFormatError(
                    f"{path}: cannot load the model for verification: its path is not UTF-8 and "
                    f"onnx cannot read its external data there ({first_line(e)}); rename the folder"
                ) from e
            return onnx_source(parsed, label, stack)
        return path
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        # Decide on the tensor bytes, not ByteSize(): that serialises the whole proto (and fails past 2 GiB).
        if _weight_bytes(model) <= _FILE_ABOVE_BYTES:
            try:
                return model.SerializeToString()
            except Exception as e:  # noqa: BLE001 - protobuf's EncodeError/ValueError past 2 GiB (big float_data)
                log.debug("%s: cannot serialise (%s); writing it with external data", label, e)
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
        return _write_with_external_data(model, folder)
    if is_torch(model):
        return model
    raise OptionError(
        f"{label}: cannot verify a {type(model).__module__}.{type(model).__name__}: expected an onnx.ModelProto, "
        "a path to a model file, a torch.nn.Module or a torch.export.ExportedProgram"
    )


def export_candidate(
    model: Any, feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec], outputs: Sequence[str]
) -> bytes:
    """Export a PyTorch candidate to ONNX in memory, with the reference's input and output names.

    Under :data:`bnfold.torch_onnx.EXPORT_LOCK`: torch's exporter state is global (one export at a time).
    """
    import torch

    from bnfold.torch_onnx import export as locked_export

    args = tuple(from_numpy(feeds[s.name]) for s in specs)
    in_names = [s.name for s in specs]
    dynamic_axes: dict[str, dict[int, str]] = {}
    for s in specs:
        axes = {
            i: (d if isinstance(d, str) and d else f"{s.name}_dim{i}")
            for i, d in enumerate(s.dims)
            if not (isinstance(d, int) and d > 0)
        }
        if axes:
            dynamic_axes[s.name] = axes
    try:
        if isinstance(model, torch.export.ExportedProgram):
            prog = locked_export(
                model,
                args,
                dynamo=True,
                optimize=False,
                input_names=in_names,
                output_names=list(outputs),
                verbose=False,
            )
            assert prog is not None
            return bytes(prog.model_proto.SerializeToString())
        buf = _io.BytesIO()
        with eval_mode(model):
            locked_export(
                model,
                args,
                buf,
                dynamo=False,
                do_constant_folding=False,
                input_names=in_names,
                output_names=list(outputs),
                dynamic_axes=dynamic_axes or None,
            )
        return buf.getvalue()
    except Exception as e:
        raise NotComparableError(f"candidate: torch.onnx.export failed ({first_line(e)})") from e
