"""ONNX backend on exported reference models: every BN after a foldable layer goes; the rest stays."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import onnx
import pytest

from bnfold.onnx import fold_model
from bnfold.records import Direction
from models.onnx_graphs import assert_close, check_fold, feeds_for, run

SAMPLES = Path(__file__).resolve().parent.parent / "models" / "samples"
# float32 through a deep network: a few ulps per layer accumulate over ~50 layers.
DEEP_TOL = 1e-4


@pytest.mark.parametrize(
    "name,bn_after",
    [("lenet5", 0), ("mnist_mlp", 0), ("unet_decoder", 0), ("conv1d_net", 0), ("preact_net", 0)],
)
def test_samples(name: str, bn_after: int) -> None:
    path = SAMPLES / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    m = onnx.load(path)
    out, rep = check_fold(m, bn_after=bn_after, tol=DEEP_TOL)
    if name == "preact_net":
        dirs = sorted(s.direction.value for s in rep.sites)
        # pad.bn (BN -> zero-padded conv) and the three BNs before a Relu by scale propagation (issue 27);
        # the channels with a negative scale before the Relu keep their affine (a Mul and an Add)
        assert dirs == ["backward", "backward", "forward", "forward", "forward"] + ["propagated"] * 4
        assert any(s.detail == "through Flatten" for s in rep.sites)


def _export(name: str, dynamo: bool) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    from models.stats import randomize_bn
    from models.zoo import SMALL_SHAPES, build, example_input

    if name == "resnet18":  # a narrow ResNet-18 on 32x32 inputs: the same graph, a fraction of the time
        from models.resnet import resnet18

        torch.manual_seed(0)
        model = randomize_bn(resnet18(width=8), 0).eval()
        x = torch.randn(2, 3, 32, 32)
    else:
        model = build(name, seed=0)
        x = example_input(name, batch=2, shape=SMALL_SHAPES[name])
    if dynamo:
        prog = torch.onnx.export(model, (x,), dynamo=True, optimize=False)
        return prog.model_proto
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
    )
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_legacy_export_folds_every_bn(name: str) -> None:
    m = _export(name, dynamo=False)
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) > 10
    _, rep = check_fold(m, bn_after=0, tol=DEEP_TOL, seeds=1)
    assert all(s.direction is Direction.FORWARD for s in rep.sites)
    assert "torch" in sys.modules  # (the test needed torch to export; bnfold.onnx itself does not)


@pytest.mark.slow
def test_dynamo_optimize_false_export_folds_every_bn() -> None:
    m = _export("resnet18", dynamo=True)
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 20
    out, _ = check_fold(m, bn_after=0, tol=DEEP_TOL, seeds=1)
    # the run-time bias subgraphs (Shape/Expand/CastLike) are gone too
    assert not {"Shape", "Expand", "CastLike"} & {n.op_type for n in out.graph.node}


def test_bnfold_onnx_does_not_import_torch() -> None:
    import subprocess

    code = "import bnfold.onnx, bnfold, sys; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_preact_affine_turns_the_rest_into_mul_add() -> None:
    path = SAMPLES / "preact_net.onnx"
    if not path.exists():
        pytest.skip(f"{path} not generated")
    m = onnx.load(path)  # legacy export: no value_info, so rank and dtype are traced through the graph
    out, rep = check_fold(m, bn_after=0, affine=True, tol=DEEP_TOL)
    assert sum(s.direction is Direction.AFFINE for s in rep.sites) == 0  # all propagated (issue 27)
    out, rep = fold_model(m, affine=True, propagate=False)
    assert sum(s.direction is Direction.AFFINE for s in rep.sites) == 4 and rep.bn_after == 0
    for seed in range(2):
        feeds = feeds_for(m, seed)
        assert_close(run(m, feeds), run(out, feeds), DEEP_TOL)
