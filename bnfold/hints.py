"""Structured advice: the option that would help, worded for the surface that shows it.

A refusal or an error that some option would avoid carries that option as a :class:`Hint` beside its
reason, never as prose written for one surface. Each surface words it itself: the Python API as a
keyword (``pass eval_semantics=True``), the CLI as a flag (``pass --eval-semantics``), ``--json`` as
both with the option's name. So no layer rewrites another layer's text.

The hints are constants of this module, one per option, so that a test can check every one names an
option the Python API takes and a flag the CLI has (``tests/test_hints.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "Surface",
    "Hint",
    "advise",
    "EVAL_SEMANTICS",
    "EXAMPLE_INPUTS",
    "INPUT_SHAPES",
    "TRUST_PICKLE",
    "MODEL_FACTORY",
    "BATCH_STATS_INSTANCE",
    "IN_PLACE",
    "STATIC_BATCH",
    "ALL",
]

Surface = Literal["python", "cli"]
"""Who reads the advice: a Python caller or a command-line user."""


@dataclass(frozen=True, slots=True)
class Hint:
    """An option that would help, and how each surface says so.

    Attributes:
        option: the keyword of the Python API (a :class:`bnfold.options.FoldOptions` field or a
            load/settings keyword).
        flag: the CLI flag that sets it.
        python: the advice worded for a Python caller (a clause that follows the reason after "; ").
        cli: the same advice worded for a command-line user.
    """

    option: str
    flag: str
    python: str
    cli: str

    def text(self, surface: Surface = "python") -> str:
        """The advice worded for ``surface``."""
        return self.cli if surface == "cli" else self.python

    def to_dict(self) -> dict[str, Any]:
        return {"option": self.option, "flag": self.flag, "python": self.python, "cli": self.cli}

    def naming(self, name: str) -> Hint:
        """The same hint with the placeholder ``NAME`` (an input's name) filled in, in both wordings."""
        return replace(self, python=self.python.replace("NAME", name), cli=self.cli.replace("NAME", name))


def advise(reason: str, hints: Iterable[Hint], surface: Surface = "python") -> str:
    """``reason`` followed by each hint worded for ``surface`` (joined with "; ")."""
    return "; ".join(filter(None, [reason, *(h.text(surface) for h in hints)]))


EVAL_SEMANTICS = Hint(
    "eval_semantics",
    "--eval-semantics",
    "or pass eval_semantics=True to fold it as it runs in eval()",
    "or pass --eval-semantics to fold it as it runs in eval()",
)
EXAMPLE_INPUTS = Hint(
    "example_inputs",
    "--input-shape",
    "pass example_inputs=(x,) to bnfold.fold to record the shapes",
    "pass -s/--input-shape NAME=SHAPE (or --inputs DATA.npz) to record the shapes",
)
INPUT_SHAPES = Hint(
    "input_shapes",
    "--input-shape",
    "give the shapes the model takes with input_shapes={'NAME': DIMS} or real inputs with inputs=",
    "give the shapes the model takes with --input-shape/-s NAME=DIMS or real inputs with --inputs DATA.npz",
)
TRUST_PICKLE = Hint(
    "trust_pickle",
    "--trust-pickle",
    "if you trust the file, pass trust_pickle=True",
    "if you trust the file, pass --trust-pickle",
)
MODEL_FACTORY = Hint(
    "model_factory",
    "--model",
    "pass model_factory= (a callable that builds the architecture) to load the weights into it",
    "pass --model module.path:factory (a callable that builds the architecture) to load the weights into it",
)
BATCH_STATS_INSTANCE = Hint(
    "batch_stats",
    "--batch-stats",
    "batch_stats='instance' converts it to an InstanceNorm, exact at batch 1",
    "--batch-stats instance converts it to an InstanceNorm, exact at batch 1",
)
IN_PLACE = Hint(
    "in_place",
    "--in-place",
    "choose another output or set in_place=True to overwrite it",
    "choose another output or pass --in-place to overwrite it",
)
STATIC_BATCH = Hint(
    "dynamic_batch",
    "--static-batch",
    "the model fixes its batch size: pass dynamic_batch=False",
    "the model fixes its batch size: pass --static-batch",
)

ALL: tuple[Hint, ...] = (
    EVAL_SEMANTICS,
    EXAMPLE_INPUTS,
    INPUT_SHAPES,
    TRUST_PICKLE,
    MODEL_FACTORY,
    BATCH_STATS_INSTANCE,
    IN_PLACE,
    STATIC_BATCH,
)
"""Every hint (a test checks each names a real keyword and a real flag)."""
