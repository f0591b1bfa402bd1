"""Two bnfold source trees in the same run: the PyTorch fold of ResNet-50 against torch.fx ``fuse``.

A change in fold time is judged against the code before it on the same machine at the same time:
one worker process per tree (``NEW``: this checkout, ``OLD``: another checkout, e.g.
``git worktree add --detach /tmp/old <commit>``), each importing bnfold from its own tree (the tree
first on ``sys.path``; checked) and the ResNet-50 re-creation of ``models/`` from this checkout (the
same network and BN statistics on both sides). One thread each. The workers take turns, one round
each, the order of the two alternating from round to round, and inside a round each candidate runs
once, starting at a rotating candidate, so drift in machine load hits both trees and every candidate
alike. Candidates in each worker:

* **fold**: ``bnfold.fx.fold_module(model)`` (a new module, the input untouched);
* **fuse**: ``torch.fx.experimental.optimization.fuse(model)`` (the peer; the same torch on both sides,
  so its two medians also tell how evenly the load fell on the two workers);
* **dry run**: ``bnfold.fx.fold_module(model, dry_run=True)`` (what ``inspect`` runs).

Printed: the median (and spread: min-max, and the interquartile range) of each candidate per tree,
and the ratios of the medians: fold new/old, dry run new/old, each tree's fold and dry run over
its own ``fuse``. With ``--process`` also the ONNX half: the whole ``bnfold fold --no-verify`` CLI
process on the inline ResNet-50 against a plain ``onnx.save(onnx.load(m))`` process, both trees in
the same rounds (``bench_process.py``'s commands; CPU and wall time).

    python benchmarks/bench_fold_ab.py OLD [--new DIR] [--rounds 21] [--pairs 3] [--process]
        [--process-rounds 7] [--json PATH]
    python benchmarks/bench_fold_ab.py --combine RUN1.json RUN2.json ...   (the pooled tables)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

CANDIDATES = ("fold", "fuse", "dry_run")


# --- worker (one per tree) ---------------------------------------------------------------------


def _worker(tree: Path) -> None:
    """Build ResNet-50 once, then answer ``round N`` lines on stdin with one JSON line of seconds."""
    import gc
    import time

    sys.path.insert(0, str(REPO_ROOT))  # models/ from this checkout (it imports no bnfold)
    import torch

    from models.resnet import resnet50
    from models.stats import randomize_bn

    sys.path.remove(str(REPO_ROOT))
    sys.path.insert(0, str(tree))
    for name in [m for m in sys.modules if m == "bnfold" or m.startswith("bnfold.")]:
        del sys.modules[name]
    from torch.fx.experimental.optimization import fuse

    import bnfold
    from bnfold.fx import fold_module

    where = Path(bnfold.__file__).resolve()
    if tree.resolve() not in where.parents:
        raise SystemExit(f"bnfold imported from {where}, not from {tree}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = randomize_bn(resnet50(num_classes=1000), 0).eval()
    _, report = fold_module(model)
    if report.bn_after != 0:
        raise SystemExit(f"{tree}: {report.bn_after} BN left")
    fns: dict[str, Callable[[], object]] = {
        "fold": lambda: fold_module(model),
        "fuse": lambda: fuse(model),
        "dry_run": lambda: fold_module(model, dry_run=True),
    }
    for fn in fns.values():  # warm-up
        fn()
        fn()
    out = sys.stdout
    out.write(json.dumps({"ready": str(where.parent)}) + "\n")
    out.flush()
    for line in sys.stdin:
        r = int(line.split()[1])
        order = CANDIDATES[r % 3 :] + CANDIDATES[: r % 3]
        got: dict[str, float] = {}
        for name in order:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            got[name] = time.perf_counter() - t0
            got[name + " cpu"] = time.process_time() - c0
        out.write(json.dumps(got) + "\n")
        out.flush()


# --- driver --------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, tree: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(tree)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ready = json.loads(self._read())["ready"]

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker ended (exit {self.proc.wait()})")
        return line

    def round(self, r: int) -> dict[str, float]:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(f"round {r}\n")
        stdin.flush()
        got: dict[str, float] = json.loads(self._read())
        return got

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def _quartiles(v: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def fold_ab(old: Path, new: Path, rounds: int, pairs: int = 1) -> dict[str, dict[str, list[float]]]:
    """Seconds of every candidate per tree and round, wall (``fold``) and CPU (``fold cpu``) time.

    The rounds are shared out over ``pairs`` successive pairs of worker processes (started in
    alternating order), so that what one process happens to get (its heap, its core) is averaged too.
    """
    times: dict[str, dict[str, list[float]]] = {"new": {}, "old": {}}
    done = 0
    for p in range(pairs):
        n = (rounds - done) // (pairs - p)
        trees = {"new": new, "old": old}
        starts = ("new", "old") if p % 2 == 0 else ("old", "new")
        workers = {k: _Worker(trees[k]) for k in starts}
        if p == 0:
            for k, w in workers.items():
                print(f"  {k}: bnfold from {w.ready}")
        try:
            for r in range(done, done + n):
                for k in ("new", "old") if r % 2 == 0 else ("old", "new"):
                    for c, sec in workers[k].round(r).items():
                        times[k].setdefault(c, []).append(sec)
        finally:
            for w in workers.values():
                w.close()
        done += n
    return times


def print_fold_ab(times: dict[str, dict[str, list[float]]], rounds: int, clock: str) -> dict[str, float]:
    """Print one clock's table (``cpu``: process CPU time, ``wall``) and return its ratios."""
    suffix = " cpu" if clock == "cpu" else ""
    t = {k: {c: times[k][c + suffix] for c in CANDIDATES} for k in times}
    med = {k: {c: statistics.median(v) for c, v in tk.items()} for k, tk in t.items()}
    print(f"\nResNet-50, PyTorch, 1 thread, {clock} time, {rounds} interleaved rounds (ms):")
    print(f"  {'':<4} {'candidate':<8} {'median':>8} {'min':>8} {'max':>8} {'q1':>8} {'q3':>8}")
    for k in ("new", "old"):
        for c in CANDIDATES:
            v = t[k][c]
            q1, q3 = _quartiles(v)
            print(
                f"  {k:<4} {c:<8} {med[k][c] * 1e3:8.1f} {min(v) * 1e3:8.1f} {max(v) * 1e3:8.1f}"
                f" {q1 * 1e3:8.1f} {q3 * 1e3:8.1f}"
            )
    fig = {
        "fold new/old": med["new"]["fold"] / med["old"]["fold"],
        "dry run new/old": med["new"]["dry_run"] / med["old"]["dry_run"],
        "fuse new/old (same code: the load's share)": med["new"]["fuse"] / med["old"]["fuse"],
        "fold new/fuse": med["new"]["fold"] / med["new"]["fuse"],
        "fold old/fuse": med["old"]["fold"] / med["old"]["fuse"],
        "dry run new/fuse": med["new"]["dry_run"] / med["new"]["fuse"],
        "dry run old/fuse": med["old"]["dry_run"] / med["old"]["fuse"],
    }
    pooled = statistics.median(t["new"]["fuse"] + t["old"]["fuse"])
    for k in ("new", "old"):
        fig[f"fold {k}/fuse of both workers"] = med[k]["fold"] / pooled
        fig[f"dry run {k}/fuse of both workers"] = med[k]["dry_run"] / pooled
    print(f"ratios of the medians ({clock}):")
    for name, ratio in fig.items():
        print(f"  {name:<44} {ratio:.3f}")
    # ratios inside one round (the two trees ran next to each other), and inside one worker's round
    print(f"per-round ratios ({clock}), median [q1, q3]:")
    pairs = {
        "fold new/old": (t["new"]["fold"], t["old"]["fold"]),
        "dry run new/old": (t["new"]["dry_run"], t["old"]["dry_run"]),
        "fold new/fuse": (t["new"]["fold"], t["new"]["fuse"]),
        "fold old/fuse": (t["old"]["fold"], t["old"]["fuse"]),
        "dry run new/fuse": (t["new"]["dry_run"], t["new"]["fuse"]),
        "dry run old/fuse": (t["old"]["dry_run"], t["old"]["fuse"]),
    }
    for name, (a, b) in pairs.items():
        v = [x / y for x, y in zip(a, b, strict=True)]
        q1, q3 = _quartiles(v)
        print(f"  {name:<18} {statistics.median(v):.3f} [{q1:.3f}, {q3:.3f}]")
    return fig


# --- the ONNX CLI process (bench_process.py's commands, both trees) ------------------------------


def process_ab(old: Path, new: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each process per round (``floor``, ``bnfold new``, ``bnfold old``)."""
    sys.path.insert(0, str(HERE))
    import bench_process as bp

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as pyc:
        folder = Path(tmp)
        # every process reads cached bytecode, as an installed bnfold (and onnx) does: with
        # PYTHONDONTWRITEBYTECODE set, bnfold alone was compiled from source in every run (the larger
        # tree paying more); the cache lives in a temporary folder, filled by the warm-up run
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base["PYTHONPYCACHEPREFIX"] = pyc
        src = folder / "resnet50.onnx"
        subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _EXPORT, str(src)],
            check=True,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )
        py = sys.executable
        dst = str(folder / "out.onnx")
        fold = [py, "-m", "bnfold", "fold", "--no-verify", "--quiet", str(src), dst]
        commands = {
            "floor": [py, "-c", bp._FLOOR_INLINE, str(src), dst],
            "bnfold new": fold,
            "bnfold old": fold,
        }
        roots = {"floor": new, "bnfold new": new, "bnfold old": old}
        envs = {n: dict(base, PYTHONPATH=str(roots[n])) for n in commands}
        # run in ``folder``: ``python -c`` / ``-m`` put the working directory before PYTHONPATH, so from a
        # checkout's root both sides would import that checkout's bnfold
        for n in ("bnfold new", "bnfold old"):
            where = subprocess.run(
                [py, "-c", "import bnfold; print(bnfold.__file__)"],
                env=envs[n],
                cwd=folder,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            if roots[n].resolve() not in Path(where).resolve().parents:
                raise SystemExit(f"{n}: bnfold imported from {where}, not from {roots[n]}")
            print(f"  {n}: bnfold from {Path(where).parent}")
        wall, cpu = _time_processes(commands, envs, folder, {src.name}, rounds)
    print(f"\nONNX ResNet-50 inline, whole process, {rounds} interleaved rounds (s; median [q1, q3]):")
    print(f"  {'':<12} {'wall':>20} {'cpu':>20}")
    for n in commands:
        cells = []
        for v in (wall[n], cpu[n]):
            q1, q3 = _quartiles(v) if len(v) > 1 else (v[0], v[0])
            cells.append(f"{statistics.median(v):6.2f} [{q1:5.2f}, {q3:5.2f}]")
        print(f"  {n:<12} {cells[0]:>20} {cells[1]:>20}")
    print("ratios of the medians, and per-round median [q1, q3]:")
    for clock, t in (("cpu", cpu), ("wall", wall)):
        for a, b in (("bnfold new", "floor"), ("bnfold old", "floor"), ("bnfold new", "bnfold old")):
            per = [x / y for x, y in zip(t[a], t[b], strict=True)]
            q1, q3 = _quartiles(per) if len(per) > 1 else (per[0], per[0])
            print(
                f"  {clock:<4} {a} / {b:<10} {statistics.median(t[a]) / statistics.median(t[b]):.3f}"
                f"   per round {statistics.median(per):.3f} [{q1:.3f}, {q3:.3f}]"
            )
    return {"wall": wall, "cpu": cpu}


_EXPORT = """
import sys, io, torch
from models.resnet import resnet50
from models.stats import randomize_bn
torch.manual_seed(0)
m = randomize_bn(resnet50(num_classes=1000), 0).eval()
torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), sys.argv[1], dynamo=False, do_constant_folding=False,
                  training=torch.onnx.TrainingMode.PRESERVE, opset_version=17,
                  input_names=["input"], output_names=["output"])
"""


def _time_processes(
    commands: dict[str, list[str]], envs: dict[str, dict[str, str]], folder: Path, keep: set[str], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    import resource
    import time

    names = list(commands)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}

    def clear() -> None:
        for p in folder.iterdir():
            if p.name not in keep:
                p.unlink()

    for n in names:  # warm-up: page cache, .pyc files
        subprocess.run(commands[n], env=envs[n], check=True, capture_output=True, cwd=folder)
        clear()
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(commands[n], env=envs[n], check=True, capture_output=True, cwd=folder)
            wall[n].append(time.perf_counter() - t0)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[n].append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
            clear()
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("old", type=Path, nargs="?", help="the other bnfold checkout (the baseline)")
    ap.add_argument("--new", type=Path, default=REPO_ROOT, help="the checkout judged (default: this one)")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved rounds of the PyTorch fold (21)")
    ap.add_argument("--pairs", type=int, default=3, help="successive pairs of worker processes (3)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 rounds, 1 process round")
    ap.add_argument("--process", action="store_true", help="also the ONNX CLI process against load+save")
    ap.add_argument("--process-rounds", type=int, default=7, help="interleaved rounds of --process (7)")
    ap.add_argument("--no-fold", action="store_true", help="skip the PyTorch fold (with --process)")
    ap.add_argument("--json", type=Path, default=None, help="also write every round's seconds here")
    ap.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="print the pooled tables of earlier --json files",
    )
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        _worker(args.worker)
        return
    if args.combine is not None:
        pooled: dict[str, dict[str, list[float]]] = {"new": {}, "old": {}}
        for path in args.combine:
            got = json.loads(path.read_text())["times"]
            for k, series in pooled.items():
                for c, v in got[k].items():
                    series.setdefault(c, []).extend(v)
        n = len(pooled["new"]["fold"])
        print(f"pooled {n} rounds from {len(args.combine)} run(s)")
        for clock in ("cpu", "wall"):
            print_fold_ab(pooled, n, clock)
        return
    if args.old is None:
        ap.error("OLD (another bnfold checkout) is required")
    for tree in (args.old, args.new):
        if not (tree / "bnfold" / "__init__.py").is_file():
            ap.error(f"{tree} holds no bnfold/ package")
    rounds = 3 if args.quick else args.rounds
    print(f"python {sys.version.split()[0]}; new {args.new}, old {args.old}")
    record: dict[str, object] = {"old": str(args.old), "new": str(args.new)}
    if not args.no_fold:
        times = fold_ab(args.old, args.new, rounds, 1 if args.quick else max(1, min(args.pairs, rounds)))
        for clock in ("cpu", "wall"):
            print_fold_ab(times, rounds, clock)
        record["times"] = times
    if args.process:
        record["process"] = process_ab(args.old, args.new, 1 if args.quick else args.process_rounds)
    if args.json is not None:
        args.json.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
