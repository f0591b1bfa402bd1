"""bnfold.recalibrate over two gloo processes equals one process that sees every batch.

One spawn for all cases (each process imports torch). Rank r recalibrates on its own shard (uneven
numbers and sizes of batches, one rank with none at all), counts its ``all_reduce`` calls and saves
the statistics; the test compares them with one process recalibrating on all the batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnfold
import bnfold.nn as bnn
from models.stats import randomize_bn
from models.testing import free_port

# float64 throughout; the reference sums in another order (one stream vs two shards + reduce).
ATOL = 1e-10
KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        bnn.SyncBatchNorm(4),  # in train mode it would all-reduce in every forward: it must not here
        nn.Conv2d(4, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 5),
        nn.BatchNorm1d(5, affine=False),
    ).double()
    return randomize_bn(model, seed=4).eval()


def _shard(case: str, rank: int) -> list[torch.Tensor]:
    sizes = {
        "uneven": [(3, 2, 4), (5, 2)],  # rank 0: three batches, rank 1: two, all sizes differ
        "one-empty": [(2, 3), ()],
        "all-empty": [(), ()],
    }[case][rank]
    g = torch.Generator().manual_seed(100 * rank + len(case))
    return [
        torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * (1 + i + rank) + i - rank
        for i, n in enumerate(sizes)
    ]


# (case, recalibrate keyword arguments)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("uneven", {}),
    ("uneven", {"pooled": True}),
    ("uneven", {"prior": 7.0}),
    ("one-empty", {"pooled": True, "prior": 3.0}),
]


def _stats(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [
        {k: getattr(m, k).clone() for k in KEYS}
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = [0]
    real = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        result: dict[str, Any] = {"cases": []}
        for case, kwargs in CASES:
            calls[0] = 0
            new = bnfold.recalibrate(_model(), _shard(case, rank), **kwargs)
            result["cases"].append({"stats": _stats(new), "calls": calls[0]})
        try:
            bnfold.recalibrate(_model(), _shard("all-empty", rank))
            result["all-empty"] = "no error"
        except bnfold.OptionError as e:
            result["all-empty"] = str(e)
        try:
            bnfold.recalibrate(nn.parallel.DistributedDataParallel(_model()), _shard("uneven", rank))
            result["ddp"] = "no error"
        except bnfold.InputError as e:
            result["ddp"] = str(e)
        local = bnfold.recalibrate(_model(), _shard("uneven", rank), distributed=False)
        result["local"] = _stats(local)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("recal")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c}-{k}" for c, k in CASES])
def test_two_shards_match_one_process_on_all_batches(ranks: list[dict[str, Any]], i: int) -> None:
    case, kwargs = CASES[i]
    everything = _shard(case, 0) + _shard(case, 1)
    want = _stats(bnfold.recalibrate(_model(), everything, **kwargs))
    for r in range(2):
        got = ranks[r]["cases"][i]
        assert got["calls"] == 1, f"rank {r}: {got['calls']} all_reduce calls, expected one for all layers"
        for layer, (g, w) in enumerate(zip(got["stats"], want)):
            for k in KEYS:
                torch.testing.assert_close(
                    g[k],
                    w[k],
                    atol=ATOL,
                    rtol=ATOL,
                    msg=lambda m, r=r, k=k, layer=layer: f"rank {r} BN {layer} {k}: {m}",
                )


@pytest.mark.slow
def test_no_batch_anywhere_is_an_error_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for r in range(2):
        assert "at least one batch" in ranks[r]["all-empty"]


@pytest.mark.slow
def test_distributed_false_keeps_each_shard_to_itself(ranks: list[dict[str, Any]]) -> None:
    for r in range(2):
        want = _stats(bnfold.recalibrate(_model(), _shard("uneven", r)))
        for g, w in zip(ranks[r]["local"], want):
            for k in KEYS:
                torch.testing.assert_close(g[k], w[k], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(ranks[0]["local"][0]["running_var"], ranks[1]["local"][0]["running_var"])


@pytest.mark.slow
def test_a_ddp_wrapper_is_refused_with_the_way_out(ranks: list[dict[str, Any]]) -> None:
    for r in range(2):
        assert "ddp_model.module" in ranks[r]["ddp"]
