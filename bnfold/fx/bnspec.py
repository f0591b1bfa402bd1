"""What a BatchNorm-like module computes in eval mode: a :class:`BnSpec` (``tail(scale * x + shift)``).

Built by :func:`bnfold.fx.custom.describe_bn`; the fold removes the normalisation and keeps the
tail, freezing keeps the tail after a frozen affine. ``affine64`` is the eval map in float64
(:func:`bnfold.fold_math.bn_affine`, or a frozen layer's own scale and shift).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, fx, nn

from bnfold.dtypes import to_float64
from bnfold.fold_math import F64, bn_affine

__all__ = ["BnSpec", "StatsFn", "TailFn", "NO_STATS"]

StatsFn = Callable[[nn.Module], tuple[Tensor | None, Tensor | None, Tensor, Tensor, float]]
TailFn = Callable[[nn.Module], nn.Module | None]


NO_STATS = "track_running_stats=False: the layer normalises with batch statistics even in eval mode"


@dataclass
class BnSpec:
    """What a BN-like module computes in eval mode: ``tail(scale * x + shift)``.

    Attributes:
        weight, bias, mean, var, eps: the statistics the normalisation uses (weight/bias may be None).
        num_features: channels.
        tail_graph: the fx graph of the tail (Rule 3; input placeholder = the BN output), or None.
        tail_fn: the registered tail factory (Rule 2), or None.
        kind: "plain", "registered" or "traced".
        ranks: the input ranks the layer accepts (it raises on any other), None when any rank >= 2 runs.
    """

    weight: Tensor | None
    bias: Tensor | None
    mean: Tensor | None
    var: Tensor | None
    eps: float
    num_features: int
    kind: str = "plain"
    tail_graph: fx.Graph | None = None
    tail_fn: TailFn | None = None
    tail_names: tuple[str, ...] = field(default=())
    frozen: tuple[Tensor, Tensor] | None = None
    ranks: frozenset[int] | None = None

    def affine64(self) -> tuple[F64, F64]:
        """The eval map as float64 ``(scale, shift)``."""
        if self.frozen is not None:
            s, t = to_float64(self.frozen[0]), to_float64(self.frozen[1])
            assert s is not None and t is not None
            return s.reshape(-1), t.reshape(-1)
        mean, var = to_float64(self.mean), to_float64(self.var)
        assert mean is not None and var is not None
        return bn_affine(to_float64(self.weight), to_float64(self.bias), mean, var, self.eps)

    @property
    def has_tail(self) -> bool:
        return self.tail_graph is not None or self.tail_fn is not None

    def make_tail(self, module: nn.Module) -> nn.Module | None:
        """The tail as a module, built from ``module`` (the layer itself, or a copy of it)."""
        if self.tail_fn is not None:
            return self.tail_fn(module)
        if self.tail_graph is None:
            return None
        return fx.GraphModule(module, copy.deepcopy(self.tail_graph), f"{type(module).__name__}Tail")
