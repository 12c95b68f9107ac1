"""The shared numerical core: centering, Gram matrices and HSIC estimators.

Every function takes already validated floating-point tensors (see ``repsim_plugin._validation``) and keeps
autograd intact: no ``.item()``, no in-place updates of inputs. Centering always happens *before* any Gram
matrix or cross-product is formed, so a large common offset (post-ReLU activations, ``X + 1e4``) cannot
cancel away the signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._utils.warnings import warn
from ..errors import DegenerateInputError, RepsimError, SmallSampleBiasWarning, TooFewSamplesError, UnknownNameError
from .ids import Spec

# --- centering ----------------------------------------------------------------------------------------------


def center_columns(X: torch.Tensor) -> torch.Tensor:
    """Subtract each feature's mean: ``H X`` with ``H = I - 11^T / n``."""
    return X - X.mean(dim=0, keepdim=True)


def center_gram(K: torch.Tensor) -> torch.Tensor:
    """Double-center a Gram matrix: ``H K H``. Any square ``K`` (its row and column means are taken apart).

    Not ``center_gram_(K.clone())``: that one's symmetric shortcut (one set of means) gives other last bits.
    """
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def center_gram_(K: torch.Tensor) -> torch.Tensor:
    """Double-center a symmetric Gram in place: ``H K H`` (its row means are its column means).

    For the float64 (n, n) Grams of the streaming stack: no (n, n) temporary, and one (n, n) reduction where
    :func:`center_gram` makes three (the same subtractions in the same order, from the column means alone).
    """
    m = K.mean(dim=0)
    total = m.mean()
    return K.sub_(m[None, :]).sub_(m[:, None]).add_(total)


# --- Gram matrices --------------------------------------------------------------------------------------------


def linear_gram(X: torch.Tensor) -> torch.Tensor:
    """Linear Gram matrix of the column-centered data, ``X~ X~^T`` (already double-centered)."""
    Xc = center_columns(X)
    return Xc @ Xc.T


def squared_distances(X: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances, computed from centered data, with an exact zero diagonal.

    ``||x_i||^2 + ||x_j||^2 - 2 x_i.x_j`` can come out a few ulps below zero for near-identical points; those
    rounding residues are set to zero (the quantity is non-negative by definition, so this hides nothing).
    """
    Xc = center_columns(X)
    norms = (Xc * Xc).sum(dim=1)
    D = norms[:, None] + norms[None, :] - 2.0 * (Xc @ Xc.T)
    eye = torch.eye(D.shape[0], dtype=torch.bool, device=D.device)
    return torch.where(eye, torch.zeros((), dtype=D.dtype, device=D.device), D.clamp_min(0.0))


def _median(values: torch.Tensor) -> torch.Tensor:
    """Median with numpy's convention (mean of the two middle values for an even count); differentiable."""
    flat = values.reshape(-1)
    m = flat.numel()
    upper = torch.kthvalue(flat, m // 2 + 1).values
    if m % 2:
        return upper
    lower = torch.kthvalue(flat, m // 2).values
    return (lower + upper) / 2


def _off_diagonal(D: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(D.shape[0], D.shape[1], offset=1, device=D.device)
    return D[i, j]


#: How the RBF bandwidth is derived from the data. The first is Kornblith et al.'s reference code and the
#: similarity-repository convention; its id carries no extra token. The others add ``bandwidth=<rule>``.
BANDWIDTH_RULES: dict[str, str] = {
    "median_sq_full": "sigma * sqrt(median of squared distances over the full n x n matrix, zeros included)",
    "median_sq_offdiag": "sigma * sqrt(median of squared distances between distinct samples)",
    "median_dist_offdiag": "sigma * median of distances (not squared) between distinct samples",
    "fixed": "sigma is the bandwidth itself",
}
DEFAULT_BANDWIDTH = "median_sq_full"


def rbf_bandwidth(D: torch.Tensor, sigma: float, rule: str = DEFAULT_BANDWIDTH) -> torch.Tensor:
    """Squared bandwidth ``s^2`` of the RBF kernel ``exp(-d^2 / (2 s^2))`` from squared distances ``D``."""
    if not 0.0 < float(sigma) <= 1e150:  # beyond, sigma^2 overflows and every kernel entry would read 1
        raise RepsimError(
            f"sigma={float(sigma):g} is outside (0, 1e150]: the RBF kernel needs a positive width whose square is "
            "finite (a huge width makes every kernel entry 1; use linear CKA for very wide kernels)."
        )
    if rule == "fixed":
        return torch.as_tensor(float(sigma) ** 2, dtype=D.dtype, device=D.device)
    if rule == "median_sq_full":
        med_sq = _median(D)
    elif rule == "median_sq_offdiag":
        med_sq = _median(_off_diagonal(D))
    elif rule == "median_dist_offdiag":
        # sqrt has an infinite derivative at 0: only take it where distances are positive.
        off = _off_diagonal(D)
        safe = torch.where(off > 0, off, torch.ones_like(off))
        med_sq = _median(torch.where(off > 0, safe.sqrt(), torch.zeros_like(off))) ** 2
    else:
        raise UnknownNameError(f"unknown RBF bandwidth rule {rule!r}; choose one of {sorted(BANDWIDTH_RULES)}.")
    if not bool(med_sq > 0):
        raise DegenerateInputError(
            "the median pairwise distance is 0 (more than half of the samples coincide), so the RBF median "
            "bandwidth is undefined. Remove duplicate samples, or pass bandwidth='fixed' with an explicit sigma."
        )
    return float(sigma) ** 2 * med_sq


def rbf_gram(X: torch.Tensor, sigma: float = 0.5, bandwidth: str = DEFAULT_BANDWIDTH) -> torch.Tensor:
    """RBF Gram matrix ``exp(-||x - x'||^2 / (2 s^2))`` with ``s`` from :func:`rbf_bandwidth`."""
    D = squared_distances(X)
    return torch.exp(-D / (2.0 * rbf_bandwidth(D, sigma, bandwidth)))


def cosine_gram(X: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity Gram matrix of the column-centered rows, ``<x~_i, x~_j> / (|x~_i| |x~_j|)``.

    Centering first keeps CKA with this kernel invariant to translation (like the linear kernel). A sample equal
    to the mean of all samples has no direction: that is an error, not a silent zero row.
    """
    Xc = center_columns(X)
    norms = Xc.norm(dim=1)
    zero = (norms == 0).nonzero().flatten()
    if zero.numel():
        raise DegenerateInputError(
            f"the cosine kernel needs every centered sample to be non-zero, but sample {int(zero[0])} "
            f"({zero.numel()} in all) equals the mean of all samples. Use the linear or RBF kernel, or drop it."
        )
    Xn = Xc / norms[:, None]
    return Xn @ Xn.T


def polynomial_gram(X: torch.Tensor, degree: int = 3, coef0: float = 1.0) -> torch.Tensor:
    """Polynomial Gram matrix ``(<x~_i, x~_j> / p + coef0) ** degree`` of the column-centered data.

    ``1 / p`` is scikit-learn's default ``gamma``; centering first keeps CKA translation invariant. The kernel is
    not scale invariant (``coef0`` sets an absolute scale), so neither is CKA with it.
    """
    Xc = center_columns(X)
    return (Xc @ Xc.T / Xc.shape[1] + coef0) ** degree


#: Gram-matrix builders by kernel name: ``gram(X, **kernel_params) -> (n, n)``. Extend to add a kernel to
#: kernel CKA; ``KERNEL_PARAMS`` lists the parameters each accepts with their defaults.
KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear_gram,
    "rbf": rbf_gram,
    "cosine": cosine_gram,
    "polynomial": polynomial_gram,
}
KERNEL_PARAMS: dict[str, dict[str, object]] = {
    "linear": {},
    "rbf": {"sigma": 0.5, "bandwidth": DEFAULT_BANDWIDTH},
    "cosine": {},
    "polynomial": {"degree": 3, "coef0": 1.0},
}
#: Kernels whose Gram matrix changes (beyond a global factor) when the data are scaled: CKA with them is not
#: invariant to isotropic scaling.
SCALE_DEPENDENT_KERNELS = frozenset({"polynomial"})


# --- HSIC estimators -------------------------------------------------------------------------------------------


def hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Gretton et al. (2005): ``tr(K H L H) / (n - 1)^2``."""
    n = K.shape[0]
    return (center_gram(K) * L).sum() / (n - 1) ** 2


def hsic_unbiased_table(KA: torch.Tensor, KB: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    """Song et al.'s unbiased HSIC of every pair of stacked matrices: KA (La, m, m), KB (Lb, m, m) -> (La, Lb).

    The general form, valid for non-symmetric matrices too (masked kernels): with zero-diagonal A', B',
    ``[tr(A'B') + (1'A'1)(1'B'1) / ((m-1)(m-2)) - 2/(m-2) 1'A'B'1] / (m (m-3))``. ``symmetric=True`` promises
    symmetric Grams and skips a transpose. Needs m >= 4; may be negative.
    """
    m = KA.shape[-1]
    if m < 4:
        raise TooFewSamplesError(f"unbiased HSIC needs at least 4 samples, got {m}.")
    eye = torch.eye(m, dtype=torch.bool, device=KA.device)
    A = KA.masked_fill(eye, 0.0)
    B = KB.masked_fill(eye, 0.0)
    Bt = B if symmetric else B.transpose(-1, -2)
    trace = A.reshape(A.shape[0], -1) @ Bt.reshape(Bt.shape[0], -1).T  # tr(A'B') = sum_ij A'_ij B'_ji
    col_a, row_b = A.sum(-2), B.sum(-1)  # 1'A' and B'1, (L, m)
    totals = torch.outer(A.sum((-2, -1)), B.sum((-2, -1))) / ((m - 1) * (m - 2))
    cross = 2.0 / (m - 2) * (col_a @ row_b.T)
    return (trace + totals - cross) / (m * (m - 3))


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC of two (n, n) matrices (see :func:`hsic_unbiased_table`); n >= 4."""
    return hsic_unbiased_table(K.unsqueeze(0), L.unsqueeze(0))[0, 0]


def linear_hsic_biased_features(Xc: torch.Tensor, Yc: torch.Tensor) -> torch.Tensor:
    """Biased linear HSIC in feature space from centered data: ``||Y~^T X~||_F^2 / (n - 1)^2``."""
    n = Xc.shape[0]
    return (Yc.T @ Xc).square().sum() / (n - 1) ** 2


def linear_hsic_unbiased_features(Xc: torch.Tensor, Yc: torch.Tensor) -> torch.Tensor:
    """Unbiased linear HSIC in feature space from centered data (equal to :func:`hsic_unbiased` on linear Grams).

    ``[||Y~^T X~||^2 - n/(n-2) r_x.r_y + s_x s_y / ((n-1)(n-2))] / (n (n-3))``, r the row squared norms,
    s their sums. Exactly invariant to translating X, which is why centering first changes nothing.
    """
    n = Xc.shape[0]
    if n < 4:
        raise TooFewSamplesError(f"unbiased HSIC needs at least 4 samples, got {n}.")
    rx, ry = (Xc * Xc).sum(dim=1), (Yc * Yc).sum(dim=1)
    value = (Yc.T @ Xc).square().sum() - n / (n - 2) * (rx * ry).sum() + rx.sum() * ry.sum() / ((n - 1) * (n - 2))
    return value / (n * (n - 3))


#: Biased linear CKA of independent data is about sqrt(pq / ((n+p)(n+q))); above this the package warns.
NULL_BIAS_WARNING = 0.1


def expected_null_cka(n: int, p: int, q: int) -> float:
    """Approximate biased linear CKA of independent Gaussian features: ``sqrt(pq / ((n+p)(n+q)))``."""
    return math.sqrt(p * q / ((n + p) * (n + q)))


def warn_small_sample_bias(n: int, p: int, q: int, advice: str) -> None:
    """Warn (:class:`SmallSampleBiasWarning`) when biased linear CKA of this shape is inflated by chance alone."""
    null = expected_null_cka(n, p, q)
    if null > NULL_BIAS_WARNING:
        warn(
            f"biased linear CKA with n={n} samples and {p} / {q} features is inflated: independent random "
            f"features of this shape already score about {null:.2f}. {advice}",
            SmallSampleBiasWarning,
        )


def warn_full_rank(n: int, p: int, q: int, measure: str, advice: str) -> None:
    """Warn (:class:`SmallSampleBiasWarning`) when both sides have at least n - 1 features.

    The centered rows of n samples span at most n - 1 dimensions; with ``min(p, q) >= n - 1`` generic data of
    both sides span all of them, so an alignment (Procrustes, shape metrics) or a kernel comparison (biased RBF
    CKA, whose Grams of high-dimensional points all look alike) scores close to its maximum for independent
    inputs: the value reflects the shape, not the data.
    """
    if n >= 2 and min(p, q) >= n - 1:
        warn(
            f"{measure} with n={n} samples and {p} / {q} features is inflated: with at least n - 1 features on "
            f"both sides, independent random representations already look nearly identical to it. {advice}",
            SmallSampleBiasWarning,
        )


def resolve_kernel(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A kernel name and its full, validated parameters (defaults filled in) from measure parameters.

    Pops ``kernel`` (a name or a parsed ``(name-k=v)`` spec) and the flat parameters it accepts (``sigma=``, ...)
    from ``params``, so that what is left over is someone else's to check.
    """
    kernel = params.pop("kernel", "linear")
    if isinstance(kernel, Spec):
        name, kparams = kernel.name, dict(kernel.params)
    else:
        name, kparams = str(kernel), {}
    if name not in KERNELS:
        raise UnknownNameError(f"unknown kernel {name!r}; choose one of {sorted(KERNELS)}.")
    accepted = KERNEL_PARAMS.get(name, {})
    for key in list(params):
        if key in accepted:
            kparams[key] = params.pop(key)
    unknown = set(kparams) - set(accepted)
    if unknown:
        raise RepsimError(
            f"kernel {name!r} takes no parameter(s) {sorted(unknown)}"
            + (f"; it accepts {sorted(accepted)}." if accepted else ".")
            + (" Pass kernel='rbf' to use sigma." if "sigma" in unknown else "")
        )
    full = {**accepted, **kparams}
    if name == "polynomial":
        full["degree"] = _as_positive_int("degree", full["degree"])
        full["coef0"] = _as_nonnegative_float("coef0", full["coef0"])
    if name == "rbf":
        full["sigma"] = _as_positive_float("sigma", full["sigma"])
        if full["bandwidth"] not in BANDWIDTH_RULES:
            raise UnknownNameError(
                f"unknown RBF bandwidth rule {full['bandwidth']!r}; choose one of {sorted(BANDWIDTH_RULES)}."
            )
    return name, full


def _as_positive_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RepsimError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(out) or out <= 0:
        raise RepsimError(f"{name} must be a positive finite number, got {value!r}.")
    return out


def _as_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RepsimError(f"{name} must be a positive integer, got {value!r}.")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise RepsimError(f"{name} must be a positive integer, got {value!r}.") from None
    if out < 1 or (isinstance(value, float) and value != out) or (isinstance(value, str) and str(out) != value):
        raise RepsimError(f"{name} must be a positive integer, got {value!r}.")
    return out


def _as_nonnegative_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RepsimError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(out) or out < 0:
        raise RepsimError(f"{name} must be a non-negative finite number, got {value!r}.")
    return out


def cka_from_hsic(hsic_xy: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor) -> torch.Tensor:
    """``HSIC(X, Y) / (sqrt(HSIC(X, X)) sqrt(HSIC(Y, Y)))``; a non-positive self-HSIC is an error, not a NaN.

    The square roots are taken apart: ``HSIC(X, X) HSIC(Y, Y)`` scales like the eighth power of the inputs
    (linear kernel) and overflows long before either factor does. An HSIC that is itself not finite is an
    overflow error, never a 0.0 or NaN.
    """
    check_finite_hsic((hsic_xy, hsic_xx, hsic_yy))
    for value, name in ((hsic_xx, "X"), (hsic_yy, "Y")):
        if not bool(value > 0):
            raise DegenerateInputError(
                f"HSIC({name}, {name}) = {float(value):.3g} is not positive, so CKA is undefined. With the "
                "unbiased (debiased) estimator this happens at very small n or for a nearly constant "
                f"representation: use more samples, or check that {name} varies across inputs."
            )
    return hsic_xy / (torch.sqrt(hsic_xx) * torch.sqrt(hsic_yy))


def check_finite_hsic(values: Sequence[torch.Tensor]) -> None:
    """Raise :class:`DegenerateInputError` (an overflow, not a small-sample problem) for a non-finite HSIC."""
    if not all(bool(torch.isfinite(v.detach()).all()) for v in values):
        raise DegenerateInputError(
            "an HSIC term overflowed (it is not finite) for finite inputs: the activations are too large or too "
            "small for the kernel's sums. Rescale the activations (e.g. divide each layer by its largest absolute "
            "value); scale-free measures are rescaled automatically, kernels with a fixed scale are not."
        )
