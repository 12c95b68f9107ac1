"""``retained_heap``: freed memory reused instead of faulted in again, returned after a delay; results unchanged.

Page faults and RSS are read in a fresh interpreter (``resource.getrusage``, ``/proc/self/statm``), so that the test
process's own heap state does not enter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import repsim_plugin as rp
from repsim_plugin._utils import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="glibc's malloc only")

#: One 64 MiB tensor, touched: over glibc's 32 MiB mmap ceiling, so outside it is mapped and faulted in each time.
PROBE = textwrap.dedent(
    """
    import json, os, resource, sys, torch
    from repsim_plugin._utils import heap
    from repsim_plugin._utils.heap import retained_heap

    def faults(times=8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(times):
            t = torch.ones(16 * 2**20)
            del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    out = {"outside_before": faults()}
    with retained_heap():
        pass
    out["after_an_empty_block"] = faults()
    out["rss_start"] = rss_mib()
    with retained_heap() as applied:
        out["applied"] = applied
        faults(1)
        out["inside"] = faults()
        with retained_heap():
            faults(1)
        out["after_inner_exit"] = faults()
        keep = [torch.ones(16 * 2**20) for _ in range(8)]  # 512 MiB, freed before leaving
        out["rss_peak"] = rss_mib()
        del keep
    out["trim_pending"] = heap._pending_trim is not None
    with retained_heap():  # entered within the delay: the 512 MiB left in the heap is taken again
        out["trim_pending_inside"] = heap._pending_trim is not None
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        keep = [torch.ones(16 * 2**20) for _ in range(8)]
        out["second_block_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del keep
    timer = heap._pending_trim  # None where the policy does not apply
    if timer is not None:
        timer.join(heap.TRIM_DELAY_S + 30)
    out["trim_pending_after_delay"] = heap._pending_trim is not None
    out["rss_after"] = rss_mib()
    with retained_heap():
        keep = [torch.ones(16 * 2**20) for _ in range(8)]
        del keep
    out["rss_before_release"] = rss_mib()
    out["released"] = heap.release_now()
    out["rss_released"] = rss_mib()
    out["released_twice"] = heap.release_now()
    print(json.dumps(out))
    """
)

PAGES_64_MIB = 16384


def _probe(**env: str) -> dict[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "REPSIM_RETAIN"))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env={**clean, **env}, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_inside_freed_memory_is_reused_and_on_leaving_returned() -> None:
    out = _probe()
    assert out["applied"] is True
    # outside, each of the 8 tensors of 64 MiB is mapped afresh: a fault per 4 KiB page, 8 times
    assert out["outside_before"] >= 6 * PAGES_64_MIB, out
    # inside, the freed block is reused (one of the 8 was seen faulted in again now and then, never more)
    assert out["inside"] <= 2 * PAGES_64_MIB, out
    # a nested block's exit leaves the outer block's policy in place
    assert out["after_inner_exit"] <= 2 * PAGES_64_MIB, out
    # the 512 MiB freed inside waits in the heap for a block entered within TRIM_DELAY_S, which cancels the trim
    # and takes it again without faulting it in (8 x 64 MiB fresh would be 8 x 16384 faults)
    assert out["rss_peak"] - out["rss_start"] >= 450, out
    assert out["trim_pending"] is True and out["trim_pending_inside"] is False, out
    assert out["second_block_faults"] <= 2 * PAGES_64_MIB, out
    # TRIM_DELAY_S after the last block, it is given back (trimmed), not held by the process
    assert out["trim_pending_after_delay"] is False, out
    assert out["rss_after"] - out["rss_start"] <= 64, out
    # release_now gives it back at once, and says whether there was anything to give
    assert out["rss_before_release"] - out["rss_start"] >= 450, out
    assert out["released"] is True and out["released_twice"] is False, out
    assert out["rss_released"] - out["rss_start"] <= 64, out
    # on leaving, the thresholds are back at glibc's ceilings: a 64 MiB block is mapped afresh again (checked
    # after an empty block: after a busy one glibc may serve it from a free chunk left in the heap, pages released)
    assert out["after_an_empty_block"] >= 6 * PAGES_64_MIB, out


@pytest.mark.parametrize(
    "env",
    [{"REPSIM_RETAIN_HEAP": "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}, {"LD_PRELOAD": "/nonexistent/libjemalloc.so"}],
    ids=["off-switch", "user-threshold", "preloaded-allocator"],
)
def test_left_alone_when_switched_off_or_chosen_by_the_user(env: dict[str, str]) -> None:
    out = _probe(**env)
    assert out["applied"] is False
    assert out["inside"] >= 6 * PAGES_64_MIB, out  # glibc's own behaviour, untouched


def _convnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4))


def test_compare_gives_the_same_bits_on_either_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _convnet(0), _convnet(1)
    data = [torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    layers = ["1", "3", "5"]
    retained = rp.compare(a, b, data, layers, layers, progress=False)
    monkeypatch.setenv(heap.OFF_SWITCH, "0")
    system = rp.compare(a, b, data, layers, layers, progress=False)
    assert torch.equal(retained.values, system.values)
    assert retained.fingerprints == system.fingerprints


def test_compare_keeps_its_signature_and_docs() -> None:
    import inspect

    assert "memory_budget" in inspect.signature(rp.compare).parameters
    assert rp.compare.__doc__ and rp.compare.__doc__.startswith("Layer x layer similarity")
    assert rp.compare.__name__ == "compare"


def test_release_memory_gives_back_what_the_last_compare_left_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    # a delay no slow machine reaches between compare's return and the call below: the trim is still pending then
    monkeypatch.setattr(heap, "TRIM_DELAY_S", 600.0)
    a, b = _convnet(0), _convnet(1)
    data = [torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    rp.compare(a, b, data, ["1", "3"], ["1", "3"], progress=False)
    timer = heap._pending_trim
    assert timer is not None and timer.is_alive()
    assert rp.release_memory() is True
    assert heap._pending_trim is None
    timer.join(5)
    assert not timer.is_alive()  # the timer was cancelled, not left to trim again 600 s from now
    assert rp.release_memory() is False
