"""bnfold: remove BatchNorm from trained networks without changing what they compute.

Public API (imported lazily, so ``import bnfold`` does not import torch or onnxruntime)::

    model = bnfold.fold(model)                 # onnx.ModelProto, nn.Module or ExportedProgram
    report = bnfold.inspect(model)             # one verdict per BN, nothing changed
    model, report = bnfold.fold_with_report(model)
    vreport = bnfold.verify(reference, candidate)
    report = bnfold.export_onnx(module, (x,), "model.onnx")
    frozen = bnfold.freeze(module, learnable=False)
    model = bnfold.recalibrate(model, batches)   # new running statistics (distributed too)
    groups = bnfold.param_groups(frozen, lr)       # frozen scale/shift at 10x lr, for torch.optim
    audit = bnfold.health(model)               # dead channels, tiny variances, fp16 range, subnormals
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from .health_records import BnHealth, HealthReport, RangeCounts
from .records import Direction, FoldReport, OutputCheck, Site, Skip, SkipReason, VerifyReport

__version__ = "0.1.0"

_LAZY = {
    "fold": "bnfold.api",
    "inspect": "bnfold.api",
    "fold_with_report": "bnfold.api",
    "health": "bnfold.api",
    "verify": "bnfold.verification",
    "load": "bnfold.io",
    "save": "bnfold.io",
    "export_onnx": "bnfold.export",
    "freeze": "bnfold.freezing",
    "unfreeze": "bnfold.freezing",
    "recalibrate": "bnfold.recalibration",
    "param_groups": "bnfold.recalibration",
    "freeze_with_report": "bnfold.freezing",
    "register_bn_like": "bnfold.fx.custom",
    "register_checkpoint_runner": "bnfold.fx.safety",
}

__all__ = [
    "__version__",
    *_LAZY,
    "health",
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
    "BnHealth",
    "HealthReport",
    "RangeCounts",
]


if TYPE_CHECKING:
    # Type checkers see the real signatures (and reject a misspelt ``bnfold.fodl``); at run time the
    # names resolve lazily through ``__getattr__`` so that ``import bnfold`` stays free of torch.
    from . import nn as nn
    from .api import fold as fold
    from .api import fold_with_report as fold_with_report
    from .api import health as health
    from .api import inspect as inspect
    from .export import export_onnx as export_onnx
    from .freezing import freeze as freeze
    from .freezing import freeze_with_report as freeze_with_report
    from .freezing import unfreeze as unfreeze
    from .io import load as load
    from .io import save as save
    from .recalibration import recalibrate as recalibrate
    from .verification import verify as verify
else:

    def __getattr__(name: str) -> Any:
        if name in _LAZY:
            return getattr(importlib.import_module(_LAZY[name]), name)
        if name == "nn":
            return importlib.import_module("bnfold.nn")
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
