"""The estimator planner's choices, pinned: 1800 cases recorded from the planner before the redesign.

``tests/data/estimator_plans.json`` holds (measure, layer dims, n estimate, budget, requested estimator) and what
``choose_estimator`` returned then: the estimator and its memory estimate, or the class of the error. The planner
now asks each measure what it declares (``Measure.estimators``) instead of matching its name; its choices and
numbers must be the same. One change since, added to the recorded numbers: the sample-space maps' Grams are
formed two layers at a time (``repsim_plugin._utils.threads``), with a float32 deviation buffer (counted at 8
bytes an entry) for the second-widest layer too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import repsim_plugin as rp
from repsim_plugin.compare import choose_estimator
from repsim_plugin.errors import RepsimError

DIMS = {
    "wide_small": [([20000, 30000], [20000])],
    "narrow": [([64, 128], [64])],
    "same_model": [([256, 512, 1024], None)],
    "three_maps": [([100, 200], [100, 200])] * 3,
    "one_wide": [([50000], [10])],
}
CASES = json.loads((Path(__file__).parent / "data" / "estimator_plans.json").read_text())


def test_the_table_covers_every_outcome() -> None:
    outcomes = {row[5] for row in CASES}
    assert {"feature_streaming", "sample_space", "minibatch", "captured", "MemoryBudgetError"} <= outcomes
    assert len(CASES) == 1800


@pytest.mark.parametrize("measure", sorted({row[0] for row in CASES}))
def test_choices_and_memory_are_the_recorded_ones(measure: str) -> None:
    m = rp.measures.make(measure)
    mismatches = []
    for _measure, dims_key, n, budget, requested, expected, memory in (row for row in CASES if row[0] == measure):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                plan = choose_estimator(
                    m,
                    DIMS[dims_key],
                    n_estimate=n,
                    batch_size=32,
                    itemsize=4,
                    requested=requested,
                    memory_budget=budget,
                )
                got = [plan.estimator, plan.memory]
            except RepsimError as error:
                got = [type(error).__name__, None]
        if expected == "sample_space" and memory:  # since: a deviation buffer for each of two Gram workers
            memory += sum(8 * n * sorted(da + (db or []))[-2] for da, db in DIMS[dims_key] if len(da + (db or [])) > 1)
        if got != [expected, memory]:
            mismatches.append((dims_key, n, budget, requested, [expected, memory], got))
    assert not mismatches, mismatches[:5]
