"""Does a fold make a model slower when its BN statistics produce subnormal weights? (issue 17)

Reference model: ``models.resnet.resnet18`` (width 32, 1x3x96x96; ``--quick``: width 16, 64x64) with
realistic BN statistics (:func:`models.stats.randomize_bn`), then *sickened*: in every BN, 25% of the
channels get gamma = 1e-39 (a subnormal float32, as left by L1 channel pruning) and 10% gamma = 0
(dead channels). Folding multiplies the conv weights of those channels by ~1e-39: they become
subnormal (or zero) float32 values.

Candidates, timed side by side (:func:`common.time_interleaved`: interleaved rounds, medians), each in
onnxruntime (CPU, 1 thread, ORT_DISABLE_ALL and ORT_ENABLE_ALL) and in PyTorch eager (1 thread):

* ``original``: the sick model with its BatchNorms;
* ``folded``: ``bnfold.fold(..., flush_denormals=False)`` (subnormal weights kept);
* ``folded + flushed``: ``bnfold.fold(...)`` (``flush_denormals=True``, the default);
* ``folded, runtime FTZ``: the folded model run with the runtime's own flush-to-zero switch
  (onnxruntime ``session.set_denormal_as_zero=1``; ``torch.set_flush_denormal(True)``), which users
  must know to set;
* ``floor``: the same architecture folded from healthy statistics (no subnormal anywhere): what a
  BN-free model of this shape costs.

Prints the environment, the subnormal counts (``bnfold.health`` and a direct count), the output error
of each candidate against the original (onnxruntime, optimisations off), and the latency table with
ratios against the original and the floor; writes ``benchmarks/results/denormals.md``.

Run: ``python benchmarks/bench_denormals.py [--quick] [--repeats N]`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any

from common import (
    REPO_ROOT,
    env_summary,
    fmt_ratio,
    make_parser,
    markdown_table,
    ort_options,
    pin_threads,
    time_interleaved,
)

RESULTS = REPO_ROOT / "benchmarks" / "results" / "denormals.md"
TINY_GAMMA = 1e-39
"""A subnormal float32 gamma: what L1-sparsified ("network slimming") channels drift to."""
FRACTION_TINY = 0.25
FRACTION_DEAD = 0.10


def sicken(model: Any, seed: int = 1) -> Any:
    """In every BN: 25% of channels gamma = 1e-39, 10% gamma = 0 (in place; returns the model)."""
    import torch

    from models.stats import bn_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in bn_modules(model):
            perm = torch.randperm(m.num_features, generator=g)
            n_tiny = int(round(FRACTION_TINY * m.num_features))
            n_dead = int(round(FRACTION_DEAD * m.num_features))
            m.weight[perm[:n_tiny]] = TINY_GAMMA
            m.weight[perm[n_tiny : n_tiny + n_dead]] = 0.0
    return model


def build(width: int, seed: int, sick: bool) -> Any:
    import torch

    from models.resnet import resnet18
    from models.stats import randomize_bn

    torch.manual_seed(seed)
    model = randomize_bn(resnet18(num_classes=10, width=width), seed).eval()
    return sicken(model) if sick else model


def to_onnx(model: Any, x: Any) -> Any:
    """Export with every BN kept (legacy exporter, no constant folding, BN preserved)."""
    import onnx
    import torch

    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
    )
    return onnx.load_from_string(buf.getvalue())


def ort_session(proto: Any, optimize: bool, ftz: bool = False) -> Any:
    import onnxruntime as ort

    opts = ort_options(1, optimize=optimize)
    if ftz:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def direct_subnormal_count(proto: Any) -> int:
    """Subnormal float32 values in every initializer, counted with NumPy alone."""
    import numpy as np
    from onnx import numpy_helper

    tiny = np.finfo(np.float32).tiny
    n = 0
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            n += int(np.count_nonzero((a != 0) & (np.abs(a) < tiny)))
    return n


def main() -> None:
    ap = make_parser("Latency of folded models whose BN statistics create subnormal weights", repeats=9)
    args = ap.parse_args()
    pin_threads(args.threads)

    import numpy as np
    import torch

    import bnfold

    width, hw = (16, 64) if args.quick else (32, 96)
    print(env_summary())
    print(
        f"model: resnet18 width {width}, input 1x3x{hw}x{hw}; in every BN {FRACTION_TINY:.0%} of channels "
        f"gamma = {TINY_GAMMA:g}, {FRACTION_DEAD:.0%} gamma = 0; threads {args.threads}\n"
    )

    x = torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    sick = build(width, 0, sick=True)
    healthy = build(width, 0, sick=False)

    h = bnfold.health(sick)
    mods: dict[str, Any] = {
        "original": sick,
        "folded": bnfold.fold(sick, flush_denormals=False),
        "folded + flushed": None,
        "floor": bnfold.fold(healthy),
    }
    mods["folded + flushed"], rep = bnfold.fold_with_report(sick, flush_denormals=True)

    proto = to_onnx(sick, x)
    protos: dict[str, Any] = {
        "original": proto,
        "folded": bnfold.fold(proto, flush_denormals=False),
        "folded + flushed": bnfold.fold(proto, flush_denormals=True),
        "floor": bnfold.fold(to_onnx(healthy, x)),
    }
    oh = bnfold.health(proto)
    direct = direct_subnormal_count(protos["folded"])
    print(
        f"health (PyTorch): {len(h.flagged)} of {len(h.bns)} BN flagged, {h.constant_channels} constant "
        f"channels, the fold writes {h.subnormal:,} subnormal float32 values; flushed: "
        f"{rep.flushed_denormals:,}"
    )
    print(
        f"health (ONNX): the fold writes {oh.subnormal:,} subnormal values; direct NumPy count on the folded "
        f"model: {direct:,}; after flush: {direct_subnormal_count(protos['folded + flushed'])}\n"
    )

    # Output error against the original, onnxruntime with optimisations off.
    xin = {"input": x.numpy()}
    ref = ort_session(proto, False).run(None, xin)[0].astype(np.float64)
    scale = float(np.max(np.abs(ref)))
    err_rows = []
    for name in ("folded", "folded + flushed"):
        out = ort_session(protos[name], False).run(None, xin)[0].astype(np.float64)
        err_rows.append(
            [
                name,
                f"{float(np.max(np.abs(out - ref))):.2e}",
                f"{float(np.max(np.abs(out - ref))) / scale:.2e}",
            ]
        )
    print(markdown_table(["candidate", "max abs error vs original", "relative to output scale"], err_rows))
    print()

    # What the default flush costs at fold time: in-place folds of fresh copies, interleaved.
    def fold_job(flush: bool) -> Callable[[], object]:
        def job() -> object:
            work = type(proto)()
            work.CopyFrom(proto)
            return bnfold.fold(work, inplace=True, flush_denormals=flush)

        return job

    ft = time_interleaved({"keep": fold_job(False), "flush": fold_job(True)}, repeats=args.repeats, warmup=1)
    fold_cost = (
        f"fold time (ONNX, in place, {sum(t.ByteSize() for t in proto.graph.initializer) / 2**20:.1f} MiB of "
        f"initializers): {ft['keep'].median * 1e3:.1f} ms keeping denormals, {ft['flush'].median * 1e3:.1f} ms "
        f"flushing them ({fmt_ratio(ft['flush'].median, ft['keep'].median)})"
    )
    print(fold_cost + "\n")

    order = ["original", "folded", "folded + flushed", "folded, runtime FTZ", "floor"]
    results: dict[str, dict[str, float]] = {}
    for setting, optimize in (("onnxruntime, ORT_DISABLE_ALL", False), ("onnxruntime, ORT_ENABLE_ALL", True)):
        sessions = {k: ort_session(p, optimize) for k, p in protos.items()}
        sessions["folded, runtime FTZ"] = ort_session(protos["folded"], optimize, ftz=True)
        fns: dict[str, Callable[[], object]] = {
            k: (lambda s=s: s.run(None, xin)) for k, s in sessions.items()
        }
        t = time_interleaved(
            {k: fns[k] for k in order}, repeats=args.repeats, warmup=max(args.warmup, 1), number=3
        )
        results[setting] = {k: v.median for k, v in t.items()}

    def eager(m: Any, ftz: bool = False) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                if ftz:
                    torch.set_flush_denormal(True)
                    try:
                        return m(x)
                    finally:
                        torch.set_flush_denormal(False)
                return m(x)

        return run

    efns = {k: eager(m) for k, m in mods.items()}
    efns["folded, runtime FTZ"] = eager(mods["folded"], ftz=True)
    t = time_interleaved(
        {k: efns[k] for k in order}, repeats=args.repeats, warmup=max(args.warmup, 1), number=3
    )
    results["PyTorch eager"] = {k: v.median for k, v in t.items()}

    headers = [
        "runtime",
        *[f"{k} (ms)" for k in order],
        "original / folded",
        "original / flushed",
        "flushed / floor",
    ]
    rows = []
    for setting, r in results.items():
        rows.append(
            [
                setting,
                *[f"{r[k] * 1e3:.2f}" for k in order],
                fmt_ratio(r["original"], r["folded"]),
                fmt_ratio(r["original"], r["folded + flushed"]),
                fmt_ratio(r["folded + flushed"], r["floor"]),
            ]
        )
    table = markdown_table(headers, rows)
    print(table)
    slower = [s for s, r in results.items() if r["folded + flushed"] > r["original"] * 1.05]
    verdict = (
        "folded + flushed is not slower than the original in any setting"
        if not slower
        else f"folded + flushed is slower than the original in: {', '.join(slower)}"
    )
    print(f"\n{verdict}")

    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Subnormal weights after folding: latency (benchmarks/bench_denormals.py)\n\n"
            f"{env_summary()}\n\n"
            f"Model: resnet18 width {width}, input 1x3x{hw}x{hw}; in every BN {FRACTION_TINY:.0%} of the channels "
            f"have gamma = {TINY_GAMMA:g} and {FRACTION_DEAD:.0%} gamma = 0. The fold writes {oh.subnormal:,} "
            f"subnormal float32 values (ONNX; NumPy count {direct:,}). 1 thread; medians of "
            f"{args.repeats} interleaved rounds of 3 runs.\n\n"
            + markdown_table(["candidate", "max abs error vs original", "relative to output scale"], err_rows)
            + "\n\n"
            + table
            + f"\n\n{verdict}.\n\n{fold_cost}.\n"
        )
        print(f"\nwrote {RESULTS.relative_to(REPO_ROOT)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
