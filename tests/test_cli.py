"""The ``bnfold`` command line, driven through typer's CliRunner and real subprocesses.

What a user checks: the exit code, one line on stderr naming the file, no traceback, the input file's
bytes unchanged, no partial output, and the folded model computing the same as the original.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import bnfold
from bnfold.cli import app
from models.stats import bn_stats
from models.testing import ATOL_F32, ort_session

ROOT = Path(__file__).resolve().parents[1]
FP32_ATOL = ATOL_F32  # models.testing: the one tolerance table
"""float32 fold error floor on outputs of scale ~1-10 (a few ulp of the accumulated conv sums)."""

runner = CliRunner()


# ------------------------------------------------------------------------------------------ models
def _bn_stats(rng: np.random.Generator, c: int) -> list[np.ndarray]:
    """Trained-looking BN parameters (models.stats.bn_stats), in float32."""
    return [a.astype(np.float32) for a in bn_stats(c, rng)]


def tiny_onnx(seed: int = 0, *, out_channels: int = 4, input_name: str = "x") -> onnx.ModelProto:
    """x -> Conv -> BN1 -> Relu -> BN2 -> y: BN1 folds into the Conv, BN2 has nothing to fold into."""
    rng = np.random.default_rng(seed)
    c = out_channels
    w = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    for i in (1, 2):
        for name, arr in zip(("scale", "bias", "mean", "var"), _bn_stats(rng, c)):
            inits.append(numpy_helper.from_array(arr, f"bn{i}_{name}"))
    nodes = [
        helper.make_node("Conv", [input_name, "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
            ["n1"],
            name="bn1",
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["n1"], ["r"], name="relu"),
        helper.make_node(
            "BatchNormalization",
            ["r", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"],
            ["y"],
            name="bn2",
            epsilon=1e-3,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def count_bn(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(p))
    return p


def assert_clean_error(result, code: int, *names: str) -> None:
    """Exit ``code``, exactly one stderr line starting with 'bnfold: error:' naming a file, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnfold: error:"), lines[0]
    assert "Traceback" not in result.output
    if names:
        assert any(n in lines[0] for n in names), (names, lines[0])


# ---------------------------------------------------------------------------------- help & version
@pytest.mark.parametrize("cmd", [[], ["fold"], ["inspect"], ["verify"], ["freeze"], ["bench"]])
def test_version(cmd: list[str]) -> None:
    r = runner.invoke(app, [*cmd, "--version"])
    assert r.exit_code == 0
    assert r.stdout.strip() == f"bnfold {bnfold.__version__}"


@pytest.mark.parametrize("cmd", [[], ["fold"], ["inspect"], ["verify"], ["freeze"], ["bench"]])
def test_help_on_every_command(cmd: list[str]) -> None:
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.stdout


def test_no_args_shows_help() -> None:
    r = runner.invoke(app, [])
    assert "Usage" in r.output


# ------------------------------------------------------------------------------------------- fold
def test_fold_onnx(model_path: Path, tmp_path: Path) -> None:
    before = digest(model_path)
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(out), "--verbose"])
    assert r.exit_code == 0, r.output
    assert digest(model_path) == before
    assert count_bn(out) == 1 < count_bn(model_path) == 2
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(out, x), run_onnx(model_path, x), atol=FP32_ATOL, rtol=0)
    assert "bn1" in r.stdout and "bn2" in r.stdout  # --verbose: one row per BN
    assert "folded" in r.stdout and "left" in r.stdout
    assert [p.name for p in tmp_path.iterdir()] == sorted(["tiny.onnx", "out.onnx"]) or set(
        p.name for p in tmp_path.iterdir()
    ) == {"tiny.onnx", "out.onnx"}


def test_fold_onnx_json_and_affine(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(out), "--affine", "--json", "--samples", "2"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # stdout holds the JSON alone
    assert data["summary"]["bn_before"] == 2 and data["summary"]["bn_after"] == 0
    statuses = {v["bn"]: v["status"] for v in data["verdicts"]}
    assert statuses == {"bn1": "folded", "bn2": "affine"}
    assert data["verification"]["passed"] is True
    assert data["model"]["size_bytes"] > 0 and data["output"]["written"] is True
    assert count_bn(out) == 0
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(out, x), run_onnx(model_path, x), atol=FP32_ATOL, rtol=0)


def test_fold_quiet_prints_nothing(model_path: Path, tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["fold", str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet", "--no-verify"]
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr == ""


def test_fold_in_place(model_path: Path) -> None:
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(model_path), "--in-place", "-q"])
    assert r.exit_code == 0, r.output
    assert count_bn(model_path) == 1


# ---------------------------------------------------------------------------------------- inspect
def test_inspect(model_path: Path) -> None:
    before = digest(model_path)
    r = runner.invoke(app, ["inspect", str(model_path)])
    assert r.exit_code == 0, r.output
    assert "bn2" in r.stdout and "no_producer" in r.stdout  # the BN left, with its reason
    assert "bn1" not in r.stdout.split("left:")[-1]  # by default only the BNs left are listed
    r = runner.invoke(app, ["inspect", str(model_path), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["dry_run"] is True
    by_bn = {v["bn"]: v for v in data["verdicts"]}
    assert by_bn["bn1"]["status"] == "folded" and by_bn["bn1"]["target"] == "conv"
    assert by_bn["bn2"]["status"] == "left" and by_bn["bn2"]["reason"] == "no_producer"
    assert digest(model_path) == before


# ----------------------------------------------------------------------------------------- verify
def test_verify_pass_fail_and_not_comparable(model_path: Path, tmp_path: Path) -> None:
    folded = tmp_path / "folded.onnx"
    assert runner.invoke(app, ["fold", str(model_path), "-o", str(folded), "-q"]).exit_code == 0

    r = runner.invoke(app, ["verify", str(model_path), str(folded), "--samples", "2", "--opt-level", "all"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", str(model_path), str(folded), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["verification"]["passed"] is True

    # A candidate whose BN2 scale is off by 1%: not equivalent -> 1.
    bad = tiny_onnx()
    for t in bad.graph.initializer:
        if t.name == "bn2_scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.01), t.name))
    bad_path = tmp_path / "bad.onnx"
    onnx.save(bad, str(bad_path))
    r = runner.invoke(app, ["verify", str(model_path), str(bad_path)])
    assert_clean_error(r, 1, "bad.onnx")
    r = runner.invoke(app, ["verify", str(model_path), str(bad_path), "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["verification"]["passed"] is False

    # Different output shape: cannot be compared -> 2.
    other = tmp_path / "other.onnx"
    onnx.save(tiny_onnx(out_channels=5), str(other))
    assert_clean_error(runner.invoke(app, ["verify", str(model_path), str(other)]), 2)


def test_fold_refuses_to_write_when_verification_fails(model_path: Path, tmp_path: Path, monkeypatch) -> None:
    """A fold whose result does not match is not written (exit 1) unless --force."""
    import bnfold.onnx as bonnx

    real = bonnx.fold_model

    def broken(model, **kw):
        out, report = real(model, **kw)
        for t in out.graph.initializer:
            if t.name == "bn2_bias":
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) + np.float32(0.1), t.name))
        return out, report

    monkeypatch.setattr(bonnx, "fold_model", broken)
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(out)])
    assert_clean_error(r, 1, "out.onnx")
    assert not out.exists()
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(out), "--force", "--json"])
    assert r.exit_code == 1, r.output  # written because of --force, and a pipeline still sees the failure
    data = json.loads(r.stdout)
    assert out.exists() and data["verification"]["passed"] is False
    assert data["ok"] is False and data["exit_code"] == 1 and data["output"]["written"] is True


# -------------------------------------------------------------------------------- PyTorch files
@pytest.fixture()
def lenet_state_dict(tmp_path: Path) -> Path:
    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    m = randomize_bn(lenet5(), seed=3).eval()
    p = tmp_path / "lenet.pt"
    torch.save(m.state_dict(), p)
    return p


def test_freeze_state_dict(lenet_state_dict: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    from models.lenet import lenet5

    monkeypatch.chdir(ROOT)
    before = digest(lenet_state_dict)
    out = tmp_path / "frozen.pt"
    r = runner.invoke(
        app, ["freeze", str(lenet_state_dict), "--model", "models.lenet:lenet5", "-o", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data["frozen"]) == 4
    assert digest(lenet_state_dict) == before
    # The frozen checkpoint computes what the original computes, in train mode too.
    from bnfold.freezing import freeze

    ref = lenet5()
    ref.load_state_dict(torch.load(lenet_state_dict))
    ref.eval()
    frozen = freeze(lenet5())
    frozen.load_state_dict(torch.load(out))
    frozen.train()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), ref(x), atol=FP32_ATOL, rtol=0)


def test_fold_state_dict_to_onnx(lenet_state_dict: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "lenet.onnx"
    r = runner.invoke(
        app,
        [
            "fold",
            str(lenet_state_dict),
            "-m",
            "models.lenet:lenet5",
            "-s",
            "x=2x1x32x32",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["summary"]["bn_before"] == 4 and data["summary"]["bn_after"] == 0
    assert data["verification"]["passed"] is True
    assert count_bn(out) == 0


def test_pickled_module_needs_trust_flag(tmp_path: Path) -> None:
    import torch

    from models.lenet import lenet5
    from models.stats import randomize_bn

    p = tmp_path / "whole.pt"
    torch.save(randomize_bn(lenet5(), seed=1).eval(), p)
    r = runner.invoke(app, ["inspect", str(p)])
    assert_clean_error(r, 2, "whole.pt")
    assert "--trust-pickle" in r.stderr
    r = runner.invoke(app, ["inspect", str(p), "--trust-pickle", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["bn_before"] == 4


# -------------------------------------------------------------------------------------- bad input
def _bad_inputs(tmp: Path, good: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (argv, a name the error line must hold). Every case must exit 2 and write nothing."""
    (tmp / "folder").mkdir()
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    data = good.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp / "notes.txt").write_text("this is not a model\n")
    (tmp / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    broken = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["missing"], ["y"])],
            "g",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    (tmp / "rejected.onnx").write_bytes(broken.SerializeToString())
    (tmp / "plain.txt").write_text("x")
    out = str(tmp / "out.onnx")
    g = str(good)
    return {
        "missing path": (["fold", str(tmp / "nope.onnx"), "-o", out], "nope.onnx"),
        "directory": (["fold", str(tmp / "folder"), "-o", out], "folder"),
        "empty file": (["fold", str(tmp / "empty.onnx"), "-o", out], "empty.onnx"),
        "random bytes": (["fold", str(tmp / "random.onnx"), "-o", out], "random.onnx"),
        "truncated": (["fold", str(tmp / "truncated.onnx"), "-o", out], "truncated.onnx"),
        "text file": (["fold", str(tmp / "notes.txt"), "-o", out], "notes.txt"),
        "unknown format": (["inspect", str(tmp / "image.bin")], "image.bin"),
        "checker rejects": (["fold", str(tmp / "rejected.onnx"), "-o", out], "rejected.onnx"),
        "missing output folder": (["fold", g, "-o", str(tmp / "nodir" / "out.onnx")], "nodir"),
        "unwritable output": (["fold", g, "-o", str(tmp / "plain.txt" / "out.onnx")], "plain.txt"),
        "unknown output extension": (["fold", g, "-o", str(tmp / "out.xyz")], "out.xyz"),
        "bad shape option": (["fold", g, "-o", out, "--input-shape", "x=1xAx8"], "1xAx8"),
        "shape does not fit": (["fold", g, "-o", out, "--input-shape", "x=1x3x8"], "tiny.onnx"),
        "shape names no input": (["verify", g, g, "--input-shape", "nope=1x3x8x8"], "tiny.onnx"),
        "out equals model": (["fold", g, "-o", g], "tiny.onnx"),
        "missing candidate": (["verify", g, str(tmp / "nope.onnx")], "nope.onnx"),
        "bench missing": (["bench", str(tmp / "nope.onnx")], "nope.onnx"),
        "freeze on onnx": (["freeze", g, "-o", str(tmp / "f.pt")], "tiny.onnx"),
        "bad factory": (["fold", g, "-o", out, "--model", "nocolon"], "nocolon"),
    }


CASES = [
    "missing path",
    "directory",
    "empty file",
    "random bytes",
    "truncated",
    "text file",
    "unknown format",
    "checker rejects",
    "missing output folder",
    "unwritable output",
    "unknown output extension",
    "bad shape option",
    "shape does not fit",
    "shape names no input",
    "out equals model",
    "missing candidate",
    "bench missing",
    "freeze on onnx",
    "bad factory",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exit_2(case: str, model_path: Path, tmp_path: Path) -> None:
    argv, name = _bad_inputs(tmp_path, model_path)[case]
    before = {p.name: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    r = runner.invoke(app, argv)
    assert_clean_error(r, 2, name)
    after = {p.name: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing changed, no temporary file left


# ------------------------------------------------------------------------------------------- bench
def test_bench(model_path: Path) -> None:
    r = runner.invoke(app, ["bench", str(model_path), "--runs", "3", "--warmup", "1", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    settings = {t["setting"] for t in data["timings"]}
    assert settings == {"onnxruntime ORT_DISABLE_ALL", "onnxruntime ORT_ENABLE_ALL"}
    assert all(t["original_ms"] > 0 and t["folded_ms"] > 0 for t in data["timings"])
    r = runner.invoke(app, ["bench", str(model_path), "--runs", "2", "--warmup", "0"])
    assert r.exit_code == 0 and "speedup" in r.stdout


# ----------------------------------------------------------------------------------- subprocesses
def _env() -> dict[str, str]:
    env = dict(os.environ)
    # No empty entry: an empty PYTHONPATH element puts the current folder on sys.path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def test_subprocess_fold_onnx_never_imports_torch(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    code = (
        "import sys\n"
        "from bnfold.cli import main\n"
        f"sys.argv = ['bnfold', 'fold', {str(model_path)!r}, '-o', {str(out)!r}, '--json', '--samples', '2']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, leaked[:5]\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["summary"]["bn_after"] == 1
    assert count_bn(out) == 1


def test_subprocess_python_m_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "random.onnx"
    bad.write_bytes(os.urandom(2000))
    p = subprocess.run(
        [sys.executable, "-m", "bnfold", "fold", str(bad), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "random.onnx" in lines[0] and "Traceback" not in p.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_subprocess_help_is_fast_and_torch_free() -> None:
    code = (
        "import sys\nfrom bnfold.cli import main\nsys.argv=['bnfold','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules\n"
        "assert 'onnxruntime' not in sys.modules\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    assert "fold" in p.stdout


# ------------------------------------------------------------------------- unexpected failures
def _raise_in_fold(monkeypatch, exc: BaseException) -> None:
    import bnfold.onnx as bonnx

    def boom(model, **kw):
        raise exc

    monkeypatch.setattr(bonnx, "fold_model", boom)


def test_unexpected_error_is_one_line_and_debug_shows_traceback(
    model_path: Path, tmp_path: Path, monkeypatch
) -> None:
    _raise_in_fold(monkeypatch, RuntimeError("something broke\nsecond line"))
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(out)])
    assert_clean_error(r, 2, "tiny.onnx")
    assert "RuntimeError: something broke" in r.stderr and "--debug" in r.stderr
    r = runner.invoke(app, ["--debug", "fold", str(model_path), "-o", str(out)])
    assert r.exit_code == 2 and "Traceback" in r.stderr
    assert not out.exists()


def test_interrupt_exits_130_without_partial_file(model_path: Path, tmp_path: Path, monkeypatch) -> None:
    import bnfold.io as bio

    real_save = bio.save

    def interrupted_save(model, path, **kw):
        with bio.atomic_path(path) as tmp:  # the write starts, then Ctrl-C arrives
            Path(tmp).write_bytes(b"partial")
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interrupted_staged_save(model, path, **kw):  # the file layer stages ONNX outputs
        interrupted_save(model, path, **kw)
        yield

    monkeypatch.setattr(bio, "save", interrupted_save)
    monkeypatch.setattr(bio, "staged_save", interrupted_staged_save)
    out = tmp_path / "out.onnx"
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(out)])
    assert r.exit_code == 130
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]
    assert real_save is not None


def test_no_verify(model_path: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["fold", str(model_path), "-o", str(tmp_path / "o.onnx"), "--no-verify", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verification"] is None


def test_bench_pytorch_state_dict(lenet_state_dict: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    r = runner.invoke(
        app,
        [
            "bench",
            str(lenet_state_dict),
            "-m",
            "models.lenet:lenet5",
            "-s",
            "x=1x1x32x32",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {t["setting"] for t in data["timings"]} == {
        "onnxruntime ORT_DISABLE_ALL",
        "onnxruntime ORT_ENABLE_ALL",
        "pytorch eager",
    }
    assert data["summary"]["bn_before"] == 4 and data["summary"]["bn_after"] == 0


# ------------------------------------------------------------------------------ jobs (the core)
def test_fold_file_returns_data_and_reports_progress(model_path: Path, tmp_path: Path) -> None:
    from bnfold.files import FoldSettings, VerifySettings, fold_file

    stages: list[tuple[str, int, int]] = []
    report = fold_file(
        model_path,
        tmp_path / "o.onnx",
        FoldSettings(verification=VerifySettings(samples=2)),
        progress=lambda *a: stages.append(a),
    )
    assert report.folded == 1 and report.bn_after == 1
    assert report.verification is not None and report.verification.passed
    assert report.verification.samples == 2
    assert report.files is not None and report.files.written and (report.files.size_after or 0) > 0
    assert {s for s, _, _ in stages} >= {"load", "fold", "verify", "save"}
    assert all(0 <= d <= t for _, d, t in stages)


def test_reference_state_dict_needs_no_input_shape(
    lenet_state_dict: Path, tmp_path: Path, monkeypatch
) -> None:
    """The reference factories say what their input looks like: fold to ONNX and bench without --input-shape."""
    import onnx

    monkeypatch.chdir(ROOT)
    out = tmp_path / "lenet.onnx"
    r = runner.invoke(
        app, ["fold", str(lenet_state_dict), "--model", "models.lenet:lenet5", "-o", str(out), "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["verification"]["passed"]
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "BatchNormalization"]
    r = runner.invoke(
        app, ["bench", str(lenet_state_dict), "--model", "models.lenet:lenet5", "--runs", "2", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)
