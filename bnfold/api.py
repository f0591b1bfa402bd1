"""Orchestration: pick the backend for a model, fold, verify, and the file-level jobs the CLI runs.

Rules:
    * functional by default: the model given is never changed unless ``inplace=True``;
    * ``fold`` returns a model of the type it was given (``onnx.ModelProto``, ``nn.Module``,
      ``torch.export.ExportedProgram``), ``inspect`` returns the report only, ``fold_with_report``
      returns both;
    * nothing here imports torch unless the model is a PyTorch object (an ONNX user never pays for it).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .records import FoldReport

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = ["fold", "inspect", "fold_with_report", "model_kind"]

log = logging.getLogger(__name__)


def model_kind(model: Any) -> str:
    """Which backend handles ``model``: "onnx", "export" or "module".

    Raises:
        InputError: the object is none of the supported model types.
    """
    mod = type(model).__module__
    if mod.startswith("onnx") and type(model).__name__ == "ModelProto":
        return "onnx"
    if "torch" in sys.modules:
        import torch

        if isinstance(model, torch.export.ExportedProgram):
            return "export"
        if isinstance(model, torch.nn.Module):
            return "module"
    raise InputError(
        f"cannot fold a {type(model).__module__}.{type(model).__name__}: expected an onnx.ModelProto, "
        "a torch.nn.Module or a torch.export.ExportedProgram"
    )


def fold_with_report(
    model: Any,
    *,
    inplace: bool = False,
    affine: bool = False,
    eval_semantics: bool = False,
    dry_run: bool = False,
    example_inputs: Any = None,
    flush_denormals: bool = True,
    health: bool = False,
    prune_constant_channels: bool = False,
) -> tuple[Any, FoldReport]:
    """Fold every exactly-foldable BatchNorm and return ``(model, report)``.

    Args:
        model: an ``onnx.ModelProto``, ``torch.nn.Module`` or ``torch.export.ExportedProgram``.
        inplace: change the given model itself instead of a copy (nn.Module and ModelProto).
        affine: ONNX only: turn BNs that have nothing to fold into into one Mul + one Add.
        eval_semantics: fold an nn.Module that is in ``train()`` mode with its inference semantics
            (without it, such a module is refused with :class:`~bnfold.errors.ModelStateError`).
        dry_run: decide only; the model comes back unchanged (as :func:`inspect`).
        example_inputs: nn.Module only: a tensor or tuple of tensors the model takes. Shapes recorded
            from them prove where a Linear meets a BatchNorm1d on a 2-D (N, C) tensor; without them
            such pairs are folded only where the graph itself proves the rank (e.g. after a flatten).
        flush_denormals: set the subnormal values of the tensors the fold wrote to zero (on by
            default: without it a folded ResNet-18 ran 15x slower than its unfolded original on CPU, see
            ``benchmarks/results/denormals.md``; each value moves by less than 1.2e-38).
            ``report.flushed_denormals`` says how many; False keeps the exact rounded fold.
        prune_constant_channels: nn.Module only: drop the channels that are constant after the fold
            (gamma = 0) where exact, their constant moved into the next layer's bias
            (:mod:`bnfold.constant_channels`); ``report.extra["pruned_channels"]`` lists them.
        health: also audit the BNs (:func:`bnfold.health`) into ``report.health``; the audit needs
            the original, so it is refused with ``inplace=True``.

    Returns:
        The folded model (same type as given) and a :class:`~bnfold.records.FoldReport` with one
        verdict per BatchNorm.
    """
    kind = model_kind(model)
    from .postfold import PostFold, after_fold, before_fold

    steps = PostFold(flush_denormals, health, prune_constant_channels)
    before = None if dry_run else before_fold(model, kind, steps, inplace=inplace)
    t0 = time.perf_counter()
    out: Any
    report: FoldReport
    if kind == "onnx":
        from .io import check_model_data
        from .onnx import fold_model

        check_model_data(model)  # as io.load does for a file: duplicate names, short tensors, BN lengths

        out, report = fold_model(model, affine=affine, dry_run=dry_run, inplace=inplace)
    elif kind == "export":
        from .fx import fold_exported

        out, report = fold_exported(model, dry_run=dry_run)
    else:
        import torch

        from .fx import fold_module

        ex = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        out, report = fold_module(
            model, inplace=inplace, dry_run=dry_run, eval_semantics=eval_semantics, example_inputs=ex
        )
    report.seconds = time.perf_counter() - t0
    if not dry_run:  # health audit, constant-channel pruning, denormal flush (bnfold.postfold)
        after_fold(model, out, report, before, kind, steps)
    elif health:
        from .health import health as audit_copy

        report.health = audit_copy(model, affine=affine, eval_semantics=eval_semantics, example_inputs=example_inputs)
    log.debug("folded %d of %d BN in %.3fs", report.folded, report.bn_before, report.seconds)
    return out, report


def fold(model: Any, **kwargs: Any) -> Any:
    """Fold every exactly-foldable BatchNorm; return a model of the type given.

    ``model = bnfold.fold(model)`` works for ``onnx.ModelProto``, ``torch.nn.Module`` and
    ``torch.export.ExportedProgram``. Keyword arguments as :func:`fold_with_report`.
    """
    return fold_with_report(model, **kwargs)[0]


def inspect(model: Any, **kwargs: Any) -> FoldReport:
    """The verdict for every BatchNorm (folded where, or left and why) without changing anything."""
    kwargs["dry_run"] = True
    kwargs.pop("inplace", None)
    return fold_with_report(model, **kwargs)[1]
