"""bnfold.recalibrate under torch.distributed: processes that disagree or fail all stop together.

Issue 28.10. Three gloo processes on 127.0.0.1 (one spawn for all cases; process 1 is the odd one in
each). Before the fix: models of equal total size but different layers finished silently with
statistics mixed across layers, different sizes aborted the processes inside gloo, differing source
statistics under ``prior`` left the processes different, and a process that caught its own error left
the others waiting for the group's timeout. The group's timeout is set to 60 s here (default 30 min)
and each case must end in a few seconds; the parent kills the processes past a deadline.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnfold
from models.stats import randomize_bn
from models.testing import free_port

WORLD = 3
ODD = 1  # the process that differs or fails in each case
CASE_SECONDS = 15.0  # a case that waited for a timeout would take >= 60 s
KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _model(widths: tuple[int, int] = (4, 4), seed: int = 4) -> nn.Module:
    torch.manual_seed(0)
    a, b = widths
    model = nn.Sequential(
        nn.Conv2d(3, a, 1), nn.BatchNorm2d(a), nn.ReLU(), nn.Conv2d(a, b, 1), nn.BatchNorm2d(b)
    )
    return randomize_bn(model.double(), seed=seed).eval()


def _batches(rank: int, channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(2, channels, 4, 4, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(2)]


def _stats(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [
        {k: getattr(m, k).clone() for k in KEYS} for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    ]


def _case(name: str, odd: bool, rank: int) -> tuple[nn.Module, list[Any], dict[str, Any]]:
    """(model, batches, recalibrate keywords) of process ``rank`` in case ``name``."""
    model, batches, kw = _model(), _batches(rank), {"inplace": True}
    if name == "same-size-other-layers" and odd:
        model = _model((6, 2))  # 8 channels in all, like (4, 4): the reduced tensors have equal sizes
    elif name == "other-size" and odd:
        model = _model((4, 5))
    elif name == "prior-other-source":
        kw["prior"] = 5.0
        model = _model(seed=9) if odd else model
    elif name == "no-prior-other-source":  # replaced statistics: the sources may differ
        model = _model(seed=9) if odd else model
    elif name == "other-prior":
        kw["prior"] = 7.0 if odd else 5.0
    elif name == "bad-option-on-one":
        kw["prior"] = -1.0 if odd else 5.0
    elif name == "batch-fails-on-one" and odd:
        batches = [batches[0], _batches(rank, channels=5)[0]]  # the second batch does not fit the conv
    return model, batches, kw


CASES = [
    "same-size-other-layers",
    "other-size",
    "prior-other-source",
    "other-prior",
    "bad-option-on-one",
    "batch-fails-on-one",
    "no-prior-other-source",
]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        for name in CASES:
            model, batches, kw = _case(name, rank == ODD, rank)
            before = _stats(model)
            t = time.perf_counter()
            try:
                bnfold.recalibrate(model, batches, **kw)
                error, message = "", ""
            except Exception as e:  # noqa: BLE001 - the process catches its own error and goes on
                error, message = type(e).__name__, str(e)
            results[name] = {
                "error": error,
                "message": message,
                "seconds": time.perf_counter() - t,
                "unchanged": all(
                    torch.equal(b[k], a[k]) for b, a in zip(before, _stats(model)) for k in KEYS
                ),
                "stats": _stats(model),
            }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("agree")
    ctx = mp.spawn(_worker, args=(WORLD, free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the processes did not finish in 240 s: a rank is waiting for another")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _all(ranks: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    got = [r[case] for r in ranks]
    for rank, g in enumerate(got):
        assert g["seconds"] < CASE_SECONDS, f"process {rank} took {g['seconds']:.1f} s in {case}"
    return got


@pytest.mark.slow
@pytest.mark.parametrize("case", ["same-size-other-layers", "other-size"])
def test_different_models_fail_on_every_process(ranks: list[dict[str, Any]], case: str) -> None:
    for g in _all(ranks, case):
        assert g["error"] == "ModelStateError", g
        assert "different models" in g["message"] and f"process {ODD}:" in g["message"]
        assert g["unchanged"]  # inplace=True, and nothing was written


@pytest.mark.slow
def test_differing_source_statistics_fail_with_a_prior(ranks: list[dict[str, Any]]) -> None:
    for g in _all(ranks, "prior-other-source"):
        assert g["error"] == "ModelStateError" and "differ between processes" in g["message"], g
        assert g["unchanged"]


@pytest.mark.slow
def test_differing_source_statistics_are_fine_without_a_prior(ranks: list[dict[str, Any]]) -> None:
    got = _all(ranks, "no-prior-other-source")
    assert [g["error"] for g in got] == [""] * WORLD
    for g in got[1:]:  # replaced statistics: the same on every process
        for a, b in zip(g["stats"], got[0]["stats"]):
            for k in KEYS:
                torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_differing_prior_is_an_option_error_everywhere(ranks: list[dict[str, Any]]) -> None:
    for g in _all(ranks, "other-prior"):
        assert g["error"] == "OptionError" and "prior=5, pooled=False" in g["message"], g
        assert "prior=7" in g["message"] and g["unchanged"]


@pytest.mark.slow
def test_a_bad_option_on_one_process_stops_all(ranks: list[dict[str, Any]]) -> None:
    got = _all(ranks, "bad-option-on-one")
    assert (
        got[ODD]["error"] == "OptionError"
        and got[ODD]["message"] == "prior must be a finite number >= 0, got -1.0"
    )
    for rank, g in enumerate(got):
        if rank != ODD:
            assert g["error"] == "OptionError", g
            assert f"process {ODD} failed its checks: OptionError: prior must be" in g["message"]


@pytest.mark.slow
def test_a_failed_batch_on_one_process_stops_all_without_waiting(ranks: list[dict[str, Any]]) -> None:
    got = _all(ranks, "batch-fails-on-one")
    assert got[ODD]["error"] == "RuntimeError", got[ODD]  # the model's own error, on its own process
    for rank, g in enumerate(got):
        assert g["unchanged"], rank  # inplace=True: statistics restored
        if rank != ODD:
            assert g["error"] == "InputError", g
            assert f"process {ODD} failed in its batches: RuntimeError" in g["message"]
