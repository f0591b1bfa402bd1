"""Where the channels of a weight are (:class:`WeightLayout`), and per-channel factors laid out on it.

A layout is always given, never guessed from a shape. Grouped weights: one axis spans every channel
of its side (the *full* axis: axis 0 for both Conv ``[C_out, C_in/g, *k]`` and ConvTranspose
``[C_in, C_out/g, *k]``), the other holds the channels of one group only, and the group of an element
is given by its index on the full axis (:func:`channel_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnfold.errors import ModelFormatError

from .cast import F64, ArrayLike, f64

__all__ = ["WeightLayout", "channel_factor", "LayoutError"]


class LayoutError(ModelFormatError, ValueError):
    """Per-channel values do not fit a weight's layout (a channel count, or groups that do not divide
    the weight): the layer is not what its layout says. A typed bnfold error (exit 2); still a
    ``ValueError`` for callers that caught one before."""


@dataclass(frozen=True, slots=True)
class WeightLayout:
    """Where the channels of a weight tensor are.

    Attributes:
        out_axis: axis of the weight that indexes the layer's output channels (per group if grouped).
        in_axis: axis that indexes the layer's input channels (per group if grouped).
        groups: number of groups (1 for dense layers).
        transposed: True for ConvTranspose (``[C_in, C_out/groups, *k]``): the full axis is ``in_axis``.
    """

    out_axis: int
    in_axis: int
    groups: int = 1
    transposed: bool = False

    @classmethod
    def conv(cls, groups: int = 1) -> WeightLayout:
        """Conv weight ``[C_out, C_in/groups, *k]``."""
        return cls(out_axis=0, in_axis=1, groups=groups, transposed=False)

    @classmethod
    def conv_transpose(cls, groups: int = 1) -> WeightLayout:
        """ConvTranspose weight ``[C_in, C_out/groups, *k]``."""
        return cls(out_axis=1, in_axis=0, groups=groups, transposed=True)

    @classmethod
    def linear(cls) -> WeightLayout:
        """torch Linear weight ``[out, in]`` (also ONNX Gemm with ``transB=1``)."""
        return cls(out_axis=0, in_axis=1)

    @classmethod
    def gemm(cls, trans_b: bool) -> WeightLayout:
        """ONNX Gemm B: ``[K, N]``, or ``[N, K]`` when ``transB=1``."""
        return cls.linear() if trans_b else cls(out_axis=1, in_axis=0)

    @classmethod
    def matmul(cls) -> WeightLayout:
        """MatMul right operand ``[..., K, N]``: out axis -1, in axis -2."""
        return cls(out_axis=-1, in_axis=-2)

    @property
    def full_axis(self) -> int:
        return self.in_axis if self.transposed else self.out_axis


def channel_factor(values: ArrayLike, shape: tuple[int, ...], layout: WeightLayout, side: str) -> F64:
    """A per-channel vector laid out so that it broadcasts against a weight of ``shape``.

    ``values[c]`` lands on every weight element that belongs to channel ``c`` of the layer's output
    (``side="out"``) or input (``side="in"``) side, groups included.

    Args:
        values: one value per channel of that side (length ``C``).
        shape: the weight's shape.
        layout: where the channels are.
        side: ``"out"`` or ``"in"``.

    Returns:
        A float64 array broadcastable to ``shape``.
    """
    v = f64(values).reshape(-1)
    ndim = len(shape)
    axis = (layout.out_axis if side == "out" else layout.in_axis) % ndim
    full = layout.full_axis % ndim
    g = layout.groups
    if axis == full or g == 1:
        expected = shape[axis] if axis == full else shape[axis] * g
        if v.shape[0] != expected:
            raise LayoutError(f"{v.shape[0]} channel values for a weight axis of {expected} channels")
        if axis != full:  # g == 1
            v = v[: shape[axis]]
        target = [1] * ndim
        target[axis] = shape[axis]
        return v.reshape(target)
    # The channel lives on a per-group axis; its group is set by the index on the full axis.
    n_full = shape[full]
    per_group_full = n_full // g
    per_group = shape[axis]
    if v.shape[0] != per_group * g or n_full % g:
        raise LayoutError(
            f"{v.shape[0]} channel values do not fit {g} groups of {per_group} (a weight axis of {n_full})"
        )
    group_of_full = np.arange(n_full) // per_group_full  # [n_full]
    idx = group_of_full[:, None] * per_group + np.arange(per_group)[None, :]  # [n_full, per_group]
    fac: F64 = v[idx]
    # Arrange the two axes in the weight's order, other axes as 1.
    if full > axis:
        fac = fac.T
    target = [1] * ndim
    target[full] = n_full
    target[axis] = per_group
    return fac.reshape(target)
