"""Shared test configuration: offline, deterministic, hypothesis profiles, threads under pytest-xdist."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Under pytest-xdist (`make test` runs `-n auto`) the workers share the cores: each gets its share of threads, and
# the processes a test starts inherit it (two workers of two threads on two cores make OpenMP wait: see one_thread).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile(
    "default",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
# CI: fixed examples so a run is reproducible, same budget
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model training on one thread (use with ``pytest.mark.usefixtures("one_thread")``).

    Measured: small CNN / MiniLM forward + backward steps are faster on one thread than on two when other processes
    share the two cores (OpenMP threads wait on each other: MiniLM on 64 sentences took ~0.9 s on one thread, 3-4 s on
    two), and one thread keeps the runs reproducible.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """The trained digits CNN (seed 0) and its split ``(model, Xtr, ytr, Xte, yte)``; a module may define its own."""
    from repsim_plugin.digits import train_digits_cnn

    model, (Xtr, ytr, Xte, yte) = train_digits_cnn(seed=0)
    return model, Xtr, ytr, Xte, yte
