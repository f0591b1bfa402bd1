"""Which backend a model object belongs to (no backend imported to answer)."""

from __future__ import annotations

import sys
from typing import Any

from .errors import InputError

__all__ = ["model_kind"]


def model_kind(model: Any) -> str:
    """Which backend handles ``model``: "onnx", "export" or "module".

    Raises:
        InputError: the object is none of the supported model types.
    """
    mod = type(model).__module__
    if mod.startswith("onnx") and type(model).__name__ == "ModelProto":
        return "onnx"
    if "torch" in sys.modules:
        import torch

        if isinstance(model, torch.export.ExportedProgram):
            return "export"
        if isinstance(model, torch.nn.Module):
            return "module"
    raise InputError(
        f"cannot fold a {type(model).__module__}.{type(model).__name__}: expected an onnx.ModelProto, "
        "a torch.nn.Module or a torch.export.ExportedProgram"
    )
