"""File-level jobs the CLI runs: load -> fold -> verify -> save, and inspect / verify / freeze on files.

Rules:
    * the core returns data (records, dicts) and never prints; progress goes through an optional
      ``progress(stage, done, total)`` callback;
    * cheap checks first: the output path (missing folder, output == input without ``in_place``, an
      extension that names no format) and option parsing happen before any model is loaded;
    * MODEL is never modified; OUT is written atomically by :func:`bnfold.io.save` (temporary file in the
      same folder, then ``os.replace``), and only after verification passed (unless ``force``);
    * an ONNX source with an ONNX output never imports torch.

Reference for ONNX verification: the source *file*. The loaded model is folded with ``inplace=True``
(one copy of the weights in memory) and verification reads the untouched source file from disk, which
costs no second in-memory copy and no re-serialisation (and works for external data, which onnxruntime
resolves next to the file). With ``in_place`` the source is only replaced after verification.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._inputs import parse_input_shapes
from .errors import (
    BnfoldError,
    OptionError,
    OutputError,
    UnsupportedModelError,
    VerificationError,
)
from .records import FoldReport, VerifyReport

__all__ = [
    "ProgressFn",
    "FoldVerificationError",
    "OUTPUT_FORMATS",
    "output_format",
    "parse_input_shapes",
    "load_inputs",
    "resolve_factory",
    "check_output",
    "onnx_input_specs",
    "fold_file",
    "inspect_file",
    "verify_files",
    "freeze_file",
]

ProgressFn = Callable[[str, int, int], None]

OUTPUT_FORMATS: dict[str, str] = {
    ".onnx": "onnx",
    ".pt2": "pt2",
    ".pt": "torch",
    ".pth": "torch",
    ".ckpt": "torch",
    ".bin": "torch",
}
"""Output extension -> format. "torch" means the same checkpoint kind as the source."""

_FORMAT_NAMES = {
    "onnx": "an ONNX model",
    "pt2": "a torch.export program (.pt2)",
    "torchscript": "a TorchScript archive",
}


class FoldVerificationError(VerificationError):
    """Verification of a fold failed: nothing was written. ``fold_report`` holds the whole report."""

    def __init__(self, message: str, fold_report: FoldReport) -> None:
        super().__init__(message, report=fold_report.verification)
        self.fold_report = fold_report


def _noop(stage: str, done: int, total: int) -> None:
    return None


# --------------------------------------------------------------------------------------------- options
def load_inputs(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """Read ``--inputs data.npz`` into ``{name: ndarray}``.

    Raises:
        OptionError: the file is missing, not an ``.npz`` archive, or empty.
    """
    if path is None:
        return None
    import zipfile

    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise OptionError(f"{p}: --inputs: no such file")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise OptionError(f"{p}: --inputs: not a NumPy .npz archive ({e})") from e
    if not arrays:
        raise OptionError(f"{p}: --inputs: the archive holds no array")
    return arrays


def resolve_factory(spec: str | None) -> Callable[[], Any] | None:
    """``--model module.path:factory`` -> the callable (see :func:`bnfold.io.resolve_factory`)."""
    if spec is None:
        return None
    from .io import resolve_factory as _resolve

    return _resolve(spec)


def _parse_shapes(
    specs: Sequence[str] | Mapping[str, tuple[int, ...]] | None, path: Path
) -> dict[str, tuple[int, ...]]:
    """Parse ``--input-shape`` values; an error names the model file it was given for."""
    if isinstance(specs, Mapping):
        return dict(specs)
    try:
        return parse_input_shapes(list(specs or ()))
    except BnfoldError as e:
        raise _with_path(e, str(path)) from e


def output_format(dst: Path) -> str:
    """The output format named by ``dst``'s extension ("onnx", "pt2" or "torch").

    Raises:
        OptionError: the extension names no format bnfold writes.
    """
    fmt = OUTPUT_FORMATS.get(dst.suffix.lower())
    if fmt is None:
        known = ", ".join(OUTPUT_FORMATS)
        raise OptionError(f"{dst}: cannot tell the output format from the extension (use one of {known})")
    return fmt


def check_output(src: Path, dst: Path, *, in_place: bool = False) -> None:
    """Refuse an output path before any heavy work (see :func:`bnfold.io.check_output_path`).

    Raises:
        OutputError: ``dst`` is the input without ``in_place``, a folder, or its folder is missing or
            not writable.
    """
    from .io import check_output_path

    if _same_file(src, dst) and not in_place:
        raise OutputError(f"{dst}: is the input model; choose another output or pass --in-place to overwrite it")
    if dst.is_dir():
        raise OutputError(f"{dst}: is a folder, not a file name")
    check_output_path(src, dst, in_place=in_place)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _size(path: Path) -> int | None:
    """Size of the model file in bytes (external-data files next to an ONNX model are not counted)."""
    try:
        total = path.stat().st_size
    except OSError:
        return None
    return total


# -------------------------------------------------------------------------------------------- loading
def _load(
    src: Path,
    *,
    model_factory: str | None,
    trust_pickle: bool,
    progress: ProgressFn,
) -> tuple[Any, str]:
    """Detect the format and load with :mod:`bnfold.io`; returns ``(model, format)``."""
    from . import io as bio

    factory = resolve_factory(model_factory)  # a bad --model fails even when the file does not need it
    progress("load", 0, 1)
    model, fmt = bio.load_with_format(src, model_factory=factory, trust_pickle=trust_pickle)
    progress("load", 1, 1)
    return model, fmt


def onnx_input_specs(model: Any) -> list[Any]:
    """The graph inputs of an ONNX model (initializers excluded) as :class:`bnfold._inputs.InputSpec`."""
    import numpy as np
    import onnx

    from ._inputs import InputSpec

    init = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def _check_onnx_shapes(model: Any, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Fail early (before folding) when ``--input-shape`` does not fit the model's inputs."""
    if not shapes:
        return
    from ._inputs import resolve_shapes

    try:
        resolve_shapes(onnx_input_specs(model), shapes)
    except BnfoldError as e:
        raise _with_path(e, str(path)) from e


def _torch_examples(
    model: Any,
    shapes: Mapping[str, tuple[int, ...]],
    inputs: Mapping[str, Any] | None,
    seed: int,
    path: Path,
) -> tuple[Any, ...]:
    """Example inputs for a PyTorch model: ``--inputs`` arrays, ``--input-shape`` or the program's own."""
    import numpy as np
    import torch

    if inputs:
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values())
    if shapes:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(s, generator=g) for s in shapes.values())
    ex = getattr(model, "example_inputs", None)
    if ex is not None:
        args = ex[0] if isinstance(ex, tuple) and len(ex) == 2 and isinstance(ex[1], dict) else ex
        return tuple(args)
    raise OptionError(
        f"{path}: a PyTorch module has no input signature: pass --input-shape (e.g. "
        "--input-shape x=1x3x224x224) or --inputs data.npz"
    )


@dataclass(frozen=True)
class _Inputs:
    """What verification runs on and how it compares: the options every job shares."""

    shapes: Mapping[str, tuple[int, ...]]
    arrays: Mapping[str, Any] | None
    samples: int
    seed: int
    atol: float | None
    rtol: float | None
    opt_level: str | None

    def carried_by_examples(self) -> _Inputs:
        """The same settings once example tensors carry the shapes and the data (PyTorch reference)."""
        return replace(self, shapes={}, arrays=None)


def _verify(
    reference: Any,
    candidate: Any,
    ins: _Inputs,
    *,
    example_inputs: tuple[Any, ...] | None,
    progress: ProgressFn,
    where: str = "",
) -> VerifyReport:
    from .verification import verify

    progress("verify", 0, 1)
    kwargs: dict[str, Any] = dict(
        inputs=dict(ins.arrays) if ins.arrays else None,
        input_shapes=dict(ins.shapes) if ins.shapes else None,
        samples=ins.samples,
        seed=ins.seed,
        atol=ins.atol,
        rtol=ins.rtol,
        extra_level=ins.opt_level,
    )
    if example_inputs is not None:
        kwargs["example_inputs"] = example_inputs
    try:
        report: VerifyReport = verify(reference, candidate, **kwargs)
    except BnfoldError as e:
        raise _with_path(e, where) from e
    progress("verify", 1, 1)
    return report


def _with_path(err: BnfoldError, where: str) -> BnfoldError:
    """The same error, its message prefixed with the file(s) it is about when it names none."""
    msg = str(err)
    if not where or where in msg or msg.startswith(where.split(" vs ")[0]):
        return err
    new = type(err).__new__(type(err))
    Exception.__init__(new, f"{where}: {msg}")
    new.__dict__.update(err.__dict__)
    return new


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise OptionError(f"--samples {samples}: must be >= 1")


# ----------------------------------------------------------------------------------------------- jobs
def fold_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    affine: bool = False,
    verify: bool = True,
    force: bool = False,
    in_place: bool = False,
    model_factory: str | None = None,
    trust_pickle: bool = False,
    input_shapes: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    samples: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    opt_level: str | None = None,
    opset: int | None = None,
    progress: ProgressFn | None = None,
) -> FoldReport:
    """Fold every exactly-foldable BatchNorm of the model in ``src``, verify, and write ``dst``.

    ``dst``'s extension picks the output format: ``.onnx``; ``.pt2`` (torch.export); ``.pt``/``.pth``/
    ``.ckpt``/``.bin`` (a pickled module, since a folded model no longer has the factory's layout).
    A PyTorch source written to ``.onnx`` is folded, exported, folded again where the exporter left BN,
    and verified against the PyTorch original.

    Args:
        src: the model file (never modified, unless ``in_place`` and ``dst`` is ``src``).
        dst: the output file, written atomically.
        affine: ONNX: turn BNs that have nothing to fold into into one Mul + one Add.
        verify: compare the result with the original in onnxruntime (on by default).
        force: write ``dst`` even when verification fails.
        in_place: allow ``dst`` to be ``src``.
        model_factory: ``module.path:factory`` that builds the architecture of a state_dict.
        trust_pickle: allow unpickling a whole module (runs code from the file).
        input_shapes: ``["name=1x3x224x224", ...]`` or ``{name: shape}``.
        inputs: an ``.npz`` file with the inputs to verify on.
        samples, seed, atol, rtol, opt_level: verification settings (see :func:`bnfold.verification.verify`).
        opset: ONNX opset for a PyTorch source exported to ``.onnx``.
        progress: ``progress(stage, done, total)`` callback.

    Returns:
        The :class:`FoldReport`; ``report.extra`` holds paths, formats, file sizes; ``report.verification``
        the :class:`VerifyReport` (None with ``verify=False``).

    Raises:
        OutputError, OptionError, ModelFormatError, ...: exit code 2, nothing written.
        FoldVerificationError: verification failed and ``force`` is False; nothing written.
    """
    t0 = time.perf_counter()
    prog = progress or _noop
    src_p, dst_p = Path(src), Path(dst)
    _check_samples(samples)
    shapes = _parse_shapes(input_shapes, src_p)
    out_fmt = output_format(dst_p)
    check_output(src_p, dst_p, in_place=in_place)
    arrays = load_inputs(inputs)
    size_before = _size(src_p)

    ins = _Inputs(shapes, arrays, samples, seed, atol, rtol, opt_level)

    model, src_fmt = _load(src_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)
    if src_fmt == "onnx":
        if out_fmt != "onnx":
            raise OptionError(f"{dst_p}: an ONNX model can only be written as .onnx")
        report, result = _fold_onnx(src_p, model, ins, affine=affine, verify=verify, progress=prog)
    else:
        report, result = _fold_torch(
            src_p, dst_p, model, out_fmt, ins, affine=affine, verify=verify, opset=opset, progress=prog
        )
    report.extra.update(
        source=str(src_p), output=str(dst_p), source_format=src_fmt, output_format=out_fmt,
        size_before=size_before, size_after=None, written=False,
    )
    if report.verification is not None and not report.verification.passed:
        if not force:
            report.extra["total_seconds"] = time.perf_counter() - t0
            raise FoldVerificationError(
                f"{dst_p}: not written: the folded model is not equivalent to {src_p} "
                f"(max abs error {report.verification.max_abs_error:.3g}); --force writes it anyway",
                report,
            )
        report.notes.append("verification failed; written anyway because of --force")
    _save(result, dst_p, prog)
    report.extra.update(size_after=_size(dst_p), written=True, total_seconds=time.perf_counter() - t0)
    return report


def _save(model: Any, dst: Path, progress: ProgressFn) -> None:
    from . import io as bio

    progress("save", 0, 1)
    bio.save(model, dst)
    progress("save", 1, 1)


def _fold_onnx(
    src: Path, model: Any, ins: _Inputs, *, affine: bool, verify: bool, progress: ProgressFn
) -> tuple[FoldReport, Any]:
    from .onnx import fold_model

    _check_onnx_shapes(model, ins.shapes, src)
    progress("fold", 0, 1)
    t = time.perf_counter()
    folded, report = fold_model(model, affine=affine, inplace=True)
    report.seconds = time.perf_counter() - t
    progress("fold", 1, 1)
    if verify:
        # The reference is the source file on disk (see the module docstring).
        report.verification = _verify(
            str(src), folded, ins, example_inputs=None, progress=progress, where=str(src)
        )
    return report, folded


def _fold_torch(
    src: Path,
    dst: Path,
    model: Any,
    out_fmt: str,
    ins: _Inputs,
    *,
    affine: bool,
    verify: bool,
    opset: int | None,
    progress: ProgressFn,
) -> tuple[FoldReport, Any]:
    import torch

    from .api import fold_with_report

    is_ep = isinstance(model, torch.export.ExportedProgram)
    needs_examples = verify or out_fmt in ("onnx", "pt2")
    examples = _torch_examples(model, ins.shapes, ins.arrays, ins.seed, src) if needs_examples else None

    if out_fmt == "onnx":
        # export_onnx folds in PyTorch, exports, folds what the exporter left; we verify below with the
        # user's settings against the PyTorch original.
        names = list(ins.arrays) if ins.arrays else (list(ins.shapes) if ins.shapes else None)
        result, report = _export(model, examples, opset=opset, affine=affine, input_names=names, progress=progress)
    else:
        progress("fold", 0, 1)
        t = time.perf_counter()
        # Example inputs prove where a Linear meets a BatchNorm1d on 2-D data (see bnfold.fold).
        result, report = fold_with_report(model, example_inputs=None if is_ep else examples)
        report.seconds = time.perf_counter() - t
        progress("fold", 1, 1)
        if out_fmt == "pt2" and not is_ep:
            progress("export", 0, 1)
            result = torch.export.export(result, tuple(examples or ()))
            progress("export", 1, 1)
        elif out_fmt == "torch" and is_ep:
            raise OptionError(f"{dst}: a torch.export program is written as .pt2 or .onnx, not {dst.suffix}")
    if verify:
        # The reference is the PyTorch original; verify exports torch models to ONNX itself. The
        # example inputs carry the shapes and the data, so no name-keyed shapes or arrays go along.
        report.verification = _verify(
            model, result, ins.carried_by_examples(), example_inputs=examples, progress=progress,
            where=str(src),
        )
    return report, result


def _export(
    model: Any,
    examples: tuple[Any, ...] | None,
    *,
    opset: int | None,
    affine: bool,
    input_names: list[str] | None,
    progress: ProgressFn,
) -> tuple[Any, FoldReport]:
    """PyTorch -> folded ONNX through :func:`bnfold.export.export_onnx` (into a temporary folder)."""
    import tempfile

    import onnx
    import torch

    from .export import export_onnx
    from .onnx import fold_model

    progress("export", 0, 1)
    t = time.perf_counter()
    if isinstance(model, torch.export.ExportedProgram):
        # A program is folded as a program, exported as one (dynamo exporter), and folded again.
        from .api import fold_with_report

        folded_ep, report = fold_with_report(model)
        kw: dict[str, Any] = {"dynamo": True, "verbose": False}
        if opset is not None:
            kw["opset_version"] = opset
        proto = torch.onnx.export(folded_ep, **kw).model_proto  # type: ignore[union-attr]
        proto, oreport = fold_model(proto, affine=affine, inplace=True)
        report.verdicts = [*report.verdicts, *oreport.verdicts]
        report.bn_after, report.nodes_after = oreport.bn_after, oreport.nodes_after
        report.params_after = oreport.params_after
        report.notes.extend(oreport.notes)
        report.seconds = time.perf_counter() - t
        progress("export", 1, 1)
        return proto, report
    with tempfile.TemporaryDirectory(prefix="bnfold-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        report = export_onnx(
            model, tuple(examples or ()), path, opset=opset, verify=False, input_names=input_names
        )
        proto = onnx.load(path)
    if affine and report.bn_after:
        proto, areport = fold_model(proto, affine=True, inplace=True)
        done = {v.bn for v in areport.sites}
        report.verdicts = [v for v in report.verdicts if v.bn not in done] + list(areport.sites)
        report.bn_after, report.nodes_after = areport.bn_after, areport.nodes_after
        report.params_after = areport.params_after
    report.seconds = time.perf_counter() - t
    progress("export", 1, 1)
    return proto, report


def inspect_file(
    src: str | os.PathLike[str],
    *,
    affine: bool = False,
    model_factory: str | None = None,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> FoldReport:
    """The verdict for every BatchNorm of the model in ``src``; nothing is written.

    Returns:
        A dry-run :class:`FoldReport` with ``extra`` holding the path, format and file size.
    """
    from .api import fold_with_report

    t0 = time.perf_counter()
    prog = progress or _noop
    src_p = Path(src)
    model, fmt = _load(src_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)
    prog("fold", 0, 1)
    kwargs: dict[str, Any] = {"dry_run": True}
    if fmt == "onnx":
        kwargs["affine"] = affine
    _, report = fold_with_report(model, **kwargs)
    prog("fold", 1, 1)
    report.extra.update(
        source=str(src_p), source_format=fmt, size_before=_size(src_p),
        total_seconds=time.perf_counter() - t0,
    )
    return report


def verify_files(
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    *,
    model_factory: str | None = None,
    trust_pickle: bool = False,
    input_shapes: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    samples: int = 1,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    opt_level: str | None = None,
    progress: ProgressFn | None = None,
) -> VerifyReport:
    """Run the models in two files on the same inputs and compare every output.

    Returns:
        The :class:`VerifyReport` (``passed`` False on a mismatch: this function does not raise for it).

    Raises:
        NotComparableError: the two models cannot be compared (exit code 2).
        ModelFormatError, OptionError: a file or an option cannot be used (exit code 2).
    """
    prog = progress or _noop
    _check_samples(samples)
    ref_p, cand_p = Path(reference), Path(candidate)
    shapes = _parse_shapes(input_shapes, ref_p)
    arrays = load_inputs(inputs)
    ref, ref_fmt = _load(ref_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)
    cand, _ = _load(cand_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)
    ins = _Inputs(shapes, arrays, samples, seed, atol, rtol, opt_level)
    examples = None
    if ref_fmt != "onnx":  # the example inputs carry shapes and data for a PyTorch reference
        examples = _torch_examples(ref, shapes, arrays, seed, ref_p)
        ins = ins.carried_by_examples()
    return _verify(ref, cand, ins, example_inputs=examples, progress=prog, where=f"{ref_p} vs {cand_p}")


def freeze_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    learnable: bool = False,
    in_place: bool = False,
    model_factory: str | None = None,
    trust_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Turn every BatchNorm of a PyTorch model into a frozen affine layer; save in the same format.

    A state_dict checkpoint is written as the frozen model's state_dict, a pickled module as a pickled
    module.

    Returns:
        ``{"source", "output", "source_format", "learnable", "frozen": [(name, kind)],
        "left": [(name, reason, detail)] (BNs that could not be frozen), "size_after", "seconds"}``.

    Raises:
        UnsupportedModelError: the file is an ONNX model or a torch.export program (freeze needs an
            ``nn.Module``).
    """
    t0 = time.perf_counter()
    prog = progress or _noop
    src_p, dst_p = Path(src), Path(dst)
    check_output(src_p, dst_p, in_place=in_place)
    from . import io as bio

    fmt = bio.detect_format(src_p)
    if fmt not in ("state_dict", "pickled_module"):
        raise UnsupportedModelError(
            f"{src_p}: freeze works on PyTorch checkpoints (state_dict with --model, or a pickled module), "
            f"not on {_FORMAT_NAMES.get(fmt, fmt)}"
        )
    if OUTPUT_FORMATS.get(dst_p.suffix.lower()) != "torch":
        raise OptionError(f"{dst_p}: a frozen PyTorch model is saved as .pt/.pth/.ckpt/.bin, like its source")
    model, fmt = _load(src_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)

    from .freezing import freeze_with_report
    from .nn.frozen import FrozenBatchNorm

    prog("freeze", 0, 1)
    # Partial freezes are written, and every BN left is reported with its reason (the CLI shows them).
    frozen, report = freeze_with_report(model, learnable=learnable, strict=False)
    prog("freeze", 1, 1)
    names = [(n, type(m).__name__) for n, m in frozen.named_modules() if isinstance(m, FrozenBatchNorm)]
    left = [(v.bn, v.reason.value, v.detail) for v in report.skips]
    prog("save", 0, 1)
    bio.save(frozen, dst_p, fmt="state_dict" if fmt == "state_dict" else "module")
    prog("save", 1, 1)
    return {
        "source": str(src_p),
        "output": str(dst_p),
        "source_format": fmt,
        "learnable": learnable,
        "frozen": names,
        "left": left,
        "size_after": _size(dst_p),
        "seconds": time.perf_counter() - t0,
    }
