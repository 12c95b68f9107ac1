"""Independent textbook implementations used as references by the tests.

Written from the formulas in PAPER.md with an explicit centering matrix H; they never call repsim_plugin.
``cka_exact`` works in exact rational arithmetic (fractions), so it is a reference that no floating-point
cancellation can fool (large common offsets); ``cka_numpy`` is the float64 version for larger problems.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def _matmul(A: list[list[Fraction]], B: list[list[Fraction]]) -> list[list[Fraction]]:
    Bt = list(zip(*B, strict=True))
    return [[sum((a * b for a, b in zip(row, col, strict=True)), Fraction(0)) for col in Bt] for row in A]


def _trace(A: list[list[Fraction]]) -> Fraction:
    return sum((A[i][i] for i in range(len(A))), Fraction(0))


def hsic_exact(K: list[list[Fraction]], L: list[list[Fraction]]) -> Fraction:
    """tr(K H L H) / (n - 1)^2 with H = I - 11^T / n, exactly."""
    n = len(K)
    H = [[Fraction(int(i == j)) - Fraction(1, n) for j in range(n)] for i in range(n)]
    return _trace(_matmul(_matmul(_matmul(K, H), L), H)) / (n - 1) ** 2


def linear_kernel_exact(X: np.ndarray) -> list[list[Fraction]]:
    rows = [[Fraction(float(v)) for v in row] for row in X]
    return _matmul(rows, [list(c) for c in zip(*rows, strict=True)])


def cka_exact(X: np.ndarray, Y: np.ndarray) -> float:
    """Biased linear CKA of float64 data, computed exactly (only the final sqrt is rounded)."""
    K, L = linear_kernel_exact(X), linear_kernel_exact(Y)
    xy, xx, yy = hsic_exact(K, L), hsic_exact(K, K), hsic_exact(L, L)
    return float(xy) / math.sqrt(float(xx) * float(yy)) if xy else 0.0


def hsic_numpy(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def cka_numpy(X: np.ndarray, Y: np.ndarray) -> float:
    """Biased linear CKA, float64, Gram form with an explicit H (Kornblith et al. 2019, eq. 4)."""
    K, L = X @ X.T, Y @ Y.T
    return hsic_numpy(K, L) / math.sqrt(hsic_numpy(K, K) * hsic_numpy(L, L))


def rbf_gram_numpy(X: np.ndarray, threshold: float) -> np.ndarray:
    """Kornblith's RBF Gram: bandwidth^2 = threshold^2 * median of the full squared-distance matrix."""
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.exp(-D / (2 * threshold**2 * np.median(D)))


def cka_rbf_numpy(X: np.ndarray, Y: np.ndarray, threshold: float = 0.5) -> float:
    K, L = rbf_gram_numpy(X, threshold), rbf_gram_numpy(Y, threshold)
    return hsic_numpy(K, L) / math.sqrt(hsic_numpy(K, K) * hsic_numpy(L, L))


def hsic_unbiased_numpy(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written with explicit zero-diagonal Grams and all-ones vectors."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(Kt @ Lt)
    term2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    return float(term1 + term2 - term3) / (n * (n - 3))


def debiased_cka_numpy(K: np.ndarray, L: np.ndarray) -> float:
    return hsic_unbiased_numpy(K, L) / math.sqrt(hsic_unbiased_numpy(K, K) * hsic_unbiased_numpy(L, L))
