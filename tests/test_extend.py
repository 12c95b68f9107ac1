"""Extending the package touches one place: a measure with its own accumulator is streamed by ``rp.compare``.

The plugin measure here, the cosine of the two layers' mean activation vectors (same width only), declares a map
accumulator that keeps per-layer column sums. ``rp.compare`` must plan it as an exact estimator (it never keeps the
rows) and give the value of the measure on all rows.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import repsim_plugin as rp
from repsim_plugin.measures import Estimator
from repsim_plugin.streaming.base import COUNT, SUM, MapAccumulator


class MeanCosineMap(MapAccumulator):
    """Cosine of column means for every layer pair, from per-layer column sums (O(d) state per layer)."""

    _kind = "MeanCosineMap"
    updates_seen: ClassVar[list[int]] = []  # every instance appends its batch sizes: the test sees that rows streamed

    def __init__(self, *, same: bool | None = None, process_group: Any = None) -> None:
        super().__init__(same=same, process_group=process_group)
        self.add_state("n", 0, COUNT)
        self.add_state("sums_a", None, SUM)
        self.add_state("sums_b", None, SUM)

    @classmethod
    def memory_needed(cls, maps: Any, *, n: int | None, batch_size: int, itemsize: int, **options: Any) -> int:
        return 8 * sum(sum(da) + sum(db or ()) for da, db in maps)

    def _has_data(self) -> bool:
        return self.sums_a is not None

    def update(self, acts_a: dict[str, torch.Tensor], acts_b: dict[str, torch.Tensor] | None = None) -> None:
        A, B, _ = self._validate_update(acts_a, acts_b)
        self._layouts(A, B)
        sums_a = {k: v.double().sum(0) for k, v in A.items()}
        sums_b = sums_a if B is None else {k: v.double().sum(0) for k, v in B.items()}
        if self.sums_a is None:
            self.sums_a, self.sums_b = sums_a, sums_b
            self._names = (list(A), list(B if B is not None else A))
        else:
            self.sums_a = {k: self.sums_a[k] + v for k, v in sums_a.items()}
            self.sums_b = {k: self.sums_b[k] + v for k, v in sums_b.items()}
        self.n += next(iter(A.values())).shape[0]
        MeanCosineMap.updates_seen.append(next(iter(A.values())).shape[0])

    @property
    def layers_a(self) -> list[str]:
        return list(self.sums_a or {})

    @property
    def layers_b(self) -> list[str]:
        return list(self.sums_b or {})

    def _compute_local(self) -> torch.Tensor:
        a = [v / v.norm() for v in self.sums_a.values()]
        b = [v / v.norm() for v in self.sums_b.values()]
        return torch.stack([torch.stack([x @ y for y in b]) for x in a])


def mean_cosine(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Cosine of the column means (the plain definition, on all rows)."""
    mx, my = X.mean(0), Y.mean(0)
    return mx @ my / (mx.norm() * my.norm())


@pytest.fixture
def plugin_measure():
    measure = rp.measures.register(
        "plugin_mean_cosine-score",
        mean_cosine,
        larger_is_more_similar=True,
        symmetric=True,
        invariances={"isotropic_scaling"},
        estimators={"column_sums": Estimator(MeanCosineMap)},
    )
    yield measure
    rp.measures.unregister(measure.id)


def test_a_plugin_measure_with_an_accumulator_is_streamed_by_compare(plugin_measure):
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5))
    b = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5))
    batches = [torch.randn(16, 6) for _ in range(4)]
    MeanCosineMap.updates_seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no approximate-estimator warning: the declared one is exact
        result = rp.compare(a, b, batches, ["1", "2"], ["1", "2"], measure="plugin_mean_cosine-score", progress=False)
    assert plugin_measure.streamable and result.estimator == "column_sums"
    assert MeanCosineMap.updates_seen == [16, 16, 16, 16]
    X = torch.cat(batches)
    with torch.no_grad():
        rows_a = {"1": a[:2](X), "2": a(X)}
        rows_b = {"1": b[:2](X), "2": b(X)}
    for i, la in enumerate(["1", "2"]):
        for j, lb in enumerate(["1", "2"]):
            expected = float(mean_cosine(rows_a[la].double(), rows_b[lb].double()))
            assert float(result.values[i, j]) == pytest.approx(expected, abs=1e-12)
    # the same measure forced onto kept rows gives the same map
    kept = rp.compare(a, b, batches, ["1", "2"], ["1", "2"], plugin_measure, estimator="captured", progress=False)
    torch.testing.assert_close(kept.values, result.values, rtol=0, atol=1e-12)
