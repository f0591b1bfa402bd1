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
    5. Agreement (distributed): before any batch is run, one ``all_gather`` of a fixed-size row per
       process (an error flag and its first line, ``prior`` and ``pooled``, the number of layers and
       channels, a hash of the names, shapes and dtypes of every recalibrated BN's statistics and,
       with a prior, a hash of those statistics) checks that every process holds the same layout,
       options and source statistics; after the batches a second ``all_gather`` of the same row says
       whether each process got through them ("ok?") before the data ``all_reduce``. So every
       process learns of a failure on any other, and all of them raise together, never waiting for
       the process group's timeout: a different layout or differing source statistics
       (with a prior) is a ``ModelStateError``, differing ``prior``/``pooled`` an ``OptionError``;
       the process that failed raises its own error, the others an error of the same bnfold class
       (``InputError`` for any other exception) naming the process and its first line. The rows are
       fixed-size, so models of different sizes never reach the backend's size checks (gloo aborts the
       process on a size mismatch). A process that does not call ``recalibrate`` at all still leaves
       the others waiting for the group's timeout.
    6. Errors: no batch at all (on any process) is an ``OptionError``, non-finite statistics (inf
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

import hashlib
import logging
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import errors
from .errors import InputError, ModelStateError, OptionError
from .fold_math.stats import ChannelStats, mix_with_prior, target_stats
from .fx.copying import copy_model

__all__ = ["recalibrate", "param_groups", "StatsAccumulator"]

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
class StatsAccumulator(ChannelStats[Tensor]):
    """Per-layer float64 accumulators on one process (see rule 2), torch tensors on ``device``."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def new(cls, c: int, device: torch.device) -> StatsAccumulator:
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
        self.add_moments(mean_b, var_b, k, x.shape[0])

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


# One row per process in the agreement all_gather (rule 5): fixed size, raw bytes in a uint8 tensor.
_ROW = struct.Struct("<B?dqq16s16s")  # failed, pooled, prior, layers, channels, layout hash, source hash
_MESSAGE = 240  # bytes of "ErrorClass: first line" a failed process sends
_ROW_BYTES = _ROW.size + _MESSAGE


@dataclass(frozen=True)
class _Row:
    """What one process tells the others (rule 5)."""

    failed: bool = False
    pooled: bool = False
    prior: float = 0.0
    layers: int = 0
    channels: int = 0
    layout: bytes = bytes(16)
    source: bytes = bytes(16)
    message: str = ""

    def encode(self) -> Tensor:
        head = _ROW.pack(
            self.failed, self.pooled, self.prior, self.layers, self.channels, self.layout, self.source
        )
        msg = self.message.encode("utf-8", "replace")[:_MESSAGE]
        raw = head + msg + bytes(_MESSAGE - len(msg))
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    @classmethod
    def decode(cls, t: Tensor) -> _Row:
        raw = bytes(t.cpu().tolist())
        failed, pooled, prior, layers, channels, layout, source = _ROW.unpack(raw[: _ROW.size])
        message = raw[_ROW.size :].rstrip(b"\0").decode("utf-8", "replace")
        return cls(failed, pooled, prior, layers, channels, layout, source, message)


def _failed_row(e: BaseException) -> _Row:
    lines = str(e).strip().splitlines()
    return _Row(failed=True, message=f"{type(e).__name__}: {lines[0] if lines else ''}")


def _digest(parts: Iterable[bytes]) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(struct.pack("<q", len(p)))
        h.update(p)
    return h.digest()[:16]


def _layout_row(named: list[tuple[str, _BatchNorm]], prior: float | None, pooled: bool) -> _Row:
    """This process's row: options, layout hash and (with a prior) the hash of the source statistics."""

    def describe(name: str, m: _BatchNorm) -> bytes:
        stats = [(k, getattr(m, k)) for k in _STATS]
        return repr(
            [name, [(k, None if t is None else (tuple(t.shape), str(t.dtype))) for k, t in stats]]
        ).encode()

    source = b""
    if prior:
        source = _digest(
            t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            for _, m in named
            for t in (m.running_mean, m.running_var)
            if t is not None
        )
    return _Row(
        pooled=pooled,
        prior=float(prior or 0.0),
        layers=len(named),
        channels=sum(int(m.running_mean.numel()) for _, m in named if m.running_mean is not None),
        layout=_digest(describe(n, m) for n, m in named),
        source=source.ljust(16, b"\0"),
    )


class _Peers:
    """The agreement of rule 5 among the processes of ``group`` (nothing to agree on without one)."""

    def __init__(self, group: Any | None) -> None:
        self.group = group

    def _gather(self, row: _Row) -> list[_Row]:
        backend = str(dist.get_backend(self.group))
        device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        mine = row.encode().to(device)
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(rows, mine, group=self.group)
        return [_Row.decode(r) for r in rows]

    def fail(self, e: BaseException) -> None:
        """This process failed with ``e``: tell the others (the caller re-raises ``e``)."""
        if self.group is not None:
            self._gather(_failed_row(e))

    def agree(self, row: _Row, stage: str) -> None:
        """This process is fine: exchange rows; raise on every process when any failed or rows differ.

        Raises:
            InputError (or the failed process's bnfold class): another process failed.
            ModelStateError: the layouts differ, or (with a prior) the source statistics do.
            OptionError: ``prior`` or ``pooled`` differ.
        """
        if self.group is None:
            return
        rows = self._gather(row)
        ranks = dist.get_process_group_ranks(self.group)  # global ranks, in group order
        failed = [(r, x) for r, x in zip(ranks, rows) if x.failed]
        if failed:
            rank, x = failed[0]
            cls = getattr(errors, x.message.partition(":")[0], None)
            if not (isinstance(cls, type) and issubclass(cls, InputError)):
                cls = InputError
            raise cls(f"recalibrate stopped on every process: process {rank} failed {stage}: {x.message}")
        first = rows[0]

        def differ(key: Any, fmt: Any) -> str:
            """``process a: ...; process b: ...`` for the first process and the first that differs."""
            r, x = next((r, x) for r, x in zip(ranks, rows) if key(x) != key(first))
            return f"process {ranks[0]}: {fmt(first)}; process {r}: {fmt(x)}"

        def options(x: _Row) -> tuple[float, bool]:
            return x.prior, x.pooled

        def layout(x: _Row) -> bytes:
            return x.layout

        if any(options(x) != options(first) for x in rows):
            raise OptionError(
                "recalibrate under torch.distributed: every process must pass the same prior and pooled ("
                + differ(options, lambda x: f"prior={x.prior:g}, pooled={x.pooled}")
                + ")"
            )
        if any(layout(x) != layout(first) for x in rows):
            raise ModelStateError(
                "recalibrate under torch.distributed: the processes hold different models ("
                + differ(layout, lambda x: f"{x.layers} BatchNorm layer(s), {x.channels} channels")
                + "): every process must pass the same model (names, shapes and dtypes of every BatchNorm's "
                "statistics)"
            )
        if any(x.source != first.source for x in rows):
            raise ModelStateError(
                f"recalibrate under torch.distributed: prior={first.prior:g} keeps each process's own running "
                "statistics, and they differ between processes: load the same statistics on every process "
                "(a replicated model), or pass prior=None"
            )


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
        OptionError: no batch (on any process), or ``prior`` negative or not finite; under
            ``torch.distributed``, ``prior`` or ``pooled`` differ between processes.
        ModelStateError: under ``torch.distributed``, the processes hold different models (names,
            shapes or dtypes of the BN statistics), or with a ``prior`` different source statistics.

    Under ``torch.distributed`` an error on one process is raised on every process (module
    docstring, rule 5): the failed process raises its own, the others one of the same bnfold class
    (``InputError`` for any other exception) naming the failed process; none waits for a timeout.

    Example:
        >>> model = bnfold.recalibrate(model, (x for x, _ in loader))        # new domain
        >>> model = bnfold.recalibrate(model, few_batches, prior=16)         # keep the source as 16 samples
    """
    group = _group(process_group, distributed)
    peers = _Peers(group)
    try:  # every check that can fail on one process alone, then the agreement (rule 5)
        if not isinstance(model, nn.Module):
            raise InputError(f"recalibrate expects a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # its forward broadcasts buffers (a collective per batch) and it cannot be deep-copied
            raise InputError(
                "recalibrate the wrapped module (ddp_model.module), not the DistributedDataParallel"
            )
        if prior is not None and not (math.isfinite(prior) and prior >= 0):
            raise OptionError(f"prior must be a finite number >= 0, got {prior}")
        root = model if inplace else copy_model(model)  # copes with tensors a forward cached (LeViT)
        named: list[tuple[str, _BatchNorm]] = [
            (n, m)
            for n, m in root.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
        ]
        row = _layout_row(named, prior, pooled)
    except Exception as e:
        peers.fail(e)
        raise
    peers.agree(row, "its checks")
    bns = [m for _, m in named]
    sync = _sync_types()
    flags = {id(m): m.training for m in root.modules()}
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if k in _STATS} for m in bns]
    accs = [StatsAccumulator.new(m.num_features, m.running_mean.device) for m in bns]  # type: ignore[union-attr]
    hooks = []
    ok = False
    try:
        root.eval()
        for m, acc in zip(bns, accs):

            def record(_m: nn.Module, args: tuple[Any, ...], acc: StatsAccumulator = acc) -> None:
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
        try:
            with torch.no_grad():
                for batch in batches:
                    _call(root, batch)
                    count += 1
        except Exception as e:
            peers.fail(e)
            raise
        peers.agree(_Row(), "in its batches")  # "ok?" before the data collective
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
                mean, var = target_stats(acc, pooled)
                if prior:
                    mean, var = mix_with_prior(
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
