"""The fx tracer every bnfold trace runs under, and the one lock that makes traces thread-safe.

torch.fx patches module-level state (``nn.Module.__call__``, wrapped functions) while it traces and
restores it afterwards: two traces in two threads would undo each other's patches, so every trace
holds :data:`TRACE_LOCK`; a forward that another thread runs meanwhile goes straight to the module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import fx, nn

__all__ = ["TRACE_LOCK", "ThreadSafeTracer", "first_line"]


def first_line(e: BaseException) -> str:
    """``"Type: first line of the message"``: torch puts the cause first and advice last."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


# torch.fx tracing patches module-level state (``nn.Module.__call__``, wrapped functions) while it
# runs and restores it afterwards: two traces in two threads would undo each other's patches.
# Every trace bnfold runs holds this lock.
TRACE_LOCK = threading.RLock()


class ThreadSafeTracer(fx.Tracer):
    """An fx tracer that lets other threads run modules normally while it traces.

    fx patches ``nn.Module.__call__`` and ``__getattr__`` for the whole process during a trace; a
    forward running at the same time in another thread would otherwise be recorded by (or fail in)
    this trace. Calls from any thread but the tracing one go straight to the module.
    """

    _owner: int | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with TRACE_LOCK:
            self._owner = threading.get_ident()
            return super().trace(root, concrete_args)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if threading.get_ident() != self._owner:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)
