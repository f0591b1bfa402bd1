"""One call for an export script: fold in PyTorch, export to ONNX, fold what is left, verify, write.

Steps of :func:`export_onnx`:

1. ``bnfold.fx.fold_module`` on a copy of the model (the caller's model is never changed);
2. ``torch.onnx.export`` of the folded copy (legacy exporter by default, ``dynamo=True`` for the
   current one). The legacy exporter in eval mode already folds Conv+BN itself (not ConvTranspose or
   Linear); the current exporter with ``optimize=False`` keeps BN. Whatever the exporter left,
3. ``bnfold.onnx.fold_model`` folds in the ONNX graph, so the file has no foldable BN left;
4. ``bnfold.verification.verify`` runs the ONNX model in onnxruntime (graph optimisations off) against the
   *original* PyTorch model on the example inputs; a mismatch raises
   :class:`~bnfold.errors.VerificationError` and nothing is written (unless ``force=True``);
5. the file is written atomically (``bnfold.io.save``): a temporary file in the same folder, then
   ``os.replace``; no partial file is ever left.

The report's ``extra`` says who folded what: ``{"torch": n, "onnx": m, "exporter": k, ...}`` where
``exporter`` counts BNs that were neither folded by bnfold in PyTorch nor present in the exported graph
(the exporter removed them itself).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import OptionError, VerificationError
from .records import FoldReport

__all__ = ["export_onnx"]

log = logging.getLogger(__name__)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise OptionError("example_inputs must be a tensor or a tuple of tensors")


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
    atol: float | None = None,
    rtol: float | None = None,
    force: bool = False,
) -> FoldReport:
    """Fold ``model`` in PyTorch, export it to ONNX, fold the ONNX graph, verify, write ``path``.

    Args:
        model: an ``nn.Module`` in eval mode (not changed).
        example_inputs: a tensor or a tuple of positional tensors for the export and the check.
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset (the exporter's default when None).
        dynamo: use the current (dynamo) exporter instead of the legacy one.
        verify: compare the ONNX file with the original model in onnxruntime before writing.
        input_names: ONNX input names.
        output_names: ONNX output names.
        dynamic_axes: as ``torch.onnx.export``.
        atol: absolute tolerance of the check (bnfold's per-dtype default when None).
        rtol: relative tolerance of the check.
        force: write the file even when the check fails (the report still says so).

    Returns:
        A :class:`~bnfold.records.FoldReport` (backend "export_onnx"): verdicts of the PyTorch fold
        followed by those of the ONNX fold, the verification, and ``extra`` with who folded what.

    Raises:
        VerificationError: the ONNX model does not compute what ``model`` computes (nothing written).
        ModelStateError: ``model`` is in train() mode.
    """
    import onnx
    import torch

    from .fx import fold_module
    from .onnx import count_bn, fold_model

    t0 = time.perf_counter()
    args = _as_tuple(example_inputs)
    folded, treport = fold_module(model, example_inputs=args)
    kw: dict[str, Any] = {"dynamo": dynamo}
    if opset is not None:
        kw["opset_version"] = opset
    if input_names is not None:
        kw["input_names"] = list(input_names)
    if output_names is not None:
        kw["output_names"] = list(output_names)
    if dynamic_axes is not None:
        kw["dynamic_axes"] = dict(dynamic_axes)
    buf = io.BytesIO()
    if dynamo:
        prog = torch.onnx.export(folded, args, **{k: v for k, v in kw.items() if k != "dynamic_axes"})
        onnx_model = prog.model_proto  # type: ignore[union-attr]
    else:
        torch.onnx.export(folded, args, buf, **kw)  # type: ignore[arg-type]
        onnx_model = onnx.load_from_string(buf.getvalue())
    left_in_onnx = count_bn(onnx_model)
    onnx_model, oreport = fold_model(onnx_model, inplace=True)
    report = FoldReport(backend="export_onnx", verdicts=[*treport.verdicts, *oreport.verdicts])
    report.bn_before = treport.bn_before
    report.bn_after = oreport.bn_after
    report.nodes_before, report.params_before = treport.nodes_before, treport.params_before
    report.nodes_after, report.params_after = oreport.nodes_after, oreport.params_after
    torch_left = len(treport.skips)
    report.extra = {
        "torch": treport.folded,
        "exporter": max(torch_left - left_in_onnx, 0),
        "onnx": oreport.folded,
        "left": oreport.bn_after,
        "exporter_kind": "dynamo" if dynamo else "legacy",
    }
    report.notes.extend(treport.notes)
    report.notes.extend(oreport.notes)
    if verify:
        from .verification import verify as run_verify

        vrep = run_verify(model, onnx_model, example_inputs=args, atol=atol, rtol=rtol)
        report.verification = vrep
        if not vrep.passed and not force:
            raise VerificationError(
                f"{path}: the exported ONNX model does not match the PyTorch model "
                f"(max relative error {vrep.max_rel_error:.3g}); nothing written",
                vrep,
            )
    from .io import save

    save(onnx_model, path)
    report.seconds = time.perf_counter() - t0
    return report
