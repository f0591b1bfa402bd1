"""bnfold.io: format detection from content, loading with the right trust, atomic saving."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold import io as bio
from bnfold.errors import ModelFormatError, OptionError, OutputError
from models.testing import ort_session


def _onnx_model(big: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    n = 64 if big else 4
    w = nh.from_array(rng.standard_normal((n, 3, 3, 3)).astype(np.float32), "W")
    g = h.make_graph(
        [h.make_node("Conv", ["x", "W"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", n, 6, 6])],
        [w],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_line_naming(e: BaseException, name: str) -> None:
    msg = str(e)
    assert "\n" not in msg and name in msg, msg


# --------------------------------------------------------------------------------------- bad inputs


def _bad_inputs(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(_onnx_model(), good)
    data = good.read_bytes()
    cases = {
        "missing.onnx": None,
        "folder.onnx": "dir",
        "empty.onnx": b"",
        "random.onnx": np.random.default_rng(0).bytes(4096),
        "truncated.onnx": data[: len(data) // 2],
        "notes.onnx": b"this is a text file\nnot a model\n",
        "unknown.bin": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "badzip.pt": b"PK\x03\x04" + b"\x00" * 30,
    }
    # a model that parses but that onnx.checker rejects (an operator that does not exist)
    bad = _onnx_model()
    bad.graph.node[0].op_type = "NoSuchOp"
    onnx.save(bad, tmp_path / "rejected.onnx")
    for name, content in cases.items():
        p = tmp_path / name
        if content == "dir":
            p.mkdir()
        elif content is not None:
            p.write_bytes(content)
    return [*cases, "rejected.onnx"]


def test_every_bad_input_is_a_one_line_format_error(tmp_path) -> None:
    for name in _bad_inputs(tmp_path):
        with pytest.raises(ModelFormatError) as ei:
            bio.load(tmp_path / name)
        _one_line_naming(ei.value, name)
        assert ei.value.exit_code == 2
    with pytest.raises(ModelFormatError, match="rejected by onnx.checker"):
        bio.load(tmp_path / "rejected.onnx")
    for name, what in [
        ("empty.onnx", "empty file"),
        ("missing.onnx", "no such file"),
        ("folder.onnx", "directory"),
        ("notes.onnx", "text file"),
    ]:
        with pytest.raises(ModelFormatError, match=what):
            bio.detect_format(tmp_path / name)


def test_detect_and_load_onnx_does_not_import_torch(tmp_path) -> None:
    p = tmp_path / "m.model"  # content decides, not the extension
    onnx.save(_onnx_model(), p)
    code = (
        "import sys, bnfold.io as io; "
        f"assert io.detect_format({str(p)!r}) == 'onnx'; m = io.load({str(p)!r}); "
        "assert type(m).__name__ == 'ModelProto'; assert 'torch' not in sys.modules"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------ torch formats


def _lenet():
    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    torch.manual_seed(0)
    return randomize_bn(lenet5(), seed=1).eval()


def test_detect_torch_formats(tmp_path) -> None:
    import torch

    net = _lenet()
    x = torch.randn(2, 1, 32, 32)
    torch.save(net.state_dict(), tmp_path / "sd.bin")
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "ckpt.pth")
    torch.save(net, tmp_path / "whole.pt")
    torch.save(net.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(net, tmp_path / "legacy_whole.pt", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.trace(net, x), tmp_path / "ts.pt")
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "prog.pt2")
    expected = {
        "sd.bin": "state_dict",
        "ckpt.pth": "state_dict",
        "whole.pt": "pickled_module",
        "legacy.pt": "state_dict",
        "legacy_whole.pt": "pickled_module",
        "ts.pt": "torchscript",
        "prog.pt2": "pt2",
    }
    for name, fmt in expected.items():
        assert bio.detect_format(tmp_path / name) == fmt, name


def test_state_dict_needs_a_factory_and_loads_with_it(tmp_path) -> None:
    import torch

    net = _lenet()
    p = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, p)
    with pytest.raises(ModelFormatError, match="model_factory=") as ei:  # the Python keyword (bnfold.hints)
        bio.load(p)
    _one_line_naming(ei.value, "ckpt.pth")
    loaded = bio.load(p, model_factory="models.lenet:lenet5")
    assert not loaded.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    # a factory defined in a file of our own, and a mismatching architecture
    (tmp_path / "arch.py").write_text(
        "from torch import nn\ndef small():\n    return nn.Sequential(nn.Conv2d(1, 6, 5))\n"
    )
    with pytest.raises(ModelFormatError, match="unexpected keys") as ei:
        bio.load(p, model_factory=f"{tmp_path / 'arch.py'}:small")
    _one_line_naming(ei.value, "ckpt.pth")
    with pytest.raises(OptionError, match="bad model factory"):
        bio.load(p, model_factory="no_such_module_xyz:f")
    with pytest.raises(OptionError, match="expected module.path:factory"):
        bio.load(p, model_factory="models.lenet")


def test_pickled_module_needs_trust(tmp_path) -> None:
    import torch

    net = _lenet()
    p = tmp_path / "whole.pt"
    torch.save(net, p)
    with pytest.raises(ModelFormatError, match="trust_pickle=True") as ei:
        bio.load(p)
    _one_line_naming(ei.value, "whole.pt")
    assert "arbitrary code" in str(ei.value)
    loaded = bio.load(p, trust_pickle=True)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_pt2_and_torchscript_round_trip(tmp_path) -> None:
    import torch

    net = _lenet()
    x = torch.randn(2, 1, 32, 32)
    ep = torch.export.export(net, (x,))
    bio.save(ep, tmp_path / "p.pt2")
    loaded = bio.load(tmp_path / "p.pt2")
    assert isinstance(loaded, torch.export.ExportedProgram)
    with torch.no_grad():
        assert torch.allclose(loaded.module()(x), net(x))
    bio.save(torch.jit.trace(net, x), tmp_path / "t.pt")
    assert bio.detect_format(tmp_path / "t.pt") == "torchscript"
    bio.save(net, tmp_path / "sd.pt", fmt="state_dict")
    assert bio.detect_format(tmp_path / "sd.pt") == "state_dict"
    bio.save(net, tmp_path / "m.pt")
    assert bio.detect_format(tmp_path / "m.pt") == "pickled_module"
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "p.pt2", "sd.pt", "t.pt"]  # no temporary left


# ---------------------------------------------------------------------------------------- saving


def test_save_onnx_and_input_unchanged(tmp_path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(_onnx_model(), src)
    digest = _sha(src)
    m = bio.load(src)
    bio.save(m, tmp_path / "out.onnx")
    assert _sha(src) == digest
    assert bio.load(tmp_path / "out.onnx") == m
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    m = _onnx_model()
    out = tmp_path / "out.onnx"

    def half_write(model, f, data, location):  # the writer dies half-way through
        f.write(model.SerializeToString()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bio.saver, "write_onnx_stream", half_write)  # where save calls it
    with pytest.raises(OutputError, match="No space left") as ei:
        bio.save(m, out)
    monkeypatch.undo()
    _one_line_naming(ei.value, "out.onnx")
    assert os.listdir(tmp_path) == []
    # an existing output is left whole when the new write fails
    bio.save(m, out)
    digest = _sha(out)
    with pytest.raises(RuntimeError):
        with bio.atomic_path(out) as tmp:
            open(tmp, "wb").write(b"partial")
            raise RuntimeError("interrupted")
    assert _sha(out) == digest and os.listdir(tmp_path) == ["out.onnx"]


def test_external_data_round_trip(tmp_path) -> None:
    m = _onnx_model(big=True)
    out = tmp_path / "ext.onnx"
    bio.save(m, out, external_data=True)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0] == "ext.onnx" and names[1].startswith("ext.onnx.")
    data = tmp_path / names[1]
    assert data.suffix == ".data" and bio.files_read_by(out) == [str(out), str(data)]
    assert os.path.getsize(out) < 2000 < os.path.getsize(data)
    # the model given is not changed by the external-data save
    assert m.graph.initializer[0].HasField("raw_data") or m.graph.initializer[0].float_data
    loaded = bio.load(out)
    assert np.array_equal(nh.to_array(loaded.graph.initializer[0]), nh.to_array(m.graph.initializer[0]))
    # and it still runs: verify against the in-memory model
    from bnfold.verification import verify

    assert verify(m, out).passed
    os.remove(data)
    with pytest.raises(ModelFormatError) as ei:
        bio.load(out)
    _one_line_naming(ei.value, "ext.onnx")


def test_output_errors(tmp_path) -> None:
    m = _onnx_model()
    with pytest.raises(OutputError, match="does not exist") as ei:
        bio.save(m, tmp_path / "nope" / "out.onnx")
    _one_line_naming(ei.value, "out.onnx")
    with pytest.raises(OutputError, match="does not exist"):
        bio.check_output_path(None, tmp_path / "nope" / "out.onnx")
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        bio.save(m, tmp_path / "adir")
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    with pytest.raises(OutputError, match="in_place=True"):
        bio.check_output_path(src, tmp_path / "." / "in.onnx")
    bio.check_output_path(src, src, in_place=True)
    bio.check_output_path(src, tmp_path / "other.onnx")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_output_permissions(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(OutputError) as ei:
            bio.save(_onnx_model(), ro / "out.onnx")
        _one_line_naming(ei.value, "out.onnx")
        with pytest.raises(OutputError):
            bio.check_output_path(None, ro / "out.onnx")
    finally:
        os.chmod(ro, 0o755)


def test_unwritable_output(tmp_path, monkeypatch) -> None:
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match="Permission denied") as ei:
        bio.save(_onnx_model(), tmp_path / "out.onnx")
    _one_line_naming(ei.value, "out.onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_never_run(tmp_path, protocol) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps(Evil(), protocol=protocol))
    assert bio.detect_format(p) == "pickled_module"
    with pytest.raises(ModelFormatError, match="trust_pickle=True"):
        bio.load(p)
    assert not marker.exists()


def test_streamed_save_parses_to_the_same_model(tmp_path) -> None:
    """bnfold writes ONNX one initializer at a time; onnx and onnxruntime must read the same model."""

    m = _onnx_model()
    out = tmp_path / "out.onnx"
    bio.save(m, out)
    assert onnx.load(str(out)).SerializeToString() == m.SerializeToString()
    onnx.checker.check_model(str(out), full_check=True)
    ort_session(out)


def test_tensor_bytes_that_do_not_fit_the_shape_are_rejected(tmp_path) -> None:
    m = _onnx_model()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    p = tmp_path / "bad.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(ModelFormatError, match="holds 428 bytes") as ei:
        bio.load(p)
    _one_line_naming(ei.value, "bad.onnx")
