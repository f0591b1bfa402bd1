"""The driver of a verification: options checked, sources prepared, both sides run, outputs compared.

Order (each step raises before any model runs when it can):
    1. options: onnxruntime levels, samples, tolerances and thresholds (:class:`bnfold.verification.compare.Comparator`),
       the ``save_outputs`` folder; ``load_outputs`` hands over to :mod:`.recorded`;
    2. sources (:mod:`.sources`): bytes or a file for each ONNX side, PyTorch models as they are;
    3. runners (:mod:`.runners`) for the ONNX sides; their inputs and outputs checked against each
       other (:mod:`.checks`); PyTorch inputs from the example tensors;
    4. inputs: the user's data, else seeded random tensors per sample (:mod:`bnfold.verification.inputs`);
    5. a PyTorch candidate is exported to ONNX (named after the reference) and run in onnxruntime;
    6. every sample through the reference first (its outputs kept), its onnxruntime session dropped,
       then the candidate's session built and checked against the reference's inputs and outputs,
       every sample through it, every output compared; ``extra_level`` (after the candidate's session
       is dropped), ``locate`` and ``save_outputs`` on top. The worker holds one model at a time: a
       verified fold costs one model's weights in onnxruntime, not two.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError, NotComparableError, OptionError
from bnfold.hints import INPUT_SHAPES
from bnfold.records import VerifyReport

from .checks import (
    check_extra_level,
    check_inputs,
    check_outputs,
    compare_outputs,
    example_inputs_for,
    example_shapes,
    torch_specs,
)
from .compare import Comparator, ToleranceArg
from .inputs import InputSpec, random_inputs, resolve_shapes, user_inputs
from .isolation import printable, worker_scope
from .recorded import save_recording, verify_recorded
from .runners import (
    OrtRunner,
    Runner,
    TorchRunner,
    check_level,
    flatten,
    onnx_runner,
    run_torch_once,
    same_runtime_or_better,
)
from .sources import export_candidate, is_torch, onnx_source

__all__ = ["verify"]


def _filled_dims(
    specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """The inputs whose symbolic dimensions bnfold filled with its defaults (not given by the caller)."""
    given = given or {}
    return {
        s.name: tuple(int(d) for d in shapes[s.name])
        for s in specs
        if s.name not in given
        and s.name in shapes
        and any(not (isinstance(d, int) and d > 0) for d in s.dims)
    }


def _run_all(
    runner: Any, feeds: Sequence[Mapping[str, np.ndarray]], filled: Mapping[str, tuple[int, ...]]
) -> list[dict[str, np.ndarray]]:
    """Every sample through ``runner``; a failure on inputs whose shapes bnfold chose says which and how to set them.

    Symbolic dimensions are filled with defaults (2 for a first dimension, 8 for the others) that a real
    model may not take (a detector needs 640, an audio model a window length): the error then names
    the input, the shape tried and the way to give another one.
    """
    try:
        return [runner.run(f, i) for i, f in enumerate(feeds)]
    except NotComparableError as e:
        if not filled or e.__cause__ is None or isinstance(e.__cause__, BnfoldError):
            raise  # not the runtime failing on the data (a crash, a missing input, a training-mode BN)
        tried = "; ".join(f"{printable(n, 80)}={'x'.join(str(d) for d in s)}" for n, s in filled.items())
        raise NotComparableError(
            f"{e}; bnfold chose the symbolic dimensions ({tried})",
            hints=[INPUT_SHAPES.naming(printable(next(iter(filled)), 80))],
        ) from e


class _Loaded:
    """A runner's runtime as it was when its model loaded (what :func:`same_runtime_or_better` reads)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime


def _release(runner: Runner) -> None:
    """Drop ``runner``'s onnxruntime session (and its fallback's model): its outputs are all taken."""
    if isinstance(runner, OrtRunner):
        runner.worker.drop(runner.sid)
        runner.fallback = None  # the reference evaluator's copy of the model, if it came to that


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
        atol: absolute tolerance for floating outputs (default per dtype, :data:`~bnfold.verification.compare.DEFAULT_TOLERANCES`):
            one value, or ``{output: value}`` (key ``"*"`` for the other outputs).
        rtol: tolerance relative to the output's scale (max |reference|), default per dtype; same forms.
        optimization_level: onnxruntime graph optimisation for both models: "disable" (default),
            "basic", "extended", "all".
        extra_level: if given, run the candidate again at this level and add that comparison to
            ``report.extra`` (e.g. the level used in deployment).
        example_inputs: a tuple of tensors giving input shapes and dtypes when both models are PyTorch
            (an ``ExportedProgram``'s own example inputs are used when absent).
        error_stat: the statistic of ``|c - r|`` judged against the tolerance: "max" (default: every
            element), "mean", "median" or a quantile ("q0.99", "p99"); see :mod:`bnfold.verification.compare`.
        min_cosine: also fail an output whose cosine similarity with the reference is below this.
        min_snr_db: also fail an output whose signal-to-noise ratio is below this many dB.
        save_outputs: write the inputs and both models' outputs to this ``.npz`` file
            (:mod:`bnfold.verification.golden`).
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
    check_level(optimization_level)
    if extra_level is not None:
        check_level(extra_level)
    if samples < 1:
        raise OptionError(f"samples must be at least 1, got {samples}")
    comparator = Comparator(atol, rtol, error_stat, min_cosine, min_snr_db)
    comparator.validate()
    if save_outputs is not None:  # a cheap check before any model runs: never over a file read here
        from bnfold.io import check_output_path, files_read_by

        reads = [
            f
            for r in (reference, candidate, inputs, load_outputs)
            if isinstance(r, (str, os.PathLike))
            for f in files_read_by(r)
        ]
        check_output_path(None, save_outputs, input_files=reads)
    if load_outputs is not None:
        if inputs is not None:
            raise OptionError("load_outputs: the saved inputs are used; inputs cannot be given as well")
        if reference is not None:
            raise OptionError(
                "load_outputs: the saved outputs are the reference; pass only a candidate (or none)"
            )
        if locate:
            raise OptionError("locate needs both models (not saved outputs)")
        return verify_recorded(
            load_outputs, candidate, comparator, optimization_level, extra_level, save_outputs
        )
    if candidate is None or reference is None:
        raise OptionError("verify needs a reference and a candidate (or load_outputs)")

    with contextlib.ExitStack() as stack, contextlib.ExitStack() as ort_scope:
        worker = ort_scope.enter_context(worker_scope())  # started now: its imports overlap what follows
        ref_src = onnx_source(reference, "reference", stack)
        cand_src = onnx_source(candidate, "candidate", stack)
        ref_torch, cand_torch = is_torch(ref_src), is_torch(cand_src)

        ref: Runner
        cand: Runner | None = None
        if not ref_torch:
            ref = onnx_runner(ref_src, optimization_level, "reference", worker)
            specs = ref.inputs
            out_names = ref.outputs
        elif not cand_torch:  # the reference runs in this process: the candidate's session names the inputs
            cand = onnx_runner(cand_src, optimization_level, "candidate", worker)
            specs, out_names = cand.inputs, cand.outputs
        if ref_torch and cand_torch:
            ex = example_inputs_for(ref_src, example_inputs)
            ex = example_inputs_for(cand_src, None) if ex is None else ex
            if ex is None:
                raise OptionError("both models are PyTorch: pass example_inputs (a tuple of tensors)")
            specs = torch_specs(ex)
            out_names = []  # named after the exported candidate below
        if ref_torch:
            ref = TorchRunner(ref_src, "reference")
            ref.inputs = specs

        if not (ref_torch and cand_torch):
            ex = example_inputs_for(ref_src, example_inputs) if ref_torch else example_inputs
            if ex is not None:  # symbolic dims of the ONNX side take the example's shape
                input_shapes = {**example_shapes(ex, specs), **dict(input_shapes or {})}
        shapes = resolve_shapes(specs, input_shapes)
        if inputs is not None:
            feeds = user_inputs(specs, inputs)
        else:
            rng = np.random.default_rng(seed)
            feeds = [random_inputs(specs, shapes, rng) for _ in range(samples)]

        cand_from: Any = cand_src
        cand_label = "candidate"
        if cand_torch:
            if not out_names:
                n_out = len(flatten(run_torch_once(cand_src, feeds[0], specs)))
                out_names = [f"output_{i}" for i in range(n_out)]
            cand_from = export_candidate(cand_src, feeds[0], specs, out_names)
            cand_label = "candidate (exported to ONNX)"
        if isinstance(ref, TorchRunner):
            ref.outputs = list(out_names)

        comparator.validate(out_names)
        filled = {} if inputs is not None else _filled_dims(specs, shapes, input_shapes)
        # One onnxruntime session at a time: the reference runs every sample (its outputs are kept),
        # its session is dropped, then the candidate's is built. Both alive at once would cost the
        # worker the two models' weights together.
        loaded_as = ref.runtime  # how the reference loaded, before a crash in a run could change it
        ref_out = _run_all(ref, feeds, filled)
        _release(ref)
        if cand is None:
            cand = onnx_runner(cand_from, optimization_level, cand_label, worker)
            if not ref_torch:
                same_runtime_or_better(_Loaded(loaded_as), cand)
            check_inputs(specs, cand.inputs, exported=cand_torch)
            check_outputs(out_names, cand.outputs)
        # a candidate falls back on a crash only where its reference did not run in onnxruntime
        cand.may_fall_back = not (isinstance(ref, OrtRunner) and ref.runtime.runtime == "onnxruntime")
        cand_out = _run_all(cand, feeds, filled)
        _release(cand)
        if not ref_torch:
            same_runtime_or_better(ref, cand)
        checks = compare_outputs(ref_out, cand_out, out_names, comparator)
        extra = check_extra_level(extra_level, cand_from, feeds, ref_out, out_names, comparator, worker)
        runtimes = (ref.runtime, cand.runtime)
        ort_scope.close()  # the worker goes back to the idle slot (or ends): locate's runs take it, not a second one
        located = None
        if locate:
            if ref_torch or cand_torch:
                raise OptionError(
                    "locate compares intermediate tensors of two ONNX models; export the PyTorch side first"
                )
            from .locate import locate_divergence

            located = locate_divergence(ref_src, cand_src, feeds[0], comparator)
        if save_outputs is not None:
            save_recording(save_outputs, specs, out_names, feeds, ref_out, cand_out, runtimes)
    return VerifyReport(
        checks=checks,
        samples=len(feeds),
        optimization_level=optimization_level,
        extra=extra,
        runtimes=runtimes,
        comparator=comparator.to_dict(),
        locate=located,
    )
