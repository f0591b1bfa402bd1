"""What a verification result means for its caller: the one wording of a failure, and the one raise.

A run never raises on a mismatch (``report.passed`` is False). The callers that turn a failed report
into an error or a line of text use these, so that the policy and its words live in one place:

    * :func:`describe_failure`: one phrase for one failed output (NaN/Inf, tolerance, cosine, SNR, and
      where the largest error is);
    * :func:`failure_message`: the whole report in one line (``None`` when it passed): the first
      failing check, the main one before the ``extra_level`` re-runs, named with its onnxruntime level;
    * :func:`ensure_passed`: raise :class:`~bnfold.errors.VerificationError` (exit code 1) with that
      line, the report attached; a subclass (e.g. the file job's ``FoldVerificationError``) builds
      its message from :func:`failure_message` the same way;
    * :func:`runtime_notes`: one line per side that did not run in onnxruntime (which runtime, why);
    * :func:`runtimes_label`: the runtimes that ran the ONNX sides, for a summary line.
    * :func:`tolerance_below_rounding`: why no rewrite can pass at all, when every floating output's
      tolerance is below one rounding step of its dtype (``fold --rtol 1e-9`` on a float32 model).
      :func:`failure_message` says so too, and :mod:`bnfold.culprit` does not bisect then.
    * :func:`bias_rounding_atol`: the absolute tolerance a fold that is not exact by design (an int32
      bias requantised, ``--requantize-bias``) adds to the outputs its stated bound reaches.

Requantised biases: such a fold moves the value its layer writes by at most a stated bound ``B``
(:attr:`~bnfold.records.Site.bias_rounding`, half a step of the new bias scale). That bound holds on a
graph output only where the value reaches it through operators that do not amplify an error: data
movement (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity, Dropout at inference), 1-Lipschitz
element-wise maps (Relu, Clip, Tanh, Sigmoid), max and average pooling, Concat (the largest bound of
its inputs) and Add/Sub (the sum). Anything else (a further layer, a Mul, a QuantizeLinear whose
rounding may flip by a whole step, a subgraph) stops it: those outputs keep the default tolerance, and
the caller says so. Nothing else is added: the float rounding of the fold stays under ``rtol``.

Rounding: a rewrite that changes the arithmetic (a fold, a fusion) moves a float output by at least
about one unit in the last place of its largest values, ``eps * scale`` with ``eps`` of the output's
dtype (:data:`ROUNDING_EPS`). A tolerance ``atol + rtol * scale`` below that, on every floating output
judged by its largest error, can only be met by a bit-identical result.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from bnfold.errors import VerificationError
from bnfold.records import OutputCheck, VerifyReport

from .compare import DEFAULT_TOLERANCES
from .runners import REFERENCE_EVALUATOR

__all__ = [
    "describe_failure",
    "failure_message",
    "ensure_passed",
    "runtime_notes",
    "tolerance_below_rounding",
    "runtimes_label",
    "ROUNDING_EPS",
    "bias_rounding_atol",
    "BOUND_KEEPING_OPS",
]

ROUNDING_EPS: dict[str, float] = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}
"""One unit in the last place, relative (machine epsilon), per floating dtype."""
_NEGLIGIBLE_ATOL = 1e-30  # the default atols are the smallest normal numbers (1.2e-38 for float32)


def tolerance_below_rounding(report: VerifyReport) -> str | None:
    """Why no rewrite can pass ``report``'s tolerances, or ``None`` (see the module docstring).

    Only when ``report`` failed on a tolerance and *every* floating output is judged by its largest
    error (``error_stat="max"``) with ``atol + rtol * scale < eps * scale``; an output with a tolerance
    above rounding may let a fold pass, so then this says nothing.
    """
    floats = [c for c in report.checks if c.dtype in ROUNDING_EPS]
    if not floats or not any(c.failure == "tolerance" for c in floats):
        return None
    for c in floats:
        if c.error_stat != "max":
            return None
        scale = c.max_abs_error / c.max_rel_error if c.max_rel_error > 0 else None
        if scale is None and c.atol > _NEGLIGIBLE_ATOL:
            return None  # no error seen on this output, and an absolute tolerance: its scale is unknown
        rel = c.rtol + (c.atol / scale if scale else 0.0)
        if not rel < ROUNDING_EPS[c.dtype]:
            return None
    c = next(c for c in floats if c.failure == "tolerance")
    eps = ROUNDING_EPS[c.dtype]
    return (
        f"rtol={c.rtol:g} is below {c.dtype} rounding (one unit in the last place is {eps:.3g} of the output's "
        f"scale), so no change to the arithmetic can pass it (use rtol {eps * 10:.1g} or more)"
    )


def failure_message(report: VerifyReport, against: str | None = None) -> str | None:
    """One line saying why ``report`` failed, or ``None`` when it passed.

    Args:
        report: a verification report.
        against: what the candidate was compared to (a path, "the PyTorch model"): the line reads
            "not equivalent to <against>: ..." instead of "not equivalent: ...".

    Returns:
        "not equivalent[ to X][ with onnxruntime level 'L']: <describe_failure of the worst output>".
    """
    if report.passed:
        return None
    to = f" to {against}" if against else ""
    for rep in (report, *report.extra):
        if rep.passed:
            continue
        worst = rep.worst()
        what = describe_failure(worst) if worst is not None else "verification failed"
        level = "" if rep is report else f" with onnxruntime level {rep.optimization_level!r}"
        below = tolerance_below_rounding(rep)
        return f"not equivalent{to}{level}: {what}" + (f"; {below}" if below else "")
    return f"not equivalent{to}"  # pragma: no cover - passed is False only when a check failed


def ensure_passed(report: VerifyReport, *, where: str | None = None, against: str | None = None) -> None:
    """Raise :class:`~bnfold.errors.VerificationError` if ``report`` did not pass.

    The message is :func:`failure_message` (the worst output, its error relative to the output's
    scale and the sample, and the onnxruntime level when only the second check failed).

    Args:
        report: a verification report.
        where: prepended as ``"<where>: "`` (the candidate's path, say).
        against: what the candidate was compared to (see :func:`failure_message`).

    Raises:
        VerificationError: the report failed; ``.report`` is ``report``, ``.exit_code`` is 1.
    """
    message = failure_message(report, against)
    if message is not None:
        raise VerificationError(f"{where}: {message}" if where else message, report=report)


def runtime_notes(report: VerifyReport) -> list[str]:
    """One line per side that did not run in onnxruntime: which runtime ran it, and why."""
    return [
        f"{r.role} run with {'the ONNX reference evaluator' if r.runtime == REFERENCE_EVALUATOR else r.runtime}"
        + (f" ({r.reason})" if r.reason else "")
        for r in report.runtimes
        if r.runtime not in ("onnxruntime", "torch")
    ]


def runtimes_label(report: VerifyReport) -> str:
    """The runtimes that ran the models, truthfully: "onnxruntime", "the ONNX reference evaluator", both, ...

    Eager PyTorch and recorded outputs are named as such; a side onnxruntime could not run is never
    called onnxruntime.
    """
    names = {
        "onnxruntime": "onnxruntime",
        REFERENCE_EVALUATOR: "the ONNX reference evaluator",
        "torch": "PyTorch",
        "file": "recorded outputs",
    }
    seen: list[str] = []
    for r in report.runtimes:
        name = names.get(r.runtime, r.runtime)
        if name not in seen:
            seen.append(name)
    return " and ".join(seen) if seen else "onnxruntime"


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


BOUND_KEEPING_OPS = frozenset(
    {
        "Identity",
        "Dropout",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Relu",
        "Clip",
        "Tanh",
        "Sigmoid",
        "MaxPool",
        "GlobalMaxPool",
        "AveragePool",
        "GlobalAveragePool",
    }
)
"""Operators whose first output is off by at most the error of their first input (the others constant)."""
_SUMMING_OPS = frozenset({"Add", "Sub"})


def bias_rounding_atol(model: Any, bounds: Iterable[tuple[str, float]]) -> dict[str, float]:
    """``{graph output: atol}`` for the outputs the ``(value, bound)`` errors reach: the bound plus
    the dtype's default absolute tolerance (:data:`~bnfold.verification.compare.DEFAULT_TOLERANCES`).

    ``model`` is the folded ONNX model (its main graph's nodes in topological order, as ONNX
    requires); see the module docstring for the operators a bound passes through. An output that
    no bound reaches is absent. Floating outputs only (integer outputs compare exactly).
    """
    err: dict[str, float] = {}
    for value, bound in bounds:
        err[value] = err.get(value, 0.0) + abs(float(bound))
    if not err:
        return {}
    for node in model.graph.node:
        ins = [err.get(i, 0.0) if i else 0.0 for i in node.input]
        if not any(ins) or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        if node.op_type in BOUND_KEEPING_OPS:
            if ins[0] and not any(ins[1:]):
                err[node.output[0]] = err.get(node.output[0], 0.0) + ins[0]
        elif node.op_type in _SUMMING_OPS:
            err[node.output[0]] = err.get(node.output[0], 0.0) + sum(ins)
        elif node.op_type == "Concat":
            err[node.output[0]] = max(err.get(node.output[0], 0.0), *ins)
    floats = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}  # TensorProto elem types
    out: dict[str, float] = {}
    for vi in model.graph.output:
        dtype = floats.get(vi.type.tensor_type.elem_type)
        if dtype is not None and err.get(vi.name):
            out[vi.name] = err[vi.name] + DEFAULT_TOLERANCES[dtype].atol
    return out
