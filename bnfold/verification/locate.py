"""First diverging layer: compare the intermediate tensors two ONNX models both compute.

Rules:
    * a tensor is compared when a node of each model's main graph produces a value of that name
      (graph inputs and initializers are not compared). A fold keeps the BN's output name on the layer
      that absorbed it (``Conv -> BN -> y`` becomes ``Conv -> y``), so the folded layer's output in the
      candidate is matched with the BN output in the reference: ``matched_as`` names that fold
      ("fold: BatchNormalization 'bn' -> Conv 'conv'"); the reference's pre-BN tensor has no
      counterpart and is counted in ``only_in_reference``;
    * both models get every compared tensor as an extra graph output (on a fresh copy read from the
      source, never on the caller's model) and run once on the first sample, in onnxruntime with
      optimisations off, or the ONNX reference evaluator where onnxruntime cannot run them;
    * each tensor is compared like a graph output (:func:`bnfold.verification.compare.compare_output`: its error
      relative to its own scale, the dtype's default tolerance unless a tolerance is given for that
      name or for ``"*"``); tensors whose shape or dtype differ are left out;
    * tensors are listed in the reference's node order (ONNX graphs are topologically sorted), and
      ``first_divergence`` is the first one that fails: the earliest point where the candidate's
      computation leaves the reference's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from bnfold.errors import NotComparableError
from bnfold.records import LocateReport, TensorCheck

from .compare import Comparator, compare_output

__all__ = ["locate_divergence"]


def _load(source: Any) -> Any:
    import onnx

    if isinstance(source, (bytes, bytearray)):
        return onnx.load_model_from_string(bytes(source))
    return onnx.load(source)  # a path: external data is loaded from the file's folder


def _producers(model: Any) -> dict[str, Any]:
    init = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    out: dict[str, Any] = {}
    for n in model.graph.node:
        for o in n.output:
            if o and o not in init:
                out[o] = n
    return out


def _label(node: Any) -> str:
    if not node.name:
        return str(node.op_type)
    # Shown escaped, whoever prints it: a byte that is not UTF-8 as \xNN, a control character as
    # \xNN / \uNNNN (the repr a str name had before; a name that is not UTF-8 arrives as bytes).
    raw = node.name if isinstance(node.name, bytes) else node.name.encode("utf-8", "surrogatepass")
    shown = "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in raw.decode("utf-8", "backslashreplace")
    )
    return f"{node.op_type} '{shown}'"


def _expose(model: Any, names: list[str]) -> None:
    """Make ``names`` graph outputs of ``model`` (typed where shape inference knows the type)."""
    import onnx

    known = {o.name for o in model.graph.output}
    types: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # shape inference is a help only: untyped outputs run too
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type for v in inferred.graph.value_info}
    for n in names:
        if n in known:
            continue
        vi = model.graph.output.add()
        vi.name = n
        if n in types:
            vi.type.CopyFrom(types[n])


def locate_divergence(
    reference: Any, candidate: Any, feeds: Mapping[str, np.ndarray], comparator: Comparator
) -> LocateReport:
    """Compare every intermediate tensor both ONNX models compute (see the module docstring).

    Args:
        reference, candidate: serialized ONNX bytes or paths (as :func:`bnfold.verification.verify`
            prepares them).
        feeds: one sample of inputs.
        comparator: the comparison settings.

    Returns:
        A :class:`~bnfold.records.LocateReport`.

    Raises:
        NotComparableError: a model that no runtime can run with its intermediate outputs.
    """
    from .isolation import worker_scope
    from .runners import onnx_runner
    from .sources import onnx_source

    ref, cand = _load(reference), _load(candidate)
    ref_prod, cand_prod = _producers(ref), _producers(cand)
    common = [n for n in ref_prod if n in cand_prod]
    _expose(ref, common)
    _expose(cand, common)
    with contextlib.ExitStack() as stack:
        try:
            worker = stack.enter_context(worker_scope())
            r_run = onnx_runner(onnx_source(ref, "reference", stack), "disable", "reference (locate)", worker)
            c_run = onnx_runner(
                onnx_source(cand, "candidate", stack), "disable", "candidate (locate)", worker
            )
            r_out = r_run.run(feeds, 0)
            c_out = c_run.run(feeds, 0)
        except NotComparableError as e:
            raise NotComparableError(f"locate: {e}") from e
    checks: list[TensorCheck] = []
    first: str | None = None
    for name in common:
        r, c = r_out.get(name), c_out.get(name)
        if r is None or c is None or r.shape != c.shape or (r.dtype.kind == "f") != (c.dtype.kind == "f"):
            continue
        chk = compare_output(name, 0, r, c, comparator)
        rn, cn = ref_prod[name], cand_prod[name]
        how = "name" if rn.op_type == cn.op_type else f"fold: {_label(rn)} -> {_label(cn)}"
        checks.append(TensorCheck(name, _label(rn), how, chk.max_abs_error, chk.max_rel_error, chk.passed))
        if first is None and not chk.passed:
            first = name
    return LocateReport(
        tensors=tuple(checks),
        first_divergence=first,
        compared=len(checks),
        only_in_reference=len(ref_prod) - len(common),
    )
