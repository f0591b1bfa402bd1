"""bnfold.nn layers in eval mode: exported to ONNX as BatchNormalization, folded and frozen like torch's."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
import bnfold.nn as bnn
from models.stats import randomize_bn
from models.testing import ATOL_F32, ort_session

# float32 eval-mode BN, run by torch and by onnxruntime (optimisations off): a few ulps of O(1) values
ATOL = ATOL_F32  # models.testing: the one tolerance table


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        bnn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16, 5),
        bnn.BatchNorm1d(5),
    )


def _run_onnx(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    sess = ort_session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize(
    "layer,shape",
    [
        (bnn.BatchNorm1d(4), (2, 4, 6)),
        (bnn.BatchNorm2d(4), (2, 4, 3, 3)),
        (bnn.BatchNorm3d(4), (2, 4, 2, 3, 3)),
    ],
)
def test_eval_exports_as_batchnormalization_legacy(layer: nn.Module, shape: tuple[int, ...]) -> None:
    m = randomize_bn(layer, seed=1).eval()
    x = torch.randn(shape)
    buf = io.BytesIO()
    torch.onnx.export(m, (x,), buf, dynamo=False, do_constant_folding=False)
    model = onnx.load_from_string(buf.getvalue())
    assert [n.op_type for n in model.graph.node] == ["BatchNormalization"]
    np.testing.assert_allclose(_run_onnx(model, x), m(x).detach().numpy(), atol=ATOL, rtol=ATOL)


def test_eval_exports_as_batchnormalization_dynamo() -> None:
    pytest.importorskip("onnxscript")
    m = randomize_bn(bnn.BatchNorm2d(4), seed=1).eval()
    x = torch.randn(2, 4, 3, 3)
    program = torch.onnx.export(m, (x,), dynamo=True, optimize=False, verbose=False)
    ops = [n.op_type for n in program.model_proto.graph.node]
    assert "BatchNormalization" in ops
    np.testing.assert_allclose(_run_onnx(program.model_proto, x), m(x).detach().numpy(), atol=ATOL, rtol=ATOL)


def test_fold_removes_bnfold_layers_like_torch_ones() -> None:
    model = randomize_bn(_net(), seed=2).eval()
    x = torch.randn(3, 3, 6, 6)
    folded = bnfold.fold(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=ATOL, rtol=ATOL)


def test_freeze_replaces_bnfold_layers() -> None:
    model = randomize_bn(_net(), seed=3).eval()
    x = torch.randn(3, 3, 6, 6)
    frozen = bnfold.freeze(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    frozen.train()  # a frozen layer computes the same in train mode
    torch.testing.assert_close(frozen(x), model(x), atol=ATOL, rtol=ATOL)
