"""Structured hints: the option that would help travels beside the reason and each surface words it.

A Python caller reads keywords (``eval_semantics=True``), a CLI user reads flags (``--eval-semantics``),
``--json`` carries both with the option's name, and no layer rewrites another layer's text.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_cli import assert_clean_error
from torch import nn
from typer.testing import CliRunner

import bnfold
from bnfold import hints
from bnfold.cli import app
from bnfold.errors import ModelFormatError, OutputError, with_context
from bnfold.files import settings as file_settings
from bnfold.records import Skip, SkipReason
from models.batch_stats import onnx_training_bn
from models.stats import randomize_bn

runner = CliRunner()


def _keywords() -> set[str]:
    """Every keyword the public Python API takes (functions and the file jobs' settings records)."""
    names: set[str] = set()
    for fn in (bnfold.fold, bnfold.fold_with_report, bnfold.load, bnfold.verify, bnfold.export_onnx):
        names |= set(inspect.signature(fn).parameters)
    for rec in vars(file_settings).values():
        if isinstance(rec, type) and hasattr(rec, "__dataclass_fields__"):
            names |= set(rec.__dataclass_fields__)
    return names


def _flags() -> set[str]:
    """Every flag some bnfold command takes."""
    import typer.main

    group = typer.main.get_command(app)
    flags: set[str] = set()
    for cmd in group.commands.values():  # type: ignore[attr-defined]
        for p in cmd.params:
            flags |= set(p.opts) | set(p.secondary_opts)
    return flags


@pytest.mark.parametrize("hint", hints.ALL, ids=lambda h: h.option)
def test_every_hint_names_a_real_keyword_and_a_real_flag(hint: hints.Hint) -> None:
    assert hint.option in _keywords()
    assert hint.flag in _flags()
    assert hint.option in hint.python and hint.flag in hint.cli
    assert hint.flag not in hint.python and f"{hint.option}=" not in hint.cli


def test_an_error_words_its_hint_per_surface_and_context_keeps_it_once() -> None:
    err = ModelFormatError("a pickled module", hints=[hints.TRUST_PICKLE])
    placed = with_context(err, "m.pt")
    assert str(placed) == "m.pt: a pickled module; if you trust the file, pass trust_pickle=True"
    assert placed.text("cli") == "m.pt: a pickled module; if you trust the file, pass --trust-pickle"
    assert placed.hints == (hints.TRUST_PICKLE,) and isinstance(placed, ModelFormatError)
    assert with_context(placed, "m.pt") is placed  # already named: unchanged, hints not doubled


def _state_dict_file(tmp_path: Path) -> Path:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=3).eval()
    p = tmp_path / "weights.pt"
    torch.save(model.state_dict(), p)
    return p


def test_a_state_dict_without_a_factory_python_reads_the_keyword(tmp_path: Path) -> None:
    p = _state_dict_file(tmp_path)
    with pytest.raises(ModelFormatError) as e:
        bnfold.load(p)
    assert "model_factory=" in str(e.value) and "--model" not in str(e.value)
    assert e.value.hints == (hints.MODEL_FACTORY,)


def test_a_state_dict_without_a_factory_cli_reads_the_flag(tmp_path: Path) -> None:
    p = _state_dict_file(tmp_path)
    r = runner.invoke(app, ["inspect", str(p)])
    assert_clean_error(r, 2, "weights.pt")
    assert "--model module.path:factory" in r.stderr and "model_factory" not in r.stderr
    r = runner.invoke(app, ["inspect", str(p), "--json"])
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 2 and "--model module.path:factory" in doc["error"]["message"]


def test_the_input_as_output_python_and_cli(tmp_path: Path) -> None:
    from bnfold.files import FoldSettings, fold_file

    src = tmp_path / "m.onnx"
    onnx.save(onnx_training_bn(4, opset=15), src)
    before = src.read_bytes()
    with pytest.raises(OutputError) as e:
        fold_file(src, src, FoldSettings())
    assert "in_place=True" in str(e.value) and "--in-place" not in str(e.value)
    r = runner.invoke(app, ["fold", str(src), str(src)])
    assert_clean_error(r, 2, "m.onnx")
    assert "--in-place" in r.stderr and "in_place=True" not in r.stderr
    assert src.read_bytes() == before


def test_a_refusal_carries_its_hint_python_cli_and_json(tmp_path: Path) -> None:
    model = onnx_training_bn(4, opset=15)
    _, report = bnfold.fold_with_report(model)
    (v,) = report.verdicts
    assert isinstance(v, Skip) and v.reason is SkipReason.TRAINING_MODE
    assert v.hints == (hints.BATCH_STATS_INSTANCE,)
    assert "instance" not in v.detail.lower()  # the reason alone: the advice is the hint
    assert "batch_stats='instance'" in v.text() and "--batch-stats" not in v.text()

    src = tmp_path / "t.onnx"
    onnx.save(model, src)
    r = runner.invoke(app, ["inspect", str(src)], terminal_width=300)
    assert r.exit_code == 0, r.stderr
    assert "--batch-stats instance" in r.stdout and "batch_stats=" not in r.stdout
    r = runner.invoke(app, ["inspect", str(src), "--json"])
    (verdict,) = json.loads(r.stdout)["verdicts"]
    assert verdict["detail"] == v.detail
    assert verdict["hints"] == [
        {
            "option": "batch_stats",
            "flag": "--batch-stats",
            "python": hints.BATCH_STATS_INSTANCE.python,
            "cli": hints.BATCH_STATS_INSTANCE.cli,
        }
    ]
    # following the hint folds it (converted to an InstanceNorm, exact at batch 1)
    _, report = bnfold.fold_with_report(model, batch_stats="instance")
    assert [v.status for v in report.verdicts] == ["converted"]


def test_an_unproven_rank_points_at_example_inputs_and_following_it_folds() -> None:
    model = randomize_bn(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), seed=1).eval()
    _, report = bnfold.fold_with_report(model)
    (v,) = report.verdicts
    assert isinstance(v, Skip) and v.reason is SkipReason.LAYOUT and v.hints == (hints.EXAMPLE_INPUTS,)
    assert "example_inputs=(x,)" in v.text() and "example_inputs" not in v.detail
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    folded, report = bnfold.fold_with_report(model, example_inputs=(x,))
    assert [v.status for v in report.verdicts] == ["folded"]
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_a_train_mode_model_python_reads_the_keyword() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), seed=2).train()
    with pytest.raises(bnfold.errors.ModelStateError) as e:
        bnfold.fold(model)
    assert "eval_semantics=True" in str(e.value) and "--eval-semantics" not in str(e.value)
    assert e.value.hints == (hints.EVAL_SEMANTICS,)
