"""On the reference nets, the PyTorch path folds every BN that the ONNX path folds."""

from __future__ import annotations

import pytest
import torch

import bnfold
from models import realworld as rw
from models.coverage import coverage
from models.stats import randomize_bn

bnfold.register_checkpoint_runner(rw.checkpoint_seq, "children")


@pytest.mark.parametrize("name", sorted(rw.REALWORLD))
def test_pytorch_path_folds_at_least_what_onnx_folds(name: str) -> None:
    factory, shape = rw.REALWORLD[name]
    torch.manual_seed(0)
    m = randomize_bn(factory(), 0).eval()
    c = coverage(m, torch.randn(*shape))
    assert c.onnx_bn == c.bn  # the export kept every BN, so the two paths see the same layers
    assert c.torch_folded >= c.onnx_folded, c
    assert c.torch_folded == c.bn, c
