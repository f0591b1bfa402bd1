"""Parents that torch.fx cannot trace and that reach into a traceable child (``block``) in ways a
literal ``self.<attr>`` scan misses. Folding the child's conv + BN would change what these parents
compute (they run ``block[0]``, the conv, without the BN), so bnfold must refuse.

Each forward has a Python branch on a tensor value (``if x.sum() > 0``), which torch.fx cannot trace.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["HelperParent", "RenamedSelfParent", "CheckpointMethodParent", "UNSOUND"]


def _block() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))


def _run_conv_only(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A helper handed the parent: it calls the conv of ``block`` and skips its BN."""
    return module.block[0](x)  # type: ignore[index,operator]


class HelperParent(nn.Module):
    """``forward`` hands ``self`` to a module-level helper that reaches into ``self.block``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.block(x)
        return _run_conv_only(self, x) + self.block(x)


class RenamedSelfParent(nn.Module):
    """``forward``'s first parameter is not called ``self``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _block()

    def forward(this, x: torch.Tensor) -> torch.Tensor:  # noqa: N805 - the point of this model
        if x.sum() > 0:
            return this.block[0](x) + this.block(x)
        return this.block(x)


class CheckpointMethodParent(nn.Module):
    """A bound method that reaches into ``block`` is handed to ``torch.utils.checkpoint``."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _block()

    def _inner(self, x: torch.Tensor) -> torch.Tensor:
        return self.block[0](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            y = torch.utils.checkpoint.checkpoint(self._inner, x, use_reentrant=False)
            return y + self.block(x)
        return self.block(x)


UNSOUND = {
    "helper_self": HelperParent,
    "renamed_self": RenamedSelfParent,
    "checkpoint_method": CheckpointMethodParent,
}
