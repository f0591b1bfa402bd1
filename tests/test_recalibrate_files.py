"""``bnfold recalibrate`` on files: ONNX statistics equal an independent float64 computation; checkpoints
equal ``bnfold.recalibrate``; bad data is one line, exit 2, nothing written.

The oracle for ONNX is the torch module the graph is written from, run in float64 in eval mode: BN by BN
in graph order, its input is captured with the BNs before it already holding their new statistics, and
the statistics are computed with numpy (per-batch mean / unbiased variance averaged, or all values
pooled). It never calls bnfold's estimators.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from models.testing import run_onnx

runner = CliRunner()

OPSET = 15
# Statistics of float32 activations (onnxruntime) against float64 ones (torch): a few float32 ulps of the
# activation's scale, accumulated over a conv of <= 36 terms.
RTOL, ATOL = 2e-5, 2e-6


class Net(nn.Module):
    """BN0 on the input (depth 0), BN1 after a conv (depth 0), BN2 after BN1 (depth 1), BN3 after BN0 and BN2."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3, eps=1e-3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, eps=1e-3)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4, eps=1e-3)
        self.conv3 = nn.Conv2d(3, 4, 1)
        self.bn3 = nn.BatchNorm2d(4, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z0 = self.bn0(x)
        z2 = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.bn3(z2 + self.conv3(z0))


BNS = ("bn0", "bn1", "bn2", "bn3")  # graph order


class Branchy(nn.Module):
    """A BN on a branch the data never takes."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.spare = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spare(x) if x.shape[0] > 1000 else self.bn(x)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c) * 0.5 + 0.3)
                m.running_var.copy_(torch.rand(c) * 2 + 0.5)
                m.weight.copy_(torch.rand(c) + 0.5)
                m.bias.copy_(torch.randn(c) * 0.2 + 0.1)
    return net.eval()


def to_onnx(
    net: Net,
    path: Path,
    *,
    training: set[str] = frozenset(),
    external: bool = False,  # type: ignore[assignment]
    dtype: Any = np.float32,
    opset: int = OPSET,
) -> None:
    """Write ``net`` as an ONNX graph, node for node (the BNs as BatchNormalization, not folded)."""
    inits: list[Any] = []
    nodes: list[Any] = []

    def t(name: str, v: torch.Tensor) -> str:
        inits.append(numpy_helper.from_array(v.detach().numpy().astype(dtype), name))
        return name

    def bn(name: str, x: str, y: str) -> None:
        m = getattr(net, name)
        ins = [
            x,
            t(f"{name}.w", m.weight),
            t(f"{name}.b", m.bias),
            t(f"{name}.mean", m.running_mean),
            t(f"{name}.var", m.running_var),
        ]
        attrs: dict[str, Any] = {"epsilon": m.eps}
        outs = [y]
        if name in training:  # what exporters write: running-statistics outputs nothing reads
            attrs["training_mode"] = 1
            outs += [f"{name}.running_mean", f"{name}.running_var"]
        nodes.append(helper.make_node("BatchNormalization", ins, outs, name=name, **attrs))

    def conv(name: str, x: str, y: str) -> None:
        m = getattr(net, name)
        ins = [x, t(f"{name}.w", m.weight)] + ([t(f"{name}.b", m.bias)] if m.bias is not None else [])
        p = m.padding[0]
        nodes.append(helper.make_node("Conv", ins, [y], name=name, pads=[p] * 4))

    bn("bn0", "x", "z0")
    conv("conv1", "x", "c1")
    bn("bn1", "c1", "z1")
    nodes.append(helper.make_node("Relu", ["z1"], ["r1"], name="relu"))
    conv("conv2", "r1", "c2")
    bn("bn2", "c2", "z2")
    conv("conv3", "z0", "c3")
    nodes.append(helper.make_node("Add", ["z2", "c3"], ["s"], name="add"))
    bn("bn3", "s", "y")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", elem, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", elem, ["N", 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save_model(model, str(path))


def batches(n: int = 4, size: int = 5, seed: int = 1, shift: float = 0.7) -> list[np.ndarray]:
    """Data unlike the source statistics (shifted, scaled), batches that differ from each other."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((size, 3, 6, 6)) * (1.5 + 0.3 * i) + shift + 0.2 * i).astype(np.float32)
        for i in range(n)
    ]


def oracle(net: Net, data: list[np.ndarray], *, pooled: bool, prior: float | None = None) -> dict[str, Any]:
    """New (mean, var) per BN, float64: BN by BN in graph order, each seeing the new ones before it."""
    ref = make_net()
    ref.load_state_dict(net.state_dict())
    ref = ref.double().eval()
    out: dict[str, Any] = {}
    for name in BNS:
        m = getattr(ref, name)
        seen: list[np.ndarray] = []
        h = m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().numpy().copy()))
        with torch.no_grad():
            for b in data:
                ref(torch.from_numpy(b.astype(np.float64)))
        h.remove()
        flat = [s.transpose(1, 0, 2, 3).reshape(s.shape[1], -1) for s in seen]  # (C, values)
        if pooled:
            allv = np.concatenate(flat, axis=1)
            mean, var = allv.mean(axis=1), allv.var(axis=1, ddof=1)
        else:
            mean = np.mean([f.mean(axis=1) for f in flat], axis=0)
            var = np.mean([f.var(axis=1, ddof=1) for f in flat], axis=0)
        if prior:
            # the source statistics as `prior` samples of the same size as the data's: two pooled groups
            k_t = sum(f.shape[1] for f in flat)
            k_s = prior * k_t / sum(s.shape[0] for s in seen)
            ms, vs = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
            tot = k_s + k_t
            m2 = vs * (k_s - 1) + var * (k_t - 1) + (ms - mean) ** 2 * k_s * k_t / tot
            mean, var = (k_s * ms + k_t * mean) / tot, m2 / (tot - 1)
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(mean))
            m.running_var.copy_(torch.from_numpy(var))
        out[name] = (mean, var)
    return out


def stats_of(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    m = onnx.load(str(path))
    arr = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    return {n: (arr[f"{n}.mean"], arr[f"{n}.var"]) for n in BNS}


def write_npz(
    path: Path,
    data: list[np.ndarray],
    *,
    numbered: bool = False,
    compressed: bool = False,
    fortran: bool = False,
) -> None:
    arrays = {f"x__{i}": b for i, b in enumerate(data)} if numbered else {"x": np.concatenate(data)}
    if fortran:  # column-major on disk: rows are not contiguous
        arrays = {k: np.asfortranarray(v) for k, v in arrays.items()}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)  # type: ignore[operator]


def recal(*args: Any) -> Any:
    return runner.invoke(app, ["recalibrate", *[str(a) for a in args]])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ ONNX
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("layout", ["split", "numbered", "compressed", "fortran", "numbered-fortran"])
def test_onnx_equals_float64_oracle(tmp_path: Path, pooled: bool, layout: str) -> None:
    net = make_net()
    src, out, data = tmp_path / "m.onnx", tmp_path / "r.onnx", tmp_path / "d.npz"
    to_onnx(net, src)
    dat = batches()
    numbered = layout.startswith("numbered")
    write_npz(data, dat, numbered=numbered, compressed=layout == "compressed", fortran="fortran" in layout)
    before = src.read_bytes()
    extra = [] if numbered else ["--batch-size", 5]
    r = recal(src, out, "--data", data, *extra, *(["--pooled"] if pooled else []), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["command"] == "recalibrate" and doc["batches"] == 4 and doc["samples"] == 20
    assert doc["passes"] == 3  # depths 0 (bn0, bn1), 1 (bn2), 2 (bn3)
    assert [b["depth"] for b in doc["bns"]] == [0, 0, 1, 2]
    expect = oracle(net, dat, pooled=pooled)
    got = stats_of(out)
    for name in BNS:
        np.testing.assert_allclose(got[name][0], expect[name][0], rtol=RTOL, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got[name][1], expect[name][1], rtol=RTOL, atol=ATOL, err_msg=name)
        assert got[name][0].dtype == np.float32
    # the statistics moved (the data is shifted), and the report says how far
    assert all(b["mean_shift"] > 0.05 for b in doc["bns"])
    assert src.read_bytes() == before
    # nothing else changed: every other initializer byte-identical, the same nodes
    a, b = onnx.load(str(src)), onnx.load(str(out))
    other = {
        t.name: t.SerializeToString() for t in a.graph.initializer if not t.name.endswith((".mean", ".var"))
    }
    assert other == {t.name: t.SerializeToString() for t in b.graph.initializer if t.name in other}
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    onnx.checker.check_model(b, full_check=True)


def test_onnx_prior_equals_oracle_and_pooled_union(tmp_path: Path) -> None:
    net = make_net()
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    to_onnx(net, src)
    dat = batches(3)
    write_npz(data, dat)
    for pooled in (False, True):
        out = tmp_path / f"p{pooled}.onnx"
        r = recal(
            src, out, "--data", data, "--batch-size", 5, "--prior", 7, *(["--pooled"] if pooled else [])
        )
        assert r.exit_code == 0, r.output
        expect, got = oracle(net, dat, pooled=pooled, prior=7), stats_of(out)
        for name in BNS:
            np.testing.assert_allclose(got[name][0], expect[name][0], rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(got[name][1], expect[name][1], rtol=RTOL, atol=ATOL)


def test_prior_on_pooled_source_equals_pooled_over_both(tmp_path: Path) -> None:
    """The documented property, checked without any formula: pooled over S, then prior=|S| pooled over T
    gives the pooled statistics of S and T together (depth-0 BNs: their inputs do not depend on other BNs)."""
    net = make_net()
    src = tmp_path / "m.onnx"
    to_onnx(net, src)
    s_data, t_data = batches(2, seed=3, shift=0.2), batches(3, seed=4, shift=1.1)
    np.savez(tmp_path / "s.npz", x=np.concatenate(s_data))
    np.savez(tmp_path / "t.npz", x=np.concatenate(t_data))
    np.savez(tmp_path / "st.npz", x=np.concatenate(s_data + t_data))
    assert recal(src, tmp_path / "s.onnx", "--data", tmp_path / "s.npz", "--pooled").exit_code == 0
    r = recal(
        tmp_path / "s.onnx",
        tmp_path / "st_prior.onnx",
        "--data",
        tmp_path / "t.npz",
        "--pooled",
        "--prior",
        10,
        "--batch-size",
        5,
    )
    assert r.exit_code == 0, r.output
    assert recal(src, tmp_path / "st.onnx", "--data", tmp_path / "st.npz", "--pooled").exit_code == 0
    a, b = stats_of(tmp_path / "st_prior.onnx"), stats_of(tmp_path / "st.onnx")
    for name in ("bn0", "bn1"):
        np.testing.assert_allclose(a[name][0], b[name][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[name][1], b[name][1], rtol=1e-5, atol=1e-6)


def test_external_data_and_training_mode(tmp_path: Path) -> None:
    net = make_net()
    folder = tmp_path / "in"
    folder.mkdir()
    src = folder / "m.onnx"
    to_onnx(net, src, external=True, training={"bn1", "bn3"})
    before = snapshot(folder)
    dat = batches()
    write_npz(tmp_path / "d.npz", dat)
    out = tmp_path / "out" / "r.onnx"
    out.parent.mkdir()
    r = recal(src, out, "--data", tmp_path / "d.npz", "--batch-size", 5, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [b["training_mode_cleared"] for b in doc["bns"]] == [False, True, False, True]
    assert snapshot(folder) == before
    # the model (and a data file for tensors of 1 KiB or more: none here), no temporary
    assert [p.name for p in out.parent.iterdir() if not p.name.startswith("r.onnx.")] == ["r.onnx"]
    expect, got = oracle(net, dat, pooled=False), stats_of(out)
    for name in BNS:
        np.testing.assert_allclose(got[name][0], expect[name][0], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got[name][1], expect[name][1], rtol=RTOL, atol=ATOL)
    m = onnx.load(str(out))
    assert all(a.name != "training_mode" for n in m.graph.node for a in n.attribute)
    # the written model runs, as an inference model, the torch module with the new statistics
    ref = make_net()
    for name, (mean, var) in expect.items():
        getattr(ref, name).running_mean.copy_(torch.from_numpy(mean))
        getattr(ref, name).running_var.copy_(torch.from_numpy(var))
    x = dat[0]
    y = run_onnx(out, {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(y, ref(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


def test_fold_in_the_same_run(tmp_path: Path) -> None:
    net = make_net()
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    to_onnx(net, src)
    write_npz(data, batches())
    r = recal(src, tmp_path / "r.onnx", "--data", data)
    assert r.exit_code == 0, r.output
    r = recal(src, tmp_path / "f.onnx", "--data", data, "--fold", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["fold"]["verified"] is True and doc["fold"]["bn_after"] < doc["fold"]["bn_before"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "f.onnx", "m.onnx", "r.onnx"]
    x = batches(1, seed=9)[0]
    ya = run_onnx(tmp_path / "r.onnx", {"x": x})[0]
    yb = run_onnx(tmp_path / "f.onnx", {"x": x})[0]
    np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- bad input
def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[Any], str]]:
    good = np.concatenate(batches(2))
    cases: dict[str, tuple[dict[str, Any] | None, list[Any], str]] = {
        "wrong name": ({"img": good}, [], "'img' is not an input of the model"),
        "extra input": ({"x__0": good[:5], "y__0": good[:5]}, [], "'y' is not an input of the model"),
        "wrong dtype": ({"x": good.astype(np.int64)}, [], "dtype int64"),
        "wrong rank": ({"x": good[:, 0]}, [], "rank 3"),
        "wrong shape": ({"x": good[:, :2]}, [], "dimension 1 is 2"),
        "nan": (
            {"x": np.where(np.arange(good.size).reshape(good.shape) == 700, np.nan, good)},
            ["--batch-size", 5],
            "NaN or inf in batch 1",
        ),  # sample 6 of batches of 5
        "empty archive": ({}, [], "holds no array"),
        "no sample": ({"x": good[:0]}, [], "holds no sample"),
        "gap": ({"x__0": good[:5], "x__2": good[5:]}, [], "no gap"),
        "batch size with numbered": ({"x__0": good[:5]}, ["--batch-size", 2], "--batch-size applies only"),
        "bad batch size": ({"x": good}, ["--batch-size", 0], "--batch-size must be a positive integer"),
        "bad prior": ({"x": good}, ["--prior", -1], "--prior must be a finite number"),
        "not npz": (None, [], "not a NumPy .npz archive"),
    }
    out: dict[str, tuple[list[Any], str]] = {}
    for i, (name, (arrays, flags, msg)) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.npz"
        if arrays is None:
            p.write_bytes(b"not a zip")
        else:
            np.savez(p, **arrays)
        out[name] = (["--data", p, *flags], msg)
    return out


def test_bad_data_is_one_line_exit_2_nothing_written(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    to_onnx(make_net(), src)
    cases = _bad_cases(tmp_path)
    cases["missing data file"] = (["--data", tmp_path / "nope.npz"], "no such file")
    cases["no --data"] = ([], "missing --data")
    before = snapshot(tmp_path)
    for name, (flags, msg) in cases.items():
        out = tmp_path / "out.onnx"
        r = recal(src, out, *flags)
        assert r.exit_code == 2, (name, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and msg in lines[0], (name, lines)
        assert "Traceback" not in r.output
        assert snapshot(tmp_path) == before, name


def test_bn_that_never_runs(tmp_path: Path) -> None:
    """A BN whose input is empty in every batch (a Slice that keeps nothing)."""

    def c(name: str, v: Any, dt: Any = np.float32) -> Any:
        return numpy_helper.from_array(np.asarray(v, dtype=dt), name)

    nodes = [
        helper.make_node("Slice", ["x", "st", "en", "ax"], ["e"]),
        helper.make_node("BatchNormalization", ["e", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [
            c("st", [2], np.int64),
            c("en", [2], np.int64),
            c("ax", [2], np.int64),
            c("g", [1.5, 0.5, 2]),
            c("b", [0.1, -0.2, 0.3]),
            c("m", [0.3, 0.1, -0.2]),
            c("v", [2.0, 0.7, 1.3]),
        ],
    )
    onnx.save_model(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)]), str(tmp_path / "m.onnx")
    )
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3, 4, 4), np.float32))
    r = recal(tmp_path / "m.onnx", tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert r.exit_code == 2 and "bn: its input is empty in every batch" in r.stderr, r.output
    assert not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------------------- PyTorch
def test_checkpoint_matches_bnfold_recalibrate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "recal_factory.py").write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_recalibrate_files import Branchy, Net

        def net():
            return Net()

        def branchy():
            return Branchy()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    net = make_net()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), ckpt)
    dat = batches()
    write_npz(tmp_path / "d.npz", dat)
    before = ckpt.read_bytes()
    for flags in ([], ["--pooled", "--prior", "4"]):
        out = tmp_path / "r.pt"
        r = recal(
            ckpt,
            out,
            "--data",
            tmp_path / "d.npz",
            "--model",
            "recal_factory:net",
            "--batch-size",
            5,
            *flags,
            "--json",
        )
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.stdout)["bns"]) == 4
        want = bnfold.recalibrate(
            make_net(),
            [torch.from_numpy(b) for b in dat],
            pooled="--pooled" in flags,
            prior=4 if flags else None,
        )
        got = torch.load(out, weights_only=True)
        for k, v in want.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert ckpt.read_bytes() == before
    # a wrong name is one line
    np.savez(tmp_path / "bad.npz", img=np.concatenate(dat))
    r = recal(ckpt, tmp_path / "b.pt", "--data", tmp_path / "bad.npz", "--model", "recal_factory:net")
    assert r.exit_code == 2 and "'img' is not an argument of Net.forward" in r.stderr, r.output
    assert not (tmp_path / "b.pt").exists()
    # a BN the data never reaches is one line too
    torch.save(Branchy().state_dict(), tmp_path / "branchy.pt")
    r = recal(
        tmp_path / "branchy.pt",
        tmp_path / "b.pt",
        "--data",
        tmp_path / "d.npz",
        "--model",
        "recal_factory:branchy",
    )
    assert r.exit_code == 2 and "spare: no batch reached this BatchNorm" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.pt").exists()


def test_upstream_batch_equals_bnfold_recalibrate_on_the_torch_model(tmp_path: Path) -> None:
    """--upstream batch is PyTorch's train-mode pass: the ONNX file gets what bnfold.recalibrate gives the module."""
    net = make_net()
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    to_onnx(net, src, training={"bn2"})
    dat = batches()
    write_npz(data, dat)
    for flags in ([], ["--pooled", "--prior", "6"]):
        out = tmp_path / f"r{len(flags)}.onnx"
        r = recal(src, out, "--data", data, "--batch-size", 5, "--upstream", "batch", *flags, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["passes"] == 1
        want = bnfold.recalibrate(
            make_net().double(),
            [torch.from_numpy(b.astype(np.float64)) for b in dat],
            pooled=bool(flags),
            prior=6 if flags else None,
        )
        got = stats_of(out)
        for name in BNS:
            m = getattr(want, name)
            np.testing.assert_allclose(
                got[name][0], m.running_mean.numpy(), rtol=RTOL, atol=ATOL, err_msg=name
            )
            np.testing.assert_allclose(
                got[name][1], m.running_var.numpy(), rtol=RTOL, atol=ATOL, err_msg=name
            )
    # the default definition differs on this model (small batches): the option is not a no-op
    r = recal(src, tmp_path / "n.onnx", "--data", data, "--batch-size", 5)
    assert r.exit_code == 0, r.output
    assert not np.allclose(stats_of(tmp_path / "n.onnx")["bn3"][1], stats_of(tmp_path / "r0.onnx")["bn3"][1])


def test_json_documents_follow_the_schema(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(
        resources.files("bnfold").joinpath("schemas/report-v1.json").read_text(encoding="utf-8")
    )
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    to_onnx(make_net(), src)
    write_npz(data, batches(2))
    ok = recal(src, tmp_path / "r.onnx", "--data", data, "--json")
    np.savez(tmp_path / "bad.npz", img=np.ones((2, 3, 6, 6), np.float32))
    bad = recal(src, tmp_path / "b.onnx", "--data", tmp_path / "bad.npz", "--json")
    for r, code in ((ok, 0), (bad, 2)):
        assert r.exit_code == code, r.output
        doc = json.loads(r.stdout)
        jsonschema.validate(doc, schema)
        assert doc["command"] == "recalibrate" and doc["exit_code"] == code
    assert json.loads(bad.stdout)["error"]["type"] == "InputError"


def test_batches_stream_memory_independent_of_data_size(tmp_path: Path) -> None:
    """Iterating 10x the data peaks at the same memory as 1x (one batch at a time, compressed too)."""
    import tracemalloc

    from bnfold.files.recalibrate import NpzBatches
    from bnfold.verification.inputs import InputSpec

    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3, 32, 32))]
    rng = np.random.default_rng(0)
    peaks = []
    for n, compressed in ((64, False), (640, False), (64, True), (640, True)):
        p = tmp_path / f"d{n}{compressed}.npz"
        (np.savez_compressed if compressed else np.savez)(
            p, x=rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
        )
        stream = NpzBatches(p, spec, 16)
        assert len(stream) == n // 16
        tracemalloc.start()
        rows = sum(b["x"].shape[0] for b in stream())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert rows == n
    one_batch = 16 * 3 * 32 * 32 * 4  # the data is 4 or 40 batches
    assert peaks[1] < 1.1 * peaks[0] and peaks[3] < 1.1 * peaks[2], peaks  # flat from 1x to 10x
    assert max(peaks) < 6 * one_batch, (peaks, one_batch)


@pytest.mark.parametrize(
    "case", ["shared statistics", "statistics from a graph input", "running outputs read"]
)
def test_statistics_that_cannot_be_replaced_are_refused(tmp_path: Path, case: str) -> None:
    def c(name: str, v: Any) -> Any:
        return numpy_helper.from_array(np.asarray(v, dtype=np.float32), name)

    stats = [
        c("g", [1.5, 0.5, 2]),
        c("b", [0.1, -0.2, 0.3]),
        c("m", [0.3, 0.1, -0.2]),
        c("v", [2.0, 0.7, 1.3]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])]
    if case == "shared statistics":
        nodes = [
            helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["h"], name="bn_a"),
            helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn_b"),
        ]
        want = "bn_a: its mean 'm' is also read elsewhere"
    elif case == "statistics from a graph input":
        nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "vin"], ["y"], name="bn")]
        inputs.append(helper.make_tensor_value_info("vin", TensorProto.FLOAT, [3]))
        want = "bn: its variance 'vin' is not an initializer"
    else:
        nodes = [
            helper.make_node(
                "BatchNormalization", ["x", "g", "b", "m", "v"], ["y", "rm", "rv"], name="bn", training_mode=1
            )
        ]
        outputs.append(helper.make_tensor_value_info("rm", TensorProto.FLOAT, [3]))
        want = "bn: a training-mode BatchNormalization whose running-statistics outputs are used"
    g = helper.make_graph(nodes, "g", inputs, outputs, stats)
    onnx.save_model(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)]), str(tmp_path / "m.onnx")
    )
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3, 4, 4), np.float32), vin=np.ones((4, 3), np.float32))
    before = snapshot(tmp_path)
    r = recal(tmp_path / "m.onnx", tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert r.exit_code == 2 and want in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_float16_model_statistics_in_float16(tmp_path: Path) -> None:
    """float32 data for a float16 input is cast; the statistics are written as float16."""
    rng = np.random.default_rng(5)

    def c(name: str, v: Any) -> Any:
        return numpy_helper.from_array(np.asarray(v, dtype=np.float16), name)

    nodes = [
        helper.make_node(
            "BatchNormalization", ["x", "g0", "b0", "m0", "v0"], ["h"], name="bn0", epsilon=1e-3
        ),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node(
            "BatchNormalization", ["r", "g1", "b1", "m1", "v1"], ["y"], name="bn1", epsilon=1e-3
        ),
    ]
    g0, b0, m0, v0 = [1.5, 0.5, 2.0], [0.1, -0.2, 0.3], [0.3, 0.1, -0.2], [2.0, 0.7, 1.3]
    inits = [
        c("g0", g0),
        c("b0", b0),
        c("m0", m0),
        c("v0", v0),
        c("g1", [0.7, 1.2, 0.9]),
        c("b1", [0.0, 0.2, -0.1]),
        c("m1", [0.5, 0.4, 0.6]),
        c("v1", [0.8, 1.1, 0.6]),
    ]
    f16 = TensorProto.FLOAT16
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", f16, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", f16, ["N", 3, 4, 4])],
        inits,
    )
    onnx.save_model(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)]), str(tmp_path / "m.onnx")
    )
    x = (rng.standard_normal((12, 3, 4, 4)) * 2 + 1).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    r = recal(
        tmp_path / "m.onnx", tmp_path / "r.onnx", "--data", tmp_path / "d.npz", "--batch-size", 4, "--pooled"
    )
    assert r.exit_code == 0, r.output
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "r.onnx")).graph.initializer}
    assert got["m0"].dtype == np.float16 and got["v1"].dtype == np.float16
    xs = x.astype(np.float16).astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    mean0, var0 = xs.mean(axis=1), xs.var(axis=1, ddof=1)
    np.testing.assert_allclose(got["m0"], mean0, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got["v0"], var0, rtol=1e-3)
    h = (xs - mean0[:, None]) / np.sqrt(var0[:, None] + 1e-3) * np.array(g0)[:, None] + np.array(b0)[:, None]
    rr = np.maximum(h, 0)
    np.testing.assert_allclose(got["m1"], rr.mean(axis=1), rtol=3e-3, atol=3e-3)
    np.testing.assert_allclose(got["v1"], rr.var(axis=1, ddof=1), rtol=3e-3, atol=3e-3)


def test_human_output_progress_and_in_place(tmp_path: Path) -> None:
    from bnfold.files.recalibrate import RecalibrateSettings, recalibrate_file

    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    to_onnx(make_net(), src)
    write_npz(data, batches())
    r = recal(src, tmp_path / "r.onnx", "--data", data, "--batch-size", 5, "-v")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # rich wraps long lines
    assert "4 BatchNorm recalibrated on 20 samples in 4 batches" in text
    assert all(f" {n}: mean moved up to" in text for n in BNS)
    seen: list[tuple[str, int, int]] = []
    recalibrate_file(
        src,
        tmp_path / "p.onnx",
        RecalibrateSettings(data=data, batch_size=5),
        lambda stage, done, total: seen.append((stage, done, total)),
    )
    ticks = [(d, t) for s, d, t in seen if s == "recalibrate"]
    assert ticks == [(i, 12) for i in range(1, 13)]  # 3 passes x 4 batches, the total known from the start
    expect = stats_of(tmp_path / "r.onnx")
    r = recal(src, src, "--data", data, "--batch-size", 5, "--in-place")
    assert r.exit_code == 0, r.output
    for n in BNS:
        np.testing.assert_array_equal(stats_of(src)[n][0], expect[n][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx", "p.onnx", "r.onnx"]
    r = recal(src, src, "--data", data)
    assert r.exit_code == 2 and "--in-place" in r.stderr


def test_pass_model_spilled_to_disk_past_the_protobuf_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past SPILL_BYTES each pass model goes through a temporary folder (external data): same statistics."""
    import bnfold.onnx.recalibrate as rec

    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    to_onnx(make_net(), src)
    write_npz(data, batches())
    assert recal(src, tmp_path / "a.onnx", "--data", data, "--batch-size", 5).exit_code == 0
    monkeypatch.setattr(rec, "SPILL_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    r = recal(src, tmp_path / "b.onnx", "--data", data, "--batch-size", 5)
    assert r.exit_code == 0, r.output
    a, b = stats_of(tmp_path / "a.onnx"), stats_of(tmp_path / "b.onnx")
    for n in BNS:
        np.testing.assert_array_equal(a[n][0], b[n][0])
        np.testing.assert_array_equal(a[n][1], b[n][1])
    assert list((tmp_path / "tmp").iterdir()) == []  # the pass folders are gone


def test_pt2_matches_bnfold_recalibrate(tmp_path: Path) -> None:
    net = make_net()
    src = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (torch.from_numpy(batches(1)[0]),)), str(src))
    dat = batches()
    write_npz(tmp_path / "d.npz", dat)
    before = src.read_bytes()
    for flags in ([], ["--pooled", "--prior", "4"]):
        out = tmp_path / f"r{len(flags)}.pt2"
        r = recal(src, out, "--data", tmp_path / "d.npz", "--batch-size", 5, *flags, "--json")
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.stdout)["bns"]) == 4
        want = bnfold.recalibrate(
            make_net(), [torch.from_numpy(b) for b in dat], pooled=bool(flags), prior=4 if flags else None
        )
        ep = torch.export.load(str(out))
        for k, v in want.state_dict().items():
            torch.testing.assert_close(
                ep.state_dict[k], v, rtol=2e-5, atol=2e-6, msg=lambda m, k=k: f"{k}: {m}"
            )
        x = torch.from_numpy(batches(1, seed=8)[0])
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), want.eval()(x), rtol=1e-4, atol=1e-4)
    assert src.read_bytes() == before
    r = recal(src, tmp_path / "n.pt2", "--data", tmp_path / "d.npz", "--upstream", "new")
    assert r.exit_code == 2 and "--upstream new applies to ONNX models" in r.stderr
    assert not (tmp_path / "n.pt2").exists()


def test_old_opset_and_the_python_api(tmp_path: Path) -> None:
    """Opset 9: the default definition works, --upstream batch (training_mode needs opset 14) is refused;
    recalibrate_model takes a list of batches and equals the command."""
    from bnfold.onnx.recalibrate import recalibrate_model

    net = make_net()
    src, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    to_onnx(net, src, opset=9)
    dat = batches()
    write_npz(data, dat)
    r = recal(src, tmp_path / "r.onnx", "--data", data, "--batch-size", 5)
    assert r.exit_code == 0, r.output
    expect, got = oracle(net, dat, pooled=False), stats_of(tmp_path / "r.onnx")
    for name in BNS:
        np.testing.assert_allclose(got[name][1], expect[name][1], rtol=RTOL, atol=ATOL)
    r = recal(src, tmp_path / "b.onnx", "--data", data, "--upstream", "batch")
    assert r.exit_code == 2 and "needs opset 14 or later (the model has opset 9)" in r.stderr, r.output
    model = onnx.load(str(src))
    result = recalibrate_model(model, [{"x": b} for b in dat])
    assert result.passes == 3 and result.batches == 4
    arr = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in BNS:
        np.testing.assert_array_equal(arr[f"{name}.var"], got[name][1])
    with pytest.raises(bnfold.errors.OptionError, match="a generator is used up"):
        recalibrate_model(onnx.load(str(src)), ({"x": b} for b in dat))
