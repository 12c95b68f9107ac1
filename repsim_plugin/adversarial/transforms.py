"""The paper's analytic stress tests for linear CKA, as pure functions of (n, d) representations.

Davari et al. (ICLR 2023), "Reliability of CKA as a Similarity Measure in Deep Learning": translating a subset
of the samples (or a single sample) along one direction drives linear CKA between the original and the moved
representation to a limit that can be close to 0, and a classifier's logits need not change at all when the
direction is orthogonal to its normals (Corollary 4). These functions build such transformations and give CKA
under them in closed form, so that a CKA value can be put next to what a prediction-preserving change does to it.

Conventions, used by every function here:

* ``mask`` is a boolean vector of length n marking the rows that **move**; the other rows stay. The paper writes
  Theorem 1 with ``S``, the subset of fraction ``rho`` that stays, but CKA(c) for moving the rows of ``mask`` by
  ``c v`` equals CKA(-c) for moving the complement by ``c v`` (the two differ by a global translation, which
  CKA ignores), so the limit is the same whichever side moves; :func:`subset_translation_limit` is symmetric.
* ``direction`` is any non-zero vector of length d; it is normalised, so ``c`` is the distance moved.
* Everything is computed in float64. Inputs may be torch tensors or numpy arrays; outputs are torch tensors on
  the input's device. Inputs are never modified.
* The analytic functions centre X first (``X~ = X - mean``): every quantity of Theorem 1 (the subset mean,
  ``E||x||^2``, the participation ratio, the outlier ``x^``) is taken on the centred data.

Notation: ``u = 1_moved - (m / n) 1`` (the centred indicator of the m moved rows), ``a = X~^T u`` (the sum of the
moved rows of X~), ``s = ||u||^2 = m (n - m) / n``, ``G = X~^T X~``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._utils.inputs import check_matrix
from ..errors import DegenerateInputError, InputDtypeError, InputShapeError, RepsimError, UnknownNameError
from ..measures import make
from ..measures.kernels import center_columns
from ..measures.registry import unit_scale
from ._checks import analytic_data, as_data, as_direction, as_index, as_mask, as_scalar

__all__ = [
    "add_outlier",
    "invertible_linear",
    "logit_change",
    "outlier_limit",
    "participation_ratio",
    "scale_for_target_cka",
    "separability_preserving_direction",
    "subset_translation_cka",
    "subset_translation_limit",
    "translate_subset",
]

#: Largest condition number :func:`invertible_linear` accepts by default: beyond it, float64 cannot tell the map
#: from a singular one (inverting it loses more than 12 of the 16 significant digits).
MAX_CONDITION = 1e12

#: Lower bound on every component in the paper's QP (``v_i >= 0.1`` before normalising). The QP is homogeneous,
#: so its solution scales with this bound and the normalised direction does not depend on it.
_QP_LOWER_BOUND = 0.1
#: Tie-break of the QP: ``+ ridge ||v||^2`` selects the least-norm minimiser (see separability_preserving_direction).
_QP_RIDGE = 1e-10
#: A unit null vector counts as positive when every component exceeds this: the projection on the null space
#: leaves rounding noise of about 1e-15 where the QP solution sits on a face {v_i = 0}, which is not positivity.
_POSITIVE = 1e-9


def _gram_frobenius(Xc: torch.Tensor) -> torch.Tensor:
    """``||X~^T X~||_F = ||X~ X~^T||_F``, from whichever Gram matrix is smaller."""
    n, d = Xc.shape
    gram = Xc.T @ Xc if d <= n else Xc @ Xc.T
    return torch.linalg.matrix_norm(gram)


def _subset_statistics(X: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(X~, a, ||G||_F, s)`` of Theorem 1 for the rows of ``mask`` moving."""
    X = analytic_data(X)
    n = X.shape[0]
    moved = as_mask(mask, n, X.device)
    m = int(moved.sum())
    Xc = center_columns(X)
    u = moved.to(torch.float64) - m / n
    return Xc, Xc.T @ u, _gram_frobenius(Xc), m * (n - m) / n


# --- transformations ------------------------------------------------------------------------------------------


def translate_subset(X: Any, mask: Any, direction: Any, c: float) -> torch.Tensor:
    """Move the rows where ``mask`` is True by ``c * direction / ||direction||``; the other rows stay.

    This is the transformation of Theorem 1. Returns a new float64 (n, d) tensor; ``X`` is not modified.
    """
    X = as_data(X)
    moved = as_mask(mask, X.shape[0], X.device)
    v = as_direction(direction, X.shape[1], X.device)
    shift = as_scalar(c, "c") * v
    return X + moved.to(torch.float64)[:, None] * shift[None, :]


def add_outlier(X: Any, index: int, direction: Any, c: float) -> torch.Tensor:
    """Move the single row ``index`` by ``c * direction / ||direction||``: the paper's single-outlier case.

    Returns a new float64 (n, d) tensor; ``X`` is not modified.
    """
    X = as_data(X)
    i = as_index(index, X.shape[0])
    v = as_direction(direction, X.shape[1], X.device)
    out = X.clone()
    out[i] += as_scalar(c, "c") * v
    return out


def invertible_linear(X: Any, M: Any, *, max_condition: float = MAX_CONDITION) -> torch.Tensor:
    """``X @ M`` for an invertible (d, d) matrix ``M``: no information is lost, yet linear CKA is not invariant.

    Raises when ``M`` is not square of size d, or when its condition number exceeds ``max_condition`` (it is
    then singular to float64 precision and the map is not invertible in practice).
    """
    X = as_data(X)
    M = check_matrix(M, "M").to(device=X.device, dtype=torch.float64)
    d = X.shape[1]
    if M.shape != (d, d):
        raise InputShapeError(
            f"M has shape {tuple(M.shape)}; an invertible map of X's {d} features must be a square ({d}, {d}) matrix."
        )
    singular_values = torch.linalg.svdvals(M)
    smallest, largest = float(singular_values[-1]), float(singular_values[0])
    condition = math.inf if smallest == 0.0 else largest / smallest
    if condition > max_condition:
        raise DegenerateInputError(
            f"M is singular or nearly so (condition number {condition:.3g} > max_condition={max_condition:.3g}): "
            "it is not invertible in float64. Use a well-conditioned matrix, e.g. a random Gaussian one, or raise "
            "max_condition if you mean it."
        )
    return X @ M


# --- Theorem 1 in closed form ------------------------------------------------------------------------------------


def participation_ratio(X: Any) -> torch.Tensor:
    """``PR = (sum lambda_i)^2 / sum lambda_i^2`` over the eigenvalues of the centred covariance of X.

    Between 1 (all variance along one direction) and d (isotropic). Computed as ``tr(G)^2 / ||G||_F^2``.
    """
    Xc = center_columns(unit_scale(analytic_data(X)))  # scale-free: at unit scale nothing over- or underflows
    return Xc.square().sum().square() / _gram_frobenius(Xc).square()


def subset_translation_limit(X: Any, mask: Any) -> torch.Tensor:
    """Theorem 1's limit of linear CKA(X, translate_subset(X, mask, v, c)) as c -> infinity, for any unit v.

    Computed as ``||a||^2 / (s ||G||_F)``, the limit of :func:`subset_translation_cka`. It equals the paper's
    ``rho / (1 - rho) * ||mean of S||^2 / E||x||^2 * sqrt(PR(X))`` on centred X, with S either side of the mask
    and rho its fraction: ``a = m mu_moved = -(n - m) mu_stay``, ``s = m (n - m) / n``, and with lambda_i the
    eigenvalues of ``X~^T X~ / n``, ``||G||_F = n sqrt(sum lambda_i^2)`` while
    ``sqrt(PR) / E||x||^2 = 1 / sqrt(sum lambda_i^2)``. The value does not depend on the direction, and is
    the same whichever side of the mask moves.
    """
    _, a, gram_norm, s = _subset_statistics(unit_scale(as_data(X)), mask)  # scale-free, computed at unit scale
    return a.square().sum() / (s * gram_norm)


def subset_translation_cka(X: Any, mask: Any, direction: Any, c: Any) -> torch.Tensor:
    """Exact linear CKA(X, translate_subset(X, mask, direction, c)) without forming the moved data.

    ``CKA(c) = (||G||^2 + 2c a^T G v + c^2 ||a||^2) / (||G|| ||G + c(a v^T + v a^T) + c^2 s v v^T||)`` (Frobenius
    norms), expanded into polynomials in c and evaluated in powers of 1/c when |c| > 1 so that huge c neither
    overflows nor loses precision. ``c`` is a number (0-d result) or a 1-D sequence of numbers (1-D result).
    """
    Xc, a, gram_norm, s = _subset_statistics(X, mask)
    v = as_direction(direction, Xc.shape[1], Xc.device)
    try:
        cs = c if isinstance(c, torch.Tensor) else torch.as_tensor(np.asarray(c))
    except (TypeError, ValueError, RuntimeError):
        raise InputDtypeError(f"c must be a real number or a 1-D sequence of real numbers, got {c!r}.") from None
    if cs.dtype == torch.bool or cs.is_complex() or cs.ndim > 1:
        raise InputDtypeError(
            f"c must be a real number or a 1-D sequence of real numbers, got dtype {cs.dtype}, shape {tuple(cs.shape)}."
        )
    cs = cs.to(device=Xc.device, dtype=torch.float64)
    if not bool(torch.isfinite(cs).all()):
        raise DegenerateInputError("c must be finite; for c -> infinity use subset_translation_limit(X, mask).")
    Xa, Xv = Xc @ a, Xc @ v
    g2 = gram_norm.square()
    aGv, vGv, a2, av = Xa @ Xv, Xv @ Xv, a @ a, a @ v
    # N(c) = g2 + 2 aGv c + a2 c^2;  D(c)^2 = g2 + 4 aGv c + 2 (a2 + av^2 + s vGv) c^2 + 4 s av c^3 + s^2 c^4
    quad = 2.0 * (a2 + av.square() + s * vGv)
    large = cs.abs() > 1.0
    t = torch.where(large, 1.0 / torch.where(large, cs, torch.ones_like(cs)), cs)  # t = 1/c when |c| > 1 else c
    numerator_small = g2 + 2.0 * aGv * t + a2 * t.square()
    denominator_small = g2 + 4.0 * aGv * t + quad * t.square() + 4.0 * s * av * t.pow(3) + s * s * t.pow(4)
    numerator_large = g2 * t.square() + 2.0 * aGv * t + a2  # N / c^2
    denominator_large = g2 * t.pow(4) + 4.0 * aGv * t.pow(3) + quad * t.square() + 4.0 * s * av * t + s * s  # D^2/c^4
    numerator = torch.where(large, numerator_large, numerator_small)
    denominator_sq = torch.where(large, denominator_large, denominator_small)
    return numerator / (gram_norm * denominator_sq.sqrt())


def scale_for_target_cka(
    X: Any, mask: Any, direction: Any, target: float, *, max_scale: float = 1e8, grid: int = 4000
) -> float:
    """The smallest c > 0 with ``subset_translation_cka(X, mask, direction, c) <= target``, found on the closed form.

    ``c`` is searched on a log grid from ``1e-6`` to ``max_scale`` times the data's scale (``sqrt(E||x~||^2)``),
    then refined by bisection. Raises when CKA stays above ``target`` over that range (the reachable minimum and
    Theorem 1's limit are in the message).
    """
    target = as_scalar(target, "target")
    make("cka").check_target(target)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise RepsimError(f"grid must be an integer >= 2 (points of the log grid of c), got {grid!r}.")
    if not 1e-6 < as_scalar(max_scale, "max_scale") < math.inf:
        raise RepsimError(
            f"max_scale must be a finite number above 1e-6 (the grid runs from 1e-6 to max_scale times the data "
            f"scale), got {max_scale!r}."
        )
    X = analytic_data(X)
    scale = float(center_columns(X).square().sum(dim=1).mean().sqrt())
    cs = scale * torch.logspace(-6, math.log10(max_scale), grid, dtype=torch.float64)
    values = subset_translation_cka(X, mask, direction, cs)
    below = (values <= target).nonzero().flatten()
    if below.numel() == 0:
        limit = float(subset_translation_limit(X, mask))
        raise DegenerateInputError(
            f"moving these rows along this direction never brings linear CKA to {target:g}: its minimum over "
            f"c <= {max_scale:g} x the data scale is {float(values.min()):.4f} and Theorem 1's limit is {limit:.4f}. "
            "Move another subset: the limit is smaller for fewer rows, and for rows whose mean lies closer to the "
            "data mean."
        )
    first = int(below[0])
    if first == 0:
        return float(cs[0])
    low, high = float(cs[first - 1]), float(cs[first])  # CKA(low) > target >= CKA(high)
    for _ in range(100):
        mid = 0.5 * (low + high)
        if float(subset_translation_cka(X, mask, direction, mid)) <= target:
            high = mid
        else:
            low = mid
        if high - low <= 1e-12 * high:
            break
    return high


def outlier_limit(X: Any, index: int) -> torch.Tensor:
    """Limit of linear CKA(X, add_outlier(X, index, v, c)) as c -> infinity, for any unit v.

    The paper's ``||x^||^2 sqrt(PR(X)) / ((n - 1) E||x||^2)`` with ``x^`` the centred row ``index``; it is
    Theorem 1 with one moved row (``m = 1``), exactly: ``||a||^2 / (s ||G||_F)`` with ``a = x^``,
    ``s = (n - 1) / n``.
    """
    X = unit_scale(analytic_data(X))  # scale-free, computed at unit scale
    n = X.shape[0]
    i = as_index(index, n)
    if n < 2:
        raise DegenerateInputError("X has a single row; an outlier needs at least one other row that stays.")
    Xc = center_columns(X)
    mean_sq_norm = Xc.square().sum(dim=1).mean()
    return Xc[i].square().sum() * participation_ratio(X).sqrt() / ((n - 1) * mean_sq_norm)


# --- Corollary 4: keep a linear classifier's logits ---------------------------------------------------------------


def _classifier_weight(W: Any) -> torch.Tensor:
    if isinstance(W, torch.nn.Linear):
        W = W.weight.detach()
    return check_matrix(W, "W").to(torch.float64)


#: What :func:`separability_preserving_direction` keeps: every logit, or the softmax output (every logit may move
#: by the same amount, which changes neither the probabilities nor the predicted class).
KEEP_OPTIONS = ("logits", "probabilities")


def separability_preserving_direction(
    W: Any, nonneg: bool = True, *, keep: str = "logits", exact: bool = True
) -> torch.Tensor:
    """A unit direction v with ``W v = 0``: translating samples along it leaves every logit ``W h + b`` unchanged.

    ``W`` is a linear classifier's (k, d) weight matrix (rows are the class normals) or an ``nn.Linear``. This is
    the paper's Corollary 4: move one class (or any subset) by ``c v`` and the classifier cannot tell, while
    linear CKA goes to :func:`subset_translation_limit`.

    * ``nonneg=False``: the projection of the all-ones vector on the null space of W (any null vector if that
      projection vanishes). Raises when W has rank d (no direction is orthogonal to every normal).
    * ``nonneg=True`` (for post-ReLU layers, which must stay non-negative): the paper's QP, minimise
      ``||Q^T v||^2`` subject to ``v_i >= 0.1`` (Q an orthonormal basis of W's rows), solved exactly as a
      bound-constrained least-squares problem (``scipy.optimize.lsq_linear``, BVLS; a 1e-10 ridge picks the
      least-norm minimiser, as the QP alone can have an unbounded set of them), then projected on the null
      space of W and normalised. If a strictly positive vector lies in the null space, the result is one
      (every component > 0, ``W v`` zero to rounding). If none does (by Gordan's theorem: some combination of
      the rows is >= 0 in every feature, which trained heads do show), the QP optimum is positive and no
      non-negative translation keeps the logits: with ``exact=True`` this raises; with ``exact=False`` the QP's
      normalised solution is returned as in the paper, and :func:`logit_change` says how much the logits move.
    * ``keep="probabilities"`` asks only for ``W v = t 1`` (all logits move by the same t): softmax outputs and
      predictions stay exactly the same. It uses the rows minus their mean in place of W, and is feasible more
      often with ``nonneg=True``.
    """
    if keep not in KEEP_OPTIONS:
        raise UnknownNameError(f"keep must be one of {KEEP_OPTIONS}, got {keep!r}.")
    W = _classifier_weight(W)
    k, d = W.shape
    if keep == "probabilities":
        W = W - W.mean(dim=0, keepdim=True)
    _, singular_values, Vh = torch.linalg.svd(W, full_matrices=True)
    tolerance = float(singular_values[0]) * max(k, d) * torch.finfo(torch.float64).eps
    rank = int((singular_values > tolerance).sum())
    if rank == d:
        raise DegenerateInputError(
            f"W has shape ({k}, {d}) and rank {rank}: its rows span all {d} dimensions, so every direction changes "
            "some logit. A separability-preserving translation needs more features than independent class normals."
        )
    ones = torch.ones(d, dtype=torch.float64, device=W.device)
    if rank == 0:  # W = 0 (or constant rows with keep="probabilities"): every direction keeps the outputs
        return ones / math.sqrt(d)
    Q, null_basis = Vh[:rank].T, Vh[rank:].T  # orthonormal bases of the row space and of the null space
    if not nonneg:
        v = null_basis @ (null_basis.T @ ones)
        if float(torch.linalg.vector_norm(v)) <= 1e-8 * math.sqrt(d):  # ones lies in the row space: any null vector
            v = null_basis[:, 0]
        return v / torch.linalg.vector_norm(v)
    return _nonneg_null_direction(W, Q, keep=keep, exact=exact)


def _nonneg_null_direction(W: torch.Tensor, Q: torch.Tensor, *, keep: str, exact: bool) -> torch.Tensor:
    """The unit direction of the paper's QP for ``nonneg=True`` (Q: an orthonormal basis of W's rows); see
    :func:`separability_preserving_direction` for when it is exact and what ``exact=False`` returns."""
    k, d = W.shape
    rank = Q.shape[1]
    try:
        from scipy.optimize import lsq_linear
    except ModuleNotFoundError as error:  # pragma: no cover - scipy ships with the 'all' extra
        raise ModuleNotFoundError(
            "separability_preserving_direction(nonneg=True) solves a small QP with scipy; install it with "
            "`pip install scipy` (or `pip install repsim-plugin[all]`), or pass nonneg=False."
        ) from error
    Qt = Q.T.cpu().numpy()
    zeros = np.zeros(rank + d)

    def solve_qp(ridge: float) -> torch.Tensor:
        # min ||Q^T v||^2 + ridge ||v||^2 subject to v >= 0.1, as bound-constrained least squares
        A = np.vstack([Qt, math.sqrt(ridge) * np.eye(d)]) if ridge else Qt
        x = lsq_linear(A, zeros[: A.shape[0]], bounds=(_QP_LOWER_BOUND, np.inf), method="bvls").x
        return torch.from_numpy(x).to(device=W.device, dtype=torch.float64)

    # The QP's minimisers form an unbounded set when some v >= 0 with W v = 0 has zero components; the small
    # ridge picks the one of least norm (the most evenly positive direction). The plain QP decides feasibility
    # when the ridge's answer is too thin to survive the projection.
    for ridge in (_QP_RIDGE, 0.0):
        v_qp = solve_qp(ridge)
        v = v_qp - Q @ (Q.T @ v_qp)  # exact projection on the null space of W
        v = v / torch.linalg.vector_norm(v)
        if float(v.min()) > _POSITIVE:  # a strictly positive null vector: the outputs are kept exactly
            return v
    v_qp = solve_qp(_QP_RIDGE)
    residual = float(torch.linalg.vector_norm(Q.T @ v_qp) / torch.linalg.vector_norm(v_qp))
    if exact:
        other = "" if keep == "probabilities" else ", keep='probabilities' (softmax outputs kept exactly)"
        rows = "the rows of W minus their mean" if keep == "probabilities" else "every row of W"
        raise DegenerateInputError(
            f"no non-negative direction is orthogonal to {rows} ({k} x {d}): "
            f"the best one (the paper's QP) still has |Q^T v| = {residual:.3g} for |v| = 1, so translating along it "
            f"changes the {keep}. Pass exact=False to get that direction anyway (check logit_change(W, v, c))"
            f"{other}, or nonneg=False for an exactly orthogonal direction of mixed sign."
        )
    return v_qp / torch.linalg.vector_norm(v_qp)


def logit_change(W: Any, direction: Any, c: float = 1.0) -> torch.Tensor:
    """The change ``c W v / ||v||`` of every logit ``W h + b`` when a sample h moves by ``c v / ||v||`` (shape (k,)).

    It is the same for every sample: zero for a direction from :func:`separability_preserving_direction`, the same
    value in every entry with ``keep="probabilities"``.
    """
    W = _classifier_weight(W)
    return as_scalar(c, "c") * (W @ as_direction(direction, W.shape[1], W.device))
