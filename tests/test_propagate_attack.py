"""Soundness attacks on scale propagation (issue 27; bnfold.onnx.propagate and bnfold.fx.propagate).

Each case builds a small model a propagated fold could get wrong (ops that look like they carry the
scale but do not, shapes that move the channel, forks, values that overflow in the model's dtype) and
checks what a user would: the folded model computes what the original computes (onnxruntime with
optimisations off / PyTorch in eval, against the original), the original is untouched, and the BN is
either propagated or left with a reason -- never a wrong output, never an exception (the suite runs
with warnings as errors, so a numpy overflow warning is an exception too). BN statistics are realistic
(mean != 0, var != 1, |gamma| != 1, beta != 0) unless the case is about the scale itself.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper, parser
from torch import nn

import bnfold
from bnfold.onnx import fold_model
from bnfold.records import Direction, Site, Skip
from models.onnx_graphs import assert_close, run
from models.testing import atol

C = 6
_NP = {"float": np.float32, "double": np.float64, "float16": np.float16}


def _bn_params(rng: np.random.Generator, gamma: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {
        "g": rng.uniform(0.5, 1.5, C) if gamma is None else np.asarray(gamma, np.float64),
        "b": rng.uniform(-0.5, 0.5, C),
        "m": rng.uniform(-0.5, 0.5, C),
        "v": np.exp(rng.uniform(-1.4, 0.9, C)),
    }


def _model(body: str, inits: dict[str, np.ndarray], dtype: str = "float", outs: str = "y") -> onnx.ModelProto:
    """``x (2, C, 4, 4) -> body -> outs`` in ONNX text; float initializers cast to ``dtype``."""
    out_decl = ", ".join(f"{dtype} {o.strip()}" for o in outs.split(","))
    text = (
        '<ir_version: 8, opset_import: ["" : 17]>\n'
        f"g ({dtype}[2, {C}, 4, 4] x) => ({out_decl}) {{\n{body}\n}}"
    )
    m = parser.parse_model(text)
    for o in m.graph.output:  # the parser declares a scalar; the outputs' shapes are left to inference
        o.type.tensor_type.ClearField("shape")
    for name, v in inits.items():
        arr = np.asarray(v)
        m.graph.initializer.append(
            numpy_helper.from_array(arr.astype(_NP[dtype]) if arr.dtype.kind == "f" else arr, name)
        )
    return m


def _fold_and_compare(m: onnx.ModelProto, dtype: str = "float") -> Any:
    before = m.SerializeToString()
    out, report = fold_model(m)
    assert m.SerializeToString() == before, "the input model was changed"
    feeds = {"x": np.random.default_rng(3).standard_normal((2, C, 4, 4)).astype(_NP[dtype])}
    assert_close(run(m, feeds), run(out, feeds), atol(_NP[dtype]))
    return report


_PRE = "p = Relu(x)\nh = BatchNormalization(p, g, b, m, v)\n"


@pytest.mark.parametrize("dtype", ["float16", "float", "double"])
def test_onnx_scale_whose_shift_overflows_the_dtype_is_refused_without_a_warning(dtype: str) -> None:
    """|b / a| beyond float16's range (a = 1e-6): the Add of ``b / a`` before a zero-padded conv would
    be inf in float16. Defect: the finiteness check cast with numpy's overflow warning on, so the fold
    raised RuntimeWarning under ``-W error`` instead of refusing. Now refused (float16) or exact."""
    rng = np.random.default_rng(0)
    w = {"w": rng.standard_normal((4, C, 3, 3)) * 0.4, "wb": rng.standard_normal(4) * 0.2}
    m = _model(
        _PRE + "q = Relu(h)\ny = Conv<pads=[1,1,1,1]>(q, w, wb)",
        {**_bn_params(rng, np.full(C, 1e-6)), **w},
        dtype,
    )
    report = _fold_and_compare(m, dtype)
    (verdict,) = report.verdicts
    if dtype == "float16":
        assert isinstance(verdict, Skip)
    else:
        assert isinstance(verdict, Site) and verdict.direction is Direction.PROPAGATED


# ---- PyTorch ---------------------------------------------------------------------------------------


def _torch_bn(fresh_shift: bool, seed: int = 0) -> nn.BatchNorm2d:
    """A BN with realistic statistics; ``fresh_shift``: mean 0 and beta 0 (a BN as initialised, whose
    shift ``b`` is exactly 0 while its scale is not 1), else realistic mean and beta."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C)
    bn.weight.data = torch.rand(C, generator=g) + 0.5
    bn.running_var.data = torch.rand(C, generator=g) + 0.5
    if not fresh_shift:
        bn.bias.data = torch.rand(C, generator=g) - 0.5
        bn.running_mean.data = torch.rand(C, generator=g) - 0.5
    return bn


def _fold_torch_and_compare(m: nn.Module, x: torch.Tensor) -> Any:
    m.eval()
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double())
    out, report = bnfold.fold_with_report(m)
    with torch.no_grad():
        got = out(x)
    scale = max(1.0, float(ref.abs().max()))
    err = float((ref - got.double()).abs().max())
    assert err <= atol(torch.float32) * scale, f"max error {err:.3g}"
    return report


class _AliasThenInplaceRelu(nn.Module):
    """x -> BN -> ``mid`` -> ReLU(inplace=True) -> ``tail``; x itself is read again afterwards."""

    def __init__(self, mid: nn.Module, tail: nn.Module, fresh_shift: bool) -> None:
        super().__init__()
        self.bn = _torch_bn(fresh_shift)
        self.mid = mid
        self.act = nn.ReLU(inplace=True)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        y = self.tail(self.act(self.mid(self.bn(x))))
        return y.flatten(1).sum(1) + x.sum((1, 2, 3))


@pytest.mark.parametrize("fresh_shift", [True, False])
@pytest.mark.parametrize(
    "mid, tail",
    [
        (nn.Identity, lambda: nn.Conv2d(C, 3, 3, padding=1)),
        (lambda: nn.Dropout(0.2), lambda: nn.Conv2d(C, 3, 3, padding=1)),
        (nn.Flatten, lambda: nn.Linear(C * 16, 3)),
    ],
    ids=["identity", "dropout", "flatten"],
)
def test_torch_inplace_relu_behind_an_aliasing_op_never_writes_the_bn_input(
    mid: Any, tail: Any, fresh_shift: bool
) -> None:
    """Identity, eval Dropout and flatten return their input (or a view): an in-place ReLU after them
    wrote the BN's *input* once the BN was removed. Defect: with a shift of exactly 0 (a BN as
    initialised: mean 0, beta 0) no Add went before the ReLU, the ReLU clamped the residual tensor
    read afterwards, and the output was wrong. Now refused there; exact either way."""
    torch.manual_seed(0)
    m = _AliasThenInplaceRelu(mid(), tail(), fresh_shift)
    _fold_torch_and_compare(m, torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(1)))


class _WriteThroughView(nn.Module):
    """The BN's input is written through a view between the BN and the ReLU that reads its output."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.bn = _torch_bn(False)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        v = x.view(2, C, 16)
        h = self.bn(x)
        if self.how == "view":
            v.mul_(2)
        else:
            x[:, 0].mul_(0)
        return self.conv(F.relu(h)) + x


@pytest.mark.parametrize("how", ["view", "select"])
def test_torch_bn_input_written_through_a_view_is_not_read_late(how: str) -> None:
    """Defect: only direct in-place users of the BN's input were looked for; a write through
    ``x.view(...)`` or ``x[:, 0]`` between the BN and its reader changed what the inserted Add read
    (the BN had read the input before the write). Now refused; the output is the original's."""
    torch.manual_seed(0)
    _fold_torch_and_compare(
        _WriteThroughView(how), torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(1))
    )


# ---- sound today: kept as regression cases (each exact, propagated or refused) ---------------------

_I = np.int64
_ONNX_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # ops that look like activations but do not commute with a per-channel scale
    "prelu": ("q = PRelu(h, sl)\ny = Conv(q, w, wb)", {"sl": ("n", (C, 1, 1))}),
    "clip": ("q = Clip(h, lo, hi)\ny = Conv(q, w, wb)", {"lo": np.float32(0.0), "hi": np.float32(0.6)}),
    "hardswish": ("q = HardSwish(h)\ny = Conv(q, w, wb)", {}),
    "leaky_negative_slope": ("q = LeakyRelu<alpha=-0.5>(h)\ny = Conv<pads=[1,1,1,1]>(q, w3, wb)", {}),
    "leaky_slope_2": ("q = LeakyRelu<alpha=2.0>(h)\ny = Conv(q, w, wb)", {}),
    # pooling with dilation, padding and ceil mode; counting padded zeros
    "maxpool_dil_pad_ceil": (
        "q = MaxPool<kernel_shape=[3,3], pads=[1,1,1,1], dilations=[2,2], ceil_mode=1, strides=[2,2]>(h)\n"
        "r = Relu(q)\ny = Conv<pads=[1,1,1,1]>(r, w3, wb)",
        {},
    ),
    "avgpool_counts_pads": (
        "q = AveragePool<kernel_shape=[3,3], pads=[1,1,1,1], count_include_pad=1>(h)\ny = Conv(q, w, wb)",
        {},
    ),
    "lppool": ("q = LpPool<kernel_shape=[2,2]>(h)\ny = Conv(q, w, wb)", {}),
    # shapes that move the channel
    "channel_shuffle": (
        "r = Reshape(h, s1)\nt = Transpose<perm=[0,2,1,3]>(r)\nu = Reshape(t, s2)\ny = Conv(u, w, wb)",
        {"s1": np.array([2, 3, 2, 16], _I), "s2": np.array([2, C, 4, 4], _I)},
    ),
    "flatten_axis2": ("r = Flatten<axis=2>(h)\ny = MatMul(r, wf)", {"wf": ("n", (16, 3))}),
    "batch_channel_swap_flatten": (
        "t = Transpose<perm=[1,0,2,3]>(h)\nr = Flatten(t)\ny = MatMul(r, wf)",
        {"wf": ("n", (32, 3))},
    ),
    "channel_middle_flatten": (
        "t = Transpose<perm=[0,2,1,3]>(h)\nq = Relu(t)\nr = Flatten(q)\ny = Gemm<transB=1>(r, wf, bf)",
        {"wf": ("n", (3, C * 16)), "bf": ("n", (3,))},
    ),
    "reduce_channel": ("r = ReduceMean<axes=[1]>(h)\ny = Conv(r, w1, wb)", {"w1": ("n", (4, 1, 1, 1))}),
    "reduce_h_only_keepdims0": (
        "r = ReduceMean<axes=[2], keepdims=0>(h)\ny = MatMul(r, wf)",
        {"wf": ("n", (4, 3))},
    ),
    "channel_last_matmul": (
        "t = Transpose<perm=[0,2,3,1]>(h)\nq = Relu(t)\ny = MatMul(q, wf)",
        {"wf": ("n", (C, 3))},
    ),
    # padding that is not zero padding, or pads the channel axis
    "pad_edge": (
        'r = Pad<mode="edge">(h, pd)\ny = Conv(r, w3, wb)',
        {"pd": np.array([0, 0, 1, 1, 0, 0, 1, 1], _I)},
    ),
    "pad_reflect": (
        'r = Pad<mode="reflect">(h, pd)\ny = Conv(r, w3, wb)',
        {"pd": np.array([0, 0, 1, 1, 0, 0, 1, 1], _I)},
    ),
    "pad_value": (
        "r = Pad(h, pd, cv)\ny = Conv(r, w3, wb)",
        {"pd": np.array([0, 0, 1, 1, 0, 0, 1, 1], _I), "cv": np.float32(0.5)},
    ),
    "pad_channel": (
        "r = Pad(h, pd)\ny = Conv(r, wc, wb)",
        {"pd": np.array([0, 1, 0, 0, 0, 1, 0, 0], _I), "wc": ("n", (4, C + 2, 1, 1))},
    ),
    "pad_crop": (
        "r = Pad(h, pd)\nq = Relu(r)\ny = Conv(q, w3, wb)",
        {"pd": np.array([0, 0, -1, 1, 0, 0, 1, -1], _I)},
    ),
    # forks and layers that cannot take the shift
    "fork_padded_and_grouped": (
        "c = Conv<pads=[1,1,1,1]>(h, w3, wb)\nd = Conv<group=2>(h, wg)\ny = Add(c, d)",
        {"wg": ("n", (4, 3, 1, 1))},
    ),
    "concat": ("r = Concat<axis=1>(h, p)\ny = Conv(r, wcat, wb)", {"wcat": ("n", (4, 2 * C, 1, 1))}),
    "conv_transpose": ("q = Relu(h)\ny = ConvTranspose(q, wt, wb)", {"wt": ("n", (C, 4, 3, 3))}),
    "conv_same_upper_stride": (
        'q = Relu(h)\ny = Conv<auto_pad="SAME_UPPER", strides=[2,2]>(q, w2, wb)',
        {"w2": ("n", (4, C, 2, 2))},
    ),
}


@pytest.mark.parametrize("gamma", ["positive", "mixed", "zero"])
@pytest.mark.parametrize("case", sorted(_ONNX_CASES))
def test_onnx_attack_is_exact_or_refused(case: str, gamma: str) -> None:
    rng = np.random.default_rng(11)
    g = rng.uniform(0.5, 1.5, C)
    if gamma == "mixed":
        g[::2] = -g[::2]
    elif gamma == "zero":
        g[1::3] = 0.0
    body, extra = _ONNX_CASES[case]
    inits: dict[str, np.ndarray] = {
        "w": rng.standard_normal((4, C, 1, 1)) * 0.4,
        "w3": rng.standard_normal((4, C, 3, 3)) * 0.4,
        "wb": rng.standard_normal(4) * 0.2,
    }
    for k, v in extra.items():
        inits[k] = rng.standard_normal(v[1]) * 0.4 if isinstance(v, tuple) else v
    _fold_and_compare(_model(_PRE + body, {**_bn_params(rng, g), **inits}))


@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.5, 1e3])
def test_onnx_residual_shift_into_producer_with_compensation_is_exact(scale: float) -> None:
    """Two pre-activation blocks in a row: each BN's shift goes back into its producer's bias and is
    taken out of the residual's other branch; the second block's producer bias is the first block's
    compensated one (two plans edit one bias: the second waits for the next pass)."""
    rng = np.random.default_rng(5)
    body = (
        "ca = Conv(x, wl, bl)\ns = Add(ca, x)\n"
        "h = BatchNormalization(s, g, b, m, v)\nq = Relu(h)\nc2 = Conv<pads=[1,1,1,1]>(q, w2, b2)\n"
        "c3 = Conv(c2, w3, b3)\nt = Add(s, c3)\n"
        "h2 = BatchNormalization(t, g, b, m, v)\nq2 = Relu(h2)\nc4 = Conv<pads=[1,1,1,1]>(q2, w2, b2)\n"
        "c5 = Conv(c4, w3, b3)\ny = Add(t, c5)"
    )
    inits = {
        **_bn_params(rng, rng.uniform(0.5, 1.5, C) * scale),
        **{
            f"w{k}": rng.standard_normal((C, C, 3 if k == "2" else 1, 3 if k == "2" else 1)) * 0.4
            for k in "l23"
        },
        **{f"b{k}": rng.standard_normal(C) * 0.2 for k in "l23"},
    }
    report = _fold_and_compare(_model(body, inits))
    assert all(isinstance(v, Site) for v in report.verdicts)


def _torch_ops() -> dict[str, Any]:
    return {
        "relu6": lambda: [nn.ReLU6(), nn.Conv2d(C, 4, 3)],
        "prelu": lambda: [nn.PReLU(C), nn.Conv2d(C, 4, 3)],
        "hardswish": lambda: [nn.Hardswish(), nn.Conv2d(C, 4, 3)],
        "leaky_negative_slope": lambda: [nn.LeakyReLU(-0.3), nn.Conv2d(C, 4, 3, padding=1)],
        "leaky_slope_2": lambda: [nn.LeakyReLU(2.0), nn.Conv2d(C, 4, 3, padding=1)],
        "maxpool_dil_pad_ceil": lambda: [
            nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
            nn.ReLU(),
            nn.Conv2d(C, 4, 3, padding=1),
        ],
        "avgpool_counts_pads": lambda: [nn.AvgPool2d(3, 1, 1, count_include_pad=True), nn.Conv2d(C, 4, 1)],
        "avgpool_divisor_override": lambda: [nn.AvgPool2d(2, divisor_override=3), nn.Conv2d(C, 4, 1)],
        "reflection_pad": lambda: [nn.ReflectionPad2d(1), nn.Conv2d(C, 4, 3)],
        "constant_pad_half": lambda: [nn.ConstantPad2d(1, 0.5), nn.Conv2d(C, 4, 3)],
        "conv_reflect_mode": lambda: [nn.ReLU(), nn.Conv2d(C, 4, 3, padding=1, padding_mode="reflect")],
        "conv_same_dilated": lambda: [nn.ReLU(), nn.Conv2d(C, 4, 4, padding="same", dilation=2)],
        "conv_transpose": lambda: [nn.ReLU(), nn.ConvTranspose2d(C, 4, 3)],
        "upsample": lambda: [nn.Upsample(scale_factor=2), nn.Conv2d(C, 4, 3)],
        "flatten_dim2": lambda: [nn.ReLU(), nn.Flatten(2), nn.Linear(64, 3)],
        "pool_flatten_linear": lambda: [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(C * 16, 3)],
    }


class _Chain(nn.Module):
    def __init__(self, ops: list[nn.Module], gamma: str) -> None:
        super().__init__()
        self.pre = nn.ReLU()
        self.bn = _torch_bn(False, seed=3)
        if gamma == "mixed":
            self.bn.weight.data[::2] *= -1
        elif gamma == "zero":
            self.bn.weight.data[1::3] = 0.0
        self.ops = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(self.bn(self.pre(x)))  # type: ignore[no-any-return]


@pytest.mark.parametrize("gamma", ["positive", "mixed", "zero"])
@pytest.mark.parametrize("case", sorted(_torch_ops()))
def test_torch_attack_is_exact_or_refused(case: str, gamma: str) -> None:
    torch.manual_seed(0)
    m = _Chain(_torch_ops()[case](), gamma)
    _fold_torch_and_compare(m, torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(1)))


class _SharedLayer(nn.Module):
    """The layer the scale goes into is called again on another tensor (and under a second name)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = _torch_bn(False)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.alias = self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(F.relu(x)))) + self.alias(x) + self.conv(x)


def test_torch_layer_called_elsewhere_keeps_its_weight_there() -> None:
    report = _fold_torch_and_compare(
        _SharedLayer(), torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(1))
    )
    assert isinstance(report.verdicts[0], Site) and report.verdicts[0].direction is Direction.PROPAGATED


@pytest.mark.parametrize("pads", ["<pads=[1,1,1,1]>", ""])
@pytest.mark.parametrize("bias", [True, False])
def test_onnx_layer_taking_the_scale_is_also_the_compensated_reader(pads: str, bias: bool) -> None:
    """A residual block whose BN sits inside it: ``xp -> BN -> Relu -> Conv_L -> Add(xp, .)``. The
    shift goes into ``xp``'s producer and is taken back out through Conv_L's bias, while Conv_L's
    weight takes the scale: two edits of one layer (weight and bias), both from the original."""
    rng = np.random.default_rng(8)
    k = 3 if pads else 1
    inits = {
        **_bn_params(rng),
        "wp": rng.standard_normal((C, C, 1, 1)) * 0.4,
        "wl": rng.standard_normal((C, C, k, k)) * 0.4,
        **({"bp": rng.standard_normal(C) * 0.2, "bl": rng.standard_normal(C) * 0.2} if bias else {}),
    }
    bp, bl = (", bp", ", bl") if bias else ("", "")
    body = (
        f"xp = Conv(x, wp{bp})\nh = BatchNormalization(xp, g, b, m, v)\nq = Relu(h)\n"
        f"u = Conv{pads}(q, wl{bl})\ny = Add(xp, u)"
    )
    report = _fold_and_compare(_model(body, inits))
    assert isinstance(report.verdicts[0], Site)
