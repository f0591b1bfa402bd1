"""The PyTorch backend: fold BatchNorm in ``nn.Module`` s (torch.fx, with a safe fallback for models
that do not trace) and in ``torch.export`` programs.

Stages, mirroring the ONNX backend (``onnx/match*.py`` -> ``onnx/plan.py`` -> ``onnx/rewrite.py``,
driven by ``onnx/fold.py``):

* match (structure -> ``Candidate | Skip`` per BN): :mod:`bnfold.fx.match` with its cases
  :mod:`~bnfold.fx.match_forward`, :mod:`~bnfold.fx.match_routes`, :mod:`~bnfold.fx.match_backward`
  (records in :mod:`~bnfold.fx.sites`); :mod:`bnfold.fx.export_match` for ``torch.export``;
* plan (float64 numbers -> new tensors, or ``Skip(OVERFLOW)``): :mod:`bnfold.fx.plan`;
* rewrite (apply only): :mod:`bnfold.fx.rewrite`, :mod:`bnfold.fx.export_rewrite`;
* branch merging (structural re-parameterisation, after the folds): :mod:`bnfold.fx.merge`, its kernel
  math shared with :mod:`bnfold.onnx.merge` in :mod:`bnfold.fold_math.merge`;
* drivers: :func:`fold_module` (:mod:`bnfold.fx.module`, copies in :mod:`bnfold.fx.copying`) and
  :func:`fold_exported` (:mod:`bnfold.fx.export`).
"""

from __future__ import annotations

from .custom import register_bn_like
from .export import fold_exported
from .match import find_sites
from .module import fold_module
from .safety import register_checkpoint_runner

__all__ = ["fold_module", "fold_exported", "find_sites", "register_bn_like", "register_checkpoint_runner"]
