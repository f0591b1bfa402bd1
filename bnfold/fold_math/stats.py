"""BatchNorm statistics of new data, per channel, in float64: the arithmetic both backends share.

:func:`bnfold.recalibration.recalibrate` (PyTorch, torch tensors on the model's device) and
:func:`bnfold.onnx.recalibrate.recalibrate_model` (ONNX, NumPy arrays) accumulate the same numbers with
the same operations, written here once over any array type with NumPy's arithmetic (a torch
``Tensor`` or a NumPy ``ndarray``; nothing here imports torch):

* :class:`ChannelStats`: per-layer accumulators fed batch by batch with the batch's own moments
  (:meth:`ChannelStats.add_moments`): the sums of the per-batch means and unbiased variances, and the
  pooled mean and centred sum of squares combined with Chan et al.'s parallel update (no cancellation);
* :func:`target_stats`: the (mean, unbiased variance) of the new data, averaged over batches or pooled;
* :func:`mix_with_prior`: the source statistics as ``prior`` samples combined with the target ones
  (Schneider et al. 2020), the variance of the mixture including the between-means term.

:class:`NumpyStats` is the NumPy accumulator (ONNX); the torch one is
:class:`bnfold.recalibration.StatsAccumulator`. The formulas are rules 2 and 3 of
:mod:`bnfold.recalibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["ChannelStats", "NumpyStats", "Vector", "mix_with_prior", "target_stats"]


class Vector(Protocol):
    """A float64 vector of per-channel values with NumPy's arithmetic (ndarray, torch Tensor)."""

    def __add__(self, other: Any, /) -> Any: ...
    def __sub__(self, other: Any, /) -> Any: ...
    def __mul__(self, other: Any, /) -> Any: ...
    def __truediv__(self, other: Any, /) -> Any: ...


V = TypeVar("V", bound=Vector)


@dataclass
class ChannelStats(Generic[V]):
    """Per-layer float64 accumulators on one process (rule 2 of :mod:`bnfold.recalibration`)."""

    sum_mean: V
    sum_var: V
    mean: V  # pooled running mean (Chan)
    m2: V  # pooled centred sum of squares (Chan)
    batches: int = 0
    values: int = 0  # K: values per channel
    samples: int = 0  # n: size of dim 0, summed

    def add_moments(self, mean_b: V, var_b: V, k: int, n: int) -> None:
        """One batch: its per-channel mean and population variance over ``k`` values, ``n`` samples."""
        m2_b = var_b * k
        self.sum_mean = self.sum_mean + mean_b
        self.sum_var = self.sum_var + (m2_b / (k - 1) if k > 1 else m2_b * math.nan)
        total = self.values + k
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + (m2_b + delta * delta * (self.values * k / total))
        self.values = total
        self.batches += 1
        self.samples += n


def target_stats(acc: ChannelStats[V], pooled: bool) -> tuple[V, V]:
    """(mean, unbiased var) of the new data, float64 (rule 2)."""
    if pooled:
        return acc.mean, acc.m2 / max(acc.values - 1, 1)
    return acc.sum_mean / acc.batches, acc.sum_var / acc.batches


def mix_with_prior(
    mean_s: V, var_s: V, mean_t: V, var_t: V, acc: ChannelStats[V], prior: float
) -> tuple[V, V]:
    """Source statistics as ``prior`` samples combined with the target ones (rule 3), float64."""
    k_t = float(acc.values)
    k_s = prior * k_t / acc.samples
    total = k_s + k_t
    m2 = var_s * max(k_s - 1.0, 0.0) + var_t * (k_t - 1.0)
    d = mean_s - mean_t
    m2 = m2 + d * d * (k_s * k_t / total)
    return (mean_s * k_s + mean_t * k_t) / total, m2 / max(total - 1.0, 1.0)


F64Vector = npt.NDArray[np.float64]


@dataclass
class NumpyStats(ChannelStats[F64Vector]):
    """The accumulator over NumPy arrays (axis 1 the channels)."""

    @classmethod
    def new(cls, c: int) -> NumpyStats:
        def z() -> F64Vector:
            return np.zeros(c, dtype=np.float64)

        return cls(z(), z(), z(), z())

    def add(self, x: npt.NDArray[Any]) -> None:
        c = x.shape[1]
        k = x.size // c if c else 0
        if k == 0:
            return
        xd = x.astype(np.float64, copy=False)
        axes = (0, *range(2, xd.ndim))
        mean_b = xd.mean(axis=axes)
        var_b = xd.var(axis=axes)  # two-pass, float64
        self.add_moments(mean_b, var_b, k, int(x.shape[0]))
