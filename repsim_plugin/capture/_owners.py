"""Which thread is capturing which model: a second thread's capture of a model in use is refused.

A recorder switches the model to eval mode and restores every module's train flag on exit; two threads doing that
on one model interleave (thread A restores train mode while thread B's forward still runs, so B updates BatchNorm
statistics, and the last one out restores a stale flag). Captures nested in one thread are fine: each restores
what it saw on entry, in reverse order.
"""

from __future__ import annotations

import threading

from torch import nn

from ..errors import StateError

_LOCK = threading.Lock()
#: id(model) -> (owning thread id, number of active recorders of that thread on the model)
_OWNERS: dict[int, tuple[int, int]] = {}


def claim(model: nn.Module) -> None:
    """Register an active recorder of the calling thread on ``model``; refuse when another thread holds it."""
    me = threading.get_ident()
    with _LOCK:
        owner, count = _OWNERS.get(id(model), (me, 0))
        if owner != me:
            raise StateError(
                f"the {type(model).__name__} is being captured by another thread; captures switch the model to "
                "eval mode and restore its flags, so two threads on one model would change it. Capture a copy "
                "(copy.deepcopy(model)) in each thread, or capture one thread at a time."
            )
        _OWNERS[id(model)] = (me, count + 1)


def release(model: nn.Module) -> None:
    """Undo one :func:`claim` of the calling thread (a no-op when it holds none)."""
    with _LOCK:
        owner, count = _OWNERS.get(id(model), (None, 0))
        if owner != threading.get_ident():
            return
        if count <= 1:
            del _OWNERS[id(model)]
        else:
            _OWNERS[id(model)] = (owner, count - 1)
