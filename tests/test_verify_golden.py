"""Golden outputs: save a verification run, check a model against it, re-check it without running."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.errors import OptionError, OutputError
from bnfold.verification import checks, driver, recorded, verify
from bnfold.verification.golden import Recording, load_outputs, save_outputs
from tests.test_verify import _fold_by_hand, _model, _perturb
from tests.test_verify_compare import _typed

runner = CliRunner()


def test_save_then_check_a_candidate_against_the_recording(tmp_path: Path) -> None:
    ref = _model()
    good = _fold_by_hand(ref)
    golden = tmp_path / "golden.npz"
    first = verify(ref, good, samples=2, seed=3, save_outputs=golden)
    assert first.passed
    rec = load_outputs(golden)
    assert rec.input_names == ["x"] and sorted(rec.output_names) == ["a", "y", "z"]
    assert len(rec.feeds) == 2 and rec.candidate is not None
    # the recorded inputs are the ones a fresh run with that seed draws
    again = verify(ref, good, samples=2, seed=3, save_outputs=tmp_path / "again.npz")
    assert again.checks == first.checks
    np.testing.assert_array_equal(load_outputs(tmp_path / "again.npz").feeds[1]["x"], rec.feeds[1]["x"])

    rep = verify(None, good, load_outputs=golden)
    assert rep.passed and rep.samples == 2
    assert rep.runtimes[0].runtime == "file" and str(golden) in rep.runtimes[0].reason
    assert [c.max_abs_error for c in rep.checks] == [c.max_abs_error for c in first.checks]
    bad = verify(None, _perturb(good, "G"), load_outputs=golden)
    assert not bad.passed and {c.name for c in bad.checks if not c.passed} == {"z"}


def test_recheck_saved_outputs_without_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = _model()
    golden = tmp_path / "golden.npz"
    assert verify(ref, _fold_by_hand(ref), save_outputs=golden).passed

    def no_run(*a: object, **k: object) -> None:
        raise AssertionError("a model ran")

    for module in (driver, recorded, checks):  # every place a runner is made
        monkeypatch.setattr(module, "onnx_runner", no_run)
    assert verify(None, None, load_outputs=golden).passed
    strict = verify(None, None, load_outputs=golden, rtol=1e-12)
    assert not strict.passed  # the fold's rounding is visible at 1e-12
    assert {c.name for c in strict.checks if not c.passed} == {"y"}  # z and a are exact (not folded)
    assert strict.optimization_level == "recorded"


def test_bfloat16_and_odd_names_round_trip(tmp_path: Path) -> None:
    from bnfold.verification.inputs import np_dtype

    bf = np_dtype("bfloat16")
    x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(bf)
    rec = Recording(
        ["in/put:0"], ["out 1"], [{"in/put:0": x}], [{"out 1": x}], None, {"reference": "onnxruntime"}
    )
    save_outputs(tmp_path / "g.npz", rec)
    back = load_outputs(tmp_path / "g.npz")
    assert back.feeds[0]["in/put:0"].dtype == bf
    np.testing.assert_array_equal(back.reference[0]["out 1"].astype(np.float32), x.astype(np.float32))
    assert back.candidate is None


def test_bad_golden_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="no such file"):
        load_outputs(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(OptionError, match="not a bnfold outputs file"):
        load_outputs(tmp_path / "plain.npz")
    meta = {
        "format": "bnfold-golden",
        "version": 1,
        "inputs": ["x"],
        "outputs": ["y"],
        "samples": 0,
        "has_candidate": False,
        "dtypes": {},
        "runtimes": {},
    }
    np.savez(tmp_path / "empty.npz", __meta__=np.array(json.dumps(meta)))
    with pytest.raises(OptionError, match="no sample"):
        load_outputs(tmp_path / "empty.npz")
    meta["samples"] = 1  # the arrays it names are missing
    np.savez(tmp_path / "short.npz", __meta__=np.array(json.dumps(meta)))
    with pytest.raises(OptionError, match="not a readable"):
        load_outputs(tmp_path / "short.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(OptionError, match="not a readable"):
        load_outputs(tmp_path / "junk.npz")
    ref = _model()
    golden = tmp_path / "g.npz"
    verify(ref, ref, save_outputs=golden)
    with pytest.raises(OptionError, match="pass only a candidate"):
        verify(ref, ref, load_outputs=golden)
    with pytest.raises(OptionError, match="saved inputs are used"):
        verify(None, ref, load_outputs=golden, inputs={"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(OutputError, match="output folder .* does not exist"):
        verify(ref, ref, save_outputs=tmp_path / "missing" / "g.npz")
    assert not (tmp_path / "missing").exists()


def test_cli_save_and_load_outputs(tmp_path: Path) -> None:
    ref = _model()
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    onnx.save(_typed(_model()), str(a))
    onnx.save(_typed(_fold_by_hand(ref)), str(b))
    onnx.save(_typed(_perturb(_fold_by_hand(ref), "G")), str(c))
    golden = tmp_path / "golden.npz"
    r = runner.invoke(app, ["verify", str(a), str(b), "--save-outputs", str(golden), "-n", "2"])
    assert r.exit_code == 0, r.output
    assert golden.is_file()
    r = runner.invoke(app, ["verify", "--load-outputs", str(golden), str(b), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verification"]["samples"] == 2 and d["verification"]["runtimes"][0]["runtime"] == "file"
    r = runner.invoke(app, ["verify", "--load-outputs", str(golden), str(c)])
    assert r.exit_code == 1 and "output 'z'" in r.stderr
    r = runner.invoke(app, ["verify", "--load-outputs", str(golden), "--rtol", "1e-12"])
    assert r.exit_code == 1 and "output 'y'" in r.stderr
    r = runner.invoke(app, ["verify", "--load-outputs", str(golden), str(a), str(b)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "at most one model" in r.stderr
    r = runner.invoke(app, ["verify", str(a)])
    assert r.exit_code == 2 and "REFERENCE and CANDIDATE" in r.stderr
