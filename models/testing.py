"""Helpers the tests and benchmarks share (not a test module, so any of them can import it).

* :func:`run_onnx` - run an ONNX model (path, bytes or ``ModelProto``) in onnxruntime with graph
  optimisations off, the oracle for every folded model (onnxruntime's own Conv+BN fusion is off);
* :func:`free_port` - a free TCP port on the loopback, for ``torch.distributed`` gloo tests.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_onnx", "free_port"]


def run_onnx(model: Any, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs of ``model`` on ``feeds`` (onnxruntime, CPU, ``ORT_DISABLE_ALL``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = (
        str(model)
        if isinstance(model, (str, Path))
        else (model if isinstance(model, bytes) else model.SerializeToString())
    )
    return list(ort.InferenceSession(source, so, providers=["CPUExecutionProvider"]).run(None, dict(feeds)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
