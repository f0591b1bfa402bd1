"""Float16 ONNX models: a branch merge rounds once.

The BN folds write float16 convs; merging those rounded convs would round every branch, then the sum (and
a BN on the sum, RepViT/QARepVGG, a third time). bnfold keeps the float64 values each fold rounded (checked
bit for bit against the tensors written) and sums those. The reference: the family's own hand-written
re-parameterisation of the same float16 parameters, computed in float64, rounded once to float16.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, numpy_helper  # noqa: E402

from bnfold.onnx import fold_model  # noqa: E402
from models import reparam_families as rf  # noqa: E402
from models.onnx_graphs import run  # noqa: E402
from models.stats import randomize_bn  # noqa: E402

# one conv after the hand merge; the RepViT and QARepVGG blocks hold a BN on the sum
BLOCKS = ["timm_repvgg_block", "mobileone_dw_stride2", "repvit_repvggdw", "yolov6_qarepvgg"]


def fp16_model(name: str) -> tuple[Any, Any]:
    """The family block with float16 parameters (realistic BN statistics) and an input for it."""
    ctor, shape = rf.FAMILIES[name]
    torch.manual_seed(0)
    model = randomize_bn(ctor(), seed=1).eval().half()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2)).half()
    return model, x


def to_fp16(m: Any) -> Any:
    """A float32 graph with every float tensor (initializers, constants, inputs, outputs) as float16."""
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for n in m.graph.node:
        for a in n.attribute:
            if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
    for v in [*m.graph.input, *m.graph.output]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del m.graph.value_info[:]
    return m


def export_fp16(model: Any, x: Any) -> Any:
    """The block exported from a float32 copy of its float16 values (exact), then made float16."""
    buf = io.BytesIO()
    torch.onnx.export(
        copy.deepcopy(model).float(),
        (x.float(),),
        buf,
        dynamo=False,
        do_constant_folding=False,
        input_names=["x"],
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
    )
    return to_fp16(onnx.load_from_string(buf.getvalue()))


def hand_merge_f64(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """The family's own re-parameterisation of the float16 parameters, in float64 (not rounded)."""
    ref = rf.hand_reparameterize(copy.deepcopy(model).double())
    convs = [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1
    c = convs[0]
    assert c.bias is not None
    w, b = c.weight.detach().numpy(), c.bias.detach().numpy()
    bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if bns:  # QARepVGG's deploy form keeps its BN after the merged conv: fold it too (float64)
        (bn,) = bns
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        w, b = w * s[:, None, None, None], (b - bn.running_mean.numpy()) * s + bn.bias.detach().numpy()
    return w, b


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float16 units in the last place (sign-magnitude bits mapped onto a line)."""

    def line(v: np.ndarray) -> np.ndarray:
        i = v.astype(np.float16).view(np.int16).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFF), i)

    d: np.ndarray = np.abs(line(a) - line(b))
    return d


def merged_conv(out: Any) -> tuple[np.ndarray, np.ndarray]:
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    return inits[convs[0].input[1]], inits[convs[0].input[2]]


@pytest.mark.parametrize("name", BLOCKS)
def test_fp16_merge_rounds_once_like_the_float64_hand_merge(name: str) -> None:
    model, x = fp16_model(name)
    m = export_fp16(model, x)
    before = m.SerializeToString()
    out, rep = fold_model(m)
    assert m.SerializeToString() == before
    assert rep.bn_after == 0 and [mg.merged for mg in rep.merges] == [True]
    w, b = merged_conv(out)
    assert w.dtype == b.dtype == np.float16
    hw, hb = hand_merge_f64(model)
    want_w, want_b = hw.astype(np.float16), hb.astype(np.float16)  # rounded once
    got = np.concatenate([w.reshape(-1), b.reshape(-1)])
    want = np.concatenate([want_w.reshape(-1), want_b.reshape(-1)])
    d = ulps(got, want)
    assert d.max() <= 1, f"{int((d > 1).sum())} values more than 1 ulp from the float64 merge rounded once"
    assert (d == 0).mean() >= 0.95, f"only {(d == 0).mean():.1%} bitwise equal"
    feeds = {"x": x.numpy()}
    (want_y,), (got_y,) = run(m, feeds), run(out, feeds)
    assert got_y.dtype == np.float16
    y64 = want_y.astype(np.float64)
    assert float(np.abs(got_y.astype(np.float64) - y64).max()) <= 1e-2 * max(1.0, float(np.abs(y64).max()))
