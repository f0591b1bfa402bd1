"""The rewrite choices of one fold, as one frozen record passed from the entry points to the backends.

The public functions (``bnfold.fold``, ``fold_with_report``, ``inspect``, ``export_onnx``, ...) keep
their keyword arguments and build one :class:`FoldOptions`; the CLI builds it from its flags into the
file jobs' settings (:class:`bnfold.files.FoldSettings`); the post-fold steps (:mod:`bnfold.postfold`)
and the backends (``bnfold.onnx.fold_model``, ``bnfold.fx.fold_module``) read the fields they use.
Adding an option touches this record, the public signatures that expose it and the backend that
uses it, nothing in between.

Per-call mechanics are not options: ``inplace``, ``dry_run``, the example inputs and the BNs a
culprit search excludes are arguments of each call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = ["FoldOptions"]


@dataclass(frozen=True, slots=True)
class FoldOptions:
    """What a fold rewrites, and which post-fold steps run (defaults: those of ``bnfold.fold``)."""

    affine: bool = False
    """ONNX: turn BNs that have nothing to fold into into one Mul + one Add."""
    merge_branches: bool = True
    """Merge sums of branches that read one tensor into one Conv (``bnfold.onnx.merge``, ``bnfold.fx.merge``)."""
    propagate: bool = True
    """ONNX: move the scale and shift of BNs left through Relu / pooling / zero padding (``bnfold.onnx.propagate``)."""
    batch_stats: str | None = None
    """``"instance"``: BNs that normalise with their batch become InstanceNorms (exact at batch 1 only)."""
    eval_semantics: bool = False
    """PyTorch: fold a module in ``train()`` mode with its inference semantics."""
    flush_denormals: bool = True
    """Set the subnormal values of the tensors the fold wrote to zero (``bnfold.denormals``)."""
    health: bool = False
    """Audit the BNs (``bnfold.health``) into ``report.health``."""
    prune_constant_channels: bool = False
    """nn.Module: drop the channels that are constant after the fold, where exact (``bnfold.constant_channels``)."""

    @property
    def flush_as_written(self) -> bool:
        """ONNX: the fold itself flushes each tensor as it writes it (one pass, the same rule); not with
        the audit on, which must see the fold unflushed (then the post-fold step flushes)."""
        return self.flush_denormals and not self.health

    def refold(self) -> FoldOptions:
        """The options of a second fold of the same model (a culprit re-fold, the ONNX fold of an
        export): the health audit and pruning are the first fold's, the rewrite choices and the flush stay."""
        return replace(self, health=False, prune_constant_channels=False)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> FoldOptions:
        """The options among the arguments of an entry point whose parameters carry the fields' names
        (its ``locals()``): ``bnfold.fold``, ``inspect``, the CLI's commands. Fields it does not take keep
        their defaults; other names are not options (``inplace``, ``dry_run``, ``verify``, ...)."""
        return cls(**{f.name: args[f.name] for f in fields(cls) if f.name in args})

    def given(self, choices: dict[str, Any]) -> FoldOptions:
        """These options with ``choices`` (field names) replaced: the keyword form of a direct backend
        call, ``fold_model(m, propagate=False)``.

        Raises:
            TypeError: a name that is not an option.
        """
        return replace(self, **choices) if choices else self
