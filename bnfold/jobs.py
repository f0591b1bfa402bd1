"""File-level jobs the CLI runs: load -> fold -> verify -> save, and inspect / verify / freeze on files.

Rules:
    * the core returns data (records, dicts) and never prints; progress goes through an optional
      ``progress(stage, done, total)`` callback;
    * cheap checks first: the output path (missing folder, output == input without ``in_place``, an
      extension that names no format) and option parsing happen before any model is loaded;
    * MODEL is never modified; OUT is written atomically by :func:`bnfold.io.save` (temporary file in the
      same folder, then ``os.replace``), and only after verification passed (unless ``force``);
    * an ONNX source with an ONNX output never imports torch;
    * an option that does not apply to the job raises :class:`~bnfold.errors.OptionError` naming the
      flag (``--opset`` on an ONNX source, ``--samples`` with ``--inputs``, ...), never silently ignored;
    * advice in messages and verdicts names the flags a CLI user can type (:func:`cli_advice`);
    * file sizes count every external-data file next to an ONNX model; an ONNX output keeps the
      input's layout (external data or inline) unless ``external_data`` says otherwise.

Reference for ONNX verification: the source *file*. The loaded model is folded with ``inplace=True``
(one copy of the weights in memory) and verification reads the untouched source file from disk, which
costs no second in-memory copy and no re-serialisation (and works for external data, which onnxruntime
resolves next to the file). With ``in_place`` the source is only replaced after verification.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._datafiles import model_size, onnx_data_files
from ._inputs import load_inputs, onnx_input_specs, parse_input_shapes, parse_shapes_for, torch_examples
from .errors import (
    BnfoldError,
    FoldVerificationError,
    OptionError,
    OutputError,
    UnsupportedModelError,
    with_context,
)
from .export import ExportSettings, export_folded
from .postfold import PostFold
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
    "cli_advice",
    "model_size",
    "onnx_data_files",
    "onnx_input_specs",
    "io_signature",
    "ExportSettings",
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


_ADVICE = (
    # (what the Python API says, what a CLI user types)
    ("pass eval_semantics=True", "pass --eval-semantics"),
    ("pass example_inputs=(x,) to bnfold.fold to record the shapes",
     "pass -s/--input-shape NAME=SHAPE (or --inputs DATA.npz) to record the shapes"),
    (" (trust_pickle=True)", ""),
    (" (model_factory=...)", ""),
)


def cli_advice(text: str) -> str:
    """``text`` with advice worded for the Python API reworded as the CLI flags that do the same."""
    for api, flag in _ADVICE:
        text = text.replace(api, flag)
    return text


def _advised(report: FoldReport) -> FoldReport:
    """The report with every verdict's detail and note worded for the CLI (see :func:`cli_advice`)."""
    from .records import Skip

    report.verdicts = [
        Skip(v.bn, v.reason, cli_advice(v.detail)) if isinstance(v, Skip) else v for v in report.verdicts
    ]
    report.notes = [cli_advice(n) for n in report.notes]
    return report


def _reworded(err: BnfoldError) -> BnfoldError:
    msg = cli_advice(str(err))
    return with_context(err, message=msg)


def _noop(stage: str, done: int, total: int) -> None:
    return None


# --------------------------------------------------------------------------------------------- options
def resolve_factory(spec: str | None) -> Callable[[], Any] | None:
    """``--model module.path:factory`` -> the callable (see :func:`bnfold.io.resolve_factory`)."""
    if spec is None:
        return None
    from .io import resolve_factory as _resolve

    return _resolve(spec)


_parse_shapes = parse_shapes_for


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


_size = model_size


# -------------------------------------------------------------------------------------------- loading
def _load(
    src: Path,
    *,
    model_factory: str | None,
    trust_pickle: bool,
    progress: ProgressFn,
    lazy_external_data: bool = False,
) -> tuple[Any, str]:
    """Detect the format and load with :mod:`bnfold.io`; returns ``(model, format)``."""
    from . import io as bio

    factory = resolve_factory(model_factory)  # a bad --model fails even when the file does not need it
    progress("load", 0, 1)
    model, fmt = bio.load_with_format(src, model_factory=factory, trust_pickle=trust_pickle,
                                      lazy_external_data=lazy_external_data)
    progress("load", 1, 1)
    return model, fmt


def io_signature(model: Any) -> dict[str, list[dict[str, Any]]]:
    """An ONNX model's inputs and outputs: ``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}``.

    A shape entry is an int, a symbol (str) or None (unknown).
    """
    import onnx

    def one(vi: Any) -> dict[str, Any]:
        tt = vi.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
        except (KeyError, ValueError):
            dtype = "?"
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return {"name": vi.name, "dtype": dtype, "shape": dims if tt.HasField("shape") else None}

    init = {t.name for t in model.graph.initializer}
    return {
        "inputs": [one(vi) for vi in model.graph.input if vi.name not in init],
        "outputs": [one(vi) for vi in model.graph.output],
    }


def _verified_on(
    model: Any, ins: _Inputs, examples: tuple[Any, ...] | None, names: Sequence[str] = ()
) -> dict[str, list[int]]:
    """The input shapes verification runs on (the same rules as :mod:`bnfold.verification`)."""
    if examples is not None:
        labels = list(names) + [f"input{i}" for i in range(len(names), len(examples))]
        return {n: list(getattr(t, "shape", ())) for n, t in zip(labels, examples)}
    if ins.arrays:
        return {k: list(v.shape) for k, v in ins.arrays.items()}
    from ._inputs import resolve_shapes

    try:
        return {k: list(v) for k, v in resolve_shapes(onnx_input_specs(model), ins.shapes).items()}
    except BnfoldError:
        return {}


def _check_onnx_shapes(model: Any, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Fail early (before folding) when ``--input-shape`` does not fit the model's inputs."""
    if not shapes:
        return
    from ._inputs import resolve_shapes

    try:
        resolve_shapes(onnx_input_specs(model), shapes)
    except BnfoldError as e:
        raise _with_path(e, str(path)) from e


@dataclass(frozen=True)
class _Inputs:
    """What verification runs on and how it compares: the options every job shares."""

    shapes: Mapping[str, tuple[int, ...]]
    arrays: Mapping[str, Any] | None
    samples: int
    seed: int
    atol: Any  # a float, {output: float} or None (bnfold.compare.ToleranceArg)
    rtol: Any
    opt_level: str | None
    compare: Mapping[str, Any] = field(default_factory=dict)
    """Further keyword arguments of :func:`bnfold.verification.verify` (error_stat, locate, ...)."""

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
        **ins.compare,
    )
    if example_inputs is not None:
        kwargs["example_inputs"] = example_inputs
    try:
        report: VerifyReport = verify(reference, candidate, **kwargs)
    except BnfoldError as e:
        raise _with_path(e, where) from e
    progress("verify", 1, 1)
    return report


_with_path = with_context


def _check_sampling(samples: int, seed: int, inputs: object) -> None:
    """``--samples`` and ``--seed`` are checked once, here, for every job that draws inputs."""
    if samples < 1:
        raise OptionError(f"--samples {samples}: must be >= 1")
    if seed < 0:
        raise OptionError(f"--seed {seed}: must be >= 0")
    if inputs is not None and samples != 1:
        raise OptionError(f"--samples {samples}: does not apply with --inputs (the archive is the data)")


_check_samples = _check_sampling  # the name the other file jobs used


def _refuse(flags: Mapping[str, object], why: str) -> None:
    """Raise :class:`OptionError` naming the first flag that was given although it does not apply."""
    for flag, value in flags.items():
        if value not in (None, False, (), []):
            raise OptionError(f"{flag}: {why}")


def _source_format_early(src: Path, out_fmt: str, dst: Path) -> None:
    """Refuse a source/output pairing before loading (a sniff of a PyTorch file reads no pickle).

    Writing ``.onnx`` works from every source, so only ``.pt``/``.pt2`` outputs are sniffed here.
    """
    if out_fmt == "onnx":
        return
    from . import io as bio

    fmt = bio.detect_format(src)
    if fmt == "onnx":
        raise OptionError(f"{dst}: an ONNX model can only be written as .onnx")
    if fmt == "pt2" and out_fmt == "torch":
        raise OptionError(f"{dst}: a torch.export program is written as .pt2 or .onnx, not {dst.suffix}")


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
    eval_semantics: bool = False,
    input_shapes: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    samples: int = 1,
    seed: int = 0,
    atol: Any = None,
    rtol: Any = None,
    opt_level: str | None = None,
    opset: int | None = None,
    export: ExportSettings | None = None,
    external_data: bool | None = None,
    flush_denormals: bool = True,
    health: bool = False,
    prune_constant_channels: bool = False,
    progress: ProgressFn | None = None,
    all_or_nothing: bool = False,
) -> FoldReport:
    """Fold every exactly-foldable BatchNorm of the model in ``src``, verify, and write ``dst``.

    ``dst``'s extension picks the output format: ``.onnx``; ``.pt2`` (torch.export); ``.pt``/``.pth``/
    ``.ckpt``/``.bin`` (a pickled module, since a folded model no longer has the factory's layout).
    A PyTorch source written to ``.onnx`` is folded, exported (dynamic batch, names from the forward
    signature: see :mod:`bnfold.export`), folded again where the exporter left BN, and verified against
    the PyTorch original.

    Args:
        src: the model file (never modified, unless ``in_place`` and ``dst`` is ``src``).
        dst: the output file, written atomically.
        affine: ONNX output: turn BNs that have nothing to fold into into one Mul + one Add.
        verify: compare the result with the original in onnxruntime (on by default).
        force: write ``dst`` even when verification fails (:class:`FoldVerificationError` still raised,
            with ``fold_report.extra["written"]`` True).
        in_place: allow ``dst`` to be ``src``.
        model_factory: ``module.path:factory`` that builds the architecture of a state_dict.
        trust_pickle: allow unpickling a whole module (runs code from the file).
        eval_semantics: PyTorch: fold a module saved in ``train()`` mode with its inference semantics.
        input_shapes: ``["name=1x3x224x224", ...]`` or ``{name: shape}``: the shapes verified on.
        inputs: an ``.npz`` file with the inputs to verify on.
        samples, seed, atol, rtol, opt_level: verification settings (see :func:`bnfold.verification.verify`).
        opset: ONNX opset for a PyTorch source exported to ``.onnx`` (shorthand for ``export.opset``).
        export: how a PyTorch source is exported to ``.onnx`` (:class:`ExportSettings`).
        external_data: ONNX output: True writes ``OUT.data`` next to OUT, False inline; None keeps the
            input's layout (a PyTorch source: external only over the 2 GiB protobuf limit).
        flush_denormals: set subnormal values of the folded tensors to zero before verification (default)
            (:mod:`bnfold.denormals`); a PyTorch source written to ``.onnx`` has every float
            initializer flushed, since the exporter writes all of them anew.
        health: also audit the BNs (:func:`bnfold.health`) into ``report.health``.
        prune_constant_channels: PyTorch module written to ``.pt``/``.pth``/``.pt2``: drop the
            channels that are constant after the fold where exact (:mod:`bnfold.constant_channels`).
        progress: ``progress(stage, done, total)`` callback.
        all_or_nothing: when verification fails, refuse the whole model (otherwise, for an ONNX
            source, or an ``nn.Module`` written as ``.pt``/``.pt2``, the folds that make it fail are
            found and left in place: :mod:`bnfold.culprit`).

    Returns:
        The :class:`FoldReport`; ``report.extra`` holds paths, formats, file sizes (external data
        included); ``report.verification`` the :class:`VerifyReport` (None with ``verify=False``).

    Raises:
        OutputError, OptionError, ModelFormatError, ...: exit code 2, nothing written.
        FoldVerificationError: verification failed; nothing written unless ``force``.
    """
    t0 = time.perf_counter()
    prog = progress or _noop
    src_p, dst_p = Path(src), Path(dst)
    exp = export or ExportSettings()
    if opset is not None:
        exp = replace(exp, opset=opset)
    # Every option and the output path are checked before anything is loaded.
    _check_sampling(samples, seed, inputs)
    if exp.opset is not None and not 7 <= exp.opset <= 25:
        raise OptionError(f"--opset {exp.opset}: must be between 7 and 25")
    shapes = _parse_shapes(input_shapes, src_p)
    out_fmt = output_format(dst_p)
    check_output(src_p, dst_p, in_place=in_place)
    if out_fmt != "onnx":
        _refuse({**exp.flags(), "--external-data": external_data is not None},
                f"applies only when the output is .onnx, not {dst_p.suffix}")
    _source_format_early(src_p, out_fmt, dst_p)
    arrays = load_inputs(inputs)
    if not verify:
        _refuse({"--atol": atol, "--rtol": rtol, "--opt-level": opt_level,
                 "--samples": samples != 1}, "does not apply with --no-verify")

    ins = _Inputs(shapes, arrays, samples, seed, atol, rtol, opt_level)
    post = PostFold(flush_denormals, health, prune_constant_channels)
    if prune_constant_channels and out_fmt == "onnx":
        raise OptionError(
            f"{dst_p}: --prune-constant-channels works on PyTorch modules written to .pt/.pth/.pt2, not on .onnx"
        )

    # Without verification the folded model goes only to io.save: ONNX weights stay in their files
    # until the fold reads them (see bnfold.io.load_with_format).
    model, src_fmt = _load(src_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog,
                           lazy_external_data=not verify)
    from . import io as bio

    # Exact now that the input was read: neither OUT nor its data file may be a file the input reads.
    protect = [] if _same_file(src_p, dst_p) else bio.files_read_by(src_p)
    bio.check_output_path(src_p, dst_p, in_place=in_place, input_files=protect)
    src_data = onnx_data_files(src_p) if src_fmt == "onnx" else []
    size_before = model_size(src_p, src_fmt)
    if src_fmt == "onnx":
        _refuse({**exp.flags(), "--eval-semantics": eval_semantics},
                "applies only to PyTorch models (MODEL is an ONNX model)")
        report, result = _fold_onnx(src_p, model, ins, affine=affine, verify=verify, post=post, progress=prog)
        if external_data is None:
            external_data = bool(src_data) or None
        if report.verification is not None and not report.verification.passed and not all_or_nothing:
            del result, model  # the failed fold: freed before the re-folds (each one re-reads the source)
            report, result = _onnx_without_culprits(src_p, report, ins, affine=affine, progress=prog)
    else:
        if out_fmt != "onnx":
            _refuse({"--affine": affine}, "applies only to ONNX outputs (Mul + Add are ONNX nodes)")
        model = _eval_if(model, eval_semantics)
        try:
            report, result = _fold_torch(
                src_p, dst_p, model, out_fmt, ins, affine=affine, verify=verify, export=exp,
                eval_semantics=eval_semantics, post=post, progress=prog,
            )
        except BnfoldError as e:
            raise _reworded(e) from e
        if (report.verification is not None and not report.verification.passed and not all_or_nothing
                and out_fmt in ("torch", "pt2") and report.backend in ("fx", "module")):
            report, result = _torch_without_culprits(src_p, model, out_fmt, ins, report, result, progress=prog)
    report = _advised(report)
    report.extra.update(
        source=str(src_p), output=str(dst_p), source_format=src_fmt, output_format=out_fmt,
        size_before=size_before, size_after=None, written=False,
        source_data_files=[str(f) for f in src_data],
    )
    if report.verification is not None:
        from .verification import runtime_notes

        report.notes.extend(runtime_notes(report.verification))
    failed = report.verification is not None and not report.verification.passed
    message = (
        f"{dst_p}: the folded model is not equivalent to {src_p} "
        f"(max abs error {report.verification.max_abs_error:.3g})"
        if failed and report.verification is not None else ""
    )
    if failed and not force:
        report.extra["total_seconds"] = time.perf_counter() - t0
        raise FoldVerificationError(f"{message}; not written (--force writes it anyway)", report)
    if failed:
        report.notes.append("verification failed; written anyway because of --force")
    _save(result, dst_p, prog, external_data=external_data if out_fmt == "onnx" else None, protect=protect)
    if in_place and src_fmt == "onnx":
        report.notes.extend(_drop_orphaned_data(src_data, dst_p))
    out_data = onnx_data_files(dst_p) if out_fmt == "onnx" else []
    report.extra.update(
        size_after=model_size(dst_p, out_fmt), written=True, total_seconds=time.perf_counter() - t0,
        output_data_files=[str(f) for f in out_data],
    )
    if failed:
        raise FoldVerificationError(f"{message}; written anyway because of --force", report)
    return report


def _eval_if(model: Any, eval_semantics: bool) -> Any:
    """With ``eval_semantics`` a loaded module is put in eval mode (bnfold owns what it loaded)."""
    if eval_semantics:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise OptionError("--eval-semantics: applies only to an nn.Module (not a torch.export program)")
        model.eval()
    return model


def _drop_orphaned_data(old: Sequence[Path], dst: Path) -> list[str]:
    """After ``--in-place``: remove the input's external-data files that nothing reads any more.

    A data file the new model still reads is kept, and so is one that another ONNX file in the same
    folder references (a shared weights file belongs to that model too). Returns a note per file kept.
    """
    keep = set(onnx_data_files(dst))
    notes: list[str] = []
    candidates = [f for f in old if f not in keep and f.exists()]
    if not candidates:
        return notes
    others: set[Path] = set()
    try:
        siblings = [p for p in dst.resolve().parent.iterdir() if p.suffix.lower() == ".onnx" and p.is_file()]
    except OSError:
        siblings = []
    for sib in siblings:
        if sib.resolve() != dst.resolve():
            others.update(onnx_data_files(sib))
    for f in candidates:
        if f in others:
            notes.append(f"kept {f.name}: another model in the folder reads it")
            continue
        try:
            f.unlink()
        except OSError:
            notes.append(f"could not remove {f.name}, which the new model no longer reads")
    return notes


def _save(
    model: Any, dst: Path, progress: ProgressFn, *, external_data: bool | None = None, protect: Sequence[str] = ()
) -> None:
    from . import io as bio

    progress("save", 0, 1)
    bio.save(model, dst, external_data=external_data, protect=protect)
    progress("save", 1, 1)


def _fold_onnx(
    src: Path, model: Any, ins: _Inputs, *, affine: bool, verify: bool, post: PostFold, progress: ProgressFn
) -> tuple[FoldReport, Any]:
    from .onnx import fold_model

    _check_onnx_shapes(model, ins.shapes, src)
    progress("fold", 0, 1)
    t = time.perf_counter()
    from .postfold import after_fold, before_fold

    before = before_fold(model, "onnx", post, inplace=False)
    # The audit reads the original BN parameters: then the fold works on a copy.
    folded, report = fold_model(model, affine=affine, inplace=not post.health)
    report.seconds = time.perf_counter() - t
    after_fold(model, folded, report, before, "onnx", post)
    progress("fold", 1, 1)
    report.extra["signature"] = io_signature(folded)
    if verify:
        # The reference is the source file on disk (see the module docstring).
        report.verification = _verify(
            str(src), folded, ins, example_inputs=None, progress=progress, where=str(src)
        )
        report.extra["verified_on"] = _verified_on(folded, ins, None)
    return report, folded


def _onnx_without_culprits(
    src: Path, report: FoldReport, ins: _Inputs, *, affine: bool, progress: ProgressFn
) -> tuple[FoldReport, Any]:
    """Bisect over the folds (:func:`bnfold.culprit.fold_without_culprits`); each try re-reads ``src``."""
    from . import io as bio
    from .culprit import fold_without_culprits
    from .onnx import fold_model

    def fold(excluded: frozenset[str]) -> tuple[Any, FoldReport]:
        return fold_model(bio.load(src), affine=affine, inplace=True, exclude=excluded)

    def check(model: Any) -> VerifyReport:
        return _verify(str(src), model, ins, example_inputs=None, progress=progress, where=str(src))

    model, new, search = fold_without_culprits(report, fold, check)
    if not search.resolved:
        return report, fold_model(bio.load(src), affine=affine, inplace=True)[0]
    return new, model


def _torch_without_culprits(
    src: Path, model: Any, out_fmt: str, ins: _Inputs, report: FoldReport, result: Any, *, progress: ProgressFn
) -> tuple[FoldReport, Any]:
    """An ``nn.Module`` written as ``.pt``/``.pt2``: bisect over its folds (``fold_module(exclude=...)``)."""
    import torch

    from .culprit import fold_without_culprits
    from .fx.module import fold_module

    examples = torch_examples(model, ins.shapes, ins.arrays, ins.seed, src)

    def fold(excluded: frozenset[str]) -> tuple[Any, FoldReport]:
        out, rep = fold_module(model, example_inputs=examples, exclude=excluded)
        if out_fmt == "pt2":
            return torch.export.export(out, tuple(examples)), rep
        return out, rep

    def check(candidate: Any) -> VerifyReport:
        return _verify(model, candidate, ins.carried_by_examples(), example_inputs=examples, progress=progress,
                       where=str(src))

    folded, new, search = fold_without_culprits(report, fold, check)
    return (new, folded) if search.resolved else (report, result)


def _fold_torch(
    src: Path,
    dst: Path,
    model: Any,
    out_fmt: str,
    ins: _Inputs,
    *,
    affine: bool,
    verify: bool,
    export: ExportSettings,
    eval_semantics: bool,
    post: PostFold,
    progress: ProgressFn,
) -> tuple[FoldReport, Any]:
    import torch

    from .api import fold_with_report

    is_ep = isinstance(model, torch.export.ExportedProgram)
    needs_examples = verify or out_fmt in ("onnx", "pt2")
    examples = torch_examples(model, ins.shapes, ins.arrays, ins.seed, src) if needs_examples else None

    if out_fmt == "onnx":
        # export_onnx folds in PyTorch, exports, folds what the exporter left; we verify below with the
        # user's settings against the PyTorch original.
        result, report = export_folded(model, examples, export=export, affine=affine, progress=progress)
        if post.health:
            from .health import health

            report.health = health(model, example_inputs=None if is_ep else examples)
        if post.flush_denormals:  # every initializer of the exported model is new: no snapshot tells them apart
            from .denormals import flush_model

            report.flushed_denormals = flush_model(result, None)
    else:
        progress("fold", 0, 1)
        t = time.perf_counter()
        # Example inputs prove where a Linear meets a BatchNorm1d on 2-D data (see bnfold.fold).
        flags = {"flush_denormals": post.flush_denormals, "health": post.health,
                 "prune_constant_channels": post.prune_constant_channels}
        if is_ep:
            result, report = fold_with_report(model, **flags)
        else:
            result, report = fold_with_report(model, example_inputs=examples, eval_semantics=eval_semantics, **flags)
        report.seconds = time.perf_counter() - t
        progress("fold", 1, 1)
        if out_fmt == "pt2" and not is_ep:
            progress("export", 0, 1)
            result = torch.export.export(result, tuple(examples or ()))
            progress("export", 1, 1)
    names: list[str] = []
    if out_fmt == "onnx":
        sig = io_signature(result)
        report.extra["signature"] = sig
        names = [i["name"] for i in sig["inputs"]]
    if verify:
        # The reference is the PyTorch original; verify exports torch models to ONNX itself. The
        # example inputs carry the shapes and the data, so no name-keyed shapes or arrays go along.
        report.verification = _verify(
            model, result, ins.carried_by_examples(), example_inputs=examples, progress=progress,
            where=str(src),
        )
        report.extra["verified_on"] = _verified_on(result, ins, examples, names)
        if out_fmt == "onnx" and export.dynamic_batch and not is_ep and examples:
            _check_other_batch(model, result, examples, ins, progress, src)
    return report, result


def _check_other_batch(
    model: Any, result: Any, examples: tuple[Any, ...], ins: _Inputs, progress: ProgressFn, src: Path
) -> None:
    """A dynamic batch is a claim: check it at a batch size the export did not see (one more).

    A model that bakes its batch size in (``x.reshape(2, -1)``) exports with a ``batch`` dimension
    that only works at the traced size; it is refused with the way out instead of shipped.
    """
    import torch

    from .errors import VerificationError

    if not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.is_floating_point() for t in examples):
        return  # integer inputs (indices) may not take random rows: the traced batch was checked
    batch = int(examples[0].shape[0])
    g = torch.Generator().manual_seed(ins.seed + 1)
    other = tuple(torch.randn((batch + 1, *t.shape[1:]), generator=g, dtype=t.dtype) for t in examples)
    why = ""
    try:
        rep = _verify(model, result, ins.carried_by_examples(), example_inputs=other, progress=progress,
                      where=str(src))
        if not rep.passed:
            why = f"max abs error {rep.max_abs_error:.3g}"
    except BnfoldError as e:
        why = str(e)
    if why:
        raise VerificationError(
            f"{src}: the exported ONNX model is right at batch {batch} but not at batch {batch + 1} "
            f"({why}): the model fixes its batch size; pass --static-batch"
        )


def inspect_file(
    src: str | os.PathLike[str],
    *,
    affine: bool = False,
    model_factory: str | None = None,
    trust_pickle: bool = False,
    eval_semantics: bool = False,
    input_shapes: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    seed: int = 0,
    health: bool = False,
    progress: ProgressFn | None = None,
) -> FoldReport:
    """The verdict for every BatchNorm of the model in ``src``, as ``fold`` would give it; nothing written.

    Every option that decides a verdict in ``fold`` is taken here too: ``affine`` (ONNX), and for
    PyTorch ``eval_semantics`` and the shapes (``input_shapes`` / ``inputs``, or the factory's
    ``example_input_shape``) that prove where a Linear meets a BatchNorm1d on 2-D data.

    ``health=True`` also audits the BNs (:func:`bnfold.health`) into ``report.health``.

    Returns:
        A dry-run :class:`FoldReport` whose ``bn_after`` is the predicted count (``bn_before`` minus the
        BNs that would go); ``extra`` holds the path, format and file size (external data included).
    """
    from .api import fold_with_report

    t0 = time.perf_counter()
    prog = progress or _noop
    src_p = Path(src)
    _check_sampling(1, seed, inputs)
    shapes = _parse_shapes(input_shapes, src_p)
    arrays = load_inputs(inputs)
    model, fmt = _load(src_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)
    prog("fold", 0, 1)
    examples: Any = None
    if fmt == "onnx":
        _refuse({"--eval-semantics": eval_semantics}, "applies only to PyTorch models (MODEL is an ONNX model)")
        _check_onnx_shapes(model, shapes, src_p)
        _, report = fold_with_report(model, dry_run=True, affine=affine)
        report.extra["signature"] = io_signature(model)
    else:
        import torch

        _refuse({"--affine": affine}, "applies only to ONNX models (Mul + Add are ONNX nodes)")
        model = _eval_if(model, eval_semantics)
        try:
            if isinstance(model, torch.export.ExportedProgram):
                _, report = fold_with_report(model, dry_run=True)
            else:
                has_examples = bool(shapes or arrays or getattr(model, "example_inputs", None) is not None)
                examples = torch_examples(model, shapes, arrays, seed, src_p) if has_examples else None
                _, report = fold_with_report(
                    model, dry_run=True, example_inputs=examples, eval_semantics=eval_semantics
                )
        except BnfoldError as e:
            raise _reworded(e) from e
        # The PyTorch backends decide without rewriting: the BN count after is the prediction.
        report.bn_after = report.bn_before - report.folded
        report.extra["predicted_counts"] = ["bn"]
    if health:
        from .health import health as audit_model

        if fmt == "onnx":
            report.health = audit_model(model, affine=affine)
        else:
            report.health = audit_model(model, eval_semantics=eval_semantics,
                                        example_inputs=examples)
    prog("fold", 1, 1)
    report = _advised(report)
    report.extra.update(
        source=str(src_p), source_format=fmt, size_before=model_size(src_p, fmt),
        total_seconds=time.perf_counter() - t0,
    )
    return report


def verify_files(
    reference: str | os.PathLike[str] | None,
    candidate: str | os.PathLike[str] | None,
    *,
    model_factory: str | None = None,
    trust_pickle: bool = False,
    input_shapes: Sequence[str] | Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike[str] | None = None,
    samples: int = 1,
    seed: int = 0,
    atol: Any = None,
    rtol: Any = None,
    opt_level: str | None = None,
    progress: ProgressFn | None = None,
    **compare: Any,
) -> VerifyReport:
    """Run the models in two files on the same inputs and compare every output.

    ``compare`` takes the further options of :func:`bnfold.verification.verify`: ``error_stat``,
    ``min_cosine``, ``min_snr_db``, ``save_outputs``, ``load_outputs`` (then ``reference`` is None and
    ``candidate`` may be None too) and ``locate``.

    Returns:
        The :class:`VerifyReport` (``passed`` False on a mismatch: this function does not raise for it).

    Raises:
        NotComparableError: the two models cannot be compared (exit code 2).
        ModelFormatError, OptionError: a file or an option cannot be used (exit code 2).
    """
    prog = progress or _noop
    _check_sampling(samples, seed, inputs)
    ref_p = None if reference is None else Path(reference)
    cand_p = None if candidate is None else Path(candidate)
    first = ref_p or cand_p or Path(str(compare.get("load_outputs", "")))
    shapes = _parse_shapes(input_shapes, first)
    arrays = load_inputs(inputs)
    ref = ref_fmt = cand = None
    if ref_p is not None:
        ref, ref_fmt = _load(ref_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)
    if cand_p is not None:
        cand, _ = _load(cand_p, model_factory=model_factory, trust_pickle=trust_pickle, progress=prog)
    ins = _Inputs(shapes, arrays, samples, seed, atol, rtol, opt_level, compare)
    examples = None
    if ref_p is not None and ref_fmt != "onnx":  # the example inputs carry shapes and data for a PyTorch reference
        examples = torch_examples(ref, shapes, arrays, seed, ref_p)
        ins = ins.carried_by_examples()
    where = " vs ".join(str(p) for p in (ref_p, cand_p) if p is not None)
    return _verify(ref, cand, ins, example_inputs=examples, progress=prog, where=where)


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
    if OUTPUT_FORMATS.get(dst_p.suffix.lower()) != "torch":
        raise OptionError(f"{dst_p}: a frozen PyTorch model is saved as .pt/.pth/.ckpt/.bin, like its source")
    from . import io as bio

    fmt = bio.detect_format(src_p)
    if fmt not in ("state_dict", "pickled_module"):
        raise UnsupportedModelError(
            f"{src_p}: freeze works on PyTorch checkpoints (state_dict with --model, or a pickled module), "
            f"not on {_FORMAT_NAMES.get(fmt, fmt)}"
        )
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
        "size_before": model_size(src_p, fmt),
        "size_after": model_size(dst_p, fmt),
        "seconds": time.perf_counter() - t0,
    }
