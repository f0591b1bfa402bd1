"""Helpers the tests and benchmarks share (not a test module, so any of them can import it): the test kit.

* :func:`ort_session` / :func:`run_onnx` - THE onnxruntime runner: CPU, graph optimisations off
  (``ORT_DISABLE_ALL``), the oracle for every folded model (onnxruntime's own Conv+BN fusion would
  hide a wrong fold); a path, bytes or a ``ModelProto``;
* the tolerance table (:data:`ATOL`, :func:`atol`): the tolerances per dtype, named, each with the
  reason for its size, for a folded model against its unfused original (absolute on outputs of
  O(1), or relative to the output scale ``max(1, max|reference|)``); never loosened to make a test pass;
* :func:`free_port` - a free TCP port on the loopback, for ``torch.distributed`` gloo tests.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ort_session",
    "run_onnx",
    "ATOL_F64",
    "ATOL_F32",
    "ATOL_F32_DEEP",
    "ATOL_F16",
    "ATOL_BF16",
    "ATOL",
    "atol",
    "free_port",
]

ATOL_F64 = 1e-12
"""float64: the fold rounds each weight once (~1e-16 relative); the rest is summation order over a few layers."""
ATOL_F32 = 1e-5
"""float32, a few folded layers: each folded weight is rounded once more (~6e-8 relative), summed over <= ~1e3 products."""
ATOL_F32_DEEP = 2e-5
"""float32 through deeper nets or two folds in a row (PyTorch then ONNX, a BN folded twice): the roundings add up."""
ATOL_F16 = 2e-2
"""float16: 11-bit significand (~5e-4 relative per rounding), weights and activations rounded at every layer."""
ATOL_BF16 = 6e-2
"""bfloat16: 8-bit significand (~4e-3 relative per rounding)."""

ATOL: dict[str, float] = {
    "float64": ATOL_F64,
    "float32": ATOL_F32,
    "float16": ATOL_F16,
    "bfloat16": ATOL_BF16,
}
"""The default absolute tolerance per dtype name (``ATOL_F32_DEEP`` is asked for by name)."""


def atol(dtype: Any) -> float:
    """The tolerance of :data:`ATOL` for a torch dtype, a NumPy dtype or an ONNX ``TensorProto`` type."""
    if isinstance(dtype, int):  # onnx.TensorProto.FLOAT, ...
        from onnx import TensorProto

        name = TensorProto.DataType.Name(dtype).lower()
        return ATOL[{"float": "float32", "double": "float64"}.get(name, name)]
    text = str(dtype)
    return ATOL[text.removeprefix("torch.") if text.startswith("torch.") else np.dtype(dtype).name]


def ort_session(model: Any) -> Any:
    """An onnxruntime session on ``model`` (a path, bytes or ``ModelProto``): CPU, ``ORT_DISABLE_ALL``.

    Warnings of onnxruntime's own log are off (severity 3: errors only); they never decide a test.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    source = (
        str(model)
        if isinstance(model, (str, Path))
        else (model if isinstance(model, bytes) else model.SerializeToString())
    )
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def run_onnx(model: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` on ``feeds`` (:func:`ort_session`)."""
    return list(ort_session(model).run(None, dict(feeds)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
