"""Peak memory and time of verifying a folded ONNX model over 2 GiB, against a floor.

The model: a Conv+BN (folded) next to an embedding table of ``--gib`` GiB (a sparse external-data file,
so building it costs no disk). Each measurement runs in a fresh subprocess (peak resident memory from
``ru_maxrss``); the runs are interleaved (floor, bnfold, floor, ...) and each figure is a median.

* floor: what any verification must hold: the model loaded (``onnx.load``) and the two onnxruntime
  sessions (reference from the file, candidate from a file with external data) run once;
* bnfold: ``onnx.load`` + ``fold_model(inplace=True)`` + ``bnfold.verify(path, folded)`` (the
  candidate written to a temporary file with external data, tensor by tensor).

The ratio bnfold / floor is printed (target: about 1.0; the folded model itself is not copied).

    python benchmarks/bench_verify_external.py              # 2.1 GiB, 1 run each
    python benchmarks/bench_verify_external.py --gib 0.5 --runs 3
    python benchmarks/bench_verify_external.py --quick      # 0.25 GiB (not over 2 GiB: a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import env_summary  # noqa: E402

_BUILD = r"""
import sys, numpy as np, onnx
from onnx import TensorProto as T, helper as h, numpy_helper as nh
folder, gib = sys.argv[1], float(sys.argv[2])
dim = 1024
rows = int(gib * 2**30) // (dim * 4)
nbytes = rows * dim * 4
with open(f"{folder}/big.onnx.data", "wb") as f:
    f.truncate(nbytes)
table = onnx.TensorProto(name="table", data_type=T.FLOAT, dims=[rows, dim])
table.data_location = T.EXTERNAL
for k, v in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(nbytes))):
    e = table.external_data.add(); e.key, e.value = k, v
rng = np.random.default_rng(0)
small = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
         nh.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
         nh.from_array(rng.uniform(-0.5, 0.5, 4).astype(np.float32), "b"),
         nh.from_array(rng.uniform(-0.8, 0.8, 4).astype(np.float32), "m"),
         nh.from_array(rng.uniform(0.3, 2.5, 4).astype(np.float32), "v"),
         nh.from_array(np.array([3, 7], np.int64), "idx")]
nodes = [h.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         h.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
         h.make_node("Gather", ["table", "idx"], ["e"])]
g = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                 [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8]),
                  h.make_tensor_value_info("e", T.FLOAT, [2, dim])], [*small, table])
open(f"{folder}/big.onnx", "wb").write(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8).SerializeToString())
"""

_FLOOR = r"""
import os, sys, time, resource, json, numpy as np, onnx, onnxruntime as ort
src = sys.argv[1]
t = time.perf_counter()
model = onnx.load(src)
x = {"x": np.ones((1, 3, 8, 8), np.float32)}
so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
a = ort.InferenceSession(src, so).run(None, x)
b = ort.InferenceSession(src, so).run(None, x)  # stands for the candidate's session
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "s": time.perf_counter() - t}))
"""

_BNFOLD = r"""
import sys, time, resource, json, onnx
sys.path.insert(0, sys.argv[2])
from bnfold.onnx import fold_model
from bnfold.verification import verify
src = sys.argv[1]
t = time.perf_counter()
model = onnx.load(src)
folded, rep = fold_model(model, inplace=True)
assert rep.folded == 1
report = verify(src, folded)
assert report.passed
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "s": time.perf_counter() - t}))
"""


def _measure(code: str, *args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.1, help="size of the embedding table in GiB")
    p.add_argument("--runs", type=int, default=1, help="runs of each measurement (interleaved)")
    p.add_argument("--quick", action="store_true", help="0.25 GiB, one run (a smoke run, not over 2 GiB)")
    args = p.parse_args()
    if args.quick:
        args.gib, args.runs = 0.25, 1
    print(env_summary())
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as folder:
        subprocess.run([sys.executable, "-c", _BUILD, folder, str(args.gib)], check=True)
        src = os.path.join(folder, "big.onnx")
        floor: list[dict[str, float]] = []
        ours: list[dict[str, float]] = []
        for _ in range(args.runs):
            floor.append(_measure(_FLOOR, src))
            ours.append(_measure(_BNFOLD, src, ROOT))
    fp, op = statistics.median(r["peak"] for r in floor), statistics.median(r["peak"] for r in ours)
    fs, os_ = statistics.median(r["s"] for r in floor), statistics.median(r["s"] for r in ours)
    print(f"model: {args.gib:.2f} GiB of weights (external data), {args.runs} run(s) each, medians")
    print(f"peak RSS  floor {fp / 2**30:.2f} GiB   bnfold {op / 2**30:.2f} GiB   ratio {op / fp:.2f}")
    print(f"time      floor {fs:.1f} s   bnfold {os_:.1f} s   ratio {os_ / fs:.2f}")


if __name__ == "__main__":
    main()
