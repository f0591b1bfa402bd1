"""File safety, second pass (issue 28 items 1-3 and 11, issue 22 item 13): bnfold never deletes or writes
over a file it did not write, never writes over one of a command's inputs, a FIFO, a device or a
folder, and writes the same bytes for the same command.

Every test builds its hostile tree in ``tmp_path`` (symlinked folders, sub and parent folders, a second
model sharing the data, copies and hard links of a model) and checks what a user would: every file
that was there still has its bytes, every other model still runs and gives what it gave, the exit code,
one line on stderr, the report's note about a file kept, no temporary left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from typer.testing import CliRunner

from bnfold import io as bio
from bnfold.cli import app
from bnfold.errors import OutputError
from models.onnx_graphs import small_conv_bn
from models.testing import run_onnx

runner = CliRunner()
_DATA = re.compile(r"\.[0-9a-f]{16}\.data$")


def _conv_bn(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """The conv weight (c * 27 floats) is over the 1 KiB that goes to external data."""
    return small_conv_bn(seed, c)


_X = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def _run(path: Path) -> np.ndarray:
    return run_onnx(str(path), _X)[0]


def _save_external(m: onnx.ModelProto, path: Path, location: str) -> None:
    """Save as another tool would (onnx.save): every tensor in the file ``location`` (relative to ``path``)."""
    onnx.save(
        m,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def _point_at(m: onnx.ModelProto, location: str, folder: Path) -> onnx.ModelProto:
    """A copy of ``m`` whose tensors read the data file ``location`` that ``_save_external`` wrote for
    the same model in ``folder`` (a second model sharing that file, under any relative path)."""
    src = onnx.load(str(folder / "in.onnx"), load_external_data=False)
    for t in src.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    return src


def _digests(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


def _fold(*args: str) -> object:
    return runner.invoke(app, ["fold", *args])


def _notes(stdout: str) -> list[str]:
    return [str(n) for n in json.loads(stdout)["notes"]]


def _one_line(stderr: str, *parts: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], lines[0]


# ------------------------------------------------------------------------ 28.1: fold --in-place


def test_in_place_keeps_a_model_that_reads_a_tensor_from_its_own_file(tmp_path: Path) -> None:
    """A model whose uint8 tensor reads 16 bytes of its own file: the fold may not delete what it wrote."""
    m = _conv_bn()
    k = h.make_tensor("K", T.UINT8, [16], vals=b"\0" * 16, raw=True)
    k.ClearField("raw_data")
    k.data_location = T.EXTERNAL
    for key, value in (("location", "self.onnx"), ("offset", "0"), ("length", "16")):
        k.external_data.add(key=key, value=value)
    m.graph.initializer.append(k)
    m.graph.node.append(h.make_node("Identity", ["K"], ["k"]))
    m.graph.output.append(h.make_tensor_value_info("k", T.UINT8, [16]))
    src = tmp_path / "self.onnx"
    onnx.save(m, str(src))
    want = run_onnx(str(src), _X)
    r = _fold(str(src), str(src), "--in-place", "-q")
    assert src.is_file(), r.stderr  # the output bnfold just wrote is still there
    if r.exit_code == 0:
        got = run_onnx(str(src), _X)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[1], want[1])
    else:
        assert r.exit_code == 2
    assert _temporaries(tmp_path) == []


def test_in_place_never_deletes_a_sibling_model_named_by_a_crafted_location(tmp_path: Path) -> None:
    """The input's uint8 tensor reads its bytes from ``victim.onnx``, another model: the fold inlines the
    tensor, the old model read the victim, the new one does not: the victim stays, and a note says so."""
    victim = tmp_path / "victim.onnx"
    onnx.save(_conv_bn(5), str(victim))
    m = _conv_bn()
    k = h.make_tensor("K", T.UINT8, [16], vals=b"\0" * 16, raw=True)
    k.ClearField("raw_data")
    k.data_location = T.EXTERNAL
    for key, value in (("location", "victim.onnx"), ("offset", "0"), ("length", "16")):
        k.external_data.add(key=key, value=value)
    m.graph.initializer.append(k)
    m.graph.node.append(h.make_node("Identity", ["K"], ["k"]))
    m.graph.output.append(h.make_tensor_value_info("k", T.UINT8, [16]))
    src = tmp_path / "in.onnx"
    onnx.save(m, str(src))
    before, victim_out = victim.read_bytes(), _run(victim)
    r = _fold(str(src), str(src), "--in-place", "--json")
    assert r.exit_code == 0, r.stderr
    assert victim.read_bytes() == before
    np.testing.assert_array_equal(_run(victim), victim_out)
    assert any("kept" in n and "victim.onnx" in n for n in _notes(r.stdout))


def _shared_tree(tmp_path: Path, layout: str) -> tuple[Path, Path, Path]:
    """``real/in.onnx`` reading ``real/w.bin``, and another model that reads the same ``w.bin``.

    Returns (the path the fold is given, the data file, the other model)."""
    real = tmp_path / "real"
    real.mkdir()
    m = _conv_bn()
    _save_external(m, real / "in.onnx", "w.bin")
    src = real / "in.onnx"
    if layout == "symlinked-folder":  # the fold goes through a link to the folder
        (tmp_path / "alias").symlink_to(real, target_is_directory=True)
        src = tmp_path / "alias" / "in.onnx"
        other = real / "other.onnx"
        onnx.save(_point_at(m, "w.bin", real), str(other))
    elif layout == "sub-folder":
        (real / "sub").mkdir()
        other = real / "sub" / "other.onnx"
        onnx.save(_point_at(m, "../w.bin", real), str(other))
    elif layout == "parent-folder":
        other = tmp_path / "other.onnx"
        onnx.save(_point_at(m, "real/w.bin", real), str(other))
    elif layout == "not-named-onnx":
        other = real / "backup.model"
        onnx.save(_point_at(m, "w.bin", real), str(other))
    else:  # pragma: no cover
        raise AssertionError(layout)
    return src, real / "w.bin", other


@pytest.mark.parametrize("layout", ["symlinked-folder", "sub-folder", "parent-folder", "not-named-onnx"])
def test_in_place_keeps_data_another_model_reads(tmp_path: Path, layout: str) -> None:
    src, data, other = _shared_tree(tmp_path, layout)
    runs = layout != "sub-folder"  # onnxruntime refuses a data path that leaves the model's folder
    other_out = _run(other) if runs else None
    before = {k: v for k, v in _digests(tmp_path).items() if not k.endswith("in.onnx")}
    ref = _run(src)
    r = _fold(str(src), str(src), "--in-place", "--json")
    assert r.exit_code == 0, r.stderr
    after = _digests(tmp_path)
    assert {k: after.get(k) for k in before} == before  # the shared weights and the other model are intact
    if runs:
        np.testing.assert_array_equal(_run(other), other_out)  # and the other model still runs
    np.testing.assert_allclose(_run(src), ref, rtol=1e-5, atol=1e-5)
    assert any("kept" in n and "w.bin" in n for n in _notes(r.stdout))
    assert _temporaries(tmp_path) == []


def test_in_place_through_a_link_to_the_input_in_another_folder_keeps_the_original_whole(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    src = a / "in.onnx"
    _save_external(_conv_bn(), src, "w.bin")
    link = b / "link.onnx"
    link.symlink_to(src)
    ref = _run(src)
    before = _digests(a)
    r = _fold(str(src), str(link), "--in-place", "-q")
    assert r.exit_code == 0, r.stderr
    assert _digests(a) == before  # the original and its data are untouched
    np.testing.assert_array_equal(_run(src), ref)
    np.testing.assert_allclose(_run(link), ref, rtol=1e-5, atol=1e-5)
    assert _temporaries(tmp_path) == []


# ------------------------------------------------------------------- 28.2: writing over an existing OUT


def test_overwriting_out_keeps_its_data_when_a_backup_copy_reads_it(tmp_path: Path) -> None:
    """OUT written by another tool with ``OUT.data``; ``backup.onnx`` is a copy of OUT (reads OUT.data)."""
    src = tmp_path / "in.onnx"
    onnx.save(_conv_bn(3), str(src))
    out = tmp_path / "out.onnx"
    _save_external(_conv_bn(), out, "out.onnx.data")
    backup = tmp_path / "backup.onnx"
    shutil.copyfile(out, backup)
    before, backup_out = (tmp_path / "out.onnx.data").read_bytes(), _run(backup)
    r = _fold(str(src), str(out), "--external-data", "--json")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "out.onnx.data").read_bytes() == before
    np.testing.assert_array_equal(_run(backup), backup_out)
    np.testing.assert_allclose(_run(out), _run(src), rtol=1e-5, atol=1e-5)
    assert any("kept" in n and "out.onnx.data" in n for n in _notes(r.stdout))


@pytest.mark.parametrize("how", ["copy", "hard-link", "other-name"])
def test_overwriting_bnfolds_own_output_keeps_data_a_copy_reads(tmp_path: Path, how: str) -> None:
    """bnfold wrote OUT and its data; a copy of the model reads that data: the next write keeps it."""
    for seed in (1, 2):
        onnx.save(_conv_bn(seed), str(tmp_path / f"in{seed}.onnx"))
    out = tmp_path / "out.onnx"
    assert _fold(str(tmp_path / "in1.onnx"), str(out), "--external-data", "-q").exit_code == 0
    (data,) = [p for p in tmp_path.iterdir() if _DATA.search(p.name)]
    copy = tmp_path / ("backup.onnx" if how != "other-name" else "keep.me")
    (os.link if how == "hard-link" else shutil.copyfile)(out, copy)
    before, copy_out = data.read_bytes(), _run(copy)
    r = _fold(str(tmp_path / "in2.onnx"), str(out), "--external-data", "--json")
    assert r.exit_code == 0, r.stderr
    assert data.read_bytes() == before
    np.testing.assert_array_equal(_run(copy), copy_out)
    assert any("kept" in n and data.name in n for n in _notes(r.stdout))


def test_overwriting_bnfolds_own_output_removes_its_data_when_nothing_else_reads_it(tmp_path: Path) -> None:
    for seed in (1, 2):
        onnx.save(_conv_bn(seed), str(tmp_path / f"in{seed}.onnx"))
    out = tmp_path / "out.onnx"
    assert _fold(str(tmp_path / "in1.onnx"), str(out), "--external-data", "-q").exit_code == 0
    r = _fold(str(tmp_path / "in2.onnx"), str(out), "--external-data", "--json")
    assert r.exit_code == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4 and names[:3] == ["in1.onnx", "in2.onnx", "out.onnx"] and _DATA.search(names[3]), (
        names
    )
    assert _notes(r.stdout) == [] or not any("kept" in n for n in _notes(r.stdout))


def test_a_copied_model_does_not_make_bnfold_own_the_originals_data(tmp_path: Path) -> None:
    """``cp out.onnx other.onnx``: other.onnx carries bnfold's record, but of a file named after out.onnx."""
    for seed in (1, 2):
        onnx.save(_conv_bn(seed), str(tmp_path / f"in{seed}.onnx"))
    out = tmp_path / "out.onnx"
    assert _fold(str(tmp_path / "in1.onnx"), str(out), "--external-data", "-q").exit_code == 0
    sub = tmp_path / "sub"
    sub.mkdir()
    other = sub / "other.onnx"  # a copy elsewhere, pointed at the original's data by hand
    m = onnx.load(str(out), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../" + e.value
    onnx.save(m, str(other))
    before, out_ref = _digests(tmp_path), _run(out)
    r = _fold(str(tmp_path / "in2.onnx"), str(other), "--external-data", "-q")
    assert r.exit_code == 0, r.stderr
    after = _digests(tmp_path)
    assert {k: v for k, v in after.items() if k in before and k != str(other)} == {
        k: v for k, v in before.items() if k != str(other)
    }
    np.testing.assert_array_equal(_run(out), out_ref)


def test_a_forged_record_proves_nothing(tmp_path: Path) -> None:
    """A model claiming, in bnfold's record, a data file whose bytes are not the recorded ones."""
    src = tmp_path / "in.onnx"
    onnx.save(_conv_bn(3), str(src))
    out = tmp_path / "out.onnx"
    name = "out.onnx." + "0" * 16 + ".data"
    _save_external(_conv_bn(), out, name)
    m = onnx.load(str(out), load_external_data=False)
    size = (tmp_path / name).stat().st_size
    m.metadata_props.add(
        key="bnfold.external_data", value=json.dumps({"bytes": size, "location": name, "sha256": "0" * 64})
    )
    onnx.save(m, str(out))
    before = (tmp_path / name).read_bytes()
    r = _fold(str(src), str(out), "--external-data", "-q")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / name).read_bytes() == before


# --------------------------------------------------------- 28.3 / 28.11: never over an input or a non-file


def _pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    ref = tmp_path / "ref.onnx"
    _save_external(_conv_bn(), ref, "ref.bin")
    cand = tmp_path / "cand.onnx"
    assert _fold(str(ref), str(cand), "-q").exit_code == 0
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **_X)
    return ref, cand, inputs


@pytest.mark.parametrize("target", ["ref.onnx", "ref.bin", "cand.onnx", "inputs.npz", "alias.npz"])
def test_save_outputs_never_writes_over_an_input(tmp_path: Path, target: str) -> None:
    ref, cand, inputs = _pair(tmp_path)
    (tmp_path / "alias.npz").symlink_to(ref)  # a link to the reference
    before = _digests(tmp_path)
    r = runner.invoke(
        app,
        ["verify", str(ref), str(cand), "--inputs", str(inputs), "--save-outputs", str(tmp_path / target)],
    )
    assert r.exit_code == 2, r.stdout
    _one_line(r.stderr, target)
    assert _digests(tmp_path) == before
    assert (tmp_path / "alias.npz").is_symlink()
    assert _temporaries(tmp_path) == []


def test_save_outputs_never_writes_over_the_golden_file_it_reads(tmp_path: Path) -> None:
    ref, cand, _ = _pair(tmp_path)
    golden = tmp_path / "g.npz"
    assert runner.invoke(app, ["verify", str(ref), str(cand), "--save-outputs", str(golden)]).exit_code == 0
    before = _digests(tmp_path)
    r = runner.invoke(
        app, ["verify", "--load-outputs", str(golden), str(cand), "--save-outputs", str(golden)]
    )
    assert r.exit_code == 2
    _one_line(r.stderr, "g.npz")
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "folder"])
@pytest.mark.parametrize("command", ["fold", "verify"])
def test_a_fifo_or_a_folder_as_an_output_is_refused(tmp_path: Path, kind: str, command: str) -> None:
    ref, cand, _ = _pair(tmp_path)
    target = tmp_path / ("out.onnx" if command == "fold" else "g.npz")
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    link = tmp_path / ("link.onnx" if command == "fold" else "link.npz")
    link.symlink_to(target)  # and through a link
    for path in (target, link):
        args = (
            [str(ref), str(path), "-q"]
            if command == "fold"
            else [str(ref), str(cand), "--save-outputs", str(path)]
        )
        r = runner.invoke(app, [command, *args])
        assert r.exit_code == 2, r.stdout
        _one_line(r.stderr, path.name)
        assert target.is_fifo() if kind == "fifo" else target.is_dir()
        assert link.is_symlink()
    assert _temporaries(tmp_path) == []


def test_a_device_is_refused_before_anything_is_written() -> None:
    """Only the checks run (they stat the path); nothing in this test can write to the device."""
    with pytest.raises(OutputError, match="is a device"):
        bio.check_output_path(None, "/dev/null")
    with pytest.raises(OutputError, match="is a device"):
        bio.check_output_path("/nonexistent/in.onnx", "/dev/null")


@pytest.mark.parametrize("length", [245, 249, 255])
@pytest.mark.parametrize("external", [False, True])
def test_long_output_names_fit_the_name_limit(tmp_path: Path, length: int, external: bool) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(_conv_bn(), str(src))
    out = tmp_path / ("m" * (length - 5) + ".onnx")
    assert len(out.name) == length
    r = _fold(str(src), str(out), "--external-data" if external else "--no-external-data", "-q")
    assert r.exit_code == 0, r.stderr
    np.testing.assert_allclose(_run(out), _run(src), rtol=1e-5, atol=1e-5)
    assert all(len(os.fsencode(p.name)) <= 255 for p in tmp_path.iterdir())
    assert len(list(tmp_path.glob("*.data"))) == (1 if external else 0)
    assert _temporaries(tmp_path) == []
    golden = tmp_path / ("g" * (length - 4) + ".npz")
    assert runner.invoke(app, ["verify", str(src), str(out), "--save-outputs", str(golden)]).exit_code == 0
    assert golden.is_file() and _temporaries(tmp_path) == []


# ----------------------------------------------------------------------- 22.13: reproducible outputs


def test_the_same_command_writes_the_same_bytes(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    _save_external(_conv_bn(), src, "in.bin")
    runs = []
    for i in range(2):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        assert _fold(str(src), str(folder / "out.onnx"), "-q").exit_code == 0
        assert (
            runner.invoke(
                app, ["verify", str(src), str(folder / "out.onnx"), "--save-outputs", str(folder / "g.npz")]
            ).exit_code
            == 0
        )
        runs.append({p.name: p.read_bytes() for p in folder.iterdir()})
    assert runs[0] == runs[1]
    names = sorted(runs[0])
    assert names[:2] == ["g.npz", "out.onnx"] and re.fullmatch(r"out\.onnx\.[0-9a-f]{16}\.data", names[2]), (
        names
    )
    # the data file the model names is the one written, under its final name
    assert bio.files_read_by(tmp_path / "run0" / "out.onnx")[1:] == [str(tmp_path / "run0" / names[2])]
    # and the same command again on the same OUT: the same bytes, no other file
    assert _fold(str(src), str(tmp_path / "run0" / "out.onnx"), "-q").exit_code == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "run0").iterdir()} == runs[0]


def test_a_saved_pytorch_module_is_the_same_bytes_every_time(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        bio.save(net, tmp_path / str(i) / "net.pt")
    assert (tmp_path / "0" / "net.pt").read_bytes() == (tmp_path / "1" / "net.pt").read_bytes()


def test_in_place_on_bnfolds_own_output_replaces_its_data(tmp_path: Path) -> None:
    """The data bnfold wrote for the model it replaces (the record proves it) is removed: no orphan."""
    src = tmp_path / "m.onnx"
    bio.save(_conv_bn(), src, external_data=True)
    (old,) = [p.name for p in tmp_path.iterdir() if _DATA.search(p.name)]
    ref = _run(src)
    r = _fold(str(src), str(src), "--in-place", "--json")
    assert r.exit_code == 0, r.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "m.onnx" and _DATA.search(names[1]) and names[1] != old, names
    assert not any("kept" in n for n in _notes(r.stdout))
    np.testing.assert_allclose(_run(src), ref, rtol=1e-5, atol=1e-5)
