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

from .checks import check_extra_level, check_inputs, check_outputs, compare_outputs
from .compare import Comparator
from .inputs import InputSpec, require_finite
from .isolation import worker_scope
from .runners import OrtRunner, onnx_runner
from .sources import export_candidate, is_torch, onnx_source

__all__: list[str] = ["save_recording", "verify_recorded"]


def save_recording(
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


def verify_recorded(
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
        checks = compare_outputs(rec.reference, rec.candidate, rec.output_names, comparator)
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
    for i, feed in enumerate(rec.feeds):
        for name, a in feed.items():
            require_finite(a, f"{os.fspath(path)}: saved input {name!r} of sample {i}")
    specs = [InputSpec(n, rec.feeds[0][n].dtype, tuple(rec.feeds[0][n].shape)) for n in rec.input_names]
    with contextlib.ExitStack() as stack:
        src = onnx_source(candidate, "candidate", stack)
        if is_torch(src):
            src = export_candidate(src, rec.feeds[0], specs, rec.output_names)
        worker = stack.enter_context(worker_scope())
        cand = onnx_runner(src, level, "candidate", worker)
        check_inputs(specs, cand.inputs, exported=False)
        check_outputs(rec.output_names, cand.outputs)
        cand_out = [cand.run(f, i) for i, f in enumerate(rec.feeds)]
        if isinstance(cand, OrtRunner):  # dropped before the extra_level session loads: one model at a time
            worker.drop(cand.sid)
        checks = compare_outputs(rec.reference, cand_out, rec.output_names, comparator)
        extra = check_extra_level(
            extra_level, src, rec.feeds, rec.reference, rec.output_names, comparator, worker
        )
    if save_to is not None:
        save_recording(
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
