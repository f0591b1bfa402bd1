"""Terminal output is data, signals clean up, and refusals come before any load (issue 12, CLI side).

A model's strings (node, tensor names) are shown escaped, never as terminal control or rich markup;
SIGTERM / SIGHUP leave no temporary file and exit 128 + signal; a bad output path is refused before the
model is loaded; every failure is one line on stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_cli import ROOT, assert_clean_error, run_onnx, tiny_onnx
from typer.testing import CliRunner

from bnfold.cli import app

runner = CliRunner()

EVIL = "\x1b]0;pwned\x07\x1b[31m[/oops][bold]red\r\nFAKE: all folded\x9b"
"""OSC title change + BEL, a colour escape, rich markup that would raise, CR/LF, a C1 control."""


def _hostile(tmp_path: Path) -> Path:
    m = tiny_onnx(input_name="in" + EVIL)
    for n in m.graph.node:
        if n.name in ("bn1", "bn2"):
            n.name = n.name + EVIL
    p = tmp_path / "evil.onnx"
    onnx.save(m, str(p))
    return p


def _no_raw_control(text: str) -> None:
    for ch in ("\x1b", "\x07", "\r", "\x9b"):
        assert ch not in text, repr(ch)
    assert not any(line.startswith("FAKE") for line in text.splitlines())


@pytest.mark.parametrize("extra", [[], ["--verbose"]])
def test_model_strings_are_escaped_and_markup_is_inert(tmp_path: Path, extra: list[str]) -> None:
    src = _hostile(tmp_path)
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(src), str(out), *extra])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    _no_raw_control(r.stdout + r.stderr)
    assert "[/oops][bold]red" in r.stdout  # shown as typed, not interpreted
    assert "\\x1b" in r.stdout  # the escape is visible as text
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(out, x), run_onnx(src, x), atol=1e-5, rtol=0)

    r = runner.invoke(app, ["inspect", str(src), "--json"])
    assert r.exit_code == 0
    assert "\x1b" not in r.stdout  # JSON escapes control characters itself
    names = {v["bn"] for v in json.loads(r.stdout)["verdicts"]}
    assert names == {"bn1" + EVIL, "bn2" + EVIL}  # and keeps the exact names


def test_model_strings_in_errors_are_escaped(tmp_path: Path) -> None:
    ref = tmp_path / "ref.onnx"
    onnx.save(tiny_onnx(), str(ref))
    cand = tiny_onnx()
    cand.graph.output[0].name = "y" + EVIL
    cand.graph.node[-1].output[0] = "y" + EVIL
    cand_path = tmp_path / "cand.onnx"
    onnx.save(cand, str(cand_path))
    r = runner.invoke(app, ["verify", str(ref), str(cand_path)])
    assert_clean_error(r, 2)
    _no_raw_control(r.stderr)


def test_unloadable_model_is_one_line_without_runtime_logs(tmp_path: Path) -> None:
    node = helper.make_node("Foo", ["x"], ["y"], domain="com.acme", name="foo")
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    m.ir_version = 8
    p = tmp_path / "foo.onnx"
    onnx.save(m, str(p))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "bnfold", "verify", str(p), str(p)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:"), r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_write_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    src = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(src))
    out = tmp_path / "out.onnx"
    # The signal arrives when the output's temporary file is complete and about to be renamed.
    script = (
        "import os, signal, time\n"
        "real = os.replace\n"
        f"def late(a, b):\n    os.kill(os.getpid(), {int(sig)}); time.sleep(5); real(a, b)\n"
        "os.replace = late\n"
        "from bnfold.cli import main\n"
        f"main(['fold', {str(src)!r}, {str(out)!r}, '--no-verify'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 128 + int(sig), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "interrupted" in r.stderr
    # The signal is held for the rename (bnfold.io.atomic.signals_deferred) and delivered right after it:
    # OUT is then the whole new model, and no temporary file is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "tiny.onnx"]
    assert len(onnx.load(str(out)).graph.node) >= 1


def test_output_suffix_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bnfold.io.loader as bio  # the module that calls _load_as

    loaded: list[str] = []
    real = bio._load_as

    def spy(p: str, *a: object, **k: object) -> object:
        loaded.append(p)
        return real(p, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(bio, "_load_as", spy)
    r = runner.invoke(
        app, ["fold", str(ROOT / "models" / "samples" / "lenet5.pt2"), "-o", str(tmp_path / "o.pt")]
    )
    assert_clean_error(r, 2, ".pt2")
    assert loaded == [] and not (tmp_path / "o.pt").exists()
    onnx_src = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(onnx_src))
    r = runner.invoke(app, ["fold", str(onnx_src), "-o", str(tmp_path / "o.pt")])
    assert_clean_error(r, 2, "o.pt")
    assert loaded == []


def test_a_broken_pt2_is_one_line_without_library_tracebacks(tmp_path: Path) -> None:
    import zipfile

    src = zipfile.ZipFile(ROOT / "models" / "samples" / "lenet5.pt2")
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(broken, "w") as z:  # a .pt2 without its archive_version record
        for name in src.namelist():
            if not name.endswith("archive_version"):
                z.writestr(name, src.read(name))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "bnfold", "inspect", str(broken)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and "broken.pt2" in lines[0], r.stderr
