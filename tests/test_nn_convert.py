"""bnfold.nn.convert swaps torch's BatchNorm layers for bnfold's and back without changing the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnfold.nn as bnn
from models.stats import randomize_bn
from models.testing import ATOL_F32

# float32 training step: batch statistics summed in another order than torch's kernel (a few ulps)
ATOL = ATOL_F32  # models.testing: the one tolerance table


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, momentum=None, affine=True)),
        nn.Flatten(2),
        nn.BatchNorm1d(4, eps=1e-3),
        nn.Flatten(),
        nn.Linear(4 * 25, 3),
    )


def _bn_types(model: nn.Module) -> list[type[nn.Module]]:
    return [type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _train_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    model.zero_grad()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("inplace", [False, True])
def test_round_trip_keeps_outputs_state_and_training_step(inplace: bool) -> None:
    original = randomize_bn(_model(), seed=4).eval()
    keep = copy.deepcopy(original)
    x = torch.randn(4, 3, 5, 5)
    expected = original(x)

    ours = bnn.convert(original, "bnfold", inplace=inplace)
    assert _bn_types(ours) == [bnn.BatchNorm2d, bnn.BatchNorm2d, bnn.BatchNorm1d]
    assert (ours is original) == inplace
    if not inplace:
        assert _bn_types(original) == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert not ours.training and not ours[1].training
    assert ours[5].eps == 1e-3 and ours[3][1].momentum is None
    torch.testing.assert_close(ours(x), expected, atol=0, rtol=0)
    assert list(ours.state_dict()) == list(keep.state_dict())

    back = bnn.convert(ours, to="torch")
    assert _bn_types(back) == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    torch.testing.assert_close(back(x), expected, atol=0, rtol=0)

    # one training step: bnfold's layers against torch's, same outputs, grads and running stats
    y_ref, g_ref = _train_step(keep, x)
    y_ours, g_ours = _train_step(ours, x)
    torch.testing.assert_close(y_ours, y_ref, atol=ATOL, rtol=ATOL)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=ATOL * max(1.0, float(b.abs().max())), rtol=ATOL)
    for key, value in keep.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=ATOL, rtol=ATOL)


def test_parameters_keep_identity_flags_dtype() -> None:
    model = randomize_bn(_model(), seed=1).double()
    model[1].weight.requires_grad_(False)
    out = bnn.convert(model, inplace=True)
    assert out[1].weight.dtype == torch.float64 and out[1].running_var.dtype == torch.float64
    assert not out[1].weight.requires_grad and out[1].bias.requires_grad
    assert out[1].weight.device == torch.device("cpu")


def test_single_layer_root_and_sync_and_flags() -> None:
    bn = randomize_bn(nn.BatchNorm3d(5, affine=False, track_running_stats=True), seed=2)
    out = bnn.convert(bn)
    assert type(out) is bnn.BatchNorm3d and out.weight is None
    torch.testing.assert_close(out.running_var, bn.running_var)
    sync = nn.SyncBatchNorm(4, track_running_stats=False)
    ours = bnn.convert(sync)
    assert type(ours) is bnn.SyncBatchNorm and ours.running_mean is None
    assert type(bnn.convert(ours, "torch")) is nn.SyncBatchNorm
    nobias = bnn.convert(nn.BatchNorm2d(3, bias=False))
    assert nobias.bias is None and nobias.weight is not None
    # torch's layer family is left alone when converting to torch, and vice versa
    assert type(bnn.convert(nn.BatchNorm2d(3), "torch")) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="to must be"):
        bnn.convert(bn, "onnx")  # type: ignore[arg-type]
