"""The quantisation-readiness audit (issue 25): per-tensor int8 bits lost in every layer a fold writes.

The expected figures are computed here from the weights of the model the fold returns (numpy, float64),
never by calling the audit's own helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.health_records import QUANT_RATIO_FLAG
from models.mobilenet_quant import TINY_LAYER, mobilenet_quant, mobilenet_quant_onnx
from models.stats import bn_stats, randomize_bn

runner = CliRunner()
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ONNX_TINY = "/blocks/blocks.0/conv/conv.1/conv.1.0/Conv"  # the legacy exporter's name for TINY_LAYER


def _expected(per_channel_max: np.ndarray) -> float:
    """max / median of the per-output-channel max |w| (median over the nonzero channels)."""
    r = np.asarray(per_channel_max, dtype=np.float64)
    return float(r.max() / np.median(r[r > 0]))


def _torch_ratio(folded: nn.Module, name: str) -> float:
    w = folded.get_submodule(name).weight.detach().to(torch.float64).numpy()  # type: ignore[operator]
    return _expected(np.abs(w).reshape(w.shape[0], -1).max(axis=1))


def _onnx_ratio(folded: onnx.ModelProto, node_name: str) -> float:
    node = next(n for n in folded.graph.node if n.name == node_name)
    init = next(t for t in folded.graph.initializer if t.name == node.input[1])
    w = numpy_helper.to_array(init).astype(np.float64)
    return _expected(np.abs(w).reshape(w.shape[0], -1).max(axis=1))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("quant") / "mnq.onnx"
    onnx.save(mobilenet_quant_onnx(mobilenet_quant(tiny_var=True), X), str(p))
    return p


@pytest.fixture(scope="module")
def healthy_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("quant") / "mn.onnx"
    onnx.save(mobilenet_quant_onnx(mobilenet_quant(tiny_var=False), X), str(p))
    return p


def test_torch_tiny_variance_layer_is_flagged_with_the_ratio_of_the_folded_weight() -> None:
    m = mobilenet_quant(tiny_var=True)
    folded, rep = bnfold.fold_with_report(m, health=True, flush_denormals=False)
    assert rep.health is not None
    q = {r.layer: r for r in rep.health.quant}
    assert len(q) == 7  # every conv a BN folds into; the Linear has no BN
    assert [r.layer for r in rep.health.quant_flagged] == [TINY_LAYER]
    t = q[TINY_LAYER]
    want = _torch_ratio(folded, TINY_LAYER)
    assert t.ratio == pytest.approx(want, rel=1e-12) and want > 100
    assert t.bits_lost == pytest.approx(math.log2(want), rel=1e-12) and t.bits_lost > 6
    assert t.worst_channel == 0 and t.channels == 96
    assert t.ratio_before == pytest.approx(_torch_ratio(m, TINY_LAYER), rel=1e-12)
    assert t.ratio_before < QUANT_RATIO_FLAG  # the fold made it: the unfolded weight was fine
    for name, r in q.items():  # every layer, not just the flagged one
        assert r.ratio == pytest.approx(_torch_ratio(folded, name), rel=1e-12)


def test_torch_healthy_model_flags_nothing() -> None:
    h = bnfold.health(mobilenet_quant(tiny_var=False))
    assert len(h.quant) == 7 and h.quant_flagged == ()
    assert all(1 <= r.ratio < QUANT_RATIO_FLAG for r in h.quant)


def test_onnx_tiny_variance_layer_is_flagged(tiny_onnx: Path, healthy_onnx: Path) -> None:
    model = onnx.load(str(tiny_onnx))
    folded, rep = bnfold.fold_with_report(model, health=True, flush_denormals=False)
    assert rep.health is not None and len(rep.health.quant) == 7
    assert [r.layer for r in rep.health.quant_flagged] == [ONNX_TINY]
    for r in rep.health.quant:
        assert r.ratio == pytest.approx(_onnx_ratio(folded, r.layer), rel=1e-12)
    assert bnfold.health(onnx.load(str(healthy_onnx))).quant_flagged == ()


def test_conv_transpose_and_linear_output_channel_axes() -> None:
    """ConvTranspose weights are (C_in, C_out / groups, ...) and a Linear's (out, in): the flagged channel
    is the output channel whose BN variance is tiny, whatever the layout."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ct = nn.ConvTranspose2d(4, 8, 3, groups=2)
            self.b1 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 10 * 10, 6)
            self.b2 = nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b2(self.fc(torch.relu(self.b1(self.ct(x))).flatten(1)))

    torch.manual_seed(0)
    m = randomize_bn(Net(), 1).eval()
    with torch.no_grad():
        m.b1.running_var[5] = 1e-6  # type: ignore[index]
        m.b2.running_var[3] = 1e-6  # type: ignore[index]
    folded, rep = bnfold.fold_with_report(m, health=True, flush_denormals=False)
    assert rep.health is not None
    q = {r.layer: r for r in rep.health.quant}
    assert q["ct"].worst_channel == 5 and q["ct"].channels == 8 and q["ct"].kind == "ConvTranspose"
    assert q["fc"].worst_channel == 3 and q["fc"].channels == 6 and q["fc"].flagged
    w = folded.ct.weight.detach().double().numpy()  # (4, 4, 3, 3): group g's output j is channel 4g + j
    per_out = np.abs(w).reshape(2, 2, 4, -1).transpose(0, 2, 1, 3).reshape(8, -1).max(axis=1)
    assert q["ct"].ratio == pytest.approx(_expected(per_out), rel=1e-12) and q["ct"].flagged


def _matmul_bn(weight_first_axis_out: bool) -> onnx.ModelProto:
    """x (2, 5) -> Gemm (transB as given) or MatMul -> BN(6): var 1e-6 on channel 4."""
    rng = np.random.default_rng(0)
    gamma, beta, mean, var = bn_stats(6, rng)
    var[4] = 1e-6
    w = rng.standard_normal((5, 6))
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for a, n in ((gamma, "g"), (beta, "b"), (mean, "m"), (var, "v"))
    ]
    if weight_first_axis_out:
        inits.append(numpy_helper.from_array(w.T.astype(np.float32).copy(), "W"))
        mm = helper.make_node("Gemm", ["x", "W"], ["h"], name="mm", transB=1)
    else:
        inits.append(numpy_helper.from_array(w.astype(np.float32), "W"))
        mm = helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")
    bn = helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn")
    g = helper.make_graph(
        [mm, bn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm-transB", "matmul"])
def test_onnx_gemm_and_matmul_output_channel_axes(gemm: bool) -> None:
    folded, rep = bnfold.fold_with_report(_matmul_bn(gemm), health=True, flush_denormals=False)
    assert rep.health is not None and rep.folded == 1
    (q,) = rep.health.quant
    w = numpy_helper.to_array(
        next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1])
    )
    per_out = np.abs(w.astype(np.float64)).max(axis=1 if gemm else 0)
    assert q.worst_channel == 4 and q.channels == 6 and q.flagged
    assert q.ratio == pytest.approx(_expected(per_out), rel=1e-12)


def test_fold_cli_summary_line_verbose_table_and_json(
    tiny_onnx: Path, healthy_onnx: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(tiny_onnx), "-o", str(out), "--health"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "quantisation: 1 of 7 folded layer(s) lose >= 4 bits under per-tensor int8" in text
    assert "per-channel weight quantization" in text and "Per-tensor int8 readiness" not in text
    v = runner.invoke(app, ["fold", str(tiny_onnx), "-o", str(out), "--health", "-v"])
    assert v.exit_code == 0 and "Per-tensor int8 readiness" in v.stdout
    j = runner.invoke(app, ["inspect", str(tiny_onnx), "--health", "--json"])
    assert j.exit_code == 0, j.output
    h: dict[str, Any] = json.loads(j.stdout)["health"]
    assert h["quant_flagged"] == 1 and h["quant_ratio_flag"] == QUANT_RATIO_FLAG and len(h["quant"]) == 7
    (flag,) = [q for q in h["quant"] if q["flagged"]]
    assert flag["layer"] == ONNX_TINY and flag["bits_lost"] == pytest.approx(math.log2(flag["ratio"]))
    assert flag["ratio"] == pytest.approx(_onnx_ratio(onnx.load(str(out)), ONNX_TINY), rel=1e-6)
    healthy = runner.invoke(app, ["fold", str(healthy_onnx), "-o", str(out), "--health"])
    assert healthy.exit_code == 0 and "quantisation:" not in healthy.stdout
    plain = runner.invoke(app, ["fold", str(tiny_onnx), "-o", str(out)])  # the fold's own summary line
    assert plain.exit_code == 0
    assert "quantisation: 1 layer(s) flagged for per-tensor int8" in " ".join(plain.stdout.split())


def test_benchmark_flagged_layer_is_what_per_tensor_int8_breaks() -> None:
    """The benchmark's figure (quick path): quantising the flagged layer per-tensor costs its typical
    channel far more than any unflagged layer loses, and per-channel quantisation removes the loss."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_quant_audit", root / "benchmarks" / "bench_quant_audit.py"
        )
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(root / "benchmarks"))
    r = bench.study("mobilenet_quant", True)
    (flag,) = [p for p in r["per_layer"] if p["flagged"]]
    clean = [p for p in r["per_layer"] if not p["flagged"]]
    assert flag["layer"] == TINY_LAYER
    assert flag["layer_tensor"] > 3 * max(p["layer_tensor"] for p in clean)
    assert flag["layer_channel"] < flag["layer_tensor"] / 20


def test_inspect_pytorch_file_json_and_line(tmp_path: Path) -> None:
    pt = tmp_path / "mnq.pt"
    torch.save(mobilenet_quant(tiny_var=True).state_dict(), str(pt))
    args = ["inspect", str(pt), "--model", "models.mobilenet_quant:mobilenet_quant", "--health"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"(worst: {TINY_LAYER}," in " ".join(r.stdout.split())
    j = runner.invoke(app, [*args, "--json"])
    assert j.exit_code == 0, j.output
    h = json.loads(j.stdout)["health"]
    assert [q["layer"] for q in h["quant"] if q["flagged"]] == [TINY_LAYER] and h["quant_flagged"] == 1
