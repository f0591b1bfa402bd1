"""Benchmark branch merging (bnfold.onnx.merge) against each architecture's own re-parameterisation.

For small re-creations of RepVGG-A, MobileOne-S0 and RepViT-style networks (``models/reparam.py``
blocks, realistic BN statistics, eval mode), three ONNX files are timed in onnxruntime (CPU, default
optimisation level, so the unmerged model gets onnxruntime's own Conv+BN fusion), interleaved, medians
of ``--repeats`` rounds of ``--runs`` calls:

* **training form**: the exported network with its branches;
* **bnfold**: ``bnfold.onnx.fold_model`` of that file (folds, then merges, then folds again);
* **hand**: the network after its blocks' own ``reparameterize()``, exported the same way.

Reported: latency per call (the fastest round: on a shared machine the other rounds measure the
neighbours), the ratio bnfold / hand (target <= 1.02), Conv counts, and whether bnfold's graph is the
hand-merged graph node for node (same ops, attributes and weight shapes: then any latency gap is noise).

Eager PyTorch, the same three as modules: the training-form ``nn.Module``, ``bnfold.fold`` of it (folds and
merges: a ``torch.fx.GraphModule``) and the hand-reparameterised module; medians of ``--repeats`` rounds of
``--runs`` calls, interleaved with rotation (``benchmarks.common.time_interleaved``), conv modules before /
after / hand. Quote ratios, not seconds.
``--quick``: fewer runs (smoke test). ``--out FILE`` writes the markdown table.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from common import time_interleaved  # noqa: E402
from torch import nn  # noqa: E402

import bnfold  # noqa: E402
from bnfold.fx.merge import conv_modules  # noqa: E402
from bnfold.onnx import fold_model  # noqa: E402
from models import reparam  # noqa: E402
from models.stats import randomize_bn  # noqa: E402


class Net(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def reparameterize(self) -> None:
        for b in self.blocks:
            if hasattr(b, "reparameterize"):
                b.reparameterize()


class RepViTBlock(nn.Module):
    """RepViT-style: RepVGGDW token mixer, then a 1x1 -> GELU -> 1x1 channel mixer with a residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.mixer = reparam.RepVGGDW(c)
        self.ffn = nn.Sequential(
            nn.Conv2d(c, 2 * c, 1),
            nn.BatchNorm2d(2 * c),
            nn.GELU(),
            nn.Conv2d(2 * c, c, 1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(x)
        return x + self.ffn(x)

    def reparameterize(self) -> None:
        self.mixer.reparameterize()


def repvgg_a() -> Net:
    widths, depths = (48, 96, 192), (2, 4, 2)
    blocks: list[nn.Module] = [reparam.RepVGGBlock(3, 32, stride=2)]
    cin = 32
    for w, d in zip(widths, depths):
        blocks.append(reparam.RepVGGBlock(cin, w, stride=2))
        blocks += [reparam.RepVGGBlock(w, w) for _ in range(d - 1)]
        cin = w
    return Net(*blocks)


def mobileone_s0() -> Net:
    blocks: list[nn.Module] = [reparam.MobileOneBlock(3, 32, 3, stride=2, branches=1)]
    cin = 32
    for w, d in ((48, 2), (96, 3), (192, 2)):
        for k in range(d):
            s = 2 if k == 0 else 1
            blocks.append(reparam.MobileOneBlock(cin, cin, 3, stride=s, groups=cin, branches=4))
            blocks.append(reparam.MobileOneBlock(cin, w, 1, branches=4))
            cin = w
    return Net(*blocks)


def repvit() -> Net:
    stem = nn.Sequential(
        nn.Conv2d(3, 48, 3, 2, 1),
        nn.BatchNorm2d(48),
        nn.GELU(),
        nn.Conv2d(48, 48, 3, 2, 1),
        nn.BatchNorm2d(48),
    )
    return Net(stem, *[RepViTBlock(48) for _ in range(4)])


NETS = {"RepVGG-A (small)": repvgg_a, "MobileOne-S0 (small)": mobileone_s0, "RepViT (small)": repvit}


def export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        input_names=["x"],
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
    )
    return onnx.load_from_string(buf.getvalue())


def session(m: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timed(fn: Any, runs: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs


def signature(m: onnx.ModelProto) -> list[str]:
    """Ops with their attributes and constant input shapes, order-free (names and values ignored)."""
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    return sorted(
        repr(
            (
                n.op_type,
                sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in n.attribute),
                [inits.get(i) for i in n.input],
            )
        )
        for n in m.graph.node
    )


def convs(m: onnx.ModelProto) -> int:
    return sum(1 for n in m.graph.node if n.op_type == "Conv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.repeats, a.runs, a.size = 3, 3, 64
    torch.set_num_threads(a.threads)
    rows = []
    erows = []
    for name, make in NETS.items():
        torch.manual_seed(0)
        net = randomize_bn(make(), seed=1).eval()
        x = torch.randn(1, 3, a.size, a.size)
        train = export(net, x)
        merged, rep = fold_model(train)
        hand_net = copy.deepcopy(net)
        hand_net.reparameterize()
        hand = export(hand_net, x)
        feeds = {"x": x.numpy()}
        sessions = {
            k: session(m, a.threads) for k, m in (("train", train), ("bnfold", merged), ("hand", hand))
        }
        outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
        err = float(
            np.max(np.abs(outs["bnfold"] - outs["train"])) / max(1.0, float(np.max(np.abs(outs["train"]))))
        )
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(a.repeats):  # interleaved: drift hits every variant alike
            for k, s in sessions.items():
                times[k].append(timed(lambda s=s, f=feeds: s.run(None, f), a.runs))
        med = {k: min(v) * 1e3 for k, v in times.items()}
        bn_net, trep = bnfold.fold_with_report(net, example_inputs=x)
        with torch.no_grad():
            eager_err = float((bn_net(x) - net(x)).abs().max() / max(1.0, float(net(x).abs().max())))
            eager = time_interleaved(
                {
                    k: (lambda m=m, t=x: m(t))
                    for k, m in (("train", net), ("bnfold", bn_net), ("hand", hand_net))
                },
                repeats=a.repeats,
                warmup=2,
                number=a.runs,
            )
        emed = {k: t.median * 1e3 for k, t in eager.items()}
        ecv = (conv_modules(net), conv_modules(bn_net), conv_modules(hand_net))
        same = "yes" if signature(merged) == signature(hand) else "no"
        rows.append((name, convs(train), convs(merged), convs(hand), rep.bn_after, med, err, same))
        erows.append((name, ecv, len(trep.skips), emed, eager_err))
    lines = [
        f"onnxruntime {ort.__version__} CPU, {a.threads} thread(s), input 1x3x{a.size}x{a.size}, "
        f"fastest of {a.repeats} rounds of {a.runs} calls (ms per call)",
        "",
        "| network | convs train / bnfold / hand | BN left | ORT train | ORT bnfold | ORT hand | bnfold / hand "
        "| same graph as hand | max rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ct, cb, ch, bn, med, err, same in rows:
        lines.append(
            f"| {name} | {ct} / {cb} / {ch} | {bn} | {med['train']:.3f} | {med['bnfold']:.3f} | {med['hand']:.3f} | "
            f"{med['bnfold'] / med['hand']:.3f} | {same} | {err:.1e} |"
        )
    lines += [
        "",
        f"Eager PyTorch {torch.__version__} CPU, {a.threads} thread(s), same input: median of {a.repeats} "
        f"interleaved rounds of {a.runs} calls (ms per call); bnfold = ``bnfold.fold`` (a torch.fx.GraphModule)",
        "",
        "| network | conv modules train / bnfold / hand | BN left | eager train | eager bnfold | eager hand "
        "| bnfold / hand | max rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (ct, cb, ch), bn, emed, err in erows:
        lines.append(
            f"| {name} | {ct} / {cb} / {ch} | {bn} | {emed['train']:.3f} | {emed['bnfold']:.3f} | "
            f"{emed['hand']:.3f} | {emed['bnfold'] / emed['hand']:.3f} | {err:.1e} |"
        )
    lines += [
        "",
        "RepViT: the hand-written merge (the block's own) leaves the BNs of the stem and the channel mixer "
        "(eager: they stay BatchNorm modules); bnfold folds them too, so its graph is smaller than the "
        "hand-merged one.",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(
            "# Branch merging: latency before / after / hand-merged\n\n" + text + "\n", encoding="utf-8"
        )


if __name__ == "__main__":
    main()
