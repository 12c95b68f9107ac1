"""The fields of a :class:`~repsim_plugin.results.SimilarityMap`: checks that turn user input into what a map holds.

Matrices become CPU float64 copies of the right shape with finite values only, layer names a list of distinct
strings, metadata plain JSON data; the optional statistics (intervals, their level, p- / q-values) are checked
against what they mean. :func:`matrix_to_json` is the inverse direction, used when a map is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InputDtypeError, InputShapeError, NonFiniteInputError, RepsimError


def as_matrix(value: Any, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """``value`` as a finite CPU float64 (La, Lb) matrix of ``shape`` (a copy); ``name`` is used in errors."""
    if (isinstance(value, torch.Tensor) and value.dtype == torch.bool) or (
        isinstance(value, np.ndarray) and value.dtype == np.bool_
    ):
        raise InputDtypeError(f"{name} is a boolean matrix; a similarity map holds numbers (e.g. values.double()).")
    try:
        t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputShapeError(f"{name} must be a (La, Lb) matrix of numbers: {err}") from None
    t = t.cpu().clone()
    if t.ndim != 2 or tuple(t.shape) != shape:
        raise InputShapeError(
            f"{name} has shape {tuple(t.shape)}, but there are {shape[0]} layers_a and {shape[1]} layers_b: it must "
            f"be {shape} (rows = layers_a, columns = layers_b)."
        )
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise NonFiniteInputError(
            f"{name} contains NaN or Inf (first at row {bad[0]}, column {bad[1]}); a similarity map holds finite "
            "values only: find the failing layer pair instead of storing a placeholder."
        )
    return t


def layer_names(names: Any, side: str) -> list[str]:
    """The layer names of one side (``"a"`` or ``"b"``): a non-empty list of distinct strings."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InputShapeError(f"layers_{side} must be a list of layer names, got {type(names).__name__}.")
    out = []
    for name in names:
        if not isinstance(name, str):
            raise InputShapeError(f"layers_{side} must hold strings, got {name!r} ({type(name).__name__}).")
        out.append(name)
    dup = sorted({n for n in out if out.count(n) > 1})
    if dup:
        raise InputShapeError(f"layers_{side} has duplicate names {dup}; each row / column needs its own name.")
    if not out:
        raise InputShapeError(f"layers_{side} is empty; a map needs at least one layer per side.")
    return out


def json_ready(value: Any, where: str) -> Any:
    """Check that a metadata value survives JSON exactly (no NaN, no arbitrary objects)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NonFiniteInputError(f"{where} is {value}; JSON metadata must be finite.")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RepsimError(f"{where} has a non-string key {k!r}; JSON object keys are strings.")
            out[k] = json_ready(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise RepsimError(
        f"{where} is a {type(value).__name__}; metadata must be JSON data (str, int, float, bool, None, lists, dicts)."
    )


def matrix_to_json(t: torch.Tensor) -> list[list[float]]:
    """A matrix as nested lists of floats (each finite float64 round-trips through JSON to the same bits)."""
    return [[float(v) for v in row] for row in t.tolist()]


def interval_pair(intervals: Any, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(low, high)`` pair of matrices shaped like the values, with no low bound above its high bound."""
    if not isinstance(intervals, (tuple, list)) or len(intervals) != 2:
        raise InputShapeError("intervals must be a (low, high) pair of matrices shaped like values.")
    low = as_matrix(intervals[0], "intervals[0] (low)", shape)
    high = as_matrix(intervals[1], "intervals[1] (high)", shape)
    if bool((low > high).any()):
        raise RepsimError("intervals: some low bounds exceed their high bounds; pass (low, high) in order.")
    return (low, high)


def confidence_level(level: Any) -> float:
    """The level of the intervals as a float in (0, 1)."""
    if isinstance(level, bool) or not isinstance(level, int | float):
        raise RepsimError(f"interval_level must be a number in (0, 1), e.g. 0.95, got {level!r}.")
    value = float(level)
    if not 0.0 < value < 1.0:
        raise RepsimError(f"interval_level must lie in (0, 1), e.g. 0.95, got {level!r}.")
    return value


def probability_matrix(value: Any, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A matrix of probabilities (p- or q-values): :func:`as_matrix`, every entry in [0, 1]."""
    t = as_matrix(value, name, shape)
    if bool(((t < 0) | (t > 1)).any()):
        raise RepsimError(f"{name} must lie in [0, 1].")
    return t
