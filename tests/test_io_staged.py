"""bnfold.io.load_file (one sniff, one parse -> Loaded) and staged_save (write, check, then commit)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold import io as bio
from bnfold.errors import OutputError
from models.testing import run_onnx


def _conv_model(n: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = nh.from_array(rng.standard_normal((n, 3, 3, 3)).astype(np.float32), "W")
    b = nh.from_array(rng.standard_normal(n).astype(np.float32), "B")
    g = h.make_graph(
        [h.make_node("Conv", ["x", "W", "B"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, ["N", n, 6, 6])],
        [w, b],
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_X = {"x": np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)}


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# -------------------------------------------------------------------------------------- staged_save


def test_staged_external_data_loads_in_onnxruntime_before_commit(tmp_path: Path) -> None:
    m = _conv_model()
    want = run_onnx(m, _X)
    out = tmp_path / "out.onnx"
    with bio.staged_save(m, out, external_data=True) as staged:
        assert not out.exists()  # nothing at the final names yet
        assert len(staged.data_files) == 1 and os.path.isfile(staged.data_files[0])
        data_name = os.path.basename(staged.data_files[0])
        assert re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", data_name)  # named after its content
        # the staged file reads its data as it is: run it from its temporary path
        got = run_onnx(staged.path, _X)
        np.testing.assert_array_equal(got[0], want[0])
        staged.commit()
    assert _listing(tmp_path) == ["out.onnx", data_name]
    np.testing.assert_array_equal(run_onnx(str(out), _X)[0], want[0])


@pytest.mark.parametrize("external", [False, True])
def test_no_temporary_left_without_commit(tmp_path: Path, external: bool) -> None:
    out = tmp_path / "out.onnx"
    with bio.staged_save(_conv_model(), out, external_data=external) as staged:
        assert os.path.exists(staged.path)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("external", [False, True])
def test_an_exception_in_the_block_leaves_the_old_pair_whole(tmp_path: Path, external: bool) -> None:
    out = tmp_path / "out.onnx"
    bio.save(_conv_model(8), out, external_data=external)
    before = {name: _sha(tmp_path / name) for name in _listing(tmp_path)}
    with pytest.raises(KeyboardInterrupt), bio.staged_save(_conv_model(), out, external_data=external):
        raise KeyboardInterrupt  # e.g. Ctrl-C while verifying the staged file
    assert {name: _sha(tmp_path / name) for name in _listing(tmp_path)} == before


@pytest.mark.parametrize("external", [False, True])
def test_an_interrupt_right_after_the_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external: bool
) -> None:
    real = bio.saver._stage_onnx

    def then_interrupted(*a: object, **k: object) -> object:
        real(*a, **k)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # a signal between the finished write and the caller's block

    monkeypatch.setattr(bio.saver, "_stage_onnx", then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        bio.save(_conv_model(), tmp_path / "o.onnx", external_data=external)
    assert _listing(tmp_path) == []


def test_commit_gives_the_pair_that_save_gives(tmp_path: Path) -> None:
    m = _conv_model()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    bio.save(m, tmp_path / "a" / "m.onnx", external_data=True)
    with bio.staged_save(m, tmp_path / "b" / "m.onnx", external_data=True) as staged:
        staged.commit()
    saved, staged_files = _listing(tmp_path / "a"), _listing(tmp_path / "b")
    assert len(saved) == len(staged_files) == 2 and saved[0] == staged_files[0] == "m.onnx"
    # byte for byte: the data file is named after its content, never at random
    assert saved == staged_files
    for name in saved:
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
    # inline: byte for byte
    bio.save(m, tmp_path / "a" / "i.onnx")
    with bio.staged_save(m, tmp_path / "b" / "i.onnx") as staged:
        staged.commit()
    assert _sha(tmp_path / "a" / "i.onnx") == _sha(tmp_path / "b" / "i.onnx")


def test_commit_replaces_the_old_pair_and_removes_its_data(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    bio.save(_conv_model(8), out, external_data=True)
    old = [n for n in _listing(tmp_path) if n.endswith(".data")]
    with bio.staged_save(_conv_model(), out, external_data=True) as staged:
        assert os.path.basename(staged.data_files[0]) not in old  # a fresh name
        staged.commit()
    names = _listing(tmp_path)
    assert len(names) == 2 and not set(names) & set(old)
    assert run_onnx(str(out), _X)[0].shape == (2, 64, 6, 6)


def test_commit_twice_is_refused(tmp_path: Path) -> None:
    with bio.staged_save(_conv_model(), tmp_path / "o.onnx") as staged:
        staged.commit()
        with pytest.raises(OutputError, match="already committed"):
            staged.commit()
    assert _listing(tmp_path) == ["o.onnx"]


def test_save_is_staged_save_and_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = bio.staged_save

    def spy(model: object, path: object, **kw: object):  # type: ignore[no-untyped-def]
        seen.append(os.fspath(path))  # type: ignore[arg-type]
        return real(model, path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(bio.saver, "staged_save", spy)  # where save calls it
    bio.save(_conv_model(), tmp_path / "o.onnx", external_data=True)
    assert seen == [str(tmp_path / "o.onnx")]
    assert len(_listing(tmp_path)) == 2


def test_staged_torch_module_loads_before_commit(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    out = tmp_path / "net.pt"
    with bio.staged_save(net, out, fmt="state_dict") as staged:
        assert staged.data_files == () and not out.exists()
        sd = torch.load(staged.path, weights_only=True)
        assert set(sd) == {"0.weight", "0.bias"}
        staged.commit()
    assert _listing(tmp_path) == ["net.pt"]
    assert torch.equal(torch.load(out, weights_only=True)["0.weight"], net[0].weight)


def test_staged_refuses_a_protected_output_before_writing(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    bio.save(_conv_model(), src)
    digest = _sha(src)
    with (
        pytest.raises(OutputError, match="input model reads"),
        bio.staged_save(_conv_model(), src, protect=[src]),
    ):
        pass
    assert _listing(tmp_path) == ["in.onnx"] and _sha(src) == digest


# ---------------------------------------------------------------------------------------- load_file


def test_load_file_onnx_with_external_data(tmp_path: Path) -> None:
    m = _conv_model()
    src = tmp_path / "m.onnx"
    bio.save(m, src, external_data=True)
    data = [tmp_path / n for n in _listing(tmp_path) if n.endswith(".data")]
    loaded = bio.load_file(src)
    assert loaded.format == "onnx" and loaded.path == str(src) and loaded.example_inputs is None
    assert loaded.data_files == tuple(str(p) for p in data)
    assert loaded.size == src.stat().st_size + sum(p.stat().st_size for p in data)
    np.testing.assert_array_equal(run_onnx(loaded.model, _X)[0], run_onnx(m, _X)[0])
    lazy = bio.load_file(src, lazy_external_data=True)
    assert lazy.data_files == loaded.data_files and lazy.size == loaded.size


def test_load_file_carries_the_factory_examples(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from models.lenet import lenet5

    src = tmp_path / "sd.pt"
    torch.save(lenet5().state_dict(), src)
    loaded = bio.load_file(src, model_factory=lenet5)
    assert loaded.format == "state_dict" and loaded.data_files == () and loaded.size == src.stat().st_size
    assert loaded.example_inputs is not None and len(loaded.example_inputs) == 1
    assert tuple(loaded.example_inputs[0].shape) == (2, *lenet5.example_input_shape)  # type: ignore[attr-defined]
    assert not loaded.model.training
    assert not hasattr(loaded.model, "example_inputs")  # in the record, not stuck on the model
    assert bio.load(src, model_factory=lenet5).__class__ is loaded.model.__class__
