"""PyTorch -> ONNX from the CLI, external data, inspect's prediction, advice in flags (issue 15).

What a deployment engineer checks: the exported file has the forward signature's names and a dynamic
batch (it runs at a batch size it was not verified on, with the PyTorch model's numbers), the ONNX
output keeps the input's external-data layout, sizes count the data files, ``--in-place`` leaves no
orphaned data, and every piece of advice names a flag the CLI has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from test_cli import FP32_ATOL, ROOT, assert_clean_error, count_bn, digest, tiny_onnx
from typer.testing import CliRunner

from bnfold.cli import app
from models.testing import ort_session

runner = CliRunner()

FACTORY = """
import torch
from torch import nn
from models.stats import randomize_bn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn1 = nn.BatchNorm1d(5)

    def forward(self, image):
        y = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        return self.bn1(self.fc(y))


def net():
    torch.manual_seed(0)
    return randomize_bn(Net(), 0).eval()


net.example_input_shape = (3, 8, 8)
"""

NOSHAPE = """
import torch
from torch import nn
from models.stats import randomize_bn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, image):
        return self.bn(self.fc(image))


def net():
    torch.manual_seed(0)
    return randomize_bn(Net(), 0).eval()
"""


@pytest.fixture()
def ckpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    import torch

    monkeypatch.chdir(ROOT)
    (tmp_path / "netdef.py").write_text(FACTORY)
    spec = f"{tmp_path / 'netdef.py'}:net"
    from bnfold.io import resolve_factory

    p = tmp_path / "net.pt"
    torch.save(resolve_factory(spec)().state_dict(), p)
    return p, spec


def _session(path: Path) -> ort.InferenceSession:
    return ort_session(path)


def _dims(vi: onnx.ValueInfoProto) -> list[object]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_export_has_signature_names_and_a_dynamic_batch(ckpt: tuple[Path, str], tmp_path: Path) -> None:
    import torch

    from bnfold.io import resolve_factory

    src, spec = ckpt
    out = tmp_path / "net.onnx"
    r = runner.invoke(app, ["fold", str(src), str(out), "-m", spec, "--json"])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["image"] and [o.name for o in m.graph.output] == ["output"]
    assert _dims(m.graph.input[0]) == ["batch", 3, 8, 8] and _dims(m.graph.output[0]) == ["batch", 5]
    assert count_bn(out) == 0
    # Runs at a batch it was not verified on, computing what the PyTorch model computes.
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = resolve_factory(spec)()(x).numpy()
    got = _session(out).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=FP32_ATOL, rtol=0)
    doc = json.loads(r.stdout)
    assert doc["verification"]["inputs"] == {"image": [2, 3, 8, 8]}  # -s / the example: what was verified


def test_export_static_batch_names_and_opset(ckpt: tuple[Path, str], tmp_path: Path) -> None:
    src, spec = ckpt
    out = tmp_path / "net.onnx"
    r = runner.invoke(
        app,
        [
            "fold",
            str(src),
            str(out),
            "-m",
            spec,
            "--static-batch",
            "--input-names",
            "img",
            "--output-names",
            "logits",
            "--opset",
            "17",
            "-s",
            "x=3x3x8x8",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.stderr
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input] == ["img"] and [o.name for o in m.graph.output] == ["logits"]
    assert _dims(m.graph.input[0]) == [3, 3, 8, 8]
    assert {o.domain: o.version for o in m.opset_import}.get("", 0) == 17


def test_inspect_on_pytorch_predicts_the_result(ckpt: tuple[Path, str]) -> None:
    src, spec = ckpt
    r = runner.invoke(app, ["inspect", str(src), "-m", spec, "--json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)["summary"]
    assert (s["bn_before"], s["bn_after"], s["folded"]) == (2, 0, 2)
    assert runner.invoke(app, ["inspect", str(src), "-m", spec, "--fail-if-left", "-q"]).exit_code == 0


def test_train_mode_advice_names_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    monkeypatch.chdir(ROOT)
    p = tmp_path / "train.pt"
    torch.save(randomize_bn(lenet5(), seed=2).train(), p)
    out = tmp_path / "o.pt"
    r = runner.invoke(app, ["fold", str(p), str(out), "--trust-pickle", "--no-verify"])
    assert_clean_error(r, 2, "train.pt")
    assert "--eval-semantics" in r.stderr and "eval_semantics=True" not in r.stderr
    assert not out.exists()
    r = runner.invoke(
        app, ["fold", str(p), str(out), "--trust-pickle", "--eval-semantics", "-s", "x=2x1x32x32", "--json"]
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["bn_after"] == 0 and json.loads(r.stdout)["verification"]["passed"]


def _external(tmp_path: Path, location: str = "w.bin") -> Path:
    p = tmp_path / "ext.onnx"
    # 16 channels: the conv weight is over the 1 KiB under which bnfold keeps a tensor inline.
    onnx.save(
        tiny_onnx(out_channels=16),
        str(p),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    assert (tmp_path / location).exists()
    return p


def test_external_data_layout_is_kept_and_counted(tmp_path: Path) -> None:
    src = _external(tmp_path)
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(src), str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    (data,) = tmp_path.glob("out.onnx.*.data")  # named after its content (bnfold.io.save)
    assert data.stat().st_size > 0  # the input's layout: external
    assert doc["output"]["size_bytes"] == out.stat().st_size + data.stat().st_size
    assert doc["model"]["size_bytes"] == src.stat().st_size + (tmp_path / "w.bin").stat().st_size
    assert doc["output"]["data_files"] == [str(data.resolve())]
    inline = tmp_path / "inline.onnx"
    assert runner.invoke(app, ["fold", str(src), str(inline), "--no-external-data", "-q"]).exit_code == 0
    assert not list(tmp_path.glob("inline.onnx*.data"))
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = _session(src).run(None, {"x": x})[0]
    for p in (out, inline):
        np.testing.assert_allclose(_session(p).run(None, {"x": x})[0], ref, atol=FP32_ATOL, rtol=0)
    # An inline input can be written with external data on request.
    forced = tmp_path / "forced.onnx"
    assert runner.invoke(app, ["fold", str(inline), str(forced), "--external-data", "-q"]).exit_code == 0
    assert len(list(tmp_path.glob("forced.onnx.*.data"))) == 1


def test_in_place_keeps_data_bnfold_did_not_write_and_says_so(tmp_path: Path) -> None:
    src = _external(tmp_path)
    before = (tmp_path / "w.bin").read_bytes()
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = _session(src).run(None, {"x": x})[0]
    r = runner.invoke(app, ["fold", str(src), str(src), "--in-place", "--json"])
    assert r.exit_code == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    # w.bin was written by another tool: another model may read it, so it stays, and the report says so
    assert len(names) == 3 and names[0] == "ext.onnx" and names[2] == "w.bin", names
    assert re.fullmatch(r"ext\.onnx\.[0-9a-f]{16}\.data", names[1])
    assert (tmp_path / "w.bin").read_bytes() == before
    assert any("kept" in n and "w.bin" in n for n in json.loads(r.stdout)["notes"])
    np.testing.assert_allclose(_session(src).run(None, {"x": x})[0], ref, atol=FP32_ATOL, rtol=0)
    # the output is bnfold's now: a second in-place run replaces its data and leaves no orphan of its own
    assert runner.invoke(app, ["fold", str(src), str(src), "--in-place", "-q"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_bench_on_a_folded_model_says_so(tmp_path: Path) -> None:
    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(src))
    folded = tmp_path / "folded.onnx"
    assert runner.invoke(app, ["fold", str(src), str(folded), "--affine", "-q"]).exit_code == 0
    before = digest(folded)
    r = runner.invoke(app, ["bench", str(folded), "--runs", "1", "--warmup", "0"])
    assert r.exit_code == 0, r.stderr
    assert "no BatchNorm" in r.stderr and "already folded" in r.stderr
    assert digest(folded) == before


BAKED = """
import torch
from torch import nn
from models.stats import randomize_bn


class Baked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        n = int(x.shape[0])  # a Python int: the tracer bakes the batch size into the graph
        return self.bn(self.conv(x)).reshape(n, -1)


def baked():
    torch.manual_seed(0)
    return randomize_bn(Baked(), 0).eval()


baked.example_input_shape = (3, 4, 4)
"""


def test_a_baked_in_batch_is_not_exported_as_dynamic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.chdir(ROOT)
    (tmp_path / "bakeddef.py").write_text(BAKED)
    spec = f"{tmp_path / 'bakeddef.py'}:baked"
    from bnfold.io import resolve_factory

    src = tmp_path / "baked.pt"
    torch.save(resolve_factory(spec)().state_dict(), src)
    out = tmp_path / "baked.onnx"
    r = runner.invoke(app, ["fold", str(src), str(out), "-m", spec])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "--static-batch" in r.stderr and not out.exists()
    r = runner.invoke(app, ["fold", str(src), str(out), "-m", spec, "--static-batch", "-q"])
    assert r.exit_code == 0, r.stderr
    assert _dims(onnx.load(str(out)).graph.input[0]) == [2, 3, 4, 4]


def test_folded_mul_add_pairs_count_as_folds(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 4, 1, 1)).astype(np.float32), "s"),
        numpy_helper.from_array(rng.uniform(-0.5, 0.5, (1, 4, 1, 1)).astype(np.float32), "t"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["m"], name="frozen_mul"),
        helper.make_node("Add", ["m", "t"], ["y"], name="frozen_add"),
    ]
    g = helper.make_graph(
        nodes,
        "frozen",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "frozen.onnx"
    onnx.save(m, str(src))
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(src), str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)["summary"]
    assert s["folded"] == 1 and s["mul_add_folded"] == 1 and s["by_target_kind"] == {"Mul+Add": 1}
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv"]
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(
        _session(out).run(None, {"x": x})[0], _session(src).run(None, {"x": x})[0], atol=FP32_ATOL, rtol=0
    )
    r = runner.invoke(app, ["fold", str(src), str(tmp_path / "o2.onnx")])
    assert "folded 1" in r.stdout  # the headline counts it too


def test_inspect_advice_names_input_shape_and_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.chdir(ROOT)
    # The Linear reads the input itself: nothing in the graph proves its rank (2-D (N, C) or 3-D (N, C, L)).
    (tmp_path / "noshape.py").write_text(NOSHAPE)
    spec = f"{tmp_path / 'noshape.py'}:net"
    from bnfold.io import resolve_factory

    src = tmp_path / "net.pt"
    torch.save(resolve_factory(spec)().state_dict(), src)
    r = runner.invoke(app, ["inspect", str(src), "-m", spec, "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    left = [v for v in doc["verdicts"] if v["status"] == "left"]
    assert [v["bn"] for v in left] == ["bn"]  # Linear -> BatchNorm1d: nothing proves the input is 2-D
    (hint,) = left[0]["hints"]
    assert (
        hint["flag"] == "--input-shape"
        and "--input-shape" in hint["cli"]
        and "example_inputs=" not in hint["cli"]
    )
    r = runner.invoke(app, ["inspect", str(src), "-m", spec, "-s", "image=2x8", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["bn_after"] == 0  # what fold with the same -s would do


def test_in_place_keeps_a_data_file_another_model_reads(tmp_path: Path) -> None:
    src = _external(tmp_path)
    other = tmp_path / "other.onnx"  # a second model reading the same w.bin
    other.write_bytes(src.read_bytes())
    x = np.random.default_rng(6).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ref = _session(other).run(None, {"x": x})[0]
    r = runner.invoke(app, ["fold", str(src), str(src), "--in-place", "--json"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "w.bin").exists()
    assert any("w.bin" in n for n in json.loads(r.stdout)["notes"])
    np.testing.assert_allclose(_session(other).run(None, {"x": x})[0], ref, atol=0, rtol=0)  # untouched
