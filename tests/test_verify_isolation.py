"""onnxruntime in a child process: crashes, signals and the runtime's log never take bnfold down.

Each test builds its model here, runs the original and the rewritten model, and checks what a user
sees: the exit code, one line on stderr, no temporary left, input unchanged.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.errors import NotComparableError
from bnfold.onnx import fold_model
from bnfold.verification import REFERENCE_EVALUATOR, verify
from models.testing import run_onnx

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _bn_stats(rng: np.random.Generator, c: int, dtype: type = np.float32) -> list[onnx.TensorProto]:
    """Realistic statistics: gamma != 1, beta != 0, mean != 0, var != 1."""
    return [
        nh.from_array(rng.uniform(0.5, 1.5, c).astype(dtype), "gamma"),
        nh.from_array(rng.uniform(-0.5, 0.5, c).astype(dtype), "beta"),
        nh.from_array(rng.uniform(-0.8, 0.8, c).astype(dtype), "mean"),
        nh.from_array(rng.uniform(0.25, 2.5, c).astype(dtype), "var"),
    ]


def _conv_bn(
    bn_outputs: tuple[str, ...] = ("y",),
    opset: int = 12,
    dtype: int = T.FLOAT,
    momentum: float | None = None,
    extra: tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[onnx.TensorProto]] | None = None,
) -> onnx.ModelProto:
    """x[1,2,8,8] -> Conv -> BatchNormalization(outputs ``bn_outputs``) -> y, plus ``extra`` nodes."""
    rng = np.random.default_rng(0)
    npdt = h.tensor_dtype_to_np_dtype(dtype)
    inits = [nh.from_array(rng.standard_normal((3, 2, 3, 3)).astype(npdt), "W"), *_bn_stats(rng, 3, npdt)]
    attrs: dict[str, object] = {"epsilon": 1e-3}
    if momentum is not None:
        attrs["momentum"] = momentum
    nodes = [
        h.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        h.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], list(bn_outputs), name="bn", **attrs
        ),
    ]
    ins = [h.make_tensor_value_info("x", dtype, [1, 2, 8, 8])]
    outs = [h.make_tensor_value_info("y", dtype, [1, 3, 6, 6])]
    if extra is not None:
        nodes += extra[0]
        outs += extra[1]
        inits += extra[2]
        ins.append(h.make_tensor_value_info("s0", T.FLOAT, [1]))
    m = h.make_model(h.make_graph(nodes, "g", ins, outs, inits), opset_imports=[h.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _empty_outputs() -> onnx.ModelProto:
    """A valid BN whose four optional outputs are present but empty (onnxruntime 1.2x crashes on it)."""
    return _conv_bn(("y", "", "", "", ""), opset=12)


def _slow(trips: int = 30_000_000) -> onnx.ModelProto:
    """Conv+BN next to a Loop of ``trips`` additions: one onnxruntime run takes about a minute."""
    body = h.make_graph(
        [h.make_node("Add", ["s_in", "one"], ["s_out"]), h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("s_in", T.FLOAT, [1]),
        ],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("s_out", T.FLOAT, [1])],
        [nh.from_array(np.ones(1, np.float32), "one")],
    )
    loop = h.make_node("Loop", ["trips", "", "s0"], ["s"], body=body, name="loop")
    return _conv_bn(
        ("y",),
        opset=17,
        extra=(
            [loop],
            [h.make_tensor_value_info("s", T.FLOAT, [1])],
            [nh.from_array(np.array(trips, np.int64), "trips")],
        ),
    )


def _ort(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_onnx(model, feeds)


def _worker_children() -> list[int]:
    """Live child processes of this process that run the onnxruntime worker."""
    me, found = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z" and b"worker.py" in cmd:
            found.append(int(d))
    return found


# -- 22.2: a crash of onnxruntime -------------------------------------------------------------------------


def test_fold_of_a_model_that_crashes_onnxruntime_runs_its_reference_in_the_fallback(tmp_path: Path) -> None:
    """``["Y", "", "", "", ""]`` made onnxruntime crash inside bnfold (exit 139, a hidden temporary left)."""
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_empty_outputs(), str(src))
    before = _digest(src)
    r = runner.invoke(app, ["fold", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "onnxruntime crashed (SIGSEGV)" in " ".join(
        r.output.split()
    )  # the note says why the reference ran elsewhere
    assert _digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]  # no temporary left
    x = np.random.default_rng(1).standard_normal((1, 2, 8, 8)).astype(np.float32)
    want = _ort(_conv_bn(("y",), opset=12), {"x": x})[0]  # the same BN without the empty outputs
    got = _ort(out, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_a_candidate_that_crashes_onnxruntime_is_one_typed_line(tmp_path: Path) -> None:
    """The reference runs in onnxruntime: a candidate that crashes it is not comparable (exit 2)."""
    with pytest.raises(NotComparableError, match=r"^candidate: onnxruntime crashed \(SIGSEGV\) on sample 0"):
        verify(_conv_bn(), _empty_outputs())
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(_conv_bn(), str(ref))
    onnx.save(_empty_outputs(), str(cand))
    r = runner.invoke(app, ["verify", str(ref), str(cand)])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "onnxruntime crashed (SIGSEGV)" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand.onnx", "ref.onnx"]
    assert _worker_children() == []  # the crashed worker is not kept (nor restarted for nothing)


def _left_bn(bn_outputs: tuple[str, ...]) -> onnx.ModelProto:
    """x -> BN (left: the padded Conv after it cannot take it) -> Conv(pads 1) -> y."""
    rng = np.random.default_rng(4)
    inits = [*_bn_stats(rng, 2), nh.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "W")]
    nodes = [
        h.make_node(
            "BatchNormalization", ["x", "gamma", "beta", "mean", "var"], ["a", *bn_outputs[1:]], name="bn"
        ),
        h.make_node("Conv", ["a", "W"], ["y"], pads=[1, 1, 1, 1], name="conv"),
    ]
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 8, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 3, 8, 8])],
        inits,
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 12)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_a_bn_left_in_place_loses_its_empty_outputs() -> None:
    """The written model runs in onnxruntime: the BN that stays has no empty output slots left."""
    model = _left_bn(("a", "", "", "", ""))
    folded, rep = fold_model(model, propagate=False)  # scale propagation would remove this BN
    assert rep.folded == 0 and rep.bn_after == 1
    onnx.checker.check_model(folded, full_check=True)
    assert [list(n.output) for n in folded.graph.node if n.op_type == "BatchNormalization"] == [["a"]]
    report = verify(_left_bn(("a",)), folded)  # the same model without empty outputs, in onnxruntime
    assert report.passed and [r.runtime for r in report.runtimes] == ["onnxruntime", "onnxruntime"]


def _crashing_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sessions: str) -> None:
    """The real worker, except that running a session in ``sessions`` (e.g. "{1}") writes a log line
    with escape codes and kills the process with SIGABRT."""
    from bnfold.verification import isolation

    fake = tmp_path / "crashing_worker.py"
    fake.write_text(
        "import os, runpy, signal, sys\n"
        f"g = runpy.run_path({isolation._SCRIPT!r}, run_name='worker')\n"
        "real = g['_Worker'].run\n"
        "def run(self, sid, *a):\n"
        f"    if sid in {sessions}:\n"
        "        sys.stderr.write('\\x1b[31mfatal: \\x1b]0;title\\x07 gone\\n'); sys.stderr.flush()\n"
        "        os.kill(os.getpid(), signal.SIGABRT)\n"
        "    return real(self, sid, *a)\n"
        "g['_Worker'].run = run\n"
        "g['main']()\n"
    )
    monkeypatch.setattr(isolation, "_SCRIPT", str(fake))
    isolation._kill_idle()  # the next verification starts the crashing worker


def test_any_crash_of_the_worker_is_one_typed_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever kills onnxruntime's process while it runs the candidate, bnfold gets one escaped line."""
    _crashing_worker(tmp_path, monkeypatch, "{1}")  # session 0: the reference, 1: the candidate
    with pytest.raises(NotComparableError) as e:
        verify(_conv_bn(), _conv_bn(), samples=2)
    msg = str(e.value)
    assert msg.startswith("candidate: onnxruntime crashed (SIGABRT) on sample 0")
    assert "fatal:" in msg and "\x1b" not in msg and "\x07" not in msg and "\n" not in msg
    assert _worker_children() == []


def test_a_crash_on_both_sides_runs_both_in_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _crashing_worker(tmp_path, monkeypatch, "{0, 1}")
    model = _conv_bn()
    folded, rep = fold_model(model)
    assert rep.folded == 1
    report = verify(model, folded, samples=2)
    assert report.passed
    assert [r.runtime for r in report.runtimes] == [REFERENCE_EVALUATOR, REFERENCE_EVALUATOR]
    assert all("onnxruntime crashed (SIGABRT)" in r.reason for r in report.runtimes)


# -- 28.9: signals do not wait for onnxruntime --------------------------------------------------------------


def test_an_interrupt_stops_a_long_onnxruntime_run_at_once() -> None:
    """Ctrl-C during a run of about a minute: raised within a second or two, the worker is gone."""
    model = _slow()

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            verify(model, model)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.monotonic() - t0 < 4.0
    assert _worker_children() == []  # the worker running the Loop was killed


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_verification_exits_at_once_and_leaves_nothing(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """``kill`` (SIGTERM to bnfold) and Ctrl-C (SIGINT to the whole process group, the worker included).

    SIGHUP takes SIGTERM's path (tests/test_cli_safety.py)."""
    src, out = tmp_path / "slow.onnx", tmp_path / "out.onnx"
    onnx.save(_slow(), str(src))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, "-m", "bnfold", "fold", str(src), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(f.name.startswith(".out.onnx.") for f in tmp_path.iterdir()):  # staged: verifying now
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)  # onnxruntime is inside the long run
        t0 = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)  # what a terminal does on Ctrl-C
        else:
            p.send_signal(sig)
        _, err = p.communicate(timeout=20)
        took = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    assert p.returncode == code, err
    assert took < 3.0
    assert "Traceback" not in err and "interrupted" in err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["slow.onnx"]  # no output, no temporary
    mark = f"worker.py\x00{p.pid}".encode()
    left = [d for d in os.listdir("/proc") if d.isdigit() and _cmdline_has(d, mark)]
    assert left == []  # bnfold's worker went with it


def _cmdline_has(pid: str, mark: bytes) -> bool:
    try:
        return mark in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# -- 28.7 / 22.8: onnxruntime's log and names from the file ----------------------------------------------


def _fails_at_run() -> onnx.ModelProto:
    """Conv+BN and a Reshape named with terminal escape codes that fails in onnxruntime at run time."""
    evil = "\x1b]0;pwned\x07\x1b[2J"
    extra = [h.make_node("Reshape", ["s0", "bad_shape"], ["s"], name=evil)]
    return _conv_bn(
        ("y",),
        opset=17,
        extra=(
            extra,
            [h.make_tensor_value_info("s", T.FLOAT, [2, 3])],
            [nh.from_array(np.array([2, 3], np.int64), "bad_shape")],
        ),
    )


def test_runtime_errors_are_escaped_and_its_log_stays_off_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """A node name with escape codes fails at run time: the error quotes it escaped; fd 2 stays clean."""
    model = _fails_at_run()
    folded, rep = fold_model(model)
    assert rep.folded == 1
    capfd.readouterr()
    with pytest.raises(NotComparableError) as e:
        verify(model, folded)
    msg = str(e.value)
    assert "\x1b" not in msg and "\x07" not in msg and "\\x1b" in msg
    assert "\n" not in msg
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # onnxruntime's own log did not reach the terminal


def test_json_fold_gets_no_runtime_log_on_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """``fold --json``: the document on stdout, one escaped line on stderr, nothing from onnxruntime."""
    import json

    src = tmp_path / "m.onnx"
    onnx.save(_fails_at_run(), str(src))
    capfd.readouterr()
    r = runner.invoke(app, ["fold", str(src), "-o", str(tmp_path / "out.onnx"), "--json"])
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["error"]["type"] == "NotComparableError" and "\\x1b" in doc["error"]["message"]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "\x1b" not in lines[0] and "\x07" not in lines[0]
    fd = capfd.readouterr()
    assert fd.err == "" and fd.out == ""  # onnxruntime wrote nothing to the process's own stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# -- 22.8: shapes bnfold chose ---------------------------------------------------------------------------


def _symbolic(bn: bool = True) -> onnx.ModelProto:
    """x[1, T] -> Reshape [1, 3, -1] (T must be a multiple of 3: the default 8 is not) -> Conv1d [-> BN]."""
    rng = np.random.default_rng(2)
    inits = [
        nh.from_array(np.array([1, 3, -1], np.int64), "shape"),
        nh.from_array(rng.standard_normal((3, 3, 1)).astype(np.float32), "W"),
    ]
    nodes = [
        h.make_node("Reshape", ["x", "shape"], ["r"]),
        h.make_node("Conv", ["r", "W"], ["c" if bn else "y"]),
    ]
    if bn:
        inits += _bn_stats(rng, 3)
        nodes.append(h.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]))
    g = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, "T"])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 3, None])],
        inits,
    )
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_shapes_that_do_not_run_name_the_input_and_the_flag() -> None:
    model = _symbolic()
    folded, rep = fold_model(model)
    assert rep.folded == 1
    with pytest.raises(NotComparableError) as e:
        verify(model, folded)
    msg, cli = str(e.value), e.value.text("cli")  # worded for Python, and for the CLI
    assert "x=1x8" in msg and "input_shapes={'x':" in msg and "inputs=" in msg
    assert "x=1x8" in cli and "--input-shape/-s x=" in cli and "--inputs" in cli
    assert verify(model, folded, input_shapes={"x": (1, 12)}).passed  # the hint's way out works


def test_a_model_without_changes_is_not_verified(tmp_path: Path) -> None:
    """No BN: nothing changed, so shapes that do not run cannot fail the command."""
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_symbolic(bn=False), str(src))
    r = runner.invoke(app, ["fold", str(src), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert "not verified: nothing changed" in r.stdout
    x = np.random.default_rng(3).standard_normal((1, 12)).astype(np.float32)
    np.testing.assert_array_equal(_ort(out, {"x": x})[0], _ort(src, {"x": x})[0])


# -- 22.6: the reference evaluator's BatchNormalization ----------------------------------------------------


@pytest.mark.parametrize("opset", [9, 12, 15])
def test_fallback_batchnorm_ignores_momentum(tmp_path: Path, opset: int) -> None:
    """float64 Conv (no onnxruntime kernel): both sides in the fallback; momentum is a training attribute."""
    model = _conv_bn(("y",), opset=opset, dtype=T.DOUBLE, momentum=0.9)
    folded, rep = fold_model(model)
    assert rep.folded == 1
    report = verify(model, folded)
    assert [r.runtime for r in report.runtimes] == [REFERENCE_EVALUATOR, REFERENCE_EVALUATOR]
    assert report.passed, report.worst()
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    r = runner.invoke(app, ["fold", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    line = " ".join(r.stdout.split())
    assert (
        "the ONNX reference evaluator, optimisations off" in line and "onnxruntime, optimisations" not in line
    )


# -- the worker's life ---------------------------------------------------------------------------------------


def test_one_worker_serves_many_verifications_and_a_big_one_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bnfold.verification import isolation

    model = _conv_bn()
    folded, _ = fold_model(model)
    assert verify(model, folded, samples=3, extra_level="all").passed
    first = _worker_children()
    assert len(first) == 1  # idle, waiting for the next verification
    assert verify(model, folded).passed and verify(folded, model).passed
    assert _worker_children() == first  # the same process: started once
    monkeypatch.setattr(isolation, "_KEEP_IDLE_BELOW", 0)  # every model counts as big now
    assert verify(model, folded).passed
    assert _worker_children() == []  # the worker that held a big model is ended, not kept
