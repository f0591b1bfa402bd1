"""``verify --locate``: the first intermediate tensor where the candidate leaves the reference."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper as nh
from typer.testing import CliRunner

from bnfold.cli import app
from bnfold.errors import OptionError
from bnfold.onnx import fold_model
from bnfold.verification import verify

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "samples" / "lenet5.onnx"
runner = CliRunner()


def _folded_with_bad_conv(k: int) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """LeNet-5, its fold, with the k-th Conv's weight changed by 1%; and that Conv's output name."""
    ref = onnx.load(str(LENET))
    folded, _ = fold_model(ref)
    conv = [n for n in folded.graph.node if n.op_type == "Conv"][k]
    for i, t in enumerate(folded.graph.initializer):
        if t.name == conv.input[1]:
            a = nh.to_array(t).copy()
            a.flat[0] *= 1.01
            folded.graph.initializer[i].CopyFrom(nh.from_array(a, t.name))
    return ref, folded, conv.output[0]


@pytest.mark.parametrize("k", [0, 1])
def test_first_divergence_is_the_changed_layer(k: int) -> None:
    ref, cand, changed = _folded_with_bad_conv(k)
    rep = verify(ref, cand, locate=True)
    # (for k=0 the outputs may even pass: a change early in the net can fade before the logits; the
    # intermediate tensor still shows it)
    loc = rep.locate
    assert loc is not None and loc.first_divergence == changed
    names = [t.name for t in loc.tensors]
    i = names.index(changed)
    assert all(t.passed for t in loc.tensors[:i])  # everything computed before it still agrees
    hit = loc.tensors[i]
    # the folded Conv's output is matched with the BN output of the reference
    assert hit.producer.startswith("BatchNormalization") and hit.matched_as.startswith(
        "fold: BatchNormalization"
    )
    assert "-> Conv" in hit.matched_as
    assert loc.only_in_reference > 0  # the pre-BN Conv outputs have no counterpart
    ref_bn = sum(n.op_type == "BatchNormalization" for n in ref.graph.node)
    assert ref_bn == 4 and len(ref.graph.output) == 1  # the caller's model gets no extra outputs


def test_equivalent_models_have_no_divergence() -> None:
    ref = onnx.load(str(LENET))
    rep = verify(ref, fold_model(ref)[0], locate=True)
    assert rep.passed and rep.locate is not None
    assert rep.locate.first_divergence is None and rep.locate.compared >= 10
    assert all(t.passed for t in rep.locate.tensors)


def test_locate_needs_two_onnx_models() -> None:
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    with pytest.raises(OptionError, match="two ONNX models"):
        verify(m, m, locate=True, example_inputs=(torch.randn(2, 3),))


def test_cli_locate(tmp_path: Path) -> None:
    _, cand, changed = _folded_with_bad_conv(1)
    bad = tmp_path / "bad.onnx"
    onnx.save(cand, str(bad))
    r = runner.invoke(app, ["verify", str(LENET), str(bad), "--locate", "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["verification"]["locate"]["first_divergence"] == changed
    r = runner.invoke(app, ["verify", str(LENET), str(bad), "--locate"])
    assert r.exit_code == 1
    assert f"first divergence at {changed}" in " ".join(r.stdout.split())
