"""The model zoo: every reference model by name, with its example input shape.

:func:`build` is what tests and benchmarks call: it builds the model with seeded weights (the global
RNG is left untouched), gives every BN realistic statistics with :func:`models.stats.randomize_bn`
(fresh BNs are the identity and make any fold look exact) and returns it in eval mode. The same
``(name, seed)`` always gives the same weights, so an ONNX sample written by
:mod:`models.make_samples` can be compared with a model rebuilt here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.audio import conv1d_net
from models.lenet import lenet5
from models.mlp import bn_linear_mlp, mnist_mlp
from models.mobilenet import mobilenet_v2
from models.preact import preact_net
from models.resnet import resnet18, resnet50
from models.stats import randomize_bn
from models.unet import unet_decoder

__all__ = ["ZOO", "SMALL_SHAPES", "build", "example_input", "names"]

#: name -> (factory, example input shape without the batch dimension). ResNets and MobileNetV2
#: use the nominal ImageNet size; they work on any input of at least 32x32 (see SMALL_SHAPES).
ZOO: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "lenet5": (lenet5, (1, 32, 32)),
    "mnist_mlp": (mnist_mlp, (784,)),
    "bn_linear_mlp": (bn_linear_mlp, (64,)),
    "resnet18": (resnet18, (3, 224, 224)),
    "resnet50": (resnet50, (3, 224, 224)),
    "mobilenet_v2": (mobilenet_v2, (3, 224, 224)),
    "unet_decoder": (unet_decoder, (3, 64, 64)),
    "conv1d_net": (conv1d_net, (1, 1600)),
    "preact_net": (preact_net, (3, 32, 32)),
}

#: Smaller inputs that every model accepts, for fast tests (same as ZOO where it is already small).
SMALL_SHAPES: dict[str, tuple[int, ...]] = {
    name: ((3, 64, 64) if name in ("resnet18", "resnet50", "mobilenet_v2") else shape)
    for name, (_, shape) in ZOO.items()
}


def names() -> list[str]:
    """Every model name in the zoo, in a fixed order."""
    return list(ZOO)


def _lookup(name: str) -> tuple[Callable[[], nn.Module], tuple[int, ...]]:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def build(name: str, seed: int = 0) -> nn.Module:
    """Build a zoo model with seeded weights and realistic BN statistics, in eval mode.

    Args:
        name: A key of :data:`ZOO`.
        seed: Seeds both the weight initialisation and :func:`randomize_bn`.

    Returns:
        The model, in eval mode, on CPU, float32.

    Raises:
        KeyError: If ``name`` is not in the zoo.
    """
    factory, _ = _lookup(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    randomize_bn(model, seed)
    return model.eval()


def example_input(
    name: str, batch: int = 1, seed: int = 0, shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """A seeded standard-normal input for a zoo model.

    Args:
        name: A key of :data:`ZOO`.
        batch: Batch size.
        seed: Generator seed.
        shape: Override the per-sample shape (e.g. ``SMALL_SHAPES[name]``).

    Returns:
        A float32 tensor of shape ``(batch, *shape)``.
    """
    _, default = _lookup(name)
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *(shape or default)), generator=g)
