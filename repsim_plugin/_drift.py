"""Shared machinery of ``testing.assert_similar`` and the pytest snapshot plugin: rows of chosen layers for a few
input batches, and the per-layer verdict against a threshold, rendered as a short first line plus a table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .capture import capture
from .errors import RepsimError
from .measures import Measure, make

__all__ = ["as_batches", "layer_rows", "layer_rows_and_policy", "per_layer", "similarity_measure", "verdict"]


def as_batches(inputs: Any) -> list[Any]:
    """One batch (a tensor, a dict of keyword arguments, a tuple) or a list of batches, as a list of batches."""
    if isinstance(inputs, torch.Tensor | Mapping | tuple):
        return [inputs]
    if isinstance(inputs, Iterable) and not isinstance(inputs, str | bytes):
        batches = list(inputs)
        if not batches:
            raise RepsimError("inputs holds no batch: pass a tensor, a dict of model inputs, or a list of batches.")
        return batches
    raise RepsimError(
        "inputs must be a batch (tensor, dict of model inputs, tuple) or a list of batches, "
        f"got {type(inputs).__name__}."
    )


def layer_rows(model: nn.Module, inputs: Any, layers: Any, **capture_options: Any) -> dict[str, torch.Tensor]:
    """``{layer: (n, d) float64 rows}`` of ``layers`` of ``model`` over the batches of ``inputs`` (hooks removed)."""
    return layer_rows_and_policy(model, inputs, layers, **capture_options)[0]


def layer_rows_and_policy(
    model: nn.Module, inputs: Any, layers: Any, **capture_options: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`layer_rows` and the capture's reduction policy (plain data, for provenance)."""
    with capture(model, layers, **capture_options) as rec:
        for batch in as_batches(inputs):
            rec.forward(batch)
    rows = {name: rows.detach().to(torch.float64).cpu() for name, rows in rec.activations.items()}
    return rows, dict(rec.policy)


def similarity_measure(measure: str | Measure) -> Measure:
    """The measure, refused when it is a distance (a ``min_similarity`` threshold needs larger = more similar)."""
    m = make(measure)
    if not m.larger_is_more_similar:
        raise RepsimError(
            f"{m.id} is a distance (lower = more similar), so min_similarity= has no meaning for it; use a score "
            "such as 'cka', 'debiased_cka', 'svcca' or 'procrustes'."
        )
    return m


def per_layer(
    m: Measure, rows_a: Mapping[str, torch.Tensor], rows_b: Mapping[str, torch.Tensor], names_b: Sequence[str]
) -> dict[str, float]:
    """Similarity of each layer of ``rows_a`` with the layer of ``rows_b`` at the same position."""
    names_a = list(rows_a)
    if len(names_a) != len(names_b):
        raise RepsimError(
            f"the layer selections differ in length ({len(names_a)}: {names_a} vs {len(names_b)}: {list(names_b)}); "
            "give layers that resolve to the same number of modules in both models."
        )
    return {a: float(m(rows_a[a], rows_b[b]).detach()) for a, b in zip(names_a, names_b, strict=True)}


def verdict(values: Mapping[str, float], min_similarity: float, measure_id: str, what: str) -> str | None:
    """None when every layer reaches ``min_similarity``; otherwise the failure message.

    Its first line names the drifted layers and their values; a per-layer table follows.
    """
    drifted = {name: v for name, v in values.items() if not v >= min_similarity}
    if not drifted:
        return None
    listed = ", ".join(f"{name} ({v:.4f})" for name, v in drifted.items())
    width = max(len("layer"), *(len(name) for name in values))
    lines = [
        f"{len(drifted)} of {len(values)} layers below {measure_id} >= {min_similarity}: {listed}",
        f"{what}:",
        f"  {'layer'.ljust(width)}  {'similarity':>10}  status",
    ]
    for name, v in values.items():
        lines.append(f"  {name.ljust(width)}  {v:>10.6f}  {'DRIFTED' if name in drifted else 'ok'}")
    return "\n".join(lines)
