"""Linear regression R^2: how much of one representation a linear map of the other explains (asymmetric).

``linreg-direction=xy-r2`` regresses Y on X (X predicts Y) by least squares with an intercept and reports the
variance-weighted R^2, ``1 - ||Y~ - X~ B||_F^2 / ||Y~||_F^2 = ||P_X Y~||_F^2 / ||Y~||_F^2``, where ``P_X``
projects on the column space of the centered X (scikit-learn's ``r2_score(..., multioutput='variance_weighted')``
of a ``LinearRegression`` fit in-sample). ``direction=yx`` swaps the roles.

The projection uses an orthonormal basis of X~'s column space, so rank-deficient predictors (dead units,
p > n) need no regulariser: the minimum-norm least-squares fit is used. This is an in-sample fit: once the
predictor's rank reaches n - 1 it explains everything (R^2 = 1), which :class:`TrivialCorrelationWarning` flags.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .._utils.warnings import caller_stacklevel
from ..errors import RepsimError, TrivialCorrelationWarning, UnknownNameError
from .cca import column_basis
from .kernels import center_columns
from .registry import Measure, Spec, register_family


def linear_r2(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """In-sample R^2 of the least-squares regression of Y on X (with intercept), variance weighted."""
    Ux, _ = column_basis(X, "X")
    Yc = center_columns(Y)
    n, rank = X.shape[0], Ux.shape[1]
    if rank >= n - 1:
        warnings.warn(
            f"the predictor spans all n - 1 = {n - 1} centered directions (rank {rank}), so any target is fit "
            "exactly and R^2 = 1 whatever the data. Use more samples than features, or reduce the dimension first.",
            TrivialCorrelationWarning,
            stacklevel=caller_stacklevel(),
        )
    return (Ux.T @ Yc).square().sum() / Yc.square().sum()


def build_linreg(params: dict[str, Any]) -> Measure:
    """Family builder for ``linreg-direction=xy-r2`` (X predicts Y) and ``linreg-direction=yx-r2``."""
    params = dict(params)
    direction = params.pop("direction", "xy")
    if params:
        raise RepsimError(f"linreg takes no parameter(s) {sorted(params)}; it accepts direction='xy' or 'yx'.")
    if direction not in ("xy", "yx"):
        raise UnknownNameError(f"linreg direction must be 'xy' (X predicts Y) or 'yx', got {direction!r}.")

    if direction == "xy":

        def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            return linear_r2(X, Y)

    else:

        def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            return linear_r2(Y, X)

    source, target = ("X", "Y") if direction == "xy" else ("Y", "X")
    return Measure(
        fn=fn,
        spec=Spec("linreg", (("direction", direction),), "r2"),
        larger_is_more_similar=True,
        symmetric=False,
        # invertible linear maps of the predictor leave R^2 unchanged, but not of the target, so that
        # invariance is not declared (the harness requires it on both sides)
        invariances=frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation"}),
        differentiable=True,
        min_samples=2,
        reference="least-squares linear regression; e.g. Kornblith et al. 2019 (linear regression baseline)",
        description=f"R^2 of the linear regression of {target} on {source} (in-sample, variance weighted)",
        value_range=(0.0, 1.0),
        self_value=1.0,
        params={"direction": direction},
    )


register_family(
    "linreg",
    build_linreg,
    variants=[{"direction": "xy"}, {"direction": "yx"}],
    aliases={"linreg": {"direction": "xy"}},
)

__all__ = ["build_linreg", "linear_r2"]
