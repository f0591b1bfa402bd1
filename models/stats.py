"""Give a model realistic BatchNorm statistics and affine parameters, as after training.

A freshly built BN has mean 0, var 1, gamma 1, beta 0: it is the identity (up to eps), and any fold,
right or wrong, looks exact. Every test and benchmark calls :func:`randomize_bn` first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["randomize_bn", "bn_modules", "bn_stats"]


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-like module (torch's, SyncBatchNorm, bnfold's) by name."""
    from torch.nn.modules.batchnorm import _NormBase

    return [(n, m) for n, m in model.named_modules() if isinstance(m, _NormBase)]


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0, *, spread: float = 1.0) -> nn.Module:
    """Set running_mean != 0, running_var != 1, gamma != 1, beta != 0 on every BN, seeded; in place.

    Values: mean ~ U(-0.5, 0.5) * spread, var ~ U(0.25, 2.5) (log-uniform-ish), gamma ~ U(0.5, 1.5)
    with a random sign on 10% of channels, beta ~ U(-0.5, 0.5) * spread. Also sets
    ``num_batches_tracked`` to 1000. Returns the model for chaining.
    """
    g = torch.Generator().manual_seed(seed)
    for _, m in bn_modules(model):
        c = m.num_features

        def u(lo: float, hi: float, c: int = c) -> torch.Tensor:
            return torch.rand(c, generator=g, dtype=torch.float64) * (hi - lo) + lo

        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(u(-0.5, 0.5) * spread)
            m.running_var.copy_(torch.exp(u(-1.4, 0.9)))
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(1000)
        if getattr(m, "weight", None) is not None:
            sign = torch.where(torch.rand(c, generator=g) < 0.1, -1.0, 1.0).to(torch.float64)
            m.weight.copy_(u(0.5, 1.5) * sign)
            m.bias.copy_(u(-0.5, 0.5) * spread)
    return model


def bn_stats(c: int, rng: np.random.Generator, shape: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """Realistic BN parameters as float64 arrays (gamma, beta, mean, var), for graphs built by hand.

    The ranges of :func:`randomize_bn`: mean != 0, var != 1, gamma != 1 (10% negative), beta != 0.
    """
    shp = shape or (c,)
    gamma = rng.uniform(0.5, 1.5, shp) * np.where(rng.random(shp) < 0.1, -1.0, 1.0)
    beta = rng.uniform(-0.5, 0.5, shp)
    mean = rng.uniform(-0.5, 0.5, shp)
    var = np.exp(rng.uniform(-1.4, 0.9, shp))
    return [gamma, beta, mean, var]
