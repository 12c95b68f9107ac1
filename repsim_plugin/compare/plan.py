"""Which estimator computes a map, chosen from what the measure declares, under a memory budget.

A measure declares its batch-by-batch estimators (``Measure.estimators``): exact ones (linear CKA: feature-space
statistics and kept rows with n x n Grams) and approximate ones (minibatch CKA for every kernel). Any measure can
also run on kept rows (``"captured"``), which is the exact fallback of a measure that declares no exact
estimator. ``estimator="auto"`` takes the cheapest exact estimator that fits the budget; when none fits it
falls back to an approximate one and says so with an :class:`EstimatorChoiceWarning`. Nothing here knows a
measure by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._utils.warnings import warn
from ..errors import EstimatorChoiceWarning, MemoryBudgetError, RepsimError, UnknownNameError
from ..measures import Estimator, Measure
from ..streaming import KeptRowsMap

__all__ = ["DEFAULT_MEMORY_BUDGET", "ESTIMATOR_CHOICES", "Plan", "choose_estimator", "parse_bytes"]

#: Default memory budget for statistics / kept activations: 4 GiB.
DEFAULT_MEMORY_BUDGET = 4 * 2**30
#: The estimators the built-in measures declare, plus "auto" and "captured" (a plugin may declare others).
ESTIMATOR_CHOICES = ("auto", "feature_streaming", "sample_space", "minibatch", "captured")
CAPTURED = "captured"

#: layer feature dims per map: (dims of side a, dims of side b or None for a model's layers against themselves)
Maps = Sequence[tuple[Sequence[int], Sequence[int] | None]]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_REDUCE_HINT = (
    "Raise memory_budget=, capture fewer layers, reduce features (spatial='mean', tokens='mean'), or use fewer "
    "samples (max_batches=)."
)


def parse_bytes(value: int | float | str) -> int:
    """``4 * 2**30``, ``"4GiB"``, ``"512 MB"`` -> bytes."""
    hint = "give bytes (an int >= 1) or e.g. '4GiB', '512MB'"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 1:
            raise RepsimError(f"memory_budget must be a finite number of bytes >= 1, got {value!r}; {hint}.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if isinstance(value, bool) or not match or match.group(2).lower() not in _UNITS:
        raise RepsimError(f"cannot read memory_budget {value!r}; {hint}.")
    parsed = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if parsed < 1:
        raise RepsimError(f"memory_budget {value!r} is less than one byte; {hint}.")
    return parsed


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


@dataclass
class Plan:
    """The estimator chosen for a comparison, why, its memory estimate, and how to build its accumulators."""

    estimator: str
    reason: str
    memory: int
    declaration: Estimator = field(repr=False, default_factory=lambda: Estimator(KeptRowsMap))

    def build(self, *, same: bool) -> Any:
        """A fresh accumulator of this estimator for one map."""
        return self.declaration.build(same=same)


@dataclass(frozen=True)
class _Candidate:
    name: str
    declaration: Estimator
    memory: int | None
    cost: float | None


def _planned(cls: Any, maps: Maps, side_maps: Maps | None) -> Maps:
    """The maps an estimator is sized on: one per pair of sides where it shares sides across maps."""
    return side_maps if side_maps is not None and getattr(cls, "shares_sides", False) else maps


def _candidates(
    measure: Measure,
    declared: Mapping[str, Estimator],
    maps: Maps,
    n: int | None,
    batch_size: int,
    itemsize: int,
    side_maps: Maps | None = None,
) -> list[_Candidate]:
    out = []
    for name, declaration in declared.items():
        cls: Any = declaration.resolve()  # a map accumulator class (the streaming protocol)
        options = dict(declaration.options)
        sized = _planned(cls, maps, side_maps)
        memory = cls.memory_needed(sized, n=n, batch_size=batch_size, itemsize=itemsize, **options)
        out.append(_Candidate(name, declaration, memory, cls.relative_cost(sized, n=n, **options)))
    return out


def _captured(
    measure: Measure, maps: Maps, n: int | None, batch_size: int, itemsize: int, side_maps: Maps | None = None
) -> _Candidate:
    declaration = Estimator(KeptRowsMap, {"measure": measure, "copy": False})
    sized = _planned(KeptRowsMap, maps, side_maps)
    memory = KeptRowsMap.memory_needed(sized, n=n, batch_size=batch_size, itemsize=itemsize, measure=measure)
    return _Candidate(CAPTURED, declaration, memory, None)


def _describe_need(candidates: Sequence[_Candidate]) -> str:
    return " and ".join(
        f"{gib(c.memory)} ({c.name})" if c.memory is not None else f"an unknown amount ({c.name}; n unknown)"
        for c in candidates
    )


def choose_estimator(
    measure: Measure,
    dims: Maps,
    *,
    n_estimate: int | None,
    batch_size: int,
    itemsize: int,
    requested: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    side_maps: Maps | None = None,
) -> Plan:
    """Pick the estimator for ``measure`` under ``memory_budget`` bytes.

    ``dims`` holds, per layer x layer map, the feature dims of side a and of side b (None when a map compares one
    set of layers with itself); ``n_estimate`` the number of samples expected (None: unknown). ``side_maps``: when
    the maps share sides (N checkpoints in every pair), the same dims with every side once (sides paired up, an
    odd one as ``(dims, None)``): estimators that share sides (``shares_sides``) are sized on it.
    """
    layers = sum(len(da) + len(db or ()) for da, db in dims)
    declared = dict(measure.estimators)
    if requested != "auto":
        return _requested(
            measure, declared, dims, requested, n_estimate, batch_size, itemsize, memory_budget, layers, side_maps
        )
    exact = _candidates(measure, measure.exact_estimators(), dims, n_estimate, batch_size, itemsize, side_maps)
    approximate = measure.approximate_estimators()
    if not exact:
        captured = _captured(measure, dims, n_estimate, batch_size, itemsize, side_maps)
        # with nothing to fall back to, an unknown n runs on kept rows, checked against the budget as they come
        fits = captured.memory <= memory_budget if captured.memory is not None else not approximate
        if fits:
            reason = "kept rows fit the budget" if approximate else "measure computed on the kept rows"
            return Plan(CAPTURED, reason, int(captured.memory or 0), captured.declaration)
        exact = [captured]
        if not approximate:
            raise MemoryBudgetError(
                f"{measure.id} runs on kept activations, which need about {gib(captured.memory or 0)} for {layers} "
                f"layers, over the memory budget of {gib(memory_budget)}. {_REDUCE_HINT}"
            )
    fitting = [c for c in exact if c.memory is not None and c.memory <= memory_budget]
    if fitting:
        best = min(fitting, key=lambda c: float("inf") if c.cost is None else c.cost)
        return Plan(best.name, _exact_reason(best, exact, fitting, n_estimate), int(best.memory or 0), best.declaration)
    reason = f"exact {measure.id} needs {_describe_need(exact)}, over the memory budget of {gib(memory_budget)}"
    return _approximate(measure, approximate, dims, reason, n_estimate, batch_size, itemsize, memory_budget)


def _exact_reason(best: _Candidate, exact: Sequence[_Candidate], fitting: Sequence[_Candidate], n: int | None) -> str:
    others = [c for c in exact if c is not best]
    if not others:
        return f"{best.name}: exact, and its {gib(best.memory or 0)} fit the budget"
    if len(fitting) == 1:
        return f"{best.name}: exact; {_describe_need(others)} would not fit the budget, {gib(best.memory or 0)} do"
    return f"{best.name}: the cheapest exact estimator that fits the budget (n ~ {n})"


def _approximate(
    measure: Measure,
    approximate: Mapping[str, Estimator],
    dims: Maps,
    reason: str,
    n: int | None,
    batch_size: int,
    itemsize: int,
    memory_budget: int,
) -> Plan:
    if not approximate:
        raise MemoryBudgetError(f"{reason}, and {measure.id} declares no approximate estimator. {_REDUCE_HINT}")
    name, declaration = next(iter(approximate.items()))
    cls: Any = declaration.resolve()
    need = int(cls.memory_needed(dims, n=n, batch_size=batch_size, itemsize=itemsize, **dict(declaration.options)))
    if need > memory_budget:
        raise MemoryBudgetError(f"{reason}; even {name} needs {gib(need)}. Use smaller batches.")
    warn(
        f"estimator='auto' uses the approximate estimator {name!r} instead of exact {measure.id}: {reason}. "
        f"{cls.__name__} is its own estimator (for minibatch CKA: Nguyen et al. 2021), close to but not equal to "
        f"the exact value; the result records estimator={name!r}. Pass memory_budget= to allow the exact form, or "
        f"estimator={name!r} to silence this.",
        EstimatorChoiceWarning,
    )
    return Plan(name, reason, need, declaration)


def _requested(
    measure: Measure,
    declared: Mapping[str, Estimator],
    dims: Maps,
    requested: str,
    n: int | None,
    batch_size: int,
    itemsize: int,
    memory_budget: int,
    layers: int,
    side_maps: Maps | None,
) -> Plan:
    if requested == CAPTURED:
        candidate = _captured(measure, dims, n, batch_size, itemsize, side_maps)
    elif requested in declared:
        candidate = _candidates(measure, {requested: declared[requested]}, dims, n, batch_size, itemsize, side_maps)[0]
    elif isinstance(requested, str) and requested in ESTIMATOR_CHOICES:
        raise RepsimError(
            f"estimator {requested!r} is not available for {measure.id}: it declares "
            f"{sorted(declared) or 'no batch-by-batch estimator'} (any measure also runs on kept rows, 'captured')."
        )
    else:
        known = sorted({*ESTIMATOR_CHOICES, *declared})
        raise UnknownNameError(f"unknown estimator {requested!r}; choose one of {known}.")
    need = candidate.memory
    if need is not None and need > memory_budget:
        raise MemoryBudgetError(
            f"estimator {requested!r} needs about {gib(need)} for {layers} layers, over the memory budget of "
            f"{gib(memory_budget)}. {_REDUCE_HINT}"
        )
    return Plan(requested, "requested", need or 0, candidate.declaration)
