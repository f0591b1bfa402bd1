"""Whether two models can be compared, and the comparison of their outputs, sample by sample.

Rules:
    * the two sides have the same input names (an exported PyTorch candidate: a subset, named after
      the reference), per input the same dtype and rank, and fixed dimensions that agree; the same
      output names (order does not matter); anything else is a
      :class:`~bnfold.errors.NotComparableError` naming the first difference;
    * PyTorch inputs are positional: ``input_0``, ``input_1``, ... from the example tensors; an
      example's shape fills the symbolic dimensions of the ONNX input it fits (same rank, same fixed
      dimensions), an ``ExportedProgram``'s own example inputs are used when none are given;
    * each output of each sample is compared by :func:`bnfold.verification.compare.compare_output`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.dtypes import numpy_dtype
from bnfold.errors import NotComparableError, OptionError
from bnfold.records import OutputCheck, VerifyReport

from .compare import Comparator, compare_output
from .inputs import InputSpec
from .isolation import OrtWorker
from .runners import onnx_runner

__all__: list[str] = [
    "check_inputs",
    "check_outputs",
    "compare_outputs",
    "example_inputs_for",
    "example_shapes",
    "check_extra_level",
    "torch_specs",
]


def check_inputs(ref: Sequence[InputSpec], cand: Sequence[InputSpec], exported: bool) -> None:
    rn, cn = [s.name for s in ref], [s.name for s in cand]
    if not exported and set(rn) != set(cn):
        only_r, only_c = sorted(set(rn) - set(cn)), sorted(set(cn) - set(rn))
        what = (
            f"input {only_r[0]!r} only in the reference"
            if only_r
            else f"input {only_c[0]!r} only in the candidate"
        )
        raise NotComparableError(f"the models have different inputs: {what}")
    by_name = {s.name: s for s in ref}
    for s in cand:
        r = by_name.get(s.name)
        if r is None:
            raise NotComparableError(f"the candidate has input {s.name!r}, which the reference does not have")
        if r.dtype != s.dtype:
            raise NotComparableError(
                f"input {s.name!r} is {r.dtype} in the reference and {s.dtype} in the candidate"
            )
        if len(r.dims) != len(s.dims):
            raise NotComparableError(
                f"input {s.name!r} has rank {len(r.dims)} in the reference and {len(s.dims)} in the candidate"
            )
        for i, (a, b) in enumerate(zip(r.dims, s.dims)):
            if isinstance(a, int) and isinstance(b, int) and a > 0 and b > 0 and a != b:
                raise NotComparableError(
                    f"input {s.name!r} dimension {i} is {a} in the reference and {b} in the candidate"
                )


def check_outputs(ref: Sequence[str], cand: Sequence[str]) -> None:
    if sorted(ref) != sorted(cand):
        only_r, only_c = sorted(set(ref) - set(cand)), sorted(set(cand) - set(ref))
        if only_r:
            what = f"output {only_r[0]!r} only in the reference"
        elif only_c:
            what = f"output {only_c[0]!r} only in the candidate"
        else:
            what = f"{len(ref)} outputs in the reference, {len(cand)} in the candidate"
        raise NotComparableError(f"the models have different outputs: {what}")


def torch_specs(example_inputs: Any) -> list[InputSpec]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    specs = []
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise OptionError(f"example_inputs[{i}] is a {type(t).__name__}, expected a tensor")
        dtype = numpy_dtype(t.dtype)
        specs.append(InputSpec(f"input_{i}", dtype, tuple(int(d) for d in t.shape)))
    return specs


def example_shapes(example_inputs: Any, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
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


def example_inputs_for(model: Any, given: Any) -> Any:
    import torch

    if given is not None:
        return given
    if isinstance(model, torch.export.ExportedProgram) and model.example_inputs is not None:
        return model.example_inputs[0]
    return None


def compare_outputs(
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


def check_extra_level(
    level: str | None,
    source: Any,
    feeds: Sequence[Mapping[str, np.ndarray]],
    ref_out: Sequence[Mapping[str, np.ndarray]],
    out_names: Sequence[str],
    comparator: Comparator,
    worker: OrtWorker,
) -> tuple[VerifyReport, ...]:
    """The candidate run again at onnxruntime level ``level`` (nothing when it runs in the fallback)."""
    if level is None:
        return ()
    second = onnx_runner(source, level, f"candidate ({level})", worker)
    second.may_fall_back = False  # a crash at the deployment level is a finding, not a reason to fall back
    if second.runtime.runtime != "onnxruntime":
        return ()  # the reference evaluator has no optimisation levels: the first check is the only one
    cand_out = [second.run(f, i) for i, f in enumerate(feeds)]
    return (
        VerifyReport(
            checks=compare_outputs(ref_out, cand_out, out_names, comparator),
            samples=len(feeds),
            optimization_level=level,
            runtimes=(second.runtime,),
            comparator=comparator.to_dict(),
        ),
    )
