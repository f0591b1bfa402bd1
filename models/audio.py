"""A keyword-spotting style 1-D convolutional net: strided ``Conv1d -> BN1d -> ReLU`` stacks.

Layout (input ``(N, C, 1600)``, e.g. 0.1 s of 16 kHz audio)::

    conv1d(C -> 16, k9, s4, p4)   -> BN1d -> ReLU    400
    conv1d(16 -> 32, k5, s2, p2)  -> BN1d -> ReLU    200
    conv1d(32 -> 64, k5, s2, p2)  -> BN1d -> ReLU    100
    conv1d(64 -> 64, k3, s2, p1, groups=64, depthwise) -> BN1d -> ReLU   50
    conv1d(64 -> 64, k1, no bias)  -> BN1d -> ReLU    50
    AdaptiveAvgPool1d(1) -> flatten -> Linear(64 -> num_classes)

Every BN follows a Conv1d whose only consumer it is, so all five fold forward (3-D weights, one
with groups equal to channels).
"""

from __future__ import annotations

from torch import nn

__all__ = ["conv1d_net", "INPUT_SHAPE"]

INPUT_SHAPE: tuple[int, ...] = (1, 1600)


def conv1d_net(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """Build the Conv1d -> BN1d -> ReLU audio net.

    Args:
        in_channels: Input channels (1 for a mono waveform).
        num_classes: Size of the classifier output.

    Returns:
        An ``nn.Sequential`` taking ``(N, in_channels, L)`` (``L >= 64``) and returning
        ``(N, num_classes)``.
    """
    return nn.Sequential(
        nn.Conv1d(in_channels, 16, 9, stride=4, padding=4),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2, padding=2),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Conv1d(32, 64, 5, stride=2, padding=2),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Conv1d(64, 64, 3, stride=2, padding=1, groups=64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Conv1d(64, 64, 1, bias=False),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


# One input's shape without the batch dimension: `bnfold fold FILE --model models.X:factory` builds
# example inputs from it when no --input-shape is given.
conv1d_net.example_input_shape = (1, 1600)  # type: ignore[attr-defined]
