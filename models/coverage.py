"""Count the BatchNorms each path folds on a model: bnfold's PyTorch path, bnfold's ONNX path (on a
legacy-exporter ONNX file that keeps every BN) and ``torch.fx.experimental.optimization.fuse``.

Shared by the coverage test and ``benchmarks/bench_coverage.py``.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Coverage", "coverage", "onnx_export_keeping_bn"]


@dataclass(frozen=True)
class Coverage:
    """BN counts on one model (``fx_fuse`` None when fuse raises)."""

    bn: int
    torch_folded: int
    onnx_bn: int
    onnx_folded: int
    fx_fuse: int | None


def onnx_export_keeping_bn(model: nn.Module, x: torch.Tensor) -> bytes:
    """Legacy exporter, BN kept as BatchNormalization nodes (no constant folding, training preserved)."""
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
    )
    return buf.getvalue()


def _bn_count(m: nn.Module) -> int:
    return sum(isinstance(x, _BatchNorm) for x in m.modules())


def coverage(model: nn.Module, x: torch.Tensor) -> Coverage:
    """Fold ``model`` (eval mode, realistic statistics) each way and count."""
    import onnx

    import bnfold

    bn = _bn_count(model)
    rep = bnfold.inspect(model, example_inputs=(x,))  # the ONNX export records these shapes too
    proto = onnx.load_from_string(onnx_export_keeping_bn(copy.deepcopy(model), x))
    onnx_bn = sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization")
    orep = bnfold.inspect(proto)
    fused: int | None
    try:
        from torch.fx.experimental.optimization import fuse

        gm = fuse(copy.deepcopy(model))
        # BN left in fuse's graph: BN module calls and F.batch_norm calls (subclasses traced into)
        left = sum(
            1
            for n in gm.graph.nodes
            if (n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), _BatchNorm))
            or (n.op == "call_function" and n.target is torch.nn.functional.batch_norm)
        )
        fused = bn - left
    except Exception:  # noqa: BLE001 - fuse cannot trace every model: reported as None
        fused = None
    return Coverage(bn, rep.folded, onnx_bn, orep.folded, fused)
