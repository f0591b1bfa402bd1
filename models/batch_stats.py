"""Models whose BatchNorms normalise with their batch at inference (bnfold issue 26).

ONNX: ``Conv -> BatchNormalization(training_mode=1) -> Relu`` (what exporters write for
``track_running_stats=False``), of data rank 3, 4 or 5, and a weight-standardised conv (a training-mode
BN applied to the conv's constant weight). PyTorch: small nets with ``BatchNorm{1,2,3}d(track_running_stats=False)``.
Statistics are realistic (mean != 0, var != 1, gamma != 1, beta != 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def _bn_params(c: int, rng: np.random.Generator, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    return {
        "scale": rng.uniform(0.5, 2.0, c).astype(dtype),
        "B": rng.uniform(-1.0, 1.0, c).astype(dtype),
        "mean": rng.uniform(-0.5, 0.5, c).astype(dtype),  # unused in training mode
        "var": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


def onnx_training_bn(
    rank: int = 4,
    c: int = 4,
    opset: int = 15,
    *,
    read_running: bool = False,
    batch: int | str = 1,
    seed: int = 0,
) -> onnx.ModelProto:
    """``x -> Conv (kernel 3, pads 1) -> BatchNormalization(training_mode=1) -> Relu -> y`` on data of ``rank``.

    ``read_running``: the BN's running-mean output is a second graph output. ``rank`` 2 uses a Gemm.
    """
    rng = np.random.default_rng(seed)
    cin = 3
    spatial = {2: [], 3: [9], 4: [7, 6], 5: [5, 4, 3]}[rank]
    inits = []
    if rank == 2:
        w = rng.normal(0, 0.5, (c, cin)).astype(np.float32)
        layer = helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc", transB=1)
    else:
        w = rng.normal(0, 0.5, (c, cin, *([3] * (rank - 2)))).astype(np.float32)
        layer = helper.make_node("Conv", ["x", "W", "b"], ["h"], name="conv", pads=[1] * (2 * (rank - 2)))
    inits += [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(rng.normal(0, 0.3, c).astype(np.float32), "b"),
    ]
    p = _bn_params(c, rng)
    inits += [numpy_helper.from_array(v, f"bn_{k}") for k, v in p.items()]
    if opset >= 14:
        outs = ["z", "run_mean", "run_var"]  # onnxruntime wants all three in training mode (unread here)
        bn = helper.make_node(
            "BatchNormalization",
            ["h", "bn_scale", "bn_B", "bn_mean", "bn_var"],
            outs,
            name="bn",
            epsilon=1e-3,
            momentum=0.9,
            training_mode=1,
        )
    else:  # opsets 7-13: training mode is the optional outputs produced
        outs = ["z", "run_mean", "run_var", "saved_mean", "saved_var"]
        bn = helper.make_node(
            "BatchNormalization",
            ["h", "bn_scale", "bn_B", "bn_mean", "bn_var"],
            outs,
            name="bn",
            epsilon=1e-3,
            momentum=0.9,
        )
    relu = helper.make_node("Relu", ["z"], ["y"], name="relu")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, *spatial])
    graph_outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, *spatial])]
    if read_running:
        graph_outs.append(helper.make_tensor_value_info("run_mean", TensorProto.FLOAT, [c]))
    g = helper.make_graph([layer, bn, relu], "training_bn", [x], graph_outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def onnx_weight_standardised(seed: int = 0) -> onnx.ModelProto:
    """A conv whose weight is standardised by a training-mode BN (NF-ResNet style), then a BN to fold.

    ``W [4,3,3,3] -> Reshape [1,4,27] -> BN(training, scale=gain, B=0) -> Reshape [4,3,3,3] -> Conv -> BN``.
    """
    rng = np.random.default_rng(seed)
    c = 4
    w = rng.normal(0.2, 0.5, (c, 3, 3, 3)).astype(np.float32)
    gain = rng.uniform(0.5, 2.0, c).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array([1, c, -1], np.int64), "ws_shape"),
        numpy_helper.from_array(np.array([c, 3, 3, 3], np.int64), "w_shape"),
        numpy_helper.from_array(gain, "gain"),
        numpy_helper.from_array(np.zeros(c, np.float32), "zero"),
        numpy_helper.from_array(np.zeros(c, np.float32), "ws_mean"),
        numpy_helper.from_array(np.ones(c, np.float32), "ws_var"),
    ]
    p = _bn_params(c, rng)
    inits += [numpy_helper.from_array(v, f"bn_{k}") for k, v in p.items()]
    nodes = [
        helper.make_node("Reshape", ["W", "ws_shape"], ["w3"], name="ws_flat"),
        helper.make_node(
            "BatchNormalization",
            ["w3", "gain", "zero", "ws_mean", "ws_var"],
            ["w3n", "ws_rm", "ws_rv"],
            name="ws_bn",
            epsilon=1e-4,
            training_mode=1,
        ),
        helper.make_node("Reshape", ["w3n", "w_shape"], ["Wn"], name="ws_back"),
        helper.make_node("Conv", ["x", "Wn"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["h", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["y"], name="bn"
        ),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])
    m = helper.make_model(
        helper.make_graph(nodes, "ws", [x], [y], inits), opset_imports=[helper.make_opsetid("", 15)]
    )
    m.ir_version = 8
    return m


def torch_batch_stats_net(dims: int = 2, c: int = 4, seed: int = 0) -> Any:
    """``conv -> BatchNorm{dims}d(track_running_stats=False) -> relu -> conv -> BN (running stats)``, eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    net = nn.Sequential(
        conv(3, c, 3, padding=1),
        bn(c, eps=1e-3, track_running_stats=False),
        nn.ReLU(),
        conv(c, c, 3, padding=1),
        bn(c),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return net.eval()


# Re-creations of timm's ``StdConv2d`` and ``ScaledStdConv2d`` (``timm/layers/std_conv.py``): the weight
# standardised per output filter by ``F.batch_norm(..., training=True)`` in every forward.
class StdConv2d(nn.Conv2d):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        *,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(cin, cout, k, padding=padding, groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    def __init__(
        self,
        cin: int,
        cout: int,
        k: int,
        *,
        padding: int = 0,
        bias: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
    ) -> None:
        super().__init__(cin, cout, k, padding=padding, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def torch_weight_standardised_net(seed: int = 0) -> Any:
    """An NF-ResNet-style stem: ``ScaledStdConv2d(bias) -> ReLU -> StdConv2d(groups=2) -> BN -> ReLU``, eval mode.

    Weights with a non-zero mean per filter, gains != 1, a BN with realistic statistics.
    """
    torch.manual_seed(seed)
    net = nn.Sequential(
        ScaledStdConv2d(3, 6, 3, padding=1, gamma=1.7, eps=1e-5),
        nn.ReLU(),
        StdConv2d(6, 4, 3, padding=1, groups=2, eps=1e-4),
        nn.BatchNorm2d(4),
        nn.ReLU(),
    )
    with torch.no_grad():
        net[0].weight.normal_(0.2, 0.5)
        net[0].gain.uniform_(0.5, 2.0)
        net[0].bias.uniform_(-0.5, 0.5)
        net[2].weight.normal_(-0.1, 0.3)
        bn = net[3]
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()
