"""Memory of the ONNX file jobs (issue 28, "Memory").

``fold`` and ``inspect`` read the weights of an external-data model from their file when they fold
them; the weights a fold writes wait for the writer in an unnamed temporary file (``O_TMPFILE``),
not in memory (:func:`bnfold.io.stream.spilling`); the folded model is freed before onnxruntime loads
the source and the staged output. The fast tests check that the results stay exact and that nothing
is left on disk, with weights over the spill threshold and chains whose second fold reads a spilled
weight back; the slow test measures peak RSS in child processes against ``onnx.load`` + ``onnx.save``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bnfold.files import FoldSettings, InspectSettings, fold_file, inspect_file
from bnfold.io import stream
from models.testing import run_onnx

REPO = Path(__file__).resolve().parents[1]


def _stats(rng: np.random.Generator, c: int, names: list[str]) -> list[onnx.TensorProto]:
    values = [rng.uniform(0.5, 2.0, c), rng.normal(0.3, 0.5, c), rng.normal(0.5, 1.0, c), rng.uniform(0.3, 3.0, c)]
    return [nh.from_array(v.astype(np.float32), n) for v, n in zip(values, names)]


def _chain_model(c: int, blocks: int, *, double_bn: bool = False, seed: int = 0) -> onnx.ModelProto:
    """``blocks`` x (Conv 1x1 [c, c] -> BN [-> BN]): with ``double_bn`` the second BN folds in a second
    pass, into the weight the first one wrote."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(blocks):
        w = (rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
        inits.append(nh.from_array(w, f"W{i}"))
        nodes.append(h.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}"))
        x = f"c{i}"
        for k in range(2 if double_bn else 1):
            names = [f"{p}{i}_{k}" for p in ("scale", "bias", "mean", "var")]
            inits += _stats(rng, c, names)
            nodes.append(h.make_node("BatchNormalization", [x, *names], [f"y{i}_{k}"], name=f"bn{i}_{k}"))
            x = f"y{i}_{k}"
    g = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [1, c, 1, 1])],
                     [h.make_tensor_value_info(x, T.FLOAT, [1, c, 1, 1])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _save(model: onnx.ModelProto, path: Path, external: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _outputs(path: Path, c: int) -> np.ndarray:
    x = np.random.default_rng(7).standard_normal((1, c, 1, 1)).astype(np.float32)
    return run_onnx(path, {"x": x})[0]


def _bns(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path), load_external_data=False).graph.node)


# 600 x 600 float32: 1.4 MB a weight, over the 1 MiB spill threshold
C = 600


@pytest.mark.parametrize("external_in", [True, False], ids=["external-in", "inline-in"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_fold_with_spilled_weights_is_exact_and_leaves_nothing(tmp_path: Path, external_in: bool, verify: bool) -> None:
    src = _save(_chain_model(C, 2, double_bn=True), tmp_path / "in" / "model.onnx", external_in)
    before = _digest(src.parent)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "folded.onnx"
    report = fold_file(src, dst, FoldSettings(verify=verify))
    assert report.bn_before == 4 and report.bn_after == 0 and _bns(dst) == 0
    if verify:
        assert report.verification is not None and report.verification.passed
    np.testing.assert_allclose(_outputs(dst, C), _outputs(src, C), rtol=1e-4, atol=1e-5)
    assert _digest(src.parent) == before  # the input is untouched
    # OUT and (external layout kept) its one data file: no temporary, no spill file
    names = sorted(p.name for p in out_dir.iterdir())
    if external_in:
        assert len(names) == 2 and names[0] == "folded.onnx" and names[1].endswith(".data")
    else:
        assert names == ["folded.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize("external_out", [True, False], ids=["external-out", "inline-out"])
def test_every_tensor_spilled_still_folds_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external_out: bool
) -> None:
    """Threshold 1 byte: every tensor the fold writes (biases too) goes through the spill file."""
    monkeypatch.setattr(stream, "SPILL_MIN_BYTES", 1)
    c = 16
    src = _save(_chain_model(c, 3, double_bn=True, seed=3), tmp_path / "in" / "model.onnx", True)
    dst = tmp_path / "out" / "folded.onnx"
    dst.parent.mkdir()
    report = fold_file(src, dst, FoldSettings(external_data=external_out))
    assert report.verification is not None and report.verification.passed
    assert _bns(dst) == 0
    np.testing.assert_allclose(_outputs(dst, c), _outputs(src, c), rtol=1e-4, atol=1e-5)
    # inline: no data file at all (nothing points at the spill file)
    assert len(list(dst.parent.iterdir())) == (2 if external_out else 1)
    m = onnx.load(str(dst), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            assert e.key != "location" or not os.path.isabs(e.value)


def test_a_full_disk_under_the_spill_keeps_the_tensors_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream.os, "pwrite", full)
    src = _save(_chain_model(C, 2, double_bn=True, seed=11), tmp_path / "in" / "model.onnx", True)
    dst = tmp_path / "out.onnx"
    report = fold_file(src, dst, FoldSettings())
    assert report.verification is not None and report.verification.passed and _bns(dst) == 0
    np.testing.assert_allclose(_outputs(dst, C), _outputs(src, C), rtol=1e-4, atol=1e-5)


def test_inspect_with_spilled_dry_run_predicts_the_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "SPILL_MIN_BYTES", 1)
    src = _save(_chain_model(C, 2, double_bn=True, seed=5), tmp_path / "in" / "model.onnx", True)
    before = _digest(src.parent)
    dry = inspect_file(src, InspectSettings())
    assert _digest(src.parent) == before
    dst = tmp_path / "folded.onnx"
    done = fold_file(src, dst, FoldSettings())
    assert [(v.bn, type(v).__name__) for v in dry.verdicts] == [(v.bn, type(v).__name__) for v in done.verdicts]
    assert (dry.bn_after, dry.params_after) == (done.bn_after, done.params_after) == (0, _params(dst))


def _params(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in m.graph.initializer)


@pytest.mark.parametrize("external_in", [True, False], ids=["external-in", "inline-in"])
def test_folded_model_is_freed_before_onnxruntime_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, external_in: bool
) -> None:
    """Verification reads the source file and the staged output: no model of the job stays in memory
    while onnxruntime holds both (before issue 28's fix the folded model did: one more copy of it)."""
    import gc

    import bnfold.verification as verification

    model = _chain_model(C, 2, seed=9)
    model.graph.name = "memory-probe"
    src = _save(model, tmp_path / "in" / "model.onnx", external_in)
    del model
    seen: list[int] = []
    real = verification.verify

    def probe(*args: object, **kwargs: object) -> object:
        gc.collect()
        seen.append(sum(1 for o in gc.get_objects()
                        if type(o) is onnx.ModelProto and o.graph.name == "memory-probe"))
        return real(*args, **kwargs)

    monkeypatch.setattr(verification, "verify", probe)
    report = fold_file(src, tmp_path / "folded.onnx", FoldSettings())
    assert report.verification is not None and report.verification.passed
    assert seen == [0]


def test_spilling_creates_no_name_and_is_off_without_a_folder(tmp_path: Path) -> None:
    with stream.spilling(tmp_path) as on:
        t = onnx.TensorProto()
        t.name, t.data_type = "w", T.FLOAT
        value = np.arange(stream.SPILL_MIN_BYTES // 4, dtype=np.float32)
        assert stream.spill_tensor(t, value) is on
        assert list(tmp_path.iterdir()) == []
        if on:
            from bnfold.onnx.graph import read_lazy_tensor

            back = read_lazy_tensor(t)
            assert back is not None and np.array_equal(back, value)
    assert list(tmp_path.iterdir()) == []
    with stream.spilling(None) as on:
        assert not on and not stream.spillable(np.zeros(stream.SPILL_MIN_BYTES, np.uint8))


# --- peak RSS against onnx.load + onnx.save (child processes) --------------------------------------

_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
print(ru.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))
"""

_FLOOR = """
import sys, onnx
m = onnx.load(sys.argv[1])
onnx.save(m, sys.argv[2], save_as_external_data=True, location="out.onnx.data")
"""


def _peak(cmd: list[str], cwd: Path) -> int:
    """Peak RSS of ``cmd`` alone: forked from a small launcher, so this process's size is not inherited."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    rss, code = (int(v) for v in res.stdout.split()[-2:])
    assert code == 0, res.stderr[-2000:]
    return rss


def _peaks(src: Path, work: Path, names: tuple[str, ...]) -> dict[str, int]:
    out = work / "out"
    out.mkdir(exist_ok=True)
    bnfold = [sys.executable, "-m", "bnfold"]
    jobs = {
        "floor": [sys.executable, "-c", _FLOOR, str(src), str(out / "out.onnx")],
        "inspect": [*bnfold, "inspect", str(src)],
        "fold --no-verify": [*bnfold, "fold", str(src), "-o", str(out / "out.onnx"), "--no-verify"],
        "fold": [*bnfold, "fold", str(src), "-o", str(out / "out.onnx")],
    }
    peaks = {}
    for name in names:
        cmd = jobs[name]
        peaks[name] = _peak(cmd, work)
        for p in out.iterdir():
            p.unlink()
    return peaks


@pytest.mark.slow
def test_peak_memory_against_load_and_save(tmp_path: Path) -> None:
    """External data, 4 x 16 MB weights: each job's peak above its fixed cost (interpreter and imports:
    the job on a tiny model of the same shape; inspect's stands for fold --no-verify's, they import
    the same), as a ratio to load+save's. Before issue 28's fix: inspect 2.0x, fold --no-verify
    1.2x, fold 3.2x (the benchmark's figures, benchmarks/bench_memory.py)."""
    big = _save(_chain_model(2048, 4), tmp_path / "big" / "model.onnx", True)
    tiny = _save(_chain_model(64, 4), tmp_path / "tiny" / "model.onnx", True)
    peak = _peaks(big, tmp_path, ("floor", "inspect", "fold --no-verify", "fold"))
    fixed = _peaks(tiny, tmp_path, ("floor", "inspect", "fold"))
    fixed["fold --no-verify"] = fixed["inspect"]
    net = {k: peak[k] - fixed[k] for k in peak}
    ratio = {k: round(net[k] / net["floor"], 2) for k in net}
    assert ratio["inspect"] <= 1.2, ratio
    assert ratio["fold --no-verify"] <= 1.2, ratio
    # The goal is 1.5; what is left above it is onnxruntime holding the reference and the candidate
    # sessions at once (bnfold.verification), not the fold.
    assert ratio["fold"] <= 2.0, ratio
