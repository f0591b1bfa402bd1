"""bnfold.verify: equivalent pairs pass, perturbed pairs fail naming the output, bad pairs are refused."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold.errors import NotComparableError, OptionError, VerificationError
from bnfold.verification import DEFAULT_TOLERANCES, ensure_passed, failure_message, parse_input_shapes, verify

# A perturbation of 1e-3 of one weight's value moves the outputs it feeds by ~1e-4 of their scale:
# 10x above the float32 resolution (rtol 1e-5), so the default tolerance must catch it.
PERTURB = 1e-3


def _model(dtype: int = T.FLOAT, batch: str | int = "N", seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BN -> y ; x -> GlobalAveragePool -> Flatten -> Gemm -> z ; y -> ArgMax -> a."""
    rng = np.random.default_rng(seed)
    npdt = h.tensor_dtype_to_np_dtype(dtype)
    inits = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(npdt), "W"),
        nh.from_array(rng.standard_normal(4).astype(npdt), "B"),
        nh.from_array(rng.uniform(0.5, 1.5, 4).astype(npdt), "gamma"),
        nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(npdt), "beta"),
        nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(npdt), "mean"),
        nh.from_array(rng.uniform(0.25, 2.5, 4).astype(npdt), "var"),
        nh.from_array(rng.standard_normal((3, 5)).astype(npdt), "G"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], epsilon=1e-3),
        h.make_node("ArgMax", ["y"], ["a"], axis=1, keepdims=0),
        h.make_node("GlobalAveragePool", ["x"], ["p"]),
        h.make_node("Flatten", ["p"], ["f"]),
        h.make_node("Gemm", ["f", "G"], ["z"]),
    ]
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", dtype, [batch, 3, 8, 8])],
        [
            h.make_tensor_value_info("y", dtype, None),
            h.make_tensor_value_info("z", dtype, None),
            h.make_tensor_value_info("a", T.INT64, None),
        ],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def _perturb(model: onnx.ModelProto, name: str, rel: float = PERTURB, index: int = 0) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            a = nh.to_array(t).copy()
            a.flat[index] = a.flat[index] * (1 + rel)
            m.graph.initializer[i].CopyFrom(nh.from_array(a, name))
    return m


def _fold_by_hand(model: onnx.ModelProto) -> onnx.ModelProto:
    """A correct fold of the Conv+BN of :func:`_model` (float64 math), as a candidate to verify."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    init = {t.name: nh.to_array(t) for t in m.graph.initializer}
    dt = init["W"].dtype
    scale = init["gamma"].astype(np.float64) / np.sqrt(init["var"].astype(np.float64) + 1e-3)
    w = init["W"].astype(np.float64) * scale[:, None, None, None]
    b = (init["B"].astype(np.float64) - init["mean"]) * scale + init["beta"]
    keep = [t for t in m.graph.initializer if t.name not in ("W", "B", "gamma", "beta", "mean", "var")]
    del m.graph.initializer[:]
    m.graph.initializer.extend([*keep, nh.from_array(w.astype(dt), "W"), nh.from_array(b.astype(dt), "B")])
    nodes = [n for n in m.graph.node if n.op_type != "BatchNormalization"]
    nodes[0].output[0] = "y"
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def test_equivalent_pair_passes() -> None:
    ref = _model()
    report = verify(ref, _fold_by_hand(ref), samples=3)
    assert report.passed
    assert report.samples == 3
    assert {c.name for c in report.checks} == {"y", "z", "a"}
    assert len(report.checks) == 9
    assert report.optimization_level == "disable"
    assert 0 < report.max_rel_error < DEFAULT_TOLERANCES["float32"].rtol
    ensure_passed(report)


def test_same_model_is_exact() -> None:
    ref = _model()
    report = verify(ref, ref.SerializeToString())
    assert report.passed and report.max_abs_error == 0.0


def test_perturbed_weight_fails_and_names_the_output() -> None:
    ref = _model()
    report = verify(ref, _perturb(ref, "G"), samples=2)
    assert not report.passed
    failed = {c.name for c in report.checks if not c.passed}
    assert failed == {"z"}  # y and a do not read G
    worst = report.worst()
    assert worst is not None and worst.name == "z"
    assert worst.max_rel_error > DEFAULT_TOLERANCES["float32"].rtol
    with pytest.raises(VerificationError, match=r"output 'z' differs on sample \d") as ei:
        ensure_passed(report)
    assert ei.value.exit_code == 1 and ei.value.report is report


def test_a_failure_is_worded_in_one_place() -> None:
    """failure_message is the line ensure_passed raises; callers add where and what it was compared to."""
    ref = _model()
    good = verify(ref, ref)
    assert failure_message(good) is None
    ensure_passed(good, where="cand.onnx")  # a passed report raises nothing
    bad = verify(ref, _perturb(ref, "G"))
    msg = failure_message(bad)
    assert msg is not None and re.match(r"not equivalent: output 'z' differs on sample 0", msg)
    assert failure_message(bad, against="ref.onnx") == msg.replace(
        "not equivalent:", "not equivalent to ref.onnx:"
    )
    with pytest.raises(VerificationError) as ei:
        ensure_passed(bad, where="cand.onnx", against="ref.onnx")
    assert str(ei.value) == f"cand.onnx: {failure_message(bad, against='ref.onnx')}"
    assert ei.value.report is bad and ei.value.exit_code == 1


def test_perturbed_conv_weight_fails_on_y() -> None:
    ref = _model()
    report = verify(ref, _perturb(_fold_by_hand(ref), "W"))
    assert not report.passed
    assert {c.name for c in report.checks if not c.passed} >= {"y"}
    assert all(c.passed for c in report.checks if c.name == "z")


def test_dynamic_dims_defaults_and_overrides() -> None:
    ref = _model(batch="N")
    rep = verify(ref, _fold_by_hand(ref))
    assert rep.passed
    assert next(c for c in rep.checks if c.name == "y").shape == (2, 4, 8, 8)  # batch default 2
    rep = verify(ref, _fold_by_hand(ref), input_shapes={"x": (5, 3, 8, 8)})
    assert rep.passed
    assert next(c for c in rep.checks if c.name == "z").shape == (5, 5)
    with pytest.raises(OptionError, match="fixed to 3"):
        verify(ref, ref, input_shapes={"x": (5, 4, 8, 8)})
    with pytest.raises(OptionError, match="unknown input 'q'"):
        verify(ref, ref, input_shapes={"q": (1,)})


def _two_input_model(scale_b: float = 1.0) -> onnx.ModelProto:
    """a[N,S,4] @ W + b[N,S,6]*k -> s ; a -> ReduceSum -> r ; mask (bool) -> Where(mask, a, 0) -> m."""
    rng = np.random.default_rng(1)
    inits = [
        nh.from_array(rng.standard_normal((4, 6)).astype(np.float32), "W"),
        nh.from_array(np.array(scale_b, np.float32), "k"),
        nh.from_array(np.array(0.0, np.float32), "zero"),
        nh.from_array(np.array([2], np.int64), "axes"),
    ]
    nodes = [
        h.make_node("MatMul", ["a", "W"], ["aw"]),
        h.make_node("Mul", ["b", "k"], ["bk"]),
        h.make_node("Add", ["aw", "bk"], ["s"]),
        h.make_node("ReduceSum", ["a", "axes"], ["r"]),
        h.make_node("Where", ["mask", "a", "zero"], ["m"]),
    ]
    g = h.make_graph(
        nodes,
        "g",
        [
            h.make_tensor_value_info("a", T.FLOAT, ["N", "S", 4]),
            h.make_tensor_value_info("b", T.FLOAT, ["N", "S", 6]),
            h.make_tensor_value_info("mask", T.BOOL, ["N", "S", 4]),
        ],
        [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("s", "r", "m")],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_multiple_inputs_and_outputs_share_symbols() -> None:
    ref = _two_input_model()
    rep = verify(ref, _two_input_model(), input_shapes={"a": (3, 7, 4)}, samples=2)
    assert rep.passed
    # the symbols N, S bound by "a" apply to "b" and "mask" too
    assert next(c for c in rep.checks if c.name == "s").shape == (3, 7, 6)
    bad = verify(ref, _two_input_model(scale_b=1.0 + 1e-4))
    assert [c.name for c in bad.checks if not c.passed] == ["s"]


def test_fp16_model() -> None:
    ref = _model(dtype=T.FLOAT16)
    rep = verify(ref, _fold_by_hand(ref), samples=2)
    assert rep.passed, rep.to_dict()
    y = next(c for c in rep.checks if c.name == "y")
    assert y.dtype == "float16" and y.rtol == DEFAULT_TOLERANCES["float16"].rtol
    bad = verify(ref, _perturb(ref, "G", rel=0.2))
    assert not bad.passed and {c.name for c in bad.checks if not c.passed} == {"z"}


def test_argmax_output_compares_exactly() -> None:
    ref = _model()
    rep = verify(ref, _fold_by_hand(ref), atol=10.0, rtol=10.0)
    a = next(c for c in rep.checks if c.name == "a")
    assert a.atol == 0.0 and a.rtol == 0.0 and a.dtype == "int64" and a.passed
    # a large change of one BN gamma flips argmax somewhere; loose float tolerances do not hide it
    changed = _perturb(ref, "gamma", rel=3.0, index=1)
    rep = verify(ref, changed, atol=1e9, rtol=1e9)
    a = next(c for c in rep.checks if c.name == "a")
    assert not a.passed and a.mismatches > 0
    assert all(c.passed for c in rep.checks if c.name != "a")


def test_nan_handling() -> None:
    from bnfold.verification.compare import Comparator, compare_output

    r = np.array([1.0, np.nan, np.inf], np.float32)
    assert compare_output("o", 0, r, r.copy(), Comparator()).passed
    c = np.array([1.0, 2.0, np.inf], np.float32)
    chk = compare_output("o", 0, r, c, Comparator())
    assert not chk.passed and chk.mismatches == 1 and chk.max_abs_error == np.inf


def test_npz_and_dict_inputs(tmp_path) -> None:
    ref = _model()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3, 8, 8))  # float64 data is cast to the input's float32
    np.savez(tmp_path / "in.npz", x=x)
    rep = verify(ref, _fold_by_hand(ref), inputs=tmp_path / "in.npz")
    assert rep.passed and rep.samples == 1
    assert next(c for c in rep.checks if c.name == "y").shape == (3, 4, 8, 8)
    rep = verify(ref, ref, inputs=[{"x": x}, {"x": x[:1]}])
    assert rep.samples == 2
    with pytest.raises(OptionError, match="no data for input 'x'"):
        verify(ref, ref, inputs={"q": x})
    with pytest.raises(OptionError, match="dimension 1"):
        verify(ref, ref, inputs={"x": np.zeros((1, 2, 8, 8), np.float32)})


def test_different_output_names_not_comparable() -> None:
    ref = _model()
    cand = _fold_by_hand(ref)
    cand.graph.output[1].name = "z2"
    cand.graph.node[-1].output[0] = "z2"
    with pytest.raises(NotComparableError, match="different outputs") as ei:
        verify(ref, cand)
    assert ei.value.exit_code == 2


def test_different_inputs_and_shapes_not_comparable() -> None:
    ref = _model(batch=2)
    with pytest.raises(NotComparableError, match="dimension 0 is 2 in the reference and 3"):
        verify(ref, _model(batch=3))
    cand = _model()
    cand.graph.input[0].name = "image"
    for n in cand.graph.node:
        n.input[:] = ["image" if i == "x" else i for i in n.input]
    with pytest.raises(NotComparableError, match="different inputs"):
        verify(ref, cand)


def test_unloadable_candidate(tmp_path) -> None:
    from bnfold.errors import ModelFormatError

    p = tmp_path / "junk.onnx"
    p.write_bytes(b"\x01\x02garbage" * 10)
    with pytest.raises(ModelFormatError, match="junk.onnx"):
        verify(_model(), p)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("x1x3", "expected name="),
        ("x=1xax3", "positive integers"),
        ("=1x2", "expected name="),
        ("x=1x0", "positive integers"),
    ],
)
def test_bad_shape_spec(spec: str, match: str) -> None:
    with pytest.raises(OptionError, match=match) as ei:
        parse_input_shapes([spec])
    assert "\n" not in str(ei.value)


def test_parse_input_shapes() -> None:
    assert parse_input_shapes(["x=1x3x224x224", "ids=2,16", "s="]) == {
        "x": (1, 3, 224, 224),
        "ids": (2, 16),
        "s": (),
    }
    with pytest.raises(OptionError, match="given twice"):
        parse_input_shapes(["x=1", "x=2"])


def test_extra_level_runs_second_check() -> None:
    ref = _model()
    rep = verify(ref, _fold_by_hand(ref), extra_level="all")
    assert rep.passed and len(rep.extra) == 1
    assert rep.extra[0].optimization_level == "all" and len(rep.extra[0].checks) == len(rep.checks)
    with pytest.raises(OptionError, match="unknown optimization level"):
        verify(ref, ref, extra_level="max")


def test_integer_inputs_get_valid_values() -> None:
    """An int64 index input (Gather) gets values in [0, 10): a table of 10 rows is always valid."""
    table = nh.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "T")
    g = h.make_graph(
        [h.make_node("Gather", ["T", "ids"], ["e"])],
        "g",
        [h.make_tensor_value_info("ids", T.INT64, ["N", "L"])],
        [h.make_tensor_value_info("e", T.FLOAT, None)],
        [table],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    rep = verify(m, m, samples=3)
    assert rep.passed and rep.checks[0].shape == (2, 8, 4)


def test_onnx_only_verify_does_not_import_torch(tmp_path) -> None:
    onnx.save(_model(), tmp_path / "m.onnx")
    code = (
        "import sys, bnfold.verification as v; "
        f"r = v.verify({str(tmp_path / 'm.onnx')!r}, {str(tmp_path / 'm.onnx')!r}); "
        "assert r.passed; assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------------ PyTorch


def _torch_net():
    import torch
    from torch import nn

    from models.stats import randomize_bn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y, self.fc(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return randomize_bn(Net(), seed=0).eval()


def test_pytorch_module_vs_its_onnx_export(tmp_path) -> None:
    import torch

    net = _torch_net()
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y", "z"],
        dynamic_axes={"x": {0: "N"}},
    )
    rep = verify(net, path, samples=2)  # eager reference vs ONNX file
    assert rep.passed, rep.to_dict()
    assert {c.name for c in rep.checks} == {"y", "z"}
    assert rep.checks[0].shape[0] == 2  # symbolic batch -> 2
    rep = verify(path, net)  # ONNX reference vs exported PyTorch candidate
    assert rep.passed, rep.to_dict()
    assert net.training is False


def test_pytorch_pair_and_perturbed_candidate() -> None:
    import copy

    import torch

    net = _torch_net()
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.fc.weight[0, 0] *= 1 + PERTURB
    rep = verify(net, copy.deepcopy(net), example_inputs=(torch.randn(2, 3, 8, 8),))
    assert rep.passed
    bad = verify(net, other, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert [c.name for c in bad.checks if not c.passed] == ["output_1"]
    with pytest.raises(OptionError, match="example_inputs"):
        verify(net, other)


def test_train_mode_reference_is_restored(tmp_path) -> None:
    import torch

    net = _torch_net()
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, input_names=["x"], output_names=["y", "z"]
    )
    net.train()
    before = net.bn.running_mean.clone()
    assert verify(net, path).passed  # compared in eval mode
    assert net.training and torch.equal(net.bn.running_mean, before)


@pytest.mark.slow
def test_exported_program_reference_and_candidate() -> None:
    import torch

    net = _torch_net()
    ep = torch.export.export(net, (torch.randn(2, 3, 8, 8),))
    assert verify(ep, net).passed  # ep's own example inputs; the module candidate is exported
    rep = verify(net, ep, example_inputs=(torch.randn(2, 3, 8, 8),))  # dynamo export of the candidate
    assert rep.passed and len(rep.checks) == 2


def test_paths_of_any_format(tmp_path) -> None:
    """A .pt2 path is loaded through bnfold.io; an ONNX path goes to onnxruntime directly."""
    import torch

    net = _torch_net()
    ep = torch.export.export(net, (torch.randn(2, 3, 8, 8),))
    torch.export.save(ep, tmp_path / "net.pt2")
    onnx_path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 8, 8),),
        str(onnx_path),
        dynamo=False,
        input_names=["x"],
        output_names=["y", "z"],
    )
    assert verify(tmp_path / "net.pt2", onnx_path).passed


def test_onnxruntime_run_failure_is_not_comparable() -> None:
    ref = _two_input_model()
    feeds = {
        "a": np.zeros((1, 2, 4), np.float32),
        "b": np.zeros((1, 3, 6), np.float32),
        "mask": np.zeros((1, 2, 4), bool),
    }  # S = 2 and S = 3: the Add cannot broadcast
    with pytest.raises(NotComparableError, match="onnxruntime failed on sample 0") as ei:
        verify(ref, ref, inputs=feeds)
    assert "\n" not in str(ei.value)


def test_example_inputs_give_symbolic_dims(tmp_path) -> None:
    """An ONNX file with dynamic H, W: the example's 16x16 is used instead of the default 8."""
    import torch

    net = _torch_net()
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        net,
        (torch.randn(1, 3, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y", "z"],
        dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}},
    )
    rep = verify(net, path, example_inputs=(torch.randn(3, 3, 16, 16),))
    assert rep.passed and rep.checks[0].shape == (3, 4, 16, 16)
    rep = verify(net, path, example_inputs=(torch.randn(3, 3, 16, 16),), input_shapes={"x": (1, 3, 4, 4)})
    assert rep.checks[0].shape == (1, 4, 4, 4)  # explicit shapes win


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo"])
def test_a_path_that_is_not_a_file_is_named(tmp_path, kind: str) -> None:
    """Checked from stat before it is opened: a FIFO is refused, not read (which would block)."""
    import os

    from bnfold.errors import ModelFormatError

    p = tmp_path / "cand.onnx"
    if kind == "folder":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    with pytest.raises(ModelFormatError, match="cand.onnx"):
        verify(_model(), p)
