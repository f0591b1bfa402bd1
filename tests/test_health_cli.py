"""``bnfold inspect --health`` and ``bnfold fold --flush-denormals/--keep-denormals/--health``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_health import _sick_conv_bn
from typer.testing import CliRunner

from bnfold.cli import app
from models.testing import run_onnx

runner = CliRunner()
F32_TINY = np.finfo(np.float32).tiny
ROOT = Path(__file__).resolve().parent.parent


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _subnormals(p: Path) -> int:
    n = 0
    for t in onnx.load(str(p)).graph.initializer:
        a = numpy_helper.to_array(t)
        n += int(np.count_nonzero((a != 0) & (np.abs(a) < F32_TINY)))
    return n


def _run(p: Path, x: np.ndarray) -> np.ndarray:
    return run_onnx(p, {"x": x})[0]


@pytest.fixture()
def sick(tmp_path: Path) -> Path:
    p = tmp_path / "sick.onnx"
    onnx.save(_sick_conv_bn(), str(p))
    return p


def test_inspect_health_summary_line_and_table(sick: Path) -> None:
    before = _digest(sick)
    r = runner.invoke(app, ["inspect", str(sick), "--health"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("health:"))
    assert "1 of 1 BatchNorm flagged" in line and "constant channel" in line
    assert "BatchNorm health" not in r.stdout  # the per-BN table only with --verbose
    v = runner.invoke(app, ["inspect", str(sick), "--health", "--verbose"])
    assert v.exit_code == 0 and "BatchNorm health" in v.stdout and "var <= eps" in v.stdout
    assert _digest(sick) == before
    plain = runner.invoke(app, ["inspect", str(sick)])
    assert "health:" not in plain.stdout


def test_inspect_health_json(sick: Path) -> None:
    r = runner.invoke(app, ["inspect", str(sick), "--health", "--json"])
    assert r.exit_code == 0, r.output
    h = json.loads(r.stdout)["health"]
    (b,) = h["bns"]
    assert b["constant_channels"] == [0] and b["small_var"] == [2] and b["target"] == "conv"
    assert h["subnormal"] == b["subnormal"] > 0 and h["healthy"] is False
    assert json.loads(runner.invoke(app, ["inspect", str(sick), "--json"]).stdout)["health"] is None


def test_fold_flushes_by_default_and_keeps_on_request(sick: Path, tmp_path: Path) -> None:
    before = _digest(sick)
    out, kept = tmp_path / "out.onnx", tmp_path / "kept.onnx"
    r = runner.invoke(app, ["fold", str(sick), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    k = runner.invoke(app, ["fold", str(sick), "-o", str(kept), "--keep-denormals", "--json", "--health"])
    assert k.exit_code == 0, k.output
    krep = json.loads(k.stdout)
    assert krep["flushed_denormals"] is None and krep["health"]["subnormal"] == _subnormals(kept) > 0
    assert rep["flushed_denormals"] == _subnormals(kept) and _subnormals(out) == 0
    assert rep["verification"]["passed"] and krep["verification"]["passed"]
    assert _digest(sick) == before
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    ref = _run(sick, x).astype(np.float64)
    assert np.max(np.abs(_run(out, x) - ref)) <= 2e-5 * np.max(np.abs(ref))
    h = runner.invoke(app, ["fold", str(sick), "-o", str(out), "--health"])
    assert h.exit_code == 0 and "denormals" in h.stdout and "health:" in h.stdout


def test_inspect_health_on_pt2_is_a_clean_error() -> None:
    r = runner.invoke(app, ["inspect", str(ROOT / "models" / "samples" / "lenet5.pt2"), "--health"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and "torch.export" in lines[0]
    assert "Traceback" not in r.output


def test_fold_prune_constant_channels_cli(tmp_path: Path) -> None:
    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    torch.manual_seed(0)
    m = randomize_bn(lenet5()).eval()
    with torch.no_grad():
        m[13].weight[[3, 40]] = 0.0  # BatchNorm1d(84) after Linear(120, 84), then Tanh -> Linear(84, 10)
    src = tmp_path / "lenet.pt"
    torch.save(m.state_dict(), src)
    before = _digest(src)
    out = tmp_path / "out.pt"
    args = ["fold", str(src), "--model", "models.lenet:lenet5", "-s", "x=1x1x32x32", "-o", str(out)]
    r = runner.invoke(app, [*args, "--prune-constant-channels", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    pruned = {d["layer"]: d for d in rep["pruned_channels"]}
    assert pruned["12"]["pruned"] and pruned["12"]["channels"] == [3, 40]
    assert rep["verification"]["passed"] and _digest(src) == before
    folded = torch.load(out, weights_only=False)
    assert folded[12].out_features == 82 and folded[15].in_features == 82
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "out.onnx"), "--prune-constant-channels"])
    assert bad.exit_code == 2 and "prune-constant-channels" in bad.stderr
    assert not (tmp_path / "out.onnx").exists()
