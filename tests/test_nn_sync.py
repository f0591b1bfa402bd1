"""bnfold.nn.SyncBatchNorm over two gloo processes equals one process that sees the whole batch.

One spawn for all checks (each process imports torch): rank r gets its share of every batch, runs
a few training steps and an eval step, and saves what it saw; the test compares against a single
torch.nn.BatchNorm run on the concatenated batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bnfold.nn as bnn
from models.stats import randomize_bn
from models.testing import free_port

# float64 throughout: the reference sums in a different order (whole batch vs two halves + reduce)
ATOL = 1e-10
STEPS = 3
C = 3
# (name, module factory, per-rank batch shapes, eval shape): uneven shares included
CASES = {
    "2d": (lambda: nn.BatchNorm2d(C, dtype=torch.float64), [(2, C, 3, 4), (2, C, 3, 4)]),
    "1d-uneven": (lambda: nn.BatchNorm1d(C, momentum=None, dtype=torch.float64), [(3, C), (5, C)]),
    "3d-no-affine": (
        lambda: nn.BatchNorm3d(C, affine=False, dtype=torch.float64),
        [(1, C, 2, 2, 3), (2, C, 2, 2, 3)],
    ),
}


def _data(name: str, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = CASES[name][1][rank]
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + len(name))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + step) + step
    w = torch.randn(shape, generator=g, dtype=torch.float64)  # the loss is sum(y * w)
    return x, w


def _reference(name: str) -> nn.Module:
    m = CASES[name][0]()
    randomize_bn(m, seed=5)
    return m


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result: dict[str, object] = {}
        for name in CASES:
            m = bnn.SyncBatchNorm.convert_sync_batchnorm(_reference(name))
            assert isinstance(m, bnn.SyncBatchNorm)
            steps = []
            for step in range(STEPS):
                x, w = _data(name, step, rank)
                x.requires_grad_(True)
                m.zero_grad()
                y = m(x)
                (y * w).sum().backward()
                steps.append(
                    {
                        "y": y.detach(),
                        "dx": x.grad,
                        "dw": None if m.weight is None else m.weight.grad,
                        "db": None if m.bias is None else m.bias.grad,
                    }
                )
            m.eval()
            x, _ = _data(name, 99, rank)
            result[name] = {"steps": steps, "state": m.state_dict(), "eval": m(x).detach()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _close(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    assert (a is None) == (b is None), what
    if a is not None and b is not None:
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_one_process_on_the_whole_batch(ranks: list[dict], name: str) -> None:
    ref = _reference(name)
    for step in range(STEPS):
        parts = [_data(name, step, r) for r in range(2)]
        x = torch.cat([p[0] for p in parts]).requires_grad_(True)
        w = torch.cat([p[1] for p in parts])
        ref.zero_grad()
        y = ref(x)
        (y * w).sum().backward()
        got = [ranks[r][name]["steps"][step] for r in range(2)]
        _close(y.detach(), torch.cat([g["y"] for g in got]), f"step {step} output")
        _close(x.grad, torch.cat([g["dx"] for g in got]), f"step {step} input grad")
        # parameter grads are local per rank (data-parallel training sums them): their sum is global
        if ref.weight is not None:
            _close(ref.weight.grad, got[0]["dw"] + got[1]["dw"], f"step {step} weight grad")
            _close(ref.bias.grad, got[0]["db"] + got[1]["db"], f"step {step} bias grad")
    for r in range(2):
        state = ranks[r][name]["state"]
        for key, value in ref.state_dict().items():
            _close(
                value.double() if value.is_floating_point() else value,
                state[key].double() if state[key].is_floating_point() else state[key],
                f"rank {r} {key}",
            )
    ref.eval()
    for r in range(2):
        x, _ = _data(name, 99, r)
        _close(ref(x), ranks[r][name]["eval"], f"rank {r} eval output")


def test_without_process_group_behaves_as_batchnorm() -> None:
    """No process group: SyncBatchNorm is a BatchNorm for any rank >= 2, training and eval."""
    for shape in [(6, C), (4, C, 5), (3, C, 2, 4), (2, C, 2, 2, 3)]:
        ref = (
            nn.BatchNorm1d(C)
            if len(shape) <= 3
            else (nn.BatchNorm2d(C) if len(shape) == 4 else nn.BatchNorm3d(C))
        )
        randomize_bn(ref, seed=2)
        ours = bnn.SyncBatchNorm(C)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(shape)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref(xr).sum().backward()
        ours(xo).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        ref.eval()
        ours.eval()
        torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bnn.SyncBatchNorm(C)(torch.randn(C))


def test_convert_sync_batchnorm_shares_state_and_keeps_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C), nn.Sequential(nn.BatchNorm1d(C)))
    randomize_bn(model, seed=1)
    model.eval()
    old_bn = model[1]
    out = bnn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model  # like torch: changed in place, the root kept
    assert isinstance(out[1], bnn.SyncBatchNorm) and isinstance(out[2][0], bnn.SyncBatchNorm)
    assert out[1].running_var is old_bn.running_var and out[1].weight is old_bn.weight
    assert not out[1].training
    x = torch.randn(2, 3, 4, 4)
    ref = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C))
    ref.load_state_dict({k: v for k, v in out.state_dict().items() if not k.startswith("2.")})
    ref.eval()
    torch.testing.assert_close(out[1](out[0](x)), ref(x))
