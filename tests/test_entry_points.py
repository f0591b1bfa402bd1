"""The same model through every entry point: same written weights, same denormal flush; exports from threads.

Issue 23: ``bnfold.export_onnx`` wrote the subnormal weights ``bnfold.fold`` flushes (one post-fold
sequence, :mod:`bnfold.postfold`, now serves every entry point). Issue 28.11: torch's ONNX exporter
keeps its state in globals, so ``export_onnx`` / ``verify`` from several threads broke each other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import bnfold
from bnfold.files import fold_file
from bnfold.files.settings import FoldSettings, InputSettings, LoadSettings
from models.stats import randomize_bn
from models.testing import run_onnx

TINY = float(torch.finfo(torch.float32).tiny)  # 1.18e-38: below it a nonzero float32 is subnormal


def _subnormal(a: np.ndarray) -> int:
    return int(np.count_nonzero((a != 0) & (np.abs(a) < TINY)))


def _tiny_gamma_model() -> nn.Module:
    """Conv2d(3, 4, 3) + BatchNorm2d(4) with realistic statistics and one gamma of 1e-39 (issue 23's probe)."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=3).eval()
    with torch.no_grad():
        model[1].weight[1] = 1e-39  # channel 1's folded weights (27 of them) and nothing else go subnormal
    return model


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _module_weights(m: nn.Module) -> list[np.ndarray]:
    conv = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
    assert conv.bias is not None
    return [conv.weight.detach().numpy(), conv.bias.detach().numpy()]


def _onnx_weights(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    return [inits[conv.input[1]], inits[conv.input[2]]]


def test_every_entry_point_flushes_the_same_denormals(tmp_path: Path) -> None:
    model, x = _tiny_gamma_model(), _x()
    exact = bnfold.fold(model, flush_denormals=False)  # the fold before the flush: the subnormals are there
    n_sub = _subnormal(_module_weights(exact)[0])
    assert n_sub == 27  # 3 x 3 x 3 weights of channel 1

    folded = bnfold.fold(model)
    folded2, report = bnfold.fold_with_report(model)
    export_report = bnfold.export_onnx(model, x, str(tmp_path / "export.onnx"))
    src = tmp_path / "model.pt"
    torch.save(model, src)
    settings = FoldSettings(
        load=LoadSettings(trust_pickle=True),  # the test wrote the pickle itself
        inputs=InputSettings(input_shapes={"input": tuple(x.shape)}),
    )
    file_reports = {out: fold_file(src, tmp_path / out, settings) for out in ("file.onnx", "file.pt")}
    written = {
        "fold": _module_weights(folded),
        "fold_with_report": _module_weights(folded2),
        "export_onnx": _onnx_weights(tmp_path / "export.onnx"),
        "fold_file .pt -> .onnx": _onnx_weights(tmp_path / "file.onnx"),
        "fold_file .pt -> .pt": _module_weights(torch.load(tmp_path / "file.pt", weights_only=False)),
    }
    flushed = {
        "fold_with_report": report.flushed_denormals,
        "export_onnx": export_report.flushed_denormals,
        **{f"fold_file .pt -> .{k.split('.')[1]}": r.flushed_denormals for k, r in file_reports.items()},
    }
    assert flushed == dict.fromkeys(flushed, n_sub)
    reports = {"fold_with_report": report, "export_onnx": export_report, **file_reports}
    assert {k: (r.folded, r.bn_after) for k, r in reports.items()} == dict.fromkeys(reports, (1, 0))
    want_w, want_b = _module_weights(folded)
    assert _subnormal(want_w) == 0 and np.count_nonzero(want_w[1] == 0) == n_sub
    for where, (w, b) in written.items():
        assert _subnormal(w) == 0 and _subnormal(b) == 0, where
        np.testing.assert_array_equal(w, want_w, err_msg=where)
        np.testing.assert_array_equal(b, want_b, err_msg=where)
    # the flushed fold still computes what the original computes
    with torch.no_grad():
        want = model(x).numpy()
    got = run_onnx(onnx.load(str(tmp_path / "export.onnx")), {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_export_onnx_keeps_denormals_on_request(tmp_path: Path) -> None:
    model = _tiny_gamma_model()
    report = bnfold.export_onnx(model, _x(), str(tmp_path / "kept.onnx"), flush_denormals=False)
    assert report.flushed_denormals is None
    assert _subnormal(_onnx_weights(tmp_path / "kept.onnx")[0]) == 27


def _small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), seed=seed).eval()


@pytest.mark.parametrize("job", ["export_onnx", "verify"])
def test_eight_threads_export_at_once(tmp_path: Path, job: str) -> None:
    x = _x()
    models = [_small(i) for i in range(8)]  # built here: torch's seed is global, a thread would race for it

    def run(i: int) -> str:
        model = models[i]
        if job == "export_onnx":
            report = bnfold.export_onnx(model, x, str(tmp_path / f"m{i}.onnx"))
            assert report.verification is not None
            return "ok" if report.verification.passed else "failed"
        return "ok" if bnfold.verify(model, bnfold.fold(model), example_inputs=x).passed else "failed"

    with ThreadPoolExecutor(8) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(run, i) for i in range(8)]]
    assert results == ["ok"] * 8
    if job == "export_onnx":  # each file is its own model's fold, not another thread's
        for i in range(8):
            with torch.no_grad():
                want = models[i](x).numpy()
            got = run_onnx(onnx.load(str(tmp_path / f"m{i}.onnx")), {"input": x.numpy()})[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
