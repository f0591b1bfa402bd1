"""Small-batch fine-tuning: BatchNorm in train mode vs frozen BN (bnfold.freeze), on real data.

Data: scikit-learn's digits (1,797 real 8x8 handwritten digits; ships inside scikit-learn, no
download; ``pip install scikit-learn`` -- an optional ``bench`` dependency).

Protocol:
    * pre-train a LeNet-style net (conv-BN-ReLU-pool x2, FC-BN-ReLU, FC) on digits 0-4 at batch 64
      (Adam, 15 epochs), once per seed;
    * fine-tune on a shifted task *and* domain: digits 5-9 (new head) with lower contrast and a
      brighter background (``x' = 0.6 x + 0.3``), so the BN statistics of the pre-training data no
      longer fit; 250 labelled images for training, 150 for validation, the rest (496) for test;
    * batch sizes 2, 4, 8, 32; 4 epochs over the fine-tuning set (3 with ``--quick``), but at least
      100 optimizer steps (batch 32: 15 epochs, 105 steps), so smaller batches take more steps; SGD with
      momentum 0.9, all layers trained, last incomplete batch dropped;
    * four modes: ``bn-train`` (BN in train mode: batch statistics, running stats updated),
      ``frozen`` (``bnfold.freeze``), ``frozen+affine`` (``bnfold.freeze(learnable=True)``),
      ``recal+frozen`` (``bnfold.recalibrate`` on the fine-tuning inputs, then ``bnfold.freeze``);
    * learning rate chosen per mode and batch size from a grid by mean validation accuracy over the
      seeds; the table reports test accuracy (mean +- std over seeds) at that learning rate and the
      mean wall time of one fine-tuning run (recalibration included);
    * evaluation always in ``eval()`` mode (how the model is deployed).

Run: ``python benchmarks/finetune_small_batch.py [--quick] [--out benchmarks/results/finetune.md]``.
One thread (``torch.set_num_threads(1)``): the timings are per run on one core.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bnfold  # noqa: E402
from bnfold.freezing import recalibrate  # noqa: E402

MODES = ("bn-train", "frozen", "frozen+affine", "recal+frozen")
BATCHES = (2, 4, 8, 32)
EPOCHS = 4
MIN_STEPS = 100
LR_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03)


def lenet(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def load_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    pre = (y < 5).nonzero().squeeze(1)
    ft = (y >= 5).nonzero().squeeze(1)
    ft = ft[torch.randperm(len(ft), generator=g)]
    shifted = 0.6 * x + 0.3  # the fine-tuning domain: lower contrast, brighter background
    split = {"train": ft[:250], "val": ft[250:400], "test": ft[400:]}
    out = {"pre": (x[pre], y[pre])}
    out.update({k: (shifted[i], y[i] - 5) for k, i in split.items()})
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pretrain(data: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = lenet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data["pre"]
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def prepare(pre: nn.Module, mode: str, x_train: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(1000 + seed)
    base = pre
    if mode == "recal+frozen":
        base = recalibrate(pre, list(x_train.split(50)))
    if mode == "bn-train":
        model = copy.deepcopy(base)
    else:
        model = bnfold.freeze(base, learnable=(mode == "frozen+affine"))
    model[-1] = nn.Linear(64, 5)  # new head for the new task
    return model


def finetune(
    pre: nn.Module,
    mode: str,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    batch: int,
    lr: float,
    epochs: int,
    seed: int,
) -> tuple[float, float, float]:
    """Returns (val accuracy, test accuracy, seconds)."""
    x, y = data["train"]
    t0 = time.perf_counter()
    model = prepare(pre, mode, x, seed)
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, foreach=True
    )
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    epochs = max(epochs, -(-MIN_STEPS // (len(x) // batch)))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if len(idx) < batch:  # drop_last: a BN in train mode cannot take a batch of 1
                continue
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    return accuracy(model, *data["val"]), accuracy(model, *data["test"]), seconds


def run(quick: bool, seeds: int, log: Callable[[str], None]) -> dict[tuple[str, int], dict[str, object]]:
    data = load_data(0)
    epochs = 3 if quick else EPOCHS
    lrs = (0.001,) if quick else LR_GRID
    batches = (2, 32) if quick else BATCHES
    pres = [pretrain(data, s, 5 if quick else 15) for s in range(seeds)]
    pre_acc = [accuracy(p, *data["pre"]) for p in pres]
    log(f"pre-trained on digits 0-4: train accuracy {statistics.mean(pre_acc):.3f}")
    results: dict[tuple[str, int], dict[str, object]] = {}
    for batch in batches:
        for mode in MODES:
            best: dict[str, object] | None = None
            for lr in lrs:
                runs = [finetune(pres[s], mode, data, batch, lr, epochs, s) for s in range(seeds)]
                val = statistics.mean(r[0] for r in runs)
                entry = {
                    "lr": lr,
                    "val": val,
                    "test": [r[1] for r in runs],
                    "seconds": statistics.mean(r[2] for r in runs),
                }
                if best is None or val > float(best["val"]):  # type: ignore[arg-type]
                    best = entry
            assert best is not None
            results[(mode, batch)] = best
            t = best["test"]
            log(
                f"batch {batch:>2} {mode:<14} lr {best['lr']:<6} val {best['val']:.3f} "
                f"test {np.mean(t):.3f} +- {np.std(t):.3f}  {best['seconds']:.2f}s/run"  # type: ignore[arg-type]
            )
    return results


def table(results: dict[tuple[str, int], dict[str, object]], seeds: int, epochs: int) -> str:
    batches = sorted({b for _, b in results})
    lines = [
        f"Test accuracy (%, mean ± std over {seeds} seeds; learning rate picked on validation) and mean "
        f"wall time of one fine-tuning run ({epochs} epochs over 250 images, at least {MIN_STEPS} steps; "
        "1 thread).",
        "",
        "| batch | " + " | ".join(MODES) + " |",
        "|---:|" + "---:|" * len(MODES),
    ]
    for b in batches:
        cells = []
        for mode in MODES:
            r = results[(mode, b)]
            t = np.array(r["test"]) * 100  # type: ignore[arg-type]
            cells.append(f"{t.mean():.1f} ± {t.std():.1f} (lr {r['lr']}, {float(r['seconds']):.2f} s)")  # type: ignore[arg-type]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 lr, batches 2 and 32")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 3)
    t0 = time.perf_counter()
    results = run(args.quick, seeds, print)
    md = table(results, seeds, 3 if args.quick else EPOCHS)
    print()
    print(md)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(md)


if __name__ == "__main__":
    main()
