"""The ``bnfold`` command line (entry point ``bnfold.cli:main``; :data:`app` is the typer application).

One concept a module: :mod:`.commands` (the typer commands), :mod:`.run` (how a command runs: signals,
errors to exit codes, progress, JSON out), :mod:`.options` (the flags, declared once), :mod:`.render` (rich
rendering), :mod:`.jsonout` (the ``--json`` documents) and :mod:`.text` (model strings escaped: what every
other module prints goes through it). rich is imported only to draw: a ``-q`` run never loads it.
"""

from __future__ import annotations

from .commands import app, main

__all__ = ["app", "main"]
