"""The runtimes verification runs a model in: onnxruntime, the ONNX reference evaluator, eager PyTorch.

Rules:
    * onnxruntime runs on the CPU with the graph optimisation level asked for (default
      ``ORT_DISABLE_ALL``: from its basic level up it fuses Conv+BN itself, which would hide a wrong
      fold); it gets bytes or a path, so a model file with external data is read by onnxruntime
      itself, never parsed or serialised here. It runs in the verification's worker process
      (:mod:`.isolation`): a crash there is a :class:`~bnfold.errors.NotComparableError`, or a run
      in the reference evaluator for a side that may fall back (see :class:`OrtRunner`);
    * a model onnxruntime cannot load runs in ``onnx.reference.ReferenceEvaluator`` (numpy, no graph
      optimisation), with bnfold's inference BatchNormalization for every opset (:func:`_inference_ops`); a
      candidate that only the fallback runs while onnxruntime runs the reference is refused
      (:func:`same_runtime_or_better`);
    * a PyTorch reference runs eagerly, in eval mode (every submodule's flag restored afterwards),
      under ``torch.no_grad()``; its outputs are flattened in order and named after the ONNX side;
    * every failure of a runtime is a :class:`~bnfold.errors.NotComparableError` naming the side, the
      runtime and the sample, on one line.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from bnfold.dtypes import from_numpy, to_numpy
from bnfold.errors import NotComparableError, OptionError
from bnfold.records import RuntimeUse

from .inputs import InputSpec, np_dtype
from .isolation import OrtWorker, RuntimeFailed, WorkerCrashed, printable

__all__ = [
    "OPTIMIZATION_LEVELS",
    "REFERENCE_EVALUATOR",
    "check_level",
    "OrtRunner",
    "Runner",
    "TorchRunner",
    "eval_mode",
    "first_line",
    "flatten",
    "onnx_runner",
    "run_torch_once",
    "same_runtime_or_better",
]

log = logging.getLogger(__name__)


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
"""Names accepted for ``optimization_level`` / ``extra_level`` (onnxruntime graph optimisation)."""


def check_level(level: str) -> str:
    """``level`` when it is one of :data:`OPTIMIZATION_LEVELS`, else an :class:`~bnfold.errors.OptionError`.

    The one check of an onnxruntime level: :func:`bnfold.verification.verify` calls it before any
    model runs, and so may a caller that validates its options up front.
    """
    if level not in OPTIMIZATION_LEVELS:
        raise OptionError(
            f"unknown optimization level {level!r} (choose from {', '.join(OPTIMIZATION_LEVELS)})"
        )
    return level


def first_line(e: BaseException) -> str:
    """The error's message on one line (onnxruntime spreads some over several), at most 300 characters.

    Control characters are escaped (:func:`~.isolation.printable`): the message can quote names from
    the model file, and nothing from a file reaches a terminal raw.
    """
    if isinstance(e, WorkerCrashed):
        return e.words()
    return printable(str(e), 300) or type(e).__name__


class _OnnxRunner(abc.ABC):
    """What both ONNX runners share: feeds checked against the model's inputs, one error wording.

    A subclass sets ``label``, ``level``, ``runtime``, ``inputs``, ``outputs`` and ``engine`` (the
    runtime named in a failure) and implements ``_outputs``.
    """

    label: str
    level: str
    runtime: RuntimeUse
    inputs: list[InputSpec]
    outputs: list[str]
    engine: str

    def run(self, feeds: Mapping[str, np.ndarray], sample: int) -> dict[str, np.ndarray]:
        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise NotComparableError(
                f"{self.label}: has input {missing[0]!r} that the other model does not have"
            )
        try:
            outs = self._outputs(feeds, names)
        except Exception as e:
            raise NotComparableError(
                f"{self.label}: {self.engine} failed on sample {sample} ({first_line(e)})"
            ) from e
        return {n: np.asarray(o) for n, o in zip(self.outputs, outs)}

    @abc.abstractmethod
    def _outputs(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[Any]:
        """The outputs of one run, in ``self.outputs`` order."""


class OrtRunner(_OnnxRunner):
    """One onnxruntime session, created once in the verification's worker process and run on every sample.

    The session lives in the child process of :mod:`.isolation`: a crash of onnxruntime ends the
    child, not bnfold. A side that crashes while running falls back to the ONNX reference evaluator
    when ``may_fall_back`` (the driver clears it for a candidate whose reference onnxruntime runs:
    see :func:`same_runtime_or_better`); otherwise the crash is a :class:`NotComparableError`.
    """

    engine = "onnxruntime"

    def __init__(self, source: str | bytes, level: str, label: str, worker: OrtWorker) -> None:
        self.label = label
        self.level = level
        self.source = source
        self.worker = worker
        self.may_fall_back = True
        self.fallback: _RefRunner | None = None
        self.runtime = RuntimeUse(label.split(" ")[0], "onnxruntime")
        self.sid, (inputs, outputs) = worker.load(source, OPTIMIZATION_LEVELS.index(check_level(level)))
        self.inputs = [InputSpec(n, np_dtype(t), tuple(d)) for n, t, d in inputs]
        self.outputs = list(outputs)

    def run(self, feeds: Mapping[str, np.ndarray], sample: int) -> dict[str, np.ndarray]:
        if self.fallback is not None:
            return self.fallback.run(feeds, sample)
        try:
            return super().run(feeds, sample)
        except NotComparableError as e:
            crash = e.__cause__
            if not isinstance(crash, WorkerCrashed):
                raise
            why = crash.words(f"on sample {sample}")
            if not self.may_fall_back:
                raise NotComparableError(f"{self.label}: {why}") from crash
            log.debug("%s: %s; falling back to the ONNX reference evaluator", self.label, why)
            self.fallback = _RefRunner(self.source, self.label, why)
            self.runtime = self.fallback.runtime
            return self.fallback.run(feeds, sample)

    def _outputs(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[Any]:
        return self.worker.run(self.sid, self.outputs, {n: feeds[n] for n in names})


REFERENCE_EVALUATOR = "onnx.reference"
"""Name of the fallback runtime in reports: ``onnx.reference.ReferenceEvaluator`` (numpy, any dtype)."""


class _RefRunner(_OnnxRunner):
    """The ONNX reference evaluator, for models onnxruntime cannot run (float64 Conv, opsets 1-6, ...).

    It implements every standard op of every opset in numpy (float64 included) without graph
    optimisation, so it checks the same arithmetic; it is slower, which only matters for large models.
    """

    engine = "the ONNX reference evaluator"

    def __init__(self, source: Any, label: str, why: str) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.label = label
        self.level = "disable"
        self.runtime = RuntimeUse(label.split(" ")[0], REFERENCE_EVALUATOR, why)
        if isinstance(source, (bytes, bytearray)):
            proto = onnx.load_model_from_string(bytes(source))
        elif isinstance(source, str):
            proto = onnx.load(source)  # a path: external data resolved next to the file
        else:
            proto = source
        self.session = ReferenceEvaluator(proto, new_ops=_inference_ops(proto))
        init = {t.name for t in proto.graph.initializer}
        self.inputs = []
        for vi in proto.graph.input:
            if vi.name in init:
                continue
            tt = vi.type.tensor_type
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            )
            self.inputs.append(
                InputSpec(
                    vi.name,
                    np_dtype(_ONNX_TYPE_NAMES.get(tt.elem_type, f"tensor(type {tt.elem_type})")),
                    dims,
                )
            )
        self.outputs = [o.name for o in proto.graph.output]

    def _outputs(self, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[Any]:
        return list(self.session.run(self.outputs, {n: feeds[n] for n in names}))


def same_runtime_or_better(ref: Any, cand: Any) -> None:
    """A candidate must load wherever its reference does: one that only the fallback runs is refused.

    Otherwise a rewrite that breaks the model for onnxruntime (where it is deployed) would pass,
    checked by the more permissive reference evaluator.
    """
    if ref.runtime.runtime == "onnxruntime" and cand.runtime.runtime != "onnxruntime":
        raise NotComparableError(
            f"candidate: onnxruntime cannot load it although it loads the reference ({cand.runtime.reason})"
        )


_EPSILON_DEFAULT = float(np.float32(1e-5))
"""BatchNormalization's ``epsilon`` default: a float attribute is a float32 (what onnxruntime uses)."""


def _inference_ops(proto: Any) -> list[Any]:
    """BatchNormalization for every opset, inference only: the evaluator's own is missing or wrong.

    The evaluator has no BatchNormalization-1 (opsets 1-5), ignores ``spatial``, runs
    BatchNormalization-6's training branch from opset 7 on (no ``is_test`` attribute), and in
    BatchNormalization-9 (opsets 9-13) normalises with *batch* statistics mixed in by ``momentum``
    whenever ``momentum`` has a value, and the schema's default (0.9) gives it one on every such node,
    although ``momentum`` only describes the training update. This one
    computes the inference formula in float64 with one cast, statistics per channel (``spatial=1``, the
    default) or per element of ``C x D1 x ...`` (``spatial=0``, opsets up to 8), and refuses training
    mode: ``is_test=0`` up to opset 6; more than one output (empty names are absent outputs) for opsets
    7-13; ``training_mode=1`` from opset 14 (``consumed_inputs`` of opsets 1-5 only described in-place
    updates of the running statistics in training).
    """
    opset = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):  # the class name is the op type the evaluator looks up
        op_domain = ""

        def _run(  # type: ignore[no-untyped-def]
            self,
            x,
            scale,
            bias,
            mean,
            var,
            epsilon=None,
            is_test=None,
            momentum=None,
            spatial=None,
            consumed_inputs=None,
            training_mode=None,
        ):
            outputs = [o for o in self.onnx_node.output if o]
            if opset < 7:
                training = not is_test
            elif opset < 14:
                training = len(outputs) > 1
            else:
                training = bool(training_mode)
            if training:
                raise NotComparableError(
                    f"BatchNormalization (opset {opset}) in training mode: not an inference model"
                )
            eps = _EPSILON_DEFAULT if epsilon is None else epsilon
            if spatial == 0 and opset < 9:  # statistics per element of C x D1 x ...
                shape = (1, *x.shape[1:])
            else:
                shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
            r = [np.asarray(a, np.float64).reshape(shape) for a in (scale, bias, mean, var)]
            y = (x.astype(np.float64) - r[2]) / np.sqrt(r[3] + eps) * r[0] + r[1]  # float64, one cast
            return (y.astype(x.dtype),)

    return [BatchNormalization]


_ONNX_TYPE_NAMES = {
    1: "tensor(float)",
    2: "tensor(uint8)",
    3: "tensor(int8)",
    4: "tensor(uint16)",
    5: "tensor(int16)",
    6: "tensor(int32)",
    7: "tensor(int64)",
    9: "tensor(bool)",
    10: "tensor(float16)",
    11: "tensor(double)",
    12: "tensor(uint32)",
    13: "tensor(uint64)",
    16: "tensor(bfloat16)",
}


Runner = Any  # OrtRunner | _RefRunner: both have label, level, runtime, inputs, outputs, run()


def onnx_runner(source: Any, level: str, label: str, worker: OrtWorker) -> Runner:
    """onnxruntime when it loads the model, else the ONNX reference evaluator (and the reason why).

    onnxruntime runs in ``worker`` (:func:`~.isolation.worker_scope`); a crash while loading counts as
    a model it cannot load.
    """
    try:
        return OrtRunner(source, level, label, worker)
    except (RuntimeFailed, WorkerCrashed) as e:
        why = f"onnxruntime cannot load it: {first_line(e)}"
        log.debug("%s: %s; falling back to the ONNX reference evaluator", label, why)
        try:
            return _RefRunner(source, label, why)
        except Exception as e2:
            if isinstance(source, str):  # a path: a file that is not a model is named as such
                from bnfold import io as bio

                bio.detect_format(source)
            raise NotComparableError(
                f"{label}: onnxruntime cannot load the model ({first_line(e)}); the ONNX reference "
                f"evaluator cannot run it either ({first_line(e2)})"
            ) from e


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """Eval mode for the duration of the run; every submodule's flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


def flatten(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten(v)]
    return []


class TorchRunner:
    """A PyTorch reference run eagerly; outputs flattened and named after the ONNX side's outputs."""

    def __init__(self, model: Any, label: str) -> None:
        import torch

        self.label = label
        self.runtime = RuntimeUse(label.split(" ")[0], "torch")
        # an unlifted ExportedProgram refuses .eval(): it runs with the mode it was exported in
        self.exported = isinstance(model, torch.export.ExportedProgram)
        self.model = model.module() if self.exported else model
        self.outputs: list[str] | None = None
        self.inputs: list[InputSpec] | None = None

    def call(self, feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> Any:
        """The model's raw output on ``feeds`` (inputs in ``specs`` order), eval mode, no grad."""
        import torch

        args = tuple(from_numpy(feeds[s.name]) for s in specs)
        with torch.no_grad(), contextlib.nullcontext() if self.exported else eval_mode(self.model):
            return self.model(*args)

    def run(self, feeds: Mapping[str, np.ndarray], sample: int) -> dict[str, np.ndarray]:
        assert self.inputs is not None and self.outputs is not None
        try:
            out = self.call(feeds, self.inputs)
        except Exception as e:
            raise NotComparableError(
                f"{self.label}: the PyTorch model failed on sample {sample} ({first_line(e)})"
            ) from e
        flat = flatten(out)
        if len(flat) != len(self.outputs):
            raise NotComparableError(
                f"{self.label} returns {len(flat)} tensors, the other model has {len(self.outputs)} outputs "
                f"({', '.join(self.outputs)})"
            )
        return {n: to_numpy(t) for n, t in zip(self.outputs, flat)}


def run_torch_once(model: Any, feeds: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> Any:
    """A PyTorch candidate run once (to count its outputs before it is exported)."""
    return TorchRunner(model, "candidate").call(feeds, specs)
