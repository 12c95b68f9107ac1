"""Layer Grams formed two at a time, each on half of torch's threads (``repsim_plugin._utils.threads``)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from reference import cka_numpy

from repsim_plugin._utils.threads import split_threads, workers_for
from repsim_plugin.errors import DegenerateInputError
from repsim_plugin.measures.mixed import MIXED_MIN_FLOPS
from repsim_plugin.streaming import SampleSpaceCKAMap

CPU = torch.device("cpu")


@pytest.fixture
def threads():
    """A setter of torch's intra-op threads for the test; the count from before is set back after it."""
    before = torch.get_num_threads()

    def set_to(count: int) -> None:
        torch.set_num_threads(count)

    yield set_to
    torch.set_num_threads(before)


def test_two_workers_run_side_by_side_each_on_half_the_threads(threads):
    threads(2)
    both_started = threading.Barrier(2, timeout=30)  # breaks (an error) unless tasks 0 and 1 run at the same time
    runs: list[tuple[int, int, int]] = []

    def task(index: int):
        def run(worker: int) -> None:
            if index < 2:
                both_started.wait()
            runs.append((index, worker, torch.get_num_threads()))

        return run

    assert workers_for(7, CPU) == 2 and workers_for(1, CPU) == 1 and workers_for(7, torch.device("meta")) == 1
    split_threads([task(i) for i in range(7)], CPU)
    assert sorted(index for index, _, _ in runs) == list(range(7))  # every task once
    assert {(index, worker) for index, worker, _ in runs if index < 2} == {(0, 0), (1, 1)}  # worker i starts on i
    assert {count for _, _, count in runs} == {1}
    assert torch.get_num_threads() == 2


def test_a_worker_error_is_raised_and_the_thread_count_set_back(threads):
    threads(2)

    def fail(worker: int) -> None:
        raise ValueError("task 1 failed")

    with pytest.raises(ValueError, match="task 1 failed"):
        split_threads([lambda worker: None, fail, lambda worker: None], CPU)
    assert torch.get_num_threads() == 2


def test_one_thread_runs_the_tasks_in_order_on_worker_0(threads):
    threads(1)
    assert workers_for(4, CPU) == 1
    runs: list[tuple[int, int, int]] = []
    split_threads([lambda worker, i=i: runs.append((i, worker, threading.get_ident())) for i in range(4)], CPU)
    assert runs == [(i, 0, threading.get_ident()) for i in range(4)]


def _acts(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Float32 layers of different widths: three take the float32 product of deviations, one the float64 path."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1400, generator=g)
    acts = {
        "offset": torch.relu(base) + 1e3,
        "wide": base @ torch.randn(1400, 1400, generator=g) / 40 + torch.randn(n, 1400, generator=g),
        "skew": 3 * torch.relu(base[:, 400:]) ** 2 - 7e2,
        "narrow": base[:, :6] + 0.1 * torch.randn(n, 6, generator=g),
    }
    assert min(n * n * int(v.shape[1]) for k, v in acts.items() if k != "narrow") >= MIXED_MIN_FLOPS
    assert n * n * 6 < MIXED_MIN_FLOPS
    return acts


@pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning")
def test_grams_side_by_side_are_the_bits_of_one_thread_and_within_3e_8_of_float64(threads):
    n = 400
    A, B = _acts(n, seed=3), _acts(n, seed=4)
    B["offset"] = A["offset"][:, :900] + 0.5 * B["offset"][:, :900]  # one pair with CKA well away from 0
    maps = {}
    for count in (2, 1):
        threads(count)
        m = SampleSpaceCKAMap()
        for i in range(0, n, 100):
            m.update({k: v[i : i + 100] for k, v in A.items()}, {k: v[i : i + 100] for k, v in B.items()})
        maps[count] = m.compute()
    assert torch.equal(maps[2], maps[1])  # each worker its own deviation buffer: no race between two layers
    centred = [[(x.double() - x.double().mean(0)).numpy() for x in side.values()] for side in (A, B)]
    ref = torch.tensor([[cka_numpy(a, b) for b in centred[1]] for a in centred[0]], dtype=torch.float64)
    assert float((maps[2] - ref).abs().max()) < 3e-8
    assert float(ref[0, 0]) > 0.5 and np.ptp(ref.numpy()) > 0.3  # the layers differ: a swapped Gram would show


@pytest.mark.filterwarnings("ignore::repsim_plugin.errors.SmallSampleBiasWarning")
def test_a_constant_layer_formed_on_a_worker_raises_and_the_thread_count_is_set_back(threads):
    threads(2)
    n = 400
    A = _acts(n, seed=5)
    A["wide"] = torch.full((n, 1400), 3.0)
    m = SampleSpaceCKAMap()
    m.update(A, _acts(n, seed=6))
    with pytest.raises(DegenerateInputError, match="zero variance"):
        m.compute()
    assert torch.get_num_threads() == 2
