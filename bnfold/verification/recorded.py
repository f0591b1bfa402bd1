"""Verification against recorded outputs: save a run's inputs and outputs, check a candidate later.

Rules:
    * ``save_outputs`` writes the inputs, the input and output names, the reference's outputs, the
      candidate's outputs and the runtime of each side to one ``.npz`` file (:mod:`bnfold.verification.golden`);
    * ``load_outputs`` reads such a file: its inputs are the inputs and its reference outputs stand for
      the reference (no reference model runs); a candidate model is checked against them with the
      same runners and checks as a live verification, a missing candidate re-compares the saved
      candidate outputs (no model runs at all);
    * the report names the file as the reference's runtime (``RuntimeUse(role, "file", ...)``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.errors import OptionError
from bnfold.records import RuntimeUse, VerifyReport

from .checks import _check_inputs, _check_outputs, _compare_outputs, _extra_level
from .compare import Comparator
from .inputs import InputSpec
from .isolation import worker_scope
from .runners import _onnx_runner, _OrtRunner
from .sources import _export_candidate, _is_torch, _onnx_source

__all__: list[str] = []


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
            [s.name for s in specs],
            list(out_names),
            [dict(f) for f in feeds],
            [dict(r) for r in ref_out],
            None if cand_out is None else [dict(c) for c in cand_out],
            {r.role: r.runtime for r in runtimes},
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
    golden = RuntimeUse(
        "reference", "file", f"{os.fspath(path)} (recorded with {rec.runtimes.get('reference', '?')})"
    )
    if candidate is None:
        if rec.candidate is None:
            raise OptionError(
                f"{os.fspath(path)}: holds no candidate outputs; pass a candidate model to check"
            )
        checks = _compare_outputs(rec.reference, rec.candidate, rec.output_names, comparator)
        cand_rt = RuntimeUse(
            "candidate", "file", f"{os.fspath(path)} (recorded with {rec.runtimes.get('candidate', '?')})"
        )
        return VerifyReport(
            checks=checks,
            samples=len(rec.feeds),
            optimization_level="recorded",
            runtimes=(golden, cand_rt),
            comparator=comparator.to_dict(),
        )
    specs = [InputSpec(n, rec.feeds[0][n].dtype, tuple(rec.feeds[0][n].shape)) for n in rec.input_names]
    with contextlib.ExitStack() as stack:
        src = _onnx_source(candidate, "candidate", stack)
        if _is_torch(src):
            src = _export_candidate(src, rec.feeds[0], specs, rec.output_names)
        worker = stack.enter_context(worker_scope())
        cand = _onnx_runner(src, level, "candidate", worker)
        _check_inputs(specs, cand.inputs, exported=False)
        _check_outputs(rec.output_names, cand.outputs)
        cand_out = [cand.run(f, i) for i, f in enumerate(rec.feeds)]
        if isinstance(cand, _OrtRunner):  # dropped before the extra_level session loads: one model at a time
            worker.drop(cand.sid)
        checks = _compare_outputs(rec.reference, cand_out, rec.output_names, comparator)
        extra = _extra_level(extra_level, src, rec.feeds, rec.reference, rec.output_names, comparator, worker)
    if save_to is not None:
        _save_recording(
            save_to, specs, rec.output_names, rec.feeds, rec.reference, cand_out, (golden, cand.runtime)
        )
    return VerifyReport(
        checks=checks,
        samples=len(rec.feeds),
        optimization_level=level,
        extra=extra,
        runtimes=(golden, cand.runtime),
        comparator=comparator.to_dict(),
    )
