"""Golden outputs: the inputs and outputs of a verification run, saved to and read from one ``.npz`` file.

A recording holds, per sample, the inputs fed to both models, the reference's outputs and (when a
candidate ran) the candidate's outputs. With it one can

* check a model against outputs recorded earlier (another machine, another runtime): run it on the
  recorded inputs and compare with the recorded reference outputs;
* re-check a saved comparison against new thresholds without running any model.

File layout (``numpy.savez``, read with ``allow_pickle=False``): a ``__meta__`` array holding a JSON
document (format version, input and output names, dtypes, sample count, the runtimes that produced the
outputs) and one array per tensor, ``in_<sample>_<i>``, ``ref_<sample>_<i>``, ``cand_<sample>_<i>``
(``i`` indexes the name lists, so any tensor name is safe). bfloat16 arrays are stored as their raw
uint16 pattern and restored from the dtype recorded in the meta data. The file is written atomically.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnfold.errors import OptionError, OutputError

from .inputs import np_dtype, read_npz

__all__ = ["Recording", "save_outputs", "load_outputs", "GOLDEN_VERSION"]

GOLDEN_VERSION = 1
"""Version of the ``.npz`` layout; a file of another version is refused."""


@dataclass(slots=True)
class Recording:
    """Inputs and outputs of a verification run, per sample."""

    input_names: list[str]
    output_names: list[str]
    feeds: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]
    candidate: list[dict[str, np.ndarray]] | None = None
    runtimes: dict[str, str] = field(default_factory=dict)
    """role -> runtime that produced those outputs (informative)."""


def _store(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16) if a.dtype.name == "bfloat16" else np.asarray(a)


def save_outputs(path: str | os.PathLike[str], rec: Recording) -> None:
    """Write ``rec`` to ``path`` (``.npz``), atomically.

    Raises:
        OutputError: the file cannot be written.
    """
    p = Path(path)
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    groups: list[tuple[str, list[str], Sequence[Mapping[str, np.ndarray]]]] = [
        ("in", rec.input_names, rec.feeds),
        ("ref", rec.output_names, rec.reference),
    ]
    if rec.candidate is not None:
        groups.append(("cand", rec.output_names, rec.candidate))
    for prefix, names, samples in groups:
        for s, tensors in enumerate(samples):
            for i, n in enumerate(names):
                key = f"{prefix}_{s}_{i}"
                arrays[key] = _store(tensors[n])
                dtypes[key] = tensors[n].dtype.name
    meta = {
        "format": "bnfold-golden",
        "version": GOLDEN_VERSION,
        "inputs": rec.input_names,
        "outputs": rec.output_names,
        "samples": len(rec.feeds),
        "has_candidate": rec.candidate is not None,
        "dtypes": dtypes,
        "runtimes": rec.runtimes,
    }
    arrays["__meta__"] = np.array(json.dumps(meta))
    from bnfold.io import atomic_path

    try:
        with atomic_path(p) as tmp:  # checks OUT (never a directory, FIFO or device) and fits NAME_MAX
            _write_npz(tmp, arrays)
    except OSError as e:
        raise OutputError(f"{p}: cannot write the outputs ({e.strerror or e})") from e


def _write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """``numpy.savez`` without its time stamps: the same recording gives the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def load_outputs(path: str | os.PathLike[str]) -> Recording:
    """Read a recording written by :func:`save_outputs`.

    The file is read by :func:`bnfold.verification.inputs.read_npz`: what each entry declares is checked before it is
    decompressed, so a small file cannot make bnfold allocate gigabytes.

    Raises:
        OptionError: the file is missing, not a bnfold golden ``.npz``, of another version, malformed
            (one line naming what), or declaring more data than it may hold.
    """
    from bnfold.io.sniff import not_a_file

    p = Path(path)
    if (why := not_a_file(p)) is not None:
        raise OptionError(f"{p}: --load-outputs: {why}")
    data = read_npz(p, "--load-outputs")
    try:
        if "__meta__" not in data:
            raise OptionError(f"{p}: not a bnfold outputs file (no __meta__ entry)")
        meta = json.loads(str(data["__meta__"]))
        if (
            not isinstance(meta, dict)
            or meta.get("format") != "bnfold-golden"
            or meta.get("version") != GOLDEN_VERSION
        ):
            raise OptionError(f"{p}: not a bnfold outputs file of version {GOLDEN_VERSION}")
        dtypes: dict[str, str] = meta["dtypes"]

        def get(key: str) -> np.ndarray:
            a = np.asarray(data[key])
            return a.view(np_dtype("bfloat16")) if dtypes.get(key) == "bfloat16" else a

        ins, outs, n = list(meta["inputs"]), list(meta["outputs"]), int(meta["samples"])
        if n < 1 or not outs or len(set(ins)) != len(ins) or len(set(outs)) != len(outs):
            raise OptionError(f"{p}: holds no sample, no output, or a name twice")
        if not all(isinstance(x, str) for x in (*ins, *outs)):
            raise OptionError(f"{p}: input and output names must be strings")
        feeds = [{name: get(f"in_{s}_{i}") for i, name in enumerate(ins)} for s in range(n)]
        ref = [{name: get(f"ref_{s}_{i}") for i, name in enumerate(outs)} for s in range(n)]
        cand = (
            [{name: get(f"cand_{s}_{i}") for i, name in enumerate(outs)} for s in range(n)]
            if meta.get("has_candidate")
            else None
        )
        runtimes = meta.get("runtimes", {})
        if not isinstance(runtimes, dict) or not all(isinstance(v, str) for v in runtimes.values()):
            raise OptionError(f"{p}: 'runtimes' must map roles to names")
        return Recording(ins, outs, feeds, ref, cand, {str(k): v for k, v in runtimes.items()})
    except OptionError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, json.JSONDecodeError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise OptionError(f"{p}: not a readable bnfold outputs file ({type(e).__name__}: {first})") from e
