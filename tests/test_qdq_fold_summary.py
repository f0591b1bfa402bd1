"""After a plain ``bnfold fold`` (no ``--health``): the per-tensor int8 readiness of the layers the fold
wrote, as one summary line, the flagged layers with ``-v``, every layer in ``--json`` (issue 25).

The expected ratios are computed here from the weights of the written file (numpy, float64)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.health_records import QUANT_RATIO_FLAG
from models.mobilenet_quant import TINY_LAYER, mobilenet_quant, mobilenet_quant_onnx

runner = CliRunner()
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ONNX_TINY = "/blocks/blocks.0/conv/conv.1/conv.1.0/Conv"  # the legacy exporter's name for TINY_LAYER


def _ratio(folded: onnx.ModelProto, node_name: str) -> float:
    node = next(n for n in folded.graph.node if n.name == node_name)
    init = next(t for t in folded.graph.initializer if t.name == node.input[1])
    w = np.abs(numpy_helper.to_array(init).astype(np.float64))
    r = w.reshape(w.shape[0], -1).max(axis=1)
    return float(r.max() / np.median(r[r > 0]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("summary") / "mnq.onnx"
    onnx.save(mobilenet_quant_onnx(mobilenet_quant(tiny_var=True), X), str(p))
    return p


def test_plain_fold_prints_one_summary_line(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    before = tiny.read_bytes()
    r = runner.invoke(app, ["fold", str(tiny), "-o", str(out), "--no-verify"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    line = f"quantisation: 1 layer(s) flagged for per-tensor int8 (worst: {ONNX_TINY},"
    assert line in text and "use per-channel quantization or cross-layer equalisation" in text
    assert text.count("quantisation:") == 1 and "Per-tensor int8 readiness" not in text
    assert tiny.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    v = runner.invoke(app, ["fold", str(tiny), "-o", str(out), "--no-verify", "-v"])
    assert v.exit_code == 0 and "Per-tensor int8 readiness" in v.stdout and "quantisation:" in v.stdout


def test_plain_fold_json_lists_every_written_layer(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(tiny), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    q = doc["quant"]
    assert q["ratio_flag"] == QUANT_RATIO_FLAG and q["flagged"] == 1 and len(q["layers"]) == 7
    folded = onnx.load(str(out))
    for layer in q["layers"]:  # the ratios of the weights in the file that was written
        assert layer["ratio"] == pytest.approx(_ratio(folded, layer["layer"]), rel=1e-12)
        assert layer["flagged"] == (layer["layer"] == ONNX_TINY)


def test_healthy_model_prints_no_line(tmp_path: Path) -> None:
    src, out = tmp_path / "mn.onnx", tmp_path / "out.onnx"
    onnx.save(mobilenet_quant_onnx(mobilenet_quant(tiny_var=False), X), str(src))
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--no-verify"])
    assert r.exit_code == 0 and "quantisation:" not in r.stdout


def test_with_health_the_line_is_printed_once(tiny: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["fold", str(tiny), "-o", str(tmp_path / "o.onnx"), "--no-verify", "--health"])
    assert r.exit_code == 0 and " ".join(r.stdout.split()).count("quantisation:") == 1


def test_api_report_carries_the_records_torch() -> None:
    folded, rep = bnfold.fold_with_report(mobilenet_quant(tiny_var=True))
    assert len(rep.quant) == 7 and [q.layer for q in rep.quant if q.flagged] == [TINY_LAYER]
    w = folded.get_submodule(TINY_LAYER).weight.detach().to(torch.float64).abs().numpy()  # type: ignore[operator]
    r = w.reshape(w.shape[0], -1).max(axis=1)
    (t,) = [q for q in rep.quant if q.layer == TINY_LAYER]
    assert t.ratio == pytest.approx(float(r.max() / np.median(r[r > 0])), rel=1e-12)
    _, dry = bnfold.fold_with_report(mobilenet_quant(tiny_var=True), dry_run=True)
    assert dry.quant == ()
