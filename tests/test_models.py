"""The reference models build and run, carry realistic BN statistics, and the committed samples
still load, check, keep their BatchNormalization nodes and compute what the zoo model computes."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models.make_samples import ONNX_SAMPLES, SAMPLES_DIR, SEED
from models.preact import FOLDABLE, NOT_FOLDABLE
from models.stats import bn_modules
from models.testing import ort_session
from models.zoo import SMALL_SHAPES, ZOO, build, example_input

# ORT and PyTorch run the same float32 graph with different kernels (conv algorithms, summation
# order); a few float32 ulps per layer over ~10 layers stays well below these.
F32_ATOL = 1e-4
F32_RTOL = 1e-4

EXPECTED_OUT: dict[str, tuple[int, ...]] = {
    "lenet5": (10,),
    "mnist_mlp": (10,),
    "bn_linear_mlp": (10,),
    "resnet18": (10,),
    "resnet50": (10,),
    "mobilenet_v2": (10,),
    "unet_decoder": (3, 64, 64),
    "conv1d_net": (10,),
    "preact_net": (10,),
}
EXPECTED_BN: dict[str, int] = {
    "lenet5": 4,
    "mnist_mlp": 2,
    "bn_linear_mlp": 3,
    "resnet18": 20,
    "resnet50": 53,
    "mobilenet_v2": 52,
    "unet_decoder": 7,
    "conv1d_net": 5,
    "preact_net": 9,
}
SAMPLES_MAX_BYTES = 5 * 1024 * 1024


def test_zoo_lists_every_model() -> None:
    assert set(ZOO) == set(EXPECTED_OUT)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_builds_and_runs(name: str) -> None:
    model = build(name, seed=1)
    assert not model.training
    batch = 1 if name in ("resnet18", "resnet50", "mobilenet_v2") else 2
    x = example_input(name, batch=batch, shape=SMALL_SHAPES[name])
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (batch, *EXPECTED_OUT[name])
    assert torch.isfinite(y).all()
    assert len(bn_modules(model)) == EXPECTED_BN[name]


@pytest.mark.parametrize("name", list(ZOO))
def test_build_gives_realistic_bn(name: str) -> None:
    for bn_name, m in bn_modules(build(name, seed=3)):
        assert not m.training, bn_name
        assert (m.running_mean != 0).all(), bn_name
        assert (m.running_var != 1).all(), bn_name
        assert (m.weight != 1).all(), bn_name
        assert (m.bias != 0).all(), bn_name


def test_build_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build("lenet5", seed=7).state_dict()
    after = torch.rand(3)
    assert torch.equal(before, after)
    b = build("lenet5", seed=7).state_dict()
    c = build("lenet5", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert not torch.equal(a["1.running_mean"], c["1.running_mean"])
    assert torch.equal(example_input("lenet5", 2, seed=4), example_input("lenet5", 2, seed=4))


def test_resnet50_is_imagenet_sized() -> None:
    from models.resnet import resnet50

    model = resnet50(num_classes=1000)
    assert len(bn_modules(model)) == 53
    n_params = sum(p.numel() for p in model.parameters())
    assert 25_000_000 < n_params < 26_000_000
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_unet_has_grouped_conv_transpose_then_bn() -> None:
    model = build("unet_decoder")
    pairs = [
        (a, b)
        for seq in model.modules()
        if isinstance(seq, nn.Sequential)
        for a, b in zip(seq, list(seq)[1:])
        if isinstance(a, nn.ConvTranspose2d) and isinstance(b, nn.BatchNorm2d)
    ]
    assert len(pairs) == 2
    assert any(a.groups > 1 and a.stride == (2, 2) for a, _ in pairs)


def test_bn_linear_mlp_puts_bn_before_each_linear() -> None:
    layers = list(build("bn_linear_mlp"))
    for i, m in enumerate(layers):
        if isinstance(m, nn.BatchNorm1d):
            assert isinstance(layers[i + 1], nn.Linear)


def test_preact_documents_every_bn() -> None:
    names = {n for n, _ in bn_modules(build("preact_net"))}
    assert names == set(FOLDABLE) | set(NOT_FOLDABLE)
    assert not set(FOLDABLE) & set(NOT_FOLDABLE)
    modules = dict(build("preact_net").named_modules())
    for _, (direction, target) in FOLDABLE.items():
        assert direction in ("forward", "backward")
        assert isinstance(modules[target], (nn.Conv2d, nn.Linear))
    assert modules["proj.conv"].padding == (0, 0) and modules["proj.conv"].kernel_size == (1, 1)
    assert modules["pad.conv"].padding == (1, 1)


# --- committed samples --------------------------------------------------------------------------


def test_samples_are_small() -> None:
    files = list(SAMPLES_DIR.iterdir())
    assert {f.name for f in files} >= set(ONNX_SAMPLES) | {"lenet5.pt", "lenet5.pt2"}
    assert sum(f.stat().st_size for f in files) < SAMPLES_MAX_BYTES


@pytest.mark.parametrize("fname", list(ONNX_SAMPLES))
def test_onnx_sample_matches_zoo_model(fname: str) -> None:
    name = ONNX_SAMPLES[fname]
    path = SAMPLES_DIR / fname
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    reference = build(name, seed=SEED)
    assert ops["BatchNormalization"] == len(bn_modules(reference))

    sess = ort_session(path)
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    x = example_input(name, batch=3, seed=11)  # batch 3: the batch dimension is dynamic
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = reference(x).numpy()
    np.testing.assert_allclose(got, want, atol=F32_ATOL, rtol=F32_RTOL)


def test_lenet5_state_dict_sample_loads() -> None:
    from models.lenet import lenet5

    model = lenet5()
    model.load_state_dict(torch.load(SAMPLES_DIR / "lenet5.pt", weights_only=True))
    model.eval()
    reference = build("lenet5", seed=SEED)
    x = example_input("lenet5", batch=2, seed=5)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_lenet5_exported_program_sample_runs() -> None:
    ep = torch.export.load(Path(SAMPLES_DIR / "lenet5.pt2"))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("batch_norm" in t for t in targets) == 4
    x = example_input("lenet5", batch=5, seed=6)
    with torch.no_grad():
        got = ep.module()(x)
        want = build("lenet5", seed=SEED)(x)
    torch.testing.assert_close(got, want, atol=F32_ATOL, rtol=F32_RTOL)
