"""The onnxruntime worker: a child process that holds the onnxruntime sessions of a verification.

Why a child process:
    * a crash inside onnxruntime (a segmentation fault on a valid model) ends the child, not bnfold:
      the parent sees the pipe close, names the signal and raises a typed error, and the clean-up of
      the caller (staged outputs, temporary folders) runs as usual;
    * a long ``InferenceSession.run`` holds the interpreter of the process that calls it: SIGINT,
      SIGTERM and SIGHUP would wait for it. The parent only waits on a pipe, so the signal is handled
      at once and the child is killed;
    * onnxruntime's own log (coloured lines, names from the model file) goes to the child's stderr,
      which the parent captures: nothing from the runtime reaches the user's terminal unescaped.

This file runs as a script (``python worker.py``), not as ``bnfold.verification.worker``: it imports
only numpy and onnxruntime (no bnfold, no torch), so the child starts in the time of those two imports.
The parent (:mod:`bnfold.verification.isolation`) speaks to it over stdin/stdout in frames::

    frame   = u64 length of the pickle, u32 count of buffers, the pickle, then per buffer: u64 length, bytes
    request = ("load", sid, source: str | bytes, level: int, severity: int)
            | ("run", sid, outputs: list[str], feeds: {name: (array, is_bfloat16)})
            | ("drop", sid) | ("reset",)
    reply   = ("ok", value) | ("error", exception type name, message)

Pickles carry only what bnfold's two processes make (numpy arrays, strings, numbers), protocol 5 with
the array bytes out of band (no copy into the pickle); the parent unpickles replies with an allowlist
of numpy's array constructors.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from typing import IO, Any

_HEAD = struct.Struct("<QI")
_LEN = struct.Struct("<Q")


def write_frame(f: IO[bytes], obj: Any) -> None:
    """One message: the pickle (protocol 5) and its out-of-band buffers (array bytes, not copied)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    f.write(_HEAD.pack(len(data), len(buffers)))
    f.write(data)
    for b in buffers:
        raw = b.raw()
        f.write(_LEN.pack(raw.nbytes))
        f.write(raw)
    f.flush()


def _read_exact(f: IO[bytes], n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise EOFError("the other process closed the pipe")
        got += k
    return buf


def read_frame(f: IO[bytes], unpickler: type[pickle.Unpickler] = pickle.Unpickler) -> Any:
    """One message written by :func:`write_frame`."""
    size, count = _HEAD.unpack(_read_exact(f, _HEAD.size))
    data = _read_exact(f, size)
    buffers = [_read_exact(f, _LEN.unpack(_read_exact(f, _LEN.size))[0]) for _ in range(count)]
    import io

    return unpickler(io.BytesIO(data), buffers=buffers).load()


def _watch_parent(parent: int) -> None:
    """End the worker when its parent is gone (a SIGKILLed bnfold leaves no worker running a model).

    A thread polls the parent's id: onnxruntime releases the interpreter while it runs, so this also
    ends a long run. (Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that started the child
    exits, and a worker outlives the thread of the verification that started it.)
    """
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="bnfold-parent-watch", daemon=True).start()


class _Worker:
    def __init__(self) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.sessions: dict[int, Any] = {}
        self.levels = {
            0: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            3: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }

    def load(self, request: list[Any]) -> Any:
        """``request``: ``["load", sid, source, level, severity]``, emptied here so that the buffer the
        model's bytes arrived in is freed once they are copied (one copy of the model less at load)."""
        _, sid, source, level, severity = request
        request.clear()
        ort = self.ort
        if not isinstance(source, str):
            source = bytes(source)  # the out-of-band buffer arrives as a bytearray (freed now)
        ort.set_default_logger_severity(severity)
        so = ort.SessionOptions()
        so.graph_optimization_level = self.levels[level]
        so.log_severity_level = severity
        sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        self.sessions[sid] = sess
        return (
            [
                (i.name, i.type, [d if isinstance(d, (int, str)) else None for d in i.shape])
                for i in sess.get_inputs()
            ],
            [o.name for o in sess.get_outputs()],
        )

    def run(self, sid: int, outputs: list[str], feeds: dict[str, tuple[Any, bool]]) -> list[Any]:
        import numpy as np

        ort = self.ort
        sess = self.sessions[sid]
        if not any(bf16 for _, bf16 in feeds.values()):
            return list(sess.run(outputs, {n: a for n, (a, _) in feeds.items()}))
        # onnxruntime takes bfloat16 only as an OrtValue built from the raw 16-bit pattern.
        vals = {
            n: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(a), 16
            )  # TensorProto.BFLOAT16
            if bf16
            else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
            for n, (a, bf16) in feeds.items()
        }
        return [v.numpy() for v in sess.run_with_ort_values(outputs, vals)]


def _give_back() -> None:
    """Hand the memory of a dropped session back to the system before the next model loads.

    onnxruntime frees a session's weights when it is dropped (the session is destroyed at once: only
    this dict held it); glibc keeps freed small blocks for reuse, ``malloc_trim`` returns them.
    """
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


def main() -> None:
    """Serve requests on stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    _watch_parent(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid())
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not break the frames
    worker = _Worker()
    write_frame(stdout, ("ok", os.getpid()))  # ready: onnxruntime imported
    while True:
        try:
            msg = read_frame(stdin)
        except EOFError:
            return
        try:
            if msg[0] == "load":
                request, msg = list(msg), None
                value = worker.load(request)
            elif msg[0] == "run":
                value = worker.run(*msg[1:])
            elif msg[0] == "drop":
                value = worker.sessions.pop(msg[1], None) is not None
                _give_back()
            elif msg[0] == "reset":
                worker.sessions.clear()
                _give_back()
                value = True
            else:
                raise ValueError(f"unknown request {msg[0]!r}")
            reply: tuple[Any, ...] = ("ok", value)
        except Exception as e:  # noqa: BLE001 - every runtime failure goes back to the parent, typed there
            reply = ("error", type(e).__name__, str(e))
        try:
            write_frame(stdout, reply)
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # this script's folder would shadow top-level modules with bnfold's own file names
    main()
