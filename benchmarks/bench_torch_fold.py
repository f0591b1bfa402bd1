"""ResNet-50, eager PyTorch on CPU with one thread: original vs folded vs the floor.

The floor is the same network with every BatchNorm replaced by ``nn.Identity`` (what a perfect fold
reaches: the convolutions alone). Figures are medians of interleaved runs (original, folded, floor in
turn, so that drift in machine load hits all three alike); quote the ratios, not the milliseconds.

Also: the time ``bnfold.fx.fold_module`` takes to fold ResNet-50, next to
``torch.fx.experimental.optimization.fuse`` (which folds Conv2d+BN only and by a pattern on traced
module names).

Usage: ``python benchmarks/bench_torch_fold.py [--quick]``
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnfold.fx import fold_module  # noqa: E402
from models.stats import bn_modules, randomize_bn  # noqa: E402


def _floor(model: nn.Module) -> nn.Module:
    floor = copy.deepcopy(model)
    for name, _ in bn_modules(floor):
        parent_name, _, attr = name.rpartition(".")
        parent = floor.get_submodule(parent_name) if parent_name else floor
        setattr(parent, attr, nn.Identity())
    return floor


def _time(model: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


@torch.inference_mode()
def latency(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median (and best) seconds per forward of each model, the models run in turn each round."""
    for _ in range(warmup):
        for m in models.values():
            m(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(_time(m, x))
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_min": min(v) for k, v in times.items()})
    return out


def fold_times(model: nn.Module, reps: int) -> tuple[float, float]:
    from torch.fx.experimental.optimization import fuse

    ours, theirs = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fold_module(model)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fuse(model)
        theirs.append(time.perf_counter() - t0)
    return statistics.median(ours), statistics.median(theirs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 1, 112x112, few rounds")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from models.resnet import resnet50

    torch.manual_seed(0)
    model = randomize_bn(resnet50(num_classes=1000), 0).eval()
    folded, report = fold_module(model)
    assert report.bn_after == 0, report.skips
    models = {"original": model, "folded": folded, "floor": _floor(model)}

    size = 112 if args.quick else 224
    batches = [1] if args.quick else [1, 8]
    rounds = args.rounds or (3 if args.quick else 15)
    print(f"ResNet-50 eager CPU, 1 thread, {size}x{size}, median of {rounds} interleaved rounds")
    print(
        f"{'batch':>5} {'original ms':>12} {'folded ms':>10} {'floor ms':>9} {'folded/floor':>13} {'speedup':>8}"
    )
    for b in batches:
        x = torch.randn(b, 3, size, size)
        with torch.inference_mode():
            err = (folded(x) - model(x)).abs().max().item() / model(x).abs().max().item()
        med = latency(models, x, rounds if b == 1 else max(3, rounds // 3))
        ratio = med["folded"] / med["floor"]
        speed = med["original"] / med["folded"]
        print(
            f"{b:>5} {med['original'] * 1e3:>12.2f} {med['folded'] * 1e3:>10.2f} {med['floor'] * 1e3:>9.2f}"
            f" {ratio:>13.3f} {speed:>7.2f}x   (max rel. output error {err:.1e})"
        )
        print(
            f"{'':>5} best of rounds: folded/floor {med['folded_min'] / med['floor_min']:.3f}, "
            f"speedup {med['original_min'] / med['folded_min']:.2f}x (less sensitive to a busy machine)"
        )
    ours, fx_fuse = fold_times(model, 1 if args.quick else 5)
    print(
        f"time to fold ResNet-50: bnfold.fx.fold_module {ours * 1e3:.0f} ms "
        f"(copy, trace, verdicts, float64 math), torch.fx fuse {fx_fuse * 1e3:.0f} ms, ratio {ours / fx_fuse:.2f}"
    )


if __name__ == "__main__":
    main()
