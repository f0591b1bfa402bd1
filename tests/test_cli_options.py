"""Options a pipeline can trust: checked once, named in the error, the same on every command.

Each test is what a user types and what they check: the exit code, one stderr line naming the flag,
no output written, and the input file unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer.main
from test_cli import ROOT, assert_clean_error, count_bn, digest, tiny_onnx
from typer.testing import CliRunner

from bnfold.cli import app

runner = CliRunner()
COMMANDS = ("fold", "inspect", "verify", "freeze", "bench")


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(p))
    return p


def _refused(args: list[str], flag: str, tmp_path: Path, model_path: Path) -> None:
    before = digest(model_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    r = runner.invoke(app, args)
    assert_clean_error(r, 2)
    assert flag in r.stderr, r.stderr
    assert digest(model_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # nothing written


def test_options_that_do_not_apply_are_refused_by_name(model_path: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o.onnx")
    m = str(model_path)
    _refused(["fold", m, out, "--opset", "5"], "--opset", tmp_path, model_path)
    _refused(["fold", m, out, "--opset", "99"], "--opset", tmp_path, model_path)
    _refused(["fold", m, out, "--opset", "17"], "--opset", tmp_path, model_path)  # ONNX input: no export
    _refused(["fold", m, out, "--static-batch"], "--static-batch", tmp_path, model_path)
    _refused(["fold", m, out, "--eval-semantics"], "--eval-semantics", tmp_path, model_path)
    _refused(["fold", m, out, "--seed", "-1"], "--seed", tmp_path, model_path)
    _refused(["fold", m, out, "--samples", "0"], "--samples", tmp_path, model_path)
    _refused(["fold", m, out, "-q", "--json"], "--json", tmp_path, model_path)
    _refused(["fold", m, out, "--no-verify", "--atol", "1e-3"], "--atol", tmp_path, model_path)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros((2, 3, 8, 8), np.float32))
    _refused(["fold", m, out, "--inputs", str(npz), "--samples", "3"], "--samples", tmp_path, model_path)
    _refused(["fold", m, out, "-s", "y=1x3x8x8"], "--input-shape", tmp_path, model_path)
    _refused(["inspect", m, "--seed", "-1"], "--seed", tmp_path, model_path)
    _refused(["verify", m, m, "--seed", "-2"], "--seed", tmp_path, model_path)
    _refused(["bench", m, "--seed", "-1"], "--seed", tmp_path, model_path)


def test_usage_errors_are_one_line(model_path: Path) -> None:
    for args in (
        ["fold", str(model_path), "--bogus"],
        ["fold"],
        ["inspect", str(model_path), "--samples", "x"],
        ["nosuchcommand"],
    ):
        assert_clean_error(runner.invoke(app, args), 2)


def test_positional_output_like_onnxsim(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(model_path), str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert count_bn(out) == 1
    # -o and a positional OUT that disagree: refused, nothing written.
    other = tmp_path / "other.onnx"
    r = runner.invoke(app, ["fold", str(model_path), str(other), "-o", str(tmp_path / "third.onnx")])
    assert_clean_error(r, 2)
    assert not other.exists() and not (tmp_path / "third.onnx").exists()


def test_fail_if_left_is_a_ci_guard(model_path: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["inspect", str(model_path), "--fail-if-left"])
    assert r.exit_code == 1
    assert "1 BatchNorm would be left" in r.stderr and "--fail-if-left" in r.stderr
    # With --affine nothing would be left: the guard passes.
    r = runner.invoke(app, ["inspect", str(model_path), "--fail-if-left", "--affine", "-q"])
    assert r.exit_code == 0 and r.stdout == ""
    folded = tmp_path / "all.onnx"
    assert runner.invoke(app, ["fold", str(model_path), str(folded), "--affine", "-q"]).exit_code == 0
    assert runner.invoke(app, ["inspect", str(folded), "--fail-if-left"]).exit_code == 0


def test_same_flags_on_every_command() -> None:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    for name in COMMANDS:
        opts = {o for p in group.commands[name].params for o in getattr(p, "opts", [])}
        for flag in ("-q", "--quiet", "--json", "--debug", "--version", "-V"):
            assert flag in opts, f"{name} lacks {flag}"
    # inspect takes every option that decides a verdict in fold, so it tells what fold would do.
    fold_opts = {o for p in group.commands["fold"].params for o in getattr(p, "opts", [])}
    inspect_opts = {o for p in group.commands["inspect"].params for o in getattr(p, "opts", [])}
    deciding = {
        "--affine",
        "--eval-semantics",
        "--input-shape",
        "-s",
        "--inputs",
        "--model",
        "--trust-pickle",
    }
    assert deciding <= fold_opts and deciding <= inspect_opts


def test_debug_after_the_command_shows_the_traceback(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00" * 64)
    r = runner.invoke(app, ["inspect", str(junk), "--debug"])
    assert r.exit_code == 2 and "Traceback" in r.stderr


@pytest.mark.parametrize("cmd", [*COMMANDS, ""])
def test_help_fits_80_columns(cmd: str) -> None:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "bnfold", *([cmd] if cmd else []), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    body = p.stdout.split("\n", 1)[1]  # the usage line ends with "[ARGS]..."
    assert "<bool>" not in p.stdout and "..." not in body  # no flag types, no cut-off descriptions
    if cmd:
        assert "Example:" in p.stdout
