"""Benchmark the ONNX fold: whole job vs a plain load + save, the fold alone, scaling, peak memory.

Measured side by side in one run (medians of ``--repeats`` runs; quote the ratios, not the seconds):

* **floor**: a process that does ``onnx.save(onnx.load(f), g)``;
* **bnfold**: a process that does ``onnx.load`` + ``bnfold.onnx.fold_model(inplace=True)`` + ``onnx.save``;
* **onnxscript** (where installed): the same with onnxscript's BN rewrite rules (Conv, ConvTranspose,
  Gemm); **ort**: onnxruntime's own offline optimisation (BASIC level, optimised model saved);
* for each job: the job's own time (inside the process, after imports), the whole process wall time
  (what a CLI user waits for: interpreter start and imports included) and the peak RSS
  (``VmHWM`` of the job process; ``ru_maxrss`` where /proc is missing);
* the fold alone, in memory, on ResNet-50 (53 BN), interleaved with its floor, a **plain copy of the
  weights** the fold rewrites (each read out of the ModelProto into NumPy and written back as new
  bytes, nothing computed): the fold's ratio to it is what the arithmetic and the matching cost.
  Three folds: ``bnfold.fold(proto)`` (functional, flush of denormals on: what a user calls),
  ``fold_model(proto, flush_denormals=True)`` (the same with the flush at write time) and the
  in-place ``fold_model``;
* linearity: the fold of a 6000-pair Conv->BN chain vs a 600-pair chain (ratio should be ~10).

The ResNet-50 comes from ``models.resnet.resnet50`` exported with the legacy exporter keeping every BN
(``do_constant_folding=False``, ``training=PRESERVE``). ``--quick`` uses a narrow ResNet-50, fewer
repeats and a 60/600 chain (smoke test, < 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

JOBS = {
    "floor": """
import onnx
m = onnx.load(SRC)
onnx.save(m, DST)
""",
    "bnfold": """
from bnfold import io
from bnfold.onnx import fold_model
m = io.load(SRC)  # one parse, checker included
fold_model(m, inplace=True)
io.save(m, DST)  # atomic, streamed
""",
    "bnfold-cli": """
import sys
from bnfold.cli import main
sys.argv = ["bnfold", "fold", SRC, "-o", DST, "--no-verify", "--quiet"]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
""",
    "onnxscript": """
import onnx
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule)
m = onnx.load(SRC)
m = rewrite(m, [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
                fuse_batchnorm_into_gemm_rule])
onnx.save(m, DST)
""",
    "ort": """
import onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
so.optimized_model_filepath = DST
ort.InferenceSession(SRC, so, providers=["CPUExecutionProvider"])
""",
}

_WRAP = """
import json, resource, sys, time
SRC, DST = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
{imports_and_job}
t1 = time.perf_counter()
# VmHWM: peak RSS of this process image (ru_maxrss would also count the parent's pages at fork time)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")]
rss = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"job_s": t1 - t0, "maxrss_kb": rss}}))
"""


def _available(job: str) -> bool:
    mod = {"onnxscript": "onnxscript", "ort": "onnxruntime"}.get(job)
    if mod is None:
        return True
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def run_job(job: str, src: Path, dst: Path) -> dict[str, float]:
    """Run one job in a fresh process; return its job time, whole-process wall time and peak RSS."""
    code = _WRAP.format(imports_and_job=JOBS[job])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True, env=env, check=True
    )
    wall = time.perf_counter() - t0
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return {"job_s": rec["job_s"], "wall_s": wall, "maxrss_mb": rec["maxrss_kb"] / 1024}


def build_resnet50(path: Path, quick: bool) -> None:
    import onnx
    import torch

    sys.path.insert(0, str(ROOT))
    from models.resnet import resnet50
    from models.stats import randomize_bn

    torch.manual_seed(0)
    model = randomize_bn(resnet50(num_classes=1000, **({"width": 16} if quick else {})), 0).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
    )
    m = onnx.load(path)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert n_bn == 53, f"expected 53 BN, got {n_bn}"


def chain_model(pairs: int):  # type: ignore[no-untyped-def]
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    cur = "x"
    for i in range(pairs):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"t{i}"], name=f"conv{i}"))
        names = [f"bn{i}.{k}" for k in "gbmv"]
        for n, v in zip(
            names,
            (
                rng.uniform(0.5, 1.5, 4),
                rng.uniform(-0.5, 0.5, 4),
                rng.uniform(-0.5, 0.5, 4),
                rng.uniform(0.3, 2.0, 4),
            ),
        ):
            inits.append(numpy_helper.from_array(v.astype(np.float32), n))
        cur = f"y{i}"
        nodes.append(helper.make_node("BatchNormalization", [f"t{i}", *names], [cur], name=f"bn{i}"))
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _folded_weights(model) -> list[str]:  # type: ignore[no-untyped-def]
    """Names of the initializers a fold of ``model`` rewrites (inputs 1 and 2 of the folded layers)."""
    from bnfold.onnx import fold_model

    _, rep = fold_model(model, dry_run=True)
    targets = {s.target for s in rep.sites}
    inits = {t.name for t in model.graph.initializer}
    return [v for n in model.graph.node if n.name in targets for v in n.input[1:3] if v in inits]


def copy_weights(model, names: set[str]) -> None:  # type: ignore[no-untyped-def]
    """The floor: read each named initializer into NumPy and write it back as new bytes."""
    import numpy as np
    from onnx import helper

    for t in model.graph.initializer:
        if t.name in names:
            a = np.frombuffer(t.raw_data, dtype=helper.tensor_dtype_to_np_dtype(t.data_type))
            t.raw_data = a.tobytes()


# The in-memory contenders, each a function of a freshly parsed ModelProto (timed alone).
def _contenders():  # type: ignore[no-untyped-def]
    import bnfold
    from bnfold.onnx import fold_model

    return {
        # what a user calls: functional (the input is left as it is), flush of denormals on
        "bnfold.fold": lambda m: bnfold.fold(m),
        # the same fold with the flush done as each tensor is written (what bnfold.fold does once
        # api.fold_with_report passes flush_denormals to the backend)
        "fold_model(flush)": lambda m: fold_model(m, flush_denormals=True),
        "fold_model(inplace)": lambda m: fold_model(m, inplace=True),
    }


def time_fold_vs_copy(data: bytes, repeats: int) -> dict[str, float]:
    """Medians of the in-memory folds and of the plain copy of the same weights, interleaved."""
    import onnx

    names = set(_folded_weights(onnx.load_from_string(data)))
    jobs = {"copy": lambda m: copy_weights(m, names), **_contenders()}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, job in jobs.items():
            m = onnx.load_from_string(data)
            t0 = time.perf_counter()
            job(m)
            times[k].append(time.perf_counter() - t0)
            del m
    return {k: statistics.median(v) for k, v in times.items()}


def time_fold(make, repeats: int) -> float:  # type: ignore[no-untyped-def]
    from bnfold.onnx import fold_model

    times = []
    for _ in range(repeats):
        m = make()
        t0 = time.perf_counter()
        fold_model(m, inplace=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, few repeats (smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--fold-only", action="store_true", help="only the in-memory fold vs the weight copy")
    ap.add_argument("--model", type=Path, default=None, help="use this .onnx instead of exporting ResNet-50")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    sys.path.insert(0, str(ROOT))
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        src = args.model or Path(tmp) / "resnet50.onnx"
        if args.model is None:
            t0 = time.perf_counter()
            build_resnet50(src, args.quick)
            print(
                f"exported ResNet-50{' (narrow)' if args.quick else ''} in {time.perf_counter() - t0:.1f}s: "
                f"{src.stat().st_size / 1e6:.1f} MB"
            )
        dst = Path(tmp) / "out.onnx"

        # The fold alone, in memory.
        data = src.read_bytes()
        med = time_fold_vs_copy(data, repeats)
        from bnfold.onnx import fold_model

        _, rep = fold_model(onnx.load_from_string(data), inplace=True)
        t_copy = med.pop("copy")
        print(
            f"fold in memory ({rep.folded}/{rep.bn_before} BN folded), medians of {repeats} interleaved runs; "
            f"floor: plain copy of the weights it rewrites {t_copy * 1e3:.1f} ms"
        )
        for k, t in med.items():
            print(f"  {k:<22}{t * 1e3:>8.1f} ms  x floor {t / t_copy:5.2f}")
        if args.fold_only:
            return

        # Whole jobs, each in a fresh process, interleaved so that machine noise hits all alike.
        jobs = [j for j in JOBS if _available(j)]
        res: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
        for _ in range(repeats):
            for j in jobs:
                try:
                    res[j].append(run_job(j, src, dst))
                except subprocess.CalledProcessError as e:
                    print(f"{j}: failed ({e.stderr.strip().splitlines()[-1] if e.stderr else e})")
                    jobs.remove(j)
                    res.pop(j)
        med = {j: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for j, rs in res.items() if rs}
        floor = med["floor"]
        print(
            f"\n{'job':<12}{'job s':>9}{'x floor':>9}{'process s':>11}{'x floor':>9}{'peak MB':>9}{'x floor':>9}"
        )
        for j, r in med.items():
            print(
                f"{j:<12}{r['job_s']:>9.3f}{r['job_s'] / floor['job_s']:>9.2f}{r['wall_s']:>11.3f}"
                f"{r['wall_s'] / floor['wall_s']:>9.2f}{r['maxrss_mb']:>9.0f}{r['maxrss_mb'] / floor['maxrss_mb']:>9.2f}"
            )

        # Linearity.
        small, big = (60, 600) if args.quick else (600, 6000)
        t_small = time_fold(lambda: chain_model(small), repeats)
        t_big = time_fold(lambda: chain_model(big), repeats)
        print(
            f"\nchain fold: {small} pairs {t_small * 1e3:.1f} ms, {big} pairs {t_big * 1e3:.1f} ms, "
            f"ratio {t_big / t_small:.1f} (10 = linear)"
        )


if __name__ == "__main__":
    main()
