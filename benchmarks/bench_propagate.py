"""Benchmark scale propagation (bnfold.onnx.propagate, issue 27): the BNs no exact fold removes.

For the three networks of ``models/propagate.py`` (pre-activation ResNet blocks, a DenseNet-style block,
a CREPE-style audio net; realistic BN statistics, every gamma positive, eval mode), four ONNX models are
timed in onnxruntime (CPU, all optimisations on: what a deployment sees, so onnxruntime's own Conv+BN
fusion is in the baseline), interleaved, medians of ``--repeats`` rounds:

* **original**: the exported network;
* **fold (no propagation)**: ``fold_model(m, propagate=False)`` -- the BNs behind a ReLU / MaxPool or
  before a zero-padded conv stay;
* **fold (propagation)**: ``fold_model(m)`` -- they are split and moved: the shift goes into a bias
  (the next layer's, a producer's with the other readers compensated, or through a Relu turned into
  ``Max``), else one Add stays per BN (CREPE: before each zero-padded conv, where no exact move exists);
* **floor**: the same network with every BN deleted (``nn.Identity``), exported the same way.

Reported: latency ratio to the floor, and BN / Mul / Add node counts. Quote ratios, not seconds.
``--quick``: smaller inputs and fewer rounds.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    env_summary,
    fmt_ratio,
    make_parser,
    markdown_table,
    ort_options,
    pin_threads,
    time_interleaved,
)
from torch import nn  # noqa: E402

from bnfold.onnx import fold_model  # noqa: E402
from models import propagate as nets  # noqa: E402


def export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        model, (x,), buf, dynamo=False, do_constant_folding=False, input_names=["x"], opset_version=17
    )
    return onnx.load_from_string(buf.getvalue())


def strip_bn(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            strip_bn(child)
    return model


def build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor]:
    if name == "preact":
        net: nn.Module = nets.PreActBlock(c=32 if quick else 64)
        x = torch.randn(1, 3, 32 if quick else 56, 32 if quick else 56)
    elif name == "dense":
        net = nets.DenseBlock(c=32, growth=16 if quick else 32, layers=4 if quick else 6)
        x = torch.randn(1, 3, 28 if quick else 56, 28 if quick else 56)
    else:
        length = 512 if quick else 1024
        net = nets.Crepe(widths=(128, 32, 32, 32) if quick else (256, 32, 32, 32, 64, 128), length=length)
        x = torch.randn(1, 1, length, 1)
    return nets.set_bn(net, sign="positive"), x


def counts(m: onnx.ModelProto) -> str:
    ops = [n.op_type for n in m.graph.node]
    return f"{ops.count('BatchNormalization')} / {ops.count('Mul')} / {ops.count('Add')}"


def main() -> None:
    parser = make_parser("Scale propagation: folded model vs the BN-free floor", repeats=15, quick_repeats=5)
    args = parser.parse_args()
    pin_threads(args.threads)
    print(env_summary())
    rows: list[list[Any]] = []
    for name in ("preact", "dense", "crepe"):
        net, x = build(name, args.quick)
        with torch.no_grad():
            m = export(net, x)
            floor = export(strip_bn(build(name, args.quick)[0]), x)
        off, _ = fold_model(m, propagate=False)
        on, rep = fold_model(m)
        feeds = {"x": x.numpy()}
        sess = {
            k: ort.InferenceSession(
                v.SerializeToString(),
                ort_options(args.threads, optimize=True),
                providers=["CPUExecutionProvider"],
            )
            for k, v in {"original": m, "off": off, "on": on, "floor": floor}.items()
        }
        ref = sess["original"].run(None, feeds)[0]
        got = sess["on"].run(None, feeds)[0]
        err = float(np.max(np.abs(ref - got)) / max(1.0, float(np.max(np.abs(ref)))))
        number = 5 if args.quick else 20
        t = time_interleaved(
            {k: (lambda s=s, f=feeds: s.run(None, f)) for k, s in sess.items()},
            repeats=args.repeats,
            warmup=args.warmup,
            number=number,
        )
        fl = t["floor"].median
        rows.append(
            [
                name,
                fmt_ratio(t["original"].median, fl),
                fmt_ratio(t["off"].median, fl),
                fmt_ratio(t["on"].median, fl),
                counts(m),
                counts(off),
                counts(on),
                counts(floor),
                f"{err:.1e}",
            ]
        )
    print(
        markdown_table(
            [
                "net",
                "original / floor",
                "fold, no propagation / floor",
                "fold + propagation / floor",
                "BN/Mul/Add original",
                "BN/Mul/Add no propagation",
                "BN/Mul/Add propagation",
                "BN/Mul/Add floor",
                "max rel. error",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
