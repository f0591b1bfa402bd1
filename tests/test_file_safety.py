"""File safety (issue 12): the input and other people's files are never damaged, odd files are refused at
once, a model and its external data are one atomic pair, interrupted writes leave nothing behind, and
inconsistent models are refused with a typed one-line error.

Every test builds its files, runs the real code path (API, ``bnfold.io``, or the CLI in a subprocess)
and checks what a user would: the input files are byte-for-byte unchanged, no partial output exists,
the error is one line naming the file.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import bnfold
from bnfold import io as bio
from bnfold.errors import InputError, ModelFormatError, OutputError
from bnfold.files import FoldSettings, fold_file
from models.onnx_graphs import small_conv_bn
from models.testing import run_onnx

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # No empty entry: an empty PYTHONPATH element puts the current folder on sys.path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _conv_bn(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    return small_conv_bn(seed, c)


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)


def _run(path: Path) -> np.ndarray:
    return run_onnx(path, {"x": _x()})[0]


def _save_external(m: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save(
        m,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=timeout,
    )


def _one_line(text: str, *needles: str) -> None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    for n in needles:
        assert n in lines[0], text


# -------------------------------------------------------------------------- the input is never damaged
def test_output_is_the_inputs_external_data_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    _save_external(_conv_bn(), src, "weights.onnx")
    before, ref = _digest(tmp_path), _run(src)
    dst = tmp_path / "weights.onnx"
    with pytest.raises(OutputError) as ei:
        fold_file(src, dst, FoldSettings(verify=False))
    assert "the input model reads" in str(ei.value) and "\n" not in str(ei.value)
    r = _cli("fold", "model.onnx", "-o", "weights.onnx", "--no-verify", cwd=tmp_path)
    assert r.returncode == 2
    _one_line(r.stderr, "weights.onnx", "the input model reads")
    assert _digest(tmp_path) == before  # nothing written, nothing changed
    np.testing.assert_array_equal(_run(src), ref)  # the input still loads and computes the same


def test_output_data_name_is_the_inputs_data_is_refused(tmp_path: Path) -> None:
    # a.onnx keeps its weights in b.onnx.data: writing b.onnx with external data would replace them
    src = tmp_path / "a.onnx"
    _save_external(_conv_bn(), src, "b.onnx.data")
    before = _digest(tmp_path)
    with pytest.raises(OutputError, match="external data"):
        bio.check_output_path(src, tmp_path / "b.onnx")
    with pytest.raises(OutputError, match="the input model reads"):
        fold_file(src, tmp_path / "b.onnx", FoldSettings(verify=False))
    r = _cli("fold", "a.onnx", "-o", "b.onnx", cwd=tmp_path)
    assert r.returncode == 2
    _one_line(r.stderr, "b.onnx.data", "the input model reads")
    assert _digest(tmp_path) == before
    # io.save itself never writes an existing data name: saving b.onnx from the API leaves a.onnx whole
    ref = _run(src)
    bio.save(_conv_bn(5, c=16), tmp_path / "b.onnx", external_data=True)
    assert _digest(tmp_path)["b.onnx.data"] == before["b.onnx.data"]
    np.testing.assert_array_equal(_run(src), ref)


def test_output_is_a_hard_link_or_symlink_to_an_input_file(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _save_external(_conv_bn(), src, "m.weights")
    os.link(tmp_path / "m.weights", tmp_path / "hard.onnx")
    os.symlink(tmp_path / "m.weights", tmp_path / "soft.onnx")
    before = _digest(tmp_path)
    for name in ("hard.onnx", "soft.onnx"):
        with pytest.raises(OutputError, match="the input model reads"):
            fold_file(src, tmp_path / name, FoldSettings(verify=False))
    assert _digest(tmp_path) == before


def test_files_read_by_and_size_count_external_data(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _save_external(_conv_bn(), src, "w.bin")
    assert bio.files_read_by(src) == [str(src), str(tmp_path / "w.bin")]
    total = os.path.getsize(src) + os.path.getsize(tmp_path / "w.bin")
    assert bio.file_size_with_data(src) == total
    report = fold_file(src, tmp_path / "out.onnx", FoldSettings(verify=False))
    assert report.files is not None and report.files.size_before == total
    assert bio.file_size_with_data(tmp_path / "nope.onnx") is None


def test_foreign_data_file_next_to_the_output_is_never_touched(tmp_path: Path) -> None:
    other = tmp_path / "out.onnx.data"
    other.write_bytes(b"someone else's weights")
    dst = tmp_path / "out.onnx"
    m = _conv_bn(c=16)
    for _ in range(2):  # a first write, then a replacement
        bio.save(m, dst, external_data=True)
        assert other.read_bytes() == b"someone else's weights"
        np.testing.assert_array_equal(_run(dst), _run_model(m))
        names = sorted(p.name for p in tmp_path.iterdir())
        assert len(names) == 3 and {"out.onnx", "out.onnx.data"} < set(names), names  # no temporary left


def _run_model(m: onnx.ModelProto) -> np.ndarray:
    return run_onnx(m, {"x": _x()})[0]


def test_resaving_replaces_the_pair_and_removes_the_old_data(tmp_path: Path) -> None:
    dst = tmp_path / "out.onnx"
    for seed in range(4):
        m = _conv_bn(seed, c=16)  # 16 * 27 floats: over the 1 KiB that goes to the data file
        bio.save(m, dst, external_data=True)
        names = sorted(p.name for p in tmp_path.iterdir())
        assert len(names) == 2 and names[0] == "out.onnx" and names[1].endswith(".data"), names
        np.testing.assert_array_equal(_run(dst), _run_model(m))
    bio.save(_conv_bn(9), dst, external_data=False)  # inline now: the old data file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_in_place_with_external_data(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _save_external(_conv_bn(), src, "m.onnx.data")
    ref = _run(src)
    fold_file(src, src, FoldSettings(in_place=True, verify=False))
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node) == 0
    np.testing.assert_allclose(_run(src), ref, rtol=1e-5, atol=1e-5)


_RACER = textwrap.dedent(
    """
    import sys, numpy as np, onnx
    from onnx import helper as h, TensorProto as T, numpy_helper as nh
    from bnfold import io as bio
    me, dst, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    w = nh.from_array(np.full((64, 64), float(me), np.float32), "W")
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 64])], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8, producer_name=f"racer{me}")
    for _ in range(rounds):
        bio.save(m, dst, external_data=True)
    """
)


def _pair_is_consistent(dst: Path) -> bool:
    m = onnx.load(str(dst))  # loads the external data the model names
    w = nh.to_array(m.graph.initializer[0])
    me = float(m.producer_name.removeprefix("racer"))
    return bool(np.all(w == me))


def test_two_processes_saving_one_path_never_mix_model_and_data(tmp_path: Path) -> None:
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.onnx"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i), str(dst), "60"], env=_env()) for i in (1, 2)
    ]
    checked = 0
    deadline = time.monotonic() + 60
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        try:
            ok = _pair_is_consistent(dst)
        except Exception:  # not written yet, or the old data removed between our two reads: retry
            continue
        assert ok, "a model was paired with the other process's data"
        checked += 1
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert _pair_is_consistent(dst)
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0] == "model.onnx", names  # one model, one data file, no temporaries


_SIGTERM_CHILD = textwrap.dedent(
    """
    import signal, sys, numpy as np
    from onnx import helper as h, TensorProto as T, numpy_helper as nh
    from bnfold import io as bio

    def on_term(signum, frame):  # what the CLI's handler does: turn the signal into an exception
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    inits = [nh.from_array(np.full((1024, 1024), float(i), np.float32), f"W{i}") for i in range(24)]
    g = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1])], [h.make_tensor_value_info("y", T.FLOAT, [1])],
                     inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    print("ready", flush=True)
    try:
        while True:
            bio.save(m, sys.argv[1], external_data=sys.argv[2] == "ext")
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("ext", ["ext", "inline"])
def test_signal_mid_write_leaves_no_temporary(tmp_path: Path, sig: int, ext: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(_SIGTERM_CHILD)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.onnx"
    p = subprocess.Popen(
        [sys.executable, str(script), str(dst), ext], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(n.name.startswith(".") for n in out.iterdir()):
        time.sleep(0.002)  # wait until a write is under way (a temporary exists)
    p.send_signal(sig)
    assert p.wait(timeout=60) == 130
    leftovers = [n.name for n in out.iterdir() if n.name.startswith(".")]
    assert leftovers == []
    if dst.exists():  # an earlier complete write: it must still be a whole model with its data
        m = onnx.load(str(dst))
        assert len(m.graph.initializer) == 24
        data = [n for n in out.iterdir() if n.name.endswith(".data")]
        assert len(data) == (1 if ext == "ext" else 0)


# ---------------------------------------------------------------------------- odd files, bounded reads
def test_fifo_as_model_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    with pytest.raises(ModelFormatError, match="FIFO"):
        bio.detect_format(fifo)
    r = _cli("inspect", str(fifo), cwd=tmp_path, timeout=60)  # hung forever before
    assert r.returncode == 2
    _one_line(r.stderr, "model.onnx", "not a regular file")


def test_device_as_model_is_refused() -> None:
    with pytest.raises(ModelFormatError, match="device"):
        bio.detect_format("/dev/zero")


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_big_file_of_zeros_is_judged_from_a_bounded_read(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.onnx"
    with open(zeros, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GB of zeros that take no disk
    before = _rchar()
    with pytest.raises(ModelFormatError) as ei:
        bio.load(zeros)
    assert _rchar() - before < 2**20  # read a few bytes, not 3 GB
    assert "zeros.onnx" in str(ei.value) and "\n" not in str(ei.value)


def test_truncated_onnx_is_refused_from_its_tags(tmp_path: Path) -> None:
    good = _conv_bn().SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good[: len(good) - 40])
    with pytest.raises(ModelFormatError, match="truncated"):
        bio.load(cut)


# ----------------------------------------------------------------------------- trust and sys.path
def test_factory_module_does_not_shadow_installed_packages(tmp_path: Path) -> None:
    marker = tmp_path / "shadowed"
    (tmp_path / "onnxruntime.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit('shadowed')\n"
    )
    (tmp_path / "mynet.py").write_text("def make():\n    return 42\n")
    runner = tmp_path / "elsewhere"
    runner.mkdir()
    (runner / "run.py").write_text(
        "import sys\nfrom bnfold.io import resolve_factory\n"
        "f = resolve_factory('mynet:make')\nassert f() == 42\n"
        "import onnxruntime\nprint(sys.path.index(sys.path[-1]), onnxruntime.__file__)\n"
    )
    r = subprocess.run(
        [sys.executable, str(runner / "run.py")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert not marker.exists() and "site-packages" in r.stdout or "dist-packages" in r.stdout


def test_torchscript_is_refused_without_running_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(net), str(path))

    def no_jit_load(*a: object, **k: object) -> None:
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_jit_load)
    with pytest.raises(ModelFormatError) as ei:
        bio.load(path)
    assert "TorchScript" in str(ei.value) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------------- typed errors
def _with_bn_lengths(lengths: tuple[int, int, int, int]) -> onnx.ModelProto:
    m = _conv_bn()
    rng = np.random.default_rng(3)
    for t, n in zip(m.graph.initializer[1:], lengths):
        t.CopyFrom(nh.from_array(rng.uniform(0.5, 2.0, n).astype(np.float32), t.name))
    return m


@pytest.mark.parametrize("lengths", [(8, 7, 8, 8), (1, 8, 8, 8), (8, 8, 8, 16)])
def test_mismatched_bn_parameter_lengths_are_an_input_error(tmp_path: Path, lengths: tuple[int, ...]) -> None:
    m = _with_bn_lengths(lengths)  # type: ignore[arg-type]
    snapshot = m.SerializeToString()
    for call in (bnfold.fold, bnfold.inspect):
        with pytest.raises(InputError, match="BatchNormalization 'bn'"):
            call(m)
    assert m.SerializeToString() == snapshot
    onnx.save(m, str(tmp_path / "m.onnx"))
    r = _cli("fold", "m.onnx", "-o", "o.onnx", cwd=tmp_path)
    assert r.returncode == 2 and not (tmp_path / "o.onnx").exists()
    _one_line(r.stderr, "m.onnx", "BatchNormalization")


def test_short_float_data_is_an_input_error() -> None:
    m = _conv_bn()
    s = m.graph.initializer[1]
    s.CopyFrom(h.make_tensor("s", T.FLOAT, [8], [1.5] * 8))
    del s.float_data[-1]
    with pytest.raises(InputError, match="'s' holds 7 values"):
        bnfold.fold(m)


def test_duplicate_initializer_names_refused_by_the_api_as_by_the_cli(tmp_path: Path) -> None:
    m = _conv_bn()
    m.graph.initializer.append(nh.from_array(np.full((8, 3, 3, 3), 7.0, np.float32), "W"))
    with pytest.raises(InputError, match="'W' is defined twice"):
        bnfold.fold(m)
    onnx.save(m, str(tmp_path / "dup.onnx"))
    with pytest.raises(ModelFormatError):
        bio.load(tmp_path / "dup.onnx")


def test_huge_constant_is_refused_before_it_is_allocated() -> None:
    import resource

    m = _conv_bn()
    m.graph.initializer.extend(
        [
            nh.from_array(np.array(1.0, np.float32), "one"),
            nh.from_array(np.array([1_500_000_000], np.int64), "shape"),
        ]
    )
    m.graph.node.insert(0, h.make_node("Expand", ["one", "shape"], ["bias"], name="expand"))
    m.graph.node[1].input.append("bias")
    assert len(m.SerializeToString()) < 2000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = bnfold.inspect(m)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    (skip,) = report.skips
    assert "too large" in skip.detail
    assert grew_mb < 500  # 6 GB before the check


def test_full_disk_while_writing_pt_is_an_output_error(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    code = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from bnfold import io as bio
        from bnfold.errors import OutputError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
        net = torch.nn.Linear(512, 512)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            bio.save(net, {str(tmp_path / "out.pt")!r})
        except OutputError as e:
            print("OutputError", e)
            sys.exit(0)
        sys.exit(1)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "out.pt: cannot write" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file, no temporary


def _pt2(tmp_path: Path, drop: str = "", corrupt: str = "") -> Path:
    import zipfile

    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(good))
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(bad, "w") as o:
        for n in z.namelist():
            if drop and n.endswith(drop):
                continue
            o.writestr(n, b"{not json" if corrupt and n.endswith(corrupt) else z.read(n))
    good.unlink()
    return bad


@pytest.mark.parametrize(("drop", "corrupt"), [("/archive_version", ""), ("", "models/model.json")])
def test_broken_pt2_is_one_line_without_torch_log_noise(tmp_path: Path, drop: str, corrupt: str) -> None:
    bad = _pt2(tmp_path, drop, corrupt)
    before = _digest(tmp_path)
    r = _cli("inspect", bad.name, cwd=tmp_path)
    assert r.returncode == 2
    _one_line(r.stderr, "bad.pt2")
    assert _digest(tmp_path) == before


def test_threads_saving_one_path_leave_one_whole_pair(tmp_path: Path) -> None:
    import threading

    dst = tmp_path / "model.onnx"
    models = [_conv_bn(seed, c=16) for seed in range(4)]
    errors: list[BaseException] = []

    def worker(m: onnx.ModelProto) -> None:
        try:
            for _ in range(5):
                bio.save(m, dst, external_data=True)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "model.onnx", names
    got = _run(dst)
    assert any(np.array_equal(got, _run_model(m)) for m in models)  # exactly one writer's whole pair
