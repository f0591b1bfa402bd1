"""Atomic file creation: temporary paths next to the destination, deferred signals, a folder lock.

Rules: a temporary file is created in the destination's folder (one file system, so ``os.replace`` is
atomic); SIGINT/SIGTERM/SIGHUP are held back in the few calls that create, rename or remove a file, so
a signal turned into an exception never leaks a file nobody knows about; saves into one folder take
turns under an exclusive ``flock`` on the folder itself (no lock file is left).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnfold.errors import OutputError

__all__ = ["atomic_path"]

log = logging.getLogger(__name__)


def _output_error(path: str, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({e.strerror or e})")


def _check_folder(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: output folder {folder} does not exist")
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a directory")
    return folder


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temp_file(dst: str, folder: str, created: list[str]) -> str:
    """A fresh empty temporary file next to ``dst`` (``.<name>.*.tmp<suffix>``), noted in ``created``.

    Creating the file and noting its name are one step that a signal cannot cut, so the caller's
    clean-up (:func:`_remove_created`, in a ``finally`` opened *before* this call) always knows it.
    """
    name = os.path.basename(dst)
    suffix = "".join(Path(name).suffixes[-1:])
    with _signals_deferred():
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
        except OSError as e:
            raise _output_error(dst, e) from e
        created.append(tmp)
        os.close(fd)
    return tmp


def _temp_folder(dst: str, folder: str, created: list[str]) -> str:
    """A fresh empty temporary folder next to ``dst`` (``.<name>.*.tmp``), noted in ``created``."""
    with _signals_deferred():
        try:
            work = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=folder)
        except OSError as e:
            raise _output_error(dst, e) from e
        created.append(work)
    return work


def _remove_created(created: list[str]) -> None:
    """Remove the temporary files and folders in ``created`` (newest first), as one uncut step."""
    with _signals_deferred():
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
    folder = _check_folder(dst)
    created: list[str] = []
    try:
        tmp = _temp_file(dst, folder, created)
        yield tmp
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, dst)
    except BaseException:
        _remove_created(created)
        raise


_DEFERRED_SIGNALS = frozenset(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)
)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back for a few system calls that must not be cut in two.

    Creating a temporary and recording its name, moving a data file and noting that it moved, and the
    clean-up itself: a signal handler that raises (as the CLI's do, and Python's for Ctrl-C) would
    otherwise leave a file nobody knows about. A signal that arrives meanwhile is delivered right
    after, where the clean-up of the ``except`` / ``finally`` around it runs.
    """
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or not _DEFERRED_SIGNALS:  # pragma: no cover - not POSIX
        yield
        return
    old = mask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def _discard(path: str | None) -> None:
    """Remove the file ``path`` (None: nothing) if it exists, as one step that a signal cannot cut."""
    with _signals_deferred():
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of an existing file, following links; None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
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
