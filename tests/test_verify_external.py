"""Verification of ONNX models whose weights live in external data, and of models over 2 GiB.

onnxruntime gets a file path with external data, never one serialised blob of the whole model
(protobuf refuses messages over 2 GiB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from typer.testing import CliRunner

import bnfold.io as bio
from bnfold.cli import app
from bnfold.onnx import fold_model
from bnfold.verification import sources, verify
from tests.test_verify_culprit import _branches

runner = CliRunner()


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )


def test_model_with_external_data_on_disk_folds_and_verifies(tmp_path: Path) -> None:
    src = tmp_path / "ext.onnx"
    _save_external(_branches(), src)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 1000
    assert all(
        t.data_location == T.EXTERNAL for t in onnx.load(str(src), load_external_data=False).graph.initializer
    )
    folded, rep = fold_model(onnx.load(str(src)))
    assert rep.folded == 3
    assert verify(str(src), folded).passed
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert verify(str(src), str(out)).passed


def _wide(c: int = 256, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> BN -> y with 256 channels: every tensor (per-channel ones too) is 1 KiB or more."""
    rng = np.random.default_rng(seed)
    inits = [
        nh.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "W"),
        nh.from_array(rng.standard_normal(c).astype(np.float32), "B"),
        nh.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "g"),
        nh.from_array(rng.uniform(-0.5, 0.5, c).astype(np.float32), "b"),
        nh.from_array(rng.uniform(-0.8, 0.8, c).astype(np.float32), "m"),
        nh.from_array(rng.uniform(0.3, 2.5, c).astype(np.float32), "v"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    g = h.make_graph(
        nodes,
        "wide",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", c, 8, 8])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_a_large_proto_goes_to_onnxruntime_as_a_file_with_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the size limit the candidate is written tensor by tensor (never serialised whole)."""
    ref = _wide()
    folded, _ = fold_model(ref)
    before = folded.SerializeToString()
    written: list[tuple[int, int]] = []
    original = sources._write_with_external_data

    def spy(model: onnx.ModelProto, folder: str) -> str:
        path = original(model, folder)
        on_disk = onnx.load(path, load_external_data=False)
        inline = sum(len(t.raw_data) for t in on_disk.graph.initializer)
        data = [f for f in os.listdir(folder) if f.endswith(".data")]
        written.append((inline, sum(os.path.getsize(os.path.join(folder, f)) for f in data)))
        return path

    monkeypatch.setattr(sources, "_FILE_ABOVE_BYTES", 1)  # every proto counts as large
    monkeypatch.setattr(sources, "_write_with_external_data", spy)
    rep = verify(ref, folded)
    assert rep.passed
    weights = sum(len(t.raw_data) for t in folded.graph.initializer)
    assert len(written) == 2  # reference and candidate
    inline_bytes, data_bytes = written[1]
    assert data_bytes == weights and inline_bytes == 0  # every weight went to the data file
    assert folded.SerializeToString() == before  # the model got its bytes back
    # the data really is read from the file: a wrong weight is caught on this path too
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    a = nh.to_array(bad.graph.initializer[0]).copy()
    a.flat[0] *= 1.01
    bad.graph.initializer[0].CopyFrom(nh.from_array(a, bad.graph.initializer[0].name))
    assert not verify(ref, bad).passed


def test_a_candidate_file_with_external_data_is_verified_as_it_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path goes to onnxruntime as it is: not parsed, not serialised again; its data file is what is checked."""
    ref = _wide()
    folded, rep = fold_model(ref)
    assert rep.folded == 1
    weights = sum(len(t.raw_data) for t in folded.graph.initializer)
    cand = tmp_path / "staged.onnx"
    _save_external(folded, cand)
    data = tmp_path / "staged.onnx.data"
    assert data.stat().st_size == weights  # every weight lives in the data file

    from bnfold.verification.isolation import OrtWorker

    sources_seen: list[object] = []
    real_load = OrtWorker.load

    def session(self: OrtWorker, source: object, *a: object, **k: object) -> object:
        sources_seen.append(source)  # what the onnxruntime worker is asked to load
        return real_load(self, source, *a, **k)  # type: ignore[arg-type]

    def no_parse(*a: object, **k: object) -> None:
        raise AssertionError("the candidate file was parsed or loaded by bnfold")

    monkeypatch.setattr(OrtWorker, "load", session)
    for name in ("load", "load_model", "load_model_from_string"):
        monkeypatch.setattr(onnx, name, no_parse)
    monkeypatch.setattr(bio, "detect_format", no_parse)
    monkeypatch.setattr(bio, "load", no_parse)
    report = verify(ref, str(cand))
    assert report.passed and report.runtimes[1].runtime == "onnxruntime"
    assert sources_seen[1] == str(cand)  # the candidate's session reads the file itself
    assert isinstance(sources_seen[0], bytes)  # the in-memory reference went as bytes

    # the bytes on disk are what is verified: one changed weight in the data file fails
    raw = bytearray(data.read_bytes())
    w = np.frombuffer(raw, np.float32, count=1, offset=0).copy() * np.float32(1.01)
    raw[0:4] = w.tobytes()
    data.write_bytes(bytes(raw))
    assert not verify(ref, cand).passed


@pytest.mark.slow
def test_model_over_2gib_verifies(tmp_path: Path) -> None:
    """A 2.1 GiB embedding table (a sparse file on disk) next to a Conv+BN: fold and verify."""
    rows, dim = 2**19 + 2**14, 1024  # 2.21e9 bytes of float32: over 2 GiB
    rng = np.random.default_rng(0)
    data = tmp_path / "big.onnx.data"
    nbytes = rows * dim * 4
    with open(data, "wb") as f:
        f.truncate(nbytes)  # sparse: reads as zeros, takes no disk space
    table = onnx.TensorProto(name="table", data_type=T.FLOAT, dims=[rows, dim])
    table.data_location = T.EXTERNAL
    for k, v in (("location", data.name), ("offset", "0"), ("length", str(nbytes))):
        e = table.external_data.add()
        e.key, e.value = k, v
    small = [
        nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        nh.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
        nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "b"),
        nh.from_array(rng.uniform(-0.8, 0.8, 4).astype(np.float32), "m"),
        nh.from_array(rng.uniform(0.3, 2.5, 4).astype(np.float32), "v"),
        nh.from_array(np.array([3, 7], np.int64), "idx"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
        h.make_node("Gather", ["table", "idx"], ["e"]),
    ]
    g = h.make_graph(
        nodes,
        "big",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
        [
            h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8]),
            h.make_tensor_value_info("e", T.FLOAT, [2, dim]),
        ],
        [*small, table],
    )
    src = tmp_path / "big.onnx"
    src.write_bytes(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8).SerializeToString())
    model = onnx.load(str(src))  # loads the 2 GiB table into the proto
    assert sources._weight_bytes(model) > 2**31
    folded, rep = fold_model(model, inplace=True)
    assert rep.folded == 1
    report = verify(str(src), folded)
    assert report.passed and {c.name for c in report.checks} == {"y", "e"}
