"""cli.md and the real typer commands stay in step: every command and option documented, nothing more."""

from __future__ import annotations

import os
import re
from typing import Any

import typer.main

from bnfold.cli import app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = open(os.path.join(ROOT, "cli.md"), encoding="utf-8").read()
ALWAYS = {"--help"}  # documented once, under "Global options"


def _sections() -> dict[str, str]:
    """``{"fold": text of "## bnfold fold", ..., "Global options": ...}``."""
    parts = re.split(r"^## +", DOC, flags=re.M)
    out = {}
    for part in parts[1:]:
        head, _, body = part.partition("\n")
        out[head.strip().removeprefix("bnfold ").strip()] = body
    return out


def _long_options(cmd: Any) -> set[str]:  # typer vendors its own click: duck-type the params
    names: set[str] = set()
    for p in cmd.params:
        if p.param_type_name == "option":
            names.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return names - ALWAYS


def _documented_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) - ALWAYS


def test_every_command_has_a_section() -> None:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    sections = _sections()
    for name in group.commands:
        assert name in sections, f"cli.md has no '## bnfold {name}' section"
    doc_cmds = {k for k in sections if k not in ("Files", "Exit codes", "JSON output", "Global options")}
    assert doc_cmds == set(group.commands), (
        f"cli.md documents commands that do not exist: {doc_cmds - set(group.commands)}"
    )


def test_options_match_per_command() -> None:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    sections = _sections()
    for name, cmd in group.commands.items():
        # The options table of the section (the prose may mention other commands' options).
        table = "\n".join(line for line in sections[name].splitlines() if line.startswith("|"))
        real, documented = _long_options(cmd), _documented_options(table)
        assert real <= documented, f"{name}: options missing from cli.md: {sorted(real - documented)}"
        assert documented <= real, (
            f"{name}: cli.md documents options that do not exist: {sorted(documented - real)}"
        )
        for p in cmd.params:
            if p.param_type_name == "argument":
                assert f"`{p.name.upper()}`" in table, f"{name}: argument {p.name.upper()} not in cli.md"


def test_global_options_match() -> None:
    group = typer.main.get_command(app)
    table = "\n".join(line for line in _sections()["Global options"].splitlines() if line.startswith("|"))
    assert _long_options(group) == _documented_options(table) - ALWAYS


def test_every_option_mentioned_anywhere_exists() -> None:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    real = _long_options(group) | ALWAYS
    for cmd in group.commands.values():
        real |= _long_options(cmd)
    unknown = _documented_options(DOC) - real
    assert not unknown, f"cli.md mentions options that no command has: {sorted(unknown)}"


def test_benchmarks_readme_lists_only_options_the_scripts_have() -> None:
    """benchmarks/README.md's run column names options each script really parses."""
    text = open(os.path.join(ROOT, "benchmarks", "README.md"), encoding="utf-8").read()
    rows = [line for line in text.splitlines() if line.startswith("| `") and ".py` |" in line]
    assert rows
    for row in rows:
        script = re.search(r"`(\w+\.py)`", row)
        assert script is not None
        src = open(os.path.join(ROOT, "benchmarks", script.group(1)), encoding="utf-8").read()
        if "make_parser(" in src:  # the shared options of benchmarks/common.py
            src += open(os.path.join(ROOT, "benchmarks", "common.py"), encoding="utf-8").read()
        run = row.rsplit("|", 2)[-2]
        for opt in set(re.findall(r"--[a-z][a-z0-9-]*", run)):
            assert f'"{opt}"' in src, f"{script.group(1)} has no {opt}"


def test_readme_does_not_promise_freeze_on_onnx_or_pt2() -> None:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "`freeze` works on PyTorch checkpoints only" in readme
    assert "download.pytorch.org/whl/cpu" in readme  # how to get the CPU build of torch elsewhere
