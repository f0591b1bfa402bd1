"""Second outside attack on bnfold's file handling: crafted paths and files given to every command.

Each test builds its files under ``tmp_path``, runs the real CLI (a subprocess) or the file API, and
checks what a user would: the exit code, one line on stderr, the output computes what the input does,
the input unchanged, no temporary left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

from models.onnx_graphs import small_conv_bn
from models.testing import run_onnx

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(*args: str | bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args], capture_output=True, cwd=cwd, env=_env(), timeout=120
    )


def _conv_bn(c: int = 8) -> onnx.ModelProto:
    return small_conv_bn(0, c)


def _one_error_line(p: subprocess.CompletedProcess[bytes]) -> str:
    err = p.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------- output names that are not UTF-8


@pytest.mark.parametrize("external", [False, True])
def test_output_name_that_is_not_utf8_is_written_and_verified(tmp_path: Path, external: bool) -> None:
    """A file name is bytes on Linux: OUT ``\\xff.onnx`` is a valid name. The fold must verify the staged
    file (onnxruntime takes only UTF-8 paths) and write it, not fail with onnxruntime's binding error."""
    model = _conv_bn(c=16)  # W: 16x3x3x3 float32 = 1.7 KiB, external with --external-data
    onnx.save(model, tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    out = os.fsdecode(b"\xff\xfe.onnx")
    extra = ["--external-data"] if external else []
    p = _cli("fold", "m.onnx", out, *extra, cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
    assert (tmp_path / "m.onnx").read_bytes() == before
    written = tmp_path / out
    folded = onnx.load(str(written))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(folded, {"x": x})[0], run_onnx(model, {"x": x})[0], rtol=1e-5, atol=1e-5
    )
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left


def test_model_in_a_folder_whose_name_is_not_utf8_folds_and_verifies(tmp_path: Path) -> None:
    """The staged output lies in OUT's folder; a folder named with bytes that are not UTF-8 must not
    stop the verification of an inline model (onnxruntime is given the parsed model instead)."""
    folder = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xff")))
    folder.mkdir()
    model = _conv_bn()
    onnx.save(model, str(folder / "m.onnx"))
    p = _cli("fold", "m.onnx", "o.onnx", cwd=folder)
    assert p.returncode == 0, p.stderr.decode("utf-8", "replace")
    folded = onnx.load(str(folder / "o.onnx"))
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run_onnx(folded, {"x": x})[0], run_onnx(model, {"x": x})[0], rtol=1e-5, atol=1e-5
    )
    assert sorted(os.listdir(folder)) == ["m.onnx", "o.onnx"]


# ----------------------------------------------------------------- inputs that make verification vacuous


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_non_finite_inputs_cannot_make_different_models_equivalent(tmp_path: Path, value: float) -> None:
    """An ``--inputs`` file of NaN (or inf, or float64 values that overflow float32) makes every output
    NaN on both sides: two different models then compared "equivalent". Refused in one line instead."""
    onnx.save(_conv_bn(), tmp_path / "a.onnx")
    other = _conv_bn()
    w = other.graph.initializer[0]
    w.CopyFrom(nh.from_array(nh.to_array(w) * 3.0 + 1.0, "W"))  # another model, same signature
    onnx.save(other, tmp_path / "b.onnx")
    np.savez(tmp_path / "bad.npz", x=np.full((1, 3, 8, 8), value, np.float64))
    p = _cli("verify", "a.onnx", "b.onnx", "--inputs", "bad.npz", cwd=tmp_path)
    assert p.returncode == 2, p.stdout.decode()
    line = _one_error_line(p)
    assert "'x'" in line and "NaN or infinite" in line
    p = _cli("fold", "a.onnx", "o.onnx", "--inputs", "bad.npz", cwd=tmp_path)
    assert p.returncode == 2 and "NaN or infinite" in _one_error_line(p)
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "b.onnx", "bad.npz"]


def test_golden_file_with_nan_inputs_cannot_pass_any_candidate(tmp_path: Path) -> None:
    """``--load-outputs GOLDEN CANDIDATE`` runs CANDIDATE on the saved inputs: a crafted golden file
    whose inputs and reference outputs are NaN would pass every candidate of that signature."""
    onnx.save(_conv_bn(), tmp_path / "a.onnx")
    p = _cli("verify", "a.onnx", "a.onnx", "--save-outputs", "g.npz", "-q", cwd=tmp_path)
    assert p.returncode == 0, p.stderr.decode()
    with np.load(tmp_path / "g.npz") as z:
        forged = {k: np.full_like(z[k], np.nan) if z[k].dtype.kind == "f" else z[k] for k in z.files}
    np.savez(tmp_path / "forged.npz", **forged)
    p = _cli("verify", "--load-outputs", "forged.npz", "a.onnx", cwd=tmp_path)
    assert p.returncode == 2, p.stdout.decode()
    line = _one_error_line(p)
    assert "forged.npz" in line and "NaN or infinite" in line


# ----------------------------------------------------------------- compression bombs in PyTorch archives


def _rezip_with_bomb(src: Path, dst: Path, member_suffix: str | None, mib: int = 200) -> None:
    """Copy the zip ``src`` to ``dst``; the member ending in ``member_suffix`` (None: a new member) becomes
    ``mib`` MiB of deflated zeros (a few hundred KiB on disk)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        infos = zin.infolist()
        target = next(
            (i.filename for i in infos if member_suffix and i.filename.endswith(member_suffix)), None
        )
        for info in infos:
            if info.filename != target:
                zout.writestr(info, zin.read(info.filename))
        zi = zipfile.ZipInfo(target or infos[0].filename.split("/")[0] + "/data/weights/extra")
        zi.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(zi, "w", force_zip64=True) as f:
            for _ in range(mib):
                f.write(bytes(2**20))


@pytest.mark.parametrize("kind", ["pt2-extra", "pt2-weight", "pt-storage"])
def test_pytorch_archive_compression_bomb_is_refused_before_reading(tmp_path: Path, kind: str) -> None:
    """A .pt2 / .pt of a few hundred KiB whose zip members inflate to 200 MiB (torch writes its archives
    uncompressed): refused from the zip directory, in one line, before torch inflates a member."""
    import torch
    from torch import nn

    import bnfold
    from bnfold.errors import ModelFormatError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    if kind.startswith("pt2"):
        torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(tmp_path / "m.pt2"))
        src, bomb = tmp_path / "m.pt2", tmp_path / "bomb.pt2"
        _rezip_with_bomb(src, bomb, None if kind == "pt2-extra" else "data/weights/weight_0")
        args: list[str] = []
    else:
        torch.save(net.state_dict(), tmp_path / "sd.pt")
        src, bomb = tmp_path / "sd.pt", tmp_path / "bomb.pt"
        _rezip_with_bomb(src, bomb, "data/0")
        (tmp_path / "net.py").write_text(
            "import torch.nn as nn\n\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))\n"
        )
        args = ["--model", "net.py:net"]
    assert bomb.stat().st_size < 2**20
    p = _cli("inspect", bomb.name, *args, cwd=tmp_path)
    assert p.returncode == 2, p.stdout.decode()
    line = _one_error_line(p)
    assert bomb.name in line and "compression bomb" in line
    with pytest.raises(ModelFormatError, match="compression bomb"):
        bnfold.load(bomb, model_factory=str(tmp_path / "net.py") + ":net" if args else None)
    bnfold.load(
        src, model_factory=str(tmp_path / "net.py") + ":net" if args else None
    )  # the real file still loads


def test_checkpoint_whose_pickle_is_a_bomb_is_refused_before_format_detection_reads_it(
    tmp_path: Path,
) -> None:
    """Format detection reads ``data.pkl`` to tell weights from pickled code: a deflated 200 MiB
    ``data.pkl`` (valid pickle, then zeros) is refused from the zip directory before that read."""
    import resource

    import torch
    from torch import nn

    import bnfold
    from bnfold.errors import ModelFormatError

    torch.save(nn.BatchNorm2d(4).state_dict(), tmp_path / "sd.pt")
    _rezip_with_bomb_after(tmp_path / "sd.pt", tmp_path / "bomb.pt", "data.pkl")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFormatError, match="compression bomb"):
        bnfold.io.detect_format(tmp_path / "bomb.pt")
    with pytest.raises(ModelFormatError, match="compression bomb"):
        bnfold.load(tmp_path / "bomb.pt", model_factory="torch.nn:Identity")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024  # never inflated (200 MiB)


def _rezip_with_bomb_after(src: Path, dst: Path, member_suffix: str, mib: int = 200) -> None:
    """Copy ``src`` to ``dst``; the member ending in ``member_suffix`` keeps its bytes, deflated and
    followed by ``mib`` MiB of zeros (a pickle ignores what follows its STOP)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith(member_suffix):
                zout.writestr(info, zin.read(info.filename))
                continue
            zi = zipfile.ZipInfo(info.filename)
            zi.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(zi, "w", force_zip64=True) as f:
                f.write(zin.read(info.filename))
                for _ in range(mib):
                    f.write(bytes(2**20))


# ----------------------------------------------------------------- output names the OS refuses


@pytest.mark.parametrize("command", ["fold", "freeze", "recalibrate"])
@pytest.mark.parametrize("what", ["name-too-long", "link-loop"])
def test_output_the_os_cannot_open_is_one_typed_line(tmp_path: Path, command: str, what: str) -> None:
    """OUT named past the file system's limit (ENAMETOOLONG) or a symbolic link to itself (ELOOP): an
    output error naming OUT, not ``OSError: ...`` / ``RuntimeError: Symlink loop`` from the catch-all."""
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    ext = ".pt" if command == "freeze" else ".onnx"
    out = "x" * 300 + ext if what == "name-too-long" else "loop" + ext
    if what == "link-loop":
        os.symlink(out, tmp_path / out)
    extra = ["--data", "d.npz"] if command == "recalibrate" else []
    before = sorted(os.listdir(tmp_path))
    p = _cli(command, "m.onnx", out, *extra, cwd=tmp_path)
    assert p.returncode == 2
    line = _one_error_line(p)
    assert "cannot write" in line and out in line
    assert "OSError" not in line and "RuntimeError" not in line and "--debug" not in line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["fold", "m.onnx", "o.onnx", "--inputs", "{f}"], "--inputs"),
        (["verify", "m.onnx", "m.onnx", "--inputs", "{f}"], "--inputs"),
        (["verify", "--load-outputs", "{f}"], "--load-outputs"),
        (["recalibrate", "m.onnx", "o.onnx", "--data", "{f}"], "--data"),
    ],
)
@pytest.mark.parametrize("what", ["name-too-long", "fifo", "folder"])
def test_data_file_option_that_is_no_file_says_what_it_is(
    tmp_path: Path, args: list[str], option: str, what: str
) -> None:
    """A data option (``--inputs``, ``--load-outputs``, ``--data``) naming a path the OS cannot stat
    (ENAMETOOLONG) was the catch-all ``OSError``; a FIFO or a folder was "no such file"."""
    onnx.save(_conv_bn(), tmp_path / "m.onnx")
    f = {"name-too-long": "y" * 300 + ".npz", "fifo": "pipe.npz", "folder": "dir.npz"}[what]
    if what == "fifo":
        os.mkfifo(tmp_path / f)
    elif what == "folder":
        (tmp_path / f).mkdir()
    before = sorted(os.listdir(tmp_path))
    p = _cli(*[a.format(f=f) for a in args], cwd=tmp_path)
    assert p.returncode == 2
    line = _one_error_line(p)
    assert f"{f}: {option}: " in line
    expected = {"name-too-long": "File name too long", "fifo": "is a FIFO", "folder": "is a folder"}[what]
    assert expected in line and "--debug" not in line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_model_path_over_the_name_limit_says_so(tmp_path: Path, command: str) -> None:
    """MODEL named past the file system's limit cannot exist: the line says why (it said "no such file")."""
    name = "z" * 300 + ".onnx"
    p = _cli(command, name, cwd=tmp_path)
    assert p.returncode == 2
    line = _one_error_line(p)
    assert "File name too long" in line and "no such file" not in line
