"""A small MobileNetV2-style network for the quantisation-readiness audit (``bnfold inspect --health``).

Stem ``conv3x3/2 -> BN -> ReLU6``, two inverted residual blocks of :mod:`models.mobilenet` (expand 1x1,
depthwise 3x3, project 1x1, BN after each conv, the second with its identity shortcut), pool, Linear.
Every BN gets realistic statistics (:func:`models.stats.randomize_bn`); with ``tiny_var=True`` the
depthwise BN of the first block has ``running_var = 1e-6`` on channel 0 (a channel that saw an almost
constant input during training): its BN scale is ~gamma / sqrt(1.1e-5), ~300x the others, and after
folding that one channel sets the per-tensor int8 scale of the whole depthwise weight -- the failure
Nagel et al. 2019 report for MobileNetV2 (71.7% -> 0.1% top-1).

The ONNX form (:func:`mobilenet_quant_onnx`) is exported with the legacy exporter, BNs kept.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from .mobilenet import InvertedResidual, _conv_bn_relu6
from .stats import randomize_bn

__all__ = ["MobileNetQuant", "mobilenet_quant", "mobilenet_quant_onnx", "TINY_BN", "TINY_LAYER", "TINY_VAR"]

TINY_BN = "blocks.0.conv.1.1"
"""The BN given a tiny variance (depthwise BN of the first block); it folds into ``blocks.0.conv.1.0``."""
TINY_LAYER = "blocks.0.conv.1.0"
TINY_VAR = 1e-6


class MobileNetQuant(nn.Module):
    """Stem, two inverted residual blocks (16 -> 16 channels, expansion 6), pool, Linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu6(3, 16, stride=2)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 6), InvertedResidual(16, 16, 1, 6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@torch.no_grad()
def mobilenet_quant(*, tiny_var: bool = True, seed: int = 0) -> MobileNetQuant:
    """The network in eval mode with realistic BN statistics; ``tiny_var``: channel 0 of :data:`TINY_BN`
    at ``running_var = 1e-6``."""
    torch.manual_seed(seed)
    m = randomize_bn(MobileNetQuant(), seed).eval()
    if tiny_var:
        m.get_submodule(TINY_BN).running_var[0] = TINY_VAR  # type: ignore[index]
    return m


def mobilenet_quant_onnx(model: nn.Module, x: torch.Tensor) -> Any:
    """``model`` exported to ONNX (opset 17, BatchNormalization nodes kept); the ``onnx.ModelProto``."""
    import onnx

    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
    )
    return onnx.load_from_string(buf.getvalue())


mobilenet_quant.example_input_shape = (3, 32, 32)  # type: ignore[attr-defined]
