"""Peak memory of ``bnfold fold --no-verify`` on large ONNX models, against plain ``onnx.load`` + ``onnx.save``.

The model: a chain of 1x1 Conv -> BatchNormalization blocks whose weights live in one external-data
file. The data file is *sparse* (``truncate``, zero weights): a multi-GB model costs no disk and no
time to build; reading it still moves every byte through memory, as a real model would. The BN
statistics are realistic (mean != 0, var != 1, gamma != 1, beta != 0) and inline.

Candidates, each in a fresh subprocess (peak RSS of that job only, see ``common.run_job``), in
interleaved order, median of the repeats:

* ``onnx load+save`` -- the floor: ``onnx.load(path)`` then ``onnx.save(model, out)`` (inline below
  2 GiB, with external data above: what a user's script writes);
* ``onnx load+save (external data)`` -- the same, saving with ``save_as_external_data=True``;
* ``bnfold fold --no-verify`` -- the whole CLI job (load, check, fold, streamed save);
* with ``--compare-with REPO``: the same CLI job run from another checkout (e.g. the commit before a
  change), side by side.

The ratio ``bnfold / floor`` is the figure (target: <= 1.2). ``--gb`` sets the model size; the
default 1.9 GB is the case of issue 12; ``--quick`` uses 0.2 GB. Output files are removed after
each job (they are real, not sparse).

    python benchmarks/bench_memory.py [--quick] [--gb 1.9] [--repeats 1] [--compare-with /path/to/old/checkout]
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


def build_model(folder: Path, total_bytes: int, blocks: int = 4) -> Path:
    """``model.onnx`` + sparse ``model.onnx.data``: ``blocks`` x (Conv 1x1 [C, C] -> BN), about ``total_bytes``."""
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    c = int(math.sqrt(total_bytes / blocks / 4))
    rng = np.random.default_rng(0)
    data_name = "model.onnx.data"
    nodes, inits = [], []
    offset = 0
    x = "x"
    for i in range(blocks):
        w = onnx.TensorProto()
        w.name, w.data_type = f"W{i}", T.FLOAT
        w.dims.extend([c, c, 1, 1])
        w.data_location = T.EXTERNAL
        length = c * c * 4
        for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            e = w.external_data.add()
            e.key, e.value = k, v
        offset += length
        inits.append(w)
        stats = [rng.uniform(0.5, 2.0, c), rng.normal(0.3, 0.5, c), rng.normal(0.5, 1.0, c), rng.uniform(0.3, 3.0, c)]
        names = [f"{k}{i}" for k in ("scale", "bias", "mean", "var")]
        inits += [nh.from_array(v.astype(np.float32), n) for v, n in zip(stats, names)]
        nodes.append(h.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(h.make_node("BatchNormalization", [f"c{i}", *names], [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    g = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", T.FLOAT, [1, c, 1, 1])],
                     [h.make_tensor_value_info(x, T.FLOAT, [1, c, 1, 1])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    path = folder / "model.onnx"
    path.write_bytes(m.SerializeToString())  # tiny: the weights are external
    with open(folder / data_name, "wb") as f:
        f.truncate(offset)  # sparse: zeros that take no disk
    return path


PLAIN = """
import sys, onnx
m = onnx.load(sys.argv[1])
external = sys.argv[3] == "external" or sum(len(t.raw_data) for t in m.graph.initializer) >= 2**31 - 2**26
onnx.save(m, sys.argv[2], save_as_external_data=external, location="out.onnx.data")
"""


def main() -> None:
    parser = make_parser("Peak memory of bnfold fold --no-verify against onnx.load + onnx.save")
    parser.add_argument("--gb", type=float, default=None, help="model size in GB (default 1.9; --quick 0.2)")
    parser.add_argument("--folder", default=None, help="where to build the model (default: a temp folder)")
    parser.add_argument("--compare-with", default=None, metavar="REPO",
                        help="also run `bnfold fold --no-verify` from another checkout (e.g. an older commit)")
    args = parser.parse_args()
    gb = args.gb if args.gb is not None else (0.2 if args.quick else 1.9)
    repeats = 1 if args.quick else max(1, min(args.repeats, 3))
    print(env_summary())
    work = Path(tempfile.mkdtemp(prefix="bnfold-mem-", dir=args.folder))
    try:
        src = build_model(work, int(gb * 1e9))
        out = work / "out"
        out.mkdir()
        fold_cmd = [sys.executable, "-m", "bnfold", "fold", str(src), "-o", str(out / "out.onnx"), "--no-verify"]
        # (command, extra environment, working folder): `python -m` imports bnfold from the working folder
        jobs: dict[str, tuple[list[str], dict[str, str] | None, Path | None]] = {
            "onnx load+save": ([sys.executable, "-c", PLAIN, str(src), str(out / "out.onnx"), "default"], None, None),
            "onnx load+save (external data)": (
                [sys.executable, "-c", PLAIN, str(src), str(out / "out.onnx"), "external"], None, None),
            "bnfold fold --no-verify": (fold_cmd, None, None),
        }
        if args.compare_with:
            other = Path(args.compare_with).resolve()
            jobs[f"bnfold fold --no-verify ({other.name})"] = (fold_cmd, {"PYTHONPATH": str(other)}, other)
        peaks: dict[str, list[int]] = {k: [] for k in jobs}
        secs: dict[str, list[float]] = {k: [] for k in jobs}
        names = list(jobs)
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:  # rotate the order each round
                cmd, env, cwd = jobs[name]
                res = run_job(cmd, env=env, cwd=cwd, timeout=1800).check()
                peaks[name].append(res.peak_rss)
                secs[name].append(res.seconds)
                shutil.rmtree(out)
                out.mkdir()
        floor = statistics.median(peaks["onnx load+save"])
        rows = []
        for name in names:
            p = statistics.median(peaks[name])
            rows.append([name, f"{p / GIB:.2f} GiB", f"{p / floor:.2f}x", f"{statistics.median(secs[name]):.1f} s"])
        print(f"\nModel: {gb:.2f} GB of float32 weights in external data (4 Conv 1x1 -> BN blocks), "
              f"median of {repeats} run(s), peak RSS of each job\n")
        print(markdown_table(["job", "peak RSS", "vs load+save", "wall"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
