"""Independent CPU tasks on two threads at once, torch's intra-op threads split between them.

The BLAS runs a large product near its peak on every core, but the small and tall-skinny blocks of a half Gram
(:func:`~repsim_plugin.measures.mixed.symmetric_product64`) at 60-75% of it: the cores wait on each other at every
block. Two layers' Grams formed side by side, each on half the threads, keep each core on its own stream of
blocks. W2's 16 half-Grams (1024 rows, 2048-16384 features) took 0.85-0.88 s against 1.05-1.09 s one after
another, with the same bits (2-core AVX2 EPYC, MKL; ``benchmarks/gram_threads.py``).

torch's thread count is one setting for the process: it is lowered for the tasks and set back when they end or
fail. Other threads that run torch work meanwhile run on the lowered count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

#: Threads that run the tasks (each with ``torch.get_num_threads() // WORKERS`` intra-op threads).
WORKERS = 2


def workers_for(tasks: int, device: torch.device) -> int:
    """How many workers :func:`split_threads` runs ``tasks`` tasks on: 2 on the CPU with 2+ tasks and 2+ intra-op
    threads, else 1 (one thread runs them in order)."""
    return WORKERS if device.type == "cpu" and tasks >= 2 and torch.get_num_threads() >= WORKERS else 1


def split_threads(tasks: Sequence[Callable[[int], None]], device: torch.device) -> None:
    """Run ``tasks`` to the end, each called with its worker's index (0 or 1), on two threads side by side.

    Worker ``i`` runs task ``i`` first, then the next task not yet taken, so with tasks sorted by size the two
    largest go one to each worker and a worker's first task is its largest (a per-worker buffer sized for it holds
    every later one). One thread runs them in order when there is a single task, a single intra-op thread, or the
    work is on an accelerator. The first error is raised once both workers have stopped.
    """
    threads = torch.get_num_threads()
    if workers_for(len(tasks), device) == 1:
        for task in tasks:
            task(0)
        return
    lock = threading.Lock()
    taken = [WORKERS]  # the next task not yet taken
    errors: list[BaseException] = []

    def work(index: int) -> None:
        task_index = index
        while task_index < len(tasks) and not errors:
            try:
                tasks[task_index](index)
            except BaseException as error:  # re-raised in the caller's thread below
                errors.append(error)
                return
            with lock:
                task_index, taken[0] = taken[0], taken[0] + 1

    # read by each new thread at its first parallel op; worker 0 is the caller's thread, whose heap already holds
    # the memory freed by the forward passes (a new thread allocates from an arena of its own: fresh pages)
    torch.set_num_threads(threads // WORKERS)
    try:
        helpers = [threading.Thread(target=work, args=(i,), name=f"repsim-worker-{i}") for i in range(1, WORKERS)]
        for helper in helpers:
            helper.start()
        try:
            work(0)
        finally:
            for helper in helpers:
                helper.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]
