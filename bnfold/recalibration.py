"""Re-estimate BatchNorm running statistics on new data, on one process or across many.

``recalibrate(model, batches)`` runs ``model`` on ``batches`` under ``torch.no_grad()`` with only the
BatchNorm layers in train mode (so each normalises with its batch statistics, exactly as in
training), records the per-channel statistics of every BN's *input*, and writes them into
``running_mean`` / ``running_var`` / ``num_batches_tracked``. Nothing else changes. Rules:

    1. Layers: every ``_BatchNorm`` with running statistics. ``FrozenBatchNorm`` and BNs with
       ``track_running_stats=False`` have none and are untouched; so is a BN no batch reached (its
       old statistics stay; logged).
    2. Estimators, per channel, all accumulated in float64, ``b`` the batches, ``k_b`` the values per
       channel in batch ``b`` (batch size x spatial size):

       * ``pooled=False`` (default, PyTorch's ``momentum=None`` cumulative average, what
         ``torch.optim.swa_utils.update_bn`` computes)::

             mean = (1/B) sum_b mean_b,   var = (1/B) sum_b var_b   (var_b unbiased)

       * ``pooled=True``: the statistics of all values together, as if one batch held them all::

             mean = sum_b k_b mean_b / K,   var = M2 / (K - 1),
             M2 = sum_b [ M2_b + k_b (mean_b - mean)^2 ],   K = sum_b k_b

         (per process combined batch by batch with Chan et al.'s parallel update, no cancellation).
         It differs from the average when batches differ from each other (sorted data, uneven sizes).

    3. Prior (``prior=N``, Schneider et al. 2020, "Improving robustness against common corruptions
       by covariate shift adaptation"): the statistics already in the layer (the *source*) count as
       ``N`` samples and are combined with the new (*target*) ones, ``n`` samples, like two pooled
       groups (source ``K_s = N * K/n`` values, ``M2_s = var_s (K_s - 1)``)::

             mean = (K_s mean_s + K mean_t) / (K_s + K)
             var  = (M2_s + M2_t + (mean_s - mean_t)^2 K_s K / (K_s + K)) / (K_s + K - 1)

       i.e. ``mean = (N mean_s + n mean_t) / (N + n)`` and the variance of the mixture, including the
       between-means term. ``prior=None`` (or 0) replaces the statistics. With ``pooled=True`` and
       source statistics that were themselves pooled over ``N`` samples, the result equals one pooled
       recalibration over source and target data.
    4. Distributed: when ``torch.distributed`` is initialised with world size > 1 (and
       ``distributed=True``), every process contributes the batches it sees, and ONE ``all_reduce``
       (sum, float64) of one tensor for all layers together gives every process the same statistics,
       equal to one process that saw all the batches. Per layer the tensor holds ``sum mean_b``,
       ``sum var_b``, ``S1 = K mean``, ``S2 = M2 + K mean^2``, the batch count, ``K`` and ``n``;
       then ``mean = S1 / K`` and ``M2 = S2 - S1 mean``. Numerics: the subtraction cancels only the
       spread of the per-process means around the global one, never the raw ``sum(x^2)``; in float64
       the relative error of the variance stays near ``1e-16 (mean/std)^2``. A process with no batches
       still takes part (it contributes zeros). ``SyncBatchNorm`` layers (torch's or bnfold's) stay in
       eval mode and a hook gives their batch-normalised output locally, so the forward passes make
       no collective calls and processes may see different numbers of batches. The prior uses each
       process's own source statistics: they must be equal on all processes (a replicated model).
    5. Errors: no batch at all (on any process) is an ``OptionError``, non-finite statistics (inf
       or nan in the data) an ``InputError`` naming the layer; on an exception the model's
       statistics are restored (with ``inplace=True`` too) and the flags put back. Under
       ``torch.distributed`` every process of the group must call it (it is a collective), on the
       module itself: a ``DistributedDataParallel`` wrapper is refused (``InputError``), its forward
       broadcasts buffers in every batch.

``param_groups(model, lr, affine_lr_scale=10)`` is the optimizer side of small-batch fine-tuning
after ``freeze(learnable=True)``: the learnable ``scale``/``shift`` of every ``FrozenBatchNorm`` in one
parameter group at ``lr * affine_lr_scale``, every other trainable parameter at ``lr``. The default 10
is measured (``benchmarks/finetune_small_batch.py``: the best batch-2 mode on both tasks; at batch 8
and up it was worse than plain freezing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import InputError, OptionError
from .fx.module import copy_model

__all__ = ["recalibrate", "param_groups"]

log = logging.getLogger(__name__)

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _sync_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [nn.SyncBatchNorm]
    try:
        from .nn import SyncBatchNorm

        types.append(SyncBatchNorm)
    except ImportError:  # pragma: no cover - bnfold.nn always ships
        log.debug("bnfold.nn not importable")
    return tuple(types)


@dataclass
class _Acc:
    """Per-layer float64 accumulators on one process (see rule 2)."""

    sum_mean: Tensor
    sum_var: Tensor
    mean: Tensor  # pooled running mean (Chan)
    m2: Tensor  # pooled centred sum of squares (Chan)
    batches: int = 0
    values: int = 0  # K: values per channel
    samples: int = 0  # n: size of dim 0, summed
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def new(cls, c: int, device: torch.device) -> _Acc:
        def z() -> Tensor:
            return torch.zeros(c, dtype=torch.float64, device=device)

        return cls(z(), z(), z(), z(), device=device)

    def add(self, x: Tensor) -> None:
        c = x.shape[1]
        k = x.numel() // c if c else 0
        if k == 0:
            return
        xd = x.detach().to(torch.float64)
        dims = [0, *range(2, xd.dim())]
        var_b, mean_b = torch.var_mean(xd, dims, correction=0)  # two-pass, float64
        m2_b = var_b * k
        self.sum_mean += mean_b
        self.sum_var += m2_b / (k - 1) if k > 1 else torch.full_like(m2_b, math.nan)
        total = self.values + k
        delta = mean_b - self.mean
        self.mean += delta * (k / total)
        self.m2 += m2_b + delta * delta * (self.values * k / total)
        self.values = total
        self.batches += 1
        self.samples += x.shape[0]

    def pack(self) -> Tensor:
        s1 = self.mean * self.values
        s2 = self.m2 + self.mean * self.mean * self.values
        counts = torch.tensor(
            [self.batches, self.values, self.samples], dtype=torch.float64, device=self.device
        )
        return torch.cat([self.sum_mean, self.sum_var, s1, s2, counts])

    def unpack(self, flat: Tensor) -> None:
        c = self.mean.numel()
        s1, s2 = flat[2 * c : 3 * c], flat[3 * c : 4 * c]
        self.sum_mean, self.sum_var = flat[:c].clone(), flat[c : 2 * c].clone()
        self.batches, self.values, self.samples = (int(round(float(v))) for v in flat[4 * c :])
        if self.values > 0:
            self.mean = s1 / self.values
            self.m2 = (s2 - s1 * self.mean).clamp_(min=0.0)


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _group(process_group: Any | None, distributed: bool) -> Any | None:
    if not distributed or not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _target_stats(acc: _Acc, pooled: bool) -> tuple[Tensor, Tensor]:
    """(mean, unbiased var) of the new data, float64 (rule 2)."""
    if pooled:
        return acc.mean, acc.m2 / max(acc.values - 1, 1)
    return acc.sum_mean / acc.batches, acc.sum_var / acc.batches


def _mix(
    mean_s: Tensor, var_s: Tensor, mean_t: Tensor, var_t: Tensor, acc: _Acc, prior: float
) -> tuple[Tensor, Tensor]:
    """Source statistics as ``prior`` samples combined with the target ones (rule 3), float64."""
    k_t = float(acc.values)
    k_s = prior * k_t / acc.samples
    total = k_s + k_t
    m2 = var_s * max(k_s - 1.0, 0.0) + var_t * (k_t - 1.0)
    d = mean_s - mean_t
    m2 = m2 + d * d * (k_s * k_t / total)
    return (k_s * mean_s + k_t * mean_t) / total, m2 / max(total - 1.0, 1.0)


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    inplace: bool = False,
    prior: float | None = None,
    pooled: bool = False,
    distributed: bool = True,
    process_group: Any | None = None,
) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm on ``batches``; nothing else changes.

    Only BN layers run in train mode (dropout and the like stay in eval mode), under
    ``torch.no_grad()``; parameters, momentum and every ``training`` flag are as before afterwards.
    Under ``torch.distributed`` each process passes its own shard and all get the same statistics,
    equal to one process that saw every batch (one ``all_reduce`` for all layers).

    Args:
        model: the model (not changed unless ``inplace``).
        batches: an iterable of inputs: a tensor (``model(x)``), a tuple/list (``model(*b)``) or a
            mapping (``model(**b)``). Labels are not needed: pass inputs only.
        inplace: change ``model`` itself.
        prior: keep the current statistics as a prior worth this many samples (Schneider et al.
            2020's ``N``): ``mean = (N mean_old + n mean_new) / (N + n)``, the variance likewise with
            the between-means term. ``None`` (default) or 0 replaces them.
        pooled: estimate from all values together (``var = M2 / (K - 1)`` over every batch) rather
            than PyTorch's average of per-batch means and variances (default).
        distributed: reduce across the processes of ``process_group`` when ``torch.distributed``
            is initialised with more than one process.
        process_group: the group to reduce over (default: the world group).

    Returns:
        The model with new statistics.

    Raises:
        InputError: ``model`` is not an ``nn.Module``, or is a ``DistributedDataParallel`` wrapper
            (pass ``ddp_model.module``), or a layer's new statistics are not finite (inf/nan in the
            data; the model is left as it was).
        OptionError: no batch (on any process), or ``prior`` negative or not finite.

    Example:
        >>> model = bnfold.recalibrate(model, (x for x, _ in loader))        # new domain
        >>> model = bnfold.recalibrate(model, few_batches, prior=16)         # keep the source as 16 samples
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"recalibrate expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        # its forward broadcasts buffers (a collective per batch) and it cannot be deep-copied
        raise InputError("recalibrate the wrapped module (ddp_model.module), not the DistributedDataParallel")
    if prior is not None and not (math.isfinite(prior) and prior >= 0):
        raise OptionError(f"prior must be a finite number >= 0, got {prior}")
    group = _group(process_group, distributed)
    root = model if inplace else copy_model(model)  # copes with tensors a forward cached (LeViT)
    named = [
        (n, m)
        for n, m in root.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]
    bns = [m for _, m in named]
    sync = _sync_types()
    flags = {id(m): m.training for m in root.modules()}
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if k in _STATS} for m in bns]
    accs = [_Acc.new(m.num_features, m.running_mean.device) for m in bns]  # type: ignore[union-attr]
    hooks = []
    ok = False
    try:
        root.eval()
        for m, acc in zip(bns, accs):

            def record(_m: nn.Module, args: tuple[Any, ...], acc: _Acc = acc) -> None:
                acc.add(args[0])

            hooks.append(m.register_forward_pre_hook(record))
            if isinstance(m, sync):
                # rule 4: no collective per forward; the batch-normalised output, computed locally
                def local_bn(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> Tensor:
                    eps = float(mod.eps)  # type: ignore[arg-type]
                    return F.batch_norm(args[0], None, None, mod.weight, mod.bias, True, 0.0, eps)  # type: ignore[arg-type]

                hooks.append(m.register_forward_hook(local_bn))
            else:
                m.train()
        count = 0
        with torch.no_grad():
            for batch in batches:
                _call(root, batch)
                count += 1
        for h in hooks:
            h.remove()
        hooks = []
        if group is not None:
            device = accs[0].device if accs else torch.device("cpu")
            packs = [a.pack().to(device) for a in accs]
            flat = torch.cat([*packs, torch.tensor([float(count)], dtype=torch.float64, device=device)])
            dist.all_reduce(flat, group=group)
            count = int(round(float(flat[-1])))
            offset = 0
            for a, p in zip(accs, packs):
                a.unpack(flat[offset : offset + p.numel()].to(a.device))
                offset += p.numel()
        if count == 0:
            raise OptionError("recalibrate needs at least one batch")
        with torch.no_grad():
            for (name, m), acc, old in zip(named, accs, saved):
                if acc.batches == 0:
                    log.info("%s: no batch reached this BatchNorm; statistics unchanged", name or "<root>")
                    for k, v in old.items():
                        getattr(m, k).copy_(v)
                    continue
                mean, var = _target_stats(acc, pooled)
                if prior:
                    mean, var = _mix(
                        old["running_mean"].double(), old["running_var"].double(), mean, var, acc, prior
                    )
                if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
                    raise InputError(
                        f"{name or type(m).__name__}: the re-estimated statistics are not finite "
                        "(inf or nan in the batches, or in the activations they produce)"
                    )
                m.running_mean.copy_(mean)  # type: ignore[union-attr]
                m.running_var.copy_(var)  # type: ignore[union-attr]
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(acc.batches)
        ok = True
    finally:
        for h in hooks:
            h.remove()
        if not ok:
            with torch.no_grad():
                for m, old in zip(bns, saved):
                    for k, v in old.items():
                        getattr(m, k).copy_(v)
        for mod in root.modules():
            mod.training = flags.get(id(mod), mod.training)
    log.debug("recalibrated %d BatchNorm on %d batches", len(bns), count)
    return root


def param_groups(model: nn.Module, lr: float, *, affine_lr_scale: float = 10.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the frozen BN affine at its own learning rate.

    Args:
        model: a model after ``bnfold.freeze(model, learnable=True)``.
        lr: the learning rate of every trainable parameter that is not a frozen layer's
            ``scale``/``shift``.
        affine_lr_scale: the frozen layers' ``scale``/``shift`` get ``lr * affine_lr_scale``.

    Returns:
        ``[{"params": others, "lr": lr}, {"params": affine, "lr": lr * affine_lr_scale}]`` for any
        ``torch.optim`` optimizer (the second group only when there is a learnable frozen layer);
        each parameter appears once, also when a layer is shared.

    Raises:
        OptionError: ``lr`` or ``affine_lr_scale`` negative or not finite.

    Example:
        >>> model = bnfold.freeze(bnfold.recalibrate(model, batches), learnable=True)
        >>> opt = torch.optim.SGD(bnfold.param_groups(model, 1e-3), lr=1e-3, momentum=0.9)
    """
    from .nn.frozen import FrozenBatchNorm

    for name, v in (("lr", lr), ("affine_lr_scale", affine_lr_scale)):
        if not (math.isfinite(v) and v >= 0):
            raise OptionError(f"{name} must be a finite number >= 0, got {v}")
    affine_ids = {
        id(p) for m in model.modules() if isinstance(m, FrozenBatchNorm) for p in m.parameters(recurse=False)
    }
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() removes duplicates
    affine = [p for p in params if id(p) in affine_ids]
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in affine_ids], "lr": lr}]
    if affine:
        groups.append({"params": affine, "lr": lr * affine_lr_scale})
    return groups
