"""Scale propagation in ONNX (issue 27, bnfold.onnx.propagate): a BN no exact fold removes is split into
its scale and its shift, moved through Relu / LeakyRelu / pooling / Flatten / Transpose / zero padding into
the next layer(s) by exact identities; the shift into a bias (the layer's, a producer's with its other
readers compensated, or through a Relu become Max) or one Add; channels whose scale cannot move keep
their affine (one Mul and one Add), and the BN stays whole only when no channel can move.

Each case runs the original and the folded model in onnxruntime with optimisations off and compares
(float32: 1e-5 of the output scale; float64: 1e-12), counts BN / Mul / Add nodes, and checks the input
model is untouched. BN statistics are realistic (mean != 0, var != 1, |gamma| != 1, beta != 0).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx import fold_model
from bnfold.records import Direction, Site, Skip, SkipReason
from models.onnx_graphs import assert_close, run
from models.testing import atol

TOL = {TensorProto.FLOAT: atol(TensorProto.FLOAT), TensorProto.DOUBLE: atol(TensorProto.DOUBLE)}
NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}
C = 6


def gammas(sign: str, rng: np.random.Generator) -> np.ndarray:
    g = rng.uniform(0.5, 1.5, C)
    if sign == "negative":
        g = -g
    elif sign == "mixed":
        g[::2] = -g[::2]
    elif sign == "zero":
        g[1::3] = 0.0
    return g


def chain(
    ops: list[tuple[str, dict[str, Any]]],
    layer: str = "conv",
    sign: str = "positive",
    dtype: int = TensorProto.FLOAT,
    pads: int = 0,
    extra_out: bool = False,
    hw: int = 8,
    producer: str = "Relu",
    bias: bool = True,
    opset: int = 17,
    trans_b: int = 1,
) -> onnx.ModelProto:
    """x -> producer -> BN -> ops... -> layer -> y. ``producer`` "Relu" (nothing to fold into) or "Conv"."""
    rng = np.random.default_rng(7)
    t = NP[dtype]
    inits = []

    def init(name: str, v: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(v).astype(t), name))
        return name

    nodes = []
    if producer == "Relu":
        nodes.append(helper.make_node("Relu", ["x"], ["p"], name="pre"))
    else:
        nodes.append(
            helper.make_node(
                "Conv",
                [
                    "x",
                    init("pw", rng.standard_normal((C, C, 1, 1)) * 0.5),
                    init("pb", rng.standard_normal(C) * 0.3),
                ],
                ["p"],
                name="pre",
            )
        )
    bn_in = [
        init("g", gammas(sign, rng)),
        init("b", rng.uniform(-0.5, 0.5, C)),
        init("m", rng.uniform(-0.5, 0.5, C)),
        init("v", np.exp(rng.uniform(-1.4, 0.9, C))),
    ]
    nodes.append(helper.make_node("BatchNormalization", ["p", *bn_in], ["h0"], name="bn", epsilon=1e-3))
    cur = "h0"
    flat = False
    for k, (op, attrs) in enumerate(ops):
        ins = [cur]
        if op == "Pad" and opset >= 11:
            inits.append(numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads"))
            ins.append("pads")
        elif op == "Pad":
            attrs = {"pads": [0, 0, 1, 2, 0, 0, 2, 1], **attrs}
        if op == "Reshape":
            attrs = dict(attrs)
            inits.append(numpy_helper.from_array(np.array(attrs.pop("shape"), np.int64), f"shape{k}"))
            ins.append(f"shape{k}")
        nodes.append(helper.make_node(op, ins, [f"h{k + 1}"], name=f"{op.lower()}{k}", **attrs))
        cur = f"h{k + 1}"
        flat = flat or op in ("Flatten", "GlobalAveragePool", "Reshape")
    outs = [helper.make_tensor_value_info("y", dtype, None)]
    if layer == "conv":
        nodes.append(
            helper.make_node(
                "Conv",
                [
                    cur,
                    init("w", rng.standard_normal((4, C, 3, 3)) * 0.4),
                    *([init("wb", rng.standard_normal(4) * 0.2)] if bias else []),
                ],
                ["y"],
                name="conv",
                pads=[pads] * 4,
            )
        )
    elif layer == "dwconv":
        nodes.append(
            helper.make_node(
                "Conv",
                [cur, init("w", rng.standard_normal((2 * C, 1, 3, 3)) * 0.4)],
                ["y"],
                name="conv",
                pads=[pads] * 4,
                group=C,
            )
        )
    else:
        k_in = C if not flat or ops[-1][0] == "GlobalAveragePool" else None
        if k_in is None:  # Flatten of (N, C, H, W) after the ops: find the feature count by inference
            probe = helper.make_model(
                helper.make_graph(
                    nodes,
                    "p",
                    [helper.make_tensor_value_info("x", dtype, [2, C, hw, hw])],
                    [helper.make_tensor_value_info(cur, dtype, None)],
                    inits,
                ),
                opset_imports=[helper.make_opsetid("", 17)],
            )
            k_in = int(run(probe, {"x": np.zeros((2, C, hw, hw), t)})[0].shape[1])
        if ops and ops[-1][0] == "GlobalAveragePool":
            nodes.append(helper.make_node("Flatten", [cur], ["f"], name="flat"))
            cur = "f"
        if layer == "gemm":
            w = rng.standard_normal((5, k_in)) * 0.3
            nodes.append(
                helper.make_node(
                    "Gemm",
                    [
                        cur,
                        init("w", w if trans_b else w.T),
                        *([init("wb", rng.standard_normal(5) * 0.2)] if bias else []),
                    ],
                    ["y"],
                    name="fc",
                    transB=trans_b,
                    alpha=0.7,
                    beta=1.3,
                )
            )
        else:
            nodes.append(
                helper.make_node(
                    "MatMul", [cur, init("w", rng.standard_normal((k_in, 5)) * 0.3)], ["y"], name="fc"
                )
            )
    if extra_out:
        outs.append(helper.make_tensor_value_info("p", dtype, None))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", dtype, [2, C, hw, hw])], outs, inits
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    inferred = {o.name: o.type for o in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:
        o.type.CopyFrom(inferred[o.name])
    return m


def counts(m: onnx.ModelProto) -> tuple[int, int, int]:
    ops = [n.op_type for n in m.graph.node]
    return ops.count("BatchNormalization"), ops.count("Mul"), ops.count("Add")


def fold_and_check(
    m: onnx.ModelProto, dtype: int = TensorProto.FLOAT, **kw: Any
) -> tuple[onnx.ModelProto, Any]:
    before = m.SerializeToString()
    out, report = fold_model(m, **kw)
    assert m.SerializeToString() == before, "the input model was changed"
    if all(o.type.tensor_type.HasField("shape") for o in m.graph.output):
        onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, C, 8, 8)).astype(NP[dtype])}
    assert_close(run(m, feeds), run(out, feeds), TOL[dtype])
    return out, report


def verdict(report: Any) -> Site | Skip:
    (v,) = [v for v in report.verdicts if v.bn == "bn"]
    return v


def assert_propagated(report: Any, target: str) -> Site:
    v = verdict(report)
    assert isinstance(v, Site) and v.direction is Direction.PROPAGATED, v
    assert v.target == target and v.to_dict()["status"] == "propagated"
    assert report.folded == len(report.sites) and v in report.sites
    return v


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
@pytest.mark.parametrize("op,attrs", [("Relu", {}), ("LeakyRelu", {"alpha": 0.13})])
def test_relu_positive_scale_moves_into_the_conv_and_one_add_stays(
    op: str, attrs: dict[str, Any], dtype: int
) -> None:
    m = chain([(op, attrs)], dtype=dtype, pads=1)
    assert counts(m) == (1, 0, 0)
    out, report = fold_and_check(m, dtype)
    v = assert_propagated(report, "conv")
    assert f"shift as one Add before {op}" in v.detail
    assert counts(out) == (0, 0, 1)
    assert report.bn_after == 0


def test_relu_every_channel_negative_keeps_the_whole_bn() -> None:
    """Nothing would move: the BN stays, its verdict says how many channels blocked it."""
    out, report = fold_and_check(chain([("Relu", {})], sign="negative"))
    v = verdict(report)
    assert isinstance(v, Skip) and v.reason is SkipReason.NO_PRODUCER
    assert "6 of 6 channels have a negative scale" in v.detail
    assert counts(out) == (1, 0, 0)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
@pytest.mark.parametrize("pads", [0, 1])
@pytest.mark.parametrize("op,attrs", [("Relu", {}), ("LeakyRelu", {"alpha": 0.21})])
def test_mixed_sign_channels_split_the_bn(op: str, attrs: dict[str, Any], pads: int, dtype: int) -> None:
    """The 3 negative channels keep their affine as one Mul (1 on the others) and one Add before the
    activation; the 3 positive channels' scales move into the conv."""
    out, report = fold_and_check(chain([(op, attrs)], sign="mixed", pads=pads, dtype=dtype), dtype)
    v = assert_propagated(report, "conv")
    assert f"3 of 6 channels keep their affine (3 with a negative scale before {op}" in v.detail
    assert counts(out) == (0, 1, 1)
    (mul,) = [n for n in out.graph.node if n.op_type == "Mul"]
    m = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}[mul.input[1]].reshape(-1)
    assert (m[1::2] == 1).all() and (m[::2] < 0).all()  # gammas() negates the even channels


@pytest.mark.parametrize(
    "pads,op,kept", [(1, "Relu", 2), (1, "LeakyRelu", 2), (0, "LeakyRelu", 2), (0, "Relu", 0)]
)
def test_zero_scale_channels(pads: int, op: str, kept: int) -> None:
    """A zero scale with a non-zero shift blocks the channel where the shift must stop; through a Relu
    into a conv that does not pad, relu(0*x + b) = relu(b) is a constant and goes into the bias."""
    out, report = fold_and_check(chain([(op, {})], sign="zero", pads=pads))
    v = assert_propagated(report, "conv")
    if kept:
        assert f"{kept} of 6 channels keep their affine ({kept} with a zero scale" in v.detail
        assert counts(out) == (0, 1, 1)
    else:
        assert "keep their affine" not in v.detail and "now a Max" in v.detail
        assert counts(out) == (0, 0, 0)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
@pytest.mark.parametrize("tail", [[], [("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]})]])
def test_relu_into_an_unpadded_layer_becomes_a_max_and_the_shift_reaches_the_bias(
    tail: list[tuple[str, dict[str, Any]]], dtype: int
) -> None:
    """relu(a*x + b) = a*max(x, -b/a) + b: the Relu becomes a Max, nothing is added."""
    out, report = fold_and_check(chain([("Relu", {}), *tail], dtype=dtype), dtype)
    v = assert_propagated(report, "conv")
    assert "(now a Max) into the bias of Conv" in v.detail
    assert counts(out) == (0, 0, 0)
    assert [n.op_type for n in out.graph.node].count("Max") == 1
    assert "Relu" not in [n.op_type for n in out.graph.node][1:]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
@pytest.mark.parametrize("pads,ceil", [(0, 0), (1, 1), (1, 0)])
@pytest.mark.parametrize("sign", ["positive", "zero"])
def test_maxpool_carries_scale_and_shift_into_an_unpadded_conv(
    pads: int, ceil: int, sign: str, dtype: int
) -> None:
    """maxpool(a*x + b) = a*maxpool(x) + b for a >= 0 (any pads: max pads with -inf; ceil mode):
    then the shift goes into the conv's bias, nothing is left."""
    mp = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [pads] * 4, "ceil_mode": ceil}
    out, report = fold_and_check(chain([("MaxPool", mp)], sign=sign, dtype=dtype), dtype)
    v = assert_propagated(report, "conv")
    assert "shift into the bias of Conv" in v.detail
    assert counts(out) == (0, 0, 0)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_maxpool_mixed_signs_keep_the_affine_of_the_negative_channels_only(dtype: int) -> None:
    mp = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}
    out, report = fold_and_check(chain([("MaxPool", mp)], sign="mixed", dtype=dtype), dtype)
    v = assert_propagated(report, "conv")
    assert "3 of 6 channels keep their affine (3 with a negative scale before MaxPool" in v.detail
    assert "shift into the bias of Conv" in v.detail
    assert counts(out) == (0, 1, 1)


def test_maxpool_every_channel_negative_keeps_the_bn() -> None:
    out, report = fold_and_check(chain([("MaxPool", {"kernel_shape": [2, 2]})], sign="negative"))
    v = verdict(report)
    assert isinstance(v, Skip) and "6 of 6 channels have a negative scale before MaxPool" in v.detail
    assert counts(out) == (1, 0, 0)


@pytest.mark.parametrize("sign", ["positive", "negative", "mixed"])
def test_bn_into_a_zero_padded_conv_is_propagated(sign: str) -> None:
    """Today refused as 'padding': the scale goes into the conv (zeros stay zeros), the shift is an Add before it."""
    m = chain([], sign=sign, pads=1)
    out0, r0 = fold_and_check(m, propagate=False)
    v0 = verdict(r0)
    assert isinstance(v0, Skip) and v0.reason is SkipReason.PADDING and counts(out0) == (1, 0, 0)
    out, report = fold_and_check(m)
    v = assert_propagated(report, "conv")
    assert "shift as one Add before Conv" in v.detail
    assert counts(out) == (0, 0, 1)


def test_zero_padded_conv_with_zero_scale_channels_keeps_their_affine() -> None:
    out, report = fold_and_check(chain([], sign="zero", pads=1))
    v = assert_propagated(report, "conv")
    assert (
        "2 of 6 channels keep their affine (2 with a zero scale and a non-zero shift before Conv" in v.detail
    )
    assert counts(out) == (0, 1, 1)


@pytest.mark.parametrize("sign", ["positive", "mixed"])
def test_pad_op_passes_the_scale_not_the_shift(sign: str) -> None:
    out, report = fold_and_check(chain([("Pad", {})], sign=sign))
    v = assert_propagated(report, "conv")
    assert "shift as one Add before Pad" in v.detail
    assert counts(out) == (0, 0, 1)


@pytest.mark.parametrize("cip,adds", [(0, 0), (1, 1)])
def test_average_pool_with_padding_passes_the_shift_only_when_padding_is_not_counted(
    cip: int, adds: int
) -> None:
    ap = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": cip}
    out, report = fold_and_check(chain([("AveragePool", ap)], sign="mixed"))
    assert_propagated(report, "conv")
    assert counts(out) == (0, 0, adds)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_global_pool_flatten_gemm_folds_completely_for_any_sign(dtype: int) -> None:
    out, report = fold_and_check(
        chain([("GlobalAveragePool", {})], layer="gemm", sign="mixed", dtype=dtype), dtype
    )
    assert_propagated(report, "fc")
    assert counts(out) == (0, 0, 0)


@pytest.mark.parametrize("layer,adds", [("gemm", 0), ("matmul", 1)])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_crepe_head_maxpool_flatten_linear(layer: str, adds: int, dtype: int) -> None:
    """BN -> MaxPool (ceil mode, padded) -> Flatten -> Gemm: scale and shift both into the Gemm;
    MatMul has no bias: the shift stays as one Add on the flattened features."""
    mp = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}
    out, report = fold_and_check(
        chain([("MaxPool", mp), ("Flatten", {"axis": 1})], layer=layer, dtype=dtype), dtype
    )
    assert_propagated(report, "fc")
    assert counts(out) == (0, 0, adds)


def test_depthwise_conv_scales_each_group() -> None:
    out, report = fold_and_check(chain([("Relu", {})], layer="dwconv", sign="positive", pads=1))
    assert_propagated(report, "conv")
    assert counts(out) == (0, 0, 1)


def test_shift_reaching_a_producer_read_elsewhere_stays_an_add() -> None:
    """The producing Conv's output is also a graph output: its bias must not take the shift."""
    m = chain([("Relu", {})], producer="Conv", extra_out=True, pads=1)
    out, report = fold_and_check(m)
    v = assert_propagated(report, "conv")
    assert "shift as one Add before Relu" in v.detail
    assert counts(out) == (0, 0, 1)
    pb = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["pb"]
    assert np.array_equal(pb, numpy_helper.to_array([t for t in m.graph.initializer if t.name == "pb"][0]))


def test_bn_output_read_twice_is_not_propagated() -> None:
    m = chain([("Relu", {})], pads=1)
    m.graph.output.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, None))
    out, report = fold_and_check(m)
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)


def test_propagate_false_and_dry_run() -> None:
    m = chain([("Relu", {})], pads=1)
    out, report = fold_and_check(m, propagate=False)
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)
    same, dry = fold_model(m, dry_run=True)
    assert same is m and counts(m) == (1, 0, 0)
    assert verdict(dry).to_dict()["status"] == "propagated"


def test_affine_after_propagation_turns_only_the_rest_into_mul_add() -> None:
    out, report = fold_and_check(chain([("Relu", {})], sign="mixed", pads=1), affine=True)
    assert counts(out) == (0, 1, 1)


# ---- the three networks of models/propagate.py, exported from PyTorch --------------------------------

torch = pytest.importorskip("torch")

from models import propagate as nets  # noqa: E402


def export(model: Any, x: Any) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        model, (x,), buf, dynamo=False, do_constant_folding=False, input_names=["x"], opset_version=17
    )
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("name", ["preact", "dense", "crepe"])
def test_networks_lose_every_bn_for_positive_scales(name: str) -> None:
    net = nets.set_bn(nets.MODELS[name](), sign="positive")
    x = net.example()
    m = export(net, x)
    before = m.SerializeToString()
    bn0 = counts(m)[0]
    out, report = fold_model(m)
    assert m.SerializeToString() == before
    feeds = {"x": x.numpy()}
    assert_close(run(m, feeds), run(out, feeds), 1e-5)
    assert counts(out)[0] == 0 and report.folded == bn0
    assert any(isinstance(v, Site) and v.direction is Direction.PROPAGATED for v in report.verdicts)


def test_crepe_ceil_mode_float64_and_mixed_signs() -> None:
    net = nets.set_bn(nets.Crepe(ceil_mode=True).double(), sign="positive")
    x = net.example(torch.float64)
    m = export(net, x)
    out, _ = fold_model(m)
    assert_close(run(m, {"x": x.numpy()}), run(out, {"x": x.numpy()}), 1e-12)
    assert counts(out)[0] == 0
    mixed = export(nets.set_bn(nets.Crepe(), sign="mixed"), x.float())
    out, report = fold_model(mixed)
    assert_close(run(mixed, {"x": x.float().numpy()}), run(out, {"x": x.float().numpy()}), 1e-5)
    assert counts(out)[0] == 0 and counts(out)[1] == counts(mixed)[1] + 4
    assert all(
        "keep their affine" in v.detail for v in report.verdicts if v.to_dict()["status"] == "propagated"
    )


def test_cli_fold_json_and_no_propagate(tmp_path: Any) -> None:
    import json
    from importlib import resources

    from typer.testing import CliRunner

    from bnfold.cli import app

    src = tmp_path / "m.onnx"
    onnx.save(chain([("Relu", {})], pads=1), str(src))
    before = src.read_bytes()
    runner = CliRunner()
    schema = json.loads(
        resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8")
    )
    docs = {}
    for flag in ("--propagate", "--no-propagate"):
        out = tmp_path / f"out{flag}.onnx"
        r = runner.invoke(app, ["fold", str(src), str(out), "--json", flag])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        docs[flag] = json.loads(r.stdout)
        try:
            import jsonschema
        except ImportError:  # pragma: no cover
            pass
        else:
            jsonschema.validate(docs[flag], schema)
        assert counts(onnx.load(str(out)))[0] == (0 if flag == "--propagate" else 1)
    assert src.read_bytes() == before
    (v,) = [v for v in docs["--propagate"]["verdicts"] if v["bn"] == "bn"]
    assert v["status"] == "propagated" and v["direction"] == "propagated" and v["target"] == "conv"
    (w,) = [v for v in docs["--no-propagate"]["verdicts"] if v["bn"] == "bn"]
    assert w["status"] == "left" and w["reason"] == "no_producer"
    r = runner.invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code == 0
    (u,) = [v for v in json.loads(r.stdout)["verdicts"] if v["bn"] == "bn"]
    assert u["status"] == "propagated"


def test_ir3_model_is_not_propagated() -> None:
    m = chain([("Relu", {})], pads=1)
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    out, report = fold_and_check(m)
    assert isinstance(verdict(report), Skip) and counts(out)[0] == 1


def test_cli_fold_reads_weights_left_in_an_external_data_file(tmp_path: Any) -> None:
    """The CLI loads external data lazily: the propagated conv's weight and the BN's parameters are read
    from the file (this failed with an absolute-location ValidationError before)."""
    from typer.testing import CliRunner

    from bnfold.cli import app

    src = tmp_path / "ext.onnx"
    m = chain([("MaxPool", {"kernel_shape": [2, 2]}), ("Relu", {})], pads=1)
    saved = onnx.ModelProto()
    saved.CopyFrom(m)  # onnx.save moves the tensors of the model it is given out to the file
    onnx.save(
        saved,
        str(src),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="w.bin",
        size_threshold=0,
    )
    data = (tmp_path / "w.bin").read_bytes()
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(app, ["fold", str(src), str(out), "-q"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "w.bin").read_bytes() == data
    folded = onnx.load(str(out))
    assert counts(folded) == (0, 0, 1)
    feeds = {"x": np.random.default_rng(5).standard_normal((2, C, 8, 8)).astype(np.float32)}
    assert_close(run(m, feeds), run(folded, feeds), 1e-5)


def test_gemm_without_bias_and_transb_0_gets_the_shift_as_its_bias() -> None:
    out, report = fold_and_check(
        chain([("GlobalAveragePool", {})], layer="gemm", sign="mixed", bias=False, trans_b=0)
    )
    assert_propagated(report, "fc")
    assert counts(out) == (0, 0, 0)
    (fc,) = [n for n in out.graph.node if n.op_type == "Gemm"]
    assert len(fc.input) == 3


def test_conv_without_bias_gets_one() -> None:
    out, report = fold_and_check(chain([("MaxPool", {"kernel_shape": [2, 2]})], bias=False))
    assert_propagated(report, "conv")
    assert counts(out) == (0, 0, 0)


def test_average_pool_ceil_mode_counting_pads_stops_the_shift() -> None:
    ap = {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 1}
    out, report = fold_and_check(chain([("AveragePool", ap)], sign="negative"))
    v = assert_propagated(report, "conv")
    assert "shift as one Add before AveragePool" in v.detail
    assert counts(out) == (0, 0, 1)


def test_pad_attribute_form_opset_10() -> None:
    out, report = fold_and_check(chain([("Pad", {"mode": "constant"})], opset=10))
    assert_propagated(report, "conv")
    assert counts(out) == (0, 0, 1)


def test_pad_with_a_non_zero_value_is_refused() -> None:
    out, report = fold_and_check(chain([("Pad", {"mode": "constant", "value": 0.5})], opset=10))
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)


def test_reflect_pad_is_refused() -> None:
    out, report = fold_and_check(chain([("Pad", {"mode": "reflect"})]))
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)


def test_gemm_with_an_empty_bias_slot_gets_the_bias_there() -> None:
    m = chain([("GlobalAveragePool", {})], layer="gemm", bias=False)
    (fc,) = [n for n in m.graph.node if n.op_type == "Gemm"]
    fc.input.append("")  # an absent optional C, spelled as an empty name
    out, report = fold_and_check(m)
    assert_propagated(report, "fc")
    (fc,) = [n for n in out.graph.node if n.op_type == "Gemm"]
    assert len(fc.input) == 3 and fc.input[2]


# MaxPool 2x2 of (2, 6, 8, 8): (2, 6, 4, 4), 96 features per sample.
@pytest.mark.parametrize("shape", [[0, -1], [-1, 96], [2, -1], [2, 96]])
def test_reshape_that_flattens_from_the_channel_axis_folds_into_the_gemm(shape: list[int]) -> None:
    m = chain(
        [("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}), ("Reshape", {"shape": shape})],
        layer="gemm",
        sign="zero",
    )
    out, report = fold_and_check(m)
    assert_propagated(report, "fc")
    assert counts(out) == (0, 0, 0)


def test_reshape_that_regroups_rows_is_refused() -> None:
    """(2, 96) -> (4, 48): a row holds half a sample; channel blocks no longer line up with the Gemm."""
    m = chain(
        [("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}), ("Reshape", {"shape": [-1, 48]})],
        layer="gemm",
    )
    out, report = fold_and_check(m)
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)


def test_dynamo_export_of_crepe_folds_every_bn() -> None:
    """torch.onnx's dynamo exporter writes flatten as a Reshape to a constant shape."""
    pytest.importorskip("onnxscript")
    net = nets.set_bn(nets.Crepe(widths=(8, 8), length=128), sign="positive")
    x = net.example()
    m = torch.onnx.export(net, (x,), dynamo=True, input_names=["x"], verbose=False).model_proto
    out, report = fold_model(m)
    assert_close(run(m, {"x": x.numpy()}), run(out, {"x": x.numpy()}), 1e-5)
    assert counts(out)[0] == 0 and report.folded == report.bn_before == 2


# ---- Transpose: the channel axis is followed through perm ----------------------------------------


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
@pytest.mark.parametrize("sign,muls", [("positive", 0), ("mixed", 1)])
def test_transpose_to_channels_last_relu_matmul(sign: str, muls: int, dtype: int) -> None:
    """NCHW -> NHWC -> Relu -> MatMul over the channel: the scale goes into the MatMul's rows, the shift
    (and the negative channels' affine) stays before the Relu, shaped for the last axis."""
    m = chain([("Transpose", {"perm": [0, 2, 3, 1]}), ("Relu", {})], layer="matmul", sign=sign, dtype=dtype)
    out, report = fold_and_check(m, dtype)
    v = assert_propagated(report, "fc")
    assert "before Relu" in v.detail
    assert counts(out) == (0, muls, 1)


def test_transpose_there_and_back_then_maxpool_into_a_conv() -> None:
    ops = [
        ("Transpose", {"perm": [0, 2, 3, 1]}),
        ("Transpose", {"perm": [0, 3, 1, 2]}),
        ("MaxPool", {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ]
    out, report = fold_and_check(chain(ops))
    assert_propagated(report, "conv")
    assert counts(out) == (0, 0, 0)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_transpose_channels_last_then_flatten_tiles_the_channels_into_the_gemm(dtype: int) -> None:
    m = chain([("Transpose", {"perm": [0, 2, 3, 1]}), ("Flatten", {"axis": 1})], layer="gemm", sign="mixed")
    out, report = fold_and_check(m)
    assert_propagated(report, "fc")
    assert counts(out) == (0, 0, 0)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_transpose_that_leaves_the_channel_in_the_middle_then_flatten(dtype: int) -> None:
    """(N, C, H, W) -> (N, H, C, W) -> Flatten: channel c is the runs of W features at h*C*W + c*W."""
    m = chain([("Transpose", {"perm": [0, 2, 1, 3]}), ("Flatten", {"axis": 1})], layer="gemm", sign="mixed")
    out, report = fold_and_check(m)
    assert_propagated(report, "fc")
    assert counts(out) == (0, 0, 0)


# MaxPool 2x2 of (2, 6, 8, 8): (2, 6, 4, 4); permuted (2, 4, 6, 4): 96 features per sample.
@pytest.mark.parametrize("shape", [[-1, 96], [0, -1]])
def test_torchcrepe_head_maxpool_permute_reshape_linear(shape: list[int]) -> None:
    """torchcrepe: BN -> MaxPool -> permute(0, 2, 1, 3) -> reshape(-1, features) -> Linear."""
    ops = [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("Transpose", {"perm": [0, 2, 1, 3]}),
        ("Reshape", {"shape": shape}),
    ]
    out, report = fold_and_check(chain(ops, layer="gemm", sign="zero"))
    assert_propagated(report, "fc")
    assert counts(out) == (0, 0, 0)


def test_transpose_of_the_spatial_axes_keeps_the_channel_for_the_conv() -> None:
    out, report = fold_and_check(chain([("Transpose", {"perm": [0, 1, 3, 2]})], sign="mixed"))
    assert_propagated(report, "conv")
    assert counts(out) == (0, 0, 0)


def test_transpose_then_matmul_over_a_spatial_axis_is_refused() -> None:
    """After (0, 1, 3, 2) a MatMul contracts a spatial axis, not the channel."""
    m = chain([("Transpose", {"perm": [0, 1, 3, 2]})], layer="matmul")
    for n in m.graph.node:  # make the weight (8, 5): it reads the 8 rows
        if n.op_type == "MatMul":
            (w,) = [t for t in m.graph.initializer if t.name == n.input[1]]
            w.CopyFrom(numpy_helper.from_array(np.ones((8, 5), np.float32) * 0.1, w.name))
    m.graph.output[0].type.tensor_type.ClearField("shape")
    m.graph.output[0].type.CopyFrom(onnx.shape_inference.infer_shapes(m).graph.output[0].type)
    out, report = fold_and_check(m)
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)


# ---- the shift back into a producer's bias ----------------------------------------------------------


def residual(kind: str, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> Conv 'pre' -> p -> BN -> Relu -> Conv 'conv' (pads 1) -> c, and a reader of p:
    "compensated": y = p + c; "output": p is also a graph output; "small": as compensated with |a| < 1/8;
    "sigmoid": p is also read by a Sigmoid; "sum": p = pre(x) + sigmoid(x), read only by the BN."""
    rng = np.random.default_rng(11)
    t = NP[dtype]
    inits = []

    def init(name: str, v: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(v).astype(t), name))
        return name

    g = rng.uniform(0.5, 1.5, C) * (0.05 if kind == "small" else 1.0)
    nodes = [
        helper.make_node(
            "Conv",
            [
                "x",
                init("pw", rng.standard_normal((C, C, 1, 1)) * 0.5),
                init("pb", rng.standard_normal(C) * 0.3),
            ],
            ["q" if kind == "sum" else "p"],
            name="pre",
        )
    ]
    if kind == "sum":  # x's Sigmoid: not a branch of pre's input, so the merge pass leaves the sum
        nodes.append(helper.make_node("Sigmoid", ["x"], ["z"], name="sig"))
        nodes.append(helper.make_node("Add", ["q", "z"], ["p"], name="sum"))
    bn_in = [
        init("g", g),
        init("b", rng.uniform(-0.5, 0.5, C)),
        init("m", rng.uniform(-0.5, 0.5, C)),
        init("v", np.exp(rng.uniform(-1.4, 0.9, C))),
    ]
    nodes += [
        helper.make_node("BatchNormalization", ["p", *bn_in], ["h"], name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node(
            "Conv",
            [
                "r",
                init("w", rng.standard_normal((C, C, 3, 3)) * 0.3),
                init("wb", rng.standard_normal(C) * 0.2),
            ],
            ["c"],
            name="conv",
            pads=[1, 1, 1, 1],
        ),
    ]
    outs = ["y"]
    if kind in ("compensated", "small"):
        nodes.append(helper.make_node("Add", ["p", "c"], ["y"], name="residual"))
    elif kind == "sigmoid":
        nodes += [
            helper.make_node("Sigmoid", ["p"], ["s"], name="sig"),
            helper.make_node("Add", ["s", "c"], ["y"], name="residual"),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["y"], name="out"))
        if kind == "output":
            outs.append("p")
    graph = helper.make_graph(
        nodes,
        "r",
        [helper.make_tensor_value_info("x", dtype, [2, C, 8, 8])],
        [helper.make_tensor_value_info(o, dtype, [2, C, 8, 8]) for o in outs],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def initializer(m: onnx.ModelProto, node: str, slot: int) -> np.ndarray:
    (n,) = [n for n in m.graph.node if n.name == node]
    return numpy_helper.to_array([t for t in m.graph.initializer if t.name == n.input[slot]][0])


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_shift_moves_into_a_producer_read_by_a_residual_add_and_is_taken_back_out(dtype: int) -> None:
    """Pre-activation block: p = pre(x) feeds the BN and the residual sum p + conv(...). The shift
    s = b/a goes into pre's bias, and conv's bias gives it back: (p + s) + (c - s) = p + c."""
    m = residual("compensated", dtype)
    out, report = fold_and_check(m, dtype)
    v = assert_propagated(report, "conv")
    assert "shift into the bias of Conv 'pre'" in v.detail and "Conv 'conv'" in v.detail
    assert counts(out) == (0, 0, 1)  # the residual sum only
    s = initializer(out, "pre", 2).astype(np.float64) - initializer(m, "pre", 2)
    assert np.abs(s).min() > 0
    assert not np.allclose(initializer(out, "conv", 2), initializer(m, "conv", 2))


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_shift_into_the_layer_term_of_a_sum_read_only_by_the_bn(dtype: int) -> None:
    """BN(pre(x) + sigmoid(x)): the scale cannot go back, the shift goes into pre's bias."""
    m = residual("sum", dtype)
    out, report = fold_and_check(m, dtype)
    v = assert_propagated(report, "conv")
    assert "shift into the bias of Conv 'pre'" in v.detail and "taken back" not in v.detail
    assert counts(out) == (0, 0, 1)  # the sum only


@pytest.mark.parametrize("kind", ["output", "sigmoid", "small"])
def test_shift_reaching_a_producer_that_must_stay_is_an_add(kind: str) -> None:
    """p is also a graph output, or read by a Sigmoid (nothing to take the shift back out), or the
    scale is so small that (p + s) - s would lose p's precision: pre's bias is untouched."""
    m = residual(kind)
    out, report = fold_and_check(m)
    v = assert_propagated(report, "conv")
    assert "shift as one Add before Relu 'relu'" in v.detail
    assert counts(out) == (0, 0, counts(m)[2] + 1)
    assert np.array_equal(initializer(out, "pre", 2), initializer(m, "pre", 2))


# ---- subgraphs -------------------------------------------------------------------------------------


def if_model(outer_weight: bool) -> onnx.ModelProto:
    """The then-branch of an If holds Relu -> BN -> Relu -> Conv (pads 1); the else-branch a Relu.
    ``outer_weight``: the conv's weight is an initializer of the main graph (the body reads it)."""
    body = chain([("Relu", {})], pads=1, sign="mixed")
    g = body.graph
    w = [t for t in g.initializer if t.name == "w"][0]
    outer_inits = []
    if outer_weight:
        g.initializer.remove(w)
        outer_inits.append(w)
    then = helper.make_graph(
        list(g.node),
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8, 8])],
        list(g.initializer),
    )
    other = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["e"], name="else_relu"),
            helper.make_node("Slice", ["e", "st", "en", "ax"], ["y2"]),
        ],
        "else",
        [],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 4, 8, 8])],
        [
            numpy_helper.from_array(np.array(v, np.int64), n)
            for n, v in (("st", [0, 0]), ("en", [4, 8]), ("ax", [1, 2]))
        ],
    )
    main = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then, else_branch=other)],
        "main",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, C, 8, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 8, 8])],
        outer_inits,
    )
    m = helper.make_model(main, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("outer_weight", [False, True])
def test_bn_inside_an_if_branch(outer_weight: bool) -> None:
    m = if_model(outer_weight)
    before = m.SerializeToString()
    out, report = fold_model(m)
    assert m.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(3).standard_normal((2, C, 8, 8)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert_close(run(m, feeds), run(out, feeds), TOL[TensorProto.FLOAT])
    (v,) = report.verdicts
    assert v.bn == "branch/then_branch/bn"
    body = [a.g for a in out.graph.node[0].attribute if a.name == "then_branch"][0]
    ops = [n.op_type for n in body.node]
    if outer_weight:  # the conv's weight belongs to the main graph: the body may not rewrite it
        assert isinstance(v, Skip) and ops.count("BatchNormalization") == 1
    else:
        assert v.to_dict()["status"] == "propagated" and "3 of 6 channels keep their affine" in v.detail
        assert (ops.count("BatchNormalization"), ops.count("Mul"), ops.count("Add")) == (0, 1, 1)


# ---- a fork into several layers (pre-activation projection shortcut) -------------------------------


def fork(sign: str, pads: int, second: str = "Conv", dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> Relu -> BN -> Relu -> r; outputs conv(r) and second(r): a 1x1 stride-2 Conv 'shortcut' (a
    projection, padded like conv) or a Sigmoid. (A sum of the two would be merged into one conv first.)"""
    m = chain([("Relu", {})], sign=sign, pads=pads, dtype=dtype)
    g = m.graph
    rng = np.random.default_rng(5)
    if second == "Conv":
        w = numpy_helper.from_array((rng.standard_normal((3, C, 1, 1)) * 0.4).astype(NP[dtype]), "w2")
        g.initializer.extend([w, numpy_helper.from_array(rng.standard_normal(3).astype(NP[dtype]), "b2")])
        g.node.append(
            helper.make_node(
                "Conv", ["h1", "w2", "b2"], ["z"], name="shortcut", pads=[pads] * 4, strides=[2, 2]
            )
        )
    else:
        g.node.append(helper.make_node("Sigmoid", ["h1"], ["z"], name="sig"))
    g.output.append(helper.make_tensor_value_info("z", dtype, None))
    g.output[1].type.CopyFrom(onnx.shape_inference.infer_shapes(m).graph.output[1].type)
    return m


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
@pytest.mark.parametrize(
    "sign,pads,muls,adds", [("positive", 0, 0, 0), ("positive", 1, 0, 1), ("mixed", 1, 1, 1)]
)
def test_fork_into_two_convs_scales_both(sign: str, pads: int, muls: int, adds: int, dtype: int) -> None:
    """No padding: the Relu becomes a Max, the shift goes into both biases; padding: one Add before the
    Relu serves both convs; mixed signs: one Mul and one Add."""
    out, report = fold_and_check(fork(sign, pads, dtype=dtype), dtype)
    v = assert_propagated(report, "conv")
    assert "Conv 'conv', Conv 'shortcut'" in v.detail
    assert counts(out) == (0, muls, adds)


def test_fork_into_a_layer_and_another_op_keeps_the_bn() -> None:
    out, report = fold_and_check(fork("positive", 1, second="Sigmoid"))
    v = verdict(report)
    assert isinstance(v, Skip) and counts(out)[0] == 1


@pytest.mark.parametrize("name", ["preact", "dense"])
def test_preact_and_dense_nets_reach_the_node_counts_of_their_bn_free_floor(name: str) -> None:
    """Every shift reaches a bias (a producer's, taken back out of the residual sum; or through a Relu
    become Max), so no Mul or Add is left that the same net without BNs does not have."""
    net = nets.set_bn(nets.MODELS[name](), sign="positive")
    x = net.example()
    m = export(net, x)
    floor = nets.MODELS[name]()
    for parent in floor.modules():
        for k, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, k, torch.nn.Identity())
    out, report = fold_model(m)
    assert_close(run(m, {"x": x.numpy()}), run(out, {"x": x.numpy()}), 1e-5)
    assert counts(out) == counts(export(floor.eval(), x))


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_relu_then_spatial_reduce_mean_head(keepdims: int, dtype: int) -> None:
    """BN -> Relu -> ReduceMean(H, W) (the dynamo export of adaptive_avg_pool2d(1) + flatten) -> Gemm:
    the Relu becomes a Max, scale and shift go into the Gemm."""
    ops = [("Relu", {}), ("ReduceMean", {"axes": [2, 3], "keepdims": keepdims})]
    if keepdims:
        ops.append(("Flatten", {"axis": 1}))
    out, report = fold_and_check(chain(ops, layer="gemm", dtype=dtype), dtype)
    v = assert_propagated(report, "fc")
    assert "(now a Max)" in v.detail
    assert counts(out) == (0, 0, 0)


def test_reduce_mean_over_the_channel_is_refused() -> None:
    ops = [("ReduceMean", {"axes": [1], "keepdims": 1}), ("Flatten", {"axis": 1})]
    m = chain(ops, layer="gemm")
    out, report = fold_and_check(m)
    assert isinstance(verdict(report), Skip) and counts(out) == (1, 0, 0)


@pytest.mark.parametrize("sign", ["positive", "mixed", "zero"])
def test_preact_resnet_keeps_no_bn(sign: str) -> None:
    """ResNet-v2 with a projection shortcut and a BN -> ReLU -> GAP -> Linear head: every BN goes;
    channels with a negative scale before a ReLU, or a zero scale before a ReLU and a padded conv, keep
    their affine (one Mul each, counted in the verdict). The head's zero-scale channels give relu(b) to
    the Gemm through a Max; their shift must not go into the producer's bias (it did: wrong outputs)."""
    net = nets.set_bn(nets.PreActResNet(), sign=sign)
    x = net.example()
    m = export(net, x)
    before = m.SerializeToString()
    out, report = fold_model(m)
    assert m.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    assert_close(run(m, {"x": x.numpy()}), run(out, {"x": x.numpy()}), 1e-5)
    assert counts(out)[0] == 0 and report.folded == report.bn_before
    kept = [v for v in report.sites if "keep their affine" in v.detail]
    assert counts(out)[1] == len(kept) and (sign != "positive") == bool(kept)
