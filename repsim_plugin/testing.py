"""Conformance checks that any measure (built-in or a plugin's) can be run through.

``check_measure(measure)`` verifies every property the measure *declares*, numerically:
each invariance, symmetry, the metric axioms (also across different feature counts), the value range and self
value, ``min_samples`` enforcement, the output contract (0-d tensor, compute dtype, numpy input, float32 / float16
input, no stray non-package warnings), the direction (a near copy must not look less similar than independent
data), and ``torch.autograd.gradcheck`` for differentiable measures. A new measure is tested by registering it: the test
suite runs this over every registered id.

It also probes the properties a measure does *not* declare (invariances, symmetry, the metric axioms of a
distance): one that holds numerically is listed in ``report.notes`` ("declared too little"), and with
``strict=True`` it counts as a failure. Warnings of the package (``RepsimWarning``) are expected at the tiny
sample sizes some checks use and are silenced there. The checks themselves, one function per property, are in
:mod:`repsim_plugin._conformance`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from ._conformance import (
    RANDOM_ORTHOGONAL_PARAMS,
    ConformanceReport,
    Context,
    invariance_transforms,
    random_orthogonal,
    run_checks,
)
from ._utils.checks import SEED, Bool, Float, Instance, Int, Optional, check_params
from .errors import SmallSampleBiasWarning
from .measures import Measure, list_measures, make

#: The options of :func:`check_measure`.
CHECK_MEASURE_PARAMS = {
    "measure": Instance((Measure, str), "a Measure or a measure id / alias"),
    "n": Optional(Int(minimum=1)),
    "p": Int(minimum=1),
    "q": Int(minimum=1),
    "seed": SEED,
    "atol": Float(minimum=0),
    "rtol": Float(minimum=0),
    "trials": Int(minimum=1),
    "gradcheck_n": Optional(Int(minimum=1)),
    "raise_on_failure": Bool(),
    "strict": Bool(),
}


def check_measure(
    measure: Measure | str,
    *,
    n: int | None = None,
    p: int = 6,
    q: int = 5,
    seed: int = 0,
    atol: float = 1e-7,
    rtol: float = 1e-7,
    trials: int = 2,
    gradcheck_n: int | None = None,
    raise_on_failure: bool = True,
    strict: bool = False,
) -> ConformanceReport:
    """Verify numerically every property ``measure`` declares; raise ``AssertionError`` listing the failures.

    ``n`` defaults to ``max(60, 4 * min_samples)`` so that nearest-neighbour and CCA-type measures are well
    defined; ``trials`` random problems are drawn per check. ``strict=True`` also fails on properties that hold
    but are not declared (listed in ``report.notes`` otherwise).
    """
    options = check_params(
        CHECK_MEASURE_PARAMS,
        measure=measure,
        n=n,
        p=p,
        q=q,
        seed=seed,
        atol=atol,
        rtol=rtol,
        trials=trials,
        gradcheck_n=gradcheck_n,
        raise_on_failure=raise_on_failure,
        strict=strict,
    )
    m = make(measure) if isinstance(measure, str) else measure
    with warnings.catch_warnings():
        # the checks use small n on purpose; the small-sample bias warning is expected noise here
        warnings.simplefilter("ignore", SmallSampleBiasWarning)
        ctx = Context.draw(m, n, p, q, seed, options["atol"], options["rtol"], trials, gradcheck_n)
        report = run_checks(ctx)
    if strict:
        report.failures.update({name: f"holds but is not declared: {detail}" for name, detail in report.notes.items()})
    if raise_on_failure and not report.ok:
        raise AssertionError(str(report))
    return report


def check_all(pattern: str = "*", **kwargs: Any) -> dict[str, ConformanceReport]:
    """Run :func:`check_measure` over every registered measure matching ``pattern``; never raises."""
    return {mid: check_measure(mid, raise_on_failure=False, **kwargs) for mid in list_measures(pattern)}


def registered_ids(pattern: str = "*") -> Iterable[str]:
    """Registered ids, for ``pytest.mark.parametrize``."""
    return list_measures(pattern)


def assert_similar(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    inputs: Any,
    layers: Any,
    measure: str | Measure = "cka",
    min_similarity: float = 0.99,
    *,
    layers_b: Any = None,
    **capture_options: Any,
) -> dict[str, float]:
    """Assert that each layer of ``model_b`` still computes what the same layer of ``model_a`` does.

    For a refactor, a quantized or compiled model, an upgraded dependency: ``inputs`` (a batch or a list of
    batches) go through both models, ``layers`` (as in :func:`repsim_plugin.capture`; ``layers_b`` when model B
    names them differently) are compared position by position with ``measure``. Raises an ``AssertionError``
    whose first line names each layer below ``min_similarity`` and its value, followed by a per-layer table;
    returns ``{layer: similarity}`` otherwise. ``capture_options`` (``tokens=``, ``spatial=``, ``output=``, ...)
    go to the capture of both models.
    """
    from ._drift import layer_rows, per_layer, similarity_measure, verdict

    check_params({"min_similarity": Float()}, min_similarity=min_similarity)
    m = similarity_measure(measure)
    rows_a = layer_rows(model_a, inputs, layers, **capture_options)
    rows_b = layer_rows(model_b, inputs, layers if layers_b is None else layers_b, **capture_options)
    values = per_layer(m, rows_a, rows_b, list(rows_b))
    message = verdict(values, min_similarity, m.id, "model B against model A, per layer")
    if message is not None:
        raise AssertionError(message)
    return values


__all__ = [
    "CHECK_MEASURE_PARAMS",
    "RANDOM_ORTHOGONAL_PARAMS",
    "ConformanceReport",
    "assert_similar",
    "check_all",
    "check_measure",
    "invariance_transforms",
    "random_orthogonal",
    "registered_ids",
]
