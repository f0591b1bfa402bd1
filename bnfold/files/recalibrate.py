"""``bnfold recalibrate`` on files: new BatchNorm statistics from data, for ONNX files and PyTorch checkpoints.

Data (``--data FILE.npz``), inputs by name, in one of two layouts (decided from the names):

    * **split**: one array per model input, named like the input, with a leading sample axis of the
      same length ``N`` in every array; ``--batch-size B`` cuts it into ``ceil(N / B)`` batches in
      order (the last one may be smaller). Default ``B``: the model's fixed batch dimension, else 32.
    * **numbered**: arrays ``NAME__0``, ``NAME__1``, ... for every input ``NAME``, the same indices
      ``0..k-1`` for every input: each index is one batch as it is (``--batch-size`` is refused).

Rules:
    * every array is checked before the first batch runs, from the ``.npy`` headers alone: every input
      has data and nothing else is there, the dtype kinds match (floating data is cast to the input's
      floating dtype, integers to its integer dtype), the rank and every fixed dimension match;
    * batches are streamed: each array is read straight from the archive, ``B`` rows at a time
      (compressed or not), so memory is one batch whatever the size of the data; NaN or inf in a
      batch stops the job naming the array and the batch;
    * ONNX (:mod:`bnfold.onnx.recalibrate`): one pass over the data per BN depth (``upstream="new"``,
      default) or one pass with every BN in training mode (``"batch"``, :func:`bnfold.recalibrate`'s
      definition); the statistics are
      written in the file's dtype and nothing else changes; ``--fold`` then folds the recalibrated
      model through the ``fold`` job (verified against the recalibrated model) into OUT;
    * PyTorch checkpoints (a state_dict with ``--model``, or a pickled module with ``--trust-pickle``):
      :func:`bnfold.recalibrate` with the arrays passed as keyword arguments of ``forward``; saved in
      the source's kind. ``.pt2`` programs: the same definition on the program's BN calls
      (:func:`_pt2`), the arrays named after the program's inputs, saved as ``.pt2``;
    * any failure leaves nothing written (OUT is staged and renamed into place) and MODEL unchanged.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bnfold.errors import InputError, OptionError, UnsupportedModelError
from bnfold.onnx.recalibrate import BnChange
from bnfold.records import FileInfo, FoldReport

from .load import ProgressFn, file_info, load, noop
from .output import check_output, same_file, staged
from .settings import OUTPUT_FORMATS, LoadSettings

__all__ = [
    "RecalibrateSettings",
    "RecalibrationReport",
    "NpzBatches",
    "recalibrate_file",
    "DEFAULT_BATCH_SIZE",
]

DEFAULT_BATCH_SIZE = 32
"""Rows per batch in the split layout when the model does not fix its batch dimension."""

_NUMBERED = re.compile(r"^(.+)__(\d+)$")


@dataclass(frozen=True, slots=True)
class RecalibrateSettings:
    """The options of ``bnfold recalibrate`` (see the module docstring)."""

    data: str | os.PathLike[str]
    batch_size: int | None = None
    pooled: bool = False
    prior: float | None = None
    fold: bool = False
    upstream: str | None = None
    """``"new"`` (ONNX default) or ``"batch"`` (PyTorch's train-mode pass; the only one for checkpoints)."""
    in_place: bool = False
    external_data: bool | None = None
    load: LoadSettings = field(default_factory=LoadSettings)


@dataclass(frozen=True, slots=True)
class RecalibrationReport:
    """What ``bnfold recalibrate`` did: the files, the data, the options and one record per BN."""

    files: FileInfo
    data: str
    layout: str
    batch_size: int | None
    batches: int
    samples: int
    pooled: bool
    prior: float | None
    upstream: str
    passes: int
    changes: tuple[BnChange, ...]
    fold: FoldReport | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.files.source,
            "output": self.files.output,
            "format": self.files.source_format,
            "written": self.files.written,
            "data": self.data,
            "layout": self.layout,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "samples": self.samples,
            "pooled": self.pooled,
            "prior": self.prior,
            "upstream": self.upstream,
            "passes": self.passes,
            "recalibrated": len(self.changes),
            "bns": [c.to_dict() for c in self.changes],
            "fold": None
            if self.fold is None
            else {
                "bn_before": self.fold.bn_before,
                "bn_after": self.fold.bn_after,
                "verified": None if self.fold.verification is None else self.fold.verification.passed,
            },
            "seconds": float(self.seconds),
        }


# ------------------------------------------------------------------------------------------- data
@dataclass(frozen=True, slots=True)
class _Member:
    """One array of the archive: its member name, shape, dtype, and where its rows start."""

    key: str
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran: bool


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    from numpy.lib import format as npf

    version = npf.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npf.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npf.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = npf._read_array_header(f, version)  # type: ignore[attr-defined]
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


class NpzBatches:
    """The batches of a ``--data`` archive, streamed (see the module docstring for the layouts).

    Calling the object starts a pass: it yields ``{name: array}`` per batch, each array read from the
    archive when its batch comes. ``specs`` (``name``, ``dtype``, ``dims`` as in
    :class:`bnfold.verification.inputs.InputSpec`) are the model's inputs; ``None`` (a PyTorch module) takes the
    names as they are and checks neither dtypes nor shapes.

    Raises:
        OptionError: the file is missing, not an ``.npz``, empty, the names do not fit a layout, or
            ``batch_size`` is given with the numbered layout.
        InputError: a dtype, rank or fixed dimension that does not match an input, arrays of the
            split layout with different lengths, no row at all; while iterating, NaN/inf in a batch.
    """

    def __init__(
        self, path: str | os.PathLike[str], specs: Sequence[Any] | None, batch_size: int | None
    ) -> None:
        self.path = Path(path)
        where = f"{self.path}: --data"
        from bnfold.io.sniff import not_a_file

        if (why := not_a_file(self.path)) is not None:
            raise OptionError(f"{where}: {why}")
        try:
            with zipfile.ZipFile(self.path) as zf:
                members = {}
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with zf.open(info) as f:
                        shape, fortran, dtype = _read_header(f)
                    key = info.filename[: -len(".npy")]
                    members[key] = _Member(key, info.filename, shape, dtype, fortran)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise OptionError(f"{where}: not a NumPy .npz archive ({' '.join(str(e).split())})") from e
        if not members:
            raise OptionError(f"{where}: the archive holds no array")
        for m in members.values():
            if m.dtype.hasobject:
                raise InputError(f"{where}: array {m.key!r} holds Python objects; save numeric arrays")
        names = [s.name for s in specs] if specs is not None else None
        numbered = all(_NUMBERED.match(k) for k in members) and not (
            names and all(n in members for n in names)
        )
        self.layout = "numbered" if numbered else "split"
        self.members = members
        self.specs = {s.name: s for s in specs} if specs is not None else None
        if numbered:
            if batch_size is not None:
                raise OptionError(
                    f"{where}: the arrays are numbered batches (NAME__0, NAME__1, ...): --batch-size applies only "
                    "to one array per input"
                )
            groups: dict[str, dict[int, _Member]] = {}
            for k, m in members.items():
                match = _NUMBERED.match(k)
                assert match is not None
                groups.setdefault(match.group(1), {})[int(match.group(2))] = m
            self._check_names(list(groups), where)
            counts = {n: sorted(g) for n, g in groups.items()}
            first = next(iter(counts.values()))
            if first != list(range(len(first))):
                raise InputError(
                    f"{where}: numbered batches must be NAME__0 .. NAME__{len(first) - 1} with no gap"
                )
            for n, idx in counts.items():
                if idx != first:
                    raise InputError(
                        f"{where}: input {n!r} has {len(idx)} batches, another input {len(first)}"
                    )
            self.batches = [{n: groups[n][i] for n in groups} for i in first]
            for i, b in enumerate(self.batches):
                rows = {m.shape[0] if m.shape else 1 for m in b.values()}
                for m in b.values():
                    self._check_member(m, f"{where}: {m.key!r}", batch_dim=True)
                if len(rows) > 1:
                    raise InputError(f"{where}: the arrays of batch {i} have different first dimensions")
            self.batch_size = None
            self.samples = sum(
                next(iter(b.values())).shape[0] if next(iter(b.values())).shape else 1 for b in self.batches
            )
        else:
            self._check_names(list(members), where)
            lengths = {m.shape[0] if m.shape else None for m in members.values()}
            if None in lengths:
                raise InputError(f"{where}: every array needs a leading sample axis (a scalar was given)")
            if len(lengths) > 1:
                raise InputError(
                    f"{where}: the arrays have different lengths {sorted(x for x in lengths if x is not None)}: "
                    "every input needs the same number of samples"
                )
            total = int(next(iter(lengths)) or 0)
            if batch_size is None:
                fixed = [
                    s.dims[0]
                    for s in (specs or ())
                    if s.dims and isinstance(s.dims[0], int) and s.dims[0] > 0
                ]
                batch_size = fixed[0] if fixed else DEFAULT_BATCH_SIZE
            if batch_size <= 0:
                raise OptionError(f"--batch-size must be a positive integer, got {batch_size}")
            for m in members.values():
                self._check_member(
                    m, f"{where}: {m.key!r}", batch_dim=False, batch_size=batch_size, rows=total
                )
            self.batch_size = batch_size
            self.samples = total
            self.batches = [dict(members) for _ in range(math.ceil(total / batch_size))]
        if self.samples == 0 or not self.batches:
            raise InputError(f"{where}: the data holds no sample")

    def _check_names(self, names: list[str], where: str) -> None:
        if self.specs is None:
            return
        inputs = list(self.specs)
        missing = [n for n in inputs if n not in names]
        extra = sorted(set(names) - set(inputs))
        if extra:
            raise InputError(
                f"{where}: {extra[0]!r} is not an input of the model (inputs: {', '.join(inputs)}; name the arrays "
                "after the inputs, or NAME__0, NAME__1, ... for one array per batch)"
            )
        if missing:
            raise InputError(f"{where}: no data for input {missing[0]!r} (inputs: {', '.join(inputs)})")

    def _check_member(
        self, m: _Member, where: str, *, batch_dim: bool, batch_size: int = 0, rows: int = 0
    ) -> None:
        if self.specs is None:
            if m.dtype.kind not in "fiub":
                raise InputError(f"{where}: dtype {m.dtype} is not a numeric array")
            return
        name = _NUMBERED.match(m.key).group(1) if batch_dim and _NUMBERED.match(m.key) else m.key  # type: ignore[union-attr]
        spec = self.specs[name]
        want = np.dtype(spec.dtype)
        ok = (
            m.dtype == want
            or (m.dtype.kind == "f" and want.kind in "fV")
            or (m.dtype.kind in "iu" and want.kind in "iu")
        )
        if not ok:
            raise InputError(f"{where}: dtype {m.dtype}, the model input {name!r} is {want}")
        if len(m.shape) != len(spec.dims):
            raise InputError(
                f"{where}: rank {len(m.shape)} (shape {list(m.shape)}), the model input {name!r} has rank "
                f"{len(spec.dims)}"
            )
        for i, (d, got) in enumerate(zip(spec.dims, m.shape)):
            if not (isinstance(d, int) and d > 0):
                continue
            if i == 0 and not batch_dim:
                if batch_size != d:
                    raise OptionError(
                        f"{where}: the model fixes the batch dimension of {name!r} to {d}: use --batch-size {d}"
                    )
                if rows % d:
                    raise InputError(
                        f"{where}: {rows} samples do not split into batches of {d}, the model's fixed batch size"
                    )
            elif got != d:
                raise InputError(f"{where}: dimension {i} is {got}, the model input {name!r} fixes it to {d}")

    def __len__(self) -> int:
        return len(self.batches)

    def _dtype_for(self, name: str) -> np.dtype[Any] | None:
        if self.specs is None:
            return None
        want: np.dtype[Any] = np.dtype(self.specs[name].dtype)
        return want

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over the batches (module docstring: streamed, checked for NaN/inf)."""
        with zipfile.ZipFile(self.path) as zf:
            if self.layout == "numbered":
                for i, batch in enumerate(self.batches):
                    out = {}
                    for name, m in batch.items():
                        with zf.open(m.member) as f:
                            _read_header(f)
                            out[name] = self._rows(f, m, m.shape[0] if m.shape else 1, i, name)
                    yield out
                return
            assert self.batch_size is not None
            handles = {k: zf.open(m.member) for k, m in self.members.items()}
            try:
                for f in handles.values():
                    _read_header(f)
                whole: dict[str, np.ndarray] = {}
                for k, m in self.members.items():
                    if m.fortran:  # rows are not contiguous on disk: this array is read whole
                        with zf.open(m.member) as f:
                            whole[k] = np.lib.format.read_array(f, allow_pickle=False)
                for i in range(len(self.batches)):
                    start = i * self.batch_size
                    rows = min(self.batch_size, self.samples - start)
                    out = {}
                    for k, m in self.members.items():
                        if k in whole:
                            out[k] = self._cast(np.ascontiguousarray(whole[k][start : start + rows]), i, k)
                        else:
                            out[k] = self._rows(handles[k], m, rows, i, k)
                    yield out
            finally:
                for f in handles.values():
                    f.close()

    def _rows(self, f: Any, m: _Member, rows: int, batch: int, name: str) -> np.ndarray:
        shape = (rows, *m.shape[1:]) if m.shape else ()
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = count * m.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise InputError(f"{self.path}: --data: array {m.key!r} is truncated")
        a = np.frombuffer(raw, dtype=m.dtype, count=count).reshape(shape)
        if m.fortran:
            a = a.reshape(shape[::-1]).T
        return self._cast(a, batch, name)

    def _cast(self, a: np.ndarray, batch: int, name: str) -> np.ndarray:
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InputError(f"{self.path}: --data: input {name!r} holds NaN or inf in batch {batch}")
        want = self._dtype_for(name)
        if want is not None and a.dtype != want:
            a = a.astype(want)
        return np.ascontiguousarray(a)


# -------------------------------------------------------------------------------------------- job
def _check_settings(s: RecalibrateSettings) -> None:
    if s.batch_size is not None and s.batch_size <= 0:
        raise OptionError(f"--batch-size must be a positive integer, got {s.batch_size}")
    if s.prior is not None and not (math.isfinite(s.prior) and s.prior >= 0):
        raise OptionError(f"--prior must be a finite number >= 0, got {s.prior}")
    if s.upstream not in (None, "new", "batch"):
        raise OptionError(f"--upstream must be new or batch, got {s.upstream!r}")


def recalibrate_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    settings: RecalibrateSettings,
    progress: ProgressFn | None = None,
) -> RecalibrationReport:
    """Re-estimate the BatchNorm statistics of the model in ``src`` on ``settings.data``; write ``dst``.

    Returns:
        A :class:`RecalibrationReport` (per BN: old vs new statistics, see
        :class:`bnfold.onnx.recalibrate.BnChange`).

    Raises:
        OptionError, InputError, UnsupportedModelError, OutputError, ...: exit code 2, nothing written.
        FoldVerificationError: with ``fold``, the fold's verification failed; nothing written.
    """
    t0 = time.perf_counter()
    s = settings
    prog = progress or noop
    _check_settings(s)
    src_p, dst_p = Path(src), Path(dst)
    check_output(src_p, dst_p, in_place=s.in_place)
    out_kind = OUTPUT_FORMATS.get(dst_p.suffix.lower())
    from bnfold.io.sniff import not_a_file

    if (why := not_a_file(s.data)) is not None:
        raise OptionError(f"{s.data}: --data: {why}")
    from bnfold import io as bio

    fmt = bio.detect_format(src_p)
    if fmt == "onnx" and out_kind != "onnx":
        raise OptionError(f"{dst_p}: a recalibrated ONNX model is written as .onnx")
    if fmt in ("state_dict", "pickled_module") and out_kind != "torch":
        raise OptionError(
            f"{dst_p}: a recalibrated checkpoint is written as .pt/.pth/.ckpt/.bin, like its source"
        )
    if fmt == "pt2" and out_kind != "pt2":
        raise OptionError(f"{dst_p}: a recalibrated torch.export program is written as .pt2")
    if fmt not in ("onnx", "state_dict", "pickled_module", "pt2"):
        raise UnsupportedModelError(
            f"{src_p}: recalibrate works on ONNX files, .pt2 programs and PyTorch checkpoints (a state_dict with "
            f"--model, or a pickled module), not on a {fmt} file"
        )
    if s.upstream == "new" and fmt != "onnx":
        raise OptionError(
            "--upstream new applies to ONNX models: a PyTorch model is recalibrated with --upstream "
            "batch (bnfold.recalibrate)"
        )
    if s.fold and fmt != "onnx":
        raise OptionError("--fold applies to ONNX models: run bnfold fold on the recalibrated checkpoint")
    loaded = load(src_p, s.load, prog)
    protect = [] if same_file(src_p, dst_p) else bio.files_read_by(src_p)
    bio.check_output_path(src_p, dst_p, in_place=s.in_place, input_files=protect)
    files = file_info(loaded, src_p, dst_p, loaded.format)
    if loaded.format == "onnx":
        return _onnx(src_p, dst_p, loaded, s, files, protect, prog, t0)
    if loaded.format == "pt2":
        return _pt2(dst_p, loaded, s, files, prog, t0)
    return _torch(dst_p, loaded, s, files, prog, t0)


def _onnx(
    src: Path,
    dst: Path,
    loaded: Any,
    s: RecalibrateSettings,
    files: FileInfo,
    protect: list[str],
    prog: ProgressFn,
    t0: float,
) -> RecalibrationReport:
    from bnfold.io.datafiles import model_size, onnx_data_files
    from bnfold.onnx.recalibrate import plan_levels, recalibrate_model
    from bnfold.verification.inputs import onnx_input_specs

    model = loaded.model
    plan_levels(model)  # refuse an unsupported model before reading any data
    data = NpzBatches(s.data, onnx_input_specs(model), s.batch_size)
    result = recalibrate_model(
        model,
        data,
        prior=s.prior,
        pooled=s.pooled,
        progress=prog,
        total_batches=len(data),
        upstream=s.upstream or "new",
    )
    external = s.external_data if s.external_data is not None else (bool(loaded.data_files) or None)
    fold_report: FoldReport | None = None
    if s.fold:
        fold_report = _fold(src, dst, model, s, external, prog)
    else:
        with staged(model, dst, prog, onnx_file=True, external_data=external, protect=protect) as st:
            st.commit()
        prog("save", 1, 1)
    out_data = onnx_data_files(dst)
    files = replace(
        files,
        size_after=model_size(dst, "onnx"),
        written=True,
        total_seconds=time.perf_counter() - t0,
        output_data_files=tuple(str(f) for f in out_data),
    )
    return _report(files, s, data, result.changes, t0, s.upstream or "new", result.passes, fold_report)


def _fold(
    src: Path, dst: Path, model: Any, s: RecalibrateSettings, external: bool | None, prog: ProgressFn
) -> FoldReport:
    """Fold the recalibrated ``model`` into ``dst`` through the ``fold`` job (verified against it)."""
    from bnfold import io as bio

    from .fold import fold_file
    from .settings import FoldSettings

    with tempfile.TemporaryDirectory(prefix=".bnfold-recal-", dir=dst.resolve().parent) as tmp:
        mid = Path(tmp) / "recalibrated.onnx"
        bio.save(model, mid, external_data=external)
        fs = FoldSettings(in_place=s.in_place and same_file(src, dst), external_data=external)
        report = fold_file(mid, dst, fs, prog)
    return report


def _torch(
    dst: Path, loaded: Any, s: RecalibrateSettings, files: FileInfo, prog: ProgressFn, t0: float
) -> RecalibrationReport:
    import inspect

    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from bnfold.dtypes import from_numpy
    from bnfold.recalibration import recalibrate

    from .output import save

    model = loaded.model
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"{files.source}: recalibrate needs an nn.Module (a state_dict with --model)"
        )
    data = NpzBatches(s.data, None, s.batch_size)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = {re.sub(r"__\d+$", "", k) if data.layout == "numbered" else k for k in data.members}
    unknown = sorted(n for n in names if n not in params) if params and not takes_kwargs else []
    if unknown:
        raise InputError(
            f"{s.data}: --data: {unknown[0]!r} is not an argument of {type(model).__name__}.forward "
            f"(arguments: {', '.join(params)})"
        )
    total = len(data)

    def batches() -> Iterator[dict[str, Any]]:
        for i, b in enumerate(data()):
            yield {k: from_numpy(v) for k, v in b.items()}
            prog("recalibrate", i + 1, total)

    bns = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]
    old = {
        n: (m.running_mean.detach().double().clone(), m.running_var.detach().double().clone())  # type: ignore[union-attr]
        for n, m in bns
    }
    reached: dict[str, int] = {}
    hooks = []
    for n, m in bns:

        def seen(_m: Any, args: tuple[Any, ...], _n: str = n) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].numel():
                reached[_n] = reached.get(_n, 0) + 1

        hooks.append(m.register_forward_pre_hook(seen))
    try:  # the model was loaded for this job: recalibrated in place (the hooks see every batch)
        new_model = recalibrate(
            model, batches(), prior=s.prior, pooled=s.pooled, distributed=False, inplace=True
        )
    except (TypeError, RuntimeError) as e:
        raise InputError(
            f"{s.data}: --data: the model failed on the data ({' '.join(str(e).split())[:300]})"
        ) from e
    finally:
        for h in hooks:
            h.remove()
    never = [n for n, _ in bns if not reached.get(n)]
    if never:
        raise InputError(
            f"{never[0]}: no batch reached this BatchNorm (it never runs on the data); nothing written"
        )
    mods = dict(new_model.named_modules())
    changes = []
    for n, _ in bns:
        m = mods[n]
        om, ov = old[n]
        nm, nv = m.running_mean.double(), m.running_var.double()
        shift = ((nm - om).abs() / (ov + float(m.eps)).sqrt()).max().item()
        ratio = nv / ov
        changes.append(
            BnChange(
                n,
                None,
                int(nm.numel()),
                len(data),
                data.samples,
                0,
                float(shift),
                float(ratio.min()),
                float(ratio.max()),
            )
        )
    save(new_model, dst, prog, fmt="state_dict" if loaded.format == "state_dict" else "module")
    from bnfold.io.datafiles import model_size

    files = replace(
        files, size_after=model_size(dst, loaded.format), written=True, total_seconds=time.perf_counter() - t0
    )
    return _report(files, s, data, changes, t0)


def _pt2(
    dst: Path, loaded: Any, s: RecalibrateSettings, files: FileInfo, prog: ProgressFn, t0: float
) -> RecalibrationReport:
    """A torch.export program: :func:`bnfold.recalibrate`'s definition on its BatchNorm calls.

    The program's module (``ep.module()``, a fresh copy) runs with every ``aten.batch_norm`` /
    ``aten._native_batch_norm_legit_no_training`` call normalising with its batch's own statistics
    (train mode, as in :func:`bnfold.recalibrate`) while its input is recorded with the same float64
    accumulators; the new statistics replace the buffers in ``ep.state_dict``; nothing else changes.
    """
    import torch

    from bnfold.dtypes import from_numpy
    from bnfold.fold_math.stats import mix_with_prior, target_stats
    from bnfold.recalibration import StatsAccumulator

    from .output import save

    ep = loaded.model
    aten = torch.ops.aten
    ops = {aten.batch_norm.default: (3, 4, 7), aten._native_batch_norm_legit_no_training.default: (3, 4, 6)}
    gm = ep.module()
    sites: list[tuple[str, str, str, float]] = []  # (label, mean fqn, var fqn, eps)
    accs: dict[str, StatsAccumulator] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        im, iv, ie = ops[node.target]
        if node.target is aten.batch_norm.default and node.args[5] is not False:
            continue  # a BN in train mode in the program normalises with its batch already and has no state to set
        mean, var = node.args[im], node.args[iv]
        if not (
            getattr(mean, "op", "") == "get_attr"
            and getattr(var, "op", "") == "get_attr"
            and mean.target in ep.state_dict
            and var.target in ep.state_dict
        ):
            raise UnsupportedModelError(
                f"{files.source}: the BatchNorm {node.name}: its running statistics are not buffers of the program"
            )
        eps = float(node.args[ie]) if len(node.args) > ie else 1e-5
        label = str(mean.target).removesuffix(".running_mean")
        sites.append((label, str(mean.target), str(var.target), eps))
        accs[label] = StatsAccumulator.new(int(ep.state_dict[mean.target].numel()), torch.device("cpu"))

        def batch_stats(*args: Any, _target: Any = node.target, _label: str = label, **kwargs: Any) -> Any:
            x = args[0]
            accs[_label].add(x)
            dims = [0, *range(2, x.dim())]
            v, m = torch.var_mean(x.detach().double(), dims, correction=0)
            a = list(args)
            a[ops[_target][0]], a[ops[_target][1]] = m.to(x.dtype), v.to(x.dtype)
            return _target(*a, **kwargs)

        node.target = batch_stats
    gm.recompile()
    if not sites:
        raise UnsupportedModelError(f"{files.source}: the program has no BatchNorm with running statistics")
    names = [str(n) for n in ep.graph_signature.user_inputs]
    data = NpzBatches(s.data, _program_input_specs(ep, names), s.batch_size)
    ex = getattr(ep, "example_inputs", None)
    nargs = len(ex[0]) if isinstance(ex, tuple) and len(ex) == 2 else len(names)
    given = {_NUMBERED.sub(r"\1", k) if data.layout == "numbered" else k for k in data.members}
    if given != set(names):
        other = sorted(given ^ set(names))[0]
        what = "is not an input of the program" if other in given else "has no data"
        raise InputError(f"{s.data}: --data: {other!r} {what} (inputs: {', '.join(names)})")
    count = 0
    try:
        with torch.no_grad():
            for i, b in enumerate(data()):
                gm(*[from_numpy(b[n]) for n in names[:nargs]], **{n: from_numpy(b[n]) for n in names[nargs:]})
                count += 1
                prog("recalibrate", i + 1, len(data))
    except (TypeError, RuntimeError) as e:
        raise InputError(
            f"{s.data}: --data: the program failed on the data ({' '.join(str(e).split())[:300]})"
        ) from e
    changes = []
    new_state = {}
    for label, fm, fv, eps in sites:
        acc = accs[label]
        if acc.batches == 0:
            raise InputError(f"{label}: its input is empty in every batch (the BatchNorm never runs)")
        old_m, old_v = ep.state_dict[fm].detach().double(), ep.state_dict[fv].detach().double()
        m, v = target_stats(acc, s.pooled)
        if s.prior:
            m, v = mix_with_prior(old_m, old_v, m, v, acc, s.prior)
        if not bool(torch.isfinite(m).all() and torch.isfinite(v).all()):
            raise InputError(
                f"{label}: the re-estimated statistics are not finite (inf or nan in the activations)"
            )
        new_state[fm] = m.to(ep.state_dict[fm].dtype)
        new_state[fv] = v.to(ep.state_dict[fv].dtype)
        shift = ((m - old_m).abs() / (old_v + eps).sqrt()).max().item()
        ratio = v / old_v
        changes.append(
            BnChange(
                label,
                None,
                int(m.numel()),
                acc.batches,
                acc.samples,
                acc.values,
                float(shift),
                float(ratio.min()),
                float(ratio.max()),
            )
        )
    for k, t in new_state.items():
        ep.state_dict[k] = t
        tracked = k.removesuffix("running_mean") + "num_batches_tracked"
        if k.endswith("running_mean") and tracked in ep.state_dict:
            ep.state_dict[tracked] = torch.tensor(count, dtype=ep.state_dict[tracked].dtype)
    save(ep, dst, prog)
    from bnfold.io.datafiles import model_size

    files = replace(
        files, size_after=model_size(dst, "pt2"), written=True, total_seconds=time.perf_counter() - t0
    )
    return _report(files, s, data, changes, t0)


def _report(
    files: FileInfo,
    s: Any,
    data: Any,
    changes: Any,
    t0: float,
    upstream: str = "batch",
    passes: int = 1,
    fold_report: FoldReport | None = None,
) -> RecalibrationReport:
    """The report of a recalibration; by default a one-pass (``upstream="batch"``) one: checkpoints and
    ``.pt2``."""
    return RecalibrationReport(
        files,
        str(s.data),
        data.layout,
        data.batch_size,
        len(data),
        data.samples,
        s.pooled,
        s.prior,
        upstream,
        passes,
        tuple(changes),
        fold_report,
        time.perf_counter() - t0,
    )


def _program_input_specs(ep: Any, names: Sequence[str]) -> list[Any] | None:
    """The program's user inputs as :class:`~bnfold.verification.inputs.InputSpec`, with the dimensions
    it fixed (a symbolic one is ``None``), so that the data is checked and batched as for an ONNX model
    (``--batch-size`` defaults to a fixed batch). ``None`` where an input has no recorded tensor."""
    import torch

    from bnfold.verification.inputs import InputSpec

    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in names:
        val = vals.get(name)
        if not isinstance(val, torch.Tensor):
            return None
        try:
            dtype = (
                np.float32 if val.dtype.is_floating_point else np.dtype(str(val.dtype).removeprefix("torch."))
            )
        except TypeError:
            return None  # a dtype NumPy does not have: the data is checked as for a module
        dims = tuple(d if isinstance(d, int) else None for d in val.shape)
        specs.append(InputSpec(name, np.dtype(dtype), dims))
    return specs
