"""One call for an export script: fold in PyTorch, export to ONNX, fold what is left, verify, write.

Steps of :func:`export_onnx`:

1. ``bnfold.fx.fold_module`` on a copy of the model (the caller's model is never changed), then the
   post-fold steps of :mod:`bnfold.postfold` (denormal flush of what the fold wrote, as ``bnfold.fold``);
2. ``torch.onnx.export`` of the folded copy (legacy exporter by default, ``dynamo=True`` for the
   current one). The legacy exporter in eval mode already folds Conv+BN itself (not ConvTranspose or
   Linear); the current exporter with ``optimize=False`` keeps BN. Whatever the exporter left,
3. ``bnfold.onnx.fold_model`` folds in the ONNX graph, so the file has no foldable BN left (flushing
   the denormals of what it writes); the report's ``flushed_denormals`` is the sum of both folds;
4. ``bnfold.verification.verify`` runs the ONNX model in onnxruntime (graph optimisations off) against the
   *original* PyTorch model on the example inputs; a mismatch raises
   :class:`~bnfold.errors.VerificationError` and nothing is written (unless ``force=True``);
5. the file is written atomically (``bnfold.io.save``): a temporary file in the same folder, then
   ``os.replace``; no partial file is ever left.

Names and shapes of the exported file (the defaults a deployment engineer expects):

* input names come from the parameters of ``model.forward`` (``x``, not ``input.1``), output names are
  ``output`` (one output) or ``output0``, ``output1``, ... (see :func:`io_names`); given names win;
* the first dimension of every input, and of every output whose first dimension equals the inputs'
  batch, is the symbolic ``batch`` (``dynamic_batch=True``, the default): the example inputs fix only
  the shapes the model is verified on, not the shapes it can be run on.

:func:`export_folded` is the same path for the file jobs (``bnfold fold model.pt out.onnx``): it returns
the folded ``ModelProto`` and the report, and leaves verification and writing to the job; it also
exports a torch.export program (dynamo exporter), which :func:`export_onnx` does not take.

The report's ``export`` (:class:`~bnfold.records.ExportCounts`) says who folded what (torch, onnx, exporter) where
``exporter`` counts BNs that were neither folded by bnfold in PyTorch nor present in the exported graph
(the exporter removed them itself).

Threads: torch's exporter keeps its state in globals, so every export runs under one process-wide
lock (:data:`bnfold.torch_onnx.EXPORT_LOCK`): :func:`export_onnx` may be called from several threads,
their exports run one at a time (folding and verification still run in parallel).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import BnfoldError, OptionError, UnsupportedModelError, VerificationError
from .options import FoldOptions
from .postfold import added_flushes, run
from .records import ExportCounts, FoldReport, PostFoldResult, Verdict

__all__ = ["export_onnx", "export_folded", "ExportSettings", "io_names", "batch_axes", "BATCH_DIM"]

BATCH_DIM = "batch"
"""Name of the symbolic first dimension of an exported model with a dynamic batch."""

log = logging.getLogger(__name__)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise OptionError("example_inputs must be a tensor or a tuple of tensors")


def _positional_names(model: Any, n: int) -> list[str]:
    """The first ``n`` positional parameter names of ``model.forward``; ``input{i}`` where none fits."""
    import inspect

    names: list[str] = []
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        params = []
    for prm in params:
        if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD):
            names.append(prm.name)
    names = names[:n]
    names += [f"input{i}" for i in range(len(names), n)]
    return names if len(set(names)) == n else [f"input{i}" for i in range(n)]


def io_names(
    model: Any,
    n_inputs: int,
    n_outputs: int,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The ONNX input and output names of an export: the given ones, else the defaults (module docstring).

    Raises:
        OptionError: more names than the model has inputs/outputs, or a name used twice.
    """
    ins = list(input_names) if input_names else _positional_names(model, n_inputs)
    outs = (
        list(output_names)
        if output_names
        else (["output"] if n_outputs == 1 else [f"output{i}" for i in range(n_outputs)])
    )
    if len(ins) > n_inputs:
        raise OptionError(f"--input-names: {len(ins)} names for a model with {n_inputs} input(s)")
    if len(outs) > n_outputs:
        raise OptionError(f"--output-names: {len(outs)} names for a model with {n_outputs} output(s)")
    if len(set(ins) | set(outs)) != len(ins) + len(outs):
        raise OptionError("--input-names/--output-names: every name must be distinct")
    return ins, outs


def batch_axes(
    input_names: Sequence[str], inputs: Sequence[Any], output_names: Sequence[str], outputs: Sequence[Any]
) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` making dim 0 the symbolic batch: every input of rank >= 1, and every output whose
    first dimension equals the first input's batch (an output without a batch axis keeps its shape)."""
    axes: dict[str, dict[int, str]] = {}
    batch = None
    for name, t in zip(input_names, inputs):
        if getattr(t, "dim", lambda: 0)() >= 1:
            axes[name] = {0: BATCH_DIM}
            batch = t.shape[0] if batch is None else batch
    for name, t in zip(output_names, outputs):
        if batch is not None and getattr(t, "dim", lambda: 0)() >= 1 and t.shape[0] == batch:
            axes[name] = {0: BATCH_DIM}
    return axes


def _flat_outputs(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat_outputs(o)]
    return [out]


def export_onnx(
    model: Any,
    example_inputs: Any,
    path: str,
    *,
    opset: int | None = None,
    dynamo: bool = False,
    verify: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
    flush_denormals: bool = True,
    merge_branches: bool = True,
) -> FoldReport:
    """Fold ``model`` in PyTorch, export it to ONNX, fold the ONNX graph, verify, write ``path``.

    Args:
        model: an ``nn.Module`` in eval mode (not changed).
        example_inputs: a tensor or a tuple of positional tensors for the export and the check.
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset (the exporter's default when None).
        dynamo: use the current (dynamo) exporter instead of the legacy one.
        verify: compare the ONNX file with the original model in onnxruntime before writing.
        input_names: ONNX input names (default: the parameter names of ``model.forward``).
        output_names: ONNX output names (default: ``output`` or ``output0``, ``output1``, ...).
        dynamic_axes: as ``torch.onnx.export`` (legacy exporter); overrides ``dynamic_batch``.
        dynamic_batch: make the first dimension the symbolic ``batch`` (legacy exporter; the dynamo
            exporter keeps the shapes it traced).
        atol: absolute tolerance of the check (bnfold's per-dtype default when None).
        rtol: relative tolerance of the check.
        force: write the file even when the check fails (the report still says so).
        flush_denormals: set the subnormal values of the tensors the folds wrote to zero, as
            :func:`bnfold.fold` does (on by default); ``report.flushed_denormals`` says how many.
        merge_branches: merge sums of branches of one tensor into one conv, as :func:`bnfold.fold`
            (in PyTorch, then in the ONNX graph for what the export left); False keeps the branches.

    Returns:
        A :class:`~bnfold.records.FoldReport` (backend "export_onnx"): verdicts of the PyTorch fold
        followed by those of the ONNX fold, the verification, and ``extra`` with who folded what.

    Raises:
        VerificationError: the ONNX model does not compute what ``model`` computes (nothing written).
        ModelStateError: ``model`` is in train() mode.

    Thread safety: callable from several threads at once; the ``torch.onnx.export`` step is serialised
    by a process-wide lock (torch's exporter state is global), the rest runs in parallel.
    """
    t0 = time.perf_counter()
    args = _as_tuple(example_inputs)
    onnx_model, report = _export_module(
        model,
        args,
        opset=opset,
        dynamo=dynamo,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        dynamic_batch=dynamic_batch,
        options=FoldOptions(flush_denormals=flush_denormals, merge_branches=merge_branches),
    )
    if verify:
        from .verification import verify as run_verify

        vrep = run_verify(model, onnx_model, example_inputs=args, atol=atol, rtol=rtol)
        report = replace(report, verification=vrep)
        if not vrep.passed and not force:
            from .verification import failure_message

            message = failure_message(vrep, against="the PyTorch model")
            raise VerificationError(f"{path}: the exported ONNX model is {message}; nothing written", vrep)
    from .io import save

    save(onnx_model, path)
    return replace(report, seconds=time.perf_counter() - t0)


def _torch_export(model: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """``torch.onnx.export`` -> ``ModelProto`` in memory (legacy exporter into a buffer; dynamo's proto).

    The exporter runs under :data:`bnfold.torch_onnx.EXPORT_LOCK` (its state is global in torch).
    """
    import onnx

    from .torch_onnx import export as locked_export

    try:
        if kw.get("dynamo"):
            prog = locked_export(model, args, **{k: v for k, v in kw.items() if k != "dynamic_axes"})
            return prog.model_proto
        buf = io.BytesIO()
        locked_export(model, args, buf, **kw)
    except (BnfoldError, Warning):  # a warning raised as an error (``-W error``) stays what it is
        raise
    except Exception as e:  # the exporter's own failure (an AssertionError, a RuntimeError...): typed
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise UnsupportedModelError(f"torch.onnx.export failed ({what})") from e
    return onnx.load_from_string(buf.getvalue())


def _export_module(
    model: Any,
    args: tuple[Any, ...],
    *,
    opset: int | None,
    dynamo: bool,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    dynamic_axes: Mapping[str, Any] | None,
    dynamic_batch: bool,
    options: FoldOptions,
) -> tuple[Any, FoldReport]:
    """Steps 1-3 of :func:`export_onnx`: fold in PyTorch, export, fold what is left; ``(ModelProto, report)``.

    Each fold runs the post-fold steps of ``options`` (:func:`bnfold.postfold.run`; pruning is refused
    for ONNX outputs before this point).
    """
    import torch

    from .fx import fold_module

    folded, treport = run(
        model, "module", options, lambda: fold_module(model, options=options, example_inputs=args)
    )
    with torch.no_grad():  # one run tells how many outputs there are and which carry the batch
        outputs = _flat_outputs(folded(*args))
    in_names, out_names = io_names(model, len(args), len(outputs), input_names, output_names)
    kw: dict[str, Any] = {"dynamo": dynamo, "input_names": in_names, "output_names": out_names}
    if opset is not None:
        kw["opset_version"] = opset
    if dynamic_axes is not None:
        kw["dynamic_axes"] = dict(dynamic_axes)
    elif dynamic_batch and not dynamo:
        kw["dynamic_axes"] = batch_axes(in_names, args, out_names, outputs)
    onnx_model, oreport, left_in_onnx = _fold_export(_torch_export(folded, args, kw), options)
    report = _merged(treport, oreport, left_in_onnx, backend="export_onnx")
    return onnx_model, replace(
        report,
        export=ExportCounts(
            torch=treport.folded,
            exporter=max(len(treport.skips) - left_in_onnx, 0),
            onnx=oreport.folded,
            left=oreport.bn_after,
            exporter_kind="dynamo" if dynamo else "legacy",
        ),
    )


def _fold_export(proto: Any, options: FoldOptions) -> tuple[Any, FoldReport, int]:
    """Step 3: fold what the exporter left in ``proto`` (in place), flushing what it writes.

    The health audit (of the PyTorch fold) and pruning are the first fold's: only the flush runs here
    (:meth:`~bnfold.options.FoldOptions.refold`). Returns ``(proto, report, BNs in the exported graph)``.
    """
    from .onnx import count_bn, fold_model

    left_in_onnx = count_bn(proto)
    again = options.refold()
    proto, oreport = run(
        proto, "onnx", again, lambda: fold_model(proto, options=again, inplace=True), inplace=True
    )
    return proto, oreport, left_in_onnx


def _merged(treport: FoldReport, oreport: FoldReport, left_in_onnx: int, *, backend: str) -> FoldReport:
    """The PyTorch fold's report continued by the ONNX fold of its export: one verdict per physical BN.

    A BN the PyTorch fold left is in the exported graph (its ONNX verdict replaces the PyTorch one) or
    was removed by the exporter itself (legacy exporter, Conv+BN in eval mode): then the PyTorch skip
    stays, and ``report.export.exporter`` counts it. When the exported graph has as many BNs as the PyTorch
    fold left (``left_in_onnx``), every one of them is there: only the ONNX verdicts are kept for them.
    Otherwise the legacy exporter's node names tell which (they carry the module path:
    ``/layer1/layer1.0/bn1/BatchNormalization`` for ``layer1.0.bn1``).
    """
    from .records import Direction, Site

    # Nodes are counted in the exported ONNX graph, before and after its ONNX fold: the PyTorch
    # side counts modules, which cannot be compared with ONNX nodes.
    treport = replace(treport, nodes_before=oreport.nodes_before)
    if left_in_onnx == len(treport.skips):
        kept: list[Verdict] = list(treport.sites)
    else:
        onnx_modules = {_module_of(v.bn) for v in oreport.verdicts}
        kept = [v for v in treport.verdicts if v.folded or v.bn not in onnx_modules]
        gone = [v for v in kept if not v.folded]
        if len(gone) == len(treport.skips) - left_in_onnx:
            # Not in the exported graph: the exporter removed them (folded into their Conv), so they
            # are not left (a report "1 -> 0: left 1" contradicts itself).
            kept = [
                v
                if v.folded
                else Site(
                    v.bn,
                    "",
                    "exporter",
                    Direction.FORWARD,
                    f"folded by the ONNX exporter (not by bnfold's PyTorch fold: {v.detail})",
                    "conv-bn",
                )
                for v in kept
            ]
    return FoldReport(
        backend=backend,
        verdicts=[*kept, *oreport.verdicts],
        bn_before=treport.bn_before,
        bn_after=oreport.bn_after,
        nodes_before=treport.nodes_before,
        params_before=treport.params_before,
        nodes_after=oreport.nodes_after,
        params_after=oreport.params_after,
        notes=(*treport.notes, *oreport.notes),
        post=PostFoldResult(
            health=treport.health,
            flushed_denormals=added_flushes(treport.flushed_denormals, oreport.flushed_denormals),
            quant=(*treport.quant, *oreport.quant),
        ),
        merges=(*treport.merges, *oreport.merges),
        convs_before=treport.convs_before if treport.convs_before is not None else oreport.convs_before,
        convs_after=oreport.convs_after,
    )


def _module_of(node_name: str) -> str:
    """The module path an exported BN node came from: ``/a/a.0/bn/BatchNormalization`` -> ``a.0.bn``."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) >= 2:  # legacy scope names: one part per module level, the op type last
        return ".".join(p.rsplit(".", 1)[-1] for p in parts[:-1])
    return node_name


@dataclass(frozen=True)
class ExportSettings:
    """How a PyTorch model is written to ``.onnx`` (see :mod:`bnfold.export`)."""

    opset: int | None = None
    dynamic_batch: bool = True
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def flags(self) -> dict[str, object]:
        """The CLI flags these settings came from, with the values given (for option checks)."""
        return {
            "--opset": self.opset,
            "--static-batch": not self.dynamic_batch,
            "--input-names": self.input_names,
            "--output-names": self.output_names,
        }


def export_folded(
    model: Any,
    examples: tuple[Any, ...] | None,
    *,
    export: ExportSettings,
    progress: Callable[[str, int, int], None],
    options: FoldOptions | None = None,
) -> tuple[Any, FoldReport]:
    """PyTorch -> folded ONNX for the file jobs: ``(ModelProto, report)``; nothing is verified or written.

    An ``nn.Module`` goes through :func:`export_onnx` (into a temporary folder); an ExportedProgram is
    folded as a program, exported with the dynamo exporter and folded again. ``options``
    (:class:`~bnfold.options.FoldOptions`, default: ``bnfold.fold``'s): ``affine`` turns the BNs left in
    the ONNX graph into Mul + Add; the post-fold steps run after each fold, the health audit is of the
    PyTorch fold.

    Raises:
        OptionError: ``--static-batch`` for a program (it keeps the shapes it was exported with).
    """
    import torch

    options = options or FoldOptions()
    progress("export", 0, 1)
    t = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        # A program is folded as a program, exported as one (dynamo exporter: its dynamic shapes and
        # signature names are the program's own), and folded again.
        from .api import fold_with_options

        if not export.dynamic_batch:
            raise OptionError("--static-batch: a torch.export program keeps the shapes it was exported with")
        # affine is the ONNX fold's (Mul + Add are ONNX nodes)
        folded_ep, treport = fold_with_options(model, replace(options, affine=False))
        kw: dict[str, Any] = {"dynamo": True, "verbose": False}
        if export.opset is not None:
            kw["opset_version"] = export.opset
        if export.input_names:
            kw["input_names"] = list(export.input_names)
        if export.output_names:
            kw["output_names"] = list(export.output_names)
        proto, oreport, left_in_onnx = _fold_export(_torch_export(folded_ep, (), kw), options)
        report = _merged(treport, oreport, left_in_onnx, backend=treport.backend)
    else:
        proto, report = _export_module(
            model,
            tuple(examples or ()),
            opset=export.opset,
            dynamo=False,
            input_names=export.input_names or None,
            output_names=export.output_names or None,
            dynamic_axes=None,
            dynamic_batch=export.dynamic_batch,
            options=options,
        )
    progress("export", 1, 1)
    return proto, replace(report, seconds=time.perf_counter() - t)
