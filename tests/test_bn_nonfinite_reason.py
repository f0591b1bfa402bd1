"""A BN whose own parameters make it yield NaN/inf is left with the precise reason: which parameter,
what (NaN, inf, variance + epsilon not positive) and at which channel -- in both backends."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import numpy_helper

from bnfold.api import fold_with_report
from bnfold.records import SkipReason
from models.onnx_graphs import G

NAN, INF = float("nan"), float("inf")
# (parameter, value at channel 2, the reason's words)
CASES = [
    ("gamma", NAN, "gamma has NaN at channel 2"),
    ("gamma", -INF, "gamma has inf at channel 2"),
    ("beta", INF, "beta has inf at channel 2"),
    ("mean", NAN, "running mean has NaN at channel 2"),
    ("var", NAN, "running variance has NaN at channel 2"),
    ("var", -0.5, "running variance + epsilon is not positive at channel 2 (var -0.5, eps 1e-05)"),
]


def onnx_conv_bn(param: str, value: float) -> onnx.ModelProto:
    g = G(seed=1)
    g.input("x", [1, 3, 6, 6])
    g.node("Conv", ["x", g.rand("w", (4, 3, 3, 3))], ["t"], name="conv")
    g.bn("t", "y", 4, "bn")
    g.output("y")
    m = g.model(opset=17)
    t = next(t for t in m.graph.initializer if t.name == f"bn.{param}")
    v = numpy_helper.to_array(t).copy()
    v[2] = value
    t.CopyFrom(numpy_helper.from_array(v, t.name))
    return m


@pytest.mark.parametrize(("param", "value", "words"), CASES)
def test_onnx_nonfinite_bn_reason(param: str, value: float, words: str) -> None:
    m = onnx_conv_bn(param, value)
    out, rep = fold_with_report(m)
    (v,) = rep.verdicts
    assert not v.folded and v.reason is SkipReason.OVERFLOW
    assert v.detail == f"{words}: the BN itself yields NaN/inf"
    assert [n.op_type for n in out.graph.node] == ["Conv", "BatchNormalization"]


TORCH_NAMES = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}


@pytest.mark.parametrize(("param", "value", "words"), CASES)
def test_torch_nonfinite_bn_reason(param: str, value: float, words: str) -> None:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    bn = m[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.8, 1.3, 0.6, 1.1]))
        bn.bias.copy_(torch.tensor([0.2, -0.1, 0.3, 0.05]))
        bn.running_mean.copy_(torch.tensor([0.4, -0.3, 0.1, 0.2]))
        bn.running_var.copy_(torch.tensor([0.7, 1.6, 0.9, 2.1]))
        getattr(bn, TORCH_NAMES[param])[2] = value
    out, rep = fold_with_report(m, example_inputs=(torch.randn(1, 3, 8, 8),))
    (v,) = rep.verdicts
    assert not v.folded and v.reason is SkipReason.OVERFLOW
    assert v.detail == f"{words}: the BN itself yields NaN/inf"
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in out.modules())


def test_cli_names_the_channel(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from bnfold.cli import app

    src, dst = tmp_path / "m.onnx", tmp_path / "f.onnx"
    onnx.save(onnx_conv_bn("gamma", NAN), src)
    before = src.read_bytes()
    r = CliRunner().invoke(app, ["fold", str(src), "-o", str(dst), "--json"])
    assert r.exit_code == 0, r.output  # a BN left is a verdict, not an error
    data = json.loads(r.stdout)
    (v,) = data["verdicts"]
    assert v["status"] == "left" and v["reason"] == "overflow"
    assert v["detail"].startswith("gamma has NaN at channel 2")
    assert src.read_bytes() == before


def test_torch_export_nonfinite_bn_reason() -> None:
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[1].running_mean.copy_(torch.tensor([0.4, -0.3, 0.1, 0.2]))
        m[1].running_var.copy_(torch.tensor([0.7, 1.6, 0.9, 2.1]))
        m[1].weight[1] = NAN
    ep = torch.export.export(m, (torch.randn(1, 3, 8, 8),))
    _, rep = fold_with_report(ep)
    (v,) = rep.verdicts
    assert not v.folded and v.reason is SkipReason.OVERFLOW
    assert v.detail == "gamma has NaN at channel 1: the BN itself yields NaN/inf"
