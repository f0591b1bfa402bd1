"""The verdicts of scale propagation that both backends write (:mod:`bnfold.onnx.propagate`,
:mod:`bnfold.fx.propagate`), so that one BN gets the same verdict detail through ONNX and PyTorch.

A channel's scale is *blocked* when it cannot move: negative before a ReLU / LeakyReLU / MaxPool
(``neg``), or zero with a non-zero shift where the shift must stop (``zero``).
"""

from __future__ import annotations

from bnfold.records import SkipReason

__all__ = ["ELIGIBLE", "all_blocked", "kept_affine"]

ELIGIBLE = frozenset(
    {
        SkipReason.NO_PRODUCER,
        SkipReason.OTHER_CONSUMERS,
        SkipReason.GRAPH_OUTPUT,
        SkipReason.PADDING,
        SkipReason.UNFOLDABLE_BRANCH,
        SkipReason.UNSUPPORTED_LAYER,
    }
)
"""Skip reasons of the BNs scale propagation tries, in both backends (never training mode, verification,
non-constant, ...)."""


def _parts(
    n_neg: int, neg_before: str | None, n_zero: int, zero_before: str | None, lead: str, verb: str
) -> list[str]:
    parts = []
    if n_neg and neg_before is not None:
        parts.append(f"{n_neg}{lead} {verb} a negative scale before {neg_before}")
    if n_zero and zero_before is not None:
        parts.append(f"{n_zero}{lead} {verb} a zero scale and a non-zero shift before {zero_before}")
    return parts


def all_blocked(C: int, n_neg: int, neg_before: str | None, n_zero: int, zero_before: str | None) -> str:
    """The reason a BN is kept whole: every one of its ``C`` channels is blocked."""
    return "; ".join(_parts(n_neg, neg_before, n_zero, zero_before, f" of {C} channels", "have"))


def kept_affine(
    C: int, n_neg: int, neg_before: str | None, n_zero: int, zero_before: str | None, at: str
) -> str:
    """The verdict detail of a BN split per channel: the blocked channels keep one Mul and one Add at ``at``."""
    what = ", ".join(_parts(n_neg, neg_before, n_zero, zero_before, "", "with"))
    return f"{n_neg + n_zero} of {C} channels keep their affine ({what}): one Mul and one Add before {at}"
