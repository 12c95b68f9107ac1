"""Orthogonal Procrustes and the generalized shape metrics of Williams et al. (2021).

Procrustes: ``min_Q ||X~ - Y~ Q||_F`` over orthogonal Q. Its square is
``||X~||^2 + ||Y~||^2 - 2 ||X~^T Y~||_*`` (nuclear norm); with unit-norm inputs the angle between the aligned
representations is ``arccos(||X~^T Y~||_* / (||X~|| ||Y~||))``. When p != q the smaller side is zero-padded
(implicitly: the optimal map is a partial isometry), as in Williams et al.

Numerics: the distance is evaluated as the norm of the aligned residual ``X~ - Y~ Q*`` with ``Q*`` from an SVD,
not through ``a^2 + b^2 - 2c`` (which cancels catastrophically for near-identical inputs), and the angle as
``2 arcsin(||residual|| / 2)`` of the unit-norm inputs, which needs no clamping. ``Q*`` is held fixed for
autograd: at the optimum the derivative with respect to Q vanishes (envelope theorem), so the gradient is
exact and no SVD backward (unstable near repeated singular values) is involved.

Shape metrics: each representation is first mapped by the partial whitening ``phi_alpha`` and the Procrustes
distance (angular or euclidean) between the images is a true metric for every ``alpha`` in [0, 1].
With ``X~ = U S V^T`` (rank r, ``mu`` = mean of the non-zero eigenvalues ``s_i^2``):
``phi_alpha(X) = U diag(alpha s_i + (1 - alpha) sqrt(mu))``, rescaled to keep ``||X~||_F``. This is
``X~ (alpha I + (1 - alpha) C^{-1/2})`` with the covariance C normalised to mean eigenvalue 1 (the trailing
``V^T`` does not change any Procrustes distance). ``alpha = 1`` is Procrustes, ``alpha = 0`` whitens fully
(CCA-like: the angular distance is then ``arccos`` of the summed canonical correlations over
``sqrt(r_x r_y)``). Deviation from netrep, noted on purpose: netrep mixes ``alpha I`` with ``(X^T X)^{-1/2}`` of
the raw scale, which makes its angular metric depend on the overall scale of the data for 0 < alpha < 1;
normalising C first keeps every angular shape metric invariant to isotropic scaling. Both agree at alpha = 0
and alpha = 1.

References: Schönemann 1966; Ding et al. 2021 (Procrustes for representations); Williams et al. 2021,
Generalized Shape Metrics on Neural Representations (NeurIPS).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import DegenerateInputError, RepsimError, UnknownNameError
from .cca import column_basis
from .kernels import center_columns, warn_full_rank
from .registry import Measure, Spec, register_family

DISTANCES = ("euclidean", "angular")


def _check_not_zero(norm: torch.Tensor, name: str) -> None:
    if not bool(norm > 0):
        raise DegenerateInputError(f"{name} has zero variance after centering; Procrustes alignment is undefined.")


def aligned_residual(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``min ||A - B Q||_F`` over orthogonal Q (the narrower side zero-padded), as the norm of the residual."""
    M = (A.T @ B).detach()
    try:
        U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    except torch.linalg.LinAlgError as exc:
        raise DegenerateInputError(f"the Procrustes alignment did not converge ({exc}).") from None
    if A.shape[1] >= B.shape[1]:
        return torch.linalg.norm(A - B @ (Vh.T @ U.T))  # B's side is square-orthogonal: ||B Q|| = ||B||
    return torch.linalg.norm(A @ (U @ Vh) - B)


def _chord(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Aligned residual of the unit-norm representations; in [0, sqrt(2)] since the nuclear norm is >= 0."""
    na, nb = torch.linalg.norm(A), torch.linalg.norm(B)
    _check_not_zero(na, "X")
    _check_not_zero(nb, "Y")
    return aligned_residual(A / na, B / nb)


def _angle(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.asin(_chord(A, B) / 2.0)


def _warn_full_rank(X: torch.Tensor, Y: torch.Tensor, what: str = "Procrustes") -> None:
    advice = "Use more samples than features (or reduce the features first, e.g. PCA to fewer than n dimensions)."
    warn_full_rank(X.shape[0], X.shape[1], Y.shape[1], what, advice)


def procrustes_distance(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``min_Q ||X~ - Y~ Q||_F`` over orthogonal Q: a metric, in the units of the data (not scale invariant)."""
    _warn_full_rank(X, Y)
    return aligned_residual(center_columns(X), center_columns(Y))


def procrustes_angle(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``arccos(||X~^T Y~||_* / (||X~|| ||Y~||))`` in radians, in [0, pi/2]: a metric, scale invariant."""
    _warn_full_rank(X, Y)
    return _angle(center_columns(X), center_columns(Y))


def procrustes_similarity(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Normalised Procrustes similarity ``||X~^T Y~||_* / (||X~||_F ||Y~||_F)`` in [0, 1] (cosine of the angle)."""
    _warn_full_rank(X, Y)
    return 1.0 - _chord(center_columns(X), center_columns(Y)).square() / 2.0  # = cos(angle)


def partial_whiten(X: torch.Tensor, alpha: float, name: str = "X") -> torch.Tensor:
    """``phi_alpha(X)``: the partially whitened representation (n, rank), same Frobenius norm as ``X~``.

    Equal to ``X~`` up to a rotation of the features at ``alpha = 1`` (then ``X~`` itself is returned).
    """
    Xc = center_columns(X)
    if alpha == 1.0:
        return Xc
    U, S = column_basis(X, name)
    mu = S.square().mean()
    scaled = U * (alpha * S + (1.0 - alpha) * torch.sqrt(mu))
    return scaled * (torch.linalg.norm(Xc) / torch.linalg.norm(scaled))


def shape_distance(X: torch.Tensor, Y: torch.Tensor, *, alpha: float = 1.0, distance: str = "angular") -> torch.Tensor:
    """Williams et al. (2021) shape metric: Procrustes distance between ``phi_alpha(X)`` and ``phi_alpha(Y)``."""
    if not 0.0 <= alpha <= 1.0:
        raise RepsimError(f"alpha must lie in [0, 1], got {alpha!r}.")
    _warn_full_rank(X, Y, f"the shape metric (alpha={alpha})")
    A, B = partial_whiten(X, alpha, "X"), partial_whiten(Y, alpha, "Y")
    if distance == "angular":
        return _angle(A, B)
    if distance == "euclidean":
        return aligned_residual(A, B)
    raise UnknownNameError(f"distance must be one of {DISTANCES}, got {distance!r}.")


# --- registration ----------------------------------------------------------------------------------------------------

_ROTATION_INVARIANCES = frozenset({"orthogonal", "translation", "permutation"})
_REFERENCE = "Ding et al. 2021, Grounding representation similarity ...; Williams et al. 2021 (NeurIPS)"


def _distance_measure(fn: Any, spec: Spec, distance: str, description: str, **extra: Any) -> Measure:
    angular = distance == "angular"
    invariances = set(_ROTATION_INVARIANCES) | ({"isotropic_scaling"} if angular else set())
    invariances |= set(extra.pop("more_invariances", ()))
    return Measure(
        fn=fn,
        spec=spec,
        larger_is_more_similar=False,
        symmetric=True,
        is_metric=True,
        invariances=frozenset(invariances),
        differentiable=True,
        min_samples=2,
        reference=_REFERENCE,
        description=description,
        value_range=(0.0, math.pi / 2) if angular else (0.0, None),
        self_value=0.0,
        **extra,
    )


def build_procrustes(params: dict[str, Any]) -> Measure:
    """Family builder: ``procrustes-score`` (similarity), ``procrustes-distance=euclidean|angular``."""
    params = dict(params)
    distance = params.pop("distance", None)
    if params:
        raise RepsimError(f"procrustes takes no parameter(s) {sorted(params)}; it accepts distance=euclidean|angular.")
    if distance is None:
        return Measure(
            fn=procrustes_similarity,
            spec=Spec("procrustes", (), "score"),
            larger_is_more_similar=True,
            symmetric=True,
            invariances=_ROTATION_INVARIANCES | {"isotropic_scaling"},
            differentiable=True,
            min_samples=2,
            reference=_REFERENCE,
            description="normalised orthogonal Procrustes similarity ||X~^T Y~||_* / (||X~|| ||Y~||)",
            value_range=(0.0, 1.0),
            self_value=1.0,
            params={},
        )
    if distance not in DISTANCES:
        raise UnknownNameError(f"procrustes distance must be one of {DISTANCES}, got {distance!r}.")
    fn = procrustes_angle if distance == "angular" else procrustes_distance
    text = "angle arccos(||X~^T Y~||_* / norms)" if distance == "angular" else "distance min_Q ||X~ - Y~ Q||_F"
    return _distance_measure(
        fn,
        Spec("procrustes", (("distance", distance),)),
        distance,
        f"orthogonal Procrustes {text}",
        params={"distance": distance},
    )


def build_shape_metric(params: dict[str, Any]) -> Measure:
    """Family builder for ``shape_metric-alpha=0.5-distance=angular`` (alpha in [0, 1], angular | euclidean)."""
    params = dict(params)
    alpha, distance = params.pop("alpha", 1.0), params.pop("distance", "angular")
    if params:
        raise RepsimError(f"shape_metric takes no parameter(s) {sorted(params)}; it accepts alpha and distance.")
    try:
        alpha_f = float(alpha)
    except (TypeError, ValueError):
        raise RepsimError(f"alpha must be a number in [0, 1], got {alpha!r}.") from None
    if isinstance(alpha, bool) or not 0.0 <= alpha_f <= 1.0:
        raise RepsimError(f"alpha must be a number in [0, 1] (1: rotations only, 0: full whitening), got {alpha!r}.")
    if distance not in DISTANCES:
        raise UnknownNameError(f"shape_metric distance must be one of {DISTANCES}, got {distance!r}.")

    def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return shape_distance(X, Y, alpha=alpha_f, distance=distance)

    # fully whitened + angle: depends on the column spaces only, so any invertible linear map leaves it unchanged
    more = {"invertible_linear"} if (alpha_f == 0.0 and distance == "angular") else set()
    return _distance_measure(
        fn,
        Spec("shape_metric", (("alpha", alpha_f), ("distance", distance))),
        distance,
        f"shape metric (Williams et al. 2021), partial whitening alpha={alpha_f}, {distance} distance",
        more_invariances=more,
        params={"alpha": alpha_f, "distance": distance},
    )


register_family(
    "procrustes",
    build_procrustes,
    variants=[{}, {"distance": "euclidean"}, {"distance": "angular"}],
    aliases={"procrustes": {}, "procrustes_distance": {"distance": "euclidean"}},
)
register_family(
    "shape_metric",
    build_shape_metric,
    variants=[{"alpha": a, "distance": d} for a in (0.0, 0.5, 1.0) for d in DISTANCES],
    aliases={"shape_metric": {"alpha": 0.5, "distance": "angular"}},
)

__all__ = [
    "aligned_residual",
    "partial_whiten",
    "procrustes_angle",
    "procrustes_distance",
    "procrustes_similarity",
    "shape_distance",
]
