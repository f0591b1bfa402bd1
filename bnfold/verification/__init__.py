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
      supplies an inference BatchNormalization for every opset, which the evaluator lacks or gets wrong). ``VerifyReport.runtimes`` names the runtime of each side
      and onnxruntime's reason. A candidate that only the fallback runs while onnxruntime runs the
      reference is refused (``NotComparableError``): the rewrite broke the model for onnxruntime;
    * onnxruntime runs in a child process (:mod:`.isolation`, one per verification, reused): a crash
      inside it becomes a :class:`~bnfold.errors.NotComparableError` (or, for a side the fallback may
      run, a run in the reference evaluator), a signal interrupts the run at once, and onnxruntime's
      own log never reaches the user's stderr;
    * onnxruntime always gets bytes or a file: a proto whose tensors pass the 2 GiB protobuf limit is
      written to a temporary folder as a small model file plus an external-data file, tensor by tensor
      (:func:`bnfold.io.save`), never serialised whole (also above 256 MiB of weights, so that no
      serialised copy is held in memory). A path is handed to onnxruntime as it is: the file verified is
      the file on disk (the file jobs verify their staged output that way), not parsed again here.

Inputs: see :mod:`bnfold.verification.inputs` (seeded random tensors matching dtype and shape; symbolic dims from
``input_shapes``, else 2 for the first dimension and 8 for the others; integers in [0, 10); or user data).

Comparison, per output and sample, in float64 (``r`` reference, ``c`` candidate)::

    scale         = max |r| over finite elements     (taken as 1 when the reference is all zero)
    max_abs_error = max |c - r|
    max_rel_error = max_abs_error / scale             ("error relative to the output's scale")
    mismatches    = #{ |c - r| > atol + rtol * scale }

NaN on both sides at the same place, and equal infinities, count as equal; NaN on one side only is a
mismatch (error = inf). Integer and boolean outputs compare exactly (atol = rtol = 0). By default an
output passes when it has no mismatch; :mod:`bnfold.verification.compare` adds the options (per-output tolerances,
an error statistic, cosine and SNR thresholds, NaN/Inf named as such, a heat summary). Default tolerances (:data:`DEFAULT_TOLERANCES`, per dtype, the less precise
dtype of the two sides wins): rtol is tens to hundreds of roundings of the dtype at the output's scale
(an exact fold changes each output by a few roundings, about 2-7e-7 of the scale in float32), atol is
the dtype's smallest normal number (an all-zero reference has scale 1, so atol is no longer needed as a
floor). The float32 resolution is
therefore 1e-5 of the output's scale: a change of one weight by 1e-3 of its value, in a layer that feeds
the output, is caught.

Verification never raises on a mismatch (``report.passed`` is False; :func:`ensure_passed` raises
:class:`~bnfold.errors.VerificationError` and :func:`failure_message` words it: :mod:`.policy`, the one
place the policy lives); it raises :class:`~bnfold.errors.NotComparableError` when the
two models cannot be compared (different input or output names, incompatible shapes, a model that
no runtime can load or run). ``save_outputs`` / ``load_outputs`` record a run and check against it
later (:mod:`bnfold.verification.golden`); ``locate`` names the first intermediate tensor that diverges
(:mod:`bnfold.verification.locate`). An ONNX-only verification never imports torch.

Layout (one job per module): :mod:`.driver` (:func:`verify`), :mod:`.runners` (onnxruntime, the
reference evaluator, eager PyTorch), :mod:`.sources` (bytes, files, external data, export of a
PyTorch candidate), :mod:`.checks` (input/output compatibility, the per-output comparison),
:mod:`.recorded` (golden outputs), :mod:`.policy` (failure wording, :func:`ensure_passed`).
"""

from __future__ import annotations

from .compare import (
    DEFAULT_TOLERANCES,
    ERROR_STATS,
    Comparator,
    Tolerance,
    default_tolerance,
    parse_tolerances,
)
from .driver import verify
from .inputs import parse_input_shapes
from .policy import describe_failure, ensure_passed, failure_message, runtime_notes, runtimes_label
from .runners import OPTIMIZATION_LEVELS, REFERENCE_EVALUATOR, check_level

__all__ = [
    "verify",
    "ensure_passed",
    "failure_message",
    "describe_failure",
    "runtime_notes",
    "runtimes_label",
    "check_level",
    "parse_input_shapes",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "OPTIMIZATION_LEVELS",
    "default_tolerance",
    "parse_tolerances",
    "Comparator",
    "ERROR_STATS",
    "REFERENCE_EVALUATOR",
]
