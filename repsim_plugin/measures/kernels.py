"""The shared numerical core: centering, Gram matrices and HSIC estimators.

Every function takes already validated floating-point tensors (see ``repsim_plugin._validation``) and keeps
autograd intact: no ``.item()``, no in-place updates of inputs. Centering always happens *before* any Gram
matrix or cross-product is formed, so a large common offset (post-ReLU activations, ``X + 1e4``) cannot
cancel away the signal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
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


# --- mixed precision: float32 products of float64-exact deviations ----------------------------------------------

#: Below this many multiply-adds a product costs next to nothing in float64, so the mixed forms keep float64.
MIXED_MIN_FLOPS = 2**27


def deviations32(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 deviations ``D = X - c`` from a float32 centre, with what makes them exact in float64.

    Returns ``(D, r, cols, rows)``: ``r`` the float64 column means left in ``D`` (``X~ = D - 1 r^T`` exactly),
    ``cols`` / ``rows`` the column / row sums of squares of ``X~`` in float64 (:func:`deviation_terms`). A float32
    subtraction is correctly rounded, so each deviation is its true value rounded once (a large common offset
    such as ``X + 1e4`` cancels before any product); ``c`` need only be close to the mean, and the products are
    corrected by ``r`` exactly. Differentiable; no (n, d) float64 copy is made.
    """
    D = X - X.mean(dim=0, keepdim=True)
    return (D, *deviation_terms(D))


def deviation_terms(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(r, cols, rows)`` of float32 deviations ``D`` from any centre close to the mean (see :func:`deviations32`)."""
    n = D.shape[0]
    r = D.mean(dim=0).to(torch.float64)
    cols = col_squares64(D) - n * r.square()
    rows = row_squares64(D) - 2.0 * (D @ r.to(D.dtype)).to(torch.float64) + r.square().sum()
    return r, cols, rows


def row_squares64(D: torch.Tensor, chunk_bytes: int = 2**23) -> torch.Tensor:
    """Exact float64 sums of squares of each row of ``D``, a few rows at a time (no (n, d) float64 copy).

    ``vector_norm(..., dtype=float64)`` upcasts inside its reduction, so a chunk of rows costs one read of
    ``D``; on the whole matrix at once it would materialise the float64 copy (10x slower, measured).
    """
    out = torch.empty(D.shape[0], dtype=torch.float64, device=D.device)
    for rows in _row_chunks(D, chunk_bytes):
        torch.linalg.vector_norm(D[rows], dim=1, dtype=torch.float64, out=out[rows])
    return out.square_()


def col_squares64(D: torch.Tensor, chunk_bytes: int = 2**23) -> torch.Tensor:
    """Exact float64 sums of squares of each column of ``D``, summed over chunks of rows (no float64 copy)."""
    out = torch.zeros(D.shape[1], dtype=torch.float64, device=D.device)
    for rows in _row_chunks(D, chunk_bytes):
        out += torch.linalg.vector_norm(D[rows], dim=0, dtype=torch.float64).square_()
    return out


def _row_chunks(D: torch.Tensor, chunk_bytes: int) -> Iterator[slice]:
    """Slices of consecutive rows of ``D``, about ``chunk_bytes`` of it each (at least one row), in order."""
    n, d = D.shape
    step = max(1, chunk_bytes // (D.element_size() * max(d, 1)))
    for i in range(0, n, step):
        yield slice(i, i + step)


def _mirror_block_row(G: torch.Tensor, i: int, j: int) -> None:
    """Copy block row ``G[i:j, :j]``'s lower part above the diagonal, so ``G`` is symmetric to the last bit."""
    G[:i, i:j] = G[i:j, :i].T
    diag = G[i:j, i:j]
    diag.copy_(torch.tril(diag) + torch.tril(diag, diagonal=-1).T)


def deviation_gram64(D: torch.Tensor, out: torch.Tensor | None = None, block: int = 128) -> torch.Tensor:
    """``D D^T`` in float64 from float32 deviations ``D``: float32 products, an exact float64 diagonal; no autograd.

    The product is :func:`symmetric_product64` (half a GEMM, written straight into ``out`` when given: no other
    (n, n) buffer). The same rows always give the same bits (the blocks depend on the row count alone). The
    diagonal (sums of squares, which carry most of a float32 product's rounding) is exact. BLAS ``ssyrk`` through
    SciPy was measured too: faster alone, but its idle threads spin and slow the torch work around it (W2's Gram
    phase 1.59 s against 1.37 s for these block products, quiet 2-core machine).
    """
    G = symmetric_product64(D, out, block)
    G.diagonal().copy_(row_squares64(D))
    return G


def symmetric_product64(A: torch.Tensor, out: torch.Tensor | None = None, block: int = 128) -> torch.Tensor:
    """``A A^T`` in float64 from float32 ``A`` (any strided 2-D view, e.g. ``D.T``); no autograd.

    Only the lower block triangle is multiplied (block rows of ``block``: 1.125x the multiply-adds of half a GEMM
    at 1024 rows of ``A`` and blocks of 128), each block written into the float64 result and mirrored, so the
    result is symmetric to the last bit.
    """
    n = A.shape[0]
    G = torch.empty((n, n), dtype=torch.float64, device=A.device) if out is None else out
    for i in range(0, n, block):
        j = min(i + block, n)
        G[i:j, :j] = A[i:j] @ A[:j].T
        _mirror_block_row(G, i, j)
    return G


#: Entries of a float32 product whose features correlate at least this much are recomputed exactly.
CORRELATED_ENTRY = 0.5


def cross_product64(Da: torch.Tensor, Db: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """``Da^T Db`` in float64: one float32 product, the entries of strongly correlated features made exact.

    ``sa`` / ``sb`` are the float64 column sums of squares of ``Da`` / ``Db`` (see :func:`refine_correlated`).
    """
    return refine_correlated((Da.T @ Db).to(torch.float64), Da, Db, sa, sb)


def self_product64(D: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``D^T D`` in float64: half a float32 GEMM without autograd (:func:`symmetric_product64` of ``D^T``, blocks
    of 256 columns: 0.62x the full product's time at 10^4 x 2048), the entries of strongly correlated features
    made exact. Its diagonal is left as multiplied: the callers replace it by the exact column sums of squares."""
    if D.requires_grad and torch.is_grad_enabled():
        C = (D.T @ D).to(torch.float64)
    else:
        C = symmetric_product64(D.detach().T, block=256)
    return refine_correlated(C, D, D, s, s)


def refine_correlated(
    C: torch.Tensor, Da: torch.Tensor, Db: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor
) -> torch.Tensor:
    """``C`` (float64, from the float32 product ``Da^T Db``) with the entries of strongly correlated features exact.

    An entry's float32 rounding grows with the entry's size, and the squared norm that CKA takes weighs each
    error by its entry, so the entries of features that nearly coincide (``|C_ij| >= 0.5 sqrt(sa_i sb_j)``, with
    ``sa`` / ``sb`` the column sums of squares) carry most of the error. They are recomputed as float64 sums of
    exact float64 products, at most ``p + q`` of them (the largest correlations): ``n (p + q)`` multiply-adds
    against the product's ``n p q``. Measured at n = 10^4, d = 2048 / 1024 with Y a copy of X's first 1024
    features plus 1% noise: 5e-9 -> 7e-11 from float64, +3% time. A self-product's diagonal is left alone.
    """
    with torch.no_grad():
        tiny = torch.finfo(torch.float64).tiny
        score = C.abs().mul_(sa.clamp_min(tiny).rsqrt()[:, None]).mul_(sb.clamp_min(tiny).rsqrt()[None, :])
        if Da is Db:
            score.fill_diagonal_(0.0)
        flat = score.reshape(-1)
        picked = (flat >= CORRELATED_ENTRY).nonzero().squeeze(1)
        cap = C.shape[0] + C.shape[1]
        if picked.numel() > cap:
            picked = flat.topk(cap).indices
    if picked.numel() == 0:
        return C
    i, j = picked // C.shape[1], picked % C.shape[1]
    return C.index_put((i, j), exact_entries(Da, Db, i, j))


def exact_entries(Da: torch.Tensor, Db: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``sum_k Da[k, i_t] Db[k, j_t]`` for each t, from float64 products (exact) summed in float64, by row chunks."""
    out = torch.zeros(i.numel(), dtype=torch.float64, device=Da.device)
    for rows in _row_chunks(Da, 2**20):
        a = Da[rows].index_select(1, i).to(torch.float64)
        b = Db[rows].index_select(1, j).to(torch.float64)
        out = out + torch.linalg.vecdot(a.T, b.T)
    return out


def squared_norm_fixed(
    C32: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor, n: int, diagonal64: torch.Tensor | None = None
) -> torch.Tensor:
    """``||X~^T Y~||_F^2`` in float64 from the float32 product ``C = D_x^T D_y`` of :func:`deviations32`.

    ``X~^T Y~ = C - n r_x r_y^T``, expanded so that the correction costs two matrix-vector products.
    ``diagonal64`` (a Gram, ``X~^T X~``: its exact column sums of squares) replaces the diagonal: it carries
    most of a float32 product's rounding (sums of squares, no cancellation); with it exact and ``C`` from
    :func:`cross_product64` / :func:`self_product64`, mixed linear CKA stays within 1e-8 of float64 (typically
    1e-10; <= 4.4e-9 measured up to n = 2 * 10^4, d = 3000 with offsets, skew, independence, coinciding or
    duplicated features).
    """
    C = C32.to(torch.float64)
    total = C.square().sum() - 2.0 * n * (ra @ C @ rb) + n * n * ra.square().sum() * rb.square().sum()
    if diagonal64 is not None:
        total = total - (torch.diagonal(C) - n * ra * rb).square().sum() + diagonal64.square().sum()
    return total


def gram_fixed(D: torch.Tensor, r: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The centred linear Gram ``X~ X~^T`` in float64 from float32 deviations: one float32 product, exact diagonal.

    Without autograd the product is :func:`deviation_gram64` (half the multiply-adds).
    """
    u = (D @ r.to(D.dtype)).to(torch.float64)
    if D.requires_grad and torch.is_grad_enabled():
        K = (D @ D.T).to(torch.float64) - u[:, None] - u[None, :] + r.square().sum()
        return K + torch.diag(rows - torch.diagonal(K))
    K = deviation_gram64(D.detach())
    K.sub_(u[:, None]).sub_(u[None, :]).add_(r.square().sum())
    K.diagonal().copy_(rows)
    return K


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
