"""Frozen layers fold like BN: in PyTorch (bnfold.fold on the module) and in the exported ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.nn.frozen import FrozenBatchNorm
from models.stats import randomize_bn
from models.testing import ATOL_F32, run_onnx

# float32 fold of one affine map into a conv: a few ulps of the output scale (|y| ~ 10).
ATOL32 = ATOL_F32  # models.testing: the one tolerance table


def frozen_net(learnable: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, groups=2), nn.BatchNorm2d(4)
    )
    randomize_bn(model, 7).eval()
    return model, bnfold.freeze(model, learnable=learnable).eval()


@pytest.mark.parametrize("learnable", [False, True])
def test_frozen_module_folds_in_pytorch(learnable: bool) -> None:
    model, frozen = frozen_net(learnable)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # a FrozenBatchNorm2d checks its rank like the BatchNorm2d it replaces: the conv before it ran batched
    folded, report = bnfold.fold_with_report(frozen)
    assert not any(isinstance(m, FrozenBatchNorm) for m in folded.modules())
    assert report.folded == 2
    with torch.no_grad():
        torch.testing.assert_close(folded(x), frozen(x), atol=ATOL32, rtol=0)
        torch.testing.assert_close(folded(x), model(x), atol=ATOL32, rtol=0)


def test_frozen_export_folds_in_onnx(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, frozen = frozen_net(False)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "frozen.onnx"
    torch.onnx.export(frozen, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    proto = onnx.load(str(path))
    assert [n.op_type for n in proto.graph.node].count("Mul") == 2
    folded = bnfold.fold(proto)
    ops = [n.op_type for n in folded.graph.node]
    assert "Mul" not in ops and "Add" not in ops
    onnx.checker.check_model(folded, full_check=True)
    (y,) = run_onnx(folded, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, model(x).numpy(), atol=ATOL32, rtol=0)


def test_zoo_models_freeze_train_equals_eval() -> None:
    zoo = pytest.importorskip("models.zoo")
    for name in ("lenet5", "conv1d_net", "unet_decoder"):
        if name not in zoo.ZOO:
            continue
        factory, shape = zoo.ZOO[name]
        torch.manual_seed(0)
        model = randomize_bn(factory(), 3).eval()
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        frozen = bnfold.freeze(model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules()), name
        with torch.no_grad():
            ref = model(x)
            torch.testing.assert_close(frozen.train()(x), ref, atol=ATOL32 * 10, rtol=1e-5, msg=name)


def test_a_frozen_bn2d_checks_its_rank_like_the_bn_so_freeze_then_fold_needs_no_shapes() -> None:
    """FrozenBatchNorm2d refuses what BatchNorm2d refused (a 3-D input), so a conv before it ran batched:
    freeze then fold, with no example inputs, folds; a frozen layer of any rank (dim=None) proves nothing."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), seed=4).eval()
    frozen = bnfold.freeze(model)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for m in (model, frozen):
        with pytest.raises(ValueError, match="expected 4D input"):
            m(x[0])  # unbatched (C, H, W): the BN refused it, the frozen layer too
    folded, report = bnfold.fold_with_report(frozen)
    assert [v.status for v in report.verdicts] == ["folded"]
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)

    anyrank = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm(4, 1e-3, dim=None)).eval()
    (v,) = bnfold.inspect(anyrank).verdicts
    assert not v.folded and v.reason.value == "layout" and v.hints[0].option == "example_inputs"  # type: ignore[union-attr]
