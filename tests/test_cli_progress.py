"""Progress on a terminal: a line at once (before any heavy import), then numbered stages with counts."""

from __future__ import annotations

import io

from rich.console import Console

from bnfold.cli.render import progress_callback, stage_label


def test_progress_shows_at_once_and_numbers_stages() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80, color_system=None)
    stages = ("load", "fold", "verify", "save")
    with progress_callback(console, stages=stages) as update:
        assert "starting" in buf.getvalue()  # drawn on entry, before the job calls back once
        update("fold", 3, 7)
        console.file.flush()
    assert stage_label("fold", stages) == "[2/4] folding"
    assert stage_label("bench", ("load", "bench")) == "[2/2] benchmarking"


def test_no_progress_off_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False)
    with progress_callback(console, stages=("load",)) as update:
        update("load", 1, 1)
    assert buf.getvalue() == ""
