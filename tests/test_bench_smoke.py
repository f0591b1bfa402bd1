"""Smoke test of benchmarks/bench_peers.py: its reduced path runs on one tiny model and writes a report.

Not a timing test: it checks that the harness imports, runs a whole job in a child process, measures
latency and error, and that the markdown report holds the tables a reader looks for.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from models.testing import run_onnx

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "bench_peers.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # a whole benchmark run, not a unit test
def test_quick_path_writes_report(tmp_path: Path) -> None:
    bench = _load_bench()
    rc = bench.main(
        [
            "--quick",
            "--models", "mnist_mlp",
            "--tools", "floor,onnxruntime",
            "--repeats", "1",
            "--lat-repeats", "2",
            "--no-plot",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert rc == 0
    text = (tmp_path / "peers.md").read_text()
    assert "## Machine" in text and "mnist_mlp" in text
    assert "load+save (I/O floor)" in text
    assert "onnxruntime offline BASIC" in text
    assert "PyTorch eager" in text
    assert "FAILED" not in text.split("## PyTorch eager")[0]


def test_chain_is_valid_and_bn_changes_output() -> None:
    bench = _load_bench()
    model = bench.build_chain(3)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 3
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    y = run_onnx(model, {"input": x})[0]
    assert y.shape == x.shape and np.isfinite(y).all()
    assert np.abs(y - x).max() > 1e-2  # the BNs are not the identity
