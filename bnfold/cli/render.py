"""Rendering of the reports the core returns: compact rich text for people, versioned JSON for tools.

Rules:
    * rendering only: nothing here decides, loads, folds or exits;
    * every string that comes from a model (node, tensor, graph names, op types, doc strings, paths) goes
      through :func:`clean` and into a :class:`rich.text.Text` (consoles are made with ``markup=False``):
      control characters are shown escaped (``\\x1b``), rich markup (``[/oops]``) is shown as typed,
      so a name can neither drive the terminal nor make rendering raise;
    * the default fold/inspect view is compact: the summary first, then only the BatchNorms that are
      left, each with its reason; ``verbose`` lists every BatchNorm. Names are never cut: a table whose
      names do not fit the terminal is printed wider (the terminal wraps the line), so every name
      can be copied and searched for whole, on a terminal and in a pipe;
    * JSON documents (:func:`json_document`) follow one versioned schema,
      ``bnfold/schemas/report-v1.json``: a common head (``schema``, ``schema_version``, ``command``,
      ``ok``, ``exit_code``, ``bnfold_version``) and one body per command; an error is the head plus an
      ``error`` object;
    * numbers are shown as measured (errors in ``.2e``, sizes in binary units, times in ms/s).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from bnfold.health_records import HealthReport, count_labels
from bnfold.records import Direction, FoldReport, FreezeReport, OutputCheck, Site, Skip, VerifyReport

from .text import clean

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from bnfold.bench import BenchReport
    from bnfold.health_records import LayerQuant

__all__ = [
    "human_size",
    "make_console",
    "render_fold_report",
    "render_verify_report",
    "render_bench_report",
    "render_freeze_report",
    "render_health",
    "health_summary",
    "render_fold_quant",
    "progress_callback",
    "stage_label",
    "STAGES",
]


STAGES: dict[str, str] = {
    "load": "loading",
    "fold": "folding",
    "export": "exporting to ONNX",
    "verify": "verifying",
    "save": "saving",
    "freeze": "freezing",
    "bench": "benchmarking",
}
"""Stage key -> label shown on the progress line."""

_MIN_TEXT = 30
"""Columns of prose (a reason's sentence) keep at least this width: they wrap at spaces."""


def print_whole(console: Console, table: Table, fixed: int) -> None:
    """Print ``table`` at least ``fixed + _MIN_TEXT`` wide, never cropped.

    ``fixed``: the width its unbreakable columns (names) need, padding included. rich would
    otherwise shrink every column to the console width and cut names with an ellipsis.
    """
    wanted = fixed + _MIN_TEXT
    if wanted <= console.width:
        console.print(table)
        return
    previous = console.width
    console.width = wanted  # rich never renders wider than its console: widen it for this table only
    try:
        console.print(table, crop=False)
    finally:
        console.width = previous


def _widest(values: Any) -> int:
    return max((len(v) for v in values), default=0)


def _t(value: object, style: str = "") -> Text:
    return Text(clean(value), style=style)


_TRAILING = re.compile(r"[ ]+((?:\x1b\[[0-9;]*m)*)(?=\n)")
"""Spaces at the end of a line (before any closing style codes): rich pads every cell of a table."""


class _Console(Console):
    """rich's console, leaving a closed pipe to the CLI (one exit code for it, whoever writes), and
    writing no trailing spaces (rich pads table cells to the column's width)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError

    def _render_buffer(self, buffer: Any) -> str:
        return _TRAILING.sub(r"\1", super()._render_buffer(buffer))


def make_console(*, stderr: bool = False) -> Console:
    """A console that interprets no markup, emoji codes or highlighting in what it prints."""
    return _Console(stderr=stderr, highlight=False, markup=False, emoji=False)


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


def _shape(dims: Any) -> str:
    if dims is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _signature_rows(sig: Mapping[str, Any]) -> list[tuple[str, Text]]:
    rows: list[tuple[str, Text]] = []
    if not sig:
        return rows
    for key in ("inputs", "outputs"):
        items = sig.get(key) or []
        shown = ", ".join(
            f"{clean(i['name'])}: {clean(i['dtype'])} {clean(_shape(i['shape']))}" for i in items[:4]
        )
        if len(items) > 4:
            shown += f", ... ({len(items)} in all)"
        rows.append((key, Text(shown or "-")))
    return rows


def _file_text(path: Any, fmt: Any, size: Any) -> Text:
    return Text(f"{clean(path)} ({clean(fmt)}, {human_size(size)})")


def render_fold_report(
    console: Console, report: FoldReport, *, title: str = "", verbose: bool = False
) -> None:
    """The summary (counts by verdict and layer kind, ops, I/O, sizes, verification), then the BNs left.

    ``verbose`` lists every BatchNorm (folded: into what; left: why) instead of only those left.
    """
    f = report.files
    c = report.summary()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    if title:
        console.print(_t(title, "bold"))
    if f is not None:
        grid.add_row("model", _file_text(f.source, f.source_format, f.size_before))
    if f is not None and f.output:
        out = _file_text(f.output, f.output_format or "?", f.size_after)
        if not f.written:
            out = Text(f"{clean(f.output)} (not written)", style="bold red")
        grid.add_row("output", out)
    verb = "would fold" if report.dry_run else "folded"
    kinds = ", ".join(f"{k} {n}" for k, n in c["by_target_kind"].items())
    what = f"{verb} {c['folded']}" + (f" ({kinds})" if kinds else "")
    if c["propagated"]:
        what += f", {c['propagated']} of them by scale propagation"
    if c["affine"]:
        what += f", {'would turn' if report.dry_run else 'turned'} {c['affine']} into Mul+Add"
    if c["converted"]:
        what += f", {'would convert' if report.dry_run else 'converted'} {c['converted']} to InstanceNorm"
    reasons = ", ".join(f"{r} {n}" for r, n in c["by_reason"].items())
    what += f"; left {c['left']}" + (f" ({reasons})" if reasons else "")
    grid.add_row("BatchNorm", Text(f"{_arrow(report.bn_before, report.bn_after)}: {what}"))
    known = None if not report.dry_run else report.predicted_counts
    # A PyTorch model written to .onnx: nodes of the exported graph, before and after its ONNX fold.
    unit = "exported ONNX nodes" if report.backend == "export_onnx" else "nodes"
    ops = (
        [f"{unit} {_arrow(report.nodes_before, report.nodes_after)}"]
        if known is None or "nodes" in known
        else []
    )
    if known is None or "params" in known:
        ops.append(f"parameters {_arrow(f'{report.params_before:,}', f'{report.params_after:,}')}")
    if ops:
        grid.add_row("ops", Text(", ".join(ops)))
    for key, row in _signature_rows(report.signature or {}):
        grid.add_row(key, row)
    v = report.verification
    if v is not None:
        grid.add_row("verification", _verification_line(v, report.verified_on))
    elif not report.dry_run:
        from bnfold.files.fold import NOTHING_CHANGED

        why = "not needed (nothing changed)" if NOTHING_CHANGED in report.notes else "skipped (--no-verify)"
        grid.add_row("verification", Text(why, style="yellow"))
    if report.flushed_denormals:  # the flush is the default: a row only when it changed something
        grid.add_row("denormals", f"{report.flushed_denormals:,} subnormal value(s) flushed to zero")
    for note in report.notes:
        grid.add_row("note", _t(note))
    grid.add_row("time", f"{report.total_seconds:.2f} s")
    console.print(grid)
    shown = list(report.verdicts) if verbose else list(report.skips)
    if not report.verdicts:
        console.print("No BatchNorm layer found.")
    elif shown:
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        cells = [_verdict_cells(v2) for v2 in shown]
        for cell in cells:
            table.add_row(*cell)
        console.print(Text("every BatchNorm:" if verbose else "left:", style="bold"))
        targets = _widest(clean(v2.target) for v2 in shown if isinstance(v2, Site))
        fixed = _widest(r[0].plain for r in cells) + _widest(r[1].plain for r in cells) + 4
        print_whole(console, table, fixed + targets)
    if report.pruned_channels:
        _render_pruned(console, report.pruned_channels)


def _render_pruned(console: Console, pruned: Any) -> None:
    """``--prune-constant-channels``: each layer with constant channels, pruned or why not."""
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for p in pruned:
        chans = ", ".join(str(c) for c in p.channels)
        if p.pruned:
            table.add_row(
                _t(p.layer),
                Text("pruned", style="green"),
                _t(f"channel(s) {chans}; constant moved into {p.next_layer}'s bias"),
            )
        else:
            table.add_row(
                _t(p.layer),
                Text("kept", style="yellow"),
                _t(f"channel(s) {chans}: {p.detail}" if chans else p.detail),
            )
    console.print(Text("constant channels:", style="bold"))
    print_whole(console, table, _widest(clean(p.layer) for p in pruned) + 10)


def _verdict_cells(v: Site | Skip) -> tuple[Text, Text, Text]:
    name = _t(v.bn)
    if isinstance(v, Site):
        if v.direction is Direction.AFFINE:
            return name, Text("Mul + Add", style="cyan"), _t(v.detail)
        if v.direction is Direction.CONVERTED:
            return name, Text(clean(v.target_kind), style="cyan"), _t(v.detail)
        into = (
            f"{clean(v.target)} ({clean(v.target_kind)}, {v.direction.value})"
            if v.target
            else f"({clean(v.target_kind)})"
        )  # folded by the ONNX exporter: no layer named
        status = "propagated" if v.direction is Direction.PROPAGATED else "folded"
        return name, Text(status, style="green"), Text(into + (f"; {clean(v.detail)}" if v.detail else ""))
    return name, Text(v.reason.value, style="yellow"), _t(v.text("cli"))


def _verification_line(v: VerifyReport, shapes: Mapping[str, Any] | None) -> Text:
    levels = ", ".join(
        "optimisations off" if lvl == "disable" else f"optimisation level {lvl}"
        for lvl in [v.optimization_level, *(e.optimization_level for e in v.extra)]
    )
    on = ", ".join(f"{clean(k)}={'x'.join(str(d) for d in s)}" for k, s in (shapes or {}).items())
    worst = v.worst()
    where = f" at {clean(worst.name)}" if worst is not None else ""
    verdict = "equivalent" if v.passed else "NOT equivalent"
    from bnfold.verification import runtimes_label

    return Text(
        f"{verdict}: max abs {v.max_abs_error:.2e}, rel {v.max_rel_error:.2e}{where} "
        f"({v.samples} sample{'s' if v.samples != 1 else ''}{', ' + on if on else ''}; {clean(runtimes_label(v))}, {levels})",
        style="green" if v.passed else "bold red",
    )


def _tol(value: float) -> str:
    """A tolerance as given (``1.2e-38``, ``1e-05``, ``0``): never rounded to another value."""
    return "0" if value == 0 else f"{value:.3g}"


def _verdict_text(v: VerifyReport) -> Text:
    return _verification_line(v, None)


def _worst_per_output(checks: tuple[OutputCheck, ...]) -> list[OutputCheck]:
    best: dict[str, OutputCheck] = {}
    for c in checks:
        cur = best.get(c.name)
        if cur is None or (not c.passed, c.max_rel_error) > (not cur.passed, cur.max_rel_error):
            best[c.name] = c
    return list(best.values())


def render_verify_report(console: Console, report: VerifyReport, *, title: str | None = None) -> None:
    """Per output (worst sample), the errors and tolerances; then the verdict, for every level run."""
    if title:
        console.print(_t(title, "bold"))
    for i, rep in enumerate((report, *report.extra)):
        if i:
            console.print(
                Text(f"onnxruntime optimisation level: {clean(rep.optimization_level)}", style="bold")
            )
        table = Table(box=None, padding=(0, 1), show_edge=False)
        table.add_column("output", no_wrap=True)
        table.add_column("shape", no_wrap=True)
        table.add_column("dtype", no_wrap=True)
        for col in ("abs err", "rel err", "bad", "atol", "rtol"):
            table.add_column(col, justify="right", no_wrap=True)
        table.add_column("ok?", no_wrap=True)
        worst = _worst_per_output(rep.checks)
        for c in worst:
            table.add_row(
                _t(c.name),
                "x".join(str(d) for d in c.shape) or "scalar",
                _t(c.dtype),
                f"{c.max_abs_error:.2e}",
                f"{c.max_rel_error:.2e}",
                str(c.mismatches),
                _tol(c.atol),
                _tol(c.rtol),
                Text("ok", style="green") if c.passed else Text("FAIL", style="bold red"),
            )
        print_whole(console, table, _widest(clean(c.name) for c in worst) + 70)
    console.print(_verdict_text(report))


def render_bench_report(console: Console, report: BenchReport) -> None:
    """Median latency of original and folded per runtime setting, its spread, and the speedup.

    The spread is the interquartile range of the runs (half of them fall inside it); the notes say
    when the runs disagree or the speedup is within that spread.
    """
    for note in report.notes:
        console.print(_t(note, "yellow"))
    console.print(
        Text(
            f"latency in ms, median [interquartile range] of {report.runs} runs after "
            f"{report.warmup} warm-up",
            style="bold",
        )
    )
    table = Table(box=None, padding=(0, 1), show_edge=False)
    table.add_column("runtime", no_wrap=True)
    table.add_column("original", justify="right", no_wrap=True)
    table.add_column("folded", justify="right", no_wrap=True)
    table.add_column("speedup", justify="right", no_wrap=True)
    for t in report.timings:
        noisy = t.disagreement() is not None
        style = "yellow" if noisy or t.speedup < 1.0 else "green"
        table.add_row(
            t.setting,
            _ms(t.original_ms, t.original_spread),
            _ms(t.folded_ms, t.folded_spread),
            Text(f"{t.speedup:.2f}x" + ("?" if noisy else ""), style=style),
        )
    print_whole(console, table, 90)
    shapes = ", ".join(f"{clean(k)}={'x'.join(map(str, v))}" for k, v in report.input_shapes.items())
    fold = report.fold
    console.print(
        Text(
            f"inputs: {shapes or '-'}; BatchNorm {fold.bn_before} -> {fold.bn_after}; "
            f"threads: {report.threads or 'default'}"
        )
    )


def _ms(median: float, spread: Any) -> str:
    if spread is None:
        return f"{median:.3f}"
    return f"{median:.3f} [{spread.q1:.3f}-{spread.q3:.3f}]"


def render_freeze_report(console: Console, result: FreezeReport, *, verbose: bool = False) -> None:
    """One summary line, then the BNs left as they were (with the reason); ``verbose`` lists every frozen layer."""
    frozen = list(result.frozen)
    left = [(s.bn, s.reason.value, s.text("cli")) for s in result.left]
    learn = "learnable scale/shift" if result.learnable else "fixed scale/shift buffers"
    f = result.files
    console.print(
        Text(
            f"{len(frozen)} BatchNorm frozen ({learn}), {len(left)} left; "
            f"{clean(f.source)} ({clean(f.source_format)}) -> {clean(f.output)} "
            f"({human_size(f.size_after)}) in {result.seconds:.2f} s"
        )
    )
    if not frozen and not left:
        console.print("No BatchNorm layer found: the model is written unchanged.")
    elif verbose and frozen:
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        for name, kind in frozen:
            table.add_row(_t(name), _t(kind))
        print_whole(
            console, table, _widest(clean(n) for n, _ in frozen) + _widest(clean(k) for _, k in frozen) + 2
        )
    if left:
        console.print(Text("BatchNorm layers left as they were:"))
        kept = Table.grid(padding=(0, 2))
        kept.add_column(no_wrap=True)
        kept.add_column(no_wrap=True)
        kept.add_column()
        for name, reason, detail in left:
            kept.add_row(_t(name), _t(reason), _t(detail))
        print_whole(
            console, kept, _widest(clean(n) for n, _, _ in left) + _widest(clean(r) for _, r, _ in left) + 4
        )


# -------------------------------------------------------------------------------------------- progress


def health_summary(h: HealthReport) -> str:
    """The one-line summary of a health audit."""
    if h.healthy:
        return f"health: {len(h.bns)} BatchNorm audited, no issue found"
    parts = [f"{len(h.flagged)} of {len(h.bns)} BatchNorm flagged"] + count_labels(
        (h.constant_channels, "constant channel(s) (gamma = 0)"),
        (h.near_zero_gamma, "near-zero gamma"),
        (h.small_var, "channel(s) with var <= eps"),
    )
    if h.subnormal:
        parts.append(f"the fold writes {h.subnormal:,} subnormal value(s) (fold --flush-denormals)")
    r = h.scale_range + h.folded_range
    for label, over, under in (
        ("float16", r.fp16_overflow, r.fp16_subnormal),
        ("bfloat16", r.bf16_overflow, r.bf16_subnormal),
    ):
        if over or under:
            parts.append(f"{label}: {over} overflow, {under} underflow")
    return "health: " + "; ".join(parts)


def render_health(console: Console, h: HealthReport, *, verbose: bool = False) -> None:
    """The one-line summary; with ``verbose`` first a table with one row per BatchNorm."""
    if verbose and h.bns:
        table = Table(title="BatchNorm health", title_justify="left")
        table.add_column("#", justify="right", style="dim")
        table.add_column("BatchNorm", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("max |scale|", justify="right", no_wrap=True)
        table.add_column("issues", overflow="fold")
        for i, b in enumerate(h.bns, 1):
            issues = "; ".join(b.issues) or b.note
            table.add_row(
                str(i),
                _t(b.bn),
                _t(b.status),
                f"{b.max_abs_scale:.3g}",
                _t(issues, "yellow") if b.issues else _t(issues or "ok", "green"),
            )
        print_whole(console, table, _widest(clean(b.bn) for b in h.bns) + 40)
    console.print(Text(health_summary(h), style="green" if h.healthy else "yellow"))
    render_quant(console, h, verbose=verbose)


@contextmanager
def progress_callback(
    console: Console, *, enabled: bool = True, stages: tuple[str, ...] = ()
) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one line per stage on ``console``.

    On a terminal a "starting" line shows at once (before any heavy import); each stage then shows as
    ``[2/4] folding`` when ``stages`` lists the stages the job will run, with its own count where the
    stage reports one. Transient: nothing is left on screen. Elsewhere the callback does nothing.
    """
    if not enabled or not console.is_terminal:
        yield _no_progress
        return
    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}
    order: list[str] = []  # stages as they come: numbered in that order, so [3/4] never follows [4/4]

    def update(stage: str, done: int, total: int) -> None:
        if "start" in tasks:
            bar.remove_task(tasks.pop("start"))
        if stage not in tasks:
            order.append(stage)
            tasks[stage] = bar.add_task(stage_label(stage, stages, order), total=max(total, 1))
        bar.update(tasks[stage], completed=done, total=max(total, 1))

    with bar:
        tasks["start"] = bar.add_task("starting", total=None)
        bar.refresh()
        yield update


def stage_label(stage: str, stages: tuple[str, ...], seen: list[str] | None = None) -> str:
    """``"[2/4] folding"`` for ``stage`` "fold" in ``stages`` ("load", "fold", "verify", "save").

    ``seen``: the stages in the order the job reached them (``stage`` last); then the number is the
    position in that order (a job may stage OUT before verifying it), and the total grows when the job
    runs a stage ``stages`` did not list (an export).
    """
    name = STAGES.get(stage, clean(stage))
    if seen is not None and stages:
        return f"[{seen.index(stage) + 1}/{max(len(stages), len(seen))}] {name}"
    return f"[{stages.index(stage) + 1}/{len(stages)}] {name}" if stage in stages else name


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


# ------------------------------------------------------------------------------------ quantisation


def quant_summary(h: HealthReport) -> str | None:
    """The one-line quantisation-readiness summary of a health audit; None when no layer is flagged."""
    import math

    from bnfold.health_records import QUANT_RATIO_FLAG

    bad = h.quant_flagged
    if not bad:
        return None
    worst = max(bad, key=lambda q: q.ratio)
    bits = math.log2(QUANT_RATIO_FLAG)
    return (
        f"quantisation: {len(bad)} of {len(h.quant)} folded layer(s) lose >= {bits:g} bits under per-tensor "
        f"int8 (worst: {clean(worst.layer)}, {worst.bits_lost:.1f} bits); use per-channel weight quantization "
        "or cross-layer equalisation"
    )


def fold_quant_summary(quant: tuple[LayerQuant, ...]) -> str | None:
    """The one-line quantisation-readiness summary after a fold (``FoldReport.quant``); None when no
    layer is flagged."""
    bad = [q for q in quant if q.flagged]
    if not bad:
        return None
    worst = max(bad, key=lambda q: q.ratio)
    return (
        f"quantisation: {len(bad)} layer(s) flagged for per-tensor int8 (worst: {clean(worst.layer)}, "
        f"{worst.bits_lost:.1f} bits lost); use per-channel quantization or cross-layer equalisation"
        + ("" if len(bad) == 1 else " (-v lists them)")
    )


def render_fold_quant(console: Console, quant: tuple[LayerQuant, ...], *, verbose: bool = False) -> None:
    """After ``fold`` without ``--health``: the summary line; with ``verbose`` first the flagged layers."""
    line = fold_quant_summary(quant)
    if line is not None:
        _render_quant_lines(console, line, tuple(q for q in quant if q.flagged), verbose)


def render_quant(console: Console, h: HealthReport, *, verbose: bool = False) -> None:
    """The quantisation summary line when a layer is flagged; with ``verbose`` first the flagged layers."""
    line = quant_summary(h)
    if line is not None:
        _render_quant_lines(console, line, h.quant_flagged, verbose)


def _render_quant_lines(console: Console, line: str, flagged: tuple[LayerQuant, ...], verbose: bool) -> None:
    if verbose:
        table = Table(title="Per-tensor int8 readiness (flagged layers)", title_justify="left")
        table.add_column("layer", overflow="fold")
        table.add_column("kind", no_wrap=True)
        table.add_column("ch", justify="right", no_wrap=True)
        table.add_column("max/median", justify="right", no_wrap=True)
        table.add_column("bits lost", justify="right", no_wrap=True)
        table.add_column("unfolded", justify="right", no_wrap=True)
        table.add_column("worst ch", justify="right", no_wrap=True)
        for q in flagged:
            table.add_row(
                _t(clean(q.layer)),
                q.kind,
                str(q.channels),
                f"{q.ratio:.3g}",
                f"{q.bits_lost:.1f}",
                f"{q.ratio_before:.3g}" if q.ratio_before else "-",
                str(q.worst_channel),
            )
        console.print(table)
    console.print(Text(line, style="yellow"))
