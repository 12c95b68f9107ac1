"""The accumulator base derives the life cycle from declared state; the map accumulators' planning hooks.

A throwaway accumulator defined here declares its state through ``add_state`` and gets reset / merge /
state_dict / load_state_dict / all_reduce / to / compute(sync=...) without writing any of them.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError, StateError, TooFewSamplesError
from repsim_plugin.streaming import (
    KeptRowsMap,
    LinearCKAMap,
    MinibatchCKA,
    MinibatchCKAMap,
    SampleSpaceCKAMap,
)
from repsim_plugin.streaming.base import COUNT, SUM, Accumulator, MapAccumulator, Reduction

# --- a throwaway accumulator ------------------------------------------------------------------------------------------


class _Max(Reduction):
    """A custom reduction: the running column maximum."""

    def merge(self, mine: Any, theirs: Any) -> Any:
        return theirs.clone() if mine is None else torch.maximum(mine, theirs.to(mine.device))

    def all_reduce(self, value: Any, group: Any, device: torch.device) -> Any:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return value


class ColumnStats(Accumulator):
    """Column means and maxima of a stream of (b, d) rows; ``scale`` is an option that must match."""

    _kind = "ColumnStats"

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.add_state("n", 0, COUNT)
        self.add_state("total", None, SUM, blank=lambda: torch.zeros(3, dtype=torch.float64))
        self.add_state("peak", None, _Max(), key="maximum", blank=lambda: torch.full((3,), -math.inf))

    def _options(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def _has_data(self) -> bool:
        return self.total is not None

    def update(self, X: torch.Tensor) -> None:
        self._check_not_reduced("update")
        X = X.double() * self.scale
        self.total = X.sum(0) if self.total is None else self.total + X.sum(0)
        self.peak = X.amax(0) if self.peak is None else torch.maximum(self.peak, X.amax(0))
        self.n += X.shape[0]

    def _compute_local(self) -> torch.Tensor:
        if self.total is None:
            raise TooFewSamplesError("no rows")
        return torch.cat([self.total / self.n, self.peak])


def _rows(seed: int, n: int = 10) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


def test_a_declared_state_gets_the_whole_life_cycle():
    X, Y = _rows(0), _rows(1, 7)
    whole, left, right = ColumnStats(2.0), ColumnStats(2.0), ColumnStats(2.0)
    for acc, rows in ((whole, X), (whole, Y), (left, X), (right, Y)):
        acc.update(rows)
    expected = torch.cat([torch.cat([X, Y]).double().mean(0) * 2, torch.cat([X, Y]).double().amax(0) * 2])
    torch.testing.assert_close(whole.compute(), expected)
    # merge: into an empty one (copies), then a second shard; an empty other changes nothing
    merged = ColumnStats(2.0)
    merged.merge(left)
    merged.merge(ColumnStats(2.0))
    merged.merge(right)
    torch.testing.assert_close(merged.compute(), whole.compute(), rtol=0, atol=1e-15)
    left.update(Y)  # the merged copy is not reachable from the original
    assert merged.n == 17 and left.n == 17
    with pytest.raises(RepsimError, match=r"can only merge a ColumnStats with scale=2\.0"):
        merged.merge(ColumnStats(1.0))
    # state dict: plain, weights_only-loadable, keys from the declarations (and key=)
    state = whole.state_dict()
    assert set(state) == {"kind", "version", "reduced", "scale", "n", "total", "maximum"}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = ColumnStats(2.0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(restored.compute(), whole.compute(), rtol=0, atol=0)
    with pytest.raises(RepsimError, match=r"saved with scale=2\.0, this accumulator has scale=1\.0"):
        ColumnStats(1.0).load_state_dict(state)
    with pytest.raises(RepsimError, match="saved from 'ColumnStats', not 'LinearCKAMap'"):
        LinearCKAMap().load_state_dict(state)
    with pytest.raises(RepsimError, match="malformed ColumnStats state dict"):
        restored.load_state_dict(state | {"total": "nope"})
    torch.testing.assert_close(restored.compute(), whole.compute(), rtol=0, atol=0)  # a failed load changes nothing
    # reset and to
    restored.reset()
    assert restored.n == 0 and restored.total is None and not restored.reduced
    assert restored.to("cpu") is restored
    # misuse of state
    with pytest.raises(StateError, match="init_process_group"):
        whole.all_reduce()
    with pytest.raises(StateError, match="init_process_group"):
        whole.compute(sync=True)


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank in this process (torn down afterwards)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_all_reduce_is_derived_too(one_rank_group):
    acc, empty = ColumnStats(), ColumnStats()
    acc.update(_rows(2))
    before = acc.compute()
    assert torch.equal(acc.compute(sync=True), before) and not acc.reduced  # sync=True reduces a copy
    acc.all_reduce()
    assert acc.reduced and acc.n == 10
    torch.testing.assert_close(acc.compute(), before, rtol=0, atol=0)
    for misuse in (lambda: acc.update(_rows(3)), lambda: acc.merge(ColumnStats()), acc.all_reduce):
        with pytest.raises(StateError, match="count the other ranks twice"):
            misuse()
    empty.all_reduce()  # a rank without data takes part through the declared blank
    assert empty.reduced and empty.n == 0 and torch.equal(empty.total, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(empty.peak, torch.full((3,), -math.inf))
    acc.reset()
    acc.update(_rows(3))  # reset starts a new stream
    maps = LinearCKAMap(same=True)
    with pytest.raises(RepsimError, match="has not received any batch"):
        maps.all_reduce()  # a map without a layout cannot take part


# --- the planning hooks -----------------------------------------------------------------------------------------------

MAPS = [([64, 128], [32]), ([256, 512, 1024], None), ([10], [20, 30])]
D_TOTAL = 64 + 128 + 32 + 256 + 512 + 1024 + 10 + 20 + 30


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_memory_and_cost(debiased):
    need = LinearCKAMap.memory_needed(MAPS, n=None, batch_size=32, itemsize=4, debiased=debiased)
    assert need == sum(LinearCKAMap.memory_bytes(a, b, debiased=debiased, batch_size=32) for a, b in MAPS)
    assert LinearCKAMap.relative_cost(MAPS, n=1000, debiased=debiased) == D_TOTAL**2 / 3
    assert LinearCKAMap.relative_cost(MAPS, n=None) == D_TOTAL**2 / 3


def test_sample_space_memory_and_cost():
    assert SampleSpaceCKAMap.memory_needed(MAPS, n=None, batch_size=32, itemsize=4, debiased=True) is None
    assert SampleSpaceCKAMap.relative_cost(MAPS, n=None) is None
    need = SampleSpaceCKAMap.memory_needed(MAPS, n=500, batch_size=32, itemsize=2)
    assert need == sum(SampleSpaceCKAMap.memory_bytes(500, a, b, itemsize=2) for a, b in MAPS)
    assert SampleSpaceCKAMap.relative_cost(MAPS, n=500) == 4 * 500 * D_TOTAL


def test_minibatch_memory_cost_and_rows():
    need = MinibatchCKAMap.memory_needed(MAPS, n=None, batch_size=16, itemsize=4, kernel="rbf", sigma=0.5)
    assert need == sum(MinibatchCKAMap.memory_bytes(16, len(a), None if b is None else len(b)) for a, b in MAPS)
    assert MinibatchCKAMap.relative_cost(MAPS, n=100) is None  # the base default: ranks last
    assert MinibatchCKAMap.min_batch_rows == 4 and MinibatchCKA.min_batch_rows == 4
    assert MapAccumulator.min_batch_rows == 0 and LinearCKAMap.min_batch_rows == 0
    with pytest.raises(TooFewSamplesError, match="at least 4 rows per batch"):
        MinibatchCKAMap().update({"x": torch.randn(3, 2)})


@pytest.mark.parametrize("measure_id", ["cka", "rbf_cka", "procrustes"])
def test_kept_rows_memory(measure_id):
    m = rp.measures.make(measure_id)
    assert KeptRowsMap.memory_needed(MAPS, n=None, batch_size=32, itemsize=4, measure=m) is None
    widest = 1024
    expected = 300 * D_TOTAL * 4 + m.memory_per_call(300, widest, widest)
    assert KeptRowsMap.memory_needed(MAPS, n=300, batch_size=32, itemsize=4, measure=m) == expected
    assert KeptRowsMap.relative_cost(MAPS, n=300, measure=m) is None
    # today's planner numbers: the kept rows plus float64 copies of the widest pair (and two Grams for CKA)
    grams = 16 * 300**2 if m.id.startswith("cka") else 0
    assert expected == 300 * D_TOTAL * 4 + 8 * 300 * 2 * widest + grams


def test_the_base_hooks_default_to_unknown():
    class Plain(MapAccumulator):
        _kind = "Plain"

    assert Plain.memory_needed(MAPS, n=10, batch_size=2, itemsize=4) is None
    assert Plain.relative_cost(MAPS, n=10) is None
    assert LinearCKAMap.relative_cost([([3], None)], n=None) == 9.0


# --- every accumulator: pickle, to, state dict of an empty one --------------------------------------------------------


def _every_accumulator() -> list[Any]:
    from repsim_plugin.streaming import LinearCKA

    return [
        LinearCKA(debiased=True),
        LinearCKAMap(same=True),
        SampleSpaceCKAMap(debiased=True, same=False),
        MinibatchCKA("rbf", sigma=0.7),
        MinibatchCKAMap(same=True),
        KeptRowsMap(rp.measures.make("cka"), same=True),
    ]


def _feed_any(acc: Any, X: torch.Tensor, Y: torch.Tensor) -> None:
    if isinstance(acc, MapAccumulator):
        acc.update({"x": X}) if acc.same else acc.update({"x": X}, {"y": Y})
    else:
        acc.update(X, Y)


@pytest.mark.parametrize("index", range(6))
def test_pickle_to_and_empty_state_dicts(index):
    import pickle

    acc = _every_accumulator()[index]
    empty_state = acc.state_dict()
    X, Y = _rows(4, 16), _rows(5, 16)[:, :2]
    _feed_any(acc, X, Y)
    value = acc.compute()
    if not isinstance(acc, KeptRowsMap):  # a KeptRowsMap pickles when its measure does (built-in ones do not)
        clone = pickle.loads(pickle.dumps(acc))
        torch.testing.assert_close(clone.compute(), value, rtol=0, atol=0)
    assert acc.to("cpu") is acc
    fresh = _every_accumulator()[index]
    fresh.load_state_dict(acc.state_dict())
    torch.testing.assert_close(fresh.compute(), value, rtol=0, atol=0)
    fresh.load_state_dict(empty_state)  # an empty state empties the accumulator
    assert fresh.n == 0
