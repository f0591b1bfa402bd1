"""Loose ends of the command line, as a user meets them.

- ``--requantize-bias`` names int32 biases of ONNX QDQ graphs: given for a PyTorch file it is a usage error
  (one line, exit 2, nothing written), not silently ignored; an ONNX file still takes it.
- Numbers that set the cost of a command (``--samples``, ``--input-shape``, ``bench --runs/--warmup/--threads``)
  have upper bounds: past them one line, exit 2, before anything runs; cli.md states them.
- ``summary.convs_before/convs_after`` are counts in every PyTorch report, merged or not (as ONNX reports them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.verification import bounds
from models.stats import randomize_bn

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    return randomize_bn(m).eval()


@pytest.fixture()
def pt2(tmp_path: Path) -> Path:
    p = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(_net(), (torch.randn(2, 3, 8, 8),)), str(p))
    return p


def _one_line_exit_2(args: list[str], *needles: str) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _conv_bn_onnx() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "mu"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "var"),
    ]
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "var"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


# ---------------------------------------------------------------------------- --requantize-bias
@pytest.mark.parametrize("out", ["o.pt2", "o.onnx"])
def test_requantize_bias_on_a_pytorch_file_is_a_usage_error(pt2: Path, out: str) -> None:
    before = pt2.read_bytes()
    dst = pt2.parent / out
    _one_line_exit_2(["fold", str(pt2), str(dst), "--requantize-bias"], "--requantize-bias", "ONNX")
    assert pt2.read_bytes() == before
    assert sorted(p.name for p in pt2.parent.iterdir()) == ["m.pt2"]  # nothing written, no temporaries


def test_requantize_bias_still_applies_to_an_onnx_file(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_conv_bn_onnx(), str(src))
    r = runner.invoke(app, ["fold", str(src), str(tmp_path / "o.onnx"), "--requantize-bias", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["bn_after"] == 0


# ---------------------------------------------------------------------------- bounds
def test_bounds_are_far_above_real_use() -> None:
    assert bounds.MAX_INPUT_VALUES >= 3 * 4096 * 4096  # a 4K RGB image
    assert bounds.MAX_SAMPLES >= 100 and bounds.MAX_RUNS >= 1000 and bounds.MAX_THREADS >= 256


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--samples", str(bounds.MAX_SAMPLES + 1)], f"--samples {bounds.MAX_SAMPLES + 1}"),
        (["-s", "x=1x3x100000x100000"], "--input-shape x=1x3x100000x100000"),
        (["-s", "x=1x3x4096x4096", "-n", "100"], "--samples 100"),
    ],
)
@pytest.mark.parametrize("command", ["fold", "verify"])
def test_inputs_over_their_bound_stop_before_anything_runs(
    pt2: Path, command: str, extra: list[str], needle: str
) -> None:
    other = pt2.parent / ("o.pt2" if command == "fold" else "m.pt2")
    line = _one_line_exit_2([command, str(pt2), str(other), *extra], needle, "at most")
    assert "Traceback" not in line
    assert sorted(p.name for p in pt2.parent.iterdir()) == ["m.pt2"]


def test_inspect_input_shape_over_its_bound(pt2: Path) -> None:
    _one_line_exit_2(["inspect", str(pt2), "-s", "x=1x3x100000x100000"], "--input-shape", "at most")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--runs", bounds.MAX_RUNS + 1),
        ("--warmup", bounds.MAX_WARMUP + 1),
        ("--threads", bounds.MAX_THREADS + 1),
    ],
)
def test_bench_counts_over_their_bound(pt2: Path, flag: str, value: int) -> None:
    _one_line_exit_2(["bench", str(pt2), flag, str(value)], f"{flag} {value}: must be at most")


def test_bench_input_shape_over_its_bound(pt2: Path) -> None:
    _one_line_exit_2(["bench", str(pt2), "-s", "x=1x3x100000x100000"], "--input-shape", "at most")


def test_cli_md_states_the_bounds() -> None:
    text = (ROOT / "cli.md").read_text(encoding="utf-8")
    for v in (bounds.MAX_SAMPLES, bounds.MAX_RUNS, bounds.MAX_WARMUP, bounds.MAX_THREADS):
        assert f"{v:,}".replace(",", "") in text.replace(",", "").replace(" ", ""), v
    assert "2^28" in text and "2^30" in text


# ---------------------------------------------------------------------------- convs_before / convs_after
@pytest.mark.parametrize("merge", [True, False])
def test_api_counts_convs_merged_or_not(merge: bool) -> None:
    m = _net()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(m, (x,))
    for rep in (
        bnfold.fold_with_report(m, merge_branches=merge)[1],
        bnfold.fold_with_report(ep, merge_branches=merge)[1],
    ):
        assert (rep.convs_before, rep.convs_after) == (2, 2), rep.backend
    assert bnfold.inspect(m, merge_branches=merge).convs_after == 2
    assert bnfold.inspect(ep, merge_branches=merge).convs_after == 2


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.bn(self.conv(x))
        return y if float(y.sum()) > -1e30 else -y  # data-dependent: torch.fx cannot trace it


def test_untraceable_model_counts_convs() -> None:
    m = randomize_bn(_Untraceable()).eval()
    _, rep = bnfold.fold_with_report(m)
    assert (rep.convs_before, rep.convs_after) == (1, 1)


@pytest.mark.parametrize("merge", [[], ["--no-merge-branches"]])
def test_cli_json_counts_convs(pt2: Path, merge: list[str]) -> None:
    r = runner.invoke(app, ["fold", str(pt2), str(pt2.parent / "o.pt2"), "--json", *merge])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["summary"]
    assert (s["convs_before"], s["convs_after"]) == (2, 2)
    r = runner.invoke(app, ["inspect", str(pt2), "--json", *merge])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["summary"]
    assert (s["convs_before"], s["convs_after"]) == (2, 2)
