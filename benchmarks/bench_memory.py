"""Peak memory of ``bnfold inspect`` / ``fold --no-verify`` / ``fold`` against ``onnx.load`` + ``onnx.save``.

The model: a chain of 1x1 Conv -> BatchNormalization blocks with random float32 weights (seeded,
scaled by 1/sqrt(C)) and realistic BN statistics (mean != 0, var != 1, gamma != 1, beta != 0), in two
layouts: the weights in one external-data file, and inline in the ``.onnx`` file (kept under
protobuf's 2 GiB).

Every job runs in a fresh process and its peak RSS is ``ru_maxrss`` of that process, taken by a
small launcher (``common.run_job``: the figure is the job's own, not the benchmark's). Jobs:

* ``onnx load+save`` -- the floor of issue 28: ``onnx.load(path)`` then ``onnx.save`` of the same
  model in the same layout (external data in, external data out);
* ``bnfold inspect`` -- the dry run: it writes nothing;
* ``bnfold fold --no-verify`` -- load, check, fold, save;
* ``bnfold fold`` -- the same, verified with onnxruntime (reference: the source file, candidate: the
  staged output). ``ru_maxrss`` is per process: when onnxruntime runs in a child process of the job,
  the figure is the larger of the two, not their sum.

Ratios: ``peak / floor`` (the issue's figure; targets: inspect and fold --no-verify <= 1.2x, fold
<= 1.5x), and a *net* ratio that subtracts each job's fixed cost (interpreter, imports), measured by
running the same job on a 1 MB model of the same shape: at a few hundred MB the imports
(onnxruntime, numpy) are a visible part of the peak, at 2.4 GB they are not.

    python benchmarks/bench_memory.py [--quick] [--gb 0.4] [--layouts external,inline] [--repeats 1]
                                      [--compare-with /path/to/old/checkout]
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_repo_on_path, env_summary, make_parser, markdown_table, run_job  # noqa: E402

ensure_repo_on_path()

GIB = 2**30
MIB = 2**20
TARGETS = {"bnfold inspect": 1.2, "bnfold fold --no-verify": 1.2, "bnfold fold": 1.5}


def build_model(folder: Path, total_bytes: int, *, external: bool, blocks: int = 4) -> Path:
    """``model.onnx`` (+ ``model.onnx.data`` when ``external``): ``blocks`` x (Conv 1x1 [C, C] -> BN)."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    c = max(4, int(math.sqrt(total_bytes / blocks / 4)))
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    nodes, inits = [], []
    offset = 0
    x = "x"
    data = open(folder / data_name, "wb") if external else None
    try:
        for i in range(blocks):
            w = rng.standard_normal((c, c, 1, 1), dtype=np.float32)
            w *= np.float32(1 / math.sqrt(c))
            if data is not None:
                t = onnx.TensorProto()
                t.name, t.data_type = f"W{i}", T.FLOAT
                t.dims.extend(w.shape)
                t.data_location = T.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                data.write(w.tobytes())
                offset += w.nbytes
            else:
                t = nh.from_array(w, f"W{i}")
            del w
            inits.append(t)
            stats = [rng.uniform(0.5, 2.0, c), rng.normal(0.3, 0.5, c), rng.normal(0.5, 1.0, c),
                     rng.uniform(0.3, 3.0, c)]
            names = [f"{k}{i}" for k in ("scale", "bias", "mean", "var")]
            inits += [nh.from_array(v.astype(np.float32), n) for v, n in zip(stats, names)]
            nodes.append(h.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}"))
            nodes.append(h.make_node("BatchNormalization", [f"c{i}", *names], [f"y{i}"], name=f"bn{i}"))
            x = f"y{i}"
    finally:
        if data is not None:
            data.close()
    g = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, [1, c, 1, 1])],
                     [h.make_tensor_value_info(x, T.FLOAT, [1, c, 1, 1])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    path = folder / "model.onnx"
    path.write_bytes(m.SerializeToString())
    return path


FLOOR = """
import sys, onnx
m = onnx.load(sys.argv[1])
onnx.save(m, sys.argv[2], save_as_external_data=sys.argv[3] == "external", location="out.onnx.data")
"""


def _jobs(src: Path, out: Path, layout: str) -> dict[str, list[str]]:
    bnfold = [sys.executable, "-m", "bnfold"]
    dst = str(out / "out.onnx")
    return {
        "onnx load+save": [sys.executable, "-c", FLOOR, str(src), dst, layout],
        "bnfold inspect": [*bnfold, "inspect", str(src)],
        "bnfold fold --no-verify": [*bnfold, "fold", str(src), "-o", dst, "--no-verify"],
        "bnfold fold": [*bnfold, "fold", str(src), "-o", dst],
    }


def _measure(jobs: dict[str, list[str]], out: Path, repeats: int, env: dict[str, str] | None,
             cwd: Path | None) -> tuple[dict[str, int], dict[str, float]]:
    """Median peak RSS and wall time of each job, in interleaved rounds."""
    peaks: dict[str, list[int]] = {k: [] for k in jobs}
    secs: dict[str, list[float]] = {k: [] for k in jobs}
    names = list(jobs)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order each round
            res = run_job(jobs[name], env=env, cwd=cwd, timeout=1800)
            if res.returncode != 0:
                raise SystemExit(f"{name} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
            peaks[name].append(res.peak_rss)
            secs[name].append(res.seconds)
            shutil.rmtree(out)
            out.mkdir()
    return ({k: int(statistics.median(v)) for k, v in peaks.items()},
            {k: statistics.median(v) for k, v in secs.items()})


def main() -> None:
    parser = make_parser("Peak RSS of bnfold inspect / fold against onnx.load + onnx.save", repeats=1, quick_repeats=1)
    parser.add_argument("--gb", type=float, default=None, help="model size in GB (default 0.4; --quick 0.1)")
    parser.add_argument("--layouts", default="external,inline",
                        help="comma-separated: external (weights in a .data file), inline (in the .onnx file)")
    parser.add_argument("--folder", default=None, help="where to build the models (default: a temp folder)")
    parser.add_argument("--compare-with", default=None, metavar="REPO",
                        help="also run the bnfold jobs from another checkout (e.g. an older commit), side by side")
    args = parser.parse_args()
    gb = args.gb if args.gb is not None else (0.1 if args.quick else 0.4)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - {"external", "inline"}:
        parser.error("--layouts takes external and/or inline")
    if "inline" in layouts and gb * 1e9 >= 2**31 - 2**26:
        parser.error("an inline model must stay under 2 GiB (protobuf): use --layouts external")
    repeats = max(1, min(args.repeats, 5))
    print(env_summary())
    work = Path(tempfile.mkdtemp(prefix="bnfold-mem-", dir=args.folder))
    other = Path(args.compare_with).resolve() if args.compare_with else None
    try:
        for layout in layouts:
            src = build_model(work / layout, int(gb * 1e9), external=layout == "external")
            tiny = build_model(work / f"{layout}-tiny", 2**20, external=layout == "external")
            out = work / "out"
            out.mkdir()
            peak, secs = _measure(_jobs(src, out, layout), out, repeats, None, None)
            fixed, _ = _measure(_jobs(tiny, out, layout), out, 1, None, None)
            rows_from = {"": (peak, secs, fixed)}
            if other is not None:
                jobs = {k: v for k, v in _jobs(src, out, layout).items() if k != "onnx load+save"}
                env = {"PYTHONPATH": str(other)}
                o_peak, o_secs = _measure(jobs, out, repeats, env, other)
                o_fixed, _ = _measure({k: v for k, v in _jobs(tiny, out, layout).items() if k in jobs},
                                      out, 1, env, other)
                rows_from[f" ({other.name})"] = (o_peak, o_secs, o_fixed)
            shutil.rmtree(out)
            floor, floor_fixed = peak["onnx load+save"], fixed["onnx load+save"]
            rows = []
            for suffix, (p, s, f) in rows_from.items():
                for name in p:
                    if suffix and name == "onnx load+save":
                        continue
                    target = TARGETS.get(name)
                    rows.append([
                        name + suffix, f"{p[name] / GIB:.2f} GiB", f"{p[name] / floor:.2f}x",
                        f"{(p[name] - f[name]) / max(1, floor - floor_fixed):.2f}x",
                        f"<= {target:.1f}x" if target else "", f"{f[name] / MIB:.0f} MiB", f"{s[name]:.1f} s",
                    ])
            size = sum(f.stat().st_size for f in src.parent.iterdir())
            print(f"\nModel: {size / GIB:.2f} GiB of float32 weights, {layout} "
                  f"({'a .data file' if layout == 'external' else 'inside the .onnx file'}; 4 Conv 1x1 -> BN "
                  f"blocks), median of {repeats} run(s), peak RSS of each job\n")
            print(markdown_table(["job", "peak RSS", "vs load+save", "net vs load+save", "target", "fixed cost",
                                  "wall"], rows))
            shutil.rmtree(src.parent)
            shutil.rmtree(tiny.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
