"""Canonical correlation analysis: mean CCA, mean squared CCA, SVCCA and PWCCA.

The canonical correlations of X (n, p) and Y (n, q) are the singular values of ``Ux^T Uy``, where ``Ux``, ``Uy``
are orthonormal bases of the column spaces of the column-centered data (Hotelling 1936; Björck & Golub 1973).
Working with the bases, never with ``(X~^T X~)^-1``, keeps the computation stable, and it handles
rank-deficient input (dead units, duplicated features, p > n) without a regulariser: CCA is taken on the space
the data actually span, whose numerical rank is decided like ``numpy.linalg.matrix_rank``
(singular values above ``s_max * max(n, p) * eps``). The number of canonical correlations is
``min(rank X~, rank Y~)``.

When ``rank X~ + rank Y~ > n - 1`` the two column spaces (inside the (n-1)-dimensional space of centered
vectors) are forced to intersect, and that many canonical correlations equal 1 whatever the data: once
``p >= n - 1`` every one of them does. :class:`TrivialCorrelationWarning` says so.

References: Hotelling 1936; Raghu et al. 2017 (SVCCA); Morcos et al. 2018 (PWCCA); Kornblith et al. 2019
(mean squared CCA, R^2_CCA).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .._utils.warnings import caller_stacklevel
from ..errors import DegenerateInputError, RepsimError, TrivialCorrelationWarning, UnknownNameError
from .kernels import center_columns
from .registry import Measure, Spec, register_family

# --- shared linear algebra ---------------------------------------------------------------------------------------


def _svd(A: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        return torch.linalg.svd(A, full_matrices=False)
    except torch.linalg.LinAlgError as exc:  # LAPACK did not converge: an ill-conditioned input, said clearly
        raise DegenerateInputError(
            f"the singular value decomposition of {what} did not converge ({exc}); the input is too "
            "ill-conditioned (huge dynamic range between features?). Standardise the features or drop "
            "near-duplicate ones."
        ) from None


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above ``s_max * max(shape) * eps`` (``numpy.linalg.matrix_rank``'s rule)."""
    s = singular_values.detach()
    if s.numel() == 0:
        return 0
    tol = s.max() * max(shape) * torch.finfo(s.dtype).eps
    return int((s > tol).sum())


def column_basis(X: torch.Tensor, name: str = "X") -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis ``U`` (n, r) of the column space of the centered ``X``, and its singular values (r,).

    ``r`` is the numerical rank, so null directions (constant or duplicated features) are dropped, not
    inverted. Differentiable where the singular values are distinct.
    """
    Xc = center_columns(X)
    U, S, _ = _svd(Xc, f"the centered {name}")
    r = numerical_rank(S, (Xc.shape[0], Xc.shape[1]))
    if r == 0:
        raise DegenerateInputError(f"{name} has zero variance after centering; similarity is undefined.")
    return U[:, :r], S[:r]


#: Said when two or more forced correlations tie at 1 and a measure's value depends on the canonical variates.
PWCCA_TIED = (
    " With two or more tied at 1, PWCCA's weights depend on which basis of the tied canonical variates the SVD "
    "returns, so its value is not determined by the data: a change at the level of rounding can move it (2e-4 "
    "for a 1e-12 shift of X at n = 10, ranks 8 / 4)."
)


def warn_if_trivial(n: int, rank_x: int, rank_y: int, what: str = "canonical correlations", *, tied: str = "") -> None:
    """Warn when the sample count forces ``rank_x + rank_y - (n - 1)`` correlations to 1; ``tied`` is added when
    two or more are forced (their canonical variates are then any basis of a shared subspace), and the warning's
    ``determined`` is then False."""
    forced = rank_x + rank_y - (n - 1)
    if forced > 0:
        total = min(rank_x, rank_y)
        undetermined = bool(tied) and min(forced, total) >= 2
        message = (
            f"with n={n} samples and ranks {rank_x} / {rank_y}, {min(forced, total)} of the {total} {what} "
            f"equal 1 whatever the data (rank X + rank Y > n - 1 = {n - 1}), so the value is inflated. "
            "Use more samples than features, or reduce the dimension first (e.g. make('svcca', dims=...))."
            + (tied if undetermined else "")
        )
        warnings.warn(TrivialCorrelationWarning(message, determined=not undetermined), stacklevel=caller_stacklevel())


def _correlations_from_bases(Ux: torch.Tensor, Uy: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.svdvals(Ux.T @ Uy)
    except torch.linalg.LinAlgError as exc:
        raise DegenerateInputError(f"the canonical correlations could not be computed ({exc}).") from None


def canonical_correlations(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Canonical correlations of (n, p) and (n, q) data, in decreasing order, ``min(rank X~, rank Y~)`` of them."""
    Ux, _ = column_basis(X, "X")
    Uy, _ = column_basis(Y, "Y")
    warn_if_trivial(X.shape[0], Ux.shape[1], Uy.shape[1])
    return _correlations_from_bases(Ux, Uy)


def mean_cca(X: torch.Tensor, Y: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
    """Mean canonical correlation, or (``squared=True``) mean squared canonical correlation (R^2_CCA).

    The squared version is ``||Ux^T Uy||_F^2 / min(r_x, r_y)``, smooth even where correlations coincide.
    """
    Ux, _ = column_basis(X, "X")
    Uy, _ = column_basis(Y, "Y")
    warn_if_trivial(X.shape[0], Ux.shape[1], Uy.shape[1])
    k = min(Ux.shape[1], Uy.shape[1])
    if squared:
        return (Ux.T @ Uy).square().sum() / k
    return _correlations_from_bases(Ux, Uy).sum() / k


def _leading_directions(
    U: torch.Tensor, S: torch.Tensor, keep: float | None, dims: int | None, name: str
) -> torch.Tensor:
    if dims is not None:
        if dims > U.shape[1]:
            raise DegenerateInputError(
                f"SVCCA was asked to keep {dims} directions of {name}, but {name} spans only {U.shape[1]} "
                f"(its numerical rank after centering). Pass dims <= {U.shape[1]}, or keep=<variance fraction>."
            )
        return U[:, :dims]
    assert keep is not None
    if keep >= 1.0:
        return U
    energy = S.detach().square()
    fraction = torch.cumsum(energy, 0) / energy.sum()
    k = int(torch.searchsorted(fraction, torch.tensor([keep], dtype=fraction.dtype, device=fraction.device))[0]) + 1
    return U[:, : min(k, U.shape[1])]


def svcca(X: torch.Tensor, Y: torch.Tensor, *, keep: float | None = 0.99, dims: int | None = None) -> torch.Tensor:
    """SVCCA (Raghu et al. 2017): keep the leading singular directions of each side, then mean CCA.

    ``keep``: the smallest number of directions whose variance reaches this fraction of the total (0.99 in
    the paper); or ``dims``: a fixed number of directions. Projecting X~ on its top directions spans the
    leading left singular vectors, so the canonical correlations are the singular values of ``Ux_k^T Uy_k``.
    """
    Ux, Sx = column_basis(X, "X")
    Uy, Sy = column_basis(Y, "Y")
    Ux = _leading_directions(Ux, Sx, keep, dims, "X")
    Uy = _leading_directions(Uy, Sy, keep, dims, "Y")
    warn_if_trivial(X.shape[0], Ux.shape[1], Uy.shape[1])
    k = min(Ux.shape[1], Uy.shape[1])
    return _correlations_from_bases(Ux, Uy).sum() / k


def _pwcca_weighted_by(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    Ua, _ = column_basis(A, "X")
    Ub, _ = column_basis(B, "Y")
    warn_if_trivial(A.shape[0], Ua.shape[1], Ub.shape[1], tied=PWCCA_TIED)
    left, rho, _ = _svd(Ua.T @ Ub, "the cross-basis matrix")
    variates = Ua @ left  # unit-norm canonical variates h_i of A, (n, k)
    weights = (variates.T @ center_columns(A)).abs().sum(dim=1)  # alpha_i = sum_j |<h_i, a_j>| over neurons j
    return (weights * rho).sum() / weights.sum()


def pwcca(X: torch.Tensor, Y: torch.Tensor, *, direction: str = "xy") -> torch.Tensor:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how much of one side's
    neurons each canonical variate accounts for.

    ``direction="xy"`` weights by X's neurons (``alpha_i = sum_j |<h_i, x~_j>|``, h_i X's unit canonical
    variates); ``"yx"`` by Y's. The original code picks the side with fewer neurons; here the choice is
    explicit and part of the id; ``"fewer"`` is that original rule (X's neurons when X has no more than Y).
    """
    if direction == "fewer":
        direction = "xy" if X.shape[1] <= Y.shape[1] else "yx"
    if direction == "xy":
        return _pwcca_weighted_by(X, Y)
    if direction == "yx":
        return _pwcca_weighted_by(Y, X)
    raise UnknownNameError(f"PWCCA direction must be 'xy', 'yx' or 'fewer', got {direction!r}.")


# --- registration ----------------------------------------------------------------------------------------------------

_LINEAR_INVARIANCES = frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation", "invertible_linear"})
_HOTELLING = "Hotelling 1936, Relations between two sets of variates (Biometrika)"


def _reject_unknown(family: str, params: dict[str, Any], accepted: str) -> None:
    if params:
        raise RepsimError(f"{family} takes no parameter(s) {sorted(params)}; it accepts {accepted}.")


def build_cca(params: dict[str, Any]) -> Measure:
    """Family builder for ``cca-mean=r-score`` (mean CCA) and ``cca-mean=r2-score`` (mean squared CCA)."""
    params = dict(params)
    mean = params.pop("mean", None)
    squared = params.pop("squared", None)
    if squared is not None:
        if not isinstance(squared, bool) and squared not in ("true", "false"):
            raise RepsimError(f"squared must be True or False, got {squared!r}.")
        wanted = "r2" if squared in (True, "true") else "r"
        if mean is not None and mean != wanted:
            raise RepsimError(f"mean={mean!r} contradicts squared={squared!r}; give one of them.")
        mean = wanted
    mean = mean or "r"
    if mean not in ("r", "r2"):
        raise UnknownNameError(f"cca mean must be 'r' (mean correlation) or 'r2' (mean squared), got {mean!r}.")
    _reject_unknown("cca", params, "mean ('r' or 'r2') or squared (True / False)")
    is_squared = mean == "r2"

    def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return mean_cca(X, Y, squared=is_squared)

    return Measure(
        fn=fn,
        spec=Spec("cca", (("mean", mean),), "score"),
        larger_is_more_similar=True,
        symmetric=True,
        invariances=_LINEAR_INVARIANCES,
        differentiable=True,
        min_samples=2,
        reference=_HOTELLING + ("; Kornblith et al. 2019 (R^2_CCA)" if is_squared else "; Raghu et al. 2017"),
        description="mean squared canonical correlation" if is_squared else "mean canonical correlation",
        value_range=(0.0, 1.0),
        self_value=1.0,
        params={"mean": mean},
    )


def build_svcca(params: dict[str, Any]) -> Measure:
    """Family builder for ``svcca-keep=0.99-score`` (variance fraction) and ``svcca-dims=10-score``."""
    params = dict(params)
    keep, dims = params.pop("keep", None), params.pop("dims", None)
    _reject_unknown("svcca", params, "keep (variance fraction in (0, 1]) or dims (number of directions)")
    if keep is not None and dims is not None:
        raise RepsimError("give svcca either keep= (variance fraction) or dims= (number of directions), not both.")
    if dims is not None:
        try:
            dims_int = int(dims)
        except (TypeError, ValueError):
            raise RepsimError(f"dims must be a positive integer, got {dims!r}.") from None
        if isinstance(dims, bool) or dims_int < 1 or str(dims_int) != str(dims).strip():
            raise RepsimError(f"dims must be a positive integer, got {dims!r}.")
        key, value, keep_f = "dims", float(dims_int), None
        value_out: float | int = dims_int
    else:
        try:
            keep_f = float(0.99 if keep is None else keep)
        except (TypeError, ValueError):
            raise RepsimError(f"keep must be a number in (0, 1], got {keep!r}.") from None
        if not (0.0 < keep_f <= 1.0):
            raise RepsimError(f"keep must be a variance fraction in (0, 1], got {keep!r}.")
        key, value, dims_int = "keep", keep_f, None
        value_out = keep_f
    invariances = {"orthogonal", "isotropic_scaling", "translation", "permutation"}
    if keep_f == 1.0:  # nothing dropped: plain mean CCA on the column spaces
        invariances.add("invertible_linear")

    def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return svcca(X, Y, keep=keep_f, dims=dims_int)

    what = f"{dims_int} leading directions" if dims_int else f"directions holding {keep_f:.0%} of the variance"
    return Measure(
        fn=fn,
        spec=Spec("svcca", ((key, value_out),), "score"),
        larger_is_more_similar=True,
        symmetric=True,
        invariances=frozenset(invariances),
        differentiable=True,
        min_samples=2,
        reference="Raghu et al. 2017, SVCCA (NeurIPS)",
        description=f"SVCCA: mean CCA of the {what} of each side",
        value_range=(0.0, 1.0),
        self_value=1.0,
        params={key: value},
    )


def build_pwcca(params: dict[str, Any]) -> Measure:
    """Family builder for ``pwcca-direction=xy-score`` (weights from X) and ``pwcca-direction=yx-score``."""
    params = dict(params)
    direction = params.pop("direction", "xy")
    _reject_unknown("pwcca", params, "direction ('xy': weights from X's neurons, 'yx': Y's, 'fewer': the smaller side)")
    if direction not in ("xy", "yx", "fewer"):
        raise UnknownNameError(f"PWCCA direction must be 'xy', 'yx' or 'fewer', got {direction!r}.")

    def fn(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return pwcca(X, Y, direction=direction)

    side = {"xy": "X", "yx": "Y", "fewer": "the side with fewer"}[direction]
    return Measure(
        fn=fn,
        spec=Spec("pwcca", (("direction", direction),), "score"),
        larger_is_more_similar=True,
        symmetric=False,
        invariances=frozenset({"isotropic_scaling", "translation", "permutation"}),
        differentiable=True,
        min_samples=2,
        reference="Morcos et al. 2018, Insights on representational similarity ... with CCA (NeurIPS)",
        description=f"projection-weighted CCA, weights from {side}'s neurons",
        value_range=(0.0, 1.0),
        self_value=1.0,
        params={"direction": direction},
    )


register_family(
    "cca",
    build_cca,
    variants=[{"mean": "r"}, {"mean": "r2"}],
    aliases={"cca": {"mean": "r"}, "mean_cca": {"mean": "r"}, "mean_sq_cca": {"mean": "r2"}},
    replaces={"squared": ("mean",)},
)
register_family(
    "svcca",
    build_svcca,
    variants=[{"keep": 0.99}],
    aliases={"svcca": {"keep": 0.99}},
    replaces={"dims": ("keep",), "keep": ("dims",)},
)
register_family(
    "pwcca",
    build_pwcca,
    variants=[{"direction": "xy"}, {"direction": "yx"}],
    aliases={"pwcca": {"direction": "xy"}},
)

__all__ = [
    "TrivialCorrelationWarning",
    "canonical_correlations",
    "column_basis",
    "mean_cca",
    "numerical_rank",
    "pwcca",
    "svcca",
    "warn_if_trivial",
]
