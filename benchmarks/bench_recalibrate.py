"""``bnfold recalibrate`` on shifted data: accuracy restored, ONNX path vs PyTorch path, memory flat in the data.

A ResNet-18 (``models.resnet``, narrow, one input channel) is trained on the synthetic textures of
``finetune_small_batch.py`` (10 classes, 8x8 upsampled to 32x32), exported to ONNX with its BNs kept,
then evaluated on held-out images, clean and under three shifts (contrast x0.5, brightness +0.4, Gaussian noise
sigma 0.25). For each shift, the shifted images are split: one half (unlabelled) recalibrates, the
other half measures accuracy. Rows: the original model, ``bnfold.recalibrate`` on the module
(PyTorch path), ``bnfold recalibrate`` on the ONNX file with ``--upstream batch`` (the same
definition: its statistics are compared with the PyTorch path's) and with the default ``--upstream new``.
Memory: the peak RSS of the ONNX job in a fresh process on 1x and 10x the data.

Run: ``python benchmarks/bench_recalibrate.py [--quick] [--epochs N]``
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ensure_repo_on_path,
    env_summary,
    fmt_bytes,
    make_parser,
    markdown_table,
    pin_threads,
    run_job,
)

ensure_repo_on_path()

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from finetune_small_batch import _texture  # noqa: E402
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.files.recalibrate import RecalibrateSettings, recalibrate_file  # noqa: E402
from models.resnet import BasicBlock, ResNet  # noqa: E402

SHIFTS = {
    "clean": lambda x, g: x,
    "contrast x0.5": lambda x, g: 0.5 * (x - 0.5) + 0.5,
    "brightness +0.4": lambda x, g: x + 0.4,
    "noise 0.25": lambda x, g: x + 0.25 * torch.randn(x.shape, generator=g),
}


def images(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [_texture(c, g) for c in range(10) for _ in range(n_per_class)]
    ys = [c for c in range(10) for _ in range(n_per_class)]
    x = torch.stack(xs).unsqueeze(1)
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False), torch.tensor(ys)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, width=16, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def acc_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def acc_onnx(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = s.run(None, {"x": x.numpy()})[0]
    return float((out.argmax(1) == y.numpy()).mean())


def bn_stats(path: Path) -> dict[str, np.ndarray]:
    return {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(str(path)).graph.initializer
        if t.name.endswith(("running_mean", "running_var"))
    }


def main() -> None:
    p = make_parser("bnfold recalibrate: accuracy under shift, ONNX vs PyTorch, memory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 6, 2 with --quick)")
    args = p.parse_args()
    pin_threads(args.threads)
    epochs = args.epochs or (2 if args.quick else 6)
    n_train, n_test = (60, 40) if args.quick else (200, 100)
    print(env_summary())
    x_tr, y_tr = images(n_train, 1)
    x_te, y_te = images(n_test, 2)
    model = train(x_tr, y_tr, epochs)
    tmp = Path(tempfile.mkdtemp(prefix="bench-recal-"))
    src = tmp / "m.onnx"
    torch.onnx.export(
        model,
        (x_te[:2],),
        str(src),
        input_names=["x"],
        dynamic_axes={"x": {0: "N"}},
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    rows = []
    worst = 0.0
    for name, shift in SHIFTS.items():
        g = torch.Generator().manual_seed(3)
        xs = shift(x_te, g).float()
        perm = torch.randperm(len(xs), generator=g)
        cal, test = perm[: len(xs) // 2], perm[len(xs) // 2 :]
        np.savez(tmp / "cal.npz", x=xs[cal].numpy())
        recal = bnfold.recalibrate(model, list(xs[cal].split(50)))
        for up in ("batch", "new"):
            recalibrate_file(
                src, tmp / f"{up}.onnx", RecalibrateSettings(data=tmp / "cal.npz", batch_size=50, upstream=up)
            )
        ref = {
            f"{n}.running_mean": m.running_mean.numpy()
            for n, m in recal.named_modules()
            if isinstance(m, nn.BatchNorm2d)
        }
        ref.update(
            {
                f"{n}.running_var": m.running_var.numpy()
                for n, m in recal.named_modules()
                if isinstance(m, nn.BatchNorm2d)
            }
        )
        got = bn_stats(tmp / "batch.onnx")
        common = sorted(set(ref) & set(got))
        diff = max(float(np.max(np.abs(got[k] - ref[k]) / (np.abs(ref[k]) + 1e-3))) for k in common)
        worst = max(worst, diff)
        rows.append(
            [
                name,
                f"{acc_torch(model, xs[test], y_te[test]):.3f}",
                f"{acc_torch(recal, xs[test], y_te[test]):.3f}",
                f"{acc_onnx(tmp / 'batch.onnx', xs[test], y_te[test]):.3f}",
                f"{acc_onnx(tmp / 'new.onnx', xs[test], y_te[test]):.3f}",
                f"{diff:.1e} ({len(common)})",
            ]
        )
    print(
        markdown_table(
            [
                "data",
                "original",
                "PyTorch recalibrate",
                "ONNX --upstream batch",
                "ONNX --upstream new",
                "max rel. diff ONNX batch vs PyTorch (stats)",
            ],
            rows,
        )
    )
    # memory: the ONNX job in a fresh process, on 1x and 10x the data (same batch size)
    code = (
        "import sys; from bnfold.files.recalibrate import RecalibrateSettings, recalibrate_file; "
        "recalibrate_file(sys.argv[1], sys.argv[2], RecalibrateSettings(data=sys.argv[3], batch_size=50))"
    )
    mem = []
    base = np.load(tmp / "cal.npz")["x"]
    for k in (1, 10):
        np.savez(tmp / f"d{k}.npz", x=np.concatenate([base] * k))
        r = run_job(
            [sys.executable, "-c", code, str(src), str(tmp / f"m{k}.onnx"), str(tmp / f"d{k}.npz")]
        ).check()
        mem.append(
            [
                f"{k}x",
                fmt_bytes((tmp / f"d{k}.npz").stat().st_size),
                fmt_bytes(r.peak_rss),
                f"{r.seconds:.1f} s",
            ]
        )
    print(markdown_table(["data", "data size", "peak RSS (ONNX job)", "time"], mem))
    print(f"worst relative difference, ONNX --upstream batch vs PyTorch statistics: {worst:.1e}")
    if args.json:
        from common import write_json

        write_json(args.json, {"accuracy": rows, "memory": mem, "worst_stat_rel_diff": worst})


if __name__ == "__main__":
    main()
