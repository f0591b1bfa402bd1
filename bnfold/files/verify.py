"""Verification for the file jobs, and the ``bnfold verify`` job (two files, same inputs, every output).

Rules:
    * :class:`Prepared` holds what verification runs on once the options were read: the parsed shapes,
      the ``--inputs`` arrays, the seed and the :class:`VerifySettings`; it is built once per job;
    * a PyTorch reference runs on example tensors, which carry the shapes and the data, so no
      name-keyed shapes or arrays go along (:meth:`Prepared.carried_by_examples`);
    * every error names the file(s) it is about (:func:`bnfold.errors.with_context`, once);
    * a mismatch is a report (``passed`` False), not an exception, here: the fold job decides the policy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bnfold.errors import BnfoldError, with_context
from bnfold.records import VerifyReport
from bnfold.verification.inputs import (
    load_inputs,
    onnx_input_specs,
    parse_shapes_for,
    resolve_shapes,
    torch_examples,
)

from .load import ProgressFn, load, noop
from .settings import CompareSettings, InputSettings, VerifySettings, check_inputs

__all__ = [
    "Prepared",
    "prepare",
    "run_verify",
    "verified_on",
    "io_signature",
    "check_onnx_shapes",
    "verify_files",
]


@dataclass(frozen=True, slots=True)
class Prepared:
    """What verification runs on and how it compares, once the options were read."""

    shapes: Mapping[str, tuple[int, ...]]
    arrays: Mapping[str, Any] | None
    seed: int
    check: VerifySettings = field(default_factory=VerifySettings)

    def carried_by_examples(self) -> Prepared:
        """The same settings once example tensors carry the shapes and the data (PyTorch reference)."""
        return replace(self, shapes={}, arrays=None)


def prepare(inputs: InputSettings, check: VerifySettings, where: str | os.PathLike[str]) -> Prepared:
    """Parse ``--input-shape`` (errors name ``where``) and read ``--inputs``."""
    return Prepared(
        parse_shapes_for(inputs.input_shapes, where), load_inputs(inputs.inputs), inputs.seed, check
    )


def run_verify(
    reference: Any,
    candidate: Any,
    prep: Prepared,
    *,
    example_inputs: tuple[Any, ...] | None,
    progress: ProgressFn,
    where: str = "",
) -> VerifyReport:
    """:func:`bnfold.verification.verify` with the job's settings; errors name ``where``."""
    from bnfold.verification import verify

    progress("verify", 0, 1)
    c = prep.check
    try:
        report: VerifyReport = verify(
            reference,
            candidate,
            inputs=dict(prep.arrays) if prep.arrays else None,
            input_shapes=dict(prep.shapes) if prep.shapes else None,
            samples=c.samples,
            seed=prep.seed,
            atol=c.atol,
            rtol=c.rtol,
            extra_level=c.opt_level,
            example_inputs=example_inputs,
            **c.compare_options(),
        )
    except BnfoldError as e:
        raise with_context(e, where) from e
    progress("verify", 1, 1)
    return report


def io_signature(model: Any) -> dict[str, list[dict[str, Any]]]:
    """An ONNX model's inputs and outputs: ``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}``.

    A shape entry is an int, a symbol (str) or None (unknown).
    """
    import onnx

    def one(vi: Any) -> dict[str, Any]:
        tt = vi.type.tensor_type
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else "?"
        except (KeyError, ValueError):
            dtype = "?"
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        return {"name": vi.name, "dtype": dtype, "shape": dims if tt.HasField("shape") else None}

    init = {t.name for t in model.graph.initializer}
    return {
        "inputs": [one(vi) for vi in model.graph.input if vi.name not in init],
        "outputs": [one(vi) for vi in model.graph.output],
    }


def verified_on(
    model: Any, prep: Prepared, examples: tuple[Any, ...] | None, names: Sequence[str] = ()
) -> dict[str, list[int]]:
    """The input shapes verification runs on (the same rules as :mod:`bnfold.verification`)."""
    if examples is not None:
        labels = list(names) + [f"input{i}" for i in range(len(names), len(examples))]
        return {n: list(getattr(t, "shape", ())) for n, t in zip(labels, examples)}
    if prep.arrays:
        return {k: list(v.shape) for k, v in prep.arrays.items()}
    try:
        return {k: list(v) for k, v in resolve_shapes(onnx_input_specs(model), prep.shapes).items()}
    except BnfoldError:
        return {}


def check_onnx_shapes(model: Any, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """Fail early (before folding) when ``--input-shape`` does not fit the model's inputs."""
    if not shapes:
        return
    try:
        resolve_shapes(onnx_input_specs(model), shapes)
    except BnfoldError as e:
        raise with_context(e, str(path)) from e


def check_recording_path(dst: str | os.PathLike[str], *reads: str | os.PathLike[str] | None) -> None:
    """Refuse ``--save-outputs`` where it would write over a file the job reads (either model, their
    external data, ``--inputs``, ``--load-outputs``), a directory, a FIFO or a device.

    Raises:
        OutputError: one line naming the path.
    """
    from bnfold import io as bio

    files = [f for r in reads if r is not None for f in bio.files_read_by(r)]
    bio.check_output_path(None, dst, input_files=files)


def verify_files(
    reference: str | os.PathLike[str] | None,
    candidate: str | os.PathLike[str] | None,
    settings: CompareSettings | None = None,
    progress: ProgressFn | None = None,
    *,
    rename: Mapping[str, str] | None = None,
) -> VerifyReport:
    """Run the models in two files on the same inputs and compare every output.

    With ``settings.verification.load_outputs`` the reference is the saved outputs: ``reference`` is
    None and ``candidate`` may be None too (re-check the saved comparison).

    ``rename``: ``{reference name: candidate name}`` for inputs and outputs named differently in the
    candidate (an ONNX model; see :func:`rename_io`).

    Returns:
        The :class:`VerifyReport` (``passed`` False on a mismatch: this function does not raise for it).

    Raises:
        NotComparableError: the two models cannot be compared (exit code 2).
        ModelFormatError, OptionError: a file or an option cannot be used (exit code 2).
    """
    s = settings or CompareSettings()
    prog = progress or noop
    check_inputs(s.inputs, s.verification.samples)
    ref_p = None if reference is None else Path(reference)
    cand_p = None if candidate is None else Path(candidate)
    if s.verification.save_outputs is not None:  # before anything is loaded or run
        check_recording_path(
            s.verification.save_outputs, ref_p, cand_p, s.inputs.inputs, s.verification.load_outputs
        )
    first = ref_p or cand_p or Path(os.fspath(s.verification.load_outputs or ""))
    prep = prepare(s.inputs, s.verification, first)
    ref = cand = None
    if ref_p is not None:
        ref = load(ref_p, s.load, prog)
    if cand_p is not None:
        cand = load(cand_p, s.load, prog)
        rename_io(cand.model, rename or {}, str(cand_p))
    elif rename:
        from bnfold.errors import OptionError

        raise OptionError("--map: needs a candidate model")
    examples = None
    if (
        ref is not None and ref.format != "onnx"
    ):  # example inputs carry shapes and data for a PyTorch reference
        examples = torch_examples(
            ref.model, prep.shapes, prep.arrays, prep.seed, ref_p or first, ref.example_inputs
        )
        prep = prep.carried_by_examples()
    where = " vs ".join(str(p) for p in (ref_p, cand_p) if p is not None)
    return run_verify(
        None if ref is None else ref.model,
        None if cand is None else cand.model,
        prep,
        example_inputs=examples,
        progress=prog,
        where=where,
    )


def rename_io(model: Any, mapping: Mapping[str, str], where: str) -> None:
    """Rename the ONNX model's inputs/outputs ``mapping[ref] = cand`` -> ``ref``, in place.

    ``verify --map REF=CAND``: the candidate's input or output ``CAND`` plays the reference's ``REF``.
    Every use of the name is renamed (nodes, subgraphs, value_info), so the model computes the same.

    Raises:
        OptionError: the candidate is not an ONNX model, has no input or output ``CAND``, or already
            uses ``REF`` for another tensor.
    """
    import onnx

    from bnfold.errors import OptionError
    from bnfold.onnx.graph import all_graphs

    if not mapping:
        return
    if not isinstance(model, onnx.ModelProto):
        raise OptionError(
            "--map: applies to an ONNX candidate (a PyTorch candidate is exported with the reference's names)"
        )
    g = model.graph
    io_names = {v.name for v in (*g.input, *g.output)}
    used = {t.name for t in g.initializer} | {
        o for gr in all_graphs(g) for n in gr.node for o in (*n.input, *n.output)
    }
    used |= io_names
    for ref, cand in mapping.items():
        if cand not in io_names:
            raise OptionError(
                f"--map {ref}={cand}: {where} has no input or output named {cand!r} "
                f"(its inputs and outputs: {', '.join(sorted(io_names))})"
            )
        if ref != cand and ref in used and ref not in mapping.values():
            raise OptionError(f"--map {ref}={cand}: {where} already has a tensor named {ref!r}")
    back = {cand: ref for ref, cand in mapping.items()}

    def fix(names: Any) -> None:
        for i, n in enumerate(names):
            if n in back:
                names[i] = back[n]

    for gr in all_graphs(g):
        for n in gr.node:
            fix(n.input)
            fix(n.output)
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.name in back:
            vi.name = back[vi.name]
