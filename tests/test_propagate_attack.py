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
