"""bnfold next to the tools users reach for today: same files, same run, medians, ratios pair by pair.

One command regenerates everything::

    python benchmarks/bench_peers.py            # full run (< 10 min on 2 cores)
    python benchmarks/bench_peers.py --quick    # 2 small models, 2 repeats (< 60 s)

writes ``benchmarks/results/peers.md`` (tables + the machine) and ``benchmarks/results/latency.png``
(``--out DIR`` to write elsewhere).

What is measured, and how:

* **Models.** Every reference model of :mod:`models.zoo` (realistic BN statistics), exported once per run
  with the legacy exporter, ``do_constant_folding=False`` (which keeps every BatchNormalization node;
  checked after export), opset 17, dynamic batch. ResNet-18 is also exported with the dynamo exporter and
  ``optimize=False`` (BN kept, each missing conv bias built at run time). The *floor* model is the same
  network with every BN replaced by ``nn.Identity``, exported the same way: the latency a perfect fold
  reaches (its outputs differ; it is only a floor). A synthetic deep chain of Conv->BN pairs built with
  ``onnx.helper`` measures how fold time scales.
* **ONNX tools.** bnfold (``bnfold.io.load`` + ``bnfold.onnx.fold_model`` + ``bnfold.io.save``), onnxoptimizer ``fuse_bn_into_conv``, onnxslim
  ``slim``, onnxsim ``simplify`` (if installed), onnxruntime offline BASIC optimisation (saves the
  optimised model), the onnxscript rewriter with its three BN-fusion rules, and the I/O floor (plain
  ``onnx.load`` + ``onnx.save``). Per model and tool one fresh subprocess imports what the tool needs,
  then runs the whole job (load + fold + save) ``--repeats`` times, each timed inside the child (so
  interpreter start and imports are not counted); peak RSS is the child's ``VmHWM`` right after its
  first job (one job's peak, imports included). Median over the repeats; ``job/floor`` is the tool's
  median over the floor's median (the floor process runs twice, before and after the tools).
* **Correctness.** Each tool's output runs in onnxruntime with ``ORT_DISABLE_ALL`` on the same seeded
  inputs (batch 2) as the original; ``rel err = max|out - ref| / max|ref|``. A result whose relative error
  exceeds :data:`WRONG_REL_ERR` (or whose output cannot run) is marked **WRONG** / **FAILED** in the table.
* **Latency.** onnxruntime, 1 intra-op thread, of the original, bnfold's output and the floor with
  ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL`` (and of every peer's output with ``ORT_DISABLE_ALL``); PyTorch eager (1 thread) of the original, ``bnfold.fx.fold_module``,
  ``torch.fx.experimental.optimization.fuse``, ``torch.jit.freeze(torch.jit.script(m))`` +
  ``torch.jit.optimize_for_inference``, and the floor. Variants are interleaved in each repeat (order
  rotated), one sample is the mean of ``k`` calls (``k`` calibrated so a sample lasts a few ms), medians
  of the samples after warm-up, ratios computed pair by pair (sample i of the variant over sample i of
  the original or the floor) and their median reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["WRONG_REL_ERR", "ONNX_TOOLS", "TORCH_TOOLS", "main", "run_job", "build_chain"]

#: Relative error (max abs difference over max abs reference output) above which a result is WRONG.
#: A correct float32 fold stays within ~1e-6 of the output scale on these models (PEERS.md: 2-7e-7);
#: 1e-4 leaves two orders of margin for accumulation order, and a wrong fold is off by >= 1e-2.
WRONG_REL_ERR = 1e-4

#: ONNX jobs, in table order. "floor" is the I/O floor (plain load + save).
ONNX_TOOLS = ["floor", "bnfold", "onnxruntime", "onnxscript", "onnxsim", "onnxslim", "onnxoptimizer"]
#: PyTorch eager variants, in table order.
TORCH_TOOLS = ["original", "bnfold", "fx_fuse", "jit_freeze", "floor"]

_TOOL_LABEL = {
    "floor": "load+save (I/O floor)",
    "bnfold": "bnfold",
    "onnxruntime": "onnxruntime offline BASIC",
    "onnxscript": "onnxscript rewriter BN rules",
    "onnxsim": "onnxsim",
    "onnxslim": "onnxslim",
    "onnxoptimizer": "onnxoptimizer fuse_bn_into_conv",
}
_TORCH_LABEL = {
    "original": "original",
    "bnfold": "bnfold.fx.fold_module (example_inputs)",
    "fx_fuse": "torch.fx fuse",
    "jit_freeze": "jit.freeze+optimize_for_inference",
    "floor": "floor (BN->Identity)",
}
# The models of the issue, in table order; bn_linear_mlp adds the BN -> Linear (backward) case.
FULL_MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "unet_decoder",
    "conv1d_net",
    "mnist_mlp",
    "bn_linear_mlp",
    "preact_net",
]
QUICK_MODELS = ["mnist_mlp", "conv1d_net"]
DYNAMO_MODEL = "resnet18"
JOB_TIMEOUT_S = 300
#: Per-job limit on the synthetic chain: some peers are super-linear there (onnxoptimizer took 60-440 s
#: on 600 pairs on this machine); a tool that fails or times out on the short chain is not run on the long one.
CHAIN_TIMEOUT_S = 40


# --------------------------------------------------------------------------------------------------
# Child side: one whole job (load + fold + save) per process.
# --------------------------------------------------------------------------------------------------


def _maxrss_mb() -> float:
    """Peak RSS of this process in MiB.

    ``VmHWM`` (the high-water mark of this process's own address space) rather than
    ``getrusage().ru_maxrss``: on Linux ru_maxrss survives ``execve``, so a child spawned by a parent
    that holds torch would report the parent's peak.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _prepare(tool: str) -> Callable[[str, str], dict[str, Any]]:
    """Import what ``tool`` needs (outside the timed region) and return its job function."""
    import onnx

    def load_save(src: str, dst: str, fold: Callable[[Any], Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = onnx.load(src)
        t1 = time.perf_counter()
        model = fold(model)
        t2 = time.perf_counter()
        onnx.save(model, dst)
        t3 = time.perf_counter()
        return {"load_s": t1 - t0, "fold_s": t2 - t1, "save_s": t3 - t2}

    if tool == "floor":
        return lambda s, d: load_save(s, d, lambda m: m)
    if tool == "bnfold":
        from bnfold import io as bio
        from bnfold.onnx import fold_model

        def bnfold_job(src: str, dst: str) -> dict[str, Any]:
            # bnfold's own file path, as the CLI runs it: one parse (checker included), in-place
            # fold, atomic streamed save.
            t0 = time.perf_counter()
            model = bio.load(src)
            t1 = time.perf_counter()
            fold_model(model, inplace=True)
            t2 = time.perf_counter()
            bio.save(model, dst)
            t3 = time.perf_counter()
            return {"load_s": t1 - t0, "fold_s": t2 - t1, "save_s": t3 - t2}

        return bnfold_job
    if tool == "onnxoptimizer":
        import onnxoptimizer

        return lambda s, d: load_save(s, d, lambda m: onnxoptimizer.optimize(m, ["fuse_bn_into_conv"]))
    if tool == "onnxslim":
        import onnxslim

        def slim(m: Any) -> Any:
            with contextlib.redirect_stdout(io.StringIO()):
                return onnxslim.slim(m)

        return lambda s, d: load_save(s, d, slim)
    if tool == "onnxsim":
        import onnxsim

        return lambda s, d: load_save(s, d, lambda m: onnxsim.simplify(m)[0])
    if tool == "onnxscript":
        from onnxscript.rewriter import rewrite
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        rules = [
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        ]
        return lambda s, d: load_save(s, d, lambda m: rewrite(m, pattern_rewrite_rules=rules))
    if tool == "onnxruntime":
        import onnxruntime as ort

        def offline(src: str, dst: str) -> dict[str, Any]:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = dst
            so.intra_op_num_threads = 1
            t0 = time.perf_counter()
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            return {"load_s": 0.0, "fold_s": time.perf_counter() - t0, "save_s": 0.0}

        return offline
    raise ValueError(f"unknown tool {tool!r}")


def run_job(tool: str, src: str, dst: str, repeats: int = 1) -> dict[str, Any]:
    """Run the whole job ``repeats`` times in this process; figures per run and the first run's peak RSS.

    The peak RSS (MiB) is read right after the first job, so it is the peak of one job (imports included);
    ``imports_mb`` is the peak before it. Later runs reuse the process (its imports are paid once).
    """
    warnings.filterwarnings("ignore")
    job = _prepare(tool)
    rss_imports = _maxrss_mb()
    runs, peak = [], 0.0
    for i in range(max(1, repeats)):
        t0 = time.perf_counter()
        parts = job(src, dst)
        runs.append({"job_s": time.perf_counter() - t0, **parts})
        if i == 0:
            peak = _maxrss_mb()
    return {"tool": tool, "runs": runs, "peak_mb": peak, "imports_mb": rss_imports}


def _spawn_job(
    tool: str, src: Path, dst: Path, repeats: int = 1, timeout: float = JOB_TIMEOUT_S
) -> list[dict[str, Any]]:
    """``repeats`` jobs in one fresh Python process; ``[{"error": ...}]`` when it crashes or times out."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--job", tool, str(src), str(dst), str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"error": f"timeout > {timeout:.0f} s"}]
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"error": tail[:160]}]
    out: dict[str, Any] = json.loads(lines[-1])
    extra = {"process_s": wall, "peak_mb": out["peak_mb"], "imports_mb": out["imports_mb"]}
    return [{**r, **extra} for r in out["runs"]]


# --------------------------------------------------------------------------------------------------
# Models: export, floor, synthetic chain.
# --------------------------------------------------------------------------------------------------


def _strip_bn(model: Any) -> Any:
    """A deep copy of ``model`` with every BatchNorm module replaced by ``nn.Identity`` (the floor)."""
    from torch import nn

    from models.stats import bn_modules

    floor = copy.deepcopy(model)
    for name, _ in bn_modules(floor):
        parent_name, _, attr = name.rpartition(".")
        parent = floor.get_submodule(parent_name) if parent_name else floor
        setattr(parent, attr, nn.Identity())
    return floor.eval()


def _export_legacy(model: Any, x: Any, path: Path) -> None:
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (x,),
            str(path),
            dynamo=False,
            do_constant_folding=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def _export_dynamo_child(name: str, shape: Sequence[int], out_dir: str) -> None:
    """Child mode: dynamo-export ``name`` and its floor with ``optimize=False`` (noisy, so in a child)."""
    import torch

    from models.zoo import build

    model = build(name)
    x = torch.randn(1, *shape)
    batch = torch.export.Dim("batch", min=1, max=64)
    for tag, m in ((f"{name}_dynamo", model), (f"{name}_dynamo_floor", _strip_bn(model))):
        torch.onnx.export(
            m,
            (x,),
            str(Path(out_dir) / f"{tag}.onnx"),
            dynamo=True,
            optimize=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )


def _count(model: Any, op: str = "BatchNormalization") -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def build_chain(pairs: int, channels: int = 4, size: int = 8, seed: int = 0) -> Any:
    """A synthetic ``pairs``-deep chain of ``Conv3x3 -> BatchNormalization`` pairs (onnx.helper).

    Weights are near the identity kernel and BN statistics near 1, so the output stays O(1) at any
    depth while every BN still changes the numbers (no fold looks exact by accident).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c = channels
    nodes, inits = [], []
    prev = "input"
    eye = np.zeros((c, c, 3, 3), np.float32)
    eye[np.arange(c), np.arange(c), 1, 1] = 1.0
    for i in range(pairs):
        w = eye + rng.normal(0, 0.02, eye.shape).astype(np.float32)
        stats = [
            rng.uniform(0.9, 1.1, c),  # gamma
            rng.uniform(-0.05, 0.05, c),  # beta
            rng.uniform(-0.05, 0.05, c),  # mean
            rng.uniform(0.9, 1.1, c),  # var
        ]
        names = [f"w{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"]
        inits.append(numpy_helper.from_array(w, names[0]))
        inits += [numpy_helper.from_array(s.astype(np.float32), n) for s, n in zip(stats, names[1:])]
        nodes.append(
            helper.make_node("Conv", [prev, names[0]], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}")
        )
        out = "output" if i == pairs - 1 else f"y{i}"
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *names[1:]], [out], name=f"bn{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        f"chain{pairs}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", c, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------------------


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _ort_session(path: Path | str, level: str) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "enable": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rel_err(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    if out.shape != ref.shape:
        return float("inf"), float("inf")
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    abs_err = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    return abs_err, abs_err / max(scale, 1e-30)


def _verdict(rel: float, failed: str | None = None) -> str:
    if failed:
        return "FAILED"
    if not np.isfinite(rel) or rel > WRONG_REL_ERR:
        return "**WRONG**"
    return "ok"


def _calibrate(fn: Callable[[], Any], target_s: float) -> int:
    """How many calls make one sample of about ``target_s`` seconds (1..200)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    return int(min(200, max(1, round(target_s / once))))


def _interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, k: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Per variant, ``repeats`` samples (seconds per call), variants interleaved, order rotated."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            f = fns[n]
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            samples[n].append((time.perf_counter() - t0) / k)
    return samples


def _pair_ratio(num: list[float], den: list[float]) -> float:
    return _median([a / b for a, b in zip(num, den) if b > 0])


@dataclass
class ModelCase:
    """One ONNX model under test (a zoo model, its dynamo export, or a chain) and its results."""

    name: str
    src: Path
    floor: Path | None
    shape: tuple[int, ...]
    bn: int = 0
    nodes: int = 0
    size_mb: float = 0.0
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ort: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # level -> variant -> samples
    eager: dict[str, list[float]] = field(default_factory=dict)
    eager_err: dict[str, Any] = field(default_factory=dict)


def _try_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def _available_onnx_tools(wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    tools, notes = [], []
    module_of = {
        "bnfold": "bnfold.onnx",
        "onnxoptimizer": "onnxoptimizer",
        "onnxslim": "onnxslim",
        "onnxsim": "onnxsim",
        "onnxscript": "onnxscript.rewriter.rules.common",
        "onnxruntime": "onnxruntime",
    }
    for t in wanted:
        mod = module_of.get(t)
        if mod is None:
            tools.append(t)
            continue
        try:
            m = importlib.import_module(mod)
            if t == "bnfold" and not hasattr(m, "fold_model"):
                raise ImportError("bnfold.onnx.fold_model not found")
            if t == "onnxscript" and not hasattr(m, "fuse_batchnorm_into_conv_rule"):
                raise ImportError("onnxscript has no fuse_batchnorm rules")
            tools.append(t)
        except Exception as e:  # a missing or broken peer is skipped with a note
            notes.append(f"`{t}` skipped: {type(e).__name__}: {e}")
    return tools, notes


def _run_onnx_jobs(
    case: ModelCase,
    tools: Sequence[str],
    repeats: int,
    work: Path,
    log: Callable[[str], None],
    timeout: float = JOB_TIMEOUT_S,
) -> None:
    """Whole jobs per tool (one fresh process per tool), then BN/node count and error of each output."""
    import onnx

    feeds_rng = np.random.default_rng(0)
    x = feeds_rng.standard_normal((2, *case.shape)).astype(np.float32)
    ref = _ort_session(case.src, "disable").run(None, {"input": x})[0]
    runs: dict[str, list[dict[str, Any]]] = {}
    for t in tools:
        runs[t] = _spawn_job(t, case.src, work / f"{case.name}.{t}.onnx", repeats, timeout)
        if "error" in runs[t][0]:
            log(f"    {case.name} {t}: {runs[t][0]['error']}")
    if "floor" in runs and "error" not in runs["floor"][0]:
        # The floor runs again after the tools, so that a burst of load on the shared machine during
        # one of its two processes moves its median less.
        runs["floor"] += _spawn_job("floor", case.src, work / f"{case.name}.floor.onnx", repeats, timeout)
    for t in tools:
        ok = [r for r in runs[t] if "error" not in r]
        info: dict[str, Any] = {"runs": ok}
        if not ok:
            info["error"] = runs[t][0]["error"]
            case.jobs[t] = info
            continue
        info["job_s"] = _median([r["job_s"] for r in ok])
        info["fold_s"] = _median([r["fold_s"] for r in ok])
        info["process_s"] = _median([r["process_s"] for r in ok])
        info["peak_mb"] = _median([r["peak_mb"] for r in ok])
        info["imports_mb"] = _median([r["imports_mb"] for r in ok])
        out_path = work / f"{case.name}.{t}.onnx"
        info["path"] = out_path
        try:
            out_model = onnx.load(str(out_path), load_external_data=False)
            info["bn"] = _count(out_model)
            info["nodes"] = len(out_model.graph.node)
            y = _ort_session(out_path, "disable").run(None, {"input": x})[0]
            info["abs_err"], info["rel_err"] = _rel_err(y, ref)
            info["verdict"] = _verdict(info["rel_err"])
        except Exception as e:
            info["verdict"] = _verdict(float("inf"), failed=str(e))
            info["run_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        case.jobs[t] = info
    floor_runs = [r for r in runs.get("floor", []) if "error" not in r]
    for t in tools:
        ok = [r for r in runs[t] if "error" not in r]
        if floor_runs and ok:
            case.jobs[t]["job_over_floor"] = _median([r["job_s"] for r in ok]) / _median(
                [r["job_s"] for r in floor_runs]
            )


def _run_ort_latency(case: ModelCase, tools: Sequence[str], repeats: int, target_s: float) -> None:
    """ORT latency (1 thread), disabled and enabled, of the original, each tool's output and the floor."""
    x = np.random.default_rng(1).standard_normal((1, *case.shape)).astype(np.float32)
    paths: dict[str, Path] = {"original": case.src}
    for t in tools:
        if t != "floor" and case.jobs.get(t, {}).get("verdict") in ("ok", "**WRONG**"):
            paths[t] = case.jobs[t]["path"]
    if case.floor is not None:
        paths["floor"] = case.floor
    for level in ("disable", "enable"):
        fns = {}
        # Every tool's output with optimisations off; with them on, only original / bnfold / floor.
        for v, p in paths.items():
            if level == "enable" and v not in ("original", "bnfold", "floor"):
                continue
            try:
                sess = _ort_session(p, level)
            except Exception:
                continue
            fns[v] = (lambda s: lambda: s.run(None, {"input": x}))(sess)
        k = _calibrate(fns["original"], target_s)
        case.ort[level] = _interleaved(fns, repeats, k)


def _run_eager(case: ModelCase, model: Any, repeats: int, target_s: float, notes: list[str]) -> None:
    """PyTorch eager latency (1 thread) and error of each PyTorch peer against the original module."""
    import torch

    torch.set_num_threads(1)
    variants: dict[str, Any] = {"original": model}
    x_err = torch.randn((2, *case.shape), generator=torch.Generator().manual_seed(0))
    x = torch.randn((1, *case.shape), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x_err).numpy()

    def attempt(name: str, make: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                variants[name] = make()
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:140] if str(e).strip() else ""
            case.eager_err[name] = {"error": f"{type(e).__name__}: {msg}"}

    if hasattr(_try_import("bnfold.fx"), "fold_module"):

        def bnfold_fx() -> Any:
            from bnfold.fx import fold_module

            # example_inputs records the shapes, which lets Linear -> BN1d fold (the skip message asks for it).
            try:
                return fold_module(model, example_inputs=(x,))[0].eval()
            except TypeError:
                return fold_module(model)[0].eval()

        attempt("bnfold", bnfold_fx)
    else:
        case.eager_err["bnfold"] = {"error": "n/a: bnfold.fx.fold_module not available"}

    def fx_fuse() -> Any:
        from torch.fx.experimental.optimization import fuse

        return fuse(copy.deepcopy(model)).eval()

    attempt("fx_fuse", fx_fuse)

    def jit_freeze() -> Any:
        with torch.no_grad():
            scripted = torch.jit.script(copy.deepcopy(model))
            return torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))

    attempt("jit_freeze", jit_freeze)
    variants["floor"] = _strip_bn(model)

    with torch.inference_mode():
        for name, m in variants.items():
            if name in ("original", "floor"):
                continue
            try:
                y = m(x_err).numpy()
                a, r = _rel_err(y, ref)
                case.eager_err[name] = {"abs_err": a, "rel_err": r, "verdict": _verdict(r)}
            except Exception as e:
                case.eager_err[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"}
                variants.pop(name)
        fns = {n: (lambda mm: lambda: mm(x))(m) for n, m in variants.items() if n in TORCH_TOOLS}
        fns = {n: fns[n] for n in TORCH_TOOLS if n in fns}
        k = _calibrate(fns["original"], target_s)
        case.eager = _interleaved(fns, repeats, k)


# --------------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------------


def _machine() -> list[str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for mod in (
        "torch",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "onnxoptimizer",
        "onnxslim",
        "onnxsim",
        "numpy",
    ):
        try:
            versions.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:
            versions.append(f"{mod} (not installed)")
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; " + ", ".join(versions),
        f"- Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]


def _fmt_s(s: float | None) -> str:
    if s is None or not np.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _fmt_r(r: float | None) -> str:
    return "-" if r is None or not np.isfinite(r) else f"{r:.2f}×"


def _fmt_e(e: float | None) -> str:
    if e is None:
        return "-"
    if not np.isfinite(e):
        return "inf"
    return f"{e:.1e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _onnx_rows(cases: Sequence[ModelCase], tools: Sequence[str]) -> list[list[str]]:
    rows = []
    for c in cases:
        lat = c.ort.get("disable", {})
        for t in tools:
            j = c.jobs.get(t)
            if j is None:
                continue
            label = _TOOL_LABEL[t]
            if "error" in j:
                rows.append([c.name, label, "-", "-", "-", "-", "-", "-", "-", "-", f"FAILED ({j['error']})"])
                continue
            lat_r = _pair_ratio(lat[t], lat["original"]) if t in lat and "original" in lat else None
            if t == "floor":
                lat_r = None
            verdict = j.get("verdict", "-")
            if t == "floor":
                verdict = "(reference I/O)"
            if "run_error" in j:
                verdict += f" ({j['run_error']})"
            rows.append(
                [
                    c.name,
                    label,
                    f"{c.bn} → {j.get('bn', '-')}",
                    f"{c.nodes} → {j.get('nodes', '-')}",
                    _fmt_s(j.get("job_s")),
                    _fmt_r(j.get("job_over_floor")),
                    _fmt_s(j.get("fold_s")) if t not in ("floor",) else "-",
                    f"{j['peak_mb']:.0f} MB (+{j['peak_mb'] - j['imports_mb']:.0f})",
                    _fmt_e(j.get("rel_err")) if t != "floor" else "-",
                    _fmt_r(lat_r),
                    verdict,
                ]
            )
    return rows


def _summary_rows(cases: Sequence[ModelCase], tools: Sequence[str]) -> list[list[str]]:
    rows = []
    for t in tools:
        if t == "floor":
            continue
        folded = total = wrong = failed = 0
        ratios, lat_ratios = [], []
        for c in cases:
            j = c.jobs.get(t)
            if j is None:
                continue
            total += c.bn
            if "error" in j or j.get("verdict") == "FAILED":
                failed += 1
                continue
            folded += c.bn - j.get("bn", c.bn)
            wrong += j.get("verdict") == "**WRONG**"
            if j.get("job_over_floor") is not None:
                ratios.append(j["job_over_floor"])
            lat = c.ort.get("disable", {})
            if t in lat and "original" in lat:
                lat_ratios.append(_pair_ratio(lat[t], lat["original"]))
        rows.append(
            [
                _TOOL_LABEL[t],
                f"{folded} / {total}",
                _fmt_r(_median(ratios)) if ratios else "-",
                _fmt_r(_median(lat_ratios)) if lat_ratios else "-",
                f"**{wrong}**" if wrong else "0",
                str(failed),
            ]
        )
    return rows


def _latency_rows(cases: Sequence[ModelCase]) -> list[list[str]]:
    rows = []
    for c in cases:
        row = [c.name]
        for level in ("disable", "enable"):
            s = c.ort.get(level, {})
            o, f, fl = s.get("original"), s.get("bnfold"), s.get("floor")
            row += [
                _fmt_s(_median(o)) if o else "-",
                _fmt_s(_median(f)) if f else "-",
                _fmt_s(_median(fl)) if fl else "-",
                _fmt_r(_pair_ratio(f, o)) if f and o else "-",
                _fmt_r(_pair_ratio(f, fl)) if f and fl else "-",
            ]
        rows.append(row)
    return rows


def _eager_rows(cases: Sequence[ModelCase]) -> list[list[str]]:
    rows = []
    for c in cases:
        if not c.eager:
            continue
        o = c.eager["original"]
        row = [c.name, _fmt_s(_median(o))]
        for v in TORCH_TOOLS[1:]:
            s = c.eager.get(v)
            e = c.eager_err.get(v, {})
            if s is None:
                err = e.get("error", "n/a")
                row.append(err if err.startswith("n/a") else f"FAILED ({err})")
                continue
            cell = _fmt_r(_pair_ratio(s, o))
            if v != "floor":
                cell += f", err {_fmt_e(e.get('rel_err'))}"
                if e.get("verdict") == "**WRONG**":
                    cell += " **WRONG**"
            row.append(cell)
        f, fl = c.eager.get("bnfold"), c.eager.get("floor")
        row.append(_fmt_r(_pair_ratio(f, fl)) if f and fl else "-")
        rows.append(row)
    return rows


def _chain_rows(chains: Sequence[ModelCase], tools: Sequence[str]) -> list[list[str]]:
    if len(chains) < 2:
        return []
    small, big = chains[0], chains[-1]
    rows = []
    for t in tools:
        a, b = small.jobs.get(t, {}), big.jobs.get(t, {})
        cells = [_TOOL_LABEL[t]]
        for j in (a, b):
            if "error" in j or "fold_s" not in j:
                cells += [f"FAILED ({j.get('error', 'n/a')})", "-"]
                continue
            left = f"{j.get('bn', '-')} BN left"
            if j.get("verdict") == "**WRONG**":
                left += f", **WRONG** (rel err {_fmt_e(j.get('rel_err'))})"
            cells += [f"{_fmt_s(j['job_s'])} (fold {_fmt_s(j['fold_s'])})", left]
        if "fold_s" in a and "fold_s" in b and a["job_s"] > 0:
            cells.append(_fmt_r(b["job_s"] / a["job_s"]))
        else:
            cells.append("-")
        rows.append(cells)
    return rows


def _plot(cases: Sequence[ModelCase], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("onnxruntime, optimisations disabled (1 thread)", lambda c: c.ort.get("disable", {})),
        ("onnxruntime, optimisations enabled (1 thread)", lambda c: c.ort.get("enable", {})),
        ("PyTorch eager (1 thread)", lambda c: c.eager),
    ]
    variants = [
        ("original", "original", "#9e9e9e"),
        ("bnfold", "bnfold folded", "#1f77b4"),
        ("floor", "floor (no BN)", "#2ca02c"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.2 * len(cases) + 2), 3.2 * len(panels)))
    for ax, (title, get) in zip(axes, panels):
        names = [c for c in cases if get(c).get("original")]
        xs = np.arange(len(names))
        width = 0.27
        for i, (key, label, color) in enumerate(variants):
            vals = []
            for c in names:
                s = get(c)
                vals.append(_pair_ratio(s[key], s["original"]) if key in s else np.nan)
            ax.bar(xs + (i - 1) * width, vals, width, label=label, color=color)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{c.name}\n{_fmt_s(_median(get(c)['original']))}" for c in names], fontsize=8)
        ax.set_ylabel("latency / original")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper right", ncols=3)
        top = max(
            [1.2]
            + [float(np.nanmax(p.get_height())) * 1.1 for p in ax.patches if np.isfinite(p.get_height())]
        )
        ax.set_ylim(0, min(max(top, 1.4), 3.0))
    fig.suptitle(
        f"Latency before / after bnfold / floor (median, ratios pair by pair)\n{machine}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_report(
    out: Path,
    cases: Sequence[ModelCase],
    chains: Sequence[ModelCase],
    tools: Sequence[str],
    notes: Sequence[str],
    args: argparse.Namespace,
    seconds: float,
) -> Path:
    machine = _machine()
    lines = ["# bnfold next to its peers", ""]
    lines += [
        "Generated by `python benchmarks/bench_peers.py" + (" --quick" if args.quick else "") + "` "
        f"in {seconds:.0f} s. Same files, same run; medians of {args.repeats} whole jobs and "
        f"{args.lat_repeats} latency samples (latency ratios: medians of the per-sample ratios). "
        "The machine is shared and noisy: trust the ratios, not the seconds.",
        "",
        "## Machine",
        "",
        *machine,
        "",
        f"Correctness: each output runs in onnxruntime with optimisations disabled on the same seeded batch-2 "
        f"input as the original; rel err = max |out - ref| / max |ref|; above {WRONG_REL_ERR:g} it is marked "
        "**WRONG** (shown, never hidden).",
        "",
        "## Summary per ONNX tool (all models)",
        "",
    ]
    lines += _table(
        [
            "tool",
            "BN folded",
            "job / floor (median over models)",
            "ORT-off latency of output / original",
            "WRONG",
            "failed",
        ],
        _summary_rows(cases, tools),
    )
    lines += [
        "",
        "## ONNX: whole job (load + fold + save) per model and tool",
        "",
        "`job` = load + fold + save timed inside a fresh process after its imports (onnxruntime offline: session "
        "creation with `optimized_model_filepath`); `job/floor` = median job over the median of plain "
        "`onnx.load` + `onnx.save` (run before and after the tools); "
        "peak = the process's peak RSS (imports included; + what the job added); latency = the output's "
        "onnxruntime latency with optimisations disabled over the original's.",
        "",
    ]
    lines += _table(
        [
            "model",
            "tool",
            "BN",
            "nodes",
            "job",
            "job/floor",
            "fold alone",
            "peak RSS",
            "rel err",
            "ORT-off latency",
            "result",
        ],
        _onnx_rows(cases, tools),
    )
    lines += [
        "",
        "## Inference latency in onnxruntime (batch 1, 1 thread): original, bnfold, floor",
        "",
        "floor = the same network with every BN replaced by identity (a perfect fold's latency; its outputs differ).",
        "",
    ]
    lines += _table(
        [
            "model",
            "off: original",
            "off: bnfold",
            "off: floor",
            "off: bnfold/orig",
            "off: bnfold/floor",
            "on: original",
            "on: bnfold",
            "on: floor",
            "on: bnfold/orig",
            "on: bnfold/floor",
        ],
        _latency_rows(cases),
    )
    eager = _eager_rows(cases)
    if eager:
        lines += [
            "",
            "## PyTorch eager (batch 1, 1 thread): latency / original, and rel err against the original module",
            "",
        ]
        lines += _table(
            ["model", "original", *[_TORCH_LABEL[v] for v in TORCH_TOOLS[1:]], "bnfold / floor"],
            eager,
        )
    chain_rows = _chain_rows(chains, tools)
    if chain_rows:
        a, b = chains[0], chains[-1]
        lines += [
            "",
            f"## Scaling: synthetic chain of {a.bn} and {b.bn} Conv->BN pairs (4 channels)",
            "",
        ]
        lines += _table(
            [
                "tool",
                f"{a.bn} pairs: job",
                f"{a.bn}: result",
                f"{b.bn} pairs: job",
                f"{b.bn}: result",
                f"{b.bn}/{a.bn} job",
            ],
            chain_rows,
        )
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "peers.md"
    md.write_text("\n".join(lines))
    if cases and not args.no_plot:
        try:
            _plot(cases, out / "latency.png", machine[0].removeprefix("- "))
        except ImportError as e:
            md.write_text(md.read_text() + f"\n- plot skipped: {e}\n")
    return md


# --------------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="2 small models, small inputs, 2 repeats (< 60 s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    p.add_argument("--models", default=None, help="comma-separated zoo names (default: all)")
    p.add_argument("--tools", default=None, help=f"comma-separated ONNX tools among {','.join(ONNX_TOOLS)}")
    p.add_argument("--repeats", type=int, default=None, help="whole-job repeats per model and tool")
    p.add_argument("--lat-repeats", type=int, default=None, help="latency samples per variant (>= 5)")
    p.add_argument("--chain", default=None, help="chain depths, e.g. 600,6000; 'none' to skip")
    p.add_argument("--no-dynamo", action="store_true", help="skip the dynamo-exported model")
    p.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager measurements")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--job", nargs=4, metavar=("TOOL", "SRC", "DST", "REPEATS"), help=argparse.SUPPRESS)
    p.add_argument("--export-dynamo", nargs=3, metavar=("NAME", "SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.lat_repeats is None:
        args.lat_repeats = 5 if args.quick else 7
    if args.chain is None:
        args.chain = "none" if args.quick else "600,6000"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite (or, with the hidden ``--job``, one child job) and write the report."""
    args = _parse(argv)
    if args.job:
        tool, src, dst, reps = args.job
        print(json.dumps(run_job(tool, src, dst, int(reps))))
        return 0
    if args.export_dynamo:
        name, shape, folder = args.export_dynamo
        _export_dynamo_child(name, tuple(int(s) for s in shape.split("x")), folder)
        return 0

    import onnx
    import torch

    from models import zoo

    start = time.perf_counter()
    torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    names = [n for n in names if n in zoo.ZOO]
    wanted = args.tools.split(",") if args.tools else ONNX_TOOLS
    tools, notes = _available_onnx_tools(wanted)
    if "floor" not in tools:
        tools.insert(0, "floor")
    shapes = zoo.SMALL_SHAPES if args.quick else {n: s for n, (_, s) in zoo.ZOO.items()}
    target_s = 0.004 if args.quick else 0.01
    cases: list[ModelCase] = []
    chains: list[ModelCase] = []
    modules: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bnfold_bench_") as tmp:
        work = Path(tmp)
        for name in names:
            model = zoo.build(name)
            shape = tuple(shapes[name])
            x = torch.randn(1, *shape)
            src, floor = work / f"{name}.onnx", work / f"{name}_floor.onnx"
            _export_legacy(model, x, src)
            _export_legacy(_strip_bn(model), x, floor)
            m = onnx.load(str(src))
            case = ModelCase(
                name, src, floor, shape, _count(m), len(m.graph.node), src.stat().st_size / 2**20
            )
            if case.bn == 0:
                notes.append(f"{name}: the export holds no BatchNormalization node; skipped")
                continue
            cases.append(case)
            modules[name] = model
        if not args.no_dynamo and not args.quick and DYNAMO_MODEL in names:
            shape = tuple(shapes[DYNAMO_MODEL])
            log(f"dynamo export of {DYNAMO_MODEL} (optimize=False)")
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--export-dynamo", DYNAMO_MODEL,
                 "x".join(map(str, shape)), str(work)],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            src = work / f"{DYNAMO_MODEL}_dynamo.onnx"
            if proc.returncode == 0 and src.exists():
                notes.append(
                    f"{DYNAMO_MODEL} (dynamo): exported with `dynamo=True, optimize=False`; the exporter builds each "
                    "missing conv bias at run time (Shape/Expand/CastLike), and so it does in the floor model too "
                    "(zero biases), so there the floor is not a lower bound: bnfold also turns those biases into "
                    "constants."
                )
                m = onnx.load(str(src))
                cases.append(
                    ModelCase(f"{DYNAMO_MODEL} (dynamo)", src, work / f"{DYNAMO_MODEL}_dynamo_floor.onnx", shape,
                              _count(m), len(m.graph.node), src.stat().st_size / 2**20)
                )  # fmt: skip
            else:
                notes.append(f"dynamo export failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:160]}")
        log(f"exported {len(cases)} models; tools: {', '.join(tools)}")
        for case in cases:
            log(f"{case.name}: {case.bn} BN, {case.nodes} nodes, {case.size_mb:.1f} MB - jobs")
            _run_onnx_jobs(case, tools, args.repeats, work, log)
            log(f"{case.name}: onnxruntime latency")
            _run_ort_latency(case, tools, args.lat_repeats, target_s)
            if not args.no_eager and case.name in modules:
                log(f"{case.name}: PyTorch eager")
                _run_eager(case, modules[case.name], args.lat_repeats, target_s, notes)
        if args.chain != "none":
            for depth in (int(d) for d in args.chain.split(",")):
                src = work / f"chain{depth}.onnx"
                chain = build_chain(depth)
                onnx.save(chain, str(src))
                case = ModelCase(f"chain{depth}", src, None, (4, 8, 8), depth, len(chain.graph.node))
                log(f"chain of {depth} pairs - jobs")
                chain_tools = [t for t in tools if not chains or "error" not in chains[-1].jobs.get(t, {})]
                _run_onnx_jobs(case, chain_tools, 1, work, log, CHAIN_TIMEOUT_S)
                for t in tools:
                    if t not in chain_tools:
                        case.jobs[t] = {"error": f"not run: failed on {chains[-1].name}"}
                chains.append(case)
        for c in cases:
            for t, j in c.jobs.items():
                if j.get("verdict") == "**WRONG**":
                    notes.append(
                        f"{_TOOL_LABEL[t]} gave WRONG outputs on {c.name} (rel err {_fmt_e(j['rel_err'])})"
                    )
            for v, e in c.eager_err.items():
                if e.get("verdict") == "**WRONG**":
                    notes.append(
                        f"{_TORCH_LABEL[v]} gave WRONG outputs on {c.name} (rel err {_fmt_e(e['rel_err'])})"
                    )
        md = _write_report(args.out, cases, chains, tools, notes, args, time.perf_counter() - start)
    log(f"wrote {md}" + ("" if args.no_plot else f" and {args.out / 'latency.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
