"""Prove that a rewritten model computes the same thing as the original: run both, compare outputs.

What runs:
    * an ONNX model (``onnx.ModelProto``, serialized bytes or a path) runs in onnxruntime on the CPU with
      graph optimisations **disabled** (``ORT_DISABLE_ALL``) unless ``optimization_level`` says
      otherwise: from its basic level up onnxruntime fuses Conv+BN and MatMul+BN itself, which would
      hide a wrong fold;
    * a PyTorch *reference* (``nn.Module`` or ``ExportedProgram``) runs eagerly, in eval mode, under
      ``torch.no_grad()``: it is the ground truth. A PyTorch *candidate* is exported to ONNX
      (``nn.Module``: the TorchScript exporter, ``dynamo=False, do_constant_folding=False``;
      ``ExportedProgram``: the dynamo exporter without its optimiser) and run in onnxruntime, so the
      export path that gets deployed is checked as well;
    * ``extra_level`` runs the candidate a second time at that onnxruntime level and compares it to the
      same reference outputs (``VerifyReport.extra``);
    * fallback: an ONNX model that onnxruntime cannot load (no float64 Conv kernel, opsets 1-6, an op
      it lacks) runs in ``onnx.reference.ReferenceEvaluator`` (numpy, no graph optimisation; bnfold
      supplies the BatchNormalization of opsets 1-8, which the evaluator lacks or gets wrong). ``VerifyReport.runtimes`` names the runtime of each side
      and onnxruntime's reason. A candidate that only the fallback runs while onnxruntime runs the
      reference is refused (``NotComparableError``): the rewrite broke the model for onnxruntime;
    * onnxruntime always gets bytes or a file: a proto whose tensors pass the 2 GiB protobuf limit is
      written to a temporary folder as a small model file plus an external-data file, tensor by tensor
      (:func:`_write_with_external_data`), never serialised whole (also above 256 MiB of weights, so
      that no serialised copy is held in memory).

Inputs: see :mod:`bnfold._inputs` (seeded random tensors matching dtype and shape; symbolic dims from
``input_shapes``, else 2 for the first dimension and 8 for the others; integers in [0, 10); or user data).

Comparison, per output and sample, in float64 (``r`` reference, ``c`` candidate)::

    scale         = max |r| over finite elements     (taken as 1 when the reference is all zero)
    max_abs_error = max |c - r|
    max_rel_error = max_abs_error / scale             ("error relative to the output's scale")
    mismatches    = #{ |c - r| > atol + rtol * scale }

NaN on both sides at the same place, and equal infinities, count as equal; NaN on one side only is a
mismatch (error = inf). Integer and boolean outputs compare exactly (atol = rtol = 0). By default an
output passes when it has no mismatch; :mod:`bnfold.compare` adds the options (per-output tolerances,
an error statistic, cosine and SNR thresholds, NaN/Inf named as such, a heat summary). Default tolerances (:data:`DEFAULT_TOLERANCES`, per dtype, the less precise
dtype of the two sides wins): rtol is tens to hundreds of roundings of the dtype at the output's scale
(an exact fold changes each output by a few roundings, about 2-7e-7 of the scale in float32), atol is
the dtype's smallest normal number (an all-zero reference has scale 1, so atol is no longer needed as a
floor). The float32 resolution is
therefore 1e-5 of the output's scale: a change of one weight by 1e-3 of its value, in a layer that feeds
the output, is caught.

Verification never raises on a mismatch (``report.passed`` is False; :func:`ensure_passed` raises
:class:`~bnfold.errors.VerificationError`); it raises :class:`~bnfold.errors.NotComparableError` when the
two models cannot be compared (different input or output names, incompatible shapes, a model that
no runtime can load or run). ``save_outputs`` / ``load_outputs`` record a run and check against it
later (:mod:`bnfold.golden`); ``locate`` names the first intermediate tensor that diverges
(:mod:`bnfold.locate`). An ONNX-only verification never imports torch.
"""

from __future__ import annotations

import abc
import contextlib
import io as _io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ._inputs import (
    InputSpec,
    np_dtype,
    parse_input_shapes,
    random_inputs,
    resolve_shapes,
    user_inputs,
)
from .compare import (
    DEFAULT_TOLERANCES,
    ERROR_STATS,
    Comparator,
    Tolerance,
    ToleranceArg,
    compare_output,
    default_tolerance,
    parse_tolerances,
)
from .errors import NotComparableError, OptionError, OutputError, VerificationError
from .records import OutputCheck, RuntimeUse, VerifyReport

__all__ = [
    "verify",
    "ensure_passed",
    "parse_input_shapes",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "OPTIMIZATION_LEVELS",
    "default_tolerance",
    "parse_tolerances",
    "Comparator",
    "ERROR_STATS",
    "REFERENCE_EVALUATOR",
    "describe_failure",
    "runtime_notes",
]

log = logging.getLogger(__name__)


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
"""Names accepted for ``optimization_level`` / ``extra_level`` (onnxruntime graph optimisation)."""


# ----------------------------------------------------------------------------------------- runners


def _ort_level(level: str) -> Any:
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise OptionError(f"unknown optimization level {level!r} (choose from {', '.join(OPTIMIZATION_LEVELS)})")
    return levels[level]


def _first_line(e: BaseException) -> str:
    """The error's message on one line (onnxruntime spreads some over several), at most 300 characters."""
    text = " ".join(str(e).split())
    return (text[:297] + "...") if len(text) > 300 else (text or type(e).__name__)


class _OnnxRunner(abc.ABC):
    """What both ONNX runners share: feeds checked against the model's inputs, one error wording.

    A subclass sets ``label``, ``level``, ``runtime``, ``inputs``, ``outputs`` and ``engine`` (the
    runtime named in a failure) and implements ``_outputs``.
    """

    label: str
    level: str
    runtime: RuntimeUse
    inputs: list[InputSpec]
    outputs: list[str]
    engine: str

    def run(self, feeds: Mapping[str, np.ndarray], sample: int) -> dict[str, np.ndarray]:
        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise NotComparableError(f"{self.label}: has input {missing[0]!r} that the other model does not have")
        try:
            outs = self._outputs(feeds, names)
        except Exception as e:
            raise NotComparableError(
                f"{self.label}: {self.engine} failed on sample {sample} ({_first_line(e)})"
            ) from e
        return {n: np.asarray(o) for n, o in zip(self.outputs, outs)}

    @abc.abstractmethod
    def _outputs(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[Any]:
        """The outputs of one run, in ``self.outputs`` order."""


class _OrtRunner(_OnnxRunner):
    """One onnxruntime session, created once and run on every sample."""

    engine = "onnxruntime"

    def __init__(self, source: str | bytes, level: str, label: str) -> None:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # model-load warnings (old opsets) would print on stderr
        so = ort.SessionOptions()
        so.graph_optimization_level = _ort_level(level)
        so.log_severity_level = 3
        self.label = label
        self.level = level
        self.runtime = RuntimeUse(label.split(" ")[0], "onnxruntime")
        self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        self.inputs = [
            InputSpec(i.name, np_dtype(i.type), tuple(i.shape)) for i in self.session.get_inputs()
        ]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _outputs(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[Any]:
        import onnxruntime as ort
        from onnx import TensorProto

        if not any(feeds[n].dtype.name == "bfloat16" for n in names):
            return list(self.session.run(self.outputs, {n: feeds[n] for n in names}))
        # onnxruntime takes bfloat16 only as an OrtValue built from the raw 16-bit pattern.
        vals = {
            n: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(feeds[n]).view(np.uint16), TensorProto.BFLOAT16
            )
            if feeds[n].dtype.name == "bfloat16"
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[n]))
            for n in names
        }
        return [v.numpy() for v in self.session.run_with_ort_values(self.outputs, vals)]


REFERENCE_EVALUATOR = "onnx.reference"
"""Name of the fallback runtime in reports: ``onnx.reference.ReferenceEvaluator`` (numpy, any dtype)."""


class _RefRunner(_OnnxRunner):
    """The ONNX reference evaluator, for models onnxruntime cannot run (float64 Conv, opsets 1-6, ...).

    It implements every standard op of every opset in numpy (float64 included) without graph
    optimisation, so it checks the same arithmetic; it is slower, which only matters for large models.
    """

    engine = "the ONNX reference evaluator"

    def __init__(self, source: Any, label: str, why: str) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.label = label
        self.level = "disable"
        self.runtime = RuntimeUse(label.split(" ")[0], REFERENCE_EVALUATOR, why)
        if isinstance(source, (bytes, bytearray)):
            proto = onnx.load_model_from_string(bytes(source))
        elif isinstance(source, str):
            proto = onnx.load(source)  # a path: external data resolved next to the file
        else:
            proto = source
        self.session = ReferenceEvaluator(proto, new_ops=_legacy_ops(proto) or None)
        init = {t.name for t in proto.graph.initializer}
        self.inputs = []
        for vi in proto.graph.input:
            if vi.name in init:
                continue
            tt = vi.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
            self.inputs.append(InputSpec(vi.name, np_dtype(_ONNX_TYPE_NAMES.get(tt.elem_type, f"tensor(type {tt.elem_type})")), dims))
        self.outputs = [o.name for o in proto.graph.output]

    def _outputs(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[Any]:
        return list(self.session.run(self.outputs, {n: feeds[n] for n in names}))


def _same_runtime_or_better(ref: Any, cand: Any) -> None:
    """A candidate must load wherever its reference does: one that only the fallback runs is refused.

    Otherwise a rewrite that breaks the model for onnxruntime (where it is deployed) would pass,
    checked by the more permissive reference evaluator.
    """
    if ref.runtime.runtime == "onnxruntime" and cand.runtime.runtime != "onnxruntime":
        raise NotComparableError(
            f"candidate: onnxruntime cannot load it although it loads the reference ({cand.runtime.reason})"
        )


def _legacy_ops(proto: Any) -> list[Any]:
    """BatchNormalization for opsets 1-8, where the reference evaluator is missing or wrong.

    The evaluator has no BatchNormalization-1 (opsets 1-5), ignores ``spatial`` and, from opset 7
    on (no ``is_test`` attribute), runs BatchNormalization-6's training branch. This one computes the
    inference formula in float64 with one cast, statistics per channel (``spatial=1``, the default) or
    per element of ``C x D1 x ...`` (``spatial=0``), and refuses training mode: ``is_test=0`` up to
    opset 6, more than one output from opset 7 (``consumed_inputs`` of opset 1-5 only described
    in-place updates of the running statistics in training).
    """
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    if opset >= 9:
        return []
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):  # the class name is the op type the evaluator looks up
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, is_test=None, momentum=None,  # type: ignore[no-untyped-def]
                 spatial=None, consumed_inputs=None, training_mode=None):
            outputs = [o for o in self.onnx_node.output if o]
            training = not is_test if opset < 7 else len(outputs) > 1
            if training:
                raise NotComparableError(f"BatchNormalization (opset {opset}) in training mode: not an inference model")
            eps = 1e-5 if epsilon is None else epsilon
            if spatial == 0:  # statistics per element of C x D1 x ...
                shape = (1, *x.shape[1:])
            else:
                shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
            r = [np.asarray(a, np.float64).reshape(shape) for a in (scale, bias, mean, var)]
            y = (x.astype(np.float64) - r[2]) / np.sqrt(r[3] + eps) * r[0] + r[1]  # float64, one cast
            return (y.astype(x.dtype),)

    return [BatchNormalization]


_ONNX_TYPE_NAMES = {
    1: "tensor(float)", 2: "tensor(uint8)", 3: "tensor(int8)", 4: "tensor(uint16)", 5: "tensor(int16)",
    6: "tensor(int32)", 7: "tensor(int64)", 9: "tensor(bool)", 10: "tensor(float16)", 11: "tensor(double)",
    12: "tensor(uint32)", 13: "tensor(uint64)", 16: "tensor(bfloat16)",
}


_Runner = Any  # _OrtRunner | _RefRunner: both have label, level, runtime, inputs, outputs, run()


def _onnx_runner(source: Any, level: str, label: str) -> _Runner:
    """onnxruntime when it loads the model, else the ONNX reference evaluator (and the reason why)."""
    try:
        return _OrtRunner(source, level, label)
    except Exception as e:  # onnxruntime raises several private exception types
        why = f"onnxruntime cannot load it: {_first_line(e)}"
        log.debug("%s: %s; falling back to the ONNX reference evaluator", label, why)
        try:
            return _RefRunner(source, label, why)
        except Exception as e2:
            raise NotComparableError(
                f"{label}: onnxruntime cannot load the model ({_first_line(e)}); the ONNX reference "
                f"evaluator cannot run it either ({_first_line(e2)})"
            ) from e


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Eval mode for the duration of the run; every submodule's flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def _to_torch(a: np.ndarray) -> Any:
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return np.asarray(t.view(torch.int16).numpy().view(np_dtype("bfloat16")))
    return np.asarray(t.numpy())


def _flatten(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return []


class _TorchRunner:
    """A PyTorch reference run eagerly; outputs flattened and named after the ONNX side's outputs."""

    def __init__(self, model: Any, label: str) -> None:
        import torch

        self.label = label
        self.runtime = RuntimeUse(label.split(" ")[0], "torch")
        # an unlifted ExportedProgram refuses .eval(): it runs with the mode it was exported in
        self.exported = isinstance(model, torch.export.ExportedProgram)
        self.model = model.module() if self.exported else model
        self.outputs: list[str] | None = None
        self.inputs: list[InputSpec] | None = None

    def run(self, feeds: Mapping[str, np.ndarray], sample: int) -> dict[str, np.ndarray]:
        import torch

        assert self.inputs is not None and self.outputs is not None
        args = tuple(_to_torch(feeds[s.name]) for s in self.inputs)
        try:
            with torch.no_grad(), (contextlib.nullcontext() if self.exported else _eval_mode(self.model)):
                out = self.model(*args)
        except Exception as e:
            raise NotComparableError(f"{self.label}: the PyTorch model failed on sample {sample} ({_first_line(e)})") from e
        flat = _flatten(out)
        if len(flat) != len(self.outputs):
            raise NotComparableError(
                f"{self.label} returns {len(flat)} tensors, the other model has {len(self.outputs)} outputs "
                f"({', '.join(self.outputs)})"
            )
        return {n: _to_numpy(t) for n, t in zip(self.outputs, flat)}


def _is_torch(model: Any) -> bool:
    if "torch" not in sys.modules:
        return False
    import torch

    return isinstance(model, (torch.nn.Module, torch.export.ExportedProgram))


_FILE_ABOVE_BYTES = 256 * 2**20
"""A proto with more tensor bytes than this goes to onnxruntime as a file with external data: no
serialised copy is held next to the model and onnxruntime's own, and past 2 GiB protobuf cannot
serialise it at all. Smaller ones go as bytes (no disk write)."""
_EXTERNAL_MIN_BYTES = 1024  # tensors at least this large go to the external-data file


def _tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the model that may hold weights: initializers and Constant values, subgraphs too."""
    from onnx import AttributeProto

    stack = [model.graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR:
                    yield a.t
                elif a.type == AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    stack.extend(a.graphs)


def _weight_bytes(model: Any) -> int:
    """Bytes of tensor data held in the proto (not ``ByteSize()``: that fails past 2 GiB)."""
    return sum(len(t.raw_data) for t in _tensors(model) if t.HasField("raw_data"))


def _copy_fields(dst: Any, src: Any, skip: str) -> None:
    """Copy every set field of message ``src`` into ``dst`` except the field named ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _write_with_external_data(model: Any, folder: str) -> str:
    """Write ``model`` as ``folder/model.onnx`` + ``model.onnx.data``, never serialising its weights.

    The whole proto is never serialised (protobuf refuses messages over 2 GiB), copied or changed: a
    shell model gets every field but the main graph's initializers, each initializer's bytes are
    streamed to the data file one tensor at a time (one tensor's bytes in flight), and the shell
    points at them. Tensors in subgraphs and Constant nodes stay inline (they are copied with the
    nodes).
    """
    from onnx import ModelProto, TensorProto

    path = os.path.join(folder, "model.onnx")
    shell = ModelProto()
    _copy_fields(shell, model, "graph")
    _copy_fields(shell.graph, model.graph, "initializer")
    with open(os.path.join(folder, "model.onnx.data"), "wb") as data:
        for t in model.graph.initializer:
            if not t.HasField("raw_data") or len(t.raw_data) < _EXTERNAL_MIN_BYTES:
                shell.graph.initializer.add().CopyFrom(t)
                continue
            out = shell.graph.initializer.add()
            _copy_fields(out, t, "raw_data")
            offset = data.tell()
            data.write(t.raw_data)
            out.data_location = TensorProto.EXTERNAL
            del out.external_data[:]
            for k, v in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(data.tell() - offset))):
                entry = out.external_data.add()
                entry.key, entry.value = k, v
    with open(path, "wb") as f:
        f.write(shell.SerializeToString())
    return path


def _onnx_source(model: Any, label: str, stack: contextlib.ExitStack) -> Any:
    """What onnxruntime loads: bytes, a path, or a torch object (returned unchanged)."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        from . import io as bio

        path = os.fspath(model)
        if bio.detect_format(path) == "onnx":
            return path  # onnxruntime reads external data from the file's folder itself
        return bio.load(path)
    if type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx"):
        # Decide on the tensor bytes, not ByteSize(): that serialises the whole proto (and fails past 2 GiB).
        if _weight_bytes(model) <= _FILE_ABOVE_BYTES:
            try:
                return model.SerializeToString()
            except Exception as e:  # noqa: BLE001 - protobuf's EncodeError/ValueError past 2 GiB (big float_data)
                log.debug("%s: cannot serialise (%s); writing it with external data", label, e)
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
        return _write_with_external_data(model, folder)
    if _is_torch(model):
        return model
    raise OptionError(
        f"{label}: cannot verify a {type(model).__module__}.{type(model).__name__}: expected an onnx.ModelProto, "
        "a path to a model file, a torch.nn.Module or a torch.export.ExportedProgram"
    )


def _export_candidate(
    model: Any, feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec], outputs: Sequence[str]
) -> bytes:
    """Export a PyTorch candidate to ONNX in memory, with the reference's input and output names."""
    import torch

    args = tuple(_to_torch(feeds[s.name]) for s in specs)
    in_names = [s.name for s in specs]
    dynamic_axes: dict[str, dict[int, str]] = {}
    for s in specs:
        axes = {i: (d if isinstance(d, str) and d else f"{s.name}_dim{i}") for i, d in enumerate(s.dims)
                if not (isinstance(d, int) and d > 0)}
        if axes:
            dynamic_axes[s.name] = axes
    try:
        if isinstance(model, torch.export.ExportedProgram):
            prog = torch.onnx.export(model, args, dynamo=True, optimize=False, input_names=in_names,
                                     output_names=list(outputs), verbose=False)
            assert prog is not None
            return bytes(prog.model_proto.SerializeToString())
        buf = _io.BytesIO()
        with _eval_mode(model):
            torch.onnx.export(
                model, args, buf,  # type: ignore[arg-type]
                dynamo=False, do_constant_folding=False, input_names=in_names, output_names=list(outputs), dynamic_axes=dynamic_axes or None,
            )
        return buf.getvalue()
    except Exception as e:
        raise NotComparableError(f"candidate: torch.onnx.export failed ({_first_line(e)})") from e


# -------------------------------------------------------------------------------------- comparison


def _check_inputs(ref: Sequence[InputSpec], cand: Sequence[InputSpec], exported: bool) -> None:
    rn, cn = [s.name for s in ref], [s.name for s in cand]
    if not exported and set(rn) != set(cn):
        only_r, only_c = sorted(set(rn) - set(cn)), sorted(set(cn) - set(rn))
        what = f"input {only_r[0]!r} only in the reference" if only_r else f"input {only_c[0]!r} only in the candidate"
        raise NotComparableError(f"the models have different inputs: {what}")
    by_name = {s.name: s for s in ref}
    for s in cand:
        r = by_name.get(s.name)
        if r is None:
            raise NotComparableError(f"the candidate has input {s.name!r}, which the reference does not have")
        if r.dtype != s.dtype:
            raise NotComparableError(f"input {s.name!r} is {r.dtype} in the reference and {s.dtype} in the candidate")
        if len(r.dims) != len(s.dims):
            raise NotComparableError(
                f"input {s.name!r} has rank {len(r.dims)} in the reference and {len(s.dims)} in the candidate"
            )
        for i, (a, b) in enumerate(zip(r.dims, s.dims)):
            if isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b:
                raise NotComparableError(
                    f"input {s.name!r} dimension {i} is {a} in the reference and {b} in the candidate"
                )


def _check_outputs(ref: Sequence[str], cand: Sequence[str]) -> None:
    if sorted(ref) != sorted(cand):
        only_r, only_c = sorted(set(ref) - set(cand)), sorted(set(cand) - set(ref))
        if only_r:
            what = f"output {only_r[0]!r} only in the reference"
        elif only_c:
            what = f"output {only_c[0]!r} only in the candidate"
        else:
            what = f"{len(ref)} outputs in the reference, {len(cand)} in the candidate"
        raise NotComparableError(f"the models have different outputs: {what}")


def _torch_specs(example_inputs: Any) -> list[InputSpec]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    specs = []
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise OptionError(f"example_inputs[{i}] is a {type(t).__name__}, expected a tensor")
        dtype = _to_numpy(torch.zeros((), dtype=t.dtype)).dtype
        specs.append(InputSpec(f"input_{i}", dtype, tuple(int(d) for d in t.shape)))
    return specs


def _example_shapes(example_inputs: Any, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """Shapes of example tensors (positional) for the inputs they fit (same rank, same fixed dims)."""
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out: dict[str, tuple[int, ...]] = {}
    for spec, t in zip(specs, items):
        shape = getattr(t, "shape", None)
        if shape is None or len(shape) != len(spec.dims):
            continue
        dims = tuple(int(d) for d in shape)
        if all(not (isinstance(w, int) and w > 0) or w == d for w, d in zip(spec.dims, dims)):
            out[spec.name] = dims
    return out


def _example_inputs(model: Any, given: Any) -> Any:
    import torch

    if given is not None:
        return given
    if isinstance(model, torch.export.ExportedProgram) and model.example_inputs is not None:
        return model.example_inputs[0]
    return None


# --------------------------------------------------------------------------------------------- API


def verify(
    reference: Any,
    candidate: Any,
    *,
    inputs: Any = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = 1,
    seed: int = 0,
    atol: ToleranceArg = None,
    rtol: ToleranceArg = None,
    optimization_level: str = "disable",
    extra_level: str | None = None,
    example_inputs: Any = None,
    error_stat: str = "max",
    min_cosine: float | None = None,
    min_snr_db: float | None = None,
    save_outputs: str | os.PathLike[str] | None = None,
    load_outputs: str | os.PathLike[str] | None = None,
    locate: bool = False,
) -> VerifyReport:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output.

    Args:
        reference: the original model: ``onnx.ModelProto``, serialized ONNX bytes, a path (ONNX with
            external data, ``.pt2``, TorchScript, trusted formats only), ``torch.nn.Module`` or
            ``torch.export.ExportedProgram`` (run eagerly: the ground truth).
        candidate: the rewritten model, same kinds (a PyTorch candidate is exported to ONNX and run in
            onnxruntime).
        inputs: real data instead of random tensors: a dict ``name -> array`` (one sample), a list of
            such dicts (one per sample) or a path to an ``.npz`` file (one array per input name).
            ``samples`` is ignored then.
        input_shapes: ``name -> shape`` for inputs with symbolic dimensions (must agree with the fixed
            ones); defaults: 2 for a symbolic first dimension, 8 for any other.
        samples: number of random samples (each a fresh draw from ``seed``).
        seed: seed of the random inputs.
        atol: absolute tolerance for floating outputs (default per dtype, :data:`DEFAULT_TOLERANCES`):
            one value, or ``{output: value}`` (key ``"*"`` for the other outputs).
        rtol: tolerance relative to the output's scale (max |reference|), default per dtype; same forms.
        optimization_level: onnxruntime graph optimisation for both models: "disable" (default),
            "basic", "extended", "all".
        extra_level: if given, run the candidate again at this level and add that comparison to
            ``report.extra`` (e.g. the level used in deployment).
        example_inputs: a tuple of tensors giving input shapes and dtypes when both models are PyTorch
            (an ``ExportedProgram``'s own example inputs are used when absent).
        error_stat: the statistic of ``|c - r|`` judged against the tolerance: "max" (default: every
            element), "mean", "median" or a quantile ("q0.99", "p99"); see :mod:`bnfold.compare`.
        min_cosine: also fail an output whose cosine similarity with the reference is below this.
        min_snr_db: also fail an output whose signal-to-noise ratio is below this many dB.
        save_outputs: write the inputs and both models' outputs to this ``.npz`` file
            (:mod:`bnfold.golden`).
        load_outputs: a file written with ``save_outputs``: its inputs and reference outputs stand
            for the reference (pass ``reference=None``); with ``candidate=None`` too, the saved
            candidate outputs are compared again (no model runs).
        locate: ONNX models: also compare every intermediate tensor present in both and name the
            first one that diverges (``report.locate``, see :mod:`bnfold.locate`).

    Returns:
        A :class:`~bnfold.records.VerifyReport`; ``report.passed`` is False on a mismatch (no raise).

    Raises:
        NotComparableError: different input or output names, incompatible shapes or dtypes, a model
            that neither onnxruntime nor the ONNX reference evaluator can run.
        OptionError: a bad option (level, shapes, inputs, tolerances).
        ModelFormatError: a path that is not a readable model.
    """
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise OptionError(f"unknown optimization level {optimization_level!r} (choose from {', '.join(OPTIMIZATION_LEVELS)})")
    if extra_level is not None and extra_level not in OPTIMIZATION_LEVELS:
        raise OptionError(f"unknown optimization level {extra_level!r} (choose from {', '.join(OPTIMIZATION_LEVELS)})")
    if samples < 1:
        raise OptionError(f"samples must be at least 1, got {samples}")
    comparator = Comparator(atol, rtol, error_stat, min_cosine, min_snr_db)
    comparator.validate()
    if save_outputs is not None:  # a cheap check before any model runs
        folder = os.path.dirname(os.path.abspath(os.fspath(save_outputs)))
        if not os.path.isdir(folder) or os.path.isdir(os.fspath(save_outputs)):
            raise OutputError(f"{os.fspath(save_outputs)}: cannot write the outputs there (no such folder, or a folder)")
    if load_outputs is not None:
        if inputs is not None:
            raise OptionError("load_outputs: the saved inputs are used; inputs cannot be given as well")
        if reference is not None:
            raise OptionError("load_outputs: the saved outputs are the reference; pass only a candidate (or none)")
        if locate:
            raise OptionError("locate needs both models (not saved outputs)")
        return _verify_recorded(
            load_outputs, candidate, comparator, optimization_level, extra_level, save_outputs
        )
    if candidate is None or reference is None:
        raise OptionError("verify needs a reference and a candidate (or load_outputs)")

    with contextlib.ExitStack() as stack:
        ref_src = _onnx_source(reference, "reference", stack)
        cand_src = _onnx_source(candidate, "candidate", stack)
        ref_torch, cand_torch = _is_torch(ref_src), _is_torch(cand_src)

        ref: _Runner
        cand: _Runner | None = None
        if not ref_torch:
            ref = _onnx_runner(ref_src, optimization_level, "reference")
            specs = ref.inputs
            out_names = ref.outputs
        if not cand_torch:
            cand = _onnx_runner(cand_src, optimization_level, "candidate")
            if ref_torch:
                specs, out_names = cand.inputs, cand.outputs
            else:
                _same_runtime_or_better(ref, cand)
                _check_inputs(specs, cand.inputs, exported=False)
                _check_outputs(out_names, cand.outputs)
        if ref_torch and cand_torch:
            ex = _example_inputs(ref_src, example_inputs)
            ex = _example_inputs(cand_src, None) if ex is None else ex
            if ex is None:
                raise OptionError("both models are PyTorch: pass example_inputs (a tuple of tensors)")
            specs = _torch_specs(ex)
            out_names = []  # named after the exported candidate below
        if ref_torch:
            ref = _TorchRunner(ref_src, "reference")
            ref.inputs = specs

        if not (ref_torch and cand_torch):
            ex = _example_inputs(ref_src, example_inputs) if ref_torch else example_inputs
            if ex is not None:  # symbolic dims of the ONNX side take the example's shape
                input_shapes = {**_example_shapes(ex, specs), **dict(input_shapes or {})}
        shapes = resolve_shapes(specs, input_shapes)
        if inputs is not None:
            feeds = user_inputs(specs, inputs)
        else:
            rng = np.random.default_rng(seed)
            feeds = [random_inputs(specs, shapes, rng) for _ in range(samples)]

        if cand_torch:
            if not out_names:
                n_out = len(_flatten(_run_torch_once(cand_src, feeds[0], specs)))
                out_names = [f"output_{i}" for i in range(n_out)]
            onnx_bytes = _export_candidate(cand_src, feeds[0], specs, out_names)
            cand = _onnx_runner(onnx_bytes, optimization_level, "candidate (exported to ONNX)")
            _check_inputs(specs, cand.inputs, exported=True)
            _check_outputs(out_names, cand.outputs)
        assert cand is not None
        if isinstance(ref, _TorchRunner):
            ref.outputs = list(out_names)

        comparator.validate(out_names)
        ref_out = [ref.run(f, i) for i, f in enumerate(feeds)]
        cand_out = [cand.run(f, i) for i, f in enumerate(feeds)]
        checks = _compare_outputs(ref_out, cand_out, out_names, comparator)
        extra = _extra_level(
            extra_level, cand_src if not cand_torch else onnx_bytes, feeds, ref_out, out_names, comparator
        )
        runtimes = (ref.runtime, cand.runtime)
        located = None
        if locate:
            if ref_torch or cand_torch:
                raise OptionError("locate compares intermediate tensors of two ONNX models; export the PyTorch side first")
            from .locate import locate_divergence

            located = locate_divergence(ref_src, cand_src, feeds[0], comparator)
        if save_outputs is not None:
            _save_recording(save_outputs, specs, out_names, feeds, ref_out, cand_out, runtimes)
    return VerifyReport(
        checks=checks, samples=len(feeds), optimization_level=optimization_level, extra=extra,
        runtimes=runtimes, comparator=comparator.to_dict(), locate=located,
    )


def _extra_level(
    level: str | None,
    source: Any,
    feeds: Sequence[Mapping[str, np.ndarray]],
    ref_out: Sequence[Mapping[str, np.ndarray]],
    out_names: Sequence[str],
    comparator: Comparator,
) -> tuple[VerifyReport, ...]:
    """The candidate run again at onnxruntime level ``level`` (nothing when it runs in the fallback)."""
    if level is None:
        return ()
    second = _onnx_runner(source, level, f"candidate ({level})")
    if second.runtime.runtime != "onnxruntime":
        return ()  # the reference evaluator has no optimisation levels: the first check is the only one
    cand_out = [second.run(f, i) for i, f in enumerate(feeds)]
    return (
        VerifyReport(
            checks=_compare_outputs(ref_out, cand_out, out_names, comparator),
            samples=len(feeds),
            optimization_level=level,
            runtimes=(second.runtime,),
            comparator=comparator.to_dict(),
        ),
    )


def _save_recording(
    path: str | os.PathLike[str],
    specs: Sequence[InputSpec],
    out_names: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    ref_out: Sequence[Mapping[str, np.ndarray]],
    cand_out: Sequence[Mapping[str, np.ndarray]] | None,
    runtimes: Sequence[RuntimeUse],
) -> None:
    from .golden import Recording, save_outputs

    save_outputs(
        path,
        Recording(
            [s.name for s in specs], list(out_names), [dict(f) for f in feeds], [dict(r) for r in ref_out],
            None if cand_out is None else [dict(c) for c in cand_out], {r.role: r.runtime for r in runtimes},
        ),
    )


def _verify_recorded(
    path: str | os.PathLike[str],
    candidate: Any,
    comparator: Comparator,
    level: str,
    extra_level: str | None,
    save_to: str | os.PathLike[str] | None,
) -> VerifyReport:
    """Check ``candidate`` (or the saved candidate outputs) against the outputs saved in ``path``."""
    from .golden import load_outputs

    rec = load_outputs(path)
    comparator.validate(rec.output_names)
    golden = RuntimeUse("reference", "file", f"{os.fspath(path)} (recorded with {rec.runtimes.get('reference', '?')})")
    if candidate is None:
        if rec.candidate is None:
            raise OptionError(f"{os.fspath(path)}: holds no candidate outputs; pass a candidate model to check")
        checks = _compare_outputs(rec.reference, rec.candidate, rec.output_names, comparator)
        cand_rt = RuntimeUse("candidate", "file", f"{os.fspath(path)} (recorded with {rec.runtimes.get('candidate', '?')})")
        return VerifyReport(
            checks=checks, samples=len(rec.feeds), optimization_level="recorded", runtimes=(golden, cand_rt),
            comparator=comparator.to_dict(),
        )
    specs = [InputSpec(n, rec.feeds[0][n].dtype, tuple(rec.feeds[0][n].shape)) for n in rec.input_names]
    with contextlib.ExitStack() as stack:
        src = _onnx_source(candidate, "candidate", stack)
        if _is_torch(src):
            src = _export_candidate(src, rec.feeds[0], specs, rec.output_names)
        cand = _onnx_runner(src, level, "candidate")
        _check_inputs(specs, cand.inputs, exported=False)
        _check_outputs(rec.output_names, cand.outputs)
        cand_out = [cand.run(f, i) for i, f in enumerate(rec.feeds)]
        checks = _compare_outputs(rec.reference, cand_out, rec.output_names, comparator)
        extra = _extra_level(extra_level, src, rec.feeds, rec.reference, rec.output_names, comparator)
    if save_to is not None:
        _save_recording(save_to, specs, rec.output_names, rec.feeds, rec.reference, cand_out, (golden, cand.runtime))
    return VerifyReport(
        checks=checks, samples=len(rec.feeds), optimization_level=level, extra=extra,
        runtimes=(golden, cand.runtime), comparator=comparator.to_dict(),
    )


def _run_torch_once(model: Any, feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> Any:
    import torch

    runner = _TorchRunner(model, "candidate")
    args = tuple(_to_torch(feeds[s.name]) for s in specs)
    with torch.no_grad(), (contextlib.nullcontext() if runner.exported else _eval_mode(runner.model)):
        return runner.model(*args)


def _compare_outputs(
    ref_out: Sequence[Mapping[str, np.ndarray]],
    cand_out: Sequence[Mapping[str, np.ndarray]],
    out_names: Sequence[str],
    comparator: Comparator,
) -> tuple[OutputCheck, ...]:
    return tuple(
        compare_output(name, i, r[name], c[name], comparator)
        for i, (r, c) in enumerate(zip(ref_out, cand_out))
        for name in out_names
    )


def ensure_passed(report: VerifyReport) -> None:
    """Raise :class:`~bnfold.errors.VerificationError` if ``report`` did not pass.

    The message names the worst output, its error relative to the output's scale and the sample (and
    the onnxruntime level when only the second check failed).
    """
    if report.passed:
        return
    for rep in (report, *report.extra):
        if rep.passed:
            continue
        worst = rep.worst()
        assert worst is not None
        level = "" if rep is report else f" with onnxruntime level {rep.optimization_level!r}"
        raise VerificationError(f"not equivalent{level}: {describe_failure(worst)}", report=report)


def runtime_notes(report: VerifyReport) -> list[str]:
    """One line per side that did not run in onnxruntime: which runtime ran it, and why."""
    return [
        f"{r.role} run with {'the ONNX reference evaluator' if r.runtime == REFERENCE_EVALUATOR else r.runtime}"
        + (f" ({r.reason})" if r.reason else "")
        for r in report.runtimes
        if r.runtime not in ("onnxruntime", "torch")
    ]


def describe_failure(c: OutputCheck) -> str:
    """One phrase naming what failed on output ``c`` (NaN/Inf, tolerance, cosine, SNR) and where."""
    n = int(np.prod(c.shape)) if c.shape else 1
    where = f"output {c.name!r} differs on sample {c.sample}"
    at = f" (largest error at index {list(c.worst_index)})" if c.worst_index else ""
    if c.failure == "nan":
        return f"output {c.name!r} is NaN on sample {c.sample} at {c.nan} of {n} elements where the reference is finite{at}"
    if c.failure == "inf":
        return f"output {c.name!r} is infinite on sample {c.sample} at {c.inf} of {n} elements where the reference is finite{at}"
    if c.failure == "cosine":
        return f"{where}: cosine similarity {c.cosine:.6g} is below the threshold"
    if c.failure == "snr":
        return f"{where}: SNR {c.snr_db:.3g} dB is below the threshold"
    if c.error_stat != "max":
        return (
            f"{where}: {c.error_stat} abs error {c.error_value:.3g} above atol={c.atol:g} + rtol={c.rtol:g} x scale "
            f"(max abs error {c.max_abs_error:.3g}){at}"
        )
    return (
        f"{where}: max abs error {c.max_abs_error:.3g} ({c.max_rel_error:.3g} of the output's scale), "
        f"{c.mismatches} of {n} elements outside atol={c.atol:g} + rtol={c.rtol:g} x scale{at}"
    )
