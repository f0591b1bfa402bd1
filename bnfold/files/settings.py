"""The settings of the file jobs: one frozen record per job, checked once, here.

A job takes ``(src, dst, settings, progress=None)``; the CLI builds the record from its flags and the
Python API builds it by hand. Records nest the parts jobs share:

    FoldSettings    = fold flags + options: FoldOptions + load: LoadSettings + inputs: InputSettings
                      + verification: VerifySettings + export: ExportSettings
    InspectSettings = options + load + inputs
    CompareSettings = load + inputs + verification           (``bnfold verify``)
    FreezeSettings  = freeze flags + load

Rules:
    * every check that needs no file is a ``check_*`` function of this module and raises
      :class:`~bnfold.errors.OptionError` naming the flag a CLI user typed; the jobs call them before
      anything is loaded, so a bad option never costs a load;
    * a flag given where it does not apply is refused (:func:`refuse`), never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnfold.errors import OptionError
from bnfold.export import ExportSettings
from bnfold.options import FoldOptions

__all__ = [
    "LoadSettings",
    "InputSettings",
    "VerifySettings",
    "FoldSettings",
    "InspectSettings",
    "CompareSettings",
    "FreezeSettings",
    "OUTPUT_FORMATS",
    "output_format",
    "refuse",
    "check_inputs",
    "check_fold",
    "check_batch_stats",
]

OUTPUT_FORMATS: dict[str, str] = {
    ".onnx": "onnx",
    ".pt2": "pt2",
    ".pt": "torch",
    ".pth": "torch",
    ".ckpt": "torch",
    ".bin": "torch",
}
"""Output extension -> format. "torch" means the same checkpoint kind as the source."""

ShapesArg = Sequence[str] | Mapping[str, tuple[int, ...]]
"""``["name=1x3x224x224", ...]`` (as typed on the command line) or ``{name: shape}``."""


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """How a model file is loaded (see :func:`bnfold.io.load_file`)."""

    model_factory: str | None = None
    """``module.path:factory`` that builds the architecture of a state_dict (``--model``)."""
    trust_pickle: bool = False
    """Allow unpickling a whole module: runs code from the file (``--trust-pickle``)."""


@dataclass(frozen=True, slots=True)
class InputSettings:
    """What the model is run on: shapes (``-s``), real inputs (``--inputs``), the seed of random ones."""

    input_shapes: ShapesArg = ()
    inputs: str | os.PathLike[str] | None = None
    seed: int = 0


@dataclass(frozen=True, slots=True)
class VerifySettings:
    """How verification compares (see :func:`bnfold.verification.verify`)."""

    samples: int = 1
    atol: Any = None
    """A float, ``{output: float}`` or None (per-dtype default): :data:`bnfold.verification.compare.ToleranceArg`."""
    rtol: Any = None
    opt_level: str | None = None
    error_stat: str = "max"
    min_cosine: float | None = None
    min_snr_db: float | None = None
    save_outputs: str | os.PathLike[str] | None = None
    load_outputs: str | os.PathLike[str] | None = None
    locate: bool = False

    def compare_options(self) -> dict[str, Any]:
        """The options of :func:`bnfold.verification.verify` beyond inputs and tolerances (given ones only)."""
        given = {
            "error_stat": None if self.error_stat == "max" else self.error_stat,
            "min_cosine": self.min_cosine,
            "min_snr_db": self.min_snr_db,
            "save_outputs": self.save_outputs,
            "load_outputs": self.load_outputs,
            "locate": self.locate or None,
        }
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True, slots=True)
class InspectSettings:
    """``bnfold inspect``: the options that decide a verdict in ``fold``, and ``health``.

    :class:`FoldSettings` extends it: ``fold`` takes every option ``inspect`` takes, with the same
    meaning, so a dry run gives the verdicts the fold will give.
    """

    options: FoldOptions = field(default_factory=FoldOptions)
    """The rewrite choices and post-fold steps (:class:`~bnfold.options.FoldOptions`): ``--affine``,
    ``--no-merge-branches``, ``--no-propagate``, ``--batch-stats``, ``--eval-semantics``, ``--health``,
    and for ``fold`` ``--no-flush-denormals`` and ``--prune-constant-channels`` (a dry run writes
    nothing to flush or prune)."""
    load: LoadSettings = field(default_factory=LoadSettings)
    inputs: InputSettings = field(default_factory=InputSettings)
    """The shapes / inputs that prove where a Linear meets a BatchNorm1d on 2-D data (PyTorch), that
    verification runs on, and that a PyTorch export is traced with."""


@dataclass(frozen=True, slots=True)
class FoldSettings(InspectSettings):
    """``bnfold fold`` (:func:`bnfold.files.fold_file`): the options of ``inspect`` and these."""

    verify: bool = True
    """Compare the result with the original in onnxruntime before it is put in place (``--no-verify``)."""
    force: bool = False
    """Write OUT even when verification fails (the job still raises ``FoldVerificationError``)."""
    in_place: bool = False
    """Allow OUT to be MODEL (replaced only after verification)."""
    external_data: bool | None = None
    """ONNX output: True writes ``OUT.data`` next to OUT, False inline; None keeps the input's layout
    (a PyTorch source: external only over the 2 GiB protobuf limit)."""
    all_or_nothing: bool = False
    """When verification fails, refuse the whole model (otherwise, for an ONNX source or an
    ``nn.Module`` written as ``.pt``/``.pt2``, the folds that make it fail are left: :mod:`bnfold.culprit`)."""
    requantize_bias: bool = False
    """ONNX source (QDQ graphs): requantise an int32 bias to its new scale, at most half a step off
    (``--requantize-bias``, :func:`bnfold.onnx.match_qdq.requantize_int32_bias`); an error for a PyTorch source."""
    verification: VerifySettings = field(default_factory=VerifySettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    """How a PyTorch source is exported to ``.onnx`` (opset, dynamic batch, names)."""


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """``bnfold verify``: load both files alike, run them on the same inputs, compare."""

    load: LoadSettings = field(default_factory=LoadSettings)
    inputs: InputSettings = field(default_factory=InputSettings)
    verification: VerifySettings = field(default_factory=VerifySettings)


@dataclass(frozen=True, slots=True)
class FreezeSettings:
    """``bnfold freeze``."""

    learnable: bool = False
    """Make scale and shift trainable parameters (buffers otherwise)."""
    in_place: bool = False
    """Allow OUT to be MODEL."""
    load: LoadSettings = field(default_factory=LoadSettings)


def refuse(flags: Mapping[str, object], why: str) -> None:
    """Raise :class:`OptionError` naming the first flag that was given although it does not apply."""
    for flag, value in flags.items():
        if value not in (None, False, (), []):
            raise OptionError(f"{flag}: {why}")


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


def check_inputs(inputs: InputSettings, samples: int = 1) -> None:
    """``--samples``, ``--seed`` and the sizes of ``--input-shape`` are checked once, here, for every job
    that draws inputs (the upper bounds: :mod:`bnfold.verification.bounds`)."""
    from bnfold.verification.bounds import MAX_SAMPLES, check_at_most, check_shape_sizes

    if samples < 1:
        raise OptionError(f"--samples {samples}: must be >= 1")
    check_at_most("--samples", samples, MAX_SAMPLES)
    check_shape_sizes(inputs.input_shapes, samples if inputs.inputs is None else 1)
    if inputs.seed < 0:
        raise OptionError(f"--seed {inputs.seed}: must be >= 0")
    if inputs.inputs is not None and samples != 1:
        raise OptionError(f"--samples {samples}: does not apply with --inputs (the archive is the data)")


def check_batch_stats(value: str | None) -> None:
    """``--batch-stats`` takes ``instance``."""
    if value is not None and value != "instance":
        raise OptionError(f"--batch-stats {value}: expected instance")


def check_fold(settings: FoldSettings, dst: Path) -> str:
    """Every fold option that needs no file, checked before anything is read; returns the output format."""
    v, exp = settings.verification, settings.export
    check_inputs(settings.inputs, v.samples)
    check_batch_stats(settings.options.batch_stats)
    if exp.opset is not None and not 7 <= exp.opset <= 25:
        raise OptionError(f"--opset {exp.opset}: must be between 7 and 25")
    out_fmt = output_format(dst)
    if out_fmt != "onnx":
        refuse(
            {**exp.flags(), "--external-data": settings.external_data is not None},
            f"applies only when the output is .onnx, not {dst.suffix}",
        )
    if not settings.verify:
        refuse(
            {"--atol": v.atol, "--rtol": v.rtol, "--opt-level": v.opt_level, "--samples": v.samples != 1},
            "does not apply with --no-verify",
        )
    if settings.options.prune_constant_channels and out_fmt == "onnx":
        raise OptionError(
            f"{dst}: --prune-constant-channels works on PyTorch modules written to .pt/.pth/.pt2, not on .onnx"
        )
    return out_fmt
