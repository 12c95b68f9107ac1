"""Mixed precision: float32 products of float64-exact deviations, everything built from them in float64.

The fast forms of linear CKA and of the linear Grams (matrix level, sample-space maps, minibatch CKA): deviations
from a float32 centre are formed once (a float32 subtraction is correctly rounded), the products run at float32
GEMM speed, and the parts that carry most of a float32 product's rounding (the diagonals, the entries of strongly
correlated features) are made exact in float64. Within 1e-8 of full float64 (``tests/test_performance.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .._utils.gemm import product_t

#: Below this many multiply-adds a product costs next to nothing in float64, so the mixed forms keep float64.
MIXED_MIN_FLOPS = 2**27
#: Unbiased HSIC of sample-space Grams drops their exact diagonals, so its float32 rounding is that of the
#: off-diagonal entries, which grows as sqrt(d) / n: debiased CKA of the adversarial pairs of
#: ``tests/test_performance.py`` came 3.7e-8 from float64 at n = 64, d = 32768 and 2.6e-8 at n = 128, d = 65536,
#: about 0.1-0.3 x 6e-8 x sqrt(d) / n. Below n^2 = UNBIASED_MIN_RATIO x d (sqrt(d) / n > 1/4) it stays float64.
UNBIASED_MIN_RATIO = 16


def unbiased_gram_mixed_ok(n: int, d: int) -> bool:
    """Whether the unbiased HSIC of an (n, n) Gram of d features may take the float32 product (within 1e-8)."""
    return n * n >= UNBIASED_MIN_RATIO * d


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


#: Bytes of ``D`` per chunk of the sums of squares: about a core's L2 cache (8 MiB chunks ran 2-3x slower:
#: W2's row sums 0.097 s against 0.029 s, W1's column sums 0.085 s against 0.041 s, 2-core AVX-512 machine).
CHUNK_BYTES = 2**20


def row_squares64(D: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Exact float64 sums of squares of each row of ``D``, a few rows at a time (no (n, d) float64 copy).

    ``vector_norm(..., dtype=float64)`` upcasts inside its reduction, so a chunk of rows costs one read of
    ``D``; on the whole matrix at once it would materialise the float64 copy (10x slower, measured).
    """
    out = torch.empty(D.shape[0], dtype=torch.float64, device=D.device)
    for rows in _row_chunks(D, chunk_bytes):
        torch.linalg.vector_norm(D[rows], dim=1, dtype=torch.float64, out=out[rows])
    return out.square_()


def col_squares64(D: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
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


def deviation_gram64(D: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``D D^T`` in float64 from float32 deviations ``D``: float32 products, an exact float64 diagonal; no autograd.

    The product is :func:`symmetric_product64` (half a GEMM, written straight into ``out`` when given: no other
    (n, n) buffer). The same rows always give the same bits (the blocks depend on the row count alone). The
    diagonal (sums of squares, which carry most of a float32 product's rounding) is exact. BLAS ``ssyrk`` through
    SciPy was measured too: faster alone, but its idle threads spin and slow the torch work around it (W2's Gram
    phase 1.59 s against 1.37 s for block products, quiet 2-core machine).
    """
    G = symmetric_product64(D, out)
    G.diagonal().copy_(row_squares64(D))
    return G


#: Rows of ``A`` below which :func:`symmetric_product64` multiplies a diagonal block whole.
SYMMETRIC_LEAF = 64


def symmetric_product64(A: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A A^T`` in float64 from float32 ``A`` (any strided 2-D view, e.g. ``D.T``); no autograd.

    Half a GEMM by recursive halving: the off-diagonal block of the two halves is one square product, written
    below the diagonal and mirrored above, and each half recurses down to diagonal blocks of at most
    ``SYMMETRIC_LEAF`` rows, multiplied whole and symmetrised. Square blocks keep the BLAS near its full-GEMM
    speed (1024 rows, 2-core AVX-512: a 512 x 512 block at 0.94x, 128 x 1024 strips at 0.68x); 1.06x the
    multiply-adds of half a GEMM at 1024 rows. The blocks multiply through :func:`~repsim_plugin._utils.gemm.product_t`
    (oneDNN with ``REPSIM_ONEDNN=1``, for rows of 16384+ features: a 1024 x 16384 half-Gram in 0.05 s instead of
    0.097 s). The result is symmetric to the last bit and its bits depend on the row count alone.
    """
    n = A.shape[0]
    G = torch.empty((n, n), dtype=torch.float64, device=A.device) if out is None else out
    with torch.no_grad():
        _symmetric_blocks(A, G, 0, n)
    return G


def _symmetric_blocks(A: torch.Tensor, G: torch.Tensor, lo: int, hi: int) -> None:
    """Fill ``G[lo:hi, lo:hi]`` with ``A[lo:hi] A[lo:hi]^T`` (see :func:`symmetric_product64`)."""
    m = hi - lo
    if m <= SYMMETRIC_LEAF:
        diag = G[lo:hi, lo:hi]
        diag.copy_(product_t(A[lo:hi], A[lo:hi]))
        diag.copy_(torch.tril(diag) + torch.tril(diag, diagonal=-1).T)
        return
    mid = lo + (m // 2 + 15) // 16 * 16  # a multiple of 16 rows into the block, for the BLAS kernels
    block = product_t(A[mid:hi], A[lo:mid])
    G[mid:hi, lo:mid] = block
    G[lo:mid, mid:hi] = block.T
    _symmetric_blocks(A, G, lo, mid)
    _symmetric_blocks(A, G, mid, hi)


#: Entries of a float32 product whose features correlate at least this much are recomputed exactly.
CORRELATED_ENTRY = 0.5


def cross_product64(Da: torch.Tensor, Db: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """``Da^T Db`` in float64: one float32 product, the entries of strongly correlated features made exact.

    ``sa`` / ``sb`` are the float64 column sums of squares of ``Da`` / ``Db`` (see :func:`refine_correlated`).
    """
    return refine_correlated(product_t(Da.T, Db.T).to(torch.float64), Da, Db, sa, sb)


def self_product64(D: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``D^T D`` in float64: half a float32 GEMM without autograd (:func:`symmetric_product64` of ``D^T``: 0.6x
    the full product's time at 10^4 x 2048), the entries of strongly correlated features made exact. Its diagonal
    is left as multiplied: the callers replace it by the exact column sums of squares."""
    if D.requires_grad and torch.is_grad_enabled():
        C = (D.T @ D).to(torch.float64)
    else:
        C = symmetric_product64(D.detach().T)
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
    for rows in _row_chunks(Da, CHUNK_BYTES):
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
