"""Forward + backward of bnfold.nn.BatchNorm2d against torch.nn.BatchNorm2d at ResNet-50 BN shapes.

Training mode, batch 32, float32, contiguous and channels_last. Both layers run in the same process,
interleaved (torch, bnfold, torch, ...), and each figure is a median; the ratio is bnfold / torch
(target <= 1.25). Memory: bytes saved for backward (what a training step keeps alive per layer,
measured with ``torch.autograd.graph.saved_tensors_hooks``) and, on the CPU, the extra peak resident
memory of one forward + backward measured in a fresh subprocess per layer (``ru_maxrss``); on CUDA,
``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_nn.py            # all shapes
    python benchmarks/bench_nn.py --quick    # the two smallest shapes, fewer repeats (< 30 s)
    python benchmarks/bench_nn.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bnfold.nn import BatchNorm2d  # noqa: E402

SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
QUICK_SHAPES = [(32, 1024, 14, 14), (32, 2048, 7, 7)]


def _layer(impl: str, c: int, device: str) -> nn.Module:
    cls = BatchNorm2d if impl == "bnfold" else nn.BatchNorm2d
    return cls(c).to(device).train()


def _inputs(shape: tuple[int, ...], channels_last: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_(True)
    g = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    return x, g


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        layer(x).backward(g)

    return run


def _time(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def saved_bytes(impl: str, shape: tuple[int, ...], channels_last: bool, device: str) -> int:
    """Bytes of distinct storages the autograd graph saves for backward."""
    layer = _layer(impl, shape[1], device)
    x, _ = _inputs(shape, channels_last, device)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return sum(seen.values())


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _peak_child(impl: str, shape: tuple[int, ...], channels_last: bool) -> None:
    """Subprocess body: extra peak RSS (bytes) of one forward + backward after the inputs exist.

    Linux: writing 5 to /proc/self/clear_refs resets the high-water mark VmHWM to the current RSS.
    """
    layer = _layer(impl, shape[1], "cpu")
    x, g = _inputs(shape, channels_last, "cpu")
    small_x, small_g = _inputs((2, shape[1], 2, 2), channels_last, "cpu")
    _step(layer, small_x, small_g)()  # warm the code paths without touching big memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS")
    _step(layer, x, g)()
    after = _rss_kib("VmHWM")
    print(json.dumps({"extra_peak": (after - before) * 1024}))


def peak_extra_cpu(impl: str, shape: tuple[int, ...], channels_last: bool) -> int:
    args = [sys.executable, __file__, "--peak-child", impl, ",".join(map(str, shape))]
    if channels_last:
        args.append("--channels-last")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["extra_peak"])


def peak_extra_cuda(impl: str, shape: tuple[int, ...], channels_last: bool) -> int:
    layer = _layer(impl, shape[1], "cuda")
    x, g = _inputs(shape, channels_last, "cuda")
    _step(layer, x, g)()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(layer, x, g)()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two smallest shapes, fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per layer and shape")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--peak-child", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_child:
        impl, shape = args.peak_child
        _peak_child(impl, tuple(int(s) for s in shape.split(",")), args.channels_last)
        return
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (5 if args.quick else 9)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {repeats}")
    print(
        f"{'shape':>22} {'layout':>13} {'torch ms':>9} {'bnfold ms':>9} {'ratio':>6} "
        f"{'saved MB t/b':>14} {'peak+ MB t/b':>14}"
    )
    ratios: list[float] = []
    tot = {"torch": 0.0, "bnfold": 0.0}
    for shape in shapes:
        for channels_last in (False, True):
            x, g = _inputs(shape, channels_last, device)
            layers = {impl: _layer(impl, shape[1], device) for impl in ("torch", "bnfold")}
            runs = {impl: _step(layers[impl], x, g) for impl in layers}
            for fn in runs.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {"torch": [], "bnfold": []}
            for r in range(repeats):
                order = ("torch", "bnfold") if r % 2 == 0 else ("bnfold", "torch")
                for impl in order:
                    times[impl].append(_time(runs[impl], device))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["bnfold"] / med["torch"]
            ratios.append(ratio)
            for k in tot:
                tot[k] += med[k]
            saved = {k: saved_bytes(k, shape, channels_last, device) / 2**20 for k in ("torch", "bnfold")}
            peak = "-"
            if not args.no_peak and (device == "cuda" or shape == shapes[-1]):
                fn = peak_extra_cuda if device == "cuda" else peak_extra_cpu
                pk = {k: fn(k, shape, channels_last) / 2**20 for k in ("torch", "bnfold")}
                peak = f"{pk['torch']:.0f}/{pk['bnfold']:.0f}"
            del x, g, layers, runs
            layout = "channels_last" if channels_last else "contiguous"
            print(
                f"{str(shape):>22} {layout:>13} {med['torch'] * 1e3:9.2f} {med['bnfold'] * 1e3:9.2f} "
                f"{ratio:6.2f} {saved['torch']:6.1f}/{saved['bnfold']:<7.1f} {peak:>14}"
            )
    geo = 1.0
    for r in ratios:
        geo *= r
    geo **= 1.0 / len(ratios)
    print(
        f"overall: geometric-mean ratio {geo:.2f}, total-time ratio {tot['bnfold'] / tot['torch']:.2f} "
        f"(target <= 1.25)"
    )


if __name__ == "__main__":
    main()
