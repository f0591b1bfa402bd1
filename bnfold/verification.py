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
      same reference outputs (``VerifyReport.extra``).

Inputs: see :mod:`bnfold._inputs` (seeded random tensors matching dtype and shape; symbolic dims from
``input_shapes``, else 2 for the first dimension and 8 for the others; integers in [0, 10); or user data).

Comparison, per output and sample, in float64 (``r`` reference, ``c`` candidate)::

    scale         = max |r| over finite elements     (taken as 1 when the reference is all zero)
    max_abs_error = max |c - r|
    max_rel_error = max_abs_error / scale             ("error relative to the output's scale")
    mismatches    = #{ |c - r| > atol + rtol * scale }

NaN on both sides at the same place, and equal infinities, count as equal; NaN on one side only is a
mismatch (error = inf). Integer and boolean outputs compare exactly (atol = rtol = 0). An output passes
when it has no mismatch. Default tolerances (:data:`DEFAULT_TOLERANCES`, per dtype, the less precise
dtype of the two sides wins): rtol is tens to hundreds of roundings of the dtype at the output's scale
(an exact fold changes each output by a few roundings, about 2-7e-7 of the scale in float32), atol is
the dtype's smallest normal number (an all-zero reference has scale 1, so atol is no longer needed as a
floor). The float32 resolution is
therefore 1e-5 of the output's scale: a change of one weight by 1e-3 of its value, in a layer that feeds
the output, is caught.

Verification never raises on a mismatch (``report.passed`` is False; :func:`ensure_passed` raises
:class:`~bnfold.errors.VerificationError`); it raises :class:`~bnfold.errors.NotComparableError` when the
two models cannot be compared (different input or output names, incompatible shapes, a model that
onnxruntime cannot load or run). An ONNX-only verification never imports torch.
"""

from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
from .errors import NotComparableError, OptionError, VerificationError
from .records import OutputCheck, VerifyReport

__all__ = [
    "verify",
    "ensure_passed",
    "parse_input_shapes",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "OPTIMIZATION_LEVELS",
    "default_tolerance",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tolerance:
    """``|c - r| <= atol + rtol * scale``, scale = max |reference| of the output."""

    atol: float
    rtol: float


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # atol is the dtype's smallest normal number: only denormal noise passes on its own; every real
    # error is judged relative to the output's scale (rtol).
    # float64: eps 2.2e-16; 1e-9 leaves ~4e6 roundings of room yet catches any real difference.
    "float64": Tolerance(atol=2.2e-308, rtol=1e-9),
    # float32: eps 1.19e-7; an exact fold moves outputs by 2-7e-7 of their scale, 1e-5 is ~20-50x that.
    "float32": Tolerance(atol=1.2e-38, rtol=1e-5),
    # float16: eps 9.8e-4; folded weights are rounded once more to fp16 and the output a few times.
    "float16": Tolerance(atol=6.1e-5, rtol=2e-3),
    # bfloat16: eps 7.8e-3 (8 mantissa bits); same few roundings as float16.
    "bfloat16": Tolerance(atol=1.2e-38, rtol=2e-2),
}
"""Default tolerance per floating dtype; integer and boolean outputs compare exactly."""

EXACT = Tolerance(atol=0.0, rtol=0.0)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
"""Names accepted for ``optimization_level`` / ``extra_level`` (onnxruntime graph optimisation)."""

_PRECISION_ORDER = ("float64", "float32", "float16", "bfloat16")


def default_tolerance(*dtypes: np.dtype[Any]) -> Tolerance:
    """The default tolerance for outputs of these dtypes: the least precise one decides."""
    names = [d.name for d in dtypes]
    if any(n not in DEFAULT_TOLERANCES for n in names):
        return EXACT
    return DEFAULT_TOLERANCES[max(names, key=_PRECISION_ORDER.index)]


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


class _OrtRunner:
    """One onnxruntime session, created once and run on every sample."""

    def __init__(self, source: str | bytes, level: str, label: str) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = _ort_level(level)
        so.log_severity_level = 3
        self.label = label
        self.level = level
        try:
            self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises several private exception types
            raise NotComparableError(f"{label}: onnxruntime cannot load the model ({_first_line(e)})") from e
        self.inputs = [
            InputSpec(i.name, np_dtype(i.type), tuple(i.shape)) for i in self.session.get_inputs()
        ]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], sample: int) -> dict[str, np.ndarray]:
        import onnxruntime as ort
        from onnx import TensorProto

        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise NotComparableError(f"{self.label}: has input {missing[0]!r} that the other model does not have")
        try:
            if any(feeds[n].dtype.name == "bfloat16" for n in names):
                # onnxruntime takes bfloat16 only as an OrtValue built from the raw 16-bit pattern.
                vals = {
                    n: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                        np.ascontiguousarray(feeds[n]).view(np.uint16), TensorProto.BFLOAT16
                    )
                    if feeds[n].dtype.name == "bfloat16"
                    else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[n]))
                    for n in names
                }
                outs = [v.numpy() for v in self.session.run_with_ort_values(self.outputs, vals)]
            else:
                outs = self.session.run(self.outputs, {n: feeds[n] for n in names})
        except Exception as e:
            raise NotComparableError(
                f"{self.label}: onnxruntime failed on sample {sample} ({_first_line(e)})"
            ) from e
        return {n: np.asarray(o) for n, o in zip(self.outputs, outs)}


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


_MAX_PROTO_BYTES = 2**31 - 2**24  # protobuf's 2 GiB limit, with room for the message overhead


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
        if model.ByteSize() < _MAX_PROTO_BYTES:
            return model.SerializeToString()
        import onnx

        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-verify-"))
        path = os.path.join(folder, "model.onnx")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, path, save_as_external_data=True, location="model.onnx.data")
        return path
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


def _compare(
    name: str, sample: int, r: np.ndarray, c: np.ndarray, atol: float | None, rtol: float | None
) -> OutputCheck:
    if r.shape != c.shape:
        raise NotComparableError(
            f"output {name!r} has shape {list(r.shape)} in the reference and {list(c.shape)} in the candidate"
        )
    r_float = r.dtype.kind == "f" or r.dtype.name == "bfloat16"
    c_float = c.dtype.kind == "f" or c.dtype.name == "bfloat16"
    if r_float != c_float:
        raise NotComparableError(f"output {name!r} is {r.dtype} in the reference and {c.dtype} in the candidate")
    if r_float:
        tol = default_tolerance(r.dtype, c.dtype)
        tol = Tolerance(tol.atol if atol is None else atol, tol.rtol if rtol is None else rtol)
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
    else:
        tol = EXACT  # integer and boolean outputs: exact, whatever the options say
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        if r.dtype.kind in "iu" and np.abs(r).max(initial=0) >= 2**53:
            r64, c64 = r.astype(np.int64).astype(object), c.astype(np.int64).astype(object)
    same = (r64 == c64) | (np.isnan(r64) & np.isnan(c64)) if r_float else (r64 == c64)
    finite = np.abs(r64[np.isfinite(r64)]) if r_float else np.abs(r64)
    scale = float(finite.max()) if finite.size else 0.0
    if scale == 0.0:
        scale = 1.0  # all-zero reference: errors are absolute
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(c64 - r64).astype(np.float64))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only, or inf - inf of opposite signs
    max_abs = float(diff.max(initial=0.0))
    mismatches = int(np.count_nonzero(diff > tol.atol + tol.rtol * scale))
    return OutputCheck(
        name=name,
        sample=sample,
        dtype=str(r.dtype),
        shape=tuple(int(d) for d in r.shape),
        max_abs_error=max_abs,
        max_rel_error=max_abs / scale,
        mismatches=mismatches,
        atol=tol.atol,
        rtol=tol.rtol,
        passed=mismatches == 0,
    )


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
    atol: float | None = None,
    rtol: float | None = None,
    optimization_level: str = "disable",
    extra_level: str | None = None,
    example_inputs: Any = None,
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
        atol: absolute tolerance for floating outputs (default per dtype, :data:`DEFAULT_TOLERANCES`).
        rtol: tolerance relative to the output's scale (max |reference|), default per dtype.
        optimization_level: onnxruntime graph optimisation for both models: "disable" (default),
            "basic", "extended", "all".
        extra_level: if given, run the candidate again at this level and add that comparison to
            ``report.extra`` (e.g. the level used in deployment).
        example_inputs: a tuple of tensors giving input shapes and dtypes when both models are PyTorch
            (an ``ExportedProgram``'s own example inputs are used when absent).

    Returns:
        A :class:`~bnfold.records.VerifyReport`; ``report.passed`` is False on a mismatch (no raise).

    Raises:
        NotComparableError: different input or output names, incompatible shapes or dtypes, a model
            onnxruntime cannot load or run.
        OptionError: a bad option (level, shapes, inputs, tolerances).
        ModelFormatError: a path that is not a readable model.
    """
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise OptionError(f"unknown optimization level {optimization_level!r} (choose from {', '.join(OPTIMIZATION_LEVELS)})")
    if extra_level is not None and extra_level not in OPTIMIZATION_LEVELS:
        raise OptionError(f"unknown optimization level {extra_level!r} (choose from {', '.join(OPTIMIZATION_LEVELS)})")
    if samples < 1:
        raise OptionError(f"samples must be at least 1, got {samples}")
    for label, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and not (v >= 0 and np.isfinite(v)):
            raise OptionError(f"{label} must be a finite number >= 0, got {v}")

    with contextlib.ExitStack() as stack:
        ref_src = _onnx_source(reference, "reference", stack)
        cand_src = _onnx_source(candidate, "candidate", stack)
        ref_torch, cand_torch = _is_torch(ref_src), _is_torch(cand_src)

        ref: _OrtRunner | _TorchRunner
        cand: _OrtRunner | None = None
        if not ref_torch:
            ref = _OrtRunner(ref_src, optimization_level, "reference")
            specs = ref.inputs
            out_names = ref.outputs
        if not cand_torch:
            cand = _OrtRunner(cand_src, optimization_level, "candidate")
            if ref_torch:
                specs, out_names = cand.inputs, cand.outputs
            else:
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
            cand = _OrtRunner(onnx_bytes, optimization_level, "candidate (exported to ONNX)")
            _check_inputs(specs, cand.inputs, exported=True)
            _check_outputs(out_names, cand.outputs)
        assert cand is not None
        if isinstance(ref, _TorchRunner):
            ref.outputs = list(out_names)

        ref_out = [ref.run(f, i) for i, f in enumerate(feeds)]
        checks = _compare_all(ref_out, cand, feeds, out_names, atol, rtol)
        extra: tuple[VerifyReport, ...] = ()
        if extra_level is not None:
            second = _OrtRunner(cand_src if not cand_torch else onnx_bytes, extra_level, f"candidate ({extra_level})")
            extra = (
                VerifyReport(
                    checks=_compare_all(ref_out, second, feeds, out_names, atol, rtol),
                    samples=len(feeds),
                    optimization_level=extra_level,
                ),
            )
    return VerifyReport(checks=checks, samples=len(feeds), optimization_level=optimization_level, extra=extra)


def _run_torch_once(model: Any, feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> Any:
    import torch

    runner = _TorchRunner(model, "candidate")
    args = tuple(_to_torch(feeds[s.name]) for s in specs)
    with torch.no_grad(), (contextlib.nullcontext() if runner.exported else _eval_mode(runner.model)):
        return runner.model(*args)


def _compare_all(
    ref_out: Sequence[Mapping[str, np.ndarray]],
    cand: _OrtRunner,
    feeds: Sequence[Mapping[str, np.ndarray]],
    out_names: Sequence[str],
    atol: float | None,
    rtol: float | None,
) -> tuple[OutputCheck, ...]:
    checks: list[OutputCheck] = []
    for i, (f, r) in enumerate(zip(feeds, ref_out)):
        c = cand.run(f, i)
        for name in out_names:
            checks.append(_compare(name, i, r[name], c[name], atol, rtol))
    return tuple(checks)


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
        n = int(np.prod(worst.shape)) if worst.shape else 1
        level = "" if rep is report else f" with onnxruntime level {rep.optimization_level!r}"
        raise VerificationError(
            f"not equivalent{level}: output {worst.name!r} differs on sample {worst.sample}: max abs error "
            f"{worst.max_abs_error:.3g} ({worst.max_rel_error:.3g} of the output's scale), {worst.mismatches} of "
            f"{n} elements outside atol={worst.atol:g} + rtol={worst.rtol:g} x scale",
            report=report,
        )
