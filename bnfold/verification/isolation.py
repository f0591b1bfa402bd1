"""onnxruntime in a child process: the parent's side of :mod:`.worker`.

Rules:
    * one worker per verification (:func:`worker_scope`), started when the verification starts (its
      imports overlap the parent's preparation) and holding every onnxruntime session of it
      (reference, candidate, the ``extra_level`` re-run), one at a time: the driver drops a session
      (:meth:`OrtWorker.drop`) before it loads the next one; a healthy worker is kept idle afterwards and
      reused by the next verification in this process (its sessions dropped), so that a culprit
      search pays the start once; one that held models over :data:`_KEEP_IDLE_BELOW` is ended instead;
    * a model goes to the child as the path it came as (the child's onnxruntime reads the file and
      its external data) or as bytes; feeds and outputs as numpy arrays (out-of-band pickle buffers);
    * the parent waits on a pipe: a signal (Ctrl-C, SIGTERM, SIGHUP) raises in the parent at once,
      the child is killed (:meth:`OrtWorker.request`), and the caller's clean-up runs as usual;
    * the child's stderr (onnxruntime's own log) goes to an unnamed temporary file, never to the
      user's terminal; when the child dies, its signal and the last line of that log, escaped, make
      the one-line error (:class:`WorkerCrashed`), and a later request starts a fresh child that
      loads its sessions again.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np

from bnfold.errors import NotComparableError

from . import worker as _proto

__all__ = ["OrtWorker", "WorkerCrashed", "RuntimeFailed", "printable", "worker_scope"]

log = logging.getLogger(__name__)

_SCRIPT = os.path.abspath(_proto.__file__)


def printable(text: str, limit: int = 300) -> str:
    """``text`` on one line, every control character escaped, at most ``limit`` characters.

    Text from a model file (names in onnxruntime's messages) can hold escape sequences that set the
    terminal title or clear the screen: they are written as ``\\x1b`` and the like, never passed on.
    """
    out = []
    for ch in " ".join(str(text).split()):
        if ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    s = "".join(out)
    return (s[: limit - 3] + "...") if len(s) > limit else s


class WorkerCrashed(NotComparableError):
    """The onnxruntime worker died (a crash inside onnxruntime).

    Attributes:
        how: "crashed (SIGSEGV)", "exited with status 1", ...
        last: the last line of onnxruntime's log, escaped ("" when it wrote none).
    """

    def __init__(self, how: str, last: str = "") -> None:
        super().__init__(how + (f" (its last log line: {last})" if last else ""))
        self.how = how
        self.last = last

    def words(self, when: str = "") -> str:
        """``onnxruntime <how>[ <when>][ (its last log line: ...)]`` on one line."""
        return f"onnxruntime {self.how}{' ' + when if when else ''}" + (
            f" (its last log line: {self.last})" if self.last else ""
        )


class RuntimeFailed(Exception):
    """onnxruntime raised in the worker; the message is the runtime's, escaped, on one line."""


class _Unpickler(pickle.Unpickler):
    """Replies hold numpy arrays, strings and numbers only: any other global is refused."""

    _ALLOWED = {"_frombuffer", "_reconstruct", "dtype", "ndarray", "scalar"}

    def find_class(self, module: str, name: str) -> Any:
        if (module == "numpy" or module.startswith("numpy.")) and name in self._ALLOWED:
            return super().find_class(module, name)
        if module == "numpy.dtypes" or (module == "builtins" and name in ("complex", "slice")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a worker reply")


def _severity() -> int:
    """onnxruntime's log level in the child: errors only (they land in the captured log anyway)."""
    return 0 if os.environ.get("BNFOLD_DEBUG") else 3


class OrtWorker:
    """One child process running onnxruntime sessions; sessions are numbered by the parent."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ready = False
        self._next = 0
        self._specs: dict[int, tuple[str | bytes, int]] = {}  # sid -> what to load again after a restart
        self._loaded: set[int] = set()
        self.busy = False
        self.starts = 0
        self._logged = 0
        self.held = 0  # bytes of the models loaded since the last reset (a big one is not kept idle)

    # -- process -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the child (non-blocking: its imports run while the parent goes on)."""
        if self._proc is not None:
            return
        self._log = tempfile.TemporaryFile(prefix="bnfold-ort-log-")
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, _SCRIPT, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                close_fds=True,
            )
        except OSError as e:  # no interpreter to start (an embedded Python), too many processes
            self._log.close()
            self._log = None
            raise NotComparableError(
                f"cannot start the onnxruntime worker process ({printable(str(e))})"
            ) from e
        self._logged = 0
        self._ready = False
        self._loaded.clear()
        self.starts += 1

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _debug_log(self) -> None:
        """Pass what onnxruntime logged since the last call to this module's logger (``--debug``)."""
        if self._log is None or not log.isEnabledFor(logging.DEBUG):
            return
        text = self.log_text()
        if len(text) > self._logged:
            log.debug("onnxruntime's log:\n%s", text[self._logged :].rstrip())
            self._logged = len(text)

    def kill(self) -> None:
        """End the child now (SIGKILL) and close its pipes and log; a later request starts a new one."""
        self._debug_log()
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            for f in (proc.stdin, proc.stdout):
                with contextlib.suppress(Exception):
                    if f is not None:
                        f.close()
        if self._log is not None:
            with contextlib.suppress(Exception):
                self._log.close()
            self._log = None
        self._loaded.clear()
        self._ready = False

    def _died(self) -> WorkerCrashed:
        proc = self._proc
        assert proc is not None
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code < 0:
            try:
                how = f"crashed ({signal.Signals(-code).name})"
            except ValueError:
                how = f"crashed (signal {-code})"
        else:
            how = f"exited with status {code}"
        last = self._last_log_line()
        self.kill()
        return WorkerCrashed(how, last)

    def _last_log_line(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - 4096))
            tail = self._log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        return printable(lines[-1], 200) if lines else ""

    def log_text(self) -> str:
        """What the child wrote on stderr so far (onnxruntime's log), for debug traces."""
        if self._log is None:
            return ""
        try:
            self._log.seek(0)
            return self._log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- requests ------------------------------------------------------------------------------------
    def request(self, msg: tuple[Any, ...]) -> Any:
        """Send one request and wait for its reply.

        Any exception while waiting (a signal turned into one, Ctrl-C) kills the child: the request
        it was serving is abandoned with it. A child that dies raises :class:`WorkerCrashed`.
        """
        self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self.busy = True
        try:
            if not self._ready:
                _proto.read_frame(proc.stdout, _Unpickler)
                self._ready = True
            _proto.write_frame(proc.stdin, msg)
            reply = _proto.read_frame(proc.stdout, _Unpickler)
        except (EOFError, BrokenPipeError, ConnectionError) as e:
            self.busy = False
            raise self._died() from e
        except BaseException:
            self.busy = False
            self.kill()
            raise
        self.busy = False
        if reply[0] == "error":
            raise RuntimeFailed(printable(f"{reply[2]}" or reply[1]))
        return reply[1]

    def load(self, source: str | bytes, level: int) -> tuple[int, Any]:
        """Create a session; returns its number and ``(inputs, outputs)`` as onnxruntime lists them."""
        sid = self._next
        self._next += 1
        self._specs[sid] = (source, level)
        self.held += _size(source)
        io_ = self.request(("load", sid, _out_of_band(source), level, _severity()))
        self._loaded.add(sid)
        return sid, io_

    def run(self, sid: int, outputs: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if sid not in self._loaded:  # the child was restarted after a crash: load the session again
            source, level = self._specs[sid]
            self.request(("load", sid, _out_of_band(source), level, _severity()))
            self._loaded.add(sid)
        sent = {
            n: (np.ascontiguousarray(a).view(np.uint16), True) if a.dtype.name == "bfloat16" else (a, False)
            for n, a in feeds.items()
        }
        return list(self.request(("run", sid, list(outputs), sent)))

    def drop(self, sid: int) -> None:
        """Drop one session (its memory goes back to the system before the next model loads).

        Nothing to do when the child is gone (a crash took the session with it); a crash while dropping
        is left for the next request to report.
        """
        self._specs.pop(sid, None)
        if sid in self._loaded and self.alive():
            with contextlib.suppress(WorkerCrashed):
                self.request(("drop", sid))
        self._loaded.discard(sid)

    def reset(self) -> None:
        """Drop every session (the worker goes back to the idle slot)."""
        self._debug_log()
        if self.alive() and self._loaded:
            self.request(("reset",))
        self._specs.clear()
        self._loaded.clear()
        self.held = 0


def _size(source: str | bytes) -> int:
    if isinstance(source, str):
        try:
            return os.path.getsize(source)
        except OSError:
            return 0
    return len(source)


_KEEP_IDLE_BELOW = 256 * 2**20
"""A worker that held models larger than this is ended, not kept idle: the memory a process freed is
not always given back to the system, and an idle worker should cost little."""


def _out_of_band(source: str | bytes) -> Any:
    """Model bytes travel as an out-of-band buffer: written to the pipe as they are, not copied into the pickle."""
    return source if isinstance(source, str) else pickle.PickleBuffer(source)


_IDLE: list[OrtWorker] = []
_LOCK = threading.Lock()


def _kill_idle() -> None:
    with _LOCK:
        while _IDLE:
            _IDLE.pop().kill()


atexit.register(_kill_idle)


@contextlib.contextmanager
def worker_scope() -> Iterator[OrtWorker]:
    """A worker for one verification: the idle one when there is one, else a new one (started now).

    On the way out a healthy worker drops its sessions and waits, idle, for the next verification; one
    that was interrupted or crashed is gone already.
    """
    with _LOCK:
        w = _IDLE.pop() if _IDLE else None
    if w is None or not w.alive():
        if w is not None:
            w.kill()
        w = OrtWorker()
    w.start()
    ok = False
    try:
        yield w
        ok = True
    finally:
        keep = False
        if (ok or not w.busy) and w.held <= _KEEP_IDLE_BELOW:
            try:
                w.reset()
                keep = w.alive()
            except BaseException:  # noqa: BLE001 - a worker that cannot reset is not kept
                keep = False
        if keep:
            with _LOCK:
                if not _IDLE:
                    _IDLE.append(w)
                    w = None
        if w is not None:
            w.kill()
