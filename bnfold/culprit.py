"""Find the fold(s) that make verification fail, so that every other fold can be kept.

Input: the fold sites (BN names) and a callback ``check(excluded) -> VerifyReport`` that folds every
site except ``excluded`` into a fresh copy of the original model and verifies it. The search never
trusts a fold it has not verified: the model it settles on is one the callback verified.

Algorithm (group testing by bisection, then a guarantee):

1. ``search(group)``: verify the model with only ``group`` folded. It passes: no culprit in the group
   (alone). It fails and the group is one site: that site is a culprit, and this report is "the error
   it caused". Otherwise split the group in two halves and search each. With ``k`` culprits among ``n``
   sites this costs about ``2 k log2 n`` verifications.
2. Verify the model with every site folded except the culprits. It passes: done.
3. It fails (folds that pass alone fail together, e.g. errors that add up across layers): add the
   remaining sites one at a time, in order, keeping each one the model still passes with (``n``
   verifications at most). The sites not kept are culprits too, each with the report of the first
   failing model it was added to.
4. Even the model with nothing folded fails: the failure is not caused by a BN fold (another rewrite,
   or the runtimes disagree); the result says so (``resolved`` False) and the caller refuses as before.

Results are cached by the set of sites folded, so no subset is verified twice. Works for any backend:
the callback hides how a subset is folded (``bnfold.onnx.fold_model(exclude=...)``,
``bnfold.fx.module.fold_module(exclude=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .records import FoldReport, Skip, SkipReason, VerifyReport

__all__ = ["Culprit", "CulpritSearch", "find_culprits", "culprit_skips", "fold_without_culprits"]

CheckFn = Callable[[frozenset[str]], VerifyReport]
"""``check(excluded)``: fold every site but ``excluded``, verify, return the report."""


@dataclass(frozen=True, slots=True)
class Culprit:
    """A fold that verification refuses, and the error it caused."""

    bn: str
    report: VerifyReport
    """Verification of the model with only this fold (or, step 3, with it added last)."""
    alone: bool = True
    """True: it fails on its own; False: it fails only together with the folds kept before it."""

    @property
    def max_rel_error(self) -> float:
        worst = self.report.worst()
        return 0.0 if worst is None else worst.max_rel_error

    def describe(self) -> str:
        """One sentence for the BN's verdict: the error this fold caused and the tolerance it exceeds."""
        from .verification import describe_failure

        worst = self.report.worst()
        what = describe_failure(worst) if worst is not None else "verification failed"
        how = "folding it alone" if self.alone else "folding it with the other kept folds"
        return f"{how} fails verification: {what}"

    def to_dict(self) -> dict[str, Any]:
        worst = self.report.worst()
        return {
            "bn": self.bn,
            "alone": self.alone,
            "output": None if worst is None else worst.name,
            "failure": None if worst is None else worst.failure,
            "max_abs_error": None if worst is None else worst.max_abs_error,
            "max_rel_error": self.max_rel_error,
        }


@dataclass(slots=True)
class CulpritSearch:
    """Outcome of :func:`find_culprits`."""

    culprits: list[Culprit]
    report: VerifyReport
    """Verification of the model with every site folded except the culprits."""
    checks: int
    """Verifications run (cache hits excluded)."""
    resolved: bool
    """``report`` passed (False: the failure is not caused by a fold, see step 4)."""
    kept: list[str] = field(default_factory=list)
    """Sites still folded."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolved": self.resolved,
            "checks": self.checks,
            "kept": len(self.kept),
            "culprits": [c.to_dict() for c in self.culprits],
        }


def find_culprits(sites: Sequence[str], check: CheckFn, *, failed: VerifyReport | None = None) -> CulpritSearch:
    """Find the sites whose fold makes verification fail (see the module docstring).

    Args:
        sites: the BN names of the folds, in model order.
        check: ``check(excluded)`` folds every site but ``excluded`` and returns the verification.
        failed: the (failing) report of the model with every site folded, when already known.

    Returns:
        A :class:`CulpritSearch`; ``resolved`` False when even the model with no fold fails.
    """
    everything = frozenset(sites)
    cache: dict[frozenset[str], VerifyReport] = {}
    if failed is not None:
        cache[frozenset()] = failed
    runs = [0]

    def run(folded: frozenset[str]) -> VerifyReport:
        excluded = everything - folded
        rep = cache.get(excluded)
        if rep is None:
            rep = check(excluded)
            cache[excluded] = rep
            runs[0] += 1
        return rep

    def search(group: list[str]) -> list[Culprit]:
        rep = run(frozenset(group))
        if rep.passed:
            return []
        if len(group) == 1:
            return [Culprit(group[0], rep)]
        half = len(group) // 2
        return search(group[:half]) + search(group[half:])

    order = list(dict.fromkeys(sites))
    full = run(everything)
    if full.passed:
        return CulpritSearch([], full, runs[0], True, order)
    culprits = search(order) if order else []
    bad = {c.bn for c in culprits}
    kept = [s for s in order if s not in bad]
    rep = run(frozenset(kept))
    if not rep.passed:
        # Step 3: the folds that pass alone fail together; keep them one at a time.
        none = run(frozenset())
        if not none.passed:
            return CulpritSearch(culprits, none, runs[0], False, [])
        accepted: list[str] = []
        rep = none
        for s in kept:
            trial = run(frozenset([*accepted, s]))
            if trial.passed:
                accepted.append(s)
                rep = trial
            else:
                culprits.append(Culprit(s, trial, alone=False))
        kept = accepted
        order_of = {s: i for i, s in enumerate(order)}
        culprits.sort(key=lambda c: order_of[c.bn])
    return CulpritSearch(culprits, rep, runs[0], True, kept)


def culprit_skips(search: CulpritSearch) -> dict[str, Skip]:
    """One ``Skip(reason=VERIFICATION)`` per culprit, its detail naming the error the fold caused."""
    return {c.bn: Skip(c.bn, SkipReason.VERIFICATION, c.describe()) for c in search.culprits}


def fold_without_culprits(
    report: FoldReport,
    fold: Callable[[frozenset[str]], tuple[Any, FoldReport]],
    verify: Callable[[Any], VerifyReport],
) -> tuple[Any, FoldReport, CulpritSearch]:
    """Re-fold without the folds that fail verification; return ``(model, fold report, search)``.

    Args:
        report: the :class:`~bnfold.records.FoldReport` of the fold that failed (its ``verification``
            is the failing report).
        fold: ``fold(excluded) -> (model, FoldReport)`` folds a fresh copy of the original, leaving the
            BNs in ``excluded``.
        verify: ``verify(model) -> VerifyReport`` against the original.

    Returns:
        The model of the last verified subset, its report (culprit BNs as ``Skip(VERIFICATION)`` naming
        their error, ``verification`` set, ``culprits``) and the search. When the search is not
        resolved the model is None and the report is the one given.
    """
    last: dict[frozenset[str], tuple[Any, FoldReport]] = {}

    def check(excluded: frozenset[str]) -> VerifyReport:
        model, rep = fold(excluded)
        v = verify(model)
        last.clear()  # only the latest verified model is kept: memory stays at one extra copy
        last[excluded] = (model, rep)
        return v

    sites = [s.bn for s in report.sites]
    search = find_culprits(sites, check, failed=report.verification)
    if not search.resolved:
        return None, replace(report, culprits=search), search
    excluded = frozenset(sites) - frozenset(search.kept)
    if excluded not in last:
        last.clear()
        model, rep = fold(excluded)
        search.report = verify(model)
        last[excluded] = (model, rep)
    model, new = last[excluded]
    skips = culprit_skips(search)
    names = ", ".join(c.bn for c in search.culprits)
    note = (f"{len(search.culprits)} fold(s) failed verification and were left in place ({names}); "
            f"found in {search.checks} verification(s)")
    new = replace(new, verdicts=[skips.get(v.bn, v) for v in new.verdicts], verification=search.report,
                  culprits=search, notes=(*new.notes, note))
    return model, new, search
