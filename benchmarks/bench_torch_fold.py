"""ResNet-50, eager PyTorch on CPU with one thread: original vs folded vs the floor.

The floor is the same network with every BatchNorm replaced by ``nn.Identity`` (what a perfect fold
reaches: the convolutions alone). Figures are medians of interleaved runs (original, folded, floor in
turn, so that drift in machine load hits all three alike); quote the ratios, not the milliseconds.

Also: the time ``bnfold.fx.fold_module`` takes to fold ResNet-50 (an ``nn.Module``, not in place),
next to ``torch.fx.experimental.optimization.fuse`` (the peer: it deep-copies the model, traces it
and folds Conv2d+BN by a pattern on module names) and ``copy.deepcopy`` of the model (a floor for
any fold that must not touch its input), and the dry run (``inspect``). The candidates run
interleaved in one process (:func:`common.time_interleaved`, rotating order); the ratios of the
medians are the figures to quote.

Usage: ``python benchmarks/bench_torch_fold.py [--quick] [--fold-only] [--rounds N]``
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import time_interleaved  # noqa: E402

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


def fold_times(model: nn.Module, reps: int) -> dict[str, float]:
    """Median seconds of each fold candidate on ``model``, interleaved (see the module docstring)."""
    from torch.fx.experimental.optimization import fuse

    got = time_interleaved(
        {
            "bnfold": lambda: fold_module(model),
            "fx_fuse": lambda: fuse(model),
            "deepcopy": lambda: copy.deepcopy(model),
            "bnfold_dry_run": lambda: fold_module(model, dry_run=True),
        },
        repeats=reps,
        warmup=1,
    )
    return {k: t.median for k, t in got.items()}


def print_fold_times(model: nn.Module, reps: int) -> None:
    t = fold_times(model, reps)
    print(f"time to fold ResNet-50 (nn.Module, not in place), median of {reps} interleaved rounds:")
    for k, label in (
        ("bnfold", "bnfold.fx.fold_module"),
        ("fx_fuse", "torch.fx fuse"),
        ("deepcopy", "copy.deepcopy"),
        ("bnfold_dry_run", "bnfold dry run"),
    ):
        print(f"  {label:<22} {t[k] * 1e3:7.1f} ms")
    print(
        f"  ratio bnfold / fx fuse {t['bnfold'] / t['fx_fuse']:.2f}, bnfold / deepcopy "
        f"{t['bnfold'] / t['deepcopy']:.2f}, dry run / fx fuse {t['bnfold_dry_run'] / t['fx_fuse']:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 1, 112x112, few rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--fold-only", action="store_true", help="only the fold times, not the latency")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from models.resnet import resnet50

    torch.manual_seed(0)
    model = randomize_bn(resnet50(num_classes=1000), 0).eval()
    folded, report = fold_module(model)
    assert report.bn_after == 0, report.skips
    if args.fold_only:
        print_fold_times(model, args.rounds or (3 if args.quick else 11))
        return
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
    print_fold_times(model, 3 if args.quick else 11)


if __name__ == "__main__":
    main()
