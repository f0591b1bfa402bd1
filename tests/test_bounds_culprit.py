"""Culprit bisection is bounded, gives up when folds fail everywhere, and never ends "equivalent"
with every BN left: no fold kept is exit 1. A tolerance below the outputs' rounding is named upfront
instead of bisecting (``fold --rtol 1e-9`` on float32)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.culprit import CulpritBudget, find_culprits
from bnfold.files import FoldSettings, FoldVerificationError, fold_file
from bnfold.records import OutputCheck, VerifyReport
from bnfold.verification.compare import DEFAULT_TOLERANCES
from bnfold.verification.policy import failure_message, tolerance_below_rounding

runner = CliRunner()


def _report(passed: bool, rtol: float = 1e-5, dtype: str = "float32", err: float = 1e-3) -> VerifyReport:
    e = 0.0 if passed else err
    chk = OutputCheck(
        "y",
        0,
        dtype,
        (4,),
        e,
        e,
        0 if passed else 1,
        0.0,
        rtol,
        passed,
        failure="" if passed else "tolerance",
    )
    return VerifyReport(checks=(chk,), samples=1, optimization_level="disable")


def _oracle(sites: list[str], fails: object) -> tuple[object, list[frozenset[str]]]:
    calls: list[frozenset[str]] = []

    def check(excluded: frozenset[str]) -> VerifyReport:
        calls.append(excluded)
        return _report(not fails(set(sites) - excluded))  # type: ignore[operator]

    return check, calls


# ------------------------------------------------------------------------------------ the search
def test_folds_failing_everywhere_give_up_early() -> None:
    """Any edit changes the output: 256 sites cost 2n-1 = 511 verifications before; now a few dozen."""
    sites = [f"s{i}" for i in range(256)]
    check, calls = _oracle(sites, lambda folded: bool(folded))
    res = find_culprits(sites, check, failed=_report(False))  # type: ignore[arg-type]
    budget = res.budget
    assert res.checks <= math.ceil(math.log2(256)) + 2 * budget.give_up_after + 2
    assert not res.resolved and not res.kept
    assert "fail everywhere" in res.stopped and res.why_none_kept == res.stopped
    assert set(res.untested) | {c.bn for c in res.culprits} == set(sites)
    d = res.to_dict()
    assert d["budget"] == {"max_checks": 64, "max_seconds": 600.0, "give_up_after": 8} and d["stopped"]
    assert json.loads(json.dumps(d)) == d


def test_verification_budget_stops_and_keeps_only_verified_folds() -> None:
    """Culprits everywhere (every other site) but some groups pass: the check budget stops the search;
    what is kept was verified, what was not cleared is left."""
    sites = [f"s{i}" for i in range(64)]
    bad = {f"s{i}" for i in range(1, 64, 2)}
    check, calls = _oracle(sites, lambda folded: bool(folded & bad))
    res = find_culprits(sites, check, failed=_report(False), budget=CulpritBudget(max_checks=20))  # type: ignore[arg-type]
    assert res.checks <= 21  # the budget, plus the final verification of what is kept
    assert "20 verifications" in res.stopped
    assert res.resolved and res.report.passed and res.kept and not set(res.kept) & bad
    assert set(res.kept) | set(res.untested) | {c.bn for c in res.culprits} == set(sites)
    assert set(res.untested).isdisjoint(res.kept)


def test_time_budget_stops_the_search() -> None:
    sites = [f"s{i}" for i in range(32)]
    bad = {"s3", "s17", "s29"}
    check, _ = _oracle(sites, lambda folded: bool(folded & bad))
    now = [0.0]

    def clock() -> float:
        now[0] += 10.0  # every verification "takes" 10 s
        return now[0]

    res = find_culprits(
        sites, check, failed=_report(False), budget=CulpritBudget(max_seconds=35), clock=clock
    )  # type: ignore[arg-type]
    assert "35 s" in res.stopped and res.checks <= 5


def test_errors_adding_up_give_up_after_k_failed_additions() -> None:
    """Every fold passes alone but no two together: step 3 keeps one and stops after k failures in a row."""
    sites = [f"s{i}" for i in range(40)]
    check, _ = _oracle(sites, lambda folded: len(folded) >= 2)
    res = find_culprits(sites, check, failed=_report(False), budget=CulpritBudget(max_checks=1000))  # type: ignore[arg-type]
    assert res.resolved and res.kept == ["s0"]
    assert len([c for c in res.culprits if not c.alone]) == 8 and len(res.untested) == 40 - 1 - 8
    assert "in a row" in res.stopped


def test_within_budget_nothing_changes() -> None:
    sites = [f"s{i}" for i in range(16)]
    check, _ = _oracle(sites, lambda folded: "s5" in folded)
    res = find_culprits(sites, check, failed=_report(False))  # type: ignore[arg-type]
    assert res.resolved and [c.bn for c in res.culprits] == ["s5"] and not res.untested and not res.stopped


def test_tolerance_below_rounding_is_named_without_bisecting() -> None:
    sites = [f"s{i}" for i in range(8)]
    check, calls = _oracle(sites, lambda folded: bool(folded))
    res = find_culprits(sites, check, failed=_report(False, rtol=1e-9))  # type: ignore[arg-type]
    assert res.checks == 0 and not calls and not res.resolved and not res.culprits
    assert "rtol=1e-09" in res.stopped and "float32" in res.stopped


@pytest.mark.parametrize("dtype", sorted(DEFAULT_TOLERANCES))
def test_default_tolerances_are_above_rounding(dtype: str) -> None:
    tol = DEFAULT_TOLERANCES[dtype]
    assert tolerance_below_rounding(_report(False, rtol=tol.rtol, dtype=dtype)) is None
    assert tolerance_below_rounding(_report(False, rtol=0.0, dtype=dtype)) is not None
    assert "below" in (failure_message(_report(False, rtol=0.0, dtype=dtype)) or "")


def test_one_output_below_rounding_still_bisects() -> None:
    """Only y1 must be bit-exact: a fold that does not reach y1 can pass, so the search runs."""
    strict = OutputCheck("y1", 0, "float32", (4,), 1e-3, 1e-3, 1, 0.0, 0.0, False, failure="tolerance")
    loose = OutputCheck("y0", 0, "float32", (4,), 0.0, 0.0, 0, 0.0, 1e-5, True)
    assert tolerance_below_rounding(VerifyReport((strict, loose), 1, "disable")) is None


# ---------------------------------------------------------------------------------------- files/CLI
def _branches(n: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits, nodes, outs = [], [], []
    for i in range(n):
        p = f"b{i}_"
        inits += [
            nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), p + "W"),
            nh.from_array(rng.standard_normal(4).astype(np.float32), p + "B"),
            nh.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), p + "g"),
            nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), p + "b"),
            nh.from_array(rng.uniform(-0.8, 0.8, 4).astype(np.float32), p + "m"),
            nh.from_array(rng.uniform(0.3, 2.5, 4).astype(np.float32), p + "v"),
        ]
        nodes += [
            h.make_node("Conv", ["x", p + "W", p + "B"], [p + "c"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            h.make_node(
                "BatchNormalization", [p + "c", p + "g", p + "b", p + "m", p + "v"], [f"y{i}"], name=f"bn{i}"
            ),
        ]
        outs.append(h.make_tensor_value_info(f"y{i}", T.FLOAT, ["N", 4, 8, 8]))
    g = h.make_graph(nodes, "branches", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])], outs, inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_cli_rtol_below_float32_rounding_is_exit_1_naming_it(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_branches(), str(src))
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--rtol", "1e-9"])
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "rtol=1e-09 is below float32 rounding" in err[0], r.stderr
    assert "equivalent" not in r.stdout.lower().replace("not equivalent", "")
    assert not out.exists() and hashlib.sha256(src.read_bytes()).hexdigest() == before
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--rtol", "1e-9", "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    c = d["culprits"]
    assert c["checks"] == 0 and not c["resolved"] and "rtol=1e-09" in c["stopped"]


def test_every_fold_failing_is_exit_1_not_equivalent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fold alone fails with a tolerance above rounding: the search ends with no fold kept, and
    the job refuses (exit 1, nothing written) instead of writing the unfolded model as "equivalent"."""
    from bnfold.files import fold as fold_job

    def fake_verify(reference: object, candidate: object, *a: object, **k: object) -> VerifyReport:
        model = onnx.load(str(candidate)) if isinstance(candidate, (str, Path)) else candidate
        folded_any = sum(n.op_type == "BatchNormalization" for n in model.graph.node) < 3  # type: ignore[attr-defined]
        return _report(not folded_any)

    monkeypatch.setattr(fold_job, "run_verify", fake_verify)
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_branches(), str(src))
    with pytest.raises(FoldVerificationError) as ei:
        fold_file(src, out, FoldSettings())
    assert not out.exists()
    rep = ei.value.fold_report
    assert rep.culprits is not None and not rep.culprits.resolved and len(rep.culprits.culprits) == 3
    assert any(
        "no fold could be kept: every fold fails verification" in n and "budget of 64" in n for n in rep.notes
    )
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--json"])
    assert r.exit_code == 1 and not out.exists()


def test_dense_culprits_at_the_start_are_not_mistaken_for_everywhere() -> None:
    """10 bad folds first, 54 good ones after: the give-up probe (every other fold) passes and is kept."""
    sites = [f"s{i}" for i in range(64)]
    bad = set(sites[:10])
    check, _ = _oracle(sites, lambda folded: bool(folded & bad))
    res = find_culprits(sites, check, failed=_report(False))  # type: ignore[arg-type]
    assert res.resolved and res.report.passed and not res.stopped
    assert set(res.kept) == set(sites[10:]) and not set(res.kept) & bad
    assert {c.bn for c in res.culprits} == bad and not res.untested
