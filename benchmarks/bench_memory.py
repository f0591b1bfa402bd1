"""Peak memory of ``bnfold inspect`` / ``fold --no-verify`` / ``fold`` against ``onnx.load`` + ``onnx.save``.

The model: a chain of 1x1 Conv -> BatchNormalization blocks with random float32 weights (seeded,
scaled by 1/sqrt(C)) and realistic BN statistics (mean != 0, var != 1, gamma != 1, beta != 0), in two
layouts: the weights in one external-data file, and inline in the ``.onnx`` file (kept under
protobuf's 2 GiB).

Every job runs in a fresh process; its peak is that of its whole process tree (:func:`tree_peak`):
``bnfold fold`` runs onnxruntime in a child worker process (:mod:`bnfold.verification.isolation`), and
what the job costs the machine is the parent and the worker *at the same time*. Three figures per job:

* ``tree RSS`` (the one the ratios use) -- the largest sum of ``VmRSS`` over the job's process tree
  (the job and every descendant, from ``/proc/<pid>/task/*/children``), sampled every 20 ms; a
  process whose high-water mark rose between two samples counts at that mark;
* ``sum of HWM`` -- an upper bound: each process's own high-water mark (``VmHWM``) added up, as if
  every process peaked at the same moment;
* ``max one`` -- ``ru_maxrss`` from ``wait4``: the largest single process of the tree (the figure
  before the worker existed; it under-counts a job with a worker).

Jobs:

* ``onnx load+save`` -- the floor of issue 28: ``onnx.load(path)`` then ``onnx.save`` of the same
  model in the same layout (external data in, external data out);
* ``bnfold inspect`` -- the dry run: it writes nothing;
* ``bnfold fold --no-verify`` -- load, check, fold, save;
* ``bnfold fold`` -- the same, verified with onnxruntime (reference: the source file, candidate: the
  staged output), onnxruntime in a child process.

Ratios: ``peak / floor`` (the issue's figure; targets: inspect and fold --no-verify <= 1.2x, fold
<= 1.5x), and a *net* ratio that subtracts each job's fixed cost (interpreter, imports), measured by
running the same job on a 1 MB model of the same shape: at a few hundred MB the imports
(onnxruntime, numpy) are a visible part of the peak, at 2.4 GB they are not.

    python benchmarks/bench_memory.py [--quick] [--gb 0.4] [--layouts external,inline] [--repeats 1]
                                      [--compare-with /path/to/old/checkout]
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, ensure_repo_on_path, env_summary, make_parser, markdown_table  # noqa: E402

ensure_repo_on_path()

GIB = 2**30
MIB = 2**20
TARGETS = {"bnfold inspect": 1.2, "bnfold fold --no-verify": 1.2, "bnfold fold": 1.5}


@dataclasses.dataclass(frozen=True)
class TreePeak:
    """Peak memory of one job's process tree (bytes) and how it ended."""

    tree_rss: int  # largest sampled sum of VmRSS over the tree
    hwm_sum: int  # each process's VmHWM added up: an upper bound
    max_one: int  # wait4's ru_maxrss: the largest single process
    processes: int  # how many processes the tree had over the job's life
    returncode: int
    seconds: float
    stderr: str


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss_hwm(pid: int) -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` of ``pid`` in bytes; None once it is gone (or a zombie: no memory left)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except (OSError, ValueError):
        return None
    if "VmRSS" not in fields:
        return None
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss * 1024} {os.waitstatus_to_exitcode(status)}")
"""
"""Forks the job from a small interpreter: a job forked from this benchmark would start its ``ru_maxrss``
at this process's size (Linux keeps the high-water mark across ``exec``)."""


def tree_peak(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 1800,
    interval: float = 0.02,
) -> TreePeak:
    """Run ``cmd`` and measure the peak memory of its whole process tree (Linux ``/proc``).

    The job is forked by a small launcher (:data:`_LAUNCHER`) and sampled every ``interval`` seconds:
    the sum of ``VmRSS`` over the job and all its descendants (the launcher left out), where a process
    whose ``VmHWM`` rose since the previous sample counts at that high-water mark (a spike shorter than
    the interval is not missed), and each process's ``VmHWM`` as last seen. The
    job's own high-water mark is exact at its end (``wait4``) when it is the largest process of the
    tree; otherwise its last sample is used.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, "err"), "w+b") as err:
        report = os.path.join(tmp, "rss")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, report, *cmd],
            cwd=cwd or REPO_ROOT,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        hwm: dict[int, int] = {}
        job = 0
        best = 0
        while True:
            kids = _children(proc.pid)
            job = kids[0] if kids else job
            pids, todo = [], list(kids)
            while todo:
                p = todo.pop()
                pids.append(p)
                todo += _children(p)
            total = 0
            for p in pids:
                got = _rss_hwm(p)
                if got is not None:
                    rose = got[1] > hwm.get(p, 0)  # it peaked since the last sample: count that peak
                    total += got[1] if rose else got[0]
                    hwm[p] = max(hwm.get(p, 0), got[1])
            best = max(best, total)
            try:
                proc.wait(interval)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 > timeout:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    break
        seconds = time.perf_counter() - t0
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
        try:
            with open(report) as f:
                max_one, code = (int(v) for v in f.read().split())
        except (OSError, ValueError):
            max_one, code = 0, proc.returncode or 1
    others = sum(v for p, v in hwm.items() if p != job)
    own = hwm.get(job, 0)
    if max_one > max(hwm.values(), default=0):
        own = max_one  # the job itself peaked after its last sample (nothing else was that large)
    return TreePeak(max(best, max_one), own + others, max_one, len(hwm), code, seconds, text)


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
            stats = [
                rng.uniform(0.5, 2.0, c),
                rng.normal(0.3, 0.5, c),
                rng.normal(0.5, 1.0, c),
                rng.uniform(0.3, 3.0, c),
            ]
            names = [f"{k}{i}" for k in ("scale", "bias", "mean", "var")]
            inits += [nh.from_array(v.astype(np.float32), n) for v, n in zip(stats, names)]
            nodes.append(h.make_node("Conv", [x, f"W{i}"], [f"c{i}"], name=f"conv{i}"))
            nodes.append(h.make_node("BatchNormalization", [f"c{i}", *names], [f"y{i}"], name=f"bn{i}"))
            x = f"y{i}"
    finally:
        if data is not None:
            data.close()
    g = h.make_graph(
        nodes,
        "big",
        [h.make_tensor_value_info("x", T.FLOAT, [1, c, 1, 1])],
        [h.make_tensor_value_info(x, T.FLOAT, [1, c, 1, 1])],
        inits,
    )
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


def _measure(
    jobs: dict[str, list[str]], out: Path, repeats: int, env: dict[str, str] | None, cwd: Path | None
) -> dict[str, TreePeak]:
    """Each job's run with the median tree peak, in interleaved rounds."""
    runs: dict[str, list[TreePeak]] = {k: [] for k in jobs}
    names = list(jobs)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order each round
            res = tree_peak(jobs[name], env=env, cwd=cwd)
            if res.returncode != 0:
                raise SystemExit(f"{name} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
            runs[name].append(res)
            shutil.rmtree(out)
            out.mkdir()
    return {k: sorted(v, key=lambda t: t.tree_rss)[len(v) // 2] for k, v in runs.items()}


def main() -> None:
    parser = make_parser(
        "Peak RSS of bnfold inspect / fold against onnx.load + onnx.save", repeats=1, quick_repeats=1
    )
    parser.add_argument("--gb", type=float, default=None, help="model size in GB (default 0.4; --quick 0.1)")
    parser.add_argument(
        "--layouts",
        default="external,inline",
        help="comma-separated: external (weights in a .data file), inline (in the .onnx file)",
    )
    parser.add_argument("--folder", default=None, help="where to build the models (default: a temp folder)")
    parser.add_argument(
        "--compare-with",
        default=None,
        metavar="REPO",
        help="also run the bnfold jobs from another checkout (e.g. an older commit), side by side",
    )
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
            peak = _measure(_jobs(src, out, layout), out, repeats, None, None)
            fixed = _measure(_jobs(tiny, out, layout), out, 1, None, None)
            rows_from = {"": (peak, fixed)}
            if other is not None:
                jobs = {k: v for k, v in _jobs(src, out, layout).items() if k != "onnx load+save"}
                env = {"PYTHONPATH": str(other)}
                o_peak = _measure(jobs, out, repeats, env, other)
                o_fixed = _measure(
                    {k: v for k, v in _jobs(tiny, out, layout).items() if k in jobs}, out, 1, env, other
                )
                rows_from[f" ({other.name})"] = (o_peak, o_fixed)
            shutil.rmtree(out)
            floor, floor_fixed = peak["onnx load+save"].tree_rss, fixed["onnx load+save"].tree_rss
            rows = []
            for suffix, (p, f) in rows_from.items():
                for name, t in p.items():
                    if suffix and name == "onnx load+save":
                        continue
                    target = TARGETS.get(name)
                    rows.append(
                        [
                            name + suffix,
                            f"{t.tree_rss / GIB:.2f} GiB",
                            f"{t.tree_rss / floor:.2f}x",
                            f"{(t.tree_rss - f[name].tree_rss) / max(1, floor - floor_fixed):.2f}x",
                            f"<= {target:.1f}x" if target else "",
                            f"{t.hwm_sum / floor:.2f}x",
                            f"{t.max_one / floor:.2f}x",
                            str(t.processes),
                            f"{f[name].tree_rss / MIB:.0f} MiB",
                            f"{t.seconds:.1f} s",
                        ]
                    )
            size = sum(f.stat().st_size for f in src.parent.iterdir())
            print(
                f"\nModel: {size / GIB:.2f} GiB of float32 weights, {layout} "
                f"({'a .data file' if layout == 'external' else 'inside the .onnx file'}; 4 Conv 1x1 -> BN "
                f"blocks), median of {repeats} run(s). Peak of each job's process tree: the sum of VmRSS "
                f"over the job and its children (onnxruntime's worker), sampled every 20 ms (a process whose "
                f"high-water mark rose since the last sample counts at that mark); 'sum of HWM' "
                f"adds each process's own peak (an upper bound); 'max one' is the largest single process "
                f"(wait4's ru_maxrss, the old figure)\n"
            )
            print(
                markdown_table(
                    [
                        "job",
                        "tree RSS",
                        "vs load+save",
                        "net vs load+save",
                        "target",
                        "sum of HWM",
                        "max one",
                        "procs",
                        "fixed cost",
                        "wall",
                    ],
                    rows,
                )
            )
            shutil.rmtree(src.parent)
            shutil.rmtree(tiny.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
