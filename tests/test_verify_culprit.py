"""Culprit bisection: the folds that make verification fail are found and left; every other fold is kept."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from torch import nn
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.culprit import find_culprits
from bnfold.files import (
    FoldSettings,
    FoldVerificationError,
    InputSettings,
    LoadSettings,
    VerifySettings,
    fold_file,
)
from bnfold.fx.module import fold_module
from bnfold.onnx import fold_model
from bnfold.records import OutputCheck, Skip, SkipReason, VerifyReport
from bnfold.verification.compare import Comparator, compare_output
from models.testing import ort_session

runner = CliRunner()


# ------------------------------------------------------------------------------------ the search
def _report(passed: bool, err: float = 0.0) -> VerifyReport:
    chk = OutputCheck("y", 0, "float32", (1,), err, err, 0 if passed else 1, 0.0, 1e-5, passed)
    return VerifyReport(checks=(chk,), samples=1, optimization_level="disable")


def _oracle(sites: list[str], bad: set[str], together: set[frozenset[str]] = frozenset()):  # type: ignore[assignment]
    """check(excluded): fails when a bad site is folded, or all sites of one group in ``together``."""
    calls: list[frozenset[str]] = []

    def check(excluded: frozenset[str]) -> VerifyReport:
        calls.append(excluded)
        folded = set(sites) - excluded
        fails = bool(folded & bad) or any(g <= folded for g in together)
        return _report(not fails, err=float(len(folded & bad)))

    return check, calls


@pytest.mark.parametrize("bad", [{"s3"}, {"s0", "s15"}, {"s5", "s6", "s7"}])
def test_bisection_finds_exactly_the_bad_folds(bad: set[str]) -> None:
    sites = [f"s{i}" for i in range(16)]
    check, calls = _oracle(sites, bad)
    res = find_culprits(sites, check)
    assert res.resolved and res.report.passed
    assert {c.bn for c in res.culprits} == bad
    assert all(c.alone for c in res.culprits)
    assert set(res.kept) == set(sites) - bad
    assert len(set(calls)) == len(calls) == res.checks  # no subset verified twice
    k, n = len(bad), len(sites)
    assert res.checks <= 2 * k * math.ceil(math.log2(n)) + 3  # far fewer than n


def test_no_failure_means_no_search() -> None:
    sites = ["a", "b"]
    check, calls = _oracle(sites, set())
    res = find_culprits(sites, check)
    assert res.resolved and not res.culprits and res.checks == 1


def test_folds_that_fail_only_together() -> None:
    sites = [f"s{i}" for i in range(6)]
    check, _ = _oracle(sites, set(), together={frozenset({"s1", "s4"})})
    res = find_culprits(sites, check)
    assert res.resolved and res.report.passed
    assert [c.bn for c in res.culprits] == ["s4"] and not res.culprits[0].alone  # s1 kept first, s4 refused
    assert set(res.kept) == set(sites) - {"s4"}


def test_failure_not_caused_by_a_fold_is_unresolved() -> None:
    res = find_culprits(["a", "b"], lambda excluded: _report(False))
    assert not res.resolved and not res.report.passed and res.kept == []


# ---------------------------------------------------------------------------------------- ONNX
def _branches(n: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv_i -> BN_i -> y_i for each branch i: each output depends on one fold only."""
    rng = np.random.default_rng(seed)
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
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    s = ort_session(path)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x})))


def test_exclude_keyword_leaves_those_bns() -> None:
    m = _branches()
    folded, rep = fold_model(m, exclude={"bn1"})
    assert rep.bn_after == 1 and [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"] == [
        "bn1"
    ]
    v = next(v for v in rep.verdicts if v.bn == "bn1")
    assert isinstance(v, Skip) and v.reason is SkipReason.VERIFICATION


def test_fold_leaves_only_the_culprit_and_writes_the_rest(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_branches(), str(src))
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    # y1 must be bit-exact: only bn1's fold exceeds that (any fold moves its output by a few roundings)
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--rtol", "y1=0", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    verdicts = {v["bn"]: v for v in d["verdicts"]}
    assert verdicts["bn1"]["status"] == "left" and verdicts["bn1"]["reason"] == "verification"
    assert "'y1'" in verdicts["bn1"]["detail"] and "rtol=0" in verdicts["bn1"]["detail"]
    assert verdicts["bn0"]["status"] == verdicts["bn2"]["status"] == "folded"
    assert d["bn_before"] == 3 and d["bn_after"] == 1
    assert d["verification"]["passed"]
    assert [c["bn"] for c in d["culprits"]["culprits"]] == ["bn1"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    # the written model: one BN left, and it computes what the original does
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert [n.name for n in written.graph.node if n.op_type == "BatchNormalization"] == ["bn1"]
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a, b = _run(src, x), _run(out, x)
    np.testing.assert_array_equal(a["y1"], b["y1"])  # the culprit's branch is untouched
    for y in ("y0", "y2"):
        assert np.max(np.abs(a[y] - b[y])) <= 1e-5 * np.max(np.abs(a[y]))


def test_all_or_nothing_keeps_todays_refusal(tmp_path: Path) -> None:
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_branches(), str(src))
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--rtol", "y1=0", "--all-or-nothing"])
    assert r.exit_code == 1
    assert not out.exists()
    with pytest.raises(FoldVerificationError) as ei:
        fold_file(src, out, FoldSettings(all_or_nothing=True, verification=VerifySettings(rtol={"y1": 0.0})))
    assert ei.value.fold_report.bn_after == 0 and not out.exists()


def test_every_fold_failing_is_refused_not_written(tmp_path: Path) -> None:
    """rtol=0 on every output: no fold can pass, so nothing is kept: exit 1, nothing written (issue 28.6,
    22.14; it used to write the unfolded model with exit 0)."""
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_branches(), str(src))
    with pytest.raises(FoldVerificationError) as ei:
        fold_file(src, out, FoldSettings(verification=VerifySettings(rtol={"*": 0.0})))
    assert not out.exists()
    search = ei.value.fold_report.culprits
    assert search is not None and not search.resolved and "rtol=0 is below float32 rounding" in search.stopped


def test_failure_no_fold_explains_still_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When even the model with no fold fails (a runtime disagreement), nothing is written, as before."""
    from bnfold.files import fold as fold_job

    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_branches(), str(src))
    monkeypatch.setattr(fold_job, "run_verify", lambda *a, **k: _report(False, 1.0))
    with pytest.raises(FoldVerificationError) as ei:
        fold_file(src, out)
    assert not out.exists()
    search = ei.value.fold_report.culprits  # the search that found no explanation is reported
    assert search is not None and not search.resolved
    # --force writes the whole fold (every BN folded), still exit-1 material
    with pytest.raises(FoldVerificationError) as ei:
        fold_file(src, out, FoldSettings(force=True))
    assert out.exists() and ei.value.fold_report.files is not None and ei.value.fold_report.files.written
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]


# ------------------------------------------------------------------------------------- PyTorch
class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b0(self.c0(x)), self.b1(self.c1(x))


def test_pytorch_bisection_through_fold_module() -> None:
    from models.stats import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(_TwoHeads(), seed=1).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = [t.numpy() for t in model(x)]
    strict = Comparator(rtol={"output_1": 0.0})

    def check(excluded: frozenset[str]) -> VerifyReport:
        folded, _ = fold_module(model, exclude=excluded)
        with torch.no_grad():
            got = [t.numpy() for t in folded(x)]
        checks = tuple(
            compare_output(f"output_{i}", 0, w, g, strict) for i, (w, g) in enumerate(zip(want, got))
        )
        return VerifyReport(checks=checks, samples=1, optimization_level="eager")

    res = find_culprits(["b0", "b1"], check)
    assert res.resolved and [c.bn for c in res.culprits] == ["b1"] and res.kept == ["b0"]
    folded, rep = fold_module(model, exclude={"b1"})
    assert isinstance(folded.b1, nn.BatchNorm2d) and isinstance(folded.b0, nn.Identity)
    assert isinstance(model.b0, nn.BatchNorm2d)  # the original is untouched
    v = next(v for v in rep.verdicts if v.bn == "b1")
    assert isinstance(v, Skip) and v.reason is SkipReason.VERIFICATION


def _chain_with_offset(offset: float = 1e4, seed: int = 0) -> onnx.ModelProto:
    """x -> (Conv -> BN -> Relu) x3 -> y; the middle Conv adds ``offset`` and its BN subtracts it again.

    The original computes ``(conv + offset) - mean`` in float32 and loses the low bits of the conv
    (half an ulp of ``offset``); the fold computes the shift in float64 and does not. The folded model
    is the more accurate one, but it no longer matches the original to 1e-5 of the output's scale: only
    that BN's fold fails verification, with the default tolerance.
    """
    rng = np.random.default_rng(seed)
    inits, nodes, prev, cin = [], [], "x", 3
    for i in range(3):
        p = f"l{i}_"
        bias = rng.standard_normal(4) + (offset if i == 1 else 0.0)
        mean = rng.uniform(-0.5, 0.5, 4) + (offset if i == 1 else 0.0)
        inits += [
            nh.from_array(
                (rng.standard_normal((4, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32), p + "W"
            ),
            nh.from_array(bias.astype(np.float32), p + "B"),
            nh.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), p + "g"),
            nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), p + "b"),
            nh.from_array(mean.astype(np.float32), p + "m"),
            nh.from_array(rng.uniform(0.3, 2.5, 4).astype(np.float32), p + "v"),
        ]
        nodes += [
            h.make_node("Conv", [prev, p + "W", p + "B"], [p + "c"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            h.make_node(
                "BatchNormalization", [p + "c", p + "g", p + "b", p + "m", p + "v"], [p + "n"], name=f"bn{i}"
            ),
            h.make_node("Relu", [p + "n"], [p + "r" if i < 2 else "y"], name=f"relu{i}"),
        ]
        prev, cin = p + "r", 4
    g = h.make_graph(
        nodes,
        "chain",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", 4, 8, 8])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_a_fold_that_fails_with_default_tolerances_is_found(tmp_path: Path) -> None:
    src, out = tmp_path / "chain.onnx", tmp_path / "out.onnx"
    onnx.save(_chain_with_offset(), str(src))
    rep = fold_file(src, out, FoldSettings(verification=VerifySettings(samples=2)))
    verdicts = {v.bn: v for v in rep.verdicts}
    assert isinstance(verdicts["bn1"], Skip) and verdicts["bn1"].reason is SkipReason.VERIFICATION
    assert verdicts["bn0"].folded and verdicts["bn2"].folded
    assert rep.verification is not None and rep.verification.passed and rep.bn_after == 1
    x = np.random.default_rng(9).standard_normal((2, 3, 8, 8)).astype(np.float32)
    a, b = _run(src, x)["y"], _run(out, x)["y"]
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(a))  # what is written matches the original
    # without the bisection the whole model is refused
    with pytest.raises(FoldVerificationError):
        fold_file(
            src,
            tmp_path / "all.onnx",
            FoldSettings(all_or_nothing=True, verification=VerifySettings(samples=2)),
        )


def test_pytorch_file_fold_leaves_the_culprit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch file path bisects too: a verification that fails exactly when b1 is folded (the
    real comparison is tested above; here the wiring: which model is written, which verdict says why)."""
    from bnfold.files import fold as fold_job
    from bnfold.files import fold_torch as fold_torch_job
    from models.stats import randomize_bn

    torch.manual_seed(0)
    src, out = tmp_path / "two.pt", tmp_path / "out.pt"
    torch.save(randomize_bn(_TwoHeads(), seed=2).eval(), src)
    seen: list[bool] = []

    def fake_verify(reference: nn.Module, candidate: nn.Module, *a: object, **k: object) -> VerifyReport:
        assert isinstance(reference.b1, nn.BatchNorm2d)  # the reference is never the folded model
        seen.append(isinstance(candidate.b1, nn.BatchNorm2d))
        return _report(passed=seen[-1])

    monkeypatch.setattr(fold_job, "run_verify", fake_verify)
    monkeypatch.setattr(fold_torch_job, "run_verify", fake_verify)
    rep = fold_file(
        src, out, FoldSettings(load=LoadSettings(trust_pickle=True), inputs=InputSettings(["x=2x3x8x8"]))
    )
    verdicts = {v.bn: v for v in rep.verdicts}
    assert isinstance(verdicts["b1"], Skip) and verdicts["b1"].reason is SkipReason.VERIFICATION
    assert verdicts["b0"].folded and rep.bn_after == 1
    assert rep.verification is not None and rep.verification.passed
    written = torch.load(out, weights_only=False)
    assert isinstance(written.b1, nn.BatchNorm2d) and isinstance(written.b0, nn.Identity)
    assert len(seen) >= 2  # the failed full fold, then the bisection
