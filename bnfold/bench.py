"""Latency of a model before and after folding: the measurement core behind ``bnfold bench``.

Rules:
    * the same seeded inputs feed the original and the folded model;
    * each measurement is the median of ``runs`` timed calls after ``warmup`` untimed ones
      (``time.perf_counter``), with its spread (:class:`Spread`: min, quartiles, max), original and
      folded measured alternately per setting so that both see the same machine state;
    * the runs are checked against each other: a measurement whose interquartile range is over
      :data:`NOISY` of its median, or a speedup whose two interquartile ranges overlap, gets a note
      (the figures then say more about the machine than about the fold);
    * onnxruntime is measured with graph optimisations disabled (``ORT_DISABLE_ALL``: what folding
      itself buys) and enabled (``ORT_ENABLE_ALL``: what is left once onnxruntime fuses by itself);
      PyTorch files are also measured in eager mode (``torch.no_grad``), and exported to ONNX with
      ``TrainingMode.PRESERVE`` so that the exporter does not fold the original behind our back;
    * speedup = original median / folded median (> 1: folding made it faster). Folding is not always
      faster; the figures are reported as measured.

Nothing here prints; an ONNX file never imports torch.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .dtypes import to_numpy
from .errors import OptionError
from .records import FoldReport, file_entry

__all__ = ["Timing", "Spread", "BenchReport", "time_call", "time_runs", "bench_onnx", "bench_file", "NOISY"]

NOISY = 0.25
"""A measurement is noisy when its interquartile range exceeds this fraction of its median."""

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class Spread:
    """How the timed runs of one measurement spread, in milliseconds."""

    min: float
    q1: float
    median: float
    q3: float
    max: float

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> Spread:
        t = sorted(float(x) for x in times_ms)
        if len(t) == 1:
            return cls(t[0], t[0], t[0], t[0], t[0])
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
        return cls(t[0], q1, float(statistics.median(t)), q3, t[-1])

    @property
    def relative_iqr(self) -> float:
        """Interquartile range over the median (0: every run the same)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"min": self.min, "q1": self.q1, "median": self.median, "q3": self.q3, "max": self.max}


@dataclass(frozen=True, slots=True)
class Timing:
    """Median latency of original and folded under one runtime setting (and how the runs spread)."""

    setting: str
    """"onnxruntime ORT_DISABLE_ALL", "onnxruntime ORT_ENABLE_ALL" or "pytorch eager"."""
    original_ms: float
    folded_ms: float
    original_spread: Spread | None = None
    folded_spread: Spread | None = None

    @property
    def speedup(self) -> float:
        return self.original_ms / self.folded_ms if self.folded_ms > 0 else float("inf")

    def disagreement(self) -> str | None:
        """Why these runs do not support a speedup figure, or None (see the module rules)."""
        o, f = self.original_spread, self.folded_spread
        if o is None or f is None:
            return None
        noisy = [(label, s) for label, s in (("original", o), ("folded", f)) if s.relative_iqr > NOISY]
        if noisy:
            return (
                f"{self.setting}: the runs disagree ("
                + ", ".join(f"{label}: {s.q1:.3g}-{s.q3:.3g} ms around {s.median:.3g}" for label, s in noisy)
                + "); the machine is busy or the runs too few: rerun with more --runs"
            )
        if o.q1 <= f.q3 and f.q1 <= o.q3 and self.original_ms != self.folded_ms:
            return (
                f"{self.setting}: original and folded differ by less than their run-to-run spread "
                f"({o.q1:.3g}-{o.q3:.3g} ms vs {f.q1:.3g}-{f.q3:.3g} ms): the speedup "
                f"{self.speedup:.2f}x is within noise"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "original_ms": self.original_ms,
            "folded_ms": self.folded_ms,
            "speedup": self.speedup,
            "original_spread_ms": None if self.original_spread is None else self.original_spread.to_dict(),
            "folded_spread_ms": None if self.folded_spread is None else self.folded_spread.to_dict(),
        }


def _spread_notes(timings: Sequence[Timing]) -> list[str]:
    return [why for t in timings if (why := t.disagreement()) is not None]


@dataclass(slots=True)
class BenchReport:
    """Latency figures for one model file."""

    model: str
    format: str
    runs: int
    warmup: int
    threads: int
    input_shapes: dict[str, tuple[int, ...]]
    timings: list[Timing] = field(default_factory=list)
    fold: FoldReport = field(default_factory=lambda: FoldReport(backend="onnx"))
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The body of ``bnfold bench --json`` (the CLI adds the common head): the one serialisation."""
        return {
            "model": file_entry(self.model, self.format),
            "runs": self.runs,
            "warmup": self.warmup,
            "threads": self.threads,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "timings": [t.to_dict() for t in self.timings],
            "summary": self.fold.summary(),
            "notes": list(self.notes),
        }


def time_call(
    fn: Callable[[], Any], *, runs: int, warmup: int, tick: Callable[[], None] | None = None
) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after ``warmup`` calls."""
    return time_runs(fn, runs=runs, warmup=warmup, tick=tick).median


def time_runs(
    fn: Callable[[], Any], *, runs: int, warmup: int, tick: Callable[[], None] | None = None
) -> Spread:
    """The spread (median, quartiles, extremes) of ``fn()``'s wall time in ms over ``runs`` calls."""
    for _ in range(warmup):
        fn()
        if tick:
            tick()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if tick:
            tick()
    return Spread.of(times)


def _onnx_inputs(model: Any, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    from bnfold.verification.inputs import onnx_input_specs, random_inputs, resolve_shapes

    specs = onnx_input_specs(model)
    return random_inputs(specs, resolve_shapes(specs, shapes), np.random.default_rng(seed))


def _session(data: bytes | str, level: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if level == "disable"
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    if threads > 0:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def bench_onnx(
    original: bytes | str,
    folded: bytes | str,
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int,
    warmup: int,
    threads: int = 0,
    tick: Callable[[], None] | None = None,
) -> list[Timing]:
    """Median latency of two serialized ONNX models (or paths) at ORT_DISABLE_ALL and ORT_ENABLE_ALL."""
    timings = []
    for level, label in (("disable", "onnxruntime ORT_DISABLE_ALL"), ("all", "onnxruntime ORT_ENABLE_ALL")):
        spreads = []
        for data in (original, folded):
            sess = _session(data, level, threads)
            names = {i.name for i in sess.get_inputs()}
            feed = {k: v for k, v in feeds.items() if k in names}
            spreads.append(time_runs(partial(sess.run, None, feed), runs=runs, warmup=warmup, tick=tick))
        timings.append(Timing(label, spreads[0].median, spreads[1].median, spreads[0], spreads[1]))
    return timings


def bench_file(
    src: str | os.PathLike[str],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int = 0,
    affine: bool = False,
    model_factory: str | None = None,
    trust_pickle: bool = False,
    input_shapes: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    notice: Callable[[str], None] | None = None,
) -> BenchReport:
    """Load ``src``, fold it in memory, and time original and folded (see the module rules).

    Args:
        src: the model file.
        runs: timed runs per measurement (>= 1); the median is kept.
        warmup: untimed runs before timing (>= 0).
        threads: onnxruntime intra-op threads and torch threads (0: the runtime's default).
        affine: fold with ``affine=True`` (ONNX).
        model_factory, trust_pickle: as for :class:`bnfold.files.LoadSettings`.
        input_shapes: ``["name=1x3x224x224"]`` or ``{name: shape}``; needed for a PyTorch module.
        seed: seed of the random inputs.
        progress: ``progress(stage, done, total)`` callback ("bench" stage, one step per call).
        notice: called with a sentence before timing starts when there is nothing to fold.

    Returns:
        A :class:`BenchReport`.
    """
    from bnfold.verification.bounds import MAX_RUNS, MAX_THREADS, MAX_WARMUP, check_at_most, check_shape_sizes
    from bnfold.verification.inputs import parse_shapes_for

    from . import io as bio
    from .api import fold_with_report
    from .errors import BnfoldError, with_context

    if runs < 1:
        raise OptionError(f"--runs {runs}: must be >= 1")
    if warmup < 0:
        raise OptionError(f"--warmup {warmup}: must be >= 0")
    if threads < 0:
        raise OptionError(f"--threads {threads}: must be >= 0")
    check_at_most("--runs", runs, MAX_RUNS)
    check_at_most("--warmup", warmup, MAX_WARMUP)
    check_at_most("--threads", threads, MAX_THREADS)
    check_shape_sizes(input_shapes or ())
    prog = progress or (lambda stage, done, total: None)
    src_p = Path(src)
    if seed < 0:
        raise OptionError(f"--seed {seed}: must be >= 0")
    say = notice or (lambda text: None)
    shapes = parse_shapes_for(input_shapes, src_p)
    factory = bio.resolve_factory(model_factory) if model_factory else None
    prog("load", 0, 1)
    loaded = bio.load_file(src_p, model_factory=factory, trust_pickle=trust_pickle)
    model, fmt = loaded.model, loaded.format
    prog("load", 1, 1)

    if fmt == "onnx":
        try:
            feeds = _onnx_inputs(model, shapes, seed)
        except BnfoldError as e:
            raise with_context(e, str(src_p)) from e
        original = model.SerializeToString()
        folded, report = fold_with_report(model, affine=affine, inplace=True)
        notes = _already_folded(src_p, report, say)
        folded_bytes = folded.SerializeToString()
        total = 4 * (runs + warmup)
        done = [0]

        def tick() -> None:
            done[0] += 1
            prog("bench", done[0], total)

        timings = bench_onnx(
            original, folded_bytes, feeds, runs=runs, warmup=warmup, threads=threads, tick=tick
        )
        return BenchReport(
            model=str(src_p),
            format=fmt,
            runs=runs,
            warmup=warmup,
            threads=threads,
            input_shapes={k: tuple(v.shape) for k, v in feeds.items()},
            timings=timings,
            fold=report,
            notes=[*notes, *_spread_notes(timings)],
        )
    return _bench_torch(
        src_p,
        fmt,
        model,
        loaded.example_inputs,
        shapes,
        runs=runs,
        warmup=warmup,
        threads=threads,
        seed=seed,
        progress=prog,
        say=say,
    )


def _already_folded(src: Path, report: FoldReport, say: Callable[[str], None]) -> list[str]:
    """A note, said before any timing, when folding changes nothing (the file is folded already)."""
    if report.folded:
        return []
    what = "has no BatchNorm" if not report.bn_before else f"has {report.bn_before} BatchNorm, none foldable"
    note = f"{src}: {what}: original and folded are the same model (already folded?)"
    say(note)
    return [note]


def _bench_torch(
    src: Path,
    fmt: str,
    model: Any,
    own_examples: tuple[Any, ...] | None,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    runs: int,
    warmup: int,
    threads: int,
    seed: int,
    progress: ProgressFn,
    say: Callable[[str], None],
) -> BenchReport:
    import torch

    from .api import fold_with_report

    is_ep = isinstance(model, torch.export.ExportedProgram)
    from bnfold.verification.inputs import torch_examples

    # An exported program runs on its own example inputs (its graph is specialised to them).
    args = torch_examples(model, {} if is_ep else shapes, None, seed, src, own_examples)
    folded, report = fold_with_report(model) if is_ep else fold_with_report(model, example_inputs=args)
    notes = _already_folded(src, report, say)
    # An exported program is called through its GraphModule (eval semantics are fixed in the graph).
    runnable = (model.module(), folded.module()) if is_ep else (model, folded)
    if threads > 0:
        torch.set_num_threads(threads)
    total = 6 * (runs + warmup)
    done = [0]

    def tick() -> None:
        done[0] += 1
        progress("bench", done[0], total)

    timings: list[Timing] = []
    with torch.no_grad():
        eager = [time_runs(partial(m, *args), runs=runs, warmup=warmup, tick=tick) for m in runnable]
    names = [f"input{i}" for i in range(len(args))]
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        paths = []
        for name, m in (("original", model), ("folded", folded)):
            path = os.path.join(tmp, f"{name}.onnx")
            if is_ep:  # optimize=False: the exporter must not fold the original behind our back
                prog = torch.onnx.export(m, dynamo=True, optimize=False, verbose=False)
                prog.save(path)  # type: ignore[union-attr]
            else:
                torch.onnx.export(
                    m,
                    args,
                    path,
                    dynamo=False,
                    training=torch.onnx.TrainingMode.PRESERVE,
                    input_names=names,
                )
            paths.append(path)
        if is_ep:
            import onnx

            graph = onnx.load(paths[0], load_external_data=False).graph
            init = {t.name for t in graph.initializer}
            names = [i.name for i in graph.input if i.name not in init]
        feeds = {n: to_numpy(a) for n, a in zip(names, args)}
        timings.extend(
            bench_onnx(paths[0], paths[1], feeds, runs=runs, warmup=warmup, threads=threads, tick=tick)
        )
    timings.append(Timing("pytorch eager", eager[0].median, eager[1].median, eager[0], eager[1]))
    return BenchReport(
        model=str(src),
        format=fmt,
        runs=runs,
        warmup=warmup,
        threads=threads,
        input_shapes={n: tuple(a.shape) for n, a in zip(names, args)},
        timings=timings,
        fold=report,
        notes=[*notes, *_spread_notes(timings)],
    )
