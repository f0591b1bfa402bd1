"""LeNet-5 with BatchNorm: three convolutions and two fully connected layers, tanh, 32x32 input.

Layout (input ``(N, 1, 32, 32)``)::

    conv(1->6, 5)   -> BN2d -> tanh -> avgpool 2   # 6x14x14
    conv(6->16, 5)  -> BN2d -> tanh -> avgpool 2   # 16x5x5
    conv(16->120, 5)-> BN2d -> tanh                # 120x1x1
    flatten -> FC(120->84) -> BN1d -> tanh -> FC(84->num_classes)

Every BN directly follows a Conv/Linear with a bias, so all four fold forward exactly.
"""

from __future__ import annotations

from torch import nn

__all__ = ["lenet5", "INPUT_SHAPE"]

INPUT_SHAPE: tuple[int, ...] = (1, 32, 32)


def lenet5(num_classes: int = 10) -> nn.Sequential:
    """Build LeNet-5 with BN after the three convolutions and the first FC layer.

    Args:
        num_classes: Size of the classifier output.

    Returns:
        An ``nn.Sequential`` taking ``(N, 1, 32, 32)`` and returning ``(N, num_classes)``.
    """
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.BatchNorm2d(6),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.BatchNorm2d(16),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 120, 5),
        nn.BatchNorm2d(120),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(120, 84),
        nn.BatchNorm1d(84),
        nn.Tanh(),
        nn.Linear(84, num_classes),
    )


# One input's shape without the batch dimension: `bnfold fold FILE --model models.X:factory` builds
# example inputs from it when no --input-shape is given.
lenet5.example_input_shape = (1, 32, 32)  # type: ignore[attr-defined]
