"""From the pass over the data to the similarity maps, as :func:`.api.compare` and ``compare_checkpoints`` make them.

:func:`run_pass` makes the one pass (:func:`.engine.run`), resumed from a state file when asked (:mod:`.resume`);
:func:`pair_map` turns one pair's statistics into a :class:`~repsim_plugin.results.SimilarityMap` with its
provenance: the estimator and why, the reductions, the models' and the data's fingerprints, the null baseline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._utils import dist
from ..measures import Measure
from ..nulls import null_baseline_map
from ..results import SimilarityMap
from .engine import Engine, Pair, Side, run
from .plan import parse_bytes
from .resume import Resume, open_resume

__all__ = ["pair_map", "resumed", "run_pass"]


def _null(engine: Engine, pair: Pair, names: tuple[list[str], list[str]], n: int) -> tuple[Any, str]:
    """The null baseline of every cell, from the layers' widths in the last batch's rows (see :mod:`..nulls`)."""
    rows_a, rows_b = engine.rows(pair)
    try:
        dims_a = [int(rows_a[name].shape[1]) for name in names[0]]
        dims_b = [int((rows_a if rows_b is None else rows_b)[name].shape[1]) for name in names[1]]
    except KeyError:
        return None, "no null baseline: the layers' widths were not available"
    return null_baseline_map(engine.measure, n, dims_a, dims_b)


def pair_map(engine: Engine, pair: Pair, *, seed: int | None, extra: Mapping[str, Any]) -> SimilarityMap:
    """The map of ``pair`` after the pass, with its provenance (``extra``: the caller's entries, added last)."""
    values, names_a, names_b = engine.compute(pair)
    n = dist.global_count(engine.sides[pair.i].n - engine.skipped_rows)
    null, null_note = _null(engine, pair, (names_a, names_b), n)
    side_a, side_b = engine.sides[pair.i], engine.sides[pair.j]
    policy_a, policy_b = side_a.recorder.policy, side_b.recorder.policy
    reduction = dict(policy_a) if policy_a == policy_b else {"a": policy_a, "b": policy_b}
    assert engine.plan is not None
    hashes = engine.data_hashes
    weights = engine.weights_fingerprints()
    return SimilarityMap(
        values=values.to(torch.float64).cpu(),
        layers_a=names_a,
        layers_b=names_b,
        measure=engine.measure.id,
        estimator=engine.plan.estimator,
        reduction=reduction,
        n=n,
        dtype=str(engine.dtype).replace("torch.", ""),
        seed=seed,
        fingerprints={"a": weights[pair.i], "b": weights[pair.j]},
        extra={
            "model_a": side_a.label,
            "model_b": side_b.label,
            "estimator_reason": engine.plan.reason,
            "data_fingerprint": _hexdigest(hashes[side_a.stream]),
            **({"data_fingerprint_b": _hexdigest(hashes[side_b.stream])} if side_b.stream != side_a.stream else {}),
            "world_size": dist.world_size(),
            **({"minibatch_skipped_rows": engine.skipped_rows} if engine.skipped_rows else {}),
            "null_baseline_note": null_note,
            **extra,
        },
        null_baseline=null,
    )


def _hexdigest(h: Any) -> str | None:
    return None if h is None else h.hexdigest()


def run_pass(
    sides: list[Side],
    pairs: list[Pair],
    streams: list[Iterable[Any]],
    m: Measure,
    *,
    estimator: str,
    memory_budget: int | str,
    progress: bool,
    max_batches: int | None,
    fingerprint_data: bool,
    resume_from: str | Path | None,
    save_every: int | None,
    call: str,
    keep_grams: bool = False,
) -> tuple[Engine, Resume | None]:
    """The one pass over the data (:func:`.engine.run`), resumed from ``resume_from`` when it holds a state."""
    budget = parse_bytes(memory_budget)
    resume = open_resume(
        resume_from, save_every, sides, pairs, m, estimator=estimator, memory_budget=budget,
        n_streams=len(streams), max_batches=max_batches, extra={"call": call},
    )  # fmt: skip
    engine = run(
        sides,
        pairs,
        streams,
        m,
        estimator=estimator,
        memory_budget=budget,
        progress=progress,
        max_batches=max_batches,
        fingerprint_data=fingerprint_data,
        resume=resume,
        keep_grams=keep_grams,
    )
    return engine, resume


def resumed(resume: Any) -> dict[str, Any]:
    """The ``extra`` entry that says how many batches came from the state file (none without one)."""
    return {} if resume is None else {"resumed_batches": resume.resumed_batches}
