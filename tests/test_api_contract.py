"""The public API as a user's script meets it: typed signatures, and options that do not apply refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import bnfold
from bnfold.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]


def _onnx_model() -> object:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    for name, value in (("g", 1.5), ("b", 0.2), ("m", 0.3), ("v", 2.0)):
        inits.append(numpy_helper.from_array(np.full(4, value, np.float32), name))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _module() -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[1].running_mean.fill_(0.3)
        m[1].running_var.fill_(2.0)
    return m


@pytest.mark.parametrize(
    ("make", "option"),
    [
        (_module, {"affine": True}),
        (_onnx_model, {"example_inputs": (torch.randn(1, 3, 8, 8),)}),
        (_onnx_model, {"eval_semantics": True}),
        (_onnx_model, {"prune_constant_channels": True}),
    ],
)
def test_an_option_that_does_not_apply_is_refused_not_ignored(
    make: object, option: dict[str, object]
) -> None:
    model = make()  # type: ignore[operator]
    (name,) = option
    with pytest.raises(OptionError, match=name):
        bnfold.fold(model, **option)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=name):
        bnfold.fold_with_report(model, **option)  # type: ignore[arg-type]


def test_exported_program_refuses_inplace_and_example_inputs() -> None:
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(_module(), (x,))
    with pytest.raises(OptionError, match="inplace"):
        bnfold.fold(ep, inplace=True)
    with pytest.raises(OptionError, match="example_inputs"):
        bnfold.inspect(ep, example_inputs=(x,))
    folded = bnfold.fold(ep)  # and without them it folds
    torch.testing.assert_close(folded.module()(x), ep.module()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a cold mypy run over torch's stubs: ~20 s
def test_misspelt_names_fail_type_checking_and_fold_keeps_the_type(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    script = tmp_path / "export_script.py"
    script.write_text(
        textwrap.dedent("""
        import onnx
        import torch
        import bnfold

        proto = onnx.ModelProto()
        reveal_type(bnfold.fold(proto))
        reveal_type(bnfold.fold(torch.nn.Conv2d(1, 1, 1)))
        bnfold.fodl(proto)
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--follow-imports=silent",
            "--ignore-missing-imports",
            "--python-executable",
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    out = p.stdout
    assert p.returncode == 1, out
    assert 'Module has no attribute "fodl"' in out
    assert 'Revealed type is "onnx.onnx_ml_pb2.ModelProto"' in out
    assert 'Revealed type is "torch.nn.modules.module.Module"' in out
    assert '"Any"' not in out
