"""Input matrices shared by every measure and accumulator: one place that turns bad data into a clear error."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import (
    DegenerateInputError,
    InputDtypeError,
    InputShapeError,
    NonFiniteInputError,
    TooFewSamplesError,
)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(X: Any, name: str = "X") -> torch.Tensor:
    """Return ``X`` as a torch tensor without copying when possible; reject what is not array data."""
    if isinstance(X, torch.Tensor):
        if X.is_meta:
            raise InputShapeError(
                f"{name} is on the meta device: it has a shape but no values. Run the model on a real device "
                "(load its weights first) and pass the activations it produced."
            )
        return X
    if isinstance(X, np.ndarray):
        if X.dtype.kind not in "f" or X.dtype.itemsize > 8:
            raise InputDtypeError(
                f"{name} is a numpy array of dtype {X.dtype}; similarity measures need floating-point "
                f"activations (float16 / float32 / float64). Convert it first, e.g. {name}.astype(np.float64)."
            )
        if not X.dtype.isnative:  # big-endian data from a file: torch reads native byte order only
            X = X.astype(X.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(X))
    raise InputDtypeError(
        f"{name} is a {type(X).__name__}; pass a torch.Tensor or a numpy array of shape (n_samples, n_features)."
    )


def check_matrix(X: Any, name: str = "X") -> torch.Tensor:
    """Check one representation: 2-D (n_samples, n_features), floating point, finite, non-empty."""
    X = as_tensor(X, name)
    if X.dtype not in _FLOAT_DTYPES:
        raise InputDtypeError(
            f"{name} has dtype {X.dtype}; similarity measures need floating-point activations. "
            f"Convert it first, e.g. {name}.double()."
        )
    if X.ndim != 2:
        hint = (
            f"reshape it to (n_samples, -1), e.g. {name}.reshape({name}.shape[0], -1), or pick a token / "
            "spatial reduction when capturing"
            if X.ndim > 2
            else f"a single feature needs shape (n_samples, 1): {name}.reshape(-1, 1)"
        )
        raise InputShapeError(
            f"{name} has shape {tuple(X.shape)} ({X.ndim}-D); measures take 2-D (n_samples, n_features) "
            f"matrices: {hint}."
        )
    if X.shape[1] == 0:
        raise InputShapeError(f"{name} has shape {tuple(X.shape)}: it has no features.")
    if X.numel() and _has_non_finite(X):
        finite = torch.isfinite(X)
        bad_rows = (~finite).any(dim=1).nonzero().flatten()
        n_nan = int(torch.isnan(X).sum())
        n_inf = int(torch.isinf(X).sum())
        raise NonFiniteInputError(
            f"{name} contains {n_nan} NaN and {n_inf} Inf values (first bad sample: row "
            f"{int(bad_rows[0])}, {bad_rows.numel()} bad rows in all). Find where they come from (an overflow "
            "in float16, a division by zero) or drop those samples from both inputs."
        )
    return X


def _has_non_finite(X: torch.Tensor) -> bool:
    """NaN or Inf anywhere shows in the extremes (min / max propagate NaN): one reduction, no (n, d) mask."""
    low, high = torch.aminmax(X.detach())
    return not bool(torch.isfinite(low) & torch.isfinite(high))


def check_not_constant(X: torch.Tensor, name: str = "X") -> None:
    """Raise when every feature of ``X`` takes a single value: the representation carries no information.

    The test is exact (max == min per column), so no tolerance can hide or invent a degenerate case.
    """
    if X.shape[0] > 0 and bool((X.amax(dim=0) == X.amin(dim=0)).all()):
        raise DegenerateInputError(
            f"{name} has zero variance: every sample has the same representation, so similarity is undefined. "
            "Check that the layer actually depends on the input (a dead ReLU layer, a constant input, a "
            "wrong output index)."
        )


def prepare_pair(
    X: Any,
    Y: Any,
    *,
    min_samples: int = 2,
    dtype: torch.dtype | None = torch.float64,
    allow_constant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of representations and cast them to the compute dtype.

    Rows must be the same samples in the same order. ``dtype=None`` keeps the inputs' dtype, promoting
    float16 / bfloat16 to float32 so no sum is accumulated in half precision.
    """
    X = check_matrix(X, "X")
    Y = check_matrix(Y, "Y")
    if X.device != Y.device:
        raise InputShapeError(f"X is on {X.device} and Y on {Y.device}; move both to one device, e.g. Y.to(X.device).")
    if X.shape[0] != Y.shape[0]:
        hint = ""
        if X.shape[1] == Y.shape[1] or X.shape[0] == Y.shape[1] or X.shape[1] == Y.shape[0]:
            hint = " If you passed (n_features, n_samples) matrices, transpose them: measures take rows as samples."
        raise InputShapeError(
            f"X has {X.shape[0]} samples (rows) and Y has {Y.shape[0]}; both must hold the same samples in the "
            f"same order.{hint}"
        )
    n = X.shape[0]
    if n < min_samples:
        raise TooFewSamplesError(f"got {n} samples; this measure needs at least {min_samples}. Capture more inputs.")
    if not allow_constant:
        check_not_constant(X, "X")
        check_not_constant(Y, "Y")
    target = dtype
    if target is None:
        target = torch.promote_types(torch.promote_types(X.dtype, Y.dtype), torch.float32)
    return X.to(target), Y.to(target)
