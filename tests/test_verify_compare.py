"""Comparator options: per-output tolerances, error statistic, cosine/SNR thresholds, NaN/Inf, heat summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.errors import OptionError, VerificationError
from bnfold.verification import ensure_passed, verify
from bnfold.verification.compare import Comparator, compare_output, parse_tolerances
from tests.test_verify import PERTURB, _fold_by_hand, _model, _perturb

runner = CliRunner()


def test_per_output_tolerances() -> None:
    ref = _model()
    cand = _perturb(_fold_by_hand(ref), "G")  # z moves by ~1e-4 of its scale, y and a do not move
    assert not verify(ref, cand).passed
    rep = verify(ref, cand, rtol={"z": 1e-2})
    assert rep.passed
    z = next(c for c in rep.checks if c.name == "z")
    y = next(c for c in rep.checks if c.name == "y")
    assert z.rtol == 1e-2 and y.rtol == 1e-5  # the other outputs keep their dtype default
    rep = verify(ref, cand, rtol={"y": 1e-2})
    assert {c.name for c in rep.checks if not c.passed} == {"z"}
    assert verify(ref, cand, rtol={"*": 1e-2}).passed  # "*" is every other output
    with pytest.raises(OptionError, match="no output 'q'"):
        verify(ref, cand, rtol={"q": 1e-2})


def test_parse_tolerances() -> None:
    assert parse_tolerances("--rtol", None) is None
    assert parse_tolerances("--rtol", ["1e-4"]) == 1e-4
    assert parse_tolerances("--rtol", ["1e-4", "logits=1e-3"]) == {"*": 1e-4, "logits": 1e-3}
    assert parse_tolerances("--rtol", ["a=b=1e-3"]) == {"a=b": 1e-3}  # the value follows the last '='
    for bad, msg in (
        (["x=abc"], "not a number"),
        (["-1"], ">= 0"),
        (["x=1", "x=2"], "twice"),
        (["=1"], "OUTPUT"),
    ):
        with pytest.raises(OptionError, match=msg):
            parse_tolerances("--rtol", bad)


def test_error_statistic_lets_outliers_through_only_when_asked() -> None:
    rng = np.random.default_rng(0)
    r = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    c = r.copy()
    c[0, 1, 3, 3] += 0.5  # one outlier, far outside the tolerance
    assert compare_output("o", 0, r, c, Comparator()).failure == "tolerance"
    for stat in ("median", "p99", "q0.99", "mean"):
        chk = compare_output("o", 0, r, c, Comparator(rtol=1e-3, error_stat=stat))
        assert chk.passed, (stat, chk)
        assert chk.error_stat == stat and chk.error_value < chk.max_abs_error
    # a quantile above the outlier's rank sees it
    assert not compare_output("o", 0, r, c, Comparator(rtol=1e-3, error_stat="max")).passed
    with pytest.raises(OptionError, match="error statistic"):
        verify(_model(), _model(), error_stat="q1.5")


def test_cosine_and_snr_thresholds() -> None:
    rng = np.random.default_rng(1)
    r = rng.standard_normal(1000)
    c = r * 1.001  # relative error 1e-3: SNR = 60 dB, cosine exactly 1
    loose = Comparator(rtol=1e-2)
    chk = compare_output("o", 0, r, c, loose)
    assert chk.passed and chk.snr_db is not None and abs(chk.snr_db - 60.0) < 1e-6
    assert chk.cosine == pytest.approx(1.0, abs=1e-12)
    assert compare_output("o", 0, r, c, Comparator(rtol=1e-2, min_snr_db=70)).failure == "snr"
    assert compare_output("o", 0, r, c, Comparator(rtol=1e-2, min_snr_db=50)).passed
    noisy = r + 0.1 * rng.standard_normal(1000)  # cosine ~0.995
    chk = compare_output("o", 0, r, noisy, Comparator(rtol=1.0, min_cosine=0.999))
    assert chk.failure == "cosine" and 0.98 < chk.cosine < 0.999
    assert compare_output("o", 0, r, r, Comparator(min_snr_db=300)).snr_db is None  # no error: infinite SNR


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "nan"), (np.inf, "inf")])
def test_nan_and_inf_in_the_candidate_are_named(value: float, kind: str) -> None:
    ref = _model()
    cand = _fold_by_hand(ref)
    for i, t in enumerate(cand.graph.initializer):
        if t.name == "G":
            a = nh.to_array(t).copy()
            a[0, 0] = value
            cand.graph.initializer[i].CopyFrom(nh.from_array(a, "G"))
    # even with tolerances that pass anything finite, and a statistic that ignores outliers
    rep = verify(ref, cand, atol=1e30, rtol=1e30, error_stat="median")
    z = [c for c in rep.checks if c.name == "z"]
    assert all(c.failure == kind and not c.passed for c in z)
    assert all((c.nan if kind == "nan" else c.inf) > 0 for c in z)
    with pytest.raises(VerificationError, match="NaN" if kind == "nan" else "infinite"):
        ensure_passed(rep)
    assert kind in rep.to_dict()["failures"]


def test_heat_summary_names_the_channel() -> None:
    ref = _model()
    cand = _fold_by_hand(ref)
    for i, t in enumerate(cand.graph.initializer):
        if t.name == "W":
            a = nh.to_array(t).copy()
            a[2] *= 1 + 10 * PERTURB  # output channel 2 of the conv only
            cand.graph.initializer[i].CopyFrom(nh.from_array(a, "W"))
    rep = verify(ref, cand)
    y = next(c for c in rep.checks if c.name == "y")
    assert y.failure == "tolerance"
    assert y.worst_index[1] == 2
    assert y.worst_channels[0][0] == 2
    # the other channels only carry the fold's rounding noise
    assert all(e < 1e-3 * y.worst_channels[0][1] for ch, e in y.worst_channels[1:])
    d = y.to_dict()
    assert d["worst_channels"][0]["channel"] == 2


def test_defaults_unchanged() -> None:
    """No option given: the checks are the ones bnfold always made (every element within tolerance)."""
    ref = _model()
    rep = verify(ref, _fold_by_hand(ref))
    assert rep.passed
    assert all(c.error_stat == "max" and c.failure == "" for c in rep.checks)
    assert rep.comparator == {
        "atol": None,
        "rtol": None,
        "error_stat": "max",
        "min_cosine": None,
        "min_snr_db": None,
    }


def _typed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The test model with shaped outputs, as the file checker requires."""
    from onnx import TensorProto as T
    from onnx import helper as h

    shapes = {"y": (T.FLOAT, ["N", 4, 8, 8]), "z": (T.FLOAT, ["N", 5]), "a": (T.INT64, ["N", 8, 8])}
    for o in model.graph.output:
        o.CopyFrom(h.make_tensor_value_info(o.name, *shapes[o.name]))
    return model


def test_cli_comparator_options(tmp_path: Path) -> None:
    ref = _model()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_typed(_model()), str(a))
    onnx.save(_typed(_perturb(_fold_by_hand(ref), "G")), str(b))
    r = runner.invoke(app, ["verify", str(a), str(b)])
    assert r.exit_code == 1
    assert "output 'z'" in r.stderr
    r = runner.invoke(app, ["verify", str(a), str(b), "--rtol", "z=1e-2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verification"]["comparator"]["rtol"] == {"z": 1e-2}
    r = runner.invoke(app, ["verify", str(a), str(b), "--rtol", "1e-2", "--min-snr", "200", "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)["verification"]["failures"] == ["snr"]
    r = runner.invoke(app, ["verify", str(a), str(b), "--rtol", "z=abc"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "not a number" in r.stderr
    r = runner.invoke(app, ["verify", str(a), str(b), "--error-stat", "mode"])
    assert r.exit_code == 2 and "error statistic" in r.stderr
