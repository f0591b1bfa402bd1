"""FrozenBatchNorm: BatchNorm frozen into the fixed per-channel affine map it computes at inference.

Math (float64, one cast to the layer dtype at the end)::

    scale = gamma / sqrt(running_var + eps)        (gamma = 1 when affine=False)
    shift = beta - running_mean * scale            (beta  = 0 when affine=False)
    y[:, c, ...] = x[:, c, ...] * scale[c] + shift[c]

Rules:
    * the output is the same in ``train()`` and ``eval()`` mode; there are no running statistics to
      update; ``scale``/``shift`` are buffers (no gradient) unless ``learnable=True`` makes them
      parameters, initialised at the folded values;
    * ``eps`` stays inside ``scale`` and is kept on the layer (> 0, never 0) for mapping back to BN;
    * a state_dict saved from a BatchNorm (``weight``, ``bias``, ``running_mean``, ``running_var``,
      ``num_batches_tracked``) loads directly: it is converted with this layer's ``eps``;
      ``scale``/``shift`` entries load as they are. :meth:`FrozenBatchNorm.bn_state` maps back;
    * exports to ONNX as one ``Mul`` and one ``Add`` with constant per-channel operands.

Mapping back to BN (same ``eps``), in three cases:

1. The layer still computes exactly what its source BN computed: the source values are known
   (``from_bn`` or a BN-format checkpoint keep ``source_weight``/``source_bias``/``source_mean``/
   ``source_var``) and ``scale``/``shift`` are bit for bit the fold of those values with this ``eps``.
   The BN comes back *exactly*: its own gamma, beta, mean and var, so also the same eval output.
2. Only the statistics are known, or ``scale``/``shift`` changed since (fine-tuned with
   ``learnable=True``): ``mean`` and ``var`` are the source statistics, ``weight = scale * sqrt(var +
   eps)``, ``bias = shift + mean * scale``, computed in float64 and rounded once to the dtype.
3. Nothing is known: ``mean = 0``, ``var = 1 - eps`` (0 when ``eps >= 1``), the same formulas.

In cases 2 and 3 ``weight`` and ``bias`` are each within half an ulp of the dtype of the values that
reproduce ``scale``/``shift``, so the BN's eval output agrees with the frozen layer's to a few ulp of
the dtype (float32: ~1e-7 relative), not bit for bit.

Post-processing kept (a frozen ``BatchNormAct2d``): ``tail``, when set, is applied to the affine
output (``y = tail(x * scale + shift)``), in train mode too (dropout stays active); BN-format
checkpoint keys of the tail's modules (``act.weight``) load into ``tail.act.weight``.

The source values (``source_weight``/``source_bias``/``source_mean``/``source_var`` in the BN's dtype,
``source_num_batches_tracked``) are persistent buffers once known, so ``unfreeze`` after a save/load round trip gives back the BN
exactly (case 1); for a BN class bnfold
cannot rebuild from its constructor (a subclass with its own ``__init__``) a copy of the source layer
is kept as a template.

The affine map is computed by :func:`bnfold.fold_math.bn_affine` (float64 NumPy) and rounded once with
:func:`bnfold.fold_math.cast_exact` (correct rounding, bfloat16 included): the one fold math of bnfold.
This module imports torch, numpy and ``bnfold.fold_math`` only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bnfold.dtypes import from_float64, to_float64
from bnfold.fold_math import bn_affine

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "SOURCE_KEYS",
    "input_ranks",
]

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
SOURCE_KEYS = ("source_weight", "source_bias", "source_mean", "source_var", "source_num_batches_tracked")
"""Buffers holding the BN values a layer was frozen from (see "Mapping back to BN")."""


def _affine64(
    gamma: Tensor | None, beta: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Any, Any]:
    """Eval-mode BN as float64 NumPy ``(scale, shift)`` (:func:`bnfold.fold_math.bn_affine`)."""
    return bn_affine(to_float64(gamma), to_float64(beta), to_float64(mean), to_float64(var), float(eps))


def _counter(n: Tensor, device: torch.device | str) -> Tensor:
    """A copy of a BN's ``num_batches_tracked`` (int64 scalar)."""
    return n.detach().clone().reshape(()).to(device=device, dtype=torch.long)


_RANKS = {1: frozenset((2, 3)), 2: frozenset((4,)), 3: frozenset((5,))}


def input_ranks(dim: int | None) -> frozenset[int] | None:
    """The input ranks of the BatchNorm{dim}d a frozen layer stands for (None: any rank >= 2)."""
    return _RANKS.get(dim) if dim is not None else None


class FrozenBatchNorm(nn.Module):
    """A BatchNorm frozen into ``y = x * scale + shift`` per channel (channel dim 1, any rank >= 2).

    Args:
        num_features: number of channels ``C``.
        eps: the epsilon of the BN this layer stands for (> 0); kept for mapping back to BN and for
            converting BN-format checkpoints.
        learnable: make ``scale`` and ``shift`` trainable ``nn.Parameter`` s (default: buffers).
        dim: 1, 2 or 3 for the BatchNorm{1,2,3}d it replaces, whose input rank it then checks like that
            BN (2-D or 3-D, 4-D, 5-D: the frozen model refuses what the original refused, and a fold after
            it knows a conv before it ran batched); ``None``: any rank >= 2. Also read by
            :func:`bnfold.unfreeze`.
        dtype: dtype of ``scale``/``shift`` (default: torch's default dtype).
        device: device of ``scale``/``shift``.

    Attributes:
        scale: ``(C,)`` per-channel factor.
        shift: ``(C,)`` per-channel offset.
        source: the BatchNorm class this layer was frozen from (``None`` if unknown).
        momentum: the momentum of that BN (used when turning the layer back into a BN).
    """

    scale: Tensor
    shift: Tensor
    source_weight: Tensor | None
    source_bias: Tensor | None
    source_mean: Tensor | None
    source_var: Tensor | None
    source_num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        learnable: bool = False,
        dim: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not eps > 0 or not math.isfinite(eps):
            raise ValueError(f"FrozenBatchNorm eps must be a finite number > 0, got {eps!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.learnable = bool(learnable)
        self.dim = dim
        self.source: type[nn.Module] | None = None
        self.momentum: float | None = 0.1
        self.source_affine = True
        self.tail: nn.Module | None
        self.register_module("tail", None)
        # A copy of the layer frozen from, when its class is not rebuilt from (num_features, eps, ...).
        object.__setattr__(self, "source_template", None)
        scale = torch.ones(self.num_features, dtype=dtype, device=device)
        shift = torch.zeros(self.num_features, dtype=dtype, device=device)
        if learnable:
            self.scale = nn.Parameter(scale)
            self.shift = nn.Parameter(shift)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)
        # The BN values the layer was frozen from (saved in state_dict once known; None when unknown;
        # gamma/beta also None for a BN with affine=False).
        for name in SOURCE_KEYS:
            self.register_buffer(name, None)

    @classmethod
    def from_bn(
        cls,
        bn: nn.Module,
        learnable: bool = False,
        *,
        stats: tuple[Tensor | None, Tensor | None, Tensor, Tensor, float] | None = None,
        tail: nn.Module | None = None,
        template: nn.Module | None = None,
    ) -> FrozenBatchNorm:
        """The frozen layer that computes what ``bn`` computes in eval mode.

        Args:
            bn: a BatchNorm with running statistics (``track_running_stats=True``).
            learnable: make ``scale``/``shift`` trainable parameters, initialised at the folded values.
            stats: ``(weight, bias, running_mean, running_var, eps)`` when they are not ``bn``'s
                attributes of those names (a BN-like layer).
            tail: the module ``bn`` applies to its normalised output (activation, dropout), kept.
            template: a copy of ``bn`` that :func:`bnfold.unfreeze` starts from (for classes it
                cannot construct).

        Returns:
            A new layer on the BN's device, in the dtype of its weight (or running mean if
            ``affine=False``), with the BN's ``training`` flag.

        Raises:
            ValueError: the BN has no running statistics, or ``scale``/``shift`` are not finite in its
                dtype (e.g. float16 overflow).
        """
        if stats is None:
            mean = getattr(bn, "running_mean", None)
            var = getattr(bn, "running_var", None)
            weight = getattr(bn, "weight", None)
            bias = getattr(bn, "bias", None)
            eps = float(bn.eps)  # type: ignore[arg-type]
        else:
            weight, bias, mean, var, eps = stats
            eps = float(eps)
        if mean is None or var is None:
            raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False)")
        dtype = weight.dtype if weight is not None else mean.dtype
        name = type(bn).__name__
        dim = int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else None
        layer = cls(int(mean.numel()), eps, learnable=learnable, dim=dim, dtype=dtype, device=mean.device)
        layer._set_from_stats(weight, bias, mean, var, eps)
        layer.source = type(bn)
        layer.source_affine = weight is not None
        momentum = getattr(bn, "momentum", 0.1)
        layer.momentum = None if momentum is None else float(momentum)
        nbt = getattr(bn, "num_batches_tracked", None)
        layer.source_num_batches_tracked = None if nbt is None else _counter(nbt, mean.device)
        layer.tail = tail
        if template is not None:
            object.__setattr__(layer, "source_template", template)
        layer.train(bn.training)
        return layer

    @torch.no_grad()
    def _set_from_stats(
        self, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float
    ) -> None:
        scale64, shift64 = _affine64(weight, bias, mean, var, eps)
        dev = self.scale.device
        scale = from_float64(scale64.reshape(-1), self.scale.dtype, dev)
        shift = from_float64(shift64.reshape(-1), self.shift.dtype, dev)
        if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(shift).all())):
            raise ValueError(f"frozen scale/shift are not finite in {self.scale.dtype}")
        self.scale.copy_(scale)
        self.shift.copy_(shift)
        self.source_num_batches_tracked = None
        self.source_weight = None if weight is None else weight.detach().clone().reshape(-1).to(dev)
        self.source_bias = None if bias is None else bias.detach().clone().reshape(-1).to(dev)
        self.source_mean = mean.detach().clone().reshape(-1).to(dev)
        self.source_var = var.detach().clone().reshape(-1).to(dev)

    @torch.no_grad()
    def _source_unchanged(self) -> bool:
        """Case 1 of the mapping back: ``scale``/``shift`` are bit for bit the fold of the source values."""
        mean, var = self.source_mean, self.source_var
        if mean is None or var is None:
            return False
        try:
            scale64, shift64 = _affine64(self.source_weight, self.source_bias, mean, var, self.eps)
        except ValueError:
            return False
        dev = self.scale.device
        scale = from_float64(scale64.reshape(-1), self.scale.dtype, dev)
        shift = from_float64(shift64.reshape(-1), self.shift.dtype, dev)
        return bool(torch.equal(scale, self.scale.detach())) and bool(torch.equal(shift, self.shift.detach()))

    def forward(self, x: Tensor) -> Tensor:
        ranks = input_ranks(self.dim)
        if ranks is not None and x.dim() not in ranks:
            want = " or ".join(f"{r}D" for r in sorted(ranks))
            raise ValueError(f"expected {want} input (got {x.dim()}D input)")
        if x.dim() < 2:
            raise ValueError(f"FrozenBatchNorm expects an input of rank >= 2 (N, C, ...), got {x.dim()}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.scale.reshape(shape) + self.shift.reshape(shape)
        return y if self.tail is None else self.tail(y)

    @torch.no_grad()
    def bn_state(self, affine: bool | None = None) -> dict[str, Tensor]:
        """BatchNorm-format entries that reproduce this layer's output in a BN with the same ``eps``.

        Args:
            affine: produce ``weight``/``bias`` (True) or statistics only, for a BN with
                ``affine=False`` (False: ``var = 1/scale**2 - eps``, ``mean = -shift/scale``, possible only
                when ``0 < scale <= 1/sqrt(eps)``). Default: as the BN the layer was frozen from
                (True when unknown).

        Returns:
            ``weight`` and ``bias`` (when affine), ``running_mean``, ``running_var`` (this layer's
            dtype and device) and ``num_batches_tracked`` (int64), as a ``torch.nn.BatchNorm*d``
            state_dict holds them: the source BN's own values when the layer is unchanged since it
            was frozen (case 1 of the module docstring), else derived from ``scale``/``shift``.

        Raises:
            ValueError: ``affine=False`` and some channel's scale is not in ``(0, 1/sqrt(eps)]``.
        """
        dt, dev = self.scale.dtype, self.scale.device
        scale = self.scale.detach().to(torch.float64)
        shift = self.shift.detach().to(torch.float64)
        counted = self.source_num_batches_tracked
        nbt = torch.zeros((), dtype=torch.long, device=dev) if counted is None else _counter(counted, dev)
        if affine is None:
            affine = self.source_affine
        if self._source_unchanged():
            assert self.source_mean is not None and self.source_var is not None
            exact = {"running_mean": self.source_mean.to(dev, dt), "running_var": self.source_var.to(dev, dt)}
            w, b = self.source_weight, self.source_bias
            if affine:  # a BN without gamma/beta computes what gamma = 1, beta = 0 computes
                exact["weight"] = torch.ones_like(scale, dtype=dt) if w is None else w.to(dev, dt)
                exact["bias"] = torch.zeros_like(scale, dtype=dt) if b is None else b.to(dev, dt)
            if affine or (w is None and b is None):
                return {**exact, "num_batches_tracked": nbt}
        if not affine:
            var = 1.0 / scale.square() - self.eps
            if not (bool((scale > 0).all()) and bool((var >= 0).all())):
                raise ValueError(
                    "scale has channels outside (0, 1/sqrt(eps)]: a BatchNorm with affine=False cannot "
                    "compute this layer; map to an affine BN"
                )
            return {
                "running_mean": (-shift / scale).to(dt),
                "running_var": var.to(dt),
                "num_batches_tracked": nbt,
            }
        if self.source_mean is not None and self.source_var is not None:
            mean = self.source_mean.to(dev).to(torch.float64)
            var = self.source_var.to(dev).to(torch.float64)
        else:
            mean = torch.zeros_like(scale)
            var = torch.full_like(scale, max(1.0 - self.eps, 0.0))
        # The BN rounds its statistics to its dtype: derive weight from the rounded values.
        mean = mean.to(dt).to(torch.float64)
        var = var.to(dt).to(torch.float64)
        weight = scale * torch.sqrt(var + self.eps)
        bias = shift + mean * scale
        return {
            "weight": weight.to(dt),
            "bias": bias.to(dt),
            "running_mean": mean.to(dt),
            "running_var": var.to(dt),
            "num_batches_tracked": nbt,
        }

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.tail is not None:
            # BN-format keys of the tail's modules (``act.weight``) live under ``tail.`` here.
            heads = {n for n, _ in self.tail.named_children()}
            for key in [k for k in state_dict if k.startswith(prefix)]:
                rest = key[len(prefix) :]
                if rest.split(".")[0] in heads and prefix + "tail." + rest not in state_dict:
                    state_dict[prefix + "tail." + rest] = state_dict.pop(key)
        source = {k: state_dict.pop(prefix + k, None) for k in SOURCE_KEYS}
        # A checkpoint saved from a BatchNorm: convert its entries to scale/shift with this eps.
        has_bn = any(prefix + k in state_dict for k in _BN_KEYS[:4])
        if has_bn and prefix + "scale" not in state_dict:
            mean = state_dict.pop(prefix + "running_mean", None)
            var = state_dict.pop(prefix + "running_var", None)
            weight = state_dict.pop(prefix + "weight", None)
            bias = state_dict.pop(prefix + "bias", None)
            nbt = state_dict.pop(prefix + "num_batches_tracked", None)
            if mean is None or var is None:
                error_msgs.append(
                    f"{prefix or 'FrozenBatchNorm'}: BatchNorm entries without running_mean/running_var "
                    "(a BN with track_running_stats=False has no inference map to freeze)"
                )
                return
            try:
                self._set_from_stats(weight, bias, mean, var, self.eps)
            except ValueError as e:
                error_msgs.append(f"{prefix or 'FrozenBatchNorm'}: {e}")
                return
            self.source_affine = weight is not None
            self.source_num_batches_tracked = None if nbt is None else _counter(nbt, self.scale.device)
            return
        state_dict.pop(prefix + "num_batches_tracked", None)
        given = prefix + "scale" in state_dict
        if given:  # the source values are read here, not by the default loader
            for k in SOURCE_KEYS:
                setattr(self, k, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if given and source["source_mean"] is not None and source["source_var"] is not None:
            # scale/shift given directly: the values they came from are saved with them, or unknown.
            for k, v in source.items():
                setattr(self, k, None if v is None else v.detach().clone().to(self.scale.device))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, learnable={self.learnable}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` standing for a ``BatchNorm1d`` (input ``(N, C)`` or ``(N, C, L)``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, **kwargs: Any) -> None:
        kwargs.setdefault("dim", 1)
        super().__init__(num_features, eps, **kwargs)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` standing for a ``BatchNorm2d`` (input ``(N, C, H, W)``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, **kwargs: Any) -> None:
        kwargs.setdefault("dim", 2)
        super().__init__(num_features, eps, **kwargs)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` standing for a ``BatchNorm3d`` (input ``(N, C, D, H, W)``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, **kwargs: Any) -> None:
        kwargs.setdefault("dim", 3)
        super().__init__(num_features, eps, **kwargs)
