"""Whole flows as a deployment engineer drives them: the CLI and the Python API on files built in tmp_path.

Each test is one defect a user met after the FoldOptions / cli-package refactor (issue 23): the command
line, the written file, and what loads back.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import onnx
import pytest
from test_cli import tiny_onnx
from typer.testing import CliRunner

from bnfold.cli import app

runner = CliRunner()


def _schema() -> dict[str, Any]:
    return json.loads(resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8"))


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(p))
    return p


def test_json_before_recalibrate_is_accepted(model_path: Path, tmp_path: Path) -> None:
    """cli.md: --json works the same on every command, before or after it (recalibrate too)."""
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["--json", "recalibrate", str(model_path), str(out)])
    assert r.exit_code == 2, r.stderr  # no --data: a usage error of recalibrate, not "No such option: --json"
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, _schema())
    assert doc["command"] == "recalibrate"
    assert "--json" not in doc["error"]["message"]
    assert r.stderr.count("\n") == 1 and not out.exists()
