"""Multilayer perceptrons with BatchNorm1d.

* :func:`mnist_mlp` - 784-50-50-10 with BN *before* each activation (``Linear -> BN1d -> ReLU``):
  both BNs fold forward into the preceding Linear.
* :func:`bn_linear_mlp` - BN placed *before* each Linear (``BN1d -> Linear -> ReLU`` blocks): every BN
  folds backward into the following Linear (``W' = W diag(s)``, ``b' = b + W t``), which is exact
  because nothing sits between the BN and the Linear.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["mnist_mlp", "bn_linear_mlp"]


def mnist_mlp() -> nn.Sequential:
    """Build the MNIST MLP 784-50-50-10 with ``Linear -> BN1d -> ReLU`` twice, then ``Linear``.

    Returns:
        An ``nn.Sequential`` taking ``(N, 784)`` and returning ``(N, 10)``.
    """
    return nn.Sequential(
        nn.Linear(784, 50),
        nn.BatchNorm1d(50),
        nn.ReLU(),
        nn.Linear(50, 50),
        nn.BatchNorm1d(50),
        nn.ReLU(),
        nn.Linear(50, 10),
    )


def bn_linear_mlp(
    in_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10
) -> nn.Sequential:
    """Build an MLP of ``BN1d -> Linear -> ReLU`` blocks and a ``BN1d -> Linear`` head.

    Every BN is directly followed by a Linear, so each folds backward exactly.

    Args:
        in_features: Input width.
        hidden: Widths of the hidden layers.
        num_classes: Size of the classifier output.

    Returns:
        An ``nn.Sequential`` taking ``(N, in_features)`` and returning ``(N, num_classes)``.
    """
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.BatchNorm1d(width), nn.Linear(width, h), nn.ReLU()]
        width = h
    layers += [nn.BatchNorm1d(width), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


# One input's shape without the batch dimension: `bnfold fold FILE --model models.X:factory` builds
# example inputs from it when no --input-shape is given.
mnist_mlp.example_input_shape = (784,)  # type: ignore[attr-defined]
bn_linear_mlp.example_input_shape = (64,)  # type: ignore[attr-defined]
