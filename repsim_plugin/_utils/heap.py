"""Freed memory kept in the process heap while the package runs its own forward passes (glibc's malloc only).

glibc hands every allocation over its mmap threshold (at most 32 MiB, its dynamic ceiling) to a fresh ``mmap`` and
unmaps it again on ``free``, and trims the top of the heap once more than twice that lies free. A CPU forward pass
allocates and frees activations of tens of MiB per layer, so every batch faults the same memory in again, page
by page: two resnet18 on 1024 images of 3x64x64 took 500-650k minor faults per pass, 0.8-1.0 s of system time
and 25% of the pass's wall time (``benchmarks/RESULTS.md``). Inside :func:`retained_heap` the freed memory stays in
the heap and is reused by the next batch. On leaving, both thresholds are set to the ceilings glibc's dynamic
thresholds rise to (32 MiB and 64 MiB; mallopt cannot switch the dynamic adjustment back on, nor report thresholds
the caller's own code set, which are replaced), and the heap is trimmed (``malloc_trim``) :data:`TRIM_DELAY_S`
later, so the memory goes back to the system. A block entered before then cancels the trim and reuses the memory:
a loop of calls (checkpoints one after another, a cell run again) does not fault its rows and activations in again
on every call (W2's warm calls: 0.25-0.9 s, 5-17%, in ``benchmarks/RESULTS.md``). :func:`release_now` trims at once.
Nothing computed changes: only where freed memory waits.

Left alone: a non-glibc platform, an allocator preloaded in place of malloc (jemalloc, tcmalloc, mimalloc), and
thresholds the user chose through the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``). ``REPSIM_RETAIN_HEAP=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

#: mallopt parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Inside: allocations up to 1 GiB come from the heap, and up to 1 GiB may lie free before it is trimmed.
RETAIN_BYTES = 2**30
#: On leaving: glibc's dynamic ceilings (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, and twice it for the trim).
RESTORE_MMAP_BYTES = 32 * 2**20
RESTORE_TRIM_BYTES = 64 * 2**20
#: The environment variable that turns it off ("0").
OFF_SWITCH = "REPSIM_RETAIN_HEAP"
#: Seconds between leaving the last block and trimming the heap: longer than the gap between calls in a loop.
TRIM_DELAY_S = 1.0

_lock = threading.Lock()
_depth = 0
#: The timer that trims the heap after the last block was left (None when no trim is pending).
_pending_trim: threading.Timer | None = None
_F = TypeVar("_F", bound=Callable[..., Any])


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc's malloc controls, or None where they are absent or not the process's allocator."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # libjemalloc, libtcmalloc, libmimalloc: not glibc's malloc
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def applies() -> bool:
    """Whether :func:`retained_heap` changes anything in this process (see the module's docstring)."""
    if os.environ.get(OFF_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return _libc() is not None


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Keep freed memory in the heap for the block's duration; yields whether that applied. Nests; thread-safe."""
    global _depth
    if not applies():
        yield False
        return
    libc = _libc()
    with _lock:
        if _depth == 0:
            _cancel_pending_trim()
            libc.mallopt(M_MMAP_THRESHOLD, RETAIN_BYTES)
            libc.mallopt(M_TRIM_THRESHOLD, RETAIN_BYTES)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_THRESHOLD, RESTORE_MMAP_BYTES)
                libc.mallopt(M_TRIM_THRESHOLD, RESTORE_TRIM_BYTES)
                _schedule_trim()


def _cancel_pending_trim() -> None:
    """Drop the pending trim (the caller holds ``_lock``)."""
    global _pending_trim
    if _pending_trim is not None:
        _pending_trim.cancel()
        _pending_trim = None


def _schedule_trim() -> None:
    """Trim the heap :data:`TRIM_DELAY_S` from now unless a block is entered first (the caller holds ``_lock``)."""
    global _pending_trim
    _cancel_pending_trim()
    timer = threading.Timer(TRIM_DELAY_S, _trim_if_pending, kwargs={"from_timer": True})
    timer.daemon = True  # an exiting interpreter gives all its memory back anyway
    _pending_trim = timer
    timer.start()


def _trim_if_pending(*, from_timer: bool = False) -> bool:
    """Trim now if a trim is pending and no block runs; ``from_timer``: only if the calling timer is the pending one."""
    with _lock:
        pending = _pending_trim
        if _depth != 0 or pending is None or (from_timer and pending is not threading.current_thread()):
            return False
        _cancel_pending_trim()
        _libc().malloc_trim(0)
        return True


def release_now() -> bool:
    """Give the memory freed in the last :func:`retained_heap` block back to the system now, not
    :data:`TRIM_DELAY_S` later; returns whether a trim was pending (False inside a block, where it is in use)."""
    return _trim_if_pending()


def with_retained_heap(func: _F) -> _F:
    """Run ``func`` inside :func:`retained_heap`; its locals (kept rows, Grams) are freed before the block is left."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with retained_heap():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
