"""Shared utilities for the scripts in ``benchmarks/``.

Rules every benchmark follows (see ``benchmarks/README.md``):

* Compare side by side in one run and report *ratios*; absolute seconds depend on the machine.
* Time with :func:`time_interleaved`: a warm-up call per candidate, then rounds in which every
  candidate runs once, in an order that rotates each round, so drift (thermal, other processes)
  hits all candidates alike; report the median of the rounds.
* Measure memory in a fresh subprocess (:func:`run_job`), where the peak resident set size
  (``ru_maxrss`` of that child only) is not polluted by what this process already holds; subtract
  :func:`baseline_rss` (the interpreter plus the same imports) to get the job's own cost.
* Accept ``--quick`` (:func:`make_parser`) and finish in under ~30 s with it.
* Pin threads (:func:`pin_threads`) so that candidates do not fight over cores.

Usage::

    from common import make_parser, time_interleaved, markdown_table   # when run as a script
    args = make_parser("Fold speed of the ONNX backend").parse_args()
    t = time_interleaved({"bnfold": run_a, "onnxscript": run_b}, repeats=args.repeats)
    print(markdown_table(["tool", "median"], [[k, fmt_seconds(v.median)] for k, v in t.items()]))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "Timing",
    "JobResult",
    "ensure_repo_on_path",
    "make_parser",
    "pin_threads",
    "ort_options",
    "time_fn",
    "time_interleaved",
    "run_job",
    "run_python",
    "baseline_rss",
    "markdown_table",
    "print_table",
    "fmt_seconds",
    "fmt_bytes",
    "fmt_ratio",
    "env_summary",
    "write_json",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_repo_on_path() -> None:
    """Put the repository root on ``sys.path`` so ``import models`` and ``import bnfold`` work when a
    benchmark is run as ``python benchmarks/<script>.py``."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


ensure_repo_on_path()


# --- command line ---------------------------------------------------------------------------------


def make_parser(description: str, *, repeats: int = 7, quick_repeats: int = 3) -> argparse.ArgumentParser:
    """An ``argparse`` parser with the flags every benchmark shares.

    Flags: ``--quick`` (small models, few repeats; < ~30 s), ``--repeats N`` (timed rounds; default
    ``repeats``, or ``quick_repeats`` with ``--quick``), ``--warmup N`` (default 1), ``--threads N``
    (default 1; 0 leaves the libraries' defaults), ``--json PATH`` (also write the results as JSON).
    After ``parse_args()``, ``args.repeats`` is already resolved for ``--quick``.

    Args:
        description: One line saying what the benchmark measures.
        repeats: Default number of timed rounds.
        quick_repeats: Default number of timed rounds with ``--quick``.

    Returns:
        The parser; add script-specific arguments before calling ``parse_args``.
    """

    class _Parser(argparse.ArgumentParser):
        def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
            ns = super().parse_args(args, namespace)
            if ns.repeats is None:
                ns.repeats = quick_repeats if ns.quick else repeats
            if ns.repeats < 1 or ns.warmup < 0:
                self.error("--repeats must be >= 1 and --warmup >= 0")
            return ns

    p = _Parser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: small models, few repeats (< ~30 s)")
    p.add_argument(
        "--repeats", type=int, default=None, help=f"timed rounds (default {repeats}, quick {quick_repeats})"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per candidate first (default 1)")
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for torch/onnxruntime (0: default)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write results as JSON")
    return p


def pin_threads(n: int) -> None:
    """Use ``n`` intra-op threads in torch (and in onnxruntime sessions made with :func:`ort_options`).

    ``n <= 0`` leaves the defaults. Also sets ``OMP_NUM_THREADS`` for subprocess jobs.
    """
    if n <= 0:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def ort_options(threads: int = 1, *, optimize: bool = False) -> Any:
    """``onnxruntime.SessionOptions`` with ``threads`` intra-op threads; optimisations off by default
    (``ORT_DISABLE_ALL``, as bnfold verifies), or all on with ``optimize=True`` (what a deployment sees).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return opts


# --- timing ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of each timed round of one candidate."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        """Fastest round."""
        return min(self.runs)

    @property
    def max(self) -> float:
        """Slowest round."""
        return max(self.runs)

    @property
    def spread(self) -> float:
        """``(max - min) / median``: how noisy the rounds were."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"median_s": self.median, "min_s": self.min, "max_s": self.max, "runs_s": list(self.runs)}


def time_fn(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 1, number: int = 1) -> Timing:
    """Time one callable: ``warmup`` untimed calls, then ``repeats`` rounds of ``number`` calls.

    Args:
        fn: The work, with no arguments (bind them with a lambda or ``functools.partial``).
        repeats: Timed rounds.
        warmup: Untimed calls first.
        number: Calls per round (for work far below a millisecond); each run is divided by it.

    Returns:
        The per-call seconds of each round.
    """
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, number=number)["fn"]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 1, number: int = 1
) -> dict[str, Timing]:
    """Time several candidates against each other, interleaved.

    Each candidate is warmed up ``warmup`` times; then each of ``repeats`` rounds runs every
    candidate ``number`` times, starting the round at a different candidate (rotation), so slow
    drift is shared fairly. Compare medians.

    Args:
        fns: Candidate name -> callable with no arguments.
        repeats: Timed rounds.
        warmup: Untimed calls per candidate first.
        number: Calls per candidate per round.

    Returns:
        Candidate name -> :class:`Timing` (per-call seconds), in the order of ``fns``.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            runs[name].append((time.perf_counter() - t0) / number)
    return {name: Timing(tuple(runs[name])) for name in names}


# --- memory (subprocess jobs) ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What a subprocess job did: exit code, wall seconds, peak RSS (bytes), its output."""

    returncode: int
    seconds: float
    peak_rss: int
    stdout: str
    stderr: str

    def check(self) -> JobResult:
        """Raise ``RuntimeError`` with the job's stderr tail if it failed; else return self."""
        if self.returncode != 0:
            raise RuntimeError(f"job failed with exit code {self.returncode}:\n{self.stderr[-2000:]}")
        return self

    def json(self) -> Any:
        """The job's stdout parsed as JSON (last non-empty line), for jobs that report figures."""
        lines = [ln for ln in self.stdout.splitlines() if ln.strip()]
        return json.loads(lines[-1])


# A small launcher between this (large) process and the job. Linux carries the forking process's
# high-water RSS into the child's ru_maxrss across exec, so a job forked straight from a process that
# holds torch would report at least this process's size. Forked from the small launcher instead, the
# job's ru_maxrss is its own (floor: the launcher's ~10 MiB).
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
scale = 1 if sys.platform == "darwin" else 1024
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss * scale} {os.waitstatus_to_exitcode(status)}")
"""


def run_job(
    cmd: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> JobResult:
    """Run ``cmd`` in a subprocess and measure its wall time and peak resident set size.

    The peak is ``ru_maxrss`` of exactly this job, taken by a small launcher process (see
    ``_LAUNCHER``); it includes the interpreter and its imports: compare with :func:`baseline_rss`.
    The wall time includes the launcher's start (~20 ms).

    Args:
        cmd: The command line.
        cwd: Working folder (default: the repository root).
        env: Extra environment variables (added to a copy of this process's environment, with the
            repository root prepended to ``PYTHONPATH``).
        timeout: Seconds after which the job's process group is killed (``returncode`` is then -9).

    Returns:
        A :class:`JobResult` (``peak_rss`` 0 when the job was killed).
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "rss"
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(rss_file), *cmd],
            cwd=cwd or REPO_ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return JobResult(-9, time.perf_counter() - t0, 0, out, err)
        seconds = time.perf_counter() - t0
        if not rss_file.is_file():
            return JobResult(proc.returncode or 1, seconds, 0, out, err)
        rss, code = (int(v) for v in rss_file.read_text().split())
        return JobResult(code, seconds, rss, out, err)


def run_python(
    code: str, *args: str, timeout: float | None = None, env: Mapping[str, str] | None = None
) -> JobResult:
    """Run ``python -c code args...`` in a fresh interpreter (see :func:`run_job`)."""
    return run_job([sys.executable, "-c", code, *args], timeout=timeout, env=env)


def baseline_rss(imports: Sequence[str] = ("torch", "onnx", "onnxruntime")) -> int:
    """Peak RSS (bytes) of a fresh interpreter that only imports ``imports``: subtract it from a
    :func:`run_job` peak to get what the job itself needed."""
    code = "\n".join(f"import {m}" for m in imports) or "pass"
    return run_python(code).check().peak_rss


# --- output ---------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub-flavoured markdown table.

    Args:
        headers: Column titles.
        rows: Cells (converted with ``str``); each row as long as ``headers``.
        align: One letter per column, ``l``/``r``/``c``; default: left for the first column,
            right for the rest (figures).

    Returns:
        The table, lines joined by newlines, no trailing newline.
    """
    n = len(headers)
    align = align or ("l" + "r" * (n - 1))
    if len(align) != n or any(len(r) != n for r in rows):
        raise ValueError("markdown_table: every row and align need one entry per header")
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(n)]

    def line(r: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(r):
            out.append(
                c.rjust(widths[i])
                if align[i] == "r"
                else c.center(widths[i])
                if align[i] == "c"
                else c.ljust(widths[i])
            )
        return "| " + " | ".join(out) + " |"

    sep = {"l": ":{}", "r": "{}:", "c": ":{}:"}
    rule = "| " + " | ".join(sep[a].format("-" * (w - len(sep[a]) + 2)) for a, w in zip(align, widths)) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None
) -> None:
    """Print :func:`markdown_table` (with an optional ``### title`` line) and a blank line."""
    if title:
        print(f"### {title}\n")
    print(markdown_table(headers, rows))
    print()


def fmt_seconds(s: float) -> str:
    """``0.000123`` -> ``123 µs``; ``0.0456`` -> ``45.6 ms``; ``2.5`` -> ``2.50 s``."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: float) -> str:
    """Bytes in KiB / MiB / GiB with one decimal."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(value: float, reference: float) -> str:
    """``value / reference`` as ``1.23×`` (``n/a`` when the reference is 0)."""
    return f"{value / reference:.2f}×" if reference else "n/a"


def env_summary() -> str:
    """One line with the versions and machine that produced the figures (print it first)."""
    parts = [f"python {platform.python_version()}"]
    for mod in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            parts.append(f"{mod} -")
    parts.append(f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}")
    return ", ".join(parts)


def write_json(path: Path | None, data: Mapping[str, Any]) -> None:
    """Write ``data`` (plus :func:`env_summary`) as indented JSON to ``path``; nothing if ``path`` is None.

    :class:`Timing` and :class:`JobResult` values and dataclasses are converted.
    """
    if path is None:
        return

    def default(o: Any) -> Any:
        if isinstance(o, Timing):
            return o.to_dict()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        return str(o)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env_summary(), **data}, indent=2, default=default) + "\n")


def _demo() -> None:
    """Self-check: ``python benchmarks/common.py --quick`` shows the timer and the RSS probe work."""
    args = make_parser("benchmarks/common.py self-check").parse_args()
    print(env_summary())
    t = time_interleaved(
        {"sum 1e5": lambda: sum(range(100_000)), "sum 2e5": lambda: sum(range(200_000))},
        repeats=args.repeats,
        warmup=args.warmup,
    )
    base = t["sum 1e5"].median
    print_table(
        ["work", "median", "ratio", "spread"],
        [[k, fmt_seconds(v.median), fmt_ratio(v.median, base), f"{v.spread:.0%}"] for k, v in t.items()],
        title="interleaved timing",
    )
    job = run_python("import numpy; a = numpy.ones(50_000_000, dtype='u1'); a += 1").check()
    base_rss = baseline_rss(("numpy",))
    print(
        f"job peak RSS {fmt_bytes(job.peak_rss)}, baseline {fmt_bytes(base_rss)}, "
        f"job's own {fmt_bytes(job.peak_rss - base_rss)} (expect ~48 MiB)"
    )


if __name__ == "__main__":
    _demo()
