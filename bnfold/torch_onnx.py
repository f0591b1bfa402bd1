"""``torch.onnx.export`` behind one process-wide lock.

torch's ONNX exporter keeps its state in module globals (``torch.onnx._globals.GLOBALS``: "in an
export", the opset, the operator export type), so two exports running at the same time in two
threads break each other (``AssertionError: GLOBALS.in_onnx_export must be True``). Every export
bnfold runs (:func:`bnfold.export_onnx`, the file jobs, and :func:`bnfold.verify` of a PyTorch
candidate) goes through :func:`export`, which holds :data:`EXPORT_LOCK` for the whole export: exports
from several threads run one after the other; everything else (folding, onnxruntime) still runs in
parallel. An export that the caller runs with ``torch.onnx.export`` directly, outside bnfold, is not
covered: hold :data:`EXPORT_LOCK` around it.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["EXPORT_LOCK", "export"]

EXPORT_LOCK = threading.RLock()
"""Held during every ``torch.onnx.export`` bnfold runs (re-entrant: a nested export does not deadlock)."""


def export(*args: Any, **kwargs: Any) -> Any:
    """``torch.onnx.export(*args, **kwargs)`` while holding :data:`EXPORT_LOCK`; returns what it returns."""
    import torch

    with EXPORT_LOCK:
        return torch.onnx.export(*args, **kwargs)
