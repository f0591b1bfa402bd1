"""The PyTorch backend: fold BatchNorm in ``nn.Module`` s (torch.fx, with a safe fallback for models
that do not trace) and in ``torch.export`` programs.

Entry points: :func:`fold_module` and :func:`fold_exported`; :mod:`bnfold.fx.match` decides (one verdict
per BN), :mod:`bnfold.fx.rewrite` applies, both mirroring the ONNX backend.
"""

from __future__ import annotations

from .custom import register_bn_like
from .export import fold_exported
from .match import find_sites
from .module import fold_module
from .safety import register_checkpoint_runner

__all__ = ["fold_module", "fold_exported", "find_sites", "register_bn_like", "register_checkpoint_runner"]
