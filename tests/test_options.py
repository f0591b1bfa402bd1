"""One record of the fold choices (:class:`bnfold.options.FoldOptions`, issue 23.4).

The public keyword arguments build it with the same defaults; the file jobs carry it in their
settings; a dry run (``inspect``) takes every choice the fold takes, so its verdicts are the fold's.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

import bnfold
from bnfold.files import (
    FoldOptions,
    FoldSettings,
    InputSettings,
    InspectSettings,
    LoadSettings,
    fold_file,
    inspect_file,
)
from models import reparam
from models.stats import randomize_bn


def test_every_option_is_a_public_keyword_with_the_same_default() -> None:
    params = inspect.signature(bnfold.fold_with_report).parameters
    for f in dataclasses.fields(FoldOptions):
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name


def test_inspect_of_a_pytorch_file_takes_the_merge_choice_of_fold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_bn(reparam.RepVGGBlock(4, 4), seed=1).eval()
    src = tmp_path / "m.pt"
    torch.save(model, src)  # the test wrote the pickle itself
    load, inputs = LoadSettings(trust_pickle=True), InputSettings(input_shapes=["x=2x4x7x7"])
    for merge in (True, False):
        options = FoldOptions(merge_branches=merge)
        dry = inspect_file(src, InspectSettings(options=options, load=load, inputs=inputs))
        done = fold_file(
            src, tmp_path / f"{merge}.pt", FoldSettings(options=options, load=load, inputs=inputs)
        )
        assert done.verification is not None and done.verification.passed
        assert any(m.merged for m in done.merges) is merge
        assert [m.merged for m in dry.merges] == [m.merged for m in done.merges], merge
        assert (dry.bn_after, dry.params_after) == (done.bn_after, done.params_after), merge
