"""ONNX backend: fold BatchNormalization nodes of an ``onnx.ModelProto`` exactly (never imports torch).

``fold_model(model, affine=False, dry_run=False, inplace=False) -> (model, FoldReport)``; see
:mod:`bnfold.onnx.fold` for the algorithm and :mod:`bnfold.onnx.match` for the patterns and refusals.
"""

from __future__ import annotations

from .fold import count_bn, fold_model

__all__ = ["fold_model", "count_bn"]
