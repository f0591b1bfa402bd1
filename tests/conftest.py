"""Shared test set-up: the repository root on sys.path (for ``models``), fixed seeds, and no module a
test imported from its own temporary folder left behind for the next test."""

from __future__ import annotations

import os
import random
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_TMP = os.path.realpath(tempfile.gettempdir()) + os.sep
_REPO = os.path.realpath(ROOT) + os.sep  # a checkout inside the temporary folder keeps its own modules


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    """Every test starts from the same random state (the legacy NumPy, Python and torch generators)."""
    random.seed(0)
    np.random.seed(0)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)


@pytest.fixture(autouse=True)
def _forget_temporary_modules() -> Iterator[None]:
    """A factory file a test writes (``tmp/arch.py``) and bnfold imports stays in ``sys.modules``; the
    next test's ``arch.py`` would then meet a name already taken (one process runs every test)."""
    yield
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and (p := os.path.realpath(f)).startswith(_TMP) and not p.startswith(_REPO):
            del sys.modules[name]
