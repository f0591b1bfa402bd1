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
    return json.loads(
        resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8")
    )


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


def test_recalibrate_pt2_uses_the_program_fixed_batch(tmp_path: Path) -> None:
    """cli.md: --batch-size defaults to the model's fixed batch size; a .pt2 exported at batch 2 then runs
    in batches of 2 (it used to run 8 samples at once and die on the program's shape guard, exit 2)."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    bn = net[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.3, 0.3)
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 8, 8),)), str(src))
    data = np.random.default_rng(1).normal(2.0, 3.0, (8, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", input=data)
    before = src.read_bytes()
    out = tmp_path / "r.pt2"
    r = runner.invoke(app, ["recalibrate", str(src), str(out), "--data", str(tmp_path / "d.npz"), "-q"])
    assert r.exit_code == 0, r.stderr
    want = torch.export.load(str(out)).state_dict
    ref = torch.nn.Sequential(*[torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()])
    ref.load_state_dict(net.state_dict())
    x = torch.from_numpy(data)
    with torch.no_grad():  # the average of per-batch statistics over batches of 2 (the default definition)
        y = ref[0](x)
        means = torch.stack([y[i : i + 2].mean((0, 2, 3)) for i in range(0, 8, 2)]).mean(0)
    torch.testing.assert_close(want["1.running_mean"], means, rtol=1e-4, atol=1e-5)
    assert src.read_bytes() == before


def test_recalibrate_pt2_wrong_batch_is_one_clear_line(tmp_path: Path) -> None:
    import numpy as np
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 8, 8),)), str(src))
    np.savez(tmp_path / "d.npz", input=np.ones((6, 3, 8, 8), np.float32))
    out = tmp_path / "r.pt2"
    r = runner.invoke(app, ["recalibrate", str(src), str(out), "--data", str(tmp_path / "d.npz"), "-b", "3"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "--batch-size 2" in r.stderr and "AssertionError" not in r.stderr
    assert not out.exists()
