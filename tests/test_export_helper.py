"""bnfold.export_onnx: fold in torch, export, fold the ONNX graph, verify, write atomically."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import ModelStateError, VerificationError
from models.stats import randomize_bn
from models.testing import ATOL_F32, ort_session

# float32 through two folds and two runtimes: a few ulps of the output scale.
TOL32 = ATOL_F32  # models.testing: the one tolerance table


class Shared(nn.Module):
    """Conv called twice (folded on clones in torch) + ConvTranspose and Linear (the legacy exporter
    folds neither)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.b2 = nn.BatchNorm2d(4)
        self.ct = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.b3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.b4 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b1(self.conv(x)) + self.b2(self.conv(x))
        y = self.b3(self.ct(y))
        return self.b4(self.fc(y.mean((2, 3))))


def _run(path: str, x: torch.Tensor) -> np.ndarray:
    s = ort_session(path)
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Shared(), 0).eval()


@pytest.mark.parametrize("dynamo", [False, True])
def test_export_onnx_writes_folded_verified_file(tmp_path: os.PathLike[str], dynamo: bool) -> None:
    m = _model()
    x = torch.randn(2, 3, 6, 6)
    w0 = m.conv.weight.detach().clone()
    path = os.path.join(tmp_path, "m.onnx")
    rep = bnfold.export_onnx(m, (x,), path, dynamo=dynamo)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert rep.verification is not None and rep.verification.passed
    assert rep.extra["torch"] == 4 and rep.extra["left"] == 0
    ref = m(x).detach().numpy()
    assert np.abs(_run(path, x) - ref).max() <= TOL32 * max(1.0, np.abs(ref).max())
    assert torch.equal(m.conv.weight, w0) and isinstance(m.b1, nn.BatchNorm2d)


def test_export_onnx_refuses_train_mode(tmp_path: os.PathLike[str]) -> None:
    m = _model().train()
    path = os.path.join(tmp_path, "m.onnx")
    with pytest.raises(ModelStateError):
        bnfold.export_onnx(m, (torch.randn(2, 3, 6, 6),), path)
    assert not os.path.exists(path)


def test_export_onnx_verification_failure_writes_nothing(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnfold.onnx as bonnx

    real = bonnx.fold_model

    def broken(model: onnx.ModelProto, **kw: object) -> object:
        out, rep = real(model, **kw)  # type: ignore[arg-type]
        for init in out.graph.initializer:  # corrupt one weight: the check must catch it
            if len(init.dims) == 4:
                arr = onnx.numpy_helper.to_array(init) * 1.5
                init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
                break
        return out, rep

    monkeypatch.setattr(bonnx, "fold_model", broken)
    path = os.path.join(tmp_path, "m.onnx")
    with pytest.raises(VerificationError):
        bnfold.export_onnx(_model(), (torch.randn(2, 3, 6, 6),), path)
    assert os.listdir(tmp_path) == []
