"""bnfold: remove BatchNorm from trained networks without changing what they compute.

Public API (imported lazily, so ``import bnfold`` does not import torch or onnxruntime)::

    model = bnfold.fold(model)                 # onnx.ModelProto, nn.Module or ExportedProgram
    report = bnfold.inspect(model)             # one verdict per BN, nothing changed
    model, report = bnfold.fold_with_report(model)
    vreport = bnfold.verify(reference, candidate)
    report = bnfold.export_onnx(module, (x,), "model.onnx")
    frozen = bnfold.freeze(module, learnable=False)
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
    BnfoldError,
    InputError,
    ModelFormatError,
    ModelStateError,
    NotComparableError,
    OptionError,
    OutputError,
    UnsupportedModelError,
    VerificationError,
)
from .records import Direction, FoldReport, OutputCheck, Site, Skip, SkipReason, VerifyReport

__version__ = "0.1.0"

_LAZY = {
    "fold": "bnfold.api",
    "inspect": "bnfold.api",
    "fold_with_report": "bnfold.api",
    "verify": "bnfold.verification",
    "load": "bnfold.io",
    "save": "bnfold.io",
    "export_onnx": "bnfold.export",
    "freeze": "bnfold.freezing",
    "unfreeze": "bnfold.freezing",
    "recalibrate": "bnfold.freezing",
    "freeze_with_report": "bnfold.freezing",
    "register_bn_like": "bnfold.fx.custom",
    "register_checkpoint_runner": "bnfold.fx.safety",
}

__all__ = [
    "__version__",
    *_LAZY,
    "BnfoldError",
    "InputError",
    "ModelFormatError",
    "ModelStateError",
    "NotComparableError",
    "OptionError",
    "OutputError",
    "UnsupportedModelError",
    "VerificationError",
    "Direction",
    "FoldReport",
    "OutputCheck",
    "Site",
    "Skip",
    "SkipReason",
    "VerifyReport",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "nn":
        return importlib.import_module("bnfold.nn")
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
