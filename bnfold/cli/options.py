"""The CLI's options, declared once: each command lists the ones it takes (the same flag means the same
on every command). Only :mod:`bnfold.cli.commands` imports this module.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from bnfold import __version__

__all__ = ["OptLevel"]


class OptLevel(str, Enum):
    """onnxruntime graph optimisation levels for the second verification run."""

    disable = "disable"
    basic = "basic"
    extended = "extended"
    all = "all"


# ------------------------------------------------------------------------------------------ options
# Declared once; each command lists the ones it takes. Another engineer's option is one more alias.
def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnfold {__version__}")
        raise typer.Exit(0)


ModelPath = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL", help="Model file: .onnx, .pt2, or a PyTorch checkpoint.", show_default=False
    ),
]
CheckpointPath = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        show_default=False,
        help="A PyTorch checkpoint (.pt, .pth, .ckpt, .bin): a state_dict with --model, or a pickled "
        "module with --trust-pickle.",
    ),
]
OutArg = Annotated[
    Path | None, typer.Argument(metavar="OUT", help="Output file (or -o OUT).", show_default=False)
]
ModelFactory = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        metavar="MODULE:FACTORY",
        help="Builds the architecture of a state_dict checkpoint, e.g. models.lenet:lenet5.",
    ),
]
TrustPickle = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow loading a pickled module (runs code from the file).")
]
EvalSemantics = Annotated[
    bool,
    typer.Option(
        "--eval-semantics",
        help="Fold a module saved in train() mode with its inference (running-stats) semantics.",
    ),
]
InputShape = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        "-s",
        metavar="NAME=1x3x224x224",
        help="Shape of an input to verify on (repeatable); fixes symbolic dimensions.",
    ),
]
InputsNpz = Annotated[
    Path | None, typer.Option("--inputs", metavar="DATA.npz", help="Real inputs: one array per input name.")
]
Samples = Annotated[int, typer.Option("--samples", "-n", help="Random input samples to compare on.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the random inputs (>= 0).")]
Atol = Annotated[
    list[str] | None,
    typer.Option(
        "--atol",
        metavar="[OUTPUT=]VALUE",
        show_default=False,
        help="Absolute tolerance [default: per dtype]; OUTPUT=VALUE for one output (repeatable).",
    ),
]
Rtol = Annotated[
    list[str] | None,
    typer.Option(
        "--rtol",
        metavar="[OUTPUT=]VALUE",
        show_default=False,
        help="Tolerance relative to each output's scale [default: per "
        "dtype]; OUTPUT=VALUE for one output (repeatable).",
    ),
]
Opt = Annotated[
    OptLevel | None,
    typer.Option(
        "--opt-level", help="Also compare at this onnxruntime optimisation level.", show_default=False
    ),
]
# A flag that more than one command takes, with the same meaning: its declaration once; where a command
# words it for what it does there (inspect shows what fold *would* do), one alias per wording.
_AFFINE = "--affine"
_MERGE_BRANCHES = "--merge-branches/--no-merge-branches"
_PROPAGATE = "--propagate/--no-propagate"
_HEALTH = "--health"

Affine = Annotated[bool, typer.Option(_AFFINE, help="Turn BNs left over into one Mul + one Add (ONNX).")]
AffinePreview = Annotated[bool, typer.Option(_AFFINE, help="The verdicts fold --affine would give.")]
AffineBench = Annotated[bool, typer.Option(_AFFINE, help="Fold with --affine (ONNX).")]
MergeBranches = Annotated[
    bool,
    typer.Option(
        _MERGE_BRANCHES,
        help="Merge sums of branches that read one tensor (RepVGG, MobileOne, DBB) into one conv (ONNX, PyTorch).",
    ),
]
MergeBranchesPreview = Annotated[
    bool, typer.Option(_MERGE_BRANCHES, help="The merges fold would do (on by default).")
]
Propagate = Annotated[
    bool,
    typer.Option(
        _PROPAGATE,
        help="ONNX: move the scale and shift of BNs left through ReLU, pooling and zero padding into the next layer.",
    ),
]
PropagatePreview = Annotated[
    bool, typer.Option(_PROPAGATE, help="The scale propagation fold would do (ONNX; on by default).")
]
Health = Annotated[bool, typer.Option(_HEALTH, help="Also audit the BatchNorms (see inspect --health).")]
HealthAudit = Annotated[
    bool,
    typer.Option(
        _HEALTH, help="Audit the BatchNorms: dead channels, var ~ 0, float16/bfloat16 range, subnormals."
    ),
]
BatchStats = Annotated[
    str | None,
    typer.Option(
        "--batch-stats",
        metavar="instance",
        show_default=False,
        help="BNs that normalise with their batch (ONNX training_mode=1, track_running_stats=False): 'instance' "
        "turns them into InstanceNorms, equal at batch 1 only (at batch > 1 the model changes).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (nothing else).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
_VERBOSE = ("--verbose", "-v")
Verbose = Annotated[bool, typer.Option(*_VERBOSE, help="List every BatchNorm, not only those left.")]
VerboseFrozen = Annotated[bool, typer.Option(*_VERBOSE, help="List every frozen layer.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the traceback on errors (also BNFOLD_DEBUG=1).")]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="OUT",
        show_default=False,
        help="Output file; its extension picks the format.",
    ),
]
InPlace = Annotated[bool, typer.Option("--in-place", help="Allow OUT to be MODEL (overwrite the input).")]
Version = Annotated[
    bool | None,
    typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
]
Opset = Annotated[
    int | None,
    typer.Option("--opset", help="ONNX opset of a PyTorch model exported to .onnx.", show_default=False),
]
StaticBatch = Annotated[
    bool, typer.Option("--static-batch", help="Export with the verification batch size fixed, not dynamic.")
]
InputNames = Annotated[
    list[str] | None,
    typer.Option("--input-names", metavar="A,B", help="ONNX input names of an export [default: forward's]."),
]
OutputNames = Annotated[
    list[str] | None,
    typer.Option("--output-names", metavar="A,B", help="ONNX output names of an export [default: output]."),
]
ExternalData = Annotated[
    bool | None,
    typer.Option(
        "--external-data/--no-external-data",
        show_default=False,
        help="Write ONNX weights to OUT.<hash>.data / inline [default: as the input].",
    ),
]
FlushDenormals = Annotated[
    bool,
    typer.Option(
        "--flush-denormals/--keep-denormals",
        help="Set subnormal values of the folded weights to zero (they slow CPUs down many times).",
    ),
]
AllOrNothing = Annotated[
    bool,
    typer.Option(
        "--all-or-nothing",
        help="When verification fails, refuse the whole model instead of leaving only the "
        "BNs whose fold fails it.",
    ),
]
RequantizeBias = Annotated[
    bool,
    typer.Option(
        "--requantize-bias",
        help="QDQ graphs: fold the BN shift into an int32 bias by requantisation (round to nearest, "
        "at most half a step off) instead of keeping it as one exact Add.",
    ),
]
FailIfLeft = Annotated[bool, typer.Option("--fail-if-left", help="Exit 1 when any BatchNorm would be left.")]
