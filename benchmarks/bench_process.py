"""The whole ``bnfold fold --no-verify in.onnx out.onnx`` process against a plain load + save process.

What a CLI user waits for, interpreter start and imports included, measured side by side in one run
(fresh processes, interleaved rounds in a rotating order, medians):

* **floor**: ``python -c "import onnx; onnx.save(onnx.load(a), b)"`` (with external data:
  ``onnx.save(..., save_as_external_data=True)``, as a user's script would write it);
* **bnfold**: ``python -m bnfold fold --no-verify a b --quiet`` (load with the checks, fold, streamed
  atomic save; external data kept as the input has it);
* **bnfold API**: the same job through the Python API in a plain script (``io.load_file``,
  ``bnfold.onnx.fold_model``, ``io.save``): the CLI's own share is ``bnfold - bnfold API``;
* **imports**: ``python -c "import bnfold.cli"`` and ``python -c "import onnx"``: what the two pay
  before any work, to tell the CLI's import cost from the job's;
* with ``--baseline DIR`` (another checkout of bnfold, e.g. ``git worktree add /tmp/base main``) also
  **bnfold (baseline)** and **import bnfold.cli (baseline)**, the same commands run from DIR, in the
  same rounds: a change is judged against the code before it on the same machine at the same time.

Two variants of one ResNet-50 (``models.resnet.resnet50``, 53 BN, realistic BN statistics, exported
with every BN kept): **inline** (one 100 MB file) and **external data** (a small model file + one data
file). The figure is ``bnfold / floor`` per variant (target: at most 1.2), in wall time and in CPU
time (user + system: what others running on the machine change least). ``--breakdown`` also prints
the stages inside one process (the floor's ``onnx.load`` / ``onnx.save`` against bnfold's
``io.load_file`` / ``fold_model`` / ``io.save``, imports done) and the import times of the fold
process by top-level package (``python -X importtime``), to tell where the difference goes.

    python benchmarks/bench_process.py [--quick] [--repeats 7] [--breakdown] [--model in.onnx]
        [--baseline DIR]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, ensure_repo_on_path, env_summary, make_parser, markdown_table  # noqa: E402

ensure_repo_on_path()

_FLOOR_INLINE = "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
_FLOOR_EXTERNAL = (
    "import onnx, os, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2], save_as_external_data=True, "
    "location=os.path.basename(sys.argv[2]) + '.data')"
)


_API = (
    "import sys; from bnfold import io; from bnfold.onnx import fold_model; "
    "loaded = io.load_file(sys.argv[1], lazy_external_data=True); m = fold_model(loaded.model, inplace=True)[0]; "
    "io.save(m, sys.argv[2], external_data=bool(loaded.data_files) or None)"
)


def _env(root: Path = REPO_ROOT) -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    )


_BASELINE = " (baseline)"
"""Suffix of the commands run from ``--baseline DIR`` (with DIR first on PYTHONPATH)."""


def _clear(folder: Path, keep: set[str]) -> None:
    """Remove what a job wrote (outputs and their data files), so that every run starts alike."""
    for p in folder.iterdir():
        if p.name not in keep:
            p.unlink()


def _commands(src: Path, dst: Path, external: bool, baseline: Path | None = None) -> dict[str, list[str]]:
    py = sys.executable
    commands = {
        "floor": [py, "-c", _FLOOR_EXTERNAL if external else _FLOOR_INLINE, str(src), str(dst)],
        "bnfold": [py, "-m", "bnfold", "fold", "--no-verify", "--quiet", str(src), str(dst)],
        "bnfold API": [py, "-c", _API, str(src), str(dst)],
        "import bnfold.cli": [py, "-c", "import bnfold.cli"],
        "import onnx": [py, "-c", "import onnx"],
    }
    if baseline is not None:
        for name in ("bnfold", "import bnfold.cli"):
            commands[name + _BASELINE] = commands[name]
    return commands


def time_processes(
    commands: dict[str, list[str]], folder: Path, keep: set[str], repeats: int, baseline: Path | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median CPU time (user + system) of each command, in fresh processes,
    interleaved with a rotating order (the ``(baseline)`` commands run with ``baseline`` first on
    PYTHONPATH). CPU time barely moves when others load the machine; wall time is what a user waits."""
    names = list(commands)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    envs = {n: _env(baseline) if baseline is not None and n.endswith(_BASELINE) else _env() for n in names}
    # every process runs in ``folder``: ``python -c`` / ``-m`` put the working directory before
    # PYTHONPATH, so from a checkout's root the baseline would import that checkout's bnfold
    for n in names:  # warm-up: page cache, .pyc files
        subprocess.run(commands[n], env=envs[n], check=True, capture_output=True, cwd=folder)
        _clear(folder, keep)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(commands[n], env=envs[n], check=True, capture_output=True, cwd=folder)
            times[n].append(time.perf_counter() - t0)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[n].append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
            _clear(folder, keep)
    return (
        {n: statistics.median(v) for n, v in times.items()},
        {n: statistics.median(v) for n, v in cpu.items()},
    )


_STAGES = """
import json, os, statistics, sys, time
import onnx
from bnfold import io as bio
from bnfold.onnx import fold_model
src, dst, external, repeats = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
folder = os.path.dirname(dst)
keep = set(os.listdir(folder))

def clear():
    for n in set(os.listdir(folder)) - keep:
        os.unlink(os.path.join(folder, n))

times = {k: [] for k in ("onnx.load", "onnx.save", "io.load_file", "fold_model", "io.save")}
for _ in range(repeats):
    t0 = time.perf_counter(); m = onnx.load(src); t1 = time.perf_counter()
    onnx.save(m, dst, save_as_external_data=external, location=os.path.basename(dst) + ".data")
    t2 = time.perf_counter(); clear(); del m
    # as the CLI does without verification: weights left in their files until the fold reads them
    t3 = time.perf_counter(); m = bio.load_file(src, lazy_external_data=True).model; t4 = time.perf_counter()
    fold_model(m, inplace=True); t5 = time.perf_counter()
    bio.save(m, dst, external_data=external); t6 = time.perf_counter(); clear(); del m
    for k, v in zip(times, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5)):
        times[k].append(v)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def stage_breakdown(src: Path, dst: Path, external: bool, repeats: int) -> dict[str, float]:
    """Medians of each stage inside one process (imports done): the floor's load and save, and
    bnfold's load (checks included), fold and streamed save, alternated in each round."""
    out = subprocess.run(
        [sys.executable, "-c", _STAGES, str(src), str(dst), "1" if external else "0", str(repeats)],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def import_breakdown(command: list[str]) -> list[tuple[str, float]]:
    """Cumulative import time (s) of each top-level package the process imports (``-X importtime``)."""
    out = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], env=_env(), capture_output=True, text=True, check=True
    )
    totals: dict[str, float] = {}
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if not cumulative.isdigit():
            continue
        # top level = no leading spaces in the name column (importtime indents nested imports)
        raw = line.rsplit("|", 1)[1]
        if raw[1:2] != " ":
            top = name.split(".")[0]
            totals[top] = totals.get(top, 0.0) + int(cumulative) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])[:12]


def main() -> None:
    ap = make_parser(__doc__.splitlines()[0], repeats=7, quick_repeats=3)
    ap.add_argument("--breakdown", action="store_true", help="import times of the fold process by package")
    ap.add_argument("--model", type=Path, default=None, help="use this .onnx instead of exporting ResNet-50")
    ap.add_argument(
        "--baseline", type=Path, default=None, help="another bnfold checkout, timed in the same rounds"
    )
    args = ap.parse_args()
    import onnx
    from bench_onnx_fold import build_resnet50

    print(env_summary())
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as pyc:
        # every process reads cached bytecode, as an installed package (and onnx) does: with
        # PYTHONDONTWRITEBYTECODE set, bnfold alone was compiled from source in every run; the cache
        # lives in a temporary folder (PYTHONPYCACHEPREFIX), never in a checkout, filled by the warm-up
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = pyc
        folder = Path(tmp)
        inline = folder / "resnet50.onnx"
        if args.model is not None:
            inline.write_bytes(args.model.read_bytes())
        else:
            t0 = time.perf_counter()
            build_resnet50(inline, args.quick)
            print(
                f"exported ResNet-50{' (narrow)' if args.quick else ''} in {time.perf_counter() - t0:.1f} s"
            )
        external = folder / "resnet50_ext.onnx"
        onnx.save(
            onnx.load(str(inline)),
            str(external),
            save_as_external_data=True,
            location="resnet50_ext.onnx.data",
        )
        keep = {p.name for p in folder.iterdir()}
        print(
            f"inline {inline.stat().st_size / 1e6:.1f} MB; external data {external.stat().st_size / 1e3:.0f} kB "
            f"+ {(folder / 'resnet50_ext.onnx.data').stat().st_size / 1e6:.1f} MB; {args.repeats} rounds\n"
        )
        rows = []
        for label, src, ext in (("inline", inline, False), ("external data", external, True)):
            med, cpu = time_processes(
                _commands(src, folder / "out.onnx", ext, args.baseline),
                folder,
                keep,
                args.repeats,
                args.baseline,
            )
            floor, cpu_floor = med["floor"], cpu["floor"]
            for name, t in med.items():
                rows.append(
                    [
                        label,
                        name,
                        f"{t:.3f}",
                        f"{t / floor:.2f}",
                        f"{cpu[name]:.3f}",
                        f"{cpu[name] / cpu_floor:.2f}",
                    ]
                )
            before = "bnfold" + _BASELINE
            print(
                f"{label}: bnfold / floor = {med['bnfold'] / floor:.2f} (target <= 1.2)"
                + (f", baseline {med[before] / floor:.2f}" if before in med else "")
                + f"; CPU time {cpu['bnfold'] / cpu_floor:.2f}"
                + (f", baseline {cpu[before] / cpu_floor:.2f}" if before in cpu else "")
                + f"; import bnfold.cli {med['import bnfold.cli']:.3f} s, import onnx {med['import onnx']:.3f} s"
            )
        print()
        print(markdown_table(["variant", "process", "median s", "x floor", "CPU s", "CPU x floor"], rows))
        if args.breakdown:
            print("\nstages inside one process (imports done; medians, s):")
            stage_rows = []
            for label, src, ext in (("inline", inline, False), ("external data", external, True)):
                st = stage_breakdown(src, folder / "out.onnx", ext, args.repeats)
                floor_s, ours = (
                    st["onnx.load"] + st["onnx.save"],
                    st["io.load_file"] + st["fold_model"] + st["io.save"],
                )
                stage_rows.append([label, *(f"{st[k]:.3f}" for k in st), f"{ours / floor_s:.2f}"])
                _clear(folder, keep)
            print(
                markdown_table(
                    [
                        "variant",
                        "onnx.load",
                        "onnx.save",
                        "io.load_file",
                        "fold_model",
                        "io.save",
                        "bnfold / floor",
                    ],
                    stage_rows,
                )
            )
            cmd = _commands(inline, folder / "out.onnx", False)["bnfold"]
            print("\nimports of the fold process (cumulative s, top-level packages):")
            print(markdown_table(["package", "s"], [[k, f"{v:.3f}"] for k, v in import_breakdown(cmd)]))
            _clear(folder, keep)


if __name__ == "__main__":
    main()
