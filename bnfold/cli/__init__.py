"""The ``bnfold`` command line (entry point ``bnfold.cli:main``; :data:`app` is the typer application).

One concept a module: :mod:`.commands` (the typer commands), :mod:`.run` (how a command runs: signals,
errors to exit codes, progress, JSON out), :mod:`.options` (the flags, declared once), :mod:`.render` (rich
rendering, model strings escaped) and :mod:`.jsonout` (the ``--json`` documents).
"""

from __future__ import annotations

from .commands import app, main

__all__ = ["app", "main"]
