"""A small UNet-style encoder/decoder whose decoder upsamples with ``ConvTranspose2d -> BN -> ReLU``.

Layout for ``in_channels=C`` (the bottleneck width) and an ``(N, 3, 64, 64)`` image::

    enc1: conv3x3(3 -> C/4)    -> BN -> ReLU                  64x64  (skip s1)
    enc2: conv3x3/2(C/4 -> C/2) -> BN -> ReLU                 32x32  (skip s2)
    enc3: conv3x3/2(C/2 -> C)  -> BN -> ReLU                  16x16
    up1:  ConvTranspose(C -> C/2, k4, s2, p1, groups=1, no bias)  -> BN -> ReLU   32x32
          cat(s2) -> conv3x3(C -> C/2) -> BN -> ReLU
    up2:  ConvTranspose(C/2 -> C/4, k2, s2, groups=4, bias)       -> BN -> ReLU   64x64
          cat(s1) -> conv3x3(C/2 -> C/4) -> BN -> ReLU
    head: conv1x1(C/4 -> num_classes)

Every BN follows a Conv or ConvTranspose whose only consumer it is, so all fold forward. A
ConvTranspose weight is ``(C_in, C_out / groups, kH, kW)``: the BN scale must multiply axis 1 *within
each group*, which is what the grouped ``up2`` layer checks (torch's own fusion gets it wrong).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNetDecoder", "unet_decoder"]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNetDecoder(nn.Module):
    """Three-level encoder, two-level ConvTranspose decoder with concatenated skips."""

    def __init__(self, in_channels: int = 64, num_classes: int = 3, image_channels: int = 3):
        super().__init__()
        if in_channels % 16:
            raise ValueError(f"in_channels must be a multiple of 16, got {in_channels}")
        c1, c2, c3 = in_channels // 4, in_channels // 2, in_channels
        self.enc1 = _conv_bn_relu(image_channels, c1)
        self.enc2 = _conv_bn_relu(c1, c2, stride=2)
        self.enc3 = _conv_bn_relu(c2, c3, stride=2)
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
        )
        self.dec1 = _conv_bn_relu(2 * c2, c2)
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 2, stride=2, groups=4, bias=True),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
        )
        self.dec2 = _conv_bn_relu(2 * c1, c1)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(s1)
        y = self.enc3(s2)
        y = self.dec1(torch.cat([self.up1(y), s2], dim=1))
        y = self.dec2(torch.cat([self.up2(y), s1], dim=1))
        return self.head(y)


def unet_decoder(in_channels: int = 64, num_classes: int = 3) -> UNetDecoder:
    """Build the UNet-style segmentation net with ConvTranspose -> BN upsampling.

    Args:
        in_channels: Bottleneck width entering the decoder (multiple of 16); the encoder uses
            ``in_channels // 4`` and ``in_channels // 2`` channels at full and half resolution.
        num_classes: Output channels (per-pixel classes).

    Returns:
        A :class:`UNetDecoder` taking ``(N, 3, H, W)`` with ``H, W`` multiples of 4 and returning
        ``(N, num_classes, H, W)``.
    """
    return UNetDecoder(in_channels=in_channels, num_classes=num_classes)


# One input's shape without the batch dimension: `bnfold fold FILE --model models.X:factory` builds
# example inputs from it when no --input-shape is given.
unet_decoder.example_input_shape = (3, 64, 64)  # type: ignore[attr-defined]
