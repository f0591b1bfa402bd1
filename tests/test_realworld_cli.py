"""``bnfold freeze`` on the CLI says which BatchNorm it left and why."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnfold.cli import app
from models.realworld import partly_freezable
from models.stats import randomize_bn

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("as_json", [True, False])
def test_freeze_reports_what_it_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    monkeypatch.chdir(ROOT)
    src = tmp_path / "m.pt"
    torch.save(randomize_bn(partly_freezable(), 1).eval().state_dict(), src)
    before = _digest(src)
    out = tmp_path / "frozen.pt"
    args = ["freeze", str(src), "--model", "models.realworld:partly_freezable", "-o", str(out)]
    r = runner.invoke(app, [*args, "--json"] if as_json else args)
    assert r.exit_code == 0, r.output
    assert _digest(src) == before and out.exists()
    if as_json:
        data = json.loads(r.stdout)
        assert [f["module"] for f in data["frozen"]] == ["3"]
        assert [(x["module"], x["reason"]) for x in data["left"]] == [("1", "no_running_stats")]
    else:
        assert "left as they were" in r.stdout and "no_running_stats" in r.stdout
        assert "1 BatchNorm frozen" in r.stdout and "1 left" in r.stdout
    assert os.path.getsize(out) > 0
