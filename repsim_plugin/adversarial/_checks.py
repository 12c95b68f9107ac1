"""Argument checks of the analytic stress tests (:mod:`.transforms`): data, masks, directions, scalars, row indices.

Each returns the argument in the form the formulas use (float64, a unit direction, a bool mask on X's device) or
raises an error that names the problem and the fix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._utils.inputs import check_matrix, check_not_constant
from ..errors import DegenerateInputError, InputDtypeError, InputShapeError

__all__ = ["analytic_data", "as_data", "as_direction", "as_index", "as_mask", "as_scalar"]


def as_data(X: Any, name: str = "X") -> torch.Tensor:
    """A validated (n, d) matrix in float64 (a copy where the input was not float64)."""
    return check_matrix(X, name).to(torch.float64)


def analytic_data(X: Any) -> torch.Tensor:
    """Validated float64 X, rejecting a constant X (``G = 0``: CKA and the participation ratio are undefined)."""
    X = as_data(X)
    check_not_constant(X, "X")
    return X


def as_mask(mask: Any, n: int, device: torch.device) -> torch.Tensor:
    """A boolean vector of length n selecting a proper, non-empty subset of the rows."""
    if isinstance(mask, torch.Tensor):
        tensor = mask
    else:
        array = np.asarray(mask)
        if array.dtype != np.bool_:
            raise InputDtypeError(
                f"mask has dtype {array.dtype}; pass a boolean vector marking the rows that move, e.g. "
                "labels == 3, or build one from row indices: m = np.zeros(n, bool); m[indices] = True."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype != torch.bool:
        raise InputDtypeError(
            f"mask has dtype {tensor.dtype}; pass a boolean vector marking the rows that move, e.g. labels == 3, "
            "or build one from row indices: m = torch.zeros(n, dtype=torch.bool); m[indices] = True."
        )
    if tensor.ndim != 1 or tensor.shape[0] != n:
        raise InputShapeError(
            f"mask has shape {tuple(tensor.shape)}; it must be a boolean vector with one entry per row of X ({n})."
        )
    moved = int(tensor.sum())
    if moved == 0:
        raise DegenerateInputError("mask selects no row, so nothing moves; mark at least one row True.")
    if moved == n:
        raise DegenerateInputError(
            "mask selects every row: translating all of X is a global translation, which CKA ignores. "
            "Mark a proper subset of the rows (at least one row must stay)."
        )
    return tensor.to(device)


def as_direction(direction: Any, d: int, device: torch.device, name: str = "direction") -> torch.Tensor:
    """A unit float64 vector of length d."""
    try:
        v = torch.as_tensor(direction)
    except (TypeError, ValueError, RuntimeError):
        raise InputDtypeError(f"{name} must be a vector of {d} numbers, got {type(direction).__name__}.") from None
    if v.dtype == torch.bool or v.is_complex():
        raise InputDtypeError(f"{name} has dtype {v.dtype}; pass a real-valued vector of length {d}.")
    v = v.to(device=device, dtype=torch.float64)
    if v.ndim != 1 or v.shape[0] != d:
        raise InputShapeError(
            f"{name} has shape {tuple(v.shape)}; it must be a vector of length {d} (one entry per feature of X)."
        )
    if not bool(torch.isfinite(v).all()):
        raise DegenerateInputError(f"{name} contains NaN or Inf; pass a finite vector.")
    peak = v.abs().amax()
    if float(peak) == 0.0:
        raise DegenerateInputError(f"{name} is the zero vector, which has no direction; pass a non-zero vector.")
    v = v / peak  # first to unit scale: the norm of entries near 1e154 and above would overflow to inf
    return v / torch.linalg.vector_norm(v)


def as_scalar(value: Any, name: str) -> float:
    """A finite real number (bools and NaN / Inf rejected)."""
    if isinstance(value, bool):
        raise InputDtypeError(f"{name} must be a real number, got {value!r}.")
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputDtypeError(f"{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(out):
        raise DegenerateInputError(
            f"{name} must be finite, got {value!r}; for c -> infinity use the *_limit functions."
        )
    return out


def as_index(index: Any, n: int) -> int:
    """A row number of X in ``[0, n)``; negative indices count from the end, as in Python."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        if isinstance(index, torch.Tensor) and index.ndim == 0 and not index.is_floating_point():
            index = int(index)
        else:
            raise InputDtypeError(f"index must be an integer row number, got {index!r}.")
    index = int(index)
    if not -n <= index < n:
        raise InputShapeError(f"index {index} is out of range for X with {n} rows.")
    return index % n
