"""BNs that normalise with their batch at inference (issue 26, part 1).

``batch_stats="instance"`` / ``--batch-stats instance`` turns them into InstanceNorms: equal to the original at
batch 1 (checked by running both), different at batch > 1 (the report says so); without the option they are
left with a reason that names it. A training-mode BN on a constant (weight standardisation) is evaluated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from bnfold.errors import OptionError
from bnfold.hints import BATCH_STATS_INSTANCE
from bnfold.records import Direction, Site, Skip, SkipReason
from models.batch_stats import onnx_training_bn, onnx_weight_standardised, torch_batch_stats_net
from models.testing import ort_session

SPATIAL = {3: (9,), 4: (7, 6), 5: (5, 4, 3)}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = ort_session(model).run(["y"], {"x": x})[0]
    return out


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The training-mode BN model in float64 numpy, written from the operator's definition (batch statistics
    over every axis but 1, biased variance), independently of bnfold."""
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    x64 = x.astype(np.float64)
    w, b = init["W"], init["b"]
    if x.ndim == 2:
        h = x64 @ w.T + b
    else:
        conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[
            x.ndim
        ]
        h = conv(torch.from_numpy(x64), torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()
    axes = tuple(a for a in range(h.ndim) if a != 1)
    shape = (1, -1) + (1,) * (h.ndim - 2)
    m = h.mean(axis=axes, keepdims=True)
    v = h.var(axis=axes, keepdims=True)
    eps = float(np.float32(1e-3))
    z = (h - m) / np.sqrt(v + eps) * init["bn_scale"].reshape(shape) + init["bn_B"].reshape(shape)
    return np.maximum(z, 0.0)


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


# ---------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("rank", [3, 4, 5])
def test_onnx_instance_equals_original_at_batch_1(rank: int) -> None:
    model = onnx_training_bn(rank)
    before = _digest(model)
    folded, report = bnfold.fold_with_report(model, batch_stats="instance")
    assert _digest(model) == before  # the original is untouched
    assert [n.op_type for n in folded.graph.node] == ["Conv", "InstanceNormalization", "Relu"]
    x = np.random.default_rng(rank).normal(0.3, 1.5, (1, 3, *SPATIAL[rank])).astype(np.float32)
    ref = _reference(model, x)
    np.testing.assert_allclose(_run(model, x), ref, atol=2e-5, rtol=1e-5)  # the runtime agrees with the spec
    np.testing.assert_allclose(_run(folded, x), ref, atol=2e-5, rtol=1e-5)
    (v,) = report.verdicts
    assert isinstance(v, Site) and v.direction is Direction.CONVERTED
    assert v.target_kind == "InstanceNormalization" and "batch > 1" in v.detail
    assert any("batch 1 only" in n for n in report.notes)
    assert report.to_dict()["verdicts"][0]["status"] == "converted"


def test_onnx_instance_differs_at_batch_2_as_the_report_says() -> None:
    model = onnx_training_bn(4, batch="N")
    folded = bnfold.fold(model, batch_stats="instance")
    x = np.random.default_rng(1).normal(0.3, 1.5, (2, 3, 7, 6)).astype(np.float32)
    x[1] *= 3.0  # two samples of different scale: batch statistics differ from per-sample ones
    np.testing.assert_allclose(_run(model, x), _reference(model, x), atol=2e-5, rtol=1e-5)
    assert np.abs(_run(folded, x) - _run(model, x)).max() > 1e-2


def test_onnx_opset_9_training_outputs_convert_too() -> None:
    """Opsets 7-13 say training mode with the optional outputs: converted when nothing reads them."""
    model = onnx_training_bn(4, opset=9)
    v = bnfold.inspect(model).verdicts[0]
    assert isinstance(v, Skip) and v.hints == (BATCH_STATS_INSTANCE,)
    folded = bnfold.fold(model, batch_stats="instance")
    x = np.random.default_rng(4).normal(0.3, 1.5, (1, 3, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _reference(model, x), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(_run(folded, x), _reference(model, x), atol=2e-5, rtol=1e-5)


def test_onnx_without_the_option_the_reason_names_it() -> None:
    model = onnx_training_bn(4)
    folded, report = bnfold.fold_with_report(model)
    (v,) = report.verdicts
    assert isinstance(v, Skip) and v.reason is SkipReason.TRAINING_MODE
    assert v.hints == (BATCH_STATS_INSTANCE,)
    assert "batch_stats='instance'" in v.text() and "--batch-stats instance" in v.text("cli")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    assert not report.notes


def test_onnx_rank_2_is_refused_with_the_reason() -> None:
    model = onnx_training_bn(2)
    folded, report = bnfold.fold_with_report(model, batch_stats="instance")
    (v,) = report.verdicts
    assert isinstance(v, Skip) and v.reason is SkipReason.TRAINING_MODE
    assert "rank 2" in v.detail and "variance is 0" in v.detail
    assert "BatchNormalization" in [n.op_type for n in folded.graph.node]


def test_onnx_running_statistics_read_downstream_are_refused() -> None:
    model = onnx_training_bn(4, read_running=True)
    folded, report = bnfold.fold_with_report(model, batch_stats="instance")
    (v,) = report.verdicts
    assert isinstance(v, Skip) and "running-statistic outputs (run_mean)" in v.detail
    assert "BatchNormalization" in [n.op_type for n in folded.graph.node]


def test_onnx_inspect_gives_the_verdicts_of_fold() -> None:
    model = onnx_training_bn(4)
    before = _digest(model)
    report = bnfold.inspect(model, batch_stats="instance")
    assert _digest(model) == before
    (v,) = report.verdicts
    assert isinstance(v, Site) and v.direction is Direction.CONVERTED


def test_onnx_constant_bn_is_evaluated_by_default() -> None:
    model = onnx_weight_standardised()
    before = _digest(model)
    folded, report = bnfold.fold_with_report(model)
    assert _digest(model) == before
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    by_name = {v.bn: v for v in report.verdicts}
    assert isinstance(by_name["ws_bn"], Site) and by_name["ws_bn"].target_kind == "constant"
    assert (
        isinstance(by_name["bn"], Site) and by_name["bn"].target == "conv"
    )  # the BN after the conv folds too
    x = np.random.default_rng(2).normal(0.1, 1.0, (1, 3, 8, 8)).astype(np.float32)
    # Independent float64 reference: standardise each output filter (biased variance), conv, inference BN.
    init = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    w = init["W"].reshape(4, -1)
    wn = (w - w.mean(1, keepdims=True)) / np.sqrt(w.var(1, keepdims=True) + float(np.float32(1e-4)))
    wn = (wn * init["gain"][:, None]).reshape(4, 3, 3, 3)
    h = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)), torch.from_numpy(wn), padding=1
    ).numpy()
    s = init["bn_scale"] / np.sqrt(init["bn_var"] + float(np.float32(1e-5)))
    ref = (h - init["bn_mean"][None, :, None, None]) * s[None, :, None, None] + init["bn_B"][
        None, :, None, None
    ]
    np.testing.assert_allclose(_run(model, x), ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(_run(folded, x), ref, atol=1e-4, rtol=1e-5)


def test_bad_value_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="batch_stats='batch'"):
        bnfold.fold(onnx_training_bn(4), batch_stats="batch")


# ------------------------------------------------------------------------------------------- PyTorch
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_torch_instance_equals_original_at_batch_1(dims: int) -> None:
    net = torch_batch_stats_net(dims)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(1, 3, *([6] * dims)) * 2 + 0.5
    # Conv1d -> BatchNorm1d folds where the shapes prove the batch (a Conv1d also reads an unbatched (C, L))
    folded, report = bnfold.fold_with_report(net, batch_stats="instance", example_inputs=(x,))
    # the original is untouched: same modules, same values
    assert isinstance(net[1], torch.nn.modules.batchnorm._BatchNorm)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    inst = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}[dims]
    assert sum(isinstance(m, inst) for m in folded.modules()) == 1
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=2e-5, rtol=1e-5)
        x2 = torch.cat([x, 3 * x + 1])
        assert (folded(x2) - net(x2)).abs().max() > 1e-2  # batch > 1: another model, as reported
    by_name = {v.bn: v for v in report.verdicts}
    assert isinstance(by_name["1"], Site) and by_name["1"].direction is Direction.CONVERTED
    assert "batch > 1" in by_name["1"].detail
    assert isinstance(by_name["4"], Site) and by_name["4"].target == "3"  # the BN with statistics folds
    assert report.bn_before == 2 and report.bn_after == 0
    assert any("batch 1 only" in n for n in report.notes)


def test_torch_without_the_option_the_reason_names_it() -> None:
    net = torch_batch_stats_net(2)
    report = bnfold.inspect(net)
    v = {v.bn: v for v in report.verdicts}["1"]
    assert isinstance(v, Skip) and v.reason is SkipReason.NO_RUNNING_STATS
    assert v.hints == (BATCH_STATS_INSTANCE,) and "--batch-stats instance" in v.text("cli")


def test_torch_inspect_with_the_option_changes_nothing() -> None:
    net = torch_batch_stats_net(2)
    report = bnfold.inspect(net, batch_stats="instance")
    assert isinstance(net[1], torch.nn.BatchNorm2d)
    v = {v.bn: v for v in report.verdicts}["1"]
    assert isinstance(v, Site) and v.direction is Direction.CONVERTED and report.bn_before == 2


def test_torch_bn_with_running_stats_in_train_mode_is_still_refused() -> None:
    net = torch_batch_stats_net(2).train()
    with pytest.raises(bnfold.errors.ModelStateError):
        bnfold.fold(net, batch_stats="instance")


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_fold_batch_stats_instance(tmp_path: Path) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    model = onnx_training_bn(4)
    onnx.save(model, src)
    before = src.read_bytes()
    res = CliRunner().invoke(app, ["fold", str(src), str(dst), "--batch-stats", "instance", "--json"])
    assert res.exit_code == 0, res.output
    assert src.read_bytes() == before
    doc = json.loads(res.stdout)
    (v,) = doc["verdicts"]
    assert v["status"] == "converted" and "batch > 1" in v["detail"]
    assert any("batch 1 only" in n for n in doc["notes"])
    assert doc["verification"]["passed"]
    # a conversion is no fold: counted apart
    assert (doc["summary"]["converted"], doc["summary"]["folded"]) == (1, 0)
    assert doc["summary"]["by_target_kind"] == {}
    x = np.random.default_rng(3).normal(0.3, 1.5, (1, 3, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(onnx.load(dst), x), _reference(model, x), atol=2e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]


def test_counts_keep_conversions_apart_from_folds(tmp_path: Path) -> None:
    """PyTorch: one BN converted, one folded: the summary says so, in --json and in the human view."""
    net = torch_batch_stats_net(2)
    _, report = bnfold.fold_with_report(net, batch_stats="instance")
    c = report.to_dict()["summary"]
    assert (c["folded"], c["converted"], c["by_target_kind"]) == (1, 1, {"Conv2d": 1})
    src = tmp_path / "m.onnx"
    onnx.save(onnx_training_bn(4), src)
    res = CliRunner().invoke(app, ["inspect", str(src), "--batch-stats", "instance"])
    assert res.exit_code == 0, res.output
    assert "would fold 0" in res.output and "would convert 1 to InstanceNorm" in res.output, res.output


def test_cli_bad_value_is_one_line_exit_2(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(onnx_training_bn(4), src)
    res = CliRunner().invoke(app, ["fold", str(src), str(tmp_path / "o.onnx"), "--batch-stats", "batch"])
    assert res.exit_code == 2
    assert "--batch-stats batch: expected instance" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_onnx_instance_in_an_if_subgraph() -> None:
    from onnx import TensorProto, helper, numpy_helper

    g = onnx_training_bn(4).graph
    then = helper.make_graph(
        list(g.node),
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 7, 6])],
        list(g.initializer),
    )
    other = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y2"])],
        "else",
        [],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="if")
    outer = helper.make_graph(
        [node],
        "outer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(True), "c")],
    )
    model = helper.make_model(outer, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    folded, report = bnfold.fold_with_report(model, batch_stats="instance")
    (v,) = report.verdicts
    assert v.bn == "if/then_branch/bn" and isinstance(v, Site) and v.direction is Direction.CONVERTED
    x = np.random.default_rng(5).normal(0.3, 1.5, (1, 3, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), atol=2e-5, rtol=1e-5)


def test_cli_dynamic_batch_verified_at_2_fails_and_says_batch_1(tmp_path: Path) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(onnx_training_bn(4, batch="N"), src)
    res = CliRunner().invoke(app, ["fold", str(src), str(dst), "--batch-stats", "instance", "-q"])
    assert res.exit_code == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "exact at batch 1 only" in res.stderr
    assert not dst.exists()
    res = CliRunner().invoke(
        app, ["fold", str(src), str(dst), "--batch-stats", "instance", "-q", "-s", "x=1x3x7x6"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]


def test_cli_culprit_search_keeps_the_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch file with --batch-stats instance: the fold of '4' fails verification, the culprit search
    leaves it, and its re-folds convert '1' as the first fold did. The verification is a stand-in that
    fails exactly when '4' is folded (the wiring under test); the written model is then compared with the
    original for real."""
    from bnfold.files import fold as fold_job
    from bnfold.files import fold_torch as fold_torch_job
    from bnfold.records import OutputCheck, VerifyReport

    def fake_verify(
        reference: torch.nn.Module, candidate: torch.nn.Module, *a: object, **k: object
    ) -> VerifyReport:
        assert isinstance(reference[1], torch.nn.BatchNorm2d)  # the reference is never the converted model
        ok = isinstance(candidate[4], torch.nn.BatchNorm2d)
        chk = OutputCheck("y", 0, "float32", (1,), 0.0 if ok else 1.0, 0.0, 0 if ok else 1, 0.0, 1e-5, ok)
        return VerifyReport(checks=(chk,), samples=1, optimization_level="disable")

    monkeypatch.setattr(fold_job, "run_verify", fake_verify)
    monkeypatch.setattr(fold_torch_job, "run_verify", fake_verify)
    (tmp_path / "bs_factory.py").write_text(
        "from models.batch_stats import torch_batch_stats_net\ndef make():\n    return torch_batch_stats_net(2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    src, dst = tmp_path / "m.pt", tmp_path / "out.pt"
    torch.save(torch_batch_stats_net(2).state_dict(), src)
    before = src.read_bytes()
    args = [str(src), "-o", str(dst), "--model", "bs_factory:make", "-s", "x=1x3x8x8"]
    res = CliRunner().invoke(app, ["fold", *args, "--batch-stats", "instance", "--json"])
    assert res.exit_code == 0, res.output
    assert src.read_bytes() == before
    doc = json.loads(res.stdout)
    status = {v["bn"]: (v["status"], v["reason"]) for v in doc["verdicts"]}
    assert status == {"1": ("converted", None), "4": ("left", "verification")}, doc["verdicts"]
    assert doc["summary"]["converted"] == 1 and doc["verification"]["passed"]
    net = torch_batch_stats_net(2)
    net.load_state_dict(torch.load(src))
    written = torch.load(dst, weights_only=False)
    assert isinstance(written[1], torch.nn.InstanceNorm2d) and isinstance(written[4], torch.nn.BatchNorm2d)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(written(x), net(x), atol=2e-5, rtol=1e-5)


def test_onnx_a_fixed_batch_above_one_is_not_converted() -> None:
    """At batch 2 for every input the model takes, an InstanceNorm is never equal to the BN: refused."""
    model = onnx_training_bn(4, batch=2)
    x = np.random.default_rng(5).normal(0.3, 1.5, (2, 3, 7, 6)).astype(np.float32)
    folded, report = bnfold.fold_with_report(model, batch_stats="instance")
    (v,) = report.verdicts
    assert isinstance(v, Skip) and v.reason is SkipReason.TRAINING_MODE and "batch at 2" in v.detail
    np.testing.assert_allclose(_run(folded, x), _run(model, x), atol=1e-6, rtol=1e-6)
