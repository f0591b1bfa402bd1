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

Bounds (:class:`CulpritBudget`, stated in the report's note and in ``--json`` under ``culprits``):

* no bisection when no fold can pass: every floating output's tolerance is below its dtype's rounding
  (:func:`bnfold.verification.policy.tolerance_below_rounding`, e.g. ``--rtol 1e-9`` on float32);
* at most ``max_checks`` verifications (64) and no new one after ``max_seconds`` (600 s), plus the
  verifications that settle what is kept (at most two);
* folds fail everywhere: after ``give_up_after`` (8) single folds failed while no verification passed
  yet, one verification of the group the bisection would search last (the far half) decides: it
  passes (the culprits were only dense at the start) and the search goes on, or it stops; in step 3,
  as many failed additions in a row stop it;
* stopped early, the search keeps the groups it verified to pass (together, if they pass together;
  else the largest one), and leaves every fold it did not clear ("untested");
* no fold kept (all culprits, stopped with none cleared, or step 4): ``resolved`` is False, and the
  caller refuses as for a failed verification (exit 1) instead of writing the unfolded model.

Results are cached by the set of sites folded, so no subset is verified twice. Works for any backend:
the callback hides how a subset is folded (``bnfold.onnx.fold_model(exclude=...)``,
``bnfold.fx.module.fold_module(exclude=...)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .records import FoldReport, Skip, SkipReason, VerifyReport

__all__ = [
    "Culprit",
    "CulpritBudget",
    "CulpritSearch",
    "DEFAULT_BUDGET",
    "find_culprits",
    "culprit_skips",
    "fold_without_culprits",
]

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


@dataclass(frozen=True, slots=True)
class CulpritBudget:
    """How much the search may spend before it stops (see the module docstring, "Bounds")."""

    max_checks: int = 64
    """Verifications the search may run (cache hits are free), besides the final one."""
    max_seconds: float = 600.0
    """Wall-clock seconds after which no new verification starts (one running is not interrupted)."""
    give_up_after: int = 8
    """Folds fail everywhere: stop after this many single folds failed while no verification passed
    yet, or (step 3) this many additions in a row failed."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_checks": self.max_checks,
            "max_seconds": self.max_seconds,
            "give_up_after": self.give_up_after,
        }


DEFAULT_BUDGET = CulpritBudget()
"""The budget :func:`fold_without_culprits` uses unless given another."""


@dataclass(slots=True)
class CulpritSearch:
    """Outcome of :func:`find_culprits`."""

    culprits: list[Culprit]
    report: VerifyReport
    """Verification of the model with every site folded except the culprits."""
    checks: int
    """Verifications run (cache hits excluded)."""
    resolved: bool
    """A verified model with at least one fold kept was found (``report`` passed). False: even the
    model with no fold fails (step 4), every fold fails, the search stopped with none cleared, or the
    tolerance is below the outputs' rounding (``stopped`` says which)."""
    kept: list[str] = field(default_factory=list)
    """Sites still folded."""
    untested: list[str] = field(default_factory=list)
    """Sites left in place because the search stopped before it could clear them."""
    stopped: str = ""
    """Why the search ended before testing every site ("" when it did not)."""
    budget: CulpritBudget = DEFAULT_BUDGET
    seconds: float = 0.0
    """Wall-clock time of the search."""

    @property
    def why_none_kept(self) -> str:
        """One phrase saying why no fold could be kept ("" when some were, or when there was none)."""
        if self.resolved:
            return ""
        if self.stopped:
            return self.stopped
        if not self.report.passed:
            return "even the model with no fold fails verification: the failure is not caused by a fold"
        return "every fold fails verification"

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolved": self.resolved,
            "checks": self.checks,
            "kept": len(self.kept),
            "culprits": [c.to_dict() for c in self.culprits],
            "untested": list(self.untested),
            "stopped": self.stopped or None,
            "budget": self.budget.to_dict(),
            "seconds": self.seconds,
        }


class _Stop(Exception):
    """The budget is spent or the folds fail everywhere (the message says which)."""


def find_culprits(
    sites: Sequence[str],
    check: CheckFn,
    *,
    failed: VerifyReport | None = None,
    budget: CulpritBudget = DEFAULT_BUDGET,
    clock: Callable[[], float] = time.monotonic,
) -> CulpritSearch:
    """Find the sites whose fold makes verification fail (see the module docstring).

    Args:
        sites: the BN names of the folds, in model order.
        check: ``check(excluded)`` folds every site but ``excluded`` and returns the verification.
        failed: the (failing) report of the model with every site folded, when already known.
        budget: the bounds of the search (verifications, seconds, early give-up).
        clock: the time source for ``budget.max_seconds``.

    Returns:
        A :class:`CulpritSearch`; ``resolved`` False when no fold could be kept (``why_none_kept``).
    """
    from .verification.policy import tolerance_below_rounding

    t0 = clock()
    everything = frozenset(sites)
    order = list(dict.fromkeys(sites))
    cache: dict[frozenset[str], VerifyReport] = {}
    if failed is not None:
        cache[frozenset()] = failed
    runs = [0]

    def run(folded: frozenset[str], *, final: bool = False) -> VerifyReport:
        excluded = everything - folded
        rep = cache.get(excluded)
        if rep is None:
            if not final:
                if runs[0] >= budget.max_checks:
                    raise _Stop(f"its budget of {budget.max_checks} verifications was spent")
                if clock() - t0 >= budget.max_seconds:
                    raise _Stop(f"its budget of {budget.max_seconds:g} s was spent")
            rep = check(excluded)
            cache[excluded] = rep
            runs[0] += 1
        return rep

    def done(
        culprits: list[Culprit],
        rep: VerifyReport,
        kept: list[str],
        untested: Sequence[str] = (),
        stopped: str = "",
        resolved: bool | None = None,
    ) -> CulpritSearch:
        at = {s: i for i, s in enumerate(order)}
        culprits.sort(key=lambda c: at[c.bn])
        ok = bool(kept) and rep.passed if resolved is None else resolved
        return CulpritSearch(
            culprits,
            rep,
            runs[0],
            ok,
            kept,
            sorted(untested, key=at.__getitem__),
            stopped,
            budget,
            clock() - t0,
        )

    full = run(everything, final=True)
    if full.passed:
        return done([], full, order, resolved=True)
    below = tolerance_below_rounding(full)
    if below:  # no fold can pass: bisecting would blame every one of them
        return done([], full, [], stopped=below, resolved=False)

    # Step 1: bisection, depth first, first half first.
    culprits: list[Culprit] = []
    cleared: list[list[str]] = []  # groups verified to pass (each alone)
    pending = [order] if order else []
    stopped = ""
    try:
        while pending:
            group = pending.pop()
            rep = run(frozenset(group))
            if rep.passed:
                cleared.append(group)
            elif len(group) == 1:
                culprits.append(Culprit(group[0], rep))
                if not cleared and len(culprits) == budget.give_up_after:
                    # Everywhere, or only dense at the start? The group searched last (the far half) tells.
                    far = pending.pop(0) if pending else []
                    if not far or not run(frozenset(far)).passed:
                        raise _Stop(
                            f"folds fail everywhere: the first {len(culprits)} single folds tried all "
                            "failed, and so did the far half of the folds"
                        )
                    cleared.append(far)
            else:
                half = len(group) // 2
                pending += [group[half:], group[:half]]
    except _Stop as e:
        stopped = f"the culprit search stopped early: {e}"
    bad = {c.bn for c in culprits}
    if stopped:
        # Keep what the search cleared, if it passes together; else the largest group verified alone.
        candidates = [s for s in order if any(s in g for g in cleared)]
        kept: list[str] = []
        rep = full
        if candidates:
            rep = run(frozenset(candidates), final=True)
            kept = candidates
            if not rep.passed:
                kept = max(cleared, key=len)
                rep = run(frozenset(kept), final=True)
        untested = [s for s in order if s not in bad and s not in kept]
        return done(culprits, rep, kept, untested, stopped)

    kept = [s for s in order if s not in bad]
    rep = run(frozenset(kept), final=True)
    if rep.passed:
        return done(culprits, rep, kept)
    # Step 3: the folds that pass alone fail together; keep them one at a time.
    none = run(frozenset(), final=True)
    if not none.passed:
        return done(culprits, none, [], resolved=False)
    accepted: list[str] = []
    rep = none
    streak = 0
    rest = list(kept)
    try:
        while rest:
            s = rest[0]
            trial = run(frozenset([*accepted, s]))
            rest.pop(0)
            if trial.passed:
                accepted.append(s)
                rep, streak = trial, 0
            else:
                culprits.append(Culprit(s, trial, alone=False))
                streak += 1
                if streak >= budget.give_up_after and rest:
                    raise _Stop(f"folds fail everywhere: {streak} folds added one at a time failed in a row")
    except _Stop as e:
        stopped = f"the culprit search stopped early: {e}"
    return done(culprits, rep, accepted, rest, stopped)


def culprit_skips(search: CulpritSearch) -> dict[str, Skip]:
    """One ``Skip(reason=VERIFICATION)`` per culprit (its detail naming the error the fold caused) and
    per untested site (naming why the search stopped before it)."""
    out = {c.bn: Skip(c.bn, SkipReason.VERIFICATION, c.describe()) for c in search.culprits}
    for bn in search.untested:
        out[bn] = Skip(bn, SkipReason.VERIFICATION, f"left in place untested: {search.stopped}")
    return out


def _spent(search: CulpritSearch) -> str:
    b = search.budget
    return (
        f"{search.checks} verification(s) in {search.seconds:.3g} s, of a budget of {b.max_checks} "
        f"verifications and {b.max_seconds:g} s"
    )


def fold_without_culprits(
    report: FoldReport,
    fold: Callable[[frozenset[str]], tuple[Any, FoldReport]],
    verify: Callable[[Any], VerifyReport],
    budget: CulpritBudget = DEFAULT_BUDGET,
) -> tuple[Any, FoldReport, CulpritSearch]:
    """Re-fold without the folds that fail verification; return ``(model, fold report, search)``.

    Args:
        report: the :class:`~bnfold.records.FoldReport` of the fold that failed (its ``verification``
            is the failing report).
        fold: ``fold(excluded) -> (model, FoldReport)`` folds a fresh copy of the original, leaving the
            BNs in ``excluded``.
        verify: ``verify(model) -> VerifyReport`` against the original.
        budget: the bounds of the search (:class:`CulpritBudget`).

    Returns:
        The model of the last verified subset, its report (culprit and untested BNs as
        ``Skip(VERIFICATION)`` naming why, ``verification`` set, ``culprits``, a note with the
        verifications spent and the budget) and the search. When the search is not resolved (no fold
        could be kept) the model is None and the report is the one given, with ``culprits`` and a note
        saying why; the caller treats it as a failed verification (exit 1).
    """
    last: dict[frozenset[str], tuple[Any, FoldReport]] = {}

    def check(excluded: frozenset[str]) -> VerifyReport:
        model, rep = fold(excluded)
        v = verify(model)
        last.clear()  # only the latest verified model is kept: memory stays at one extra copy
        last[excluded] = (model, rep)
        return v

    # a merged sum (bnfold.onnx.merge) is excluded by its label like a BN
    sites = [s.bn for s in report.sites] + [m.sum for m in report.merges if m.merged]
    search = find_culprits(sites, check, failed=report.verification, budget=budget)
    if not search.resolved:
        note = f"no fold could be kept: {search.why_none_kept}" + (
            f" ({_spent(search)})" if search.checks else ""
        )
        return None, replace(report, culprits=search, notes=(*report.notes, note)), search
    excluded = frozenset(sites) - frozenset(search.kept)
    if excluded not in last:
        last.clear()
        model, rep = fold(excluded)
        search.report = verify(model)
        last[excluded] = (model, rep)
    model, new = last[excluded]
    skips = culprit_skips(search)
    names = ", ".join(c.bn for c in search.culprits)
    notes = [
        f"{len(search.culprits)} fold(s) failed verification and were left in place ({names}); "
        f"found in {_spent(search)}"
    ]
    if search.untested:
        notes.append(f"{search.stopped}: {len(search.untested)} fold(s) not tested were left in place too")
    new = replace(
        new,
        verdicts=[skips.get(v.bn, v) for v in new.verdicts],
        verification=search.report,
        culprits=search,
        notes=(*new.notes, *notes),
    )
    return model, new, search
