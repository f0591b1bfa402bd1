"""The verdicts of scale propagation that both backends write (:mod:`bnfold.onnx.propagate`,
:mod:`bnfold.fx.propagate`), so that one BN gets the same verdict detail through ONNX and PyTorch.

A channel's scale is *blocked* when it cannot move: negative before a ReLU / LeakyReLU / MaxPool
(``neg``), or zero with a non-zero shift where the shift must stop (``zero``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnfold.records import SkipReason

__all__ = ["ELIGIBLE", "Blocked", "all_blocked", "kept_affine"]

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


@dataclass(frozen=True, slots=True)
class Blocked:
    """The blocked channels of a BN, of ``C``: ``n_neg`` with a negative scale before ``neg_before`` and
    ``n_zero`` with a zero scale and a non-zero shift before ``zero_before`` (the two never overlap)."""

    C: int
    n_neg: int
    neg_before: str | None
    n_zero: int
    zero_before: str | None

    @classmethod
    def of(
        cls,
        neg: Any,
        zero: Any,
        labels: Sequence[str],
        sign_pos: int | None,
        stops: Sequence[str],
        stop: int | None,
    ) -> Blocked:
        """From the per-channel masks ``neg`` and ``zero`` (NumPy or torch booleans) and the positions of the
        node a negative scale meets (``sign_pos`` in ``labels``) and of the first stop (``stop`` in ``stops``)."""
        neg_before = labels[sign_pos] if sign_pos is not None else None
        zero_before = stops[stop] if stop is not None else None
        return cls(len(neg), int(neg.sum()), neg_before, int(zero.sum()), zero_before)

    @property
    def count(self) -> int:
        """How many channels are blocked."""
        return self.n_neg + self.n_zero

    def whole(self) -> str | None:
        """The reason the BN is kept whole where every channel is blocked (:func:`all_blocked`), else None."""
        if self.count < self.C:
            return None
        return all_blocked(self.C, self.n_neg, self.neg_before, self.n_zero, self.zero_before)

    def kept(self, at: str) -> str:
        """The verdict detail of the BN split per channel, the blocked ones kept at ``at`` (:func:`kept_affine`)."""
        return kept_affine(self.C, self.n_neg, self.neg_before, self.n_zero, self.zero_before, at)
