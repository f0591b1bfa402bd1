"""Benchmark scale propagation for nn.Module (bnfold.fx.propagate, issue 27): eager PyTorch latency.

For the networks of ``models/propagate.py`` (pre-activation ResNet blocks, a DenseNet-style block, a
CREPE-style audio net, a ResNet-v2 whose projection blocks fork one tensor into two convs; realistic BN
statistics, every gamma positive, plus two nets with mixed-sign gammas, where half the channels keep
a per-channel multiply; eval mode, ``torch.no_grad``),
four models are timed in eager PyTorch (CPU), interleaved, medians of ``--repeats`` rounds:

* **original**: the network as built;
* **fold (no propagation)**: ``bnfold.fold(net, propagate=False)`` -- the BNs behind a ReLU / MaxPool or
  before a zero-padded conv stay;
* **fold (propagation)**: ``bnfold.fold(net)`` -- they are split and moved (one add may stay per BN;
  the result is a ``torch.fx.GraphModule``);
* **floor**: the same network (same weights) with every BN replaced by ``nn.Identity``.

Reported: latency ratio to the floor, and BN / mul / add counts (BN modules; mul and add nodes of the
traced graph). Quote ratios, not seconds. ``--quick``: smaller inputs and fewer rounds.
"""

from __future__ import annotations

import copy
import operator
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    env_summary,
    fmt_ratio,
    make_parser,
    markdown_table,
    pin_threads,
    time_interleaved,
    write_json,
)
from torch import fx, nn  # noqa: E402

import bnfold  # noqa: E402
from models import propagate as nets  # noqa: E402


def strip_bn(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            strip_bn(child)
    return model


def build(name: str, quick: bool, sign: str = "positive") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "preact":
        net: nn.Module = nets.PreActBlock(c=32 if quick else 64)
        x = torch.randn(1, 3, 32 if quick else 56, 32 if quick else 56, generator=g)
    elif name == "dense":
        net = nets.DenseBlock(c=32, growth=16 if quick else 32, layers=4 if quick else 6)
        x = torch.randn(1, 3, 28 if quick else 56, 28 if quick else 56, generator=g)
    elif name == "preact_resnet":
        net = nets.PreActResNet(c=16 if quick else 32)
        x = torch.randn(1, 3, 32 if quick else 56, 32 if quick else 56, generator=g)
    else:
        length = 512 if quick else 1024
        net = nets.Crepe(widths=(128, 32, 32, 32) if quick else (256, 32, 32, 32, 64, 128), length=length)
        x = torch.randn(1, 1, length, 1, generator=g)
    return nets.set_bn(net, sign=sign), x


def counts(m: nn.Module) -> str:
    bns = sum(isinstance(s, nn.modules.batchnorm._BatchNorm) for s in m.modules())
    g = m.graph if isinstance(m, fx.GraphModule) else fx.symbolic_trace(m).graph
    muls = sum(n.target in (operator.mul, torch.mul) for n in g.nodes)
    adds = sum(n.target in (operator.add, torch.add) for n in g.nodes)
    return f"{bns} / {muls} / {adds}"


def main() -> None:
    parser = make_parser(
        "Scale propagation (nn.Module): folded model vs the BN-free floor", repeats=15, quick_repeats=5
    )
    args = parser.parse_args()
    pin_threads(args.threads)
    print(env_summary())
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    cases = [(n, "positive") for n in ("preact", "dense", "crepe", "preact_resnet")]
    for case in [*cases, ("preact", "mixed"), ("crepe", "mixed")]:
        name = case[0] if case[1] == "positive" else f"{case[0]} ({case[1]} signs)"
        net, x = build(case[0], args.quick, case[1])
        floor = strip_bn(copy.deepcopy(net)).eval()  # the same weights, BNs deleted
        off = bnfold.fold(net, propagate=False)
        on, rep = bnfold.fold_with_report(net)
        models = {"original": net, "off": off, "on": on, "floor": floor}
        with torch.no_grad():
            ref = net(x)
            err = float((ref - on(x)).abs().max()) / max(1.0, float(ref.abs().max()))
            number = 5 if args.quick else 20
            t = time_interleaved(
                {k: (lambda m=m, x=x: m(x)) for k, m in models.items()},
                repeats=args.repeats,
                warmup=args.warmup,
                number=number,
            )
        fl = t["floor"].median
        results[name] = {k: v.median / fl for k, v in t.items()}
        rows.append(
            [
                name,
                fmt_ratio(t["original"].median, fl),
                fmt_ratio(t["off"].median, fl),
                fmt_ratio(t["on"].median, fl),
                counts(net),
                counts(off),
                counts(on),
                counts(floor),
                f"{err:.1e}",
                f"{sum(v.to_dict()['status'] == 'propagated' for v in rep.verdicts)} / {rep.bn_before}",
            ]
        )
    print(
        markdown_table(
            [
                "net",
                "original / floor",
                "fold, no propagation / floor",
                "fold + propagation / floor",
                "BN/mul/add original",
                "BN/mul/add no propagation",
                "BN/mul/add propagation",
                "BN/mul/add floor",
                "max rel. error",
                "BNs propagated",
            ],
            rows,
        )
    )
    write_json(args.json, results)


if __name__ == "__main__":
    main()
