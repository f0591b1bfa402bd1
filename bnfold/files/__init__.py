"""The file layer under the CLI: load -> fold -> verify -> write, and inspect / verify / freeze on files.

Layers point one way: ``cli -> files -> {api, verification, export, io} -> backends``. Each job takes
``(src, [dst,] settings, progress=None)`` with one frozen settings record (:mod:`.settings`) and returns
a record (:class:`~bnfold.records.FoldReport`, :class:`~bnfold.records.VerifyReport`,
:class:`~bnfold.records.FreezeReport`); nothing here prints.

Modules:
    settings   the records, the option checks (``OptionError`` naming the flag), output formats
    load       one load per file (``Loaded``), the factory
    output     output-path checks, staging (write, verify that file, rename), ``--in-place`` clean-up
    verify     verification with a job's settings, the ``verify`` job
    fold       the ``fold`` job (ONNX path, the verification-failed policy)
    fold_torch the PyTorch side of ``fold`` (export to ONNX, culprits, the dynamic-batch check)
    inspect    the ``inspect`` job
    freeze     the ``freeze`` job
"""

from __future__ import annotations

from bnfold.errors import FoldVerificationError
from bnfold.export import ExportSettings
from bnfold.options import FoldOptions

from .fold import fold_file
from .freeze import freeze_file
from .inspect import inspect_file
from .load import ProgressFn, resolve_factory
from .output import check_output
from .settings import (
    OUTPUT_FORMATS,
    CompareSettings,
    FoldSettings,
    FreezeSettings,
    InputSettings,
    InspectSettings,
    LoadSettings,
    VerifySettings,
    output_format,
)
from .verify import io_signature, verify_files

__all__ = [
    "ProgressFn",
    "FoldVerificationError",
    "OUTPUT_FORMATS",
    "output_format",
    "check_output",
    "resolve_factory",
    "io_signature",
    "LoadSettings",
    "InputSettings",
    "VerifySettings",
    "ExportSettings",
    "FoldOptions",
    "FoldSettings",
    "InspectSettings",
    "CompareSettings",
    "FreezeSettings",
    "fold_file",
    "inspect_file",
    "verify_files",
    "freeze_file",
]
