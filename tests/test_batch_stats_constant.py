"""A batch-statistics BN on a module's own weight (weight standardisation: timm StdConv2d /
ScaledStdConv2d, NF-ResNets) is a constant: the PyTorch fold evaluates it once, by default, and the layer
becomes a plain conv holding the standardised weight; a BN after it then folds. The reference for the
weight is an independent float64 standardisation in numpy; for the model, the original module's output.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.records import Site
from models.batch_stats import ScaledStdConv2d, StdConv2d, torch_weight_standardised_net

# float32 convs of <= 27 terms on values of order 1, compared with the same convs on weights computed
# in float32 by the original: a few float32 ulps of the output's scale.
ATOL, RTOL = 2e-5, 1e-5


def _standardised(w: torch.Tensor, eps: float, gain: np.ndarray | None = None) -> np.ndarray:
    """Each output filter: (w - mean) / sqrt(biased var + eps) * gain, in float64 (numpy)."""
    a = w.detach().numpy().astype(np.float64)
    flat = a.reshape(a.shape[0], -1)
    out = (flat - flat.mean(1, keepdims=True)) / np.sqrt(flat.var(1, keepdims=True) + eps)
    if gain is not None:
        out = out * gain.reshape(-1, 1)
    return out.reshape(a.shape).astype(np.float32)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_std_convs_become_plain_convs_with_the_standardised_weights() -> None:
    net = torch_weight_standardised_net()
    before = _state(net)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.3
    with torch.no_grad():
        ref = net(x)
    folded, report = bnfold.fold_with_report(net)
    # the original is untouched: same classes, same tensors
    assert type(net[0]) is ScaledStdConv2d and type(net[2]) is StdConv2d and type(net[3]) is nn.BatchNorm2d
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # plain convs; the first holds exactly the standardised (and scaled) weight
    assert type(folded[0]) is nn.Conv2d and type(folded[2]) is nn.Conv2d and type(folded[3]) is nn.Identity
    s = net[0]
    gain = (s.gain.detach().numpy().astype(np.float64) * s.scale).ravel()
    np.testing.assert_allclose(
        folded[0].weight.detach().numpy(), _standardised(s.weight, s.eps, gain), rtol=1e-6
    )
    assert torch.equal(folded[0].bias, net[0].bias) and folded[0].padding == (1, 1)
    assert folded[2].groups == 2 and folded[2].bias is not None  # the BN after it folded into it
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, atol=ATOL, rtol=RTOL)
    by_bn = {v.bn: v for v in report.verdicts}
    assert [v.bn for v in report.verdicts] == ["0.batch_norm", "2.batch_norm", "3"]
    for name in ("0.batch_norm", "2.batch_norm"):
        v = by_bn[name]
        assert isinstance(v, Site) and v.target_kind == "constant" and "evaluated once" in v.detail
    assert isinstance(by_bn["3"], Site) and by_bn["3"].target == "2"
    assert report.bn_before == 3 and report.bn_after == 0


def test_std_conv_weight_alone_equals_the_standardisation() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(StdConv2d(3, 5, 3, eps=1e-4), nn.ReLU()).eval()
    with torch.no_grad():
        net[0].weight.normal_(0.3, 0.4)
    folded = bnfold.fold(net)
    assert type(folded[0]) is nn.Conv2d and folded[0].bias is None
    np.testing.assert_allclose(
        folded[0].weight.detach().numpy(), _standardised(net[0].weight, 1e-4), rtol=1e-6
    )
    x = torch.randn(1, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=ATOL, rtol=RTOL)


def test_inspect_and_inplace() -> None:
    net = torch_weight_standardised_net()
    keep = copy.deepcopy(net)
    report = bnfold.inspect(net)
    assert type(net[0]) is ScaledStdConv2d  # a dry run changes nothing
    assert [v.bn for v in report.verdicts] == ["0.batch_norm", "2.batch_norm", "3"] and report.bn_after == 0
    out = bnfold.fold(net, inplace=True)
    assert out is net and type(net[0]) is nn.Conv2d and type(net[3]) is nn.Identity
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(net(x), keep(x), atol=ATOL, rtol=RTOL)


class _ActStd(nn.Conv2d):
    """Batch statistics of the *input* (not a constant): not evaluated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.batch_norm(x, None, None, training=True), self.weight, self.bias)


class _RunningStd(nn.Conv2d):
    """F.batch_norm on the weight that also updates running statistics (a side effect): not evaluated."""

    def __init__(self) -> None:
        super().__init__(3, 4, 1)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, 4, -1), self.rm, self.rv, training=True).reshape_as(
            self.weight
        )
        return F.conv2d(x, w, self.bias)


@pytest.mark.parametrize("layer", [lambda: _ActStd(3, 4, 1), _RunningStd], ids=["input-stats", "running"])
def test_not_constant_is_left_as_before(layer: object) -> None:
    net = nn.Sequential(layer(), nn.BatchNorm2d(4)).eval()  # type: ignore[operator]
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 5, 5) + 0.4
    with torch.no_grad():
        ref = net(x)  # (_RunningStd updates its buffers here, as in every call)
    keep = _state(net)
    folded, report = bnfold.fold_with_report(net)
    assert [v.bn for v in report.verdicts] == ["1"]  # no constant evaluated; the BN's own verdict only
    assert not isinstance(folded, nn.Sequential) or type(folded[0]) is not nn.Conv2d
    assert all(torch.equal(keep[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, atol=ATOL, rtol=RTOL)


def test_cli_fold_of_a_weight_standardised_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ws_factory.py").write_text(
        "from models.batch_stats import torch_weight_standardised_net\n"
        "def make():\n    return torch_weight_standardised_net(seed=5)\n"
    )
    torch.save(torch_weight_standardised_net(seed=5).state_dict(), tmp_path / "ws.pt")
    src = (tmp_path / "ws.pt").read_bytes()
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["fold", tmp_path / "ws.pt", "-o", tmp_path / "out.pt", "--model", "ws_factory:make"]
    r = CliRunner().invoke(app, [*map(str, args), "--input-shape", "x=1x3x8x8", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    kinds = {v["bn"]: v["target_kind"] for v in doc["verdicts"]}
    assert kinds == {"0.batch_norm": "constant", "2.batch_norm": "constant", "3": "Conv2d"}, doc["verdicts"]
    assert (tmp_path / "ws.pt").read_bytes() == src and (tmp_path / "out.pt").exists()
