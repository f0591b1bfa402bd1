"""One external-data walker: files_read_by (safety) and io.datafiles (sizes, orphans) see every tensor."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold import io as bio
from bnfold.errors import OutputError
from bnfold.io import datafiles
from bnfold.io import datafiles as _datafiles
from models.testing import run_onnx

_RNG = np.random.default_rng(3)


def _nested_model() -> onnx.ModelProto:
    """Main graph: W (initializer) and a Constant C (attribute tensor); an If whose branches hold
    their own initializers: tensors outside the main graph's initializers."""
    w = nh.from_array(_RNG.standard_normal((8, 8)).astype(np.float32), "W")
    c = nh.from_array(_RNG.standard_normal((8,)).astype(np.float32), "C_value")
    then_w = nh.from_array(_RNG.standard_normal((8,)).astype(np.float32), "then_w")
    else_w = nh.from_array(_RNG.standard_normal((8,)).astype(np.float32), "else_w")
    then_g = h.make_graph(
        [h.make_node("Add", ["y", "then_w"], ["t"])],
        "then",
        [],
        [h.make_tensor_value_info("t", T.FLOAT, [2, 8])],
        [then_w],
    )
    else_g = h.make_graph(
        [h.make_node("Mul", ["y", "else_w"], ["e"])],
        "else",
        [],
        [h.make_tensor_value_info("e", T.FLOAT, [2, 8])],
        [else_w],
    )
    nodes = [
        h.make_node("Constant", [], ["C"], value=c),
        h.make_node("MatMul", ["x", "W"], ["m"]),
        h.make_node("Add", ["m", "C"], ["y"]),
        h.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g),
    ]
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [2, 8]), h.make_tensor_value_info("cond", T.BOOL, [])],
        [h.make_tensor_value_info("out", T.FLOAT, [2, 8])],
        [w],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _save_per_tensor(model: onnx.ModelProto, path: Path) -> None:
    """onnx's own writer, one data file per tensor (named after it), nested tensors included."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # onnx converts the model it is given
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
        convert_attribute=True,
    )


_FEEDS = {"x": _RNG.standard_normal((2, 8)).astype(np.float32), "cond": np.array(True)}


def test_nested_external_tensors_are_found_by_both_uses(tmp_path: Path) -> None:
    m = _nested_model()
    src = tmp_path / "nested.onnx"
    _save_per_tensor(m, src)
    data = sorted(n for n in os.listdir(tmp_path) if n != "nested.onnx")
    assert data == ["C_value", "W", "else_w", "then_w"]
    # onnxruntime reads each of them: the model runs, and fails once a nested one is gone
    want = run_onnx(m, _FEEDS)[0]
    np.testing.assert_allclose(run_onnx(str(src), _FEEDS)[0], want, rtol=0, atol=0)
    expected = {str(tmp_path / n) for n in data}
    # safety: every file the model reads is protected
    assert set(bio.files_read_by(src)[1:]) == expected
    for name in data:
        with pytest.raises(OutputError, match="input model reads"):
            bio.check_output_path(src, tmp_path / name)
    # the file layer: data files and sizes count the nested ones too
    assert {str(p) for p in _datafiles.onnx_data_files(src)} == expected
    assert _datafiles.model_size(src, "onnx") == sum(
        (tmp_path / n).stat().st_size for n in ["nested.onnx", *data]
    )
    assert bio.file_size_with_data(src) == _datafiles.model_size(src, "onnx")
    os.unlink(tmp_path / "then_w")
    with pytest.raises(Exception, match="then_w"):
        run_onnx(str(src), _FEEDS)


_WIRE_ORDER = ["C_value", "else_w", "then_w", "W"]  # nodes before initializers; attributes by name


def test_the_file_walk_and_the_parsed_walk_agree(tmp_path: Path) -> None:
    src = tmp_path / "nested.onnx"
    _save_per_tensor(_nested_model(), src)
    parsed = onnx.load_model(str(src), load_external_data=False)
    assert datafiles.read_locations(src) == datafiles.model_locations(parsed) == _WIRE_ORDER
    # a cold answer (not remembered from a load) walks the headers and gives the same files
    datafiles._CACHE.clear()
    assert bio.files_read_by(src) == [str(src), *(str(tmp_path / n) for n in _WIRE_ORDER)]


def test_a_sparse_initializer_and_a_function_attribute_count(tmp_path: Path) -> None:
    m = _nested_model()
    values = m.graph.sparse_initializer.add().values
    values.name, values.data_type = "sv", T.FLOAT
    values.dims.append(1)
    fn = m.functions.add()
    fn.name, fn.domain = "f", "local"
    ft = fn.node.add().attribute.add()
    ft.name, ft.type = "value", onnx.AttributeProto.TENSOR
    ft.t.name, ft.t.data_type = "ft", T.FLOAT
    for t, loc in ((values, "sparse.bin"), (ft.t, "fn.bin")):
        t.data_location = T.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", loc
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    assert datafiles.read_locations(src) == datafiles.model_locations(m) == ["sparse.bin", "fn.bin"]
    # two location entries on one tensor: both count (onnx reads the last one, another reader the first)
    e = ft.t.external_data.add()
    e.key, e.value = "location", "fn2.bin"
    src.write_bytes(m.SerializeToString())
    assert (
        datafiles.read_locations(src) == datafiles.model_locations(m) == ["sparse.bin", "fn.bin", "fn2.bin"]
    )
    # a location entry without data_location EXTERNAL is not read by onnx or onnxruntime
    values.data_location = T.DEFAULT
    src.write_bytes(m.SerializeToString())
    assert datafiles.read_locations(src) == ["fn.bin", "fn2.bin"]


def test_files_that_are_not_onnx_read_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.onnx"
    _save_per_tensor(_nested_model(), good)
    cases = {
        "random.onnx": np.random.default_rng(0).bytes(4096),
        "truncated.onnx": good.read_bytes()[: good.stat().st_size // 2],
        "zeros.onnx": bytes(64),
        "zip.pt": b"PK\x03\x04" + bytes(60),
        "pickle.pt": b"\x80\x02" + bytes(60),
        "empty.onnx": b"",
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert bio.files_read_by(p) == [str(p)], name
        assert _datafiles.onnx_data_files(p) == [], name
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    assert bio.files_read_by(fifo) == [str(fifo)]  # refused from fstat, without blocking on open
    assert _datafiles.onnx_data_files(fifo) == []


def _reads_shared(n: int) -> onnx.ModelProto:
    """A model whose only external tensor sits in an If branch and reads ``shared.data`` bytes 0..4n."""
    t = onnx.TensorProto()
    t.name, t.data_type = "k", T.FLOAT
    t.dims.append(n)
    t.data_location = T.EXTERNAL
    for key, value in (("location", "shared.data"), ("offset", "0"), ("length", str(4 * n))):
        e = t.external_data.add()
        e.key, e.value = key, value
    then_g = h.make_graph(
        [h.make_node("Add", ["x", "k"], ["t"])],
        "then",
        [],
        [h.make_tensor_value_info("t", T.FLOAT, [n])],
        [t],
    )
    else_g = h.make_graph(
        [h.make_node("Identity", ["x"], ["e"])], "else", [], [h.make_tensor_value_info("e", T.FLOAT, [n])]
    )
    g = h.make_graph(
        [h.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g)],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [n]), h.make_tensor_value_info("cond", T.BOOL, [])],
        [h.make_tensor_value_info("out", T.FLOAT, [n])],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_in_place_keeps_a_data_file_that_a_sibling_reads_from_a_subgraph(tmp_path: Path) -> None:
    from test_cli import tiny_onnx

    from bnfold.files import FoldSettings, fold_file

    src = tmp_path / "a.onnx"
    onnx.save_model(
        tiny_onnx(out_channels=16),
        str(src),
        save_as_external_data=True,
        location="shared.data",
        size_threshold=0,
    )
    sibling = tmp_path / "b.onnx"
    sibling.write_bytes(_reads_shared(8).SerializeToString())
    feeds = {"x": _RNG.standard_normal(8).astype(np.float32), "cond": np.array(True)}
    want = run_onnx(str(sibling), feeds)[0]
    fold_file(src, src, FoldSettings(in_place=True, verify=False))
    # a.onnx no longer reads shared.data, but b.onnx does (from its If branch): the file stays
    assert str(tmp_path / "shared.data") not in bio.files_read_by(src)
    assert (tmp_path / "shared.data").exists()
    np.testing.assert_array_equal(run_onnx(str(sibling), feeds)[0], want)
    assert (
        sum(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node) == 1
    )  # BN2: after Relu
