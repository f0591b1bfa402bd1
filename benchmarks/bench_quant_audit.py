"""What the quantisation audit's flag means in output error (issue 25): per-tensor vs per-channel int8.

Folding multiplies each output channel of a layer by its own BN scale. One BN channel with a tiny
running variance (here ``var = 1e-6``: a channel that saw a near-constant input) gets a scale ~300x the
others, and after the fold that channel sets the per-tensor int8 scale of the whole weight.

Models (PyTorch, eval, realistic BN statistics from :func:`models.stats.randomize_bn`, seeded):

* ``mobilenet_quant``: :mod:`models.mobilenet_quant` (stem + two inverted residual blocks), with
  ``var = 1e-6`` on channel 0 of the first depthwise BN, and the same network without it;
* ``mobilenet_v2`` (width 1.0, ``--quick`` skips it): :mod:`models.mobilenet`, the same tiny variance
  on channel 0 of the first depthwise BN (``features.1.conv.0.1``).

Each is folded with ``bnfold.fold_with_report(..., health=True)``; the audit flags layers that lose
>= 4 bits (``QUANT_RATIO_FLAG``). Then the weights of the folded model (only the weights; activations
stay float) are fake-quantised in numpy, float64: symmetric int8, ``s = max|w| / 127``,
``w_q = clip(round(w / s), -127, 127) * s``, with one scale per tensor or one per output channel.
Reported, against the folded model in float on the same inputs, quantising one layer at a time
(the flagged layer vs the unflagged ones) and then every layer:

* the quantised layer's own output error, median over its output channels of ``||y_c,q - y_c|| /
  ||y_c||`` (a norm over the whole tensor would be dominated by the one large channel);
* the network's output error ``||y_q - y|| / ||y||``, and the top-1 agreement with the float model.

Run: ``python benchmarks/bench_quant_audit.py [--quick]``; writes ``benchmarks/results/quant_audit.md``.

``--fold-overhead MODEL.onnx``: what the summary line costs ``bnfold fold --no-verify`` (the records of
:func:`bnfold.health_audit.fold_quant`, computed after every fold): the file fold timed with and
without it, alternated in one process (``--repeats`` rounds, medians), and ``fold_quant`` alone.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from common import REPO_ROOT, env_summary, make_parser, markdown_table

RESULTS = REPO_ROOT / "benchmarks" / "results" / "quant_audit.md"
TINY_VAR = 1e-6


def fake_quant(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric int8 fake quantisation of a Conv/Linear weight (output channels on axis 0), float64."""
    w = np.asarray(w, dtype=np.float64)
    if per_channel:
        amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape(-1, *([1] * (w.ndim - 1)))
    else:
        amax = np.asarray(np.abs(w).max())
    s = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(w / s), -127, 127) * s


def weighted_layers(model: Any) -> list[str]:
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def run_quantised(
    model: Any, x: Any, layers: list[str], per_channel: bool | None, tap: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The model's output with the weights of ``layers`` fake-quantised (restored afterwards), and the
    output of layer ``tap`` in that run (None without ``tap``)."""
    import torch

    saved = {}
    seen: list[np.ndarray] = []
    hook = None
    if tap is not None:
        hook = model.get_submodule(tap).register_forward_hook(
            lambda _m, _i, o: seen.append(o.detach().double().numpy())
        )
    with torch.no_grad():
        for name in layers:
            w = model.get_submodule(name).weight
            saved[name] = w.detach().clone()
            if per_channel is not None:
                w.copy_(torch.from_numpy(fake_quant(w.detach().double().numpy(), per_channel)).to(w.dtype))
        try:
            return model(x).double().numpy(), (seen[0] if seen else None)
        finally:
            if hook is not None:
                hook.remove()
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def channel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """The median over output channels (axis 1) of each channel's ``||y_c - ref_c|| / ||ref_c||``: what
    the typical channel suffers (a norm over the whole tensor is dominated by the largest channel)."""
    d = np.moveaxis(y - ref, 1, 0).reshape(y.shape[1], -1)
    r = np.moveaxis(ref, 1, 0).reshape(ref.shape[1], -1)
    n = np.linalg.norm(r, axis=1)
    keep = n > 0
    return float(np.median(np.linalg.norm(d, axis=1)[keep] / n[keep]))


def build(name: str, tiny: bool) -> tuple[Any, Any]:
    import torch

    from models.mobilenet import mobilenet_v2
    from models.mobilenet_quant import mobilenet_quant
    from models.stats import randomize_bn

    gen = torch.Generator().manual_seed(123)
    if name == "mobilenet_quant":
        return mobilenet_quant(tiny_var=tiny), torch.randn(16, 3, 32, 32, generator=gen)
    torch.manual_seed(0)
    m = randomize_bn(mobilenet_v2(num_classes=100), 0).eval()
    if tiny:
        with torch.no_grad():
            m.get_submodule("features.1.conv.0.1").running_var[0] = TINY_VAR
    return m, torch.randn(8, 3, 96, 96, generator=gen)


def study(name: str, tiny: bool) -> dict[str, Any]:

    import bnfold

    model, x = build(name, tiny)
    folded, rep = bnfold.fold_with_report(model, health=True)
    assert rep.health is not None
    quant = {q.layer: q for q in rep.health.quant}
    ref, _ = run_quantised(folded, x, [], None)
    layers = weighted_layers(folded)
    per_layer = []
    for layer in layers:
        q = quant.get(layer)
        _, lref = run_quantised(folded, x, [], None, layer)
        row: dict[str, Any] = {
            "layer": layer,
            "flagged": bool(q and q.flagged),
            "bits_lost": q.bits_lost if q else float("nan"),
        }
        for mode, pc in (("tensor", False), ("channel", True)):
            y, ly = run_quantised(folded, x, [layer], pc, layer)
            assert lref is not None and ly is not None
            row[mode] = rel_err(y, ref)
            row["layer_" + mode] = channel_err(ly, lref)
        per_layer.append(row)
    whole: dict[str, float] = {}
    for mode, pc in (("tensor", False), ("channel", True)):
        y, _ = run_quantised(folded, x, layers, pc)
        whole[mode] = rel_err(y, ref)
        whole[mode + "_top1"] = float(np.mean(y.argmax(1) == ref.argmax(1)))
    return {
        "name": name + ("" if tiny else " (healthy)"),
        "per_layer": per_layer,
        "whole": whole,
        "flagged": [q.layer for q in rep.health.quant_flagged],
        "audited": len(quant),
    }


def pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def report(results: list[dict[str, Any]]) -> str:
    out = [f"Environment: {env_summary()}", ""]
    rows = []
    for r in results:
        flagged = [p for p in r["per_layer"] if p["flagged"]]
        clean = [p for p in r["per_layer"] if not p["flagged"]]
        keys = ("layer_tensor", "layer_channel", "tensor", "channel")
        for p in flagged:
            rows.append(
                [r["name"], f"flagged: {p['layer']}", f"{p['bits_lost']:.1f}", *(pct(p[k]) for k in keys)]
            )
        if clean:
            bits = np.array([p["bits_lost"] for p in clean])
            bits = bits[np.isfinite(bits)]
            for how, f in (("median", np.median), ("worst", np.max)):
                rows.append(
                    [
                        r["name"],
                        f"unflagged, {how} of {len(clean)}",
                        f"{f(bits):.1f}" if bits.size else "-",
                        *(pct(float(f(np.array([p[k] for p in clean])))) for k in keys),
                    ]
                )
        w = r["whole"]
        rows.append([r["name"], "every layer", "", "", "", pct(w["tensor"]), pct(w["channel"])])
        rows.append(
            [
                r["name"],
                "every layer: top-1 = float",
                "",
                "",
                "",
                pct(w["tensor_top1"]),
                pct(w["channel_top1"]),
            ]
        )
    out.append(
        markdown_table(
            [
                "model",
                "weights int8-quantised",
                "bits lost (audit)",
                "layer out, per-tensor",
                "layer out, per-channel",
                "model out, per-tensor",
                "model out, per-channel",
            ],
            rows,
            align="llrrrrr",
        )
    )
    out.append("")
    out.append(
        "layer out: the quantised layer's own output (float input), median over its output channels of "
        "||y_c,q - y_c|| / ||y_c||. model out: ||y_q - y|| / ||y|| of the network's output. Both against "
        "the folded model in float. 'flagged'/'unflagged' rows quantise one layer at a time (medians and "
        "worst over the unflagged layers; the Linear classifier has no BN and no audit figure); "
        "'every layer' quantises all of them."
    )
    return "\n".join(out)


def fold_overhead(path: str, repeats: int) -> str:
    """Median wall time of ``files.fold_file(verify=False)`` on ``path`` with and without the
    quantisation records (alternated), and of ``fold_quant`` alone on the folded model."""
    import tempfile
    import time
    from pathlib import Path

    import onnx

    import bnfold
    from bnfold import files, health_audit

    real = health_audit.fold_quant
    times: dict[str, list[float]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "out.onnx"
        for _ in range(repeats):
            for mode in ("with", "without"):
                health_audit.fold_quant = real if mode == "with" else (lambda folded, report: ())  # type: ignore[assignment]
                t0 = time.perf_counter()
                files.fold_file(path, dst, files.FoldSettings(verify=False))
                times[mode].append(time.perf_counter() - t0)
        health_audit.fold_quant = real
    folded, rep = bnfold.fold_with_report(onnx.load(path))
    alone = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = real(folded, rep)
        alone.append(time.perf_counter() - t0)
    w, wo = float(np.median(times["with"])), float(np.median(times["without"]))
    return (
        f"{Path(path).name}: fold --no-verify {wo * 1e3:.0f} ms without the records, {w * 1e3:.0f} ms with "
        f"({(w / wo - 1) * 100:+.1f}%); fold_quant alone {float(np.median(alone)) * 1e3:.1f} ms for "
        f"{len(q)} layers ({sum(x.flagged for x in q)} flagged); medians of {repeats} alternated rounds"
    )


def main(argv: list[str] | None = None) -> int:
    p = make_parser("Per-tensor vs per-channel int8 output error of flagged and unflagged folded layers")
    p.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.relative_to(REPO_ROOT)}")
    p.add_argument("--fold-overhead", metavar="MODEL.onnx", help="time the fold summary's records on MODEL")
    args = p.parse_args(argv)
    if args.fold_overhead:
        print(fold_overhead(args.fold_overhead, args.repeats))
        return 0
    import torch

    torch.set_num_threads(max(args.threads, 1))
    names = ["mobilenet_quant"] + ([] if args.quick else ["mobilenet_v2"])
    results = [study(n, tiny) for n in names for tiny in (True, False)]
    text = report(results)
    print(text)
    if not args.no_write and not args.quick:
        RESULTS.write_text(
            "# Quantisation audit: per-tensor vs per-channel int8 after folding\n\n"
            "`python benchmarks/bench_quant_audit.py`\n\n" + text + "\n",
            encoding="utf-8",
        )
        print(f"\nwritten: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
