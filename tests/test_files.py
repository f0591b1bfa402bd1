"""The file layer (bnfold.files): one settings record per job, typed reports, what ships is what was verified.

What a user checks: a bad option is refused by its flag before anything is read; the written model
computes what the original does; a PyTorch -> ONNX fold gives exactly one verdict per BatchNorm the
model has; inspect on PyTorch predicts the BN count as a typed field; freeze returns a typed report
whose frozen layers are the FrozenBatchNorm modules of the written model.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import OptionError
from bnfold.files import (
    FoldSettings,
    FreezeSettings,
    InputSettings,
    InspectSettings,
    LoadSettings,
    VerifySettings,
    fold_file,
    freeze_file,
    inspect_file,
)
from bnfold.files import output as files_output
from bnfold.nn.frozen import FrozenBatchNorm
from bnfold.records import FileInfo, FreezeReport
from models.stats import randomize_bn
from models.testing import run_onnx


class _Net(nn.Module):
    """conv -> bn (folds), relu -> bn (no layer to fold into in PyTorch: the ONNX fold decides)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(torch.relu(self.bn(self.conv(x))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(_Net(), seed=3).eval()


def _physical_bn(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        (FoldSettings(verification=VerifySettings(samples=0)), "--samples 0"),
        (FoldSettings(inputs=InputSettings(seed=-1)), "--seed -1"),
        (FoldSettings(verify=False, verification=VerifySettings(atol=1e-3)), "--atol"),
        (FoldSettings(export=bnfold.files.ExportSettings(opset=3)), "--opset 3"),
    ],
)
def test_bad_option_is_refused_by_its_flag_before_any_load(
    tmp_path: Path, settings: FoldSettings, flag: str
) -> None:
    src = tmp_path / "missing.onnx"  # never read: the option check comes first
    with pytest.raises(OptionError, match=flag):
        fold_file(src, tmp_path / "out.onnx", settings)
    assert not (tmp_path / "out.onnx").exists()


def test_settings_are_frozen() -> None:
    s = FoldSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.verify = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.options.affine = True  # type: ignore[misc]


@pytest.mark.parametrize("program", [False, True], ids=["module", "exported_program"])
def test_pytorch_to_onnx_gives_one_verdict_per_physical_bn(tmp_path: Path, program: bool) -> None:
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    if program:
        src = tmp_path / "m.pt2"
        torch.export.save(torch.export.export(model, (x,)), str(src))
        settings = FoldSettings()
    else:
        src = tmp_path / "m.pt"
        torch.save(model, src)
        settings = FoldSettings(load=LoadSettings(trust_pickle=True), inputs=InputSettings(["x=2x3x8x8"]))
    rep = fold_file(src, tmp_path / "m.onnx", settings)
    assert len(rep.verdicts) == _physical_bn(model) == 2
    assert rep.verification is not None and rep.verification.passed
    folded = onnx.load(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        want = model(x).numpy()
    got = run_onnx(folded, {folded.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert isinstance(rep.files, FileInfo) and rep.files.written and rep.files.output_format == "onnx"


def test_onnx_output_verifies_the_staged_file_then_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The candidate verification runs on is the file that is renamed into place (when io stages)."""
    from bnfold.files import fold as fold_job

    model = _net()
    src = tmp_path / "m.onnx"
    # The exporter keeps the BN (no fusion of its own), so bnfold's fold changes the model and verifies it.
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 8, 8),),
        str(src),
        input_names=["x"],
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    seen: list[object] = []
    real = fold_job.run_verify

    def spy(reference: object, candidate: object, *a: object, **k: object) -> object:
        seen.append(candidate)
        return real(reference, candidate, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(fold_job, "run_verify", spy)
    out = tmp_path / "out.onnx"
    rep = fold_file(src, out, FoldSettings())
    assert rep.verification is not None and rep.verification.passed
    assert len(seen) == 1 and isinstance(seen[0], str) and Path(seen[0]).parent == out.parent
    assert not Path(seen[0]).exists() and out.exists()  # renamed into place
    assert files_output.same_file(out, out)


def test_inspect_pytorch_predicts_every_count_of_the_fold(tmp_path: Path) -> None:
    model = _net()
    src = tmp_path / "m.pt"
    torch.save(model, src)
    before = copy.deepcopy(model.state_dict())
    rep = inspect_file(
        src, InspectSettings(load=LoadSettings(trust_pickle=True), inputs=InputSettings(["x=2x3x8x8"]))
    )
    folded = bnfold.fold(model, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert rep.dry_run and rep.predicted_counts is None  # every count is a prediction of the fold
    assert rep.bn_after == _physical_bn(folded)  # the prediction is what fold does
    assert rep.params_after == sum(p.numel() for p in folded.parameters()) + sum(
        b.numel() for b in folded.buffers()
    )  # params count parameters and buffers, as the fold reports
    assert rep.files is not None and rep.files.source_format == "pickled_module" and not rep.files.written
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_freeze_returns_a_typed_report_of_the_frozen_modules(tmp_path: Path) -> None:
    model = _net()
    src, dst = tmp_path / "m.pt", tmp_path / "f.pt"
    torch.save(model, src)
    rep = freeze_file(src, dst, FreezeSettings(load=LoadSettings(trust_pickle=True)))
    assert isinstance(rep, FreezeReport) and rep.files.written and not rep.left
    written = torch.load(dst, weights_only=False)
    assert [n for n, _ in rep.frozen] == [
        n for n, m in written.named_modules() if isinstance(m, FrozenBatchNorm)
    ]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(written(x), model(x))
