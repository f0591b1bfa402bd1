"""External-data files of ONNX models and model sizes on disk (moved to :mod:`bnfold.io.datafiles`).

Kept so that ``from bnfold._datafiles import onnx_data_files, model_size`` goes on working; the walker
behind them covers every tensor of a model (nested graphs and node attributes too).
"""

from __future__ import annotations

from bnfold.io.datafiles import model_size, onnx_data_files

__all__ = ["onnx_data_files", "model_size"]
