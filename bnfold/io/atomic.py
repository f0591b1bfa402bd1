"""Atomic file creation: temporary paths next to the destination, deferred signals, a folder lock.

Rules: a temporary file is created in the destination's folder (one file system, so ``os.replace`` is
atomic) under a name that fits the file system's name limit (``NAME_MAX``, 255 bytes: a long output
name is shortened in the temporary's name, with a hash of the whole name); SIGINT/SIGTERM/SIGHUP are
held back in the few calls that create, rename or remove a file, so a signal turned into an exception
never leaks a file nobody knows about; saves into one folder take turns under an exclusive ``flock``
on the folder itself (no lock file is left). An output path that exists and is not a regular file (a
folder, a FIFO, a device, a socket; links followed) is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bnfold.errors import OutputError

__all__ = [
    "atomic_path",
    "check_target",
    "fit_name",
    "name_max",
    "check_folder",
    "discard",
    "folder_lock",
    "file_identity",
    "output_error",
    "remove_created",
    "signals_deferred",
    "temp_file",
    "temp_folder",
    "umask_mode",
]

log = logging.getLogger(__name__)


def output_error(path: str, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({e.strerror or e})")


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_target(path: str) -> None:
    """Refuse an output path that exists and is not a regular file (links followed).

    bnfold replaces regular files only: a FIFO or a device named as an output would otherwise be
    replaced by a regular file (or, followed through a link, written into).

    Raises:
        OutputError: ``path`` is a directory, a FIFO, a device or a socket.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing (or a dangling link): nothing to damage
    for test, what in _KINDS:
        if test(mode):
            raise OutputError(f"{path}: is {what}, not a regular file; bnfold writes only regular files")


def check_folder(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: output folder {folder} does not exist")
    check_target(path)
    return folder


_NAME_MAX = 255  # bytes: the limit of ext4, xfs, btrfs, tmpfs, APFS, NTFS (pathconf where it answers)


def name_max(folder: str) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes."""
    try:
        return min(_NAME_MAX, os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _NAME_MAX


def fit_name(name: str, room: int) -> str:
    """``name`` if its UTF-8 form is at most ``room`` bytes; else its head and a hash of the whole name
    (``<head>~<12 hex>``), at most ``room`` bytes: the same name always gives the same result."""
    if len(os.fsencode(name)) <= room:
        return name
    tag = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    head = name
    while head and len(os.fsencode(head + tag)) > room:
        head = head[:-1]
    return head + tag


_RANDOM = 8  # characters tempfile adds between prefix and suffix


def _temp_affixes(dst: str, folder: str, suffix: str) -> tuple[str, str]:
    """(prefix, suffix) of a temporary for ``dst``: ``.<name>.`` ... ``<suffix>``, fitting NAME_MAX."""
    room = name_max(folder) - _RANDOM - len(os.fsencode(suffix)) - 2  # the leading and the trailing dot
    # A byte of the name that is not UTF-8 (surrogate-escaped) becomes U+FFFD: onnx and onnxruntime,
    # which load the staged file for verification, take UTF-8 paths only.
    name = os.fsencode(os.path.basename(dst)).decode("utf-8", "replace")
    return f".{fit_name(name, room)}.", suffix


def umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_file(dst: str, folder: str, created: list[str]) -> str:
    """A fresh empty temporary file next to ``dst`` (``.<name>.*.tmp<suffix>``), noted in ``created``.

    Creating the file and noting its name are one step that a signal cannot cut, so the caller's
    clean-up (:func:`remove_created`, in a ``finally`` opened *before* this call) always knows it.
    """
    name = os.path.basename(dst)
    suffix = "".join(Path(name).suffixes[-1:])
    prefix, suffix = _temp_affixes(dst, folder, f".tmp{suffix}"[:16])
    with signals_deferred():
        try:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        except OSError as e:
            raise output_error(dst, e) from e
        created.append(tmp)
        os.close(fd)
    return tmp


def temp_folder(dst: str, folder: str, created: list[str]) -> str:
    """A fresh empty temporary folder next to ``dst`` (``.<name>.*.tmp``), noted in ``created``."""
    prefix, suffix = _temp_affixes(dst, folder, ".tmp")
    with signals_deferred():
        try:
            work = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder)
        except OSError as e:
            raise output_error(dst, e) from e
        created.append(work)
    return work


def remove_created(created: list[str]) -> None:
    """Remove the temporary files and folders in ``created`` (newest first), as one uncut step."""
    with signals_deferred():
        for path in reversed(created):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        created.clear()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path in the destination's folder; move it to ``path`` on success.

    On any exception the temporary file is removed and the exception propagates; ``path`` is either
    left as it was or replaced whole (``os.replace`` is atomic on one file system).

    Raises:
        OutputError: the folder does not exist or is not writable.
    """
    dst = os.fspath(path)
    folder = check_folder(dst)
    created: list[str] = []
    try:
        tmp = temp_file(dst, folder, created)
        yield tmp
        os.chmod(tmp, umask_mode())
        check_target(dst)  # again: a FIFO or device may have been put there meanwhile
        os.replace(tmp, dst)
    except BaseException:
        remove_created(created)
        raise


_DEFERRED_SIGNALS = frozenset(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)
)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back for a few system calls that must not be cut in two.

    Creating a temporary and recording its name, moving a data file and noting that it moved, and the
    clean-up itself: a signal handler that raises (as the CLI's do, and Python's for Ctrl-C) would
    otherwise leave a file nobody knows about. A signal that arrives meanwhile is delivered right
    after, where the clean-up of the ``except`` / ``finally`` around it runs.

    Two layers: the thread's signal mask, and (in the main thread, where Python runs its handlers)
    the Python handlers themselves, swapped for one that only notes the signal. The mask alone is not
    enough: a signal sent to the process lands in any thread that does not block it (a BLAS or
    onnxruntime worker), and Python then runs the handler in the main thread at its next bytecode,
    inside the block.
    """
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or not _DEFERRED_SIGNALS:  # pragma: no cover - not POSIX
        yield
        return
    old = mask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    held: list[int] = []
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _DEFERRED_SIGNALS:
            if signal.getsignal(sig) is None:  # a handler not installed from Python: left alone
                continue
            with contextlib.suppress(ValueError, OSError):
                saved[sig] = signal.signal(sig, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        mask(signal.SIG_SETMASK, old)
        for sig in held:  # delivered now, as if it had arrived just after the block
            handler = saved.get(sig)
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


def discard(path: str | None) -> None:
    """Remove the file ``path`` (None: nothing) if it exists, as one step that a signal cannot cut."""
    with signals_deferred():
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of an existing file, following links; None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` itself: bnfold saves into one folder take turns.

    Needed for the model + data pair: deciding the data file's name, the renames and the removal of
    the old data must not interleave with another process saving the same output. The lock is on the
    folder's descriptor, so no lock file is left behind; where ``flock`` is unavailable the save runs
    unlocked (the renames are still ordered so that a reader never sees a model without its data).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("no lock on %s (%s): saving unlocked", folder, e)
        yield
    finally:
        os.close(fd)  # releases the lock
