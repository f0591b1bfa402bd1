"""Rich rendering of the reports the core returns (FoldReport, VerifyReport, BenchReport, freeze dict).

Rules:
    * rendering only: nothing here decides, loads, folds or exits;
    * human output goes to the console given (stdout for reports); progress bars go to a stderr console,
      so that ``--json`` leaves stdout holding the JSON alone;
    * numbers are shown as measured (errors in ``.2e``, sizes in binary units, times in ms/s).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .records import Direction, FoldReport, OutputCheck, Site, Skip, VerifyReport

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from .bench import BenchReport

__all__ = [
    "human_size",
    "render_fold_report",
    "render_verify_report",
    "render_bench_report",
    "render_freeze_report",
    "progress_callback",
]

_STAGE_LABELS = {
    "load": "loading",
    "fold": "folding",
    "export": "exporting to ONNX",
    "verify": "verifying",
    "save": "saving",
    "freeze": "freezing",
    "bench": "benchmarking",
}


def human_size(n: int | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> '-'``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _arrow(a: Any, b: Any) -> str:
    return f"{a} -> {b}"


def _verdict_row(i: int, v: Site | Skip) -> tuple[str, Text, str, str]:
    if isinstance(v, Site):
        if v.direction is Direction.AFFINE:
            status = Text("affine", style="cyan")
            where = "Mul + Add"
        else:
            status = Text("folded", style="green")
            where = f"{v.target} ({v.target_kind}, {v.direction.value})"
        return str(i), status, where, v.detail
    return str(i), Text("left", style="yellow"), v.reason.value, v.detail


def render_fold_report(console: Console, report: FoldReport, *, title: str = "BatchNorm layers") -> None:
    """One row per BatchNorm (folded where / left why), then a summary panel."""
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("BatchNorm", overflow="fold")
    table.add_column("status")
    table.add_column("into / reason", overflow="fold")
    table.add_column("detail", overflow="fold")
    for i, v in enumerate(report.verdicts, 1):
        idx, status, where, detail = _verdict_row(i, v)
        table.add_row(idx, v.bn, status, where, detail)
    if report.verdicts:
        console.print(table)
    else:
        console.print("No BatchNorm layer found.")
    console.print(Panel(_summary(report), title="summary", title_align="left", expand=False))


def _summary(report: FoldReport) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    extra = report.extra
    if extra.get("source"):
        src = f"{extra['source']} ({extra.get('source_format', '?')})"
        grid.add_row("model", src)
    if extra.get("output"):
        grid.add_row("output", f"{extra['output']} ({extra.get('output_format', '?')})")
    n_affine = sum(1 for s in report.sites if s.direction is Direction.AFFINE)
    verb = "would fold" if report.dry_run else "folded"
    what = f"{verb} {report.folded - n_affine}" + (f", affine {n_affine}" if n_affine else "")
    grid.add_row("BatchNorm", f"{_arrow(report.bn_before, report.bn_after)}  ({what}, left {len(report.skips)})")
    grid.add_row("nodes", _arrow(report.nodes_before, report.nodes_after))
    grid.add_row("parameters", _arrow(f"{report.params_before:,}", f"{report.params_after:,}"))
    if "size_before" in extra:
        after = extra.get("size_after")
        grid.add_row(
            "file size",
            human_size(extra["size_before"]) if after is None else _arrow(
                human_size(extra["size_before"]), human_size(after)
            ),
        )
    v = report.verification
    if v is None:
        grid.add_row("verification", "skipped" if not report.dry_run else "-")
    else:
        grid.add_row("verification", _verdict_text(v))
        grid.add_row("max error", _error_text(v))
    for note in report.notes:
        grid.add_row("note", note)
    seconds = extra.get("total_seconds", report.seconds)
    grid.add_row("time", f"{seconds:.2f} s")
    return grid


def _verdict_text(v: VerifyReport) -> Text:
    levels = ", ".join(
        "optimisations off" if lvl == "disable" else f"optimisation level {lvl}"
        for lvl in [v.optimization_level, *(e.optimization_level for e in v.extra)]
    )
    if v.passed:
        return Text(f"equivalent ({v.samples} sample(s), onnxruntime with {levels})", style="green")
    return Text(f"NOT equivalent ({v.samples} sample(s), onnxruntime with {levels})", style="bold red")


def _error_text(v: VerifyReport) -> str:
    worst = v.worst()
    where = f" (worst output: {worst.name})" if worst is not None else ""
    return f"abs {v.max_abs_error:.2e}, rel {v.max_rel_error:.2e}{where}"


def _worst_per_output(checks: tuple[OutputCheck, ...]) -> list[OutputCheck]:
    best: dict[str, OutputCheck] = {}
    for c in checks:
        cur = best.get(c.name)
        if cur is None or (not c.passed, c.max_rel_error) > (not cur.passed, cur.max_rel_error):
            best[c.name] = c
    return list(best.values())


def render_verify_report(console: Console, report: VerifyReport, *, title: str | None = None) -> None:
    """Per output (worst sample), the errors and tolerances; then the verdict, for every level run."""
    for i, rep in enumerate((report, *report.extra)):
        table = Table(
            title=title if i == 0 and title else f"onnxruntime optimisation level: {rep.optimization_level}",
            title_justify="left",
        )
        table.add_column("output", overflow="fold")
        table.add_column("shape", overflow="fold")
        table.add_column("dtype", no_wrap=True, min_width=7)
        for col in ("abs err", "rel err", "bad", "atol", "rtol"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("ok?", no_wrap=True)
        for c in _worst_per_output(rep.checks):
            table.add_row(
                c.name,
                "x".join(str(d) for d in c.shape) or "scalar",
                c.dtype,
                f"{c.max_abs_error:.2e}",
                f"{c.max_rel_error:.2e}",
                str(c.mismatches),
                f"{c.atol:.0e}",
                f"{c.rtol:.0e}",
                Text("ok", style="green") if c.passed else Text("FAIL", style="bold red"),
            )
        console.print(table)
    console.print(_verdict_text(report))


def render_bench_report(console: Console, report: BenchReport) -> None:
    """Median latency of original and folded per runtime setting, and the speedup."""
    table = Table(
        title=f"latency, median of {report.runs} runs after {report.warmup} warm-up",
        title_justify="left",
    )
    table.add_column("runtime")
    table.add_column("original (ms)", justify="right")
    table.add_column("folded (ms)", justify="right")
    table.add_column("speedup", justify="right")
    for t in report.timings:
        style = "green" if t.speedup >= 1.0 else "yellow"
        table.add_row(
            t.setting,
            f"{t.original_ms:.3f}",
            f"{t.folded_ms:.3f}",
            Text(f"{t.speedup:.2f}x", style=style),
        )
    console.print(table)
    shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in report.input_shapes.items())
    fold = report.fold
    console.print(
        f"inputs: {shapes or '-'}; BatchNorm {fold.bn_before} -> {fold.bn_after}; "
        f"threads: {report.threads or 'default'}"
    )


def render_freeze_report(console: Console, result: dict[str, Any]) -> None:
    """The frozen layers and where the result was written."""
    table = Table(title="frozen BatchNorm layers", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("module", overflow="fold")
    table.add_column("kind")
    for i, (name, kind) in enumerate(result.get("frozen", []), 1):
        table.add_row(str(i), name, kind)
    if result.get("frozen"):
        console.print(table)
    else:
        console.print("No BatchNorm layer found: the model is written unchanged.")
    left = result.get("left", [])
    if left:
        kept = Table(title="BatchNorm layers left as they were", title_justify="left")
        kept.add_column("module", overflow="fold")
        kept.add_column("reason")
        kept.add_column("detail", overflow="fold")
        for name, reason, detail in left:
            kept.add_row(Text(str(name)), str(reason), Text(str(detail)))
        console.print(kept)
    learn = "learnable scale/shift" if result.get("learnable") else "fixed scale/shift buffers"
    console.print(
        f"{len(result.get('frozen', []))} BatchNorm frozen ({learn}), {len(left)} left; "
        f"{result.get('source')} ({result.get('source_format')}) -> {result.get('output')} "
        f"[{human_size(result.get('size_after'))}] in {result.get('seconds', 0.0):.2f} s"
    )


@contextmanager
def progress_callback(console: Console, *, enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one rich bar per stage on ``console``.

    The bars are transient and only drawn on a terminal; elsewhere the callback does nothing.
    """
    if not enabled or not console.is_terminal:
        yield _no_progress
        return
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(_STAGE_LABELS.get(stage, stage), total=max(total, 1))
        bar.update(tasks[stage], completed=done, total=max(total, 1))

    with bar:
        yield update


def _no_progress(stage: str, done: int, total: int) -> None:
    return None
