"""Small-batch fine-tuning: BatchNorm in train mode vs frozen BN (bnfold.freeze), on two tasks.

Tasks (nothing downloaded):
    * ``digits``: scikit-learn's digits (1,797 real 8x8 handwritten digits; ships inside scikit-learn,
      ``pip install scikit-learn``, an optional ``bench`` dependency). Pre-train on digits 0-4;
      fine-tune on digits 5-9 with lower contrast and a brighter background (``x' = 0.6 x + 0.3``).
    * ``textures``: synthetic 8x8 textures generated here (seeded): ten classes (stripes at four
      angles, checkerboard, dots, rings, cross, square outline, blob), random frequency, phase,
      position and pixel noise. Pre-train on five classes; fine-tune on the other five under a
      domain shift: inverted polarity, lower contrast and more noise (``x' = 0.9 - 0.6 x + 0.15 z``).

Protocol (both tasks, unchanged from the first version of this benchmark):
    * pre-train a LeNet-style net (conv-BN-ReLU-pool x2, FC-BN-ReLU, FC) at batch 64 (Adam, 15
      epochs), once per seed;
    * fine-tune all layers with a new head; 250 labelled images for training, 150 for validation,
      the rest for test; 4 epochs (3 with ``--quick``) but at least 100 optimizer steps, SGD with
      momentum 0.9, last incomplete batch dropped;
    * learning rate chosen per mode, task and batch size from a grid by mean validation accuracy
      over the seeds; the table reports test accuracy (mean +- std over seeds) at that rate;
    * evaluation always in ``eval()`` mode (how the model is deployed).

Modes:
    * ``bn-train``: BN in train mode (batch statistics, running stats updated);
    * ``frozen``: ``bnfold.freeze``; ``frozen+affine``: ``bnfold.freeze(learnable=True)``;
    * ``recal+frozen``: ``bnfold.recalibrate`` on the 250 fine-tuning inputs, then ``freeze``;
    * ``recal(prior)+frozen``: the same with ``prior=PRIOR`` (source statistics kept as PRIOR samples);
    * ``recal+affine(10x)``: recalibrate, ``freeze(learnable=True)``, the affine at 10x the rate
      (``bnfold.param_groups(model, lr, affine_lr_scale=10)``);
    * ``recal+frozen+re-est`` (not run by default, see ``--modes``): recalibrate, freeze, fine-tune
      half the steps, then ``unfreeze``, recalibrate on the fine-tuning inputs again (the
      convolutions have moved), freeze, and fine-tune the other half (optimizer state kept).
    * ablation (``--modes``): ``recal-1batch+frozen`` recalibrates on one batch of 2 images only,
      ``recal-1batch(prior)+frozen`` the same with ``prior=PRIOR_ONE``.

Run: ``python benchmarks/finetune_small_batch.py [--quick] [--out FILE]`` (about 15 minutes on a
shared 2-core machine; the full write-up with protocol is ``benchmarks/results/finetune.md``, ``--out``
writes the tables only). ``--modes``, ``--tasks``, ``--batches``, ``--epochs`` run parts. One thread (``torch.set_num_threads(1)``); progress is printed per (task, batch, mode).
"""

from __future__ import annotations

import argparse
import copy
import math
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

MODES = (
    "bn-train",
    "frozen",
    "frozen+affine",
    "recal+frozen",
    "recal(prior)+frozen",
    "recal+affine(10x)",
)
BATCHES = {"digits": (2, 4, 8, 32), "textures": (2, 8, 32)}
EPOCHS = 4
MIN_STEPS = 100
LR_GRID = (0.0003, 0.001, 0.003, 0.01, 0.03)
PRIOR = 64  # samples; the fine-tuning set has 250
PRIOR_ONE = 16  # samples, for recalibration on one batch of 2 (Schneider et al.'s range)
# ablation, not run by default (``--modes ... --batches 2``): how much data recalibration needs
# and the re-estimation half-way, measured once (results/finetune.md) and no better anywhere
EXTRA_MODES = ("recal-1batch+frozen", "recal-1batch(prior)+frozen", "recal+frozen+re-est")
AFFINE_LR = 10.0

Data = dict[str, tuple[torch.Tensor, torch.Tensor]]


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


def _split(
    x_pre: torch.Tensor, y_pre: torch.Tensor, x_ft: torch.Tensor, y_ft: torch.Tensor, seed: int
) -> Data:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x_ft), generator=g)
    split = {"train": idx[:250], "val": idx[250:400], "test": idx[400:]}
    out = {"pre": (x_pre, y_pre)}
    out.update({k: (x_ft[i], y_ft[i]) for k, i in split.items()})
    return out


def load_digits(seed: int = 0) -> Data:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    pre, ft = y < 5, y >= 5
    shifted = 0.6 * x + 0.3  # the fine-tuning domain: lower contrast, brighter background
    return _split(x[pre], y[pre], shifted[ft], y[ft] - 5, seed)


def _texture(cls: int, g: torch.Generator) -> torch.Tensor:
    """One 8x8 image in [0, 1] of texture class ``cls`` (0-9)."""
    r = torch.arange(8, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    u = torch.rand(4, generator=g)
    cy, cx = 2.5 + 2 * u[0], 2.5 + 2 * u[1]  # random centre
    freq, phase = 0.8 + 0.6 * u[2], 2 * math.pi * u[3]
    if cls < 4:  # stripes at 0, 45, 90, 135 degrees
        a = cls * math.pi / 4
        img = torch.cos(freq * (xx * math.cos(a) + yy * math.sin(a)) + phase)
    elif cls == 4:  # checkerboard
        img = torch.cos(freq * xx + phase) * torch.cos(freq * yy + phase)
    elif cls == 5:  # dots on a grid
        img = (torch.cos(2 * freq * xx + phase) + torch.cos(2 * freq * yy + phase)) / 2
    else:
        d = torch.sqrt((xx - cy) ** 2 + (yy - cx) ** 2)
        if cls == 6:  # rings
            img = torch.cos(freq * 1.5 * d + phase)
        elif cls == 7:  # cross through the centre
            img = 1.0 - 2 * torch.minimum((xx - cx).abs(), (yy - cy).abs()).clamp(max=1.0)
        elif cls == 8:  # square outline
            m = torch.maximum((xx - cx).abs(), (yy - cy).abs())
            img = 1.0 - 2 * (m - 2.0).abs().clamp(max=1.0)
        else:  # blob
            img = 2 * torch.exp(-(d**2) / (2 * (1 + u[2]) ** 2)) - 1
    img = img + 0.25 * torch.randn(8, 8, generator=g)
    return ((img + 1) / 2).clamp(0, 1)


def load_textures(seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(12345)  # the data set is fixed; ``seed`` only splits
    pre_cls, ft_cls = (0, 2, 4, 6, 8), (1, 3, 5, 7, 9)
    n_pre, n_ft = 200, 160  # per class: 1000 pre-training and 800 fine-tuning images

    def make(classes: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [_texture(c, g) for c in classes for _ in range(n)]
        ys = [i for i, _ in enumerate(classes) for _ in range(n)]
        return torch.stack(xs).unsqueeze(1), torch.tensor(ys)

    x_pre, y_pre = make(pre_cls, n_pre)
    x_ft, y_ft = make(ft_cls, n_ft)
    # the fine-tuning domain: inverted polarity, lower contrast, more noise
    x_ft = 0.9 - 0.6 * x_ft + 0.15 * torch.randn(x_ft.shape, generator=g)
    return _split(x_pre, y_pre, x_ft, y_ft, seed)


TASKS: dict[str, Callable[[int], Data]] = {"digits": load_digits, "textures": load_textures}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pretrain(data: Data, seed: int, epochs: int) -> nn.Module:
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
    one = "1batch" in mode  # recalibrate on one fine-tuning batch (2 images) only
    recal_batches = [x_train[:2]] if one else list(x_train.split(50))
    if mode.startswith("recal"):
        prior = (PRIOR_ONE if one else PRIOR) if "prior" in mode else None
        base = bnfold.recalibrate(pre, recal_batches, prior=prior)
    if mode == "bn-train":
        model = copy.deepcopy(base)
    else:
        model = bnfold.freeze(base, learnable="affine" in mode)
    model[-1] = nn.Linear(64, 5)  # new head for the new task
    return model


def _optimizer(model: nn.Module, mode: str, lr: float) -> torch.optim.Optimizer:
    groups = bnfold.param_groups(model, lr, affine_lr_scale=AFFINE_LR if "10x" in mode else 1.0)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, foreach=True)


def finetune(
    pre: nn.Module, mode: str, data: Data, batch: int, lr: float, epochs: int, seed: int
) -> tuple[float, float, float]:
    """Returns (val accuracy, test accuracy, seconds)."""
    x, y = data["train"]
    t0 = time.perf_counter()
    model = prepare(pre, mode, x, seed)
    opt = _optimizer(model, mode, lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    per_epoch = len(x) // batch
    epochs = max(epochs, -(-MIN_STEPS // per_epoch))
    total = epochs * per_epoch
    step = 0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if len(idx) < batch:  # drop_last: a BN in train mode cannot take a batch of 1
                continue
            if mode.endswith("re-est") and step == total // 2:
                # in place: the conv/linear parameters stay the objects the optimizer holds
                model = bnfold.unfreeze(model, inplace=True)
                model = bnfold.recalibrate(model, list(x.split(50)), inplace=True)
                model = bnfold.freeze(model, inplace=True)
                model.train()
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    seconds = time.perf_counter() - t0
    return accuracy(model, *data["val"]), accuracy(model, *data["test"]), seconds


Results = dict[tuple[str, str, int], dict[str, object]]


def run(
    quick: bool,
    seeds: int,
    tasks: list[str],
    modes: list[str],
    log: Callable[[str], None],
    batch_sizes: tuple[int, ...] | None = None,
    epochs: int | None = None,
) -> Results:
    epochs = epochs or (3 if quick else EPOCHS)
    lrs = (0.001,) if quick else LR_GRID
    results: Results = {}
    t_start = time.perf_counter()
    for task in tasks:
        data = TASKS[task](0)
        pres = [pretrain(data, s, 5 if quick else 15) for s in range(seeds)]
        pre_acc = [accuracy(p, *data["pre"]) for p in pres]
        log(f"[{task}] pre-trained: train accuracy {statistics.mean(pre_acc):.3f}")
        batches = batch_sizes or ((2, 32) if quick else BATCHES[task])
        for batch in batches:
            for mode in modes:
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
                results[(task, mode, batch)] = best
                t = best["test"]
                log(
                    f"[{task}] batch {batch:>2} {mode:<20} lr {best['lr']:<6} val {best['val']:.3f} "
                    f"test {np.mean(t):.3f} +- {np.std(t):.3f}  {best['seconds']:.2f}s/run  "  # type: ignore[arg-type]
                    f"seeds {' '.join(f'{v:.3f}' for v in t)}  "  # type: ignore[attr-defined]
                    f"({time.perf_counter() - t_start:.0f} s)"
                )
    return results


def table(results: Results, task: str, modes: list[str], seeds: int) -> str:
    batches = sorted({b for t, _, b in results if t == task})
    lines = [
        "| batch | " + " | ".join(modes) + " |",
        "|---:|" + "---:|" * len(modes),
    ]
    for b in batches:
        means = {m: float(np.mean(results[(task, m, b)]["test"])) * 100 for m in modes}  # type: ignore[arg-type]
        top = max(means.values())
        cells = []
        for mode in modes:
            r = results[(task, mode, b)]
            t = np.array(r["test"]) * 100  # type: ignore[arg-type]
            cell = f"{t.mean():.1f} ± {t.std():.1f} (lr {r['lr']})"
            cells.append(f"**{cell}**" if means[mode] == top else cell)
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 lr, batches 2 and 32")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: digits,textures")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default per task)")
    ap.add_argument(
        "--epochs", type=int, default=None, help="epochs (default 4; a diagnostic outside the protocol)"
    )
    ap.add_argument("--out", type=Path, default=None, help="write the markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = args.seeds or (1 if args.quick else 3)
    tasks = [t for t in args.tasks.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    t0 = time.perf_counter()
    sizes = tuple(int(b) for b in args.batches.split(",")) if args.batches else None
    for m in modes:
        if m not in MODES + EXTRA_MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES + EXTRA_MODES)}")
    results = run(args.quick, seeds, tasks, modes, print, sizes, args.epochs)
    md = []
    for task in tasks:
        md.append(
            f"### {task}\n\nTest accuracy (%, mean ± std over {seeds} seeds; learning rate picked on "
            "validation; best per batch size in bold).\n\n" + table(results, task, modes, seeds)
        )
    text = "\n".join(md)
    print()
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
