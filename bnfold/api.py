"""The in-memory API: pick the backend for a model, fold, and run the post-fold steps.

(File-level jobs, load -> fold -> verify -> save, are in :mod:`bnfold.files`.)

Rules:
    * functional by default: the model given is never changed unless ``inplace=True``;
    * ``fold`` returns a model of the type it was given (``onnx.ModelProto``, ``nn.Module``,
      ``torch.export.ExportedProgram``), ``inspect`` returns the report only, ``fold_with_report``
      returns both;
    * nothing here imports torch unless the model is a PyTorch object (an ONNX user never pays for it);
    * an option that does not apply to the model given raises :class:`~bnfold.errors.OptionError`
      (``affine`` on a PyTorch model, ``example_inputs`` on an ONNX model, ...): never silently ignored;
    * the signatures are typed for users: ``bnfold.fold(model_proto)`` is an ``onnx.ModelProto`` to a
      type checker, ``bnfold.fold(module)`` an ``nn.Module``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .errors import OptionError, UnsupportedModelError
from .health_records import HealthReport
from .kinds import model_kind
from .options import FoldOptions
from .records import FoldReport

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

Model = TypeVar("Model", "onnx.ModelProto", "torch.nn.Module", "torch.export.ExportedProgram")
"""The three model types; ``fold`` returns the type it was given."""

__all__ = ["Model", "fold", "inspect", "fold_with_report", "fold_with_options", "health"]

log = logging.getLogger(__name__)


# Options each kind of model takes beyond the common ones (dry_run, flush_denormals, health).
_APPLIES = {
    "onnx": {"inplace", "affine", "batch_stats"},
    "module": {"inplace", "eval_semantics", "example_inputs", "prune_constant_channels", "batch_stats"},
    "export": set(),
}
_WHERE = {"onnx": "an ONNX model", "module": "an nn.Module", "export": "a torch.export program"}


_REPARAM_METHODS = (
    "reparameterize",
    "switch_to_deploy",
    "fuse_reparam",
    "get_equivalent_kernel_bias",
    "fuse",
)
"""Methods by which re-parameterisable blocks (RepVGG, MobileOne, FastViT, YOLOv6/7, ...) merge themselves."""


def own_reparam_note(model: Any) -> str | None:
    """A note naming the submodules of an ``nn.Module`` that have their own re-parameterisation method
    (bnfold never calls them: they change the module in ways it cannot verify), or None."""
    found: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        for meth in _REPARAM_METHODS:
            if callable(getattr(type(m), meth, None)):
                found.setdefault(meth, []).append(name or "<root>")
                break
    if not found:
        return None
    parts = [
        f"{meth}() on {len(n)} module(s) ({', '.join(n[:3])}{', ...' if len(n) > 3 else ''})"
        for meth, n in found.items()
    ]
    return (
        "the model has its own re-parameterisation: " + "; ".join(parts) + ". bnfold did not call it; "
        "bnfold's own branch merge (merge_branches) merges such blocks, compared against the original"
    )


_RESTRICTED = frozenset().union(*_APPLIES.values())
"""The options that apply to some kinds of model only."""


def _check_options(kind: str, options: FoldOptions, **call: Any) -> None:
    given = {k: getattr(options, k) for k in _RESTRICTED if hasattr(options, k)} | call
    wrong = sorted(k for k, v in given.items() if not (v is None or v is False) and k not in _APPLIES[kind])
    if wrong:
        where = " or ".join(_WHERE[k] for k in _APPLIES if wrong[0] in _APPLIES[k])
        raise OptionError(f"{', '.join(wrong)}: applies to {where}, not to {_WHERE[kind]}")


def fold_with_report(
    model: Model,
    *,
    inplace: bool = False,
    affine: bool = False,
    eval_semantics: bool = False,
    dry_run: bool = False,
    example_inputs: Any = None,
    flush_denormals: bool = True,
    health: bool = False,
    prune_constant_channels: bool = False,
    merge_branches: bool = True,
    batch_stats: str | None = None,
    propagate: bool = True,
) -> tuple[Model, FoldReport]:
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
            (:mod:`bnfold.constant_channels`); ``report.pruned_channels`` lists them.
        health: also audit the BNs (:func:`bnfold.health`) into ``report.health``; the audit needs
            the original, so it is refused with ``inplace=True``.
        merge_branches: merge sums of branches that read one tensor (RepVGG, MobileOne, ...) into
            one Conv (ONNX: :mod:`bnfold.onnx.merge`; nn.Module: :mod:`bnfold.fx.merge`, the result is then a
            ``torch.fx.GraphModule``; not with ``inplace``); ``report.merges`` lists them. False keeps the branches.
        batch_stats: ``"instance"``: replace each BN that normalises with its batch at inference (ONNX
            ``training_mode=1``, ``nn.BatchNorm{1,2,3}d(track_running_stats=False)``) by an InstanceNorm
            with the BN's affine. Exact at batch 1 only: at batch > 1 the model then computes something
            else (the report says so). None (default) leaves them, with a reason naming this option.
            A batch-statistics BN on a constant (ONNX) is evaluated to a constant either way.
        propagate: split each BN left into scale and shift and move them through ReLU, pooling,
            Flatten and zero padding into the next Conv / Gemm / MatMul (ONNX) or Conv / Linear
            (nn.Module; the result is then a ``torch.fx.GraphModule``; not with ``inplace``), by exact
            identities (:mod:`bnfold.onnx.propagate`, :mod:`bnfold.fx.propagate`; verdict status
            ``propagated``). False keeps those BNs.

    Returns:
        The folded model (same type as given) and a :class:`~bnfold.records.FoldReport` with one
        verdict per BatchNorm.

    Raises:
        OptionError: an option that does not apply to this kind of model (e.g. ``affine`` on an
            ``nn.Module``, ``inplace`` on an ExportedProgram).
    """
    options = FoldOptions.from_args(locals())
    return fold_with_options(model, options, inplace=inplace, dry_run=dry_run, example_inputs=example_inputs)


def fold_with_options(
    model: Model,
    options: FoldOptions,
    *,
    inplace: bool = False,
    dry_run: bool = False,
    example_inputs: Any = None,
) -> tuple[Model, FoldReport]:
    """:func:`fold_with_report` with its choices as one :class:`~bnfold.options.FoldOptions` record
    (what the file jobs and the export call); ``inplace``, ``dry_run`` and ``example_inputs`` as there.

    Raises:
        OptionError: an option that does not apply to this kind of model.
    """
    kind = model_kind(model)
    _check_options(kind, options, inplace=inplace, example_inputs=example_inputs)
    check_batch_stats(options.batch_stats)
    from .postfold import run

    given: Any = model  # one of the three kinds: model_kind dispatches, each backend takes its own

    def backend() -> tuple[Any, FoldReport]:
        if kind == "onnx":
            from .io import check_model_data
            from .onnx import fold_model

            check_model_data(given)  # as io.load does for a file: duplicate names, short tensors, BN lengths
            # The flush runs as the fold writes each tensor (no second pass over the weights).
            return fold_model(given, options=options, dry_run=dry_run, inplace=inplace)
        if kind == "export":
            from .fx import fold_exported

            return fold_exported(given, dry_run=dry_run, merge_branches=options.merge_branches)
        import torch

        from .fx import fold_module

        ex = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        if options.batch_stats is None:
            return fold_module(given, options=options, inplace=inplace, dry_run=dry_run, example_inputs=ex)
        from .fx.batch_stats import convert_batch_stats, copy_for, with_conversions

        work, sites = convert_batch_stats(given if dry_run else copy_for(given, inplace), dry_run=dry_run)
        folded, rep = fold_module(work, options=options, inplace=inplace, dry_run=dry_run, example_inputs=ex)
        return folded, with_conversions(rep, sites, given, dry_run)

    out: Any
    report: FoldReport
    if not dry_run:  # the post-fold steps (bnfold.postfold): health audit, constant-channel pruning, flush
        out, report = run(model, kind, options, backend, inplace=inplace)
    else:
        out, report = backend()
    if kind == "module":
        note = own_reparam_note(model)
        if note is not None:
            report = replace(report, notes=(*report.notes, note))
    if dry_run and options.health:
        audit = _audit_copy(
            model,
            affine=options.affine,
            eval_semantics=options.eval_semantics,
            example_inputs=example_inputs,
        )
        report = report.with_post(health=audit)
    log.debug("folded %d of %d BN in %.3fs", report.folded, report.bn_before, report.seconds)
    return cast("Model", out), report


def check_batch_stats(batch_stats: str | None) -> None:
    """``batch_stats`` is None or ``"instance"``."""
    if batch_stats not in (None, "instance"):
        raise OptionError(f"batch_stats={batch_stats!r}: expected 'instance' (or None to leave such BNs)")


def fold(
    model: Model,
    *,
    inplace: bool = False,
    affine: bool = False,
    eval_semantics: bool = False,
    example_inputs: Any = None,
    flush_denormals: bool = True,
    prune_constant_channels: bool = False,
    merge_branches: bool = True,
    batch_stats: str | None = None,
    propagate: bool = True,
) -> Model:
    """Fold every exactly-foldable BatchNorm; return a model of the type given.

    ``model = bnfold.fold(model)`` works for ``onnx.ModelProto``, ``torch.nn.Module`` and
    ``torch.export.ExportedProgram``. Arguments as :func:`fold_with_report`.
    """
    options = FoldOptions.from_args(locals())
    return fold_with_options(model, options, inplace=inplace, example_inputs=example_inputs)[0]


def inspect(
    model: Model,
    *,
    affine: bool = False,
    eval_semantics: bool = False,
    example_inputs: Any = None,
    health: bool = False,
    merge_branches: bool = True,
    batch_stats: str | None = None,
    propagate: bool = True,
) -> FoldReport:
    """The verdict for every BatchNorm (folded where, or left and why) without changing anything.

    Arguments as :func:`fold_with_report` (the ones that decide a verdict).
    """
    options = FoldOptions.from_args(locals())
    return fold_with_options(model, options, dry_run=True, example_inputs=example_inputs)[1]


def health(
    model: Any,
    *,
    affine: bool = False,
    eval_semantics: bool = False,
    example_inputs: Any = None,
) -> HealthReport:
    """Audit the BatchNorms of ``model``: dead channels, tiny variances, float16/bfloat16 range and
    the subnormal values a fold would write (see the module docstring).

    Args:
        model: an ``onnx.ModelProto`` or a ``torch.nn.Module`` (not changed).
        affine, eval_semantics, example_inputs: as :func:`bnfold.fold_with_report`, so that the
            verdicts (and hence the targets) are those of the fold you would run.

    Returns:
        A :class:`~bnfold.records.HealthReport` with one :class:`~bnfold.records.BnHealth` per BN.

    Raises:
        UnsupportedModelError: a ``torch.export`` program.
        InputError: not a model bnfold handles.
    """
    from .denormals import snapshot
    from .health_audit import audit

    kind = model_kind(model)
    if kind == "export":
        raise UnsupportedModelError(
            "the health audit reads nn.Module and ONNX models, not torch.export programs: audit the "
            "nn.Module it was exported from, or the ONNX file"
        )
    before = snapshot(model)
    kwargs: dict[str, Any] = {"eval_semantics": eval_semantics, "example_inputs": example_inputs}
    if kind == "onnx":
        kwargs = {"affine": affine}
    # What the fold itself writes, before any flush (which is what the audit is about).
    folded, report = fold_with_report(model, flush_denormals=False, **kwargs)
    return audit(model, folded, report, before)


_audit_copy = health  # for fold_with_report, whose ``health`` argument shadows the function
